"""The real reviewer window under pytest-qt (offscreen): a full review, the race, reject, views."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PyQt6.QtCore import QPoint, QPointF, Qt
from PyQt6.QtGui import QWheelEvent
from PyQt6.QtWidgets import QApplication
from sqlalchemy import select
from support import synthetic

from dicom_node.db import AuditEvent, Draft, DraftState, Transfer
from gui import viewmodels
from gui.widgets import ImageView
from gui.window import ReviewerWindow
from plugin.drafting import sr
from plugin.review.service import ReviewService

WAIT = 30000


def wait_refreshed(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running, timeout=WAIT)


def row_of(w: ReviewerWindow, patient_id: str) -> int:
    return next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)


def open_row(qtbot, w: ReviewerWindow, patient_id: str) -> int:  # type: ignore[no-untyped-def]
    """Click the worklist row of a patient; wait until views and draft are shown."""
    wait_refreshed(qtbot, w)
    i = row_of(w, patient_id)
    draft_id = w.worklist_vm.rows[i].draft_id
    rect = w.worklist.table.visualRect(w.worklist.model.index(i, 0))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT) as blocker:
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert blocker.args == [draft_id]
    return int(draft_id or 0)


def audit(node: synthetic.NodeFixture, action: str) -> list[AuditEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def test_full_review_worklist_open_edit_sign(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    wait_refreshed(qtbot, w)
    assert [r.patient_id for r in w.worklist_vm.rows] == ["CXR-10001", "CXR-10002", "CXR-10003"]  # oldest first
    assert w.worklist.model.rowCount() == 3
    assert w.worklist.model.index(0, viewmodels.column_index("State")).data() == "new"

    draft_id = open_row(qtbot, w, "CXR-10001")
    # both views side by side, labelled; indication above the report; the draft is marked unverified
    assert sorted(w.study.labels()) == ["LATERAL (LL)", "PA"]
    assert all(v.isVisible() and v.width() > 100 for v in w.study.views)
    pane = w.report
    assert pane.indication.text() == "Shortness of breath for three days. Rule out pneumonia."
    assert pane.indication.y() < pane.stack.y()
    assert "AI DRAFT — UNVERIFIED" in pane.banner.text()
    assert pane.banner.objectName() == "banner_draft"
    assert w.review is not None
    d = w.review.detail
    assert f"{d.model_name} {d.model_version}" in pane.model_line.text()
    assert pane.findings.toPlainText() == d.findings and pane.impression.toPlainText() == d.impression
    assert not pane.findings.isReadOnly() and pane.sign_button.isEnabled()
    wait_refreshed(qtbot, w)
    assert w.worklist_vm.rows[row_of(w, "CXR-10001")].state_label == "in review by alice"
    assert w.worklist.model.index(row_of(w, "CXR-10001"), viewmodels.column_index("State")).data() == "in review by you"

    # edit with the keyboard, look at the diff, sign with Ctrl+Enter
    pane.impression.setFocus()
    pane.impression.selectAll()
    qtbot.keyClicks(pane.impression, "Small right pleural effusion.")
    pane.findings.moveCursor(pane.findings.textCursor().MoveOperation.End)
    qtbot.keyClicks(pane.findings, " Blunting of the right costophrenic angle.")
    qtbot.keyClick(w, Qt.Key.Key_D, Qt.KeyboardModifier.ControlModifier)
    assert pane.stack.currentIndex() == 1
    # the word diff against the AI draft rebuilds the edited text, whatever words the draft shares with it
    ops = w.review.word_diff("impression")
    assert " ".join(t for op, t in ops if op in "=+").split() == "Small right pleural effusion.".split()
    assert any(op == "+" for op, _ in ops)
    assert all(word in pane.diff_view.toPlainText() for word in "Small right pleural effusion.".split())
    qtbot.keyClick(w, Qt.Key.Key_D, Qt.KeyboardModifier.ControlModifier)
    assert pane.stack.currentIndex() == 0
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(title) or True
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        qtbot.keyClick(pane.impression, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert asked == ["Sign this report?"]  # edited text: confirmed too, naming the patient (not "unchanged draft")
    assert w.errors == []

    # the verified SR exists with the edited text, the draft is signed, audit rows are there
    with node.sessions() as s:
        draft = s.get(Draft, draft_id)
        assert draft is not None and draft.state == DraftState.SIGNED and draft.signed_by == "alice"
        ds = pydicom.dcmread(node.store.abspath(draft.signed_path or ""))
        transfers = list(s.scalars(select(Transfer).where(Transfer.sop_instance_uid == ds.SOPInstanceUID)))
    report = sr.read_report(ds)
    assert report.verification_flag == "VERIFIED" and report.verifying_observer == "Moreau^Alice^^Dr"
    assert report.impression == "Small right pleural effusion."
    assert report.findings.endswith("Blunting of the right costophrenic angle.")
    assert [t.destination for t in transfers] == ["pacs"]
    signed = audit(node, "signed")
    assert len(signed) == 1 and signed[0].actor == "alice" and signed[0].object_uid == ds.SOPInstanceUID
    assert json.loads(signed[0].detail)["edited"] is True
    assert len(audit(node, "edited")) == 1

    # the window now shows the final report, read-only
    assert pane.banner.objectName() == "banner_final" and "SIGNED — VERIFIED" in pane.banner.text()
    assert "UNVERIFIED" not in pane.banner.text()
    assert pane.findings.isReadOnly() and not pane.sign_button.isEnabled()
    wait_refreshed(qtbot, w)
    assert all(r.draft_id != draft_id for r in w.worklist_vm.rows)  # gone from "To review"

    # Ctrl+N opens the next waiting draft
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.keyClick(w, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert w.review is not None and w.review.detail.draft_id != draft_id


def test_signing_an_unchanged_draft_asks_first(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("bob")
    draft_id = open_row(qtbot, w, "CXR-10001")  # (CXR-10002's draft holds an "xxxx": never signed unchanged)
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(text) is not None and False
    w.sign()
    assert asked and "exactly the AI draft" in asked[0]
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.IN_REVIEW
    w.confirm = lambda title, text: True
    assert not w.report.impression.isReadOnly()
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.report.sign_button.click()
        assert w.report.impression.isReadOnly()  # frozen while signing: what is signed is what is shown
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.SIGNED and d.signed_by == "bob"
    assert audit(node, "edited") == []


def test_two_reviewers_in_two_windows(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    alice = make_window("alice")
    bob = make_window("bob", svc=ReviewService(node.config, node.sessions, node.store))
    draft_id = open_row(qtbot, alice, "CXR-10003")
    wait_refreshed(qtbot, bob)
    bob.refresh()
    wait_refreshed(qtbot, bob)
    assert bob.worklist_vm.rows[row_of(bob, "CXR-10003")].state_label == "in review by alice"
    assert open_row(qtbot, bob, "CXR-10003") == draft_id
    # bob sees the draft read-only, with who holds it; he cannot sign or reject
    assert bob.report.banner.objectName() == "banner_blocked"
    assert "in review by alice" in bob.report.banner.text()
    assert bob.report.findings.isReadOnly() and not bob.report.sign_button.isEnabled()
    bob.sign()  # Ctrl+Enter does nothing either
    bob.tasks.wait()
    with qtbot.waitSignal(alice.signed, timeout=WAIT):
        alice.report.findings.setPlainText(alice.report.findings.toPlainText() + " Reviewed.")
        alice.sign()
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.signed_by == "alice"
    assert [e.actor for e in audit(node, "signed")] == ["alice"]


def test_lost_claim_shows_an_error_and_nothing_is_signed(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    draft_id = open_row(qtbot, w, "CXR-10002")
    with node.sessions() as s:  # bob took the draft over meanwhile (e.g. alice's claim expired)
        d = s.get(Draft, draft_id)
        assert d is not None
        d.claimed_by = "bob"
        s.commit()
    w.report.findings.setPlainText("Changed.")  # (the draft's "xxxx" gone: signing is tried)
    w.report.impression.setPlainText("Changed.")
    with qtbot.waitSignal(w.failed, timeout=WAIT) as blocker:
        w.sign()
    assert "in review by bob" in blocker.args[0]
    assert w.errors and w.errors[0][0] == "Not signed"
    assert w.report.findings.isReadOnly() and "in review by bob" in w.report.banner.text()
    assert audit(node, "signed") == []


def test_reject_with_a_reason(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    draft_id = open_row(qtbot, w, "CXR-10003")
    w.ask_reason = lambda: None  # cancelled: nothing happens
    w.reject()
    w.ask_reason = lambda: "   "
    w.reject()
    assert w.errors and "reason is required" in w.errors[-1][1]
    w.ask_reason = lambda: "Lateral view belongs to another patient."
    with qtbot.waitSignal(w.rejected, timeout=WAIT):
        qtbot.keyClick(w, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.REJECTED
        assert d.reject_reason == "Lateral view belongs to another patient."
    assert [(e.actor, e.detail) for e in audit(node, "rejected")] == [("alice", "Lateral view belongs to another patient.")]
    assert "REJECTED" in w.report.banner.text() and not w.report.sign_button.isEnabled()


def test_skip_releases_and_opens_the_next(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    first = open_row(qtbot, w, "CXR-10003")
    with qtbot.waitSignal(w.review_shown, timeout=WAIT) as blocker:
        w.report.skip_button.click()
    assert blocker.args[0] != first
    with node.sessions() as s:
        d = s.get(Draft, first)
        assert d is not None and d.state == DraftState.NEW and d.claimed_by is None
    assert [e.actor for e in audit(node, "released")] == ["alice"]


def test_unknown_account_is_read_only(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("mallory")
    assert "not a configured reviewer" in w.windowTitle()
    open_row(qtbot, w, "CXR-10001")
    assert w.report.findings.isReadOnly() and not w.report.sign_button.isEnabled()
    assert "not a configured reviewer" in w.report.banner.text()
    assert "cannot sign" in w.report.signer.text()


def test_context_launch_opens_the_study(qtbot, make_window, service: ReviewService) -> None:  # type: ignore[no-untyped-def]
    target = next(r for r in service.worklist() if r.patient_id == "CXR-10002")
    w = make_window("alice", study_uid=target.study_instance_uid)
    qtbot.waitUntil(lambda: w.review is not None and w._opening is None, timeout=WAIT)
    assert w.review is not None and w.review.detail.draft_id == target.draft_id


def test_search_filter_and_sort(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    wait_refreshed(qtbot, w)
    qtbot.keyClicks(w.worklist.search, "lindq")
    qtbot.waitUntil(lambda: [r.patient_id for r in w.worklist_vm.rows] == ["CXR-10002"], timeout=WAIT)
    w.worklist.search.clear()
    qtbot.waitUntil(lambda: len(w.worklist_vm.rows) == 3, timeout=WAIT)
    w.worklist.table.sortByColumn(viewmodels.column_index("Patient"), Qt.SortOrder.AscendingOrder)
    qtbot.waitUntil(lambda: [r.patient_name for r in w.worklist_vm.rows] == ["Lindqvist^Erik", "Moreau^Claire", "Nakamura^Yui"], timeout=WAIT)
    w.worklist.state.setCurrentText("Signed")
    qtbot.waitUntil(lambda: w.worklist_vm.rows == [] and not w._refreshing, timeout=WAIT)
    assert w.worklist.count.text().startswith("0 studies")


def test_auto_refresh_picks_up_new_drafts(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice", refresh_interval_s=1)
    wait_refreshed(qtbot, w)
    assert len(w.worklist_vm.rows) == 3
    spec = synthetic.sample_studies(4, size=256, prefix="late")[3]
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec))
    synthetic.run_draft_job(node, spec.study_instance_uid)
    qtbot.waitUntil(lambda: len(w.worklist_vm.rows) == 4, timeout=WAIT)
    assert any(r.patient_id == spec.patient_id for r in w.worklist_vm.rows)


def test_image_view_window_level_zoom_pan_invert(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_row(qtbot, w, "CXR-10001")
    view: ImageView = w.study.views[0]
    assert view.state is not None and view._gray is not None
    before = view._gray.copy()
    centre = view.rect().center()
    qtbot.mousePress(view, Qt.MouseButton.LeftButton, pos=centre)
    qtbot.mouseMove(view, centre + QPoint(-120, 40))
    qtbot.mouseRelease(view, Qt.MouseButton.LeftButton, pos=centre + QPoint(-120, 40))
    wl = view.state.effective_window
    assert view.state.window is not None and wl.width < view.state.picture.default_window.width
    assert not np.array_equal(before, view._gray)
    # pan with the right button
    t0 = view.transform
    qtbot.mousePress(view, Qt.MouseButton.RightButton, pos=centre)
    qtbot.mouseMove(view, centre + QPoint(30, 20))
    qtbot.mouseRelease(view, Qt.MouseButton.RightButton, pos=centre + QPoint(30, 20))
    assert view.transform.pan != t0.pan
    # wheel zoom
    ev = QWheelEvent(QPointF(centre), QPointF(view.mapToGlobal(centre)), QPoint(0, 0), QPoint(0, 240),
                     Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(view, ev)
    assert view.transform.zoom > 1.0
    # toolbar: invert, fit, reset (all views)
    w.study.buttons["invert"].click()
    assert all(v.state is not None and v.state.invert for v in w.study.views)
    w.study.buttons["fit"].click()
    assert view.transform.zoom == 1.0 and view.transform.pan == (0.0, 0.0)
    w.study.buttons["reset"].click()
    assert view.state.window is None and not view.state.invert
    np.testing.assert_array_equal(view._gray, before)
    w.study.buttons["one"].click()
    assert view.transform.scale == pytest.approx(1.0)


def formats_of(editor) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(marked text, background colour) of every highlight in an editor's first block."""
    doc = editor.document()
    text = doc.firstBlock().text()
    return [(text[f.start:f.start + f.length], f.format.background().color().name())
            for f in doc.firstBlock().layout().formats()]


