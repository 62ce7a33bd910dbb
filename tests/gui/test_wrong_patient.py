"""Wrong-patient safety in the real reviewer window (issue 17): the highlighted worklist row is
always the open study, the signature names the open study's patient, and a draft still holding
de-identification placeholders ("xxxx") cannot be signed. Run with ``-k wrong_patient``."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from PyQt6.QtCore import Qt
from sqlalchemy import select
from support import synthetic

from dicom_node.db import AuditEvent, Draft, DraftState, Instance, Transfer, utcnow
from gui import viewmodels
from gui.highlight import KIND_DEID
from gui.window import ReviewerWindow
from plugin.review.service import ReviewError, ReviewService, UndoExpiredError

WAIT = 30000


def wait_idle(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running and w._opening is None, timeout=WAIT)


def row_of(w: ReviewerWindow, patient_id: str) -> int:
    return next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)


def highlighted(w: ReviewerWindow) -> list[int | None]:
    """Draft ids of the highlighted worklist rows (and of the current row, if it differs)."""
    sel = w.worklist.table.selectionModel()
    assert sel is not None
    rows = sorted({i.row() for i in sel.selectedRows()})
    return [w.worklist_vm.rows[r].draft_id for r in rows]


def open_row(qtbot, w: ReviewerWindow, patient_id: str) -> int:  # type: ignore[no-untyped-def]
    wait_idle(qtbot, w)
    i = row_of(w, patient_id)
    draft_id = w.worklist_vm.rows[i].draft_id
    rect = w.worklist.table.visualRect(w.worklist.model.index(i, 0))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    wait_idle(qtbot, w)
    return int(draft_id or 0)


def signed_ids(node: synthetic.NodeFixture) -> list[int]:
    with node.sessions() as s:
        return [d.id for d in s.scalars(select(Draft).where(Draft.state == DraftState.SIGNED))]


def test_wrong_patient_keyboard_in_worklist_keeps_highlight_on_open_study(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    """The bug as seen: the arrow keys moved the worklist highlight to another patient while the
    first stayed open, and Ctrl+Enter signed the open one. Now the highlight follows the open
    study (moving in the worklist opens the row moved to), so what is highlighted is what is signed."""
    w = make_window("alice")
    first = open_row(qtbot, w, "CXR-10001")
    assert highlighted(w) == [first]
    w.worklist.table.setFocus()
    qtbot.keyClick(w.worklist.table, Qt.Key.Key_Down)
    wait_idle(qtbot, w)
    assert w.review is not None
    assert highlighted(w) == [w.review.detail.draft_id]
    assert w.review.detail.patient_id == "CXR-10002"
    open_now = w.review.detail.draft_id
    # an edit, then Ctrl+Enter: the signature is for the highlighted, open study
    w.report.findings.setPlainText(w.report.findings.toPlainText().replace("The xxxx are", "The bones are"))
    w.report.impression.setPlainText("No acute cardiopulmonary abnormality.")
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(text) or True
    with qtbot.waitSignal(w.signed, timeout=WAIT) as blocker:
        qtbot.keyClick(w.report.impression, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert blocker.args == [open_now]
    assert signed_ids(node) == [open_now]
    # the confirmation of an edited report named the open study's patient, ID, accession, date
    assert len(asked) == 1
    d = w.review.detail
    for part in (d.patient_name.split("^")[0].upper(), d.patient_id, d.accession_number):
        assert part and part in asked[0]
    assert "Study date: " in asked[0] and "edited" in asked[0]


def test_wrong_patient_highlight_follows_open_study_after_sort_refresh_failure_and_next(
        qtbot, make_window, node, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    first = open_row(qtbot, w, "CXR-10001")
    before = row_of(w, "CXR-10001")
    # sorting moves the open study's row: the highlight moves with it
    w.worklist.table.sortByColumn(viewmodels.column_index("Patient ID"), Qt.SortOrder.DescendingOrder)
    wait_idle(qtbot, w)
    assert row_of(w, "CXR-10001") != before
    assert highlighted(w) == [first]
    w.refresh()
    wait_idle(qtbot, w)
    assert highlighted(w) == [first]
    # declining to discard an edit keeps the edited study open and highlighted
    w.report.impression.setPlainText("Edited, not signed.")
    w.confirm = lambda title, text: False
    rect = w.worklist.table.visualRect(w.worklist.model.index(row_of(w, "CXR-10002"), 0))
    qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.wait(50)
    wait_idle(qtbot, w)
    assert w.review.detail.draft_id == first and highlighted(w) == [first]
    # a row that cannot be opened: the highlight goes back to the study still open
    w.confirm = lambda title, text: True  # (discard the edit)
    monkeypatch.setattr(viewmodels, "open_review", lambda *a, **k: (_ for _ in ()).throw(ReviewError("broken")))
    i = row_of(w, "CXR-10003")
    rect = w.worklist.table.visualRect(w.worklist.model.index(i, 0))
    with qtbot.waitSignal(w.failed, timeout=WAIT):
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    wait_idle(qtbot, w)
    assert w.review is not None and w.review.detail.draft_id == first
    assert highlighted(w) == [first]
    monkeypatch.undo()
    assert w.report.findings.isReadOnly() and "choose it in the worklist" in w.report.banner.text()
    open_row(qtbot, w, "CXR-10001")  # claimed again
    assert w.review.holds_claim and highlighted(w) == [first]
    # the signed study leaves "To review": nothing is highlighted; Ctrl+N opens the next, highlighted
    w.confirm = lambda title, text: True
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    wait_idle(qtbot, w)
    assert highlighted(w) == []
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.keyClick(w, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    wait_idle(qtbot, w)
    assert w.review.detail.draft_id != first and highlighted(w) == [w.review.detail.draft_id]


def test_wrong_patient_header_and_confirmation_name_the_open_study(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("bob")
    draft_id = open_row(qtbot, w, "CXR-10001")
    d = w.review.detail
    header = w.report.signing_for
    # always visible next to the Sign button, naming the open study
    assert header.isVisible() and header.text().startswith("Signing for: ")
    for part in (d.patient_name.split("^")[0].upper(), d.patient_id, d.accession_number,
                 viewmodels.format_da(d.study_date)):
        assert part and part in header.text()
    assert abs(header.geometry().bottom() - w.report.sign_button.geometry().top()) < 40
    # an edited draft is not signed without the confirmation
    w.report.findings.setPlainText(w.report.findings.toPlainText() + " Reviewed.")
    asked: list[tuple[str, str]] = []
    w.confirm = lambda title, text: asked.append((title, text)) and False
    w.sign()
    w.tasks.wait()
    assert asked and asked[0][0] == "Sign this report?"
    assert d.patient_id in asked[0][1] and d.accession_number in asked[0][1]
    assert signed_ids(node) == [] and not w.report.findings.isReadOnly()
    # the unchanged draft's confirmation names the patient too
    w.report.findings.setPlainText(d.findings)
    asked.clear()
    w.sign()
    assert asked and "exactly the AI draft" in asked[0][1] and d.patient_id in asked[0][1]
    w.confirm = lambda title, text: True
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    assert signed_ids(node) == [draft_id]
    assert header.text().startswith("Signed for: ") and d.patient_id in header.text()


def test_wrong_patient_deid_placeholders_are_marked_and_block_signing(qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    """A draft written with the training reports' "xxxx" de-identification marks: each is marked
    (red, struck through, with a tooltip; also with Highlight off), and Sign refuses with a clear
    message until none is left."""
    findings = "The xxxx are intact. Heart size is normal. XXXX-year-old sternotomy wires."
    real_detail, real_claim = service.detail, service.claim
    service.detail = lambda draft_id: dataclasses.replace(real_detail(draft_id), findings=findings)
    service.claim = lambda draft_id, user: dataclasses.replace(real_claim(draft_id, user), findings=findings)
    w = make_window("alice")
    draft_id = open_row(qtbot, w, "CXR-10001")
    editor, marks = w.report.findings, w.report.hl_findings
    assert editor.toPlainText() == findings
    deid = [s for s in marks.current_spans() if s.kind == KIND_DEID]
    assert [findings[s.start:s.end] for s in deid] == ["xxxx", "XXXX"]
    span = marks.span_at(deid[0].start + 1)
    assert span is not None and span.kind == KIND_DEID and "not report text" in span.note
    w.report.highlight.setChecked(False)  # the placeholders stay marked
    assert [s.kind for s in marks.shown_spans()] == [KIND_DEID, KIND_DEID]
    assert marks.span_at(deid[1].start) is not None
    # drawn in their own format (red background, struck through) in the editor
    block = editor.document().findBlock(deid[0].start)
    fmts = [r for r in block.layout().formats() if r.start <= deid[0].start - block.position() < r.start + r.length]
    assert fmts and fmts[0].format.fontStrikeOut() and fmts[0].format.background().color().name() == "#ff8182"

    # signing is refused, with a message saying what to do; nothing is signed
    w.confirm = lambda title, text: True
    w.sign()
    w.tasks.wait()
    assert w.errors and w.errors[-1][0] == "Not signed"
    assert "2 de-identification placeholders" in w.errors[-1][1] and "Replace" in w.errors[-1][1]
    assert signed_ids(node) == [] and not editor.isReadOnly()
    # the view-model refuses as well (any other caller)
    with pytest.raises(ReviewError, match="placeholder"):
        w.review.sign()
    # one replaced: still refused; both replaced: signed, without any "xxxx"
    editor.setPlainText(findings.replace("The xxxx", "The bones"))
    w.sign()
    assert "1 de-identification placeholder " in w.errors[-1][1]
    editor.setPlainText("The bones are intact. Heart size is normal. Sternotomy wires.")
    assert not [s for s in marks.current_spans() if s.kind == KIND_DEID]
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    assert signed_ids(node) == [draft_id]
    assert "xxxx" not in w.review.findings.lower()


def test_wrong_patient_deid_in_a_real_draft_is_marked_and_not_signed(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    """The shipped model writes "The xxxx are intact." (CXR-10002's draft, drafted by the real pipeline)."""
    w = make_window("alice")
    open_row(qtbot, w, "CXR-10002")
    text = w.report.findings.toPlainText()
    assert "The xxxx are intact." in text
    marked = [text[s.start:s.end] for s in w.report.hl_findings.shown_spans() if s.kind == KIND_DEID]
    assert marked == ["xxxx"]
    w.sign()  # unchanged draft: refused before the "unchanged draft" question
    w.tasks.wait()
    assert w.errors and "1 de-identification placeholder " in w.errors[-1][1]
    assert "placeholders" in w.status_label.text() and signed_ids(node) == []


def test_wrong_patient_deid_spans_find_every_placeholder_form() -> None:
    from gui.highlight import deid_spans

    text = "The xxxx are intact. XXXX-year-old. Chest x-XXXX. Boxxxx and xx are words, xXxX is not."
    assert [text[s.start:s.end] for s in deid_spans(text)] == ["xxxx", "XXXX", "XXXX", "xXxX"]


def _transfers(node: synthetic.NodeFixture, sop: str) -> list[Transfer]:
    with node.sessions() as s:
        return list(s.scalars(select(Transfer).where(Transfer.sop_instance_uid == sop)))


def test_wrong_patient_undo_window_returns_the_report_and_sends_nothing(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    assert node.config.review.undo_window_s == 10.0  # the default
    w = make_window("alice")
    draft_id = open_row(qtbot, w, "CXR-10001")
    w.report.impression.setPlainText("Cardiomegaly. Patchy opacity, possibly pneumonia.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.SIGNED
        sop, relpath = d.signed_sop_instance_uid or "", d.signed_path or ""
    held = _transfers(node, sop)
    # queued, but held for the window: not due yet
    assert [t.destination for t in held] == ["pacs"] and all(t.next_attempt_at > utcnow() for t in held)
    assert w.report.undo_bar.isVisible() and "Sending in" in w.report.undo_label.text()
    assert node.store.abspath(relpath).exists()
    with qtbot.waitSignal(w.sign_undone, timeout=WAIT):
        qtbot.keyClick(w, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    wait_idle(qtbot, w)
    # nothing goes out, the SR is gone from the index and the store, the draft is back with the text
    assert _transfers(node, sop) == []
    with node.sessions() as s:
        assert s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one_or_none() is None
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.IN_REVIEW and d.claimed_by == "alice" and d.signed_by is None
        undone = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "sign_undone")))
    assert len(undone) == 1 and undone[0].actor == "alice" and undone[0].object_uid == sop
    assert not node.store.abspath(relpath).exists()
    assert not w.report.undo_bar.isVisible()
    assert w.review is not None and w.review.holds_claim and not w.report.findings.isReadOnly()
    assert w.report.impression.toPlainText() == "Cardiomegaly. Patchy opacity, possibly pneumonia."
    assert highlighted(w) == [draft_id] and w.report.sign_button.isEnabled()
    # signed again, then "Send now": due at once, and no undo any more
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    with qtbot.waitSignal(w.sign_released, timeout=WAIT):
        w.report.send_now_button.click()
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None
        sop2 = d.signed_sop_instance_uid or ""
    assert [t.next_attempt_at <= utcnow() for t in _transfers(node, sop2)] == [True]
    with pytest.raises(UndoExpiredError):
        w.service.undo_sign(draft_id, "alice")


def test_wrong_patient_undo_window_passes_then_the_report_goes_out(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    config = dataclasses.replace(node.config, review=dataclasses.replace(node.config.review, undo_window_s=1.0))
    svc = ReviewService(config, node.sessions, node.store)
    w = make_window("alice", svc=svc)
    draft_id = open_row(qtbot, w, "CXR-10001")
    w.report.impression.setPlainText("Cardiomegaly.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    assert w.report.undo_bar.isVisible()
    with qtbot.waitSignal(w.sign_released, timeout=WAIT):
        pass
    assert not w.report.undo_bar.isVisible()
    qtbot.keyClick(w, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)  # nothing to undo now
    w.tasks.wait()
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.SIGNED
        sop = d.signed_sop_instance_uid or ""
    assert [t.next_attempt_at <= utcnow() for t in _transfers(node, sop)] == [True]  # due: the sender takes it
    with pytest.raises(UndoExpiredError, match="undo window has passed"):
        svc.undo_sign(draft_id, "alice")
    # someone else's signature is never undone; a started transfer cannot be withdrawn
    with pytest.raises(ReviewError, match="your own"):
        svc.undo_sign(draft_id, "bob")
    late = ReviewService(config, node.sessions, node.store, clock=lambda: utcnow() - dt.timedelta(seconds=0.5))
    with node.sessions() as s:
        for t in s.scalars(select(Transfer).where(Transfer.sop_instance_uid == sop)):
            t.attempts, t.next_attempt_at = 1, utcnow() + dt.timedelta(seconds=30)
        d = s.get(Draft, draft_id)
        assert d is not None
        d.signed_at = utcnow()
        s.commit()
    with pytest.raises(UndoExpiredError, match="already being sent"):
        late.undo_sign(draft_id, "alice")
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.state == DraftState.SIGNED  # nothing changed


@pytest.mark.postgres
def test_wrong_patient_undo_window_on_postgresql(tmp_path, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    """Undo and the sender on a shared PostgreSQL: a held SR is never claimed by the sender; once
    undone, nothing is left to send; once the sender holds a transfer, undo is refused."""
    from dicom_node import outbound

    node = synthetic.build_node(tmp_path / "pg", synthetic.sample_studies(1, size=256, prefix="pgu"),
                                database_url=postgres_url)
    try:
        svc = ReviewService(node.config, node.sessions, node.store)
        draft_id = svc.worklist()[0].draft_id
        assert draft_id is not None
        svc.claim(draft_id, "alice")
        signed = svc.sign(draft_id, "alice", "Heart normal.", "No acute abnormality.")
        sop = signed.signed_sop_instance_uid or ""
        assert outbound.claim_transfer(node.sessions, "sender-a") is None  # held: not due
        assert svc.undo_sign(draft_id, "alice") == ("Heart normal.", "No acute abnormality.")
        assert _transfers(node, sop) == [] and outbound.claim_transfer(node.sessions, "sender-a") is None
        signed = svc.sign(draft_id, "alice", "Heart normal.", "Edited again.")
        assert svc.send_signed_now(draft_id, "alice") == 1
        taken = outbound.claim_transfer(node.sessions, "sender-a")
        assert taken is not None and taken.sop_instance_uid == signed.signed_sop_instance_uid
        with pytest.raises(UndoExpiredError, match="already being sent"):
            svc.undo_sign(draft_id, "alice")
        with node.sessions() as s:
            d = s.get(Draft, draft_id)
            assert d is not None and d.state == DraftState.SIGNED
    finally:
        node.engine.dispose()


# -- Sign & next (F12): what is signed is the study shown, never the one moved to ------------------

def _signed_patient(node: synthetic.NodeFixture, draft_id: int) -> str:
    import pydicom

    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.signed_path
        return str(pydicom.dcmread(node.store.abspath(d.signed_path)).PatientID)


def test_wrong_patient_sign_and_next_signs_only_the_study_shown(qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    w.skip_unchanged_confirmation, w.min_dwell_s = True, 0.0  # the fastest flow: no question asked
    first = open_row(qtbot, w, "CXR-10001")
    assert "CXR-10001" in w.report.signing_for.text()
    # bob takes CXR-10002 after alice's worklist was fetched: it is passed over, not opened read-only
    bobs = next(r.draft_id for r in service.worklist() if r.patient_id == "CXR-10002")
    service.claim(bobs, "bob")
    # two presses at once: the second comes while the first signature is being written: ignored
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
        qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    wait_idle(qtbot, w)
    assert signed_ids(node) == [first]
    assert _signed_patient(node, first) == "CXR-10001"  # the verified SR is the study that was shown
    assert w.review is not None and w.review.detail.patient_id == "CXR-10003" and w.review.holds_claim
    assert highlighted(w) == [w.review.detail.draft_id] and "CXR-10003" in w.report.signing_for.text()
    with node.sessions() as s:
        held = s.get(Draft, bobs)
        assert held is not None and held.claimed_by == "bob" and held.state == DraftState.IN_REVIEW
    # while the next study is still opening, the key signs nothing (neither the old nor the new)
    third = w.review.detail.draft_id
    w._opening = third
    qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    w.tasks.wait()
    w._opening = None
    assert signed_ids(node) == [first]
    # the report pane must show the study being signed: an empty pane signs nothing
    w.report.show_review(None)
    qtbot.keyClick(w, Qt.Key.Key_F12)
    w.tasks.wait()
    assert signed_ids(node) == [first] and "not the open study" in w.status_label.text()
    w.report.show_review(w.review, w._signer_text())
    # Undo after moving on: the signed study (CXR-10001) comes back with its text, highlighted;
    # the study moved to is given back to the worklist
    assert w.report.undo_bar.isVisible() and "CXR-10001" in w.report.undo_label.text()
    with qtbot.waitSignal(w.sign_undone, timeout=WAIT):
        qtbot.keyClick(w, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    wait_idle(qtbot, w)
    assert signed_ids(node) == []
    assert w.review.detail.draft_id == first and w.review.holds_claim and highlighted(w) == [first]
    assert "CXR-10001" in w.report.signing_for.text()
    with node.sessions() as s:
        moved_to = s.get(Draft, third)
        assert moved_to is not None and moved_to.claimed_by in (None, "") and moved_to.state == DraftState.NEW


def test_wrong_patient_sign_and_next_refuses_placeholders_and_keeps_the_study(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    """CXR-10002's draft holds an "xxxx": Sign & next refuses it, signs nothing, opens nothing."""
    w = make_window("alice")
    w.skip_unchanged_confirmation, w.min_dwell_s = True, 0.0
    draft_id = open_row(qtbot, w, "CXR-10002")
    qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    w.tasks.wait()
    wait_idle(qtbot, w)
    assert signed_ids(node) == [] and w.errors and w.errors[-1][0] == "Not signed"
    assert w.review is not None and w.review.detail.draft_id == draft_id and highlighted(w) == [draft_id]