def test_uncertain_calls_and_words_are_highlighted(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    from plugin.review.draft_info import ObservationCall

    w = make_window("alice")
    open_row(qtbot, w, "CXR-10001")
    assert w.review is not None
    tokens = w.review.detail.tokens
    assert tokens, "the pipeline stores token probabilities"
    d = w.review.detail
    # every word nearly certain, and no observation probabilities (so no calls): nothing is marked
    calm: list[ObservationCall] = []
    w.review.detail = type(d)(**{**d.__dict__, "tokens": tuple((t, 0.99) for t, _ in tokens), "grounded": (),
                                 "observations": tuple(calm)})
    w.report.show_review(w.review, "")
    editor = w.report.findings if w.review.findings.strip() else w.report.impression
    assert formats_of(editor) == []
    # every word unsure: the content words are marked (orange), the function words are not
    w.review.detail = type(d)(**{**d.__dict__, "tokens": tuple((t, 0.01) for t, _ in tokens), "grounded": (),
                                 "observations": tuple(calm)})
    w.report.show_review(w.review, "")
    marks = formats_of(editor)
    assert marks and all(colour == "#ffc58a" for _, colour in marks)
    assert not {m.lower() for m, _ in marks} & {"the", "is", "are", "of", "no"}
    w.report.highlight.setChecked(False)
    assert formats_of(editor) == []
    w.report.highlight.setChecked(True)
    # an observation the text states, at its threshold: the sentence is an uncertain call (amber)
    w.review.set_text("There is a small pleural effusion.", w.review.impression)
    synthetic_draft = type(d)(**{**d.__dict__, "findings": "There is a small pleural effusion.",
                                 "tokens": tuple((t, 0.99) for t in "there is a small pleural effusion .".split()),
                                 "grounded": (), "observations": (ObservationCall("Pleural Effusion", 0.41, 0.4),)})
    w.review.detail = synthetic_draft
    w.report.show_review(w.review, "")
    assert formats_of(w.report.findings) == [("There is a small pleural effusion.", "#ffe082")]
    mark = w.report.hl_findings.span_at(3)  # what the tooltip says when hovering it
    assert mark is not None and mark.note == "Pleural Effusion: p 0.41, above its threshold 0.40"
    # what the radiologist types is never marked
    w.report.findings.moveCursor(w.report.findings.textCursor().MoveOperation.End)
    qtbot.keyClicks(w.report.findings, " Small effusion likely.")
    assert formats_of(w.report.findings) == [("There is a small pleural effusion.", "#ffe082")]


def add_real_film_study(node: synthetic.NodeFixture) -> tuple[str, int]:
    """A study of the two real radiographs, drafted by the real pipeline: the gate withholds it.
    Without the shared samples, a drafted study marked withheld the way the pipeline writes it."""
    spec = synthetic.sample_studies(4, size=256, prefix="real")[3]
    datasets = synthetic.real_film_study(spec) or synthetic.make_study(spec)
    synthetic.store_study(node.sessions, node.store, datasets)
    draft_id = synthetic.run_draft_job(node, spec.study_instance_uid)
    if not synthetic.real_film_study(spec):
        synthetic.set_input_check(node, draft_id, "withheld", "no view can be read by the model",
                                  failed={"PA": ["unlike the images the model was trained on"],
                                          "LL": ["unlike the images the model was trained on"]})
    return spec.patient_id, draft_id


def test_withheld_study_not_drafted_empty_editor_signed_from_scratch(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    patient_id, draft_id = add_real_film_study(node)
    w = make_window("alice")
    wait_refreshed(qtbot, w)
    i = row_of(w, patient_id)
    status = w.worklist.model.index(i, len(viewmodels.COLUMNS) - 1).data()
    assert status.startswith("not drafted: ") and "model" in status
    assert w.worklist.model.index(i, viewmodels.column_index("State")).data() == "new"  # it waits for a report like any other study
    assert open_row(qtbot, w, patient_id) == draft_id
    pane = w.report
    assert pane.banner.objectName() == "banner_withheld"
    assert pane.banner.text().startswith("NOT DRAFTED — the AI draft was withheld: ")
    assert "UNVERIFIED" not in pane.banner.text()
    assert pane.findings.toPlainText() == "" and pane.impression.toPlainText() == ""
    assert "write the findings" in pane.findings.placeholderText()
    assert not pane.findings.isReadOnly() and not pane.sign_button.isEnabled()
    assert pane.probabilities.rowCount() == 0 and "not shown" in pane.probabilities_note.text()
    assert not pane.probabilities.isVisible()  # no model output: the editors take the room
    assert all(t.startswith("NOT USED — ") for t in w.study.gate_texts()) and w.study.gate_texts()
    assert pane.gate.text().count("not used: ") == len(w.study.views)  # what each view failed on
    # the radiologist reports from scratch and signs as usual
    pane.findings.setFocus()
    qtbot.keyClicks(pane.findings, "Heart size normal. Lungs clear.")
    qtbot.keyClicks(pane.impression, "Normal chest radiograph.")
    assert pane.sign_button.isEnabled()
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        pane.sign_button.click()
    assert w.errors == []
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.SIGNED
        ds = pydicom.dcmread(node.store.abspath(d.signed_path or ""))
    report = sr.read_report(ds)
    assert report.verification_flag == "VERIFIED"
    assert (report.findings, report.impression) == ("Heart size normal. Lungs clear.", "Normal chest radiograph.")
    if shutil.which("dciodvfy"):  # the verified SR of a withheld study is as valid as any other
        out = subprocess.run(["dciodvfy", str(node.store.abspath(d.signed_path or ""))], capture_output=True,
                             text=True, timeout=60)
        assert not [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")], out.stderr


def test_partial_draft_says_which_view_was_not_used(qtbot, make_window, node: synthetic.NodeFixture, service: ReviewService) -> None:  # type: ignore[no-untyped-def]
    draft_id = next(r.draft_id for r in service.worklist() if r.patient_id == "CXR-10003")
    synthetic.set_input_check(node, draft_id or 0, "partial", "the lateral view is unlike the training images",
                              failed={"LL": ["unlike the images the model was trained on (score 7.2 > limit 5.1)"]})
    w = make_window("alice")
    wait_refreshed(qtbot, w)
    assert w.worklist.model.index(row_of(w, "CXR-10003"), viewmodels.column_index("AI draft")).data() == (
        "drafted without LL: the lateral view is unlike the training images")
    open_row(qtbot, w, "CXR-10003")
    pane = w.report
    assert "without LATERAL (LL)" in pane.banner.text() and pane.banner.objectName() == "banner_draft"
    assert pane.gate.objectName() == "gate_alert"
    assert "LATERAL (LL) not used: unlike the images the model was trained on (score 7.2 > limit 5.1)." in pane.gate.text()
    gates = dict(zip(w.study.labels(), w.study.gate_texts(), strict=True))
    assert gates == {"PA": "input check passed",
                     "LATERAL (LL)": "NOT USED — unlike the images the model was trained on (score 7.2 > limit 5.1)"}


def test_observation_probabilities_beside_the_text(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_row(qtbot, w, "CXR-10001")
    assert w.review is not None
    calls = w.review.detail.observations
    table = w.report.probabilities
    assert table.isVisible() and table.rowCount() == len(calls) == 13
    editor = w.report.findings
    assert table.mapTo(w, QPoint(0, 0)).x() >= editor.mapTo(w, QPoint(0, 0)).x() + editor.width()  # beside the text
    shown = [tuple(table.item(i, j).text() for j in range(3)) for i in range(table.rowCount())]
    assert shown == [(c.name, f"{c.probability:.2f}", f"{c.threshold:.2f}") for c in calls]
    for i, c in enumerate(calls):
        item = table.item(i, 0)
        assert item.font().bold() == (c.probability >= (c.threshold or 1.0))
        assert f"threshold {c.threshold:.2f}" in item.toolTip()
    assert "Bold: called present" in w.report.probabilities_note.text()


def test_claim_is_kept_alive_while_working_and_lost_claim_turns_read_only(qtbot, make_window, node: synthetic.NodeFixture) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    draft_id = open_row(qtbot, w, "CXR-10002")
    assert w.heartbeat.isActive()

    def claimed_at() -> object:
        with node.sessions() as s:
            d = s.get(Draft, draft_id)
            assert d is not None
            return d.claimed_at

    first = claimed_at()
    w._activity = False
    w._heartbeat()  # no activity since the last beat: the claim is left to expire
    w.tasks.wait()
    assert claimed_at() == first
    qtbot.keyClicks(w.report.impression, " ok")  # the reviewer is working
    assert w._activity
    w._heartbeat()
    qtbot.waitUntil(lambda: claimed_at() != first, timeout=WAIT)
    assert not w._activity
    with node.sessions() as s:  # meanwhile bob took it over
        d = s.get(Draft, draft_id)
        assert d is not None
        d.claimed_by = "bob"
        s.commit()
    w._activity = True
    with qtbot.waitSignal(w.failed, timeout=WAIT):
        w._heartbeat()
    assert w.review is not None and not w.review.holds_claim
    assert w.report.findings.isReadOnly() and "in review by bob" in w.report.banner.text()


def test_keyboard_only_open_from_the_worklist(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    wait_refreshed(qtbot, w)
    table = w.worklist.table
    table.setFocus()
    table.setCurrentIndex(w.worklist.model.index(0, 0))
    qtbot.keyClick(table, Qt.Key.Key_Down)
    with qtbot.waitSignal(w.review_shown, timeout=WAIT) as blocker:
        qtbot.keyClick(table, Qt.Key.Key_Return)
    assert blocker.args == [w.worklist_vm.rows[1].draft_id]
    assert w.report.findings.hasFocus()  # ready to type


@pytest.mark.postgres
def test_two_desktops_sharing_postgresql(qtbot, make_window, tmp_path, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    built = synthetic.build_node(tmp_path / "pg", synthetic.sample_studies(2, size=256, prefix="pg"),
                                 database_url=postgres_url)
    desk_b = synthetic.open_node(tmp_path / "pg", database_url=postgres_url)  # a second engine: another desktop
    alice = make_window("alice", svc=ReviewService(built.config, built.sessions, built.store))
    bob = make_window("bob", svc=ReviewService(desk_b.config, desk_b.sessions, desk_b.store))
    try:
        draft_id = open_row(qtbot, alice, "CXR-10001")
        assert open_row(qtbot, bob, "CXR-10001") == draft_id
        assert "in review by alice" in bob.report.banner.text() and not bob.report.sign_button.isEnabled()
        with qtbot.waitSignal(alice.signed, timeout=WAIT):
            alice.report.impression.setPlainText("Signed on PostgreSQL.")
            alice.sign()
        bob.refresh()
        wait_refreshed(qtbot, bob)
        assert all(r.draft_id != draft_id for r in bob.worklist_vm.rows)
        with desk_b.sessions() as s:
            d = s.get(Draft, draft_id)
            assert d is not None and d.state == DraftState.SIGNED and d.signed_impression == "Signed on PostgreSQL."
    finally:
        for w in (alice, bob):
            w.tasks.wait()
        built.engine.dispose()
        desk_b.engine.dispose()
