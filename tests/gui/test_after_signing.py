"""After signing and safety records in the real reviewer window (issue 17): the critical-result
flag at signing (``-k critical``), addenda (``-k addendum``), failed / skipped / rejected studies
kept reachable (report from scratch, retry drafting), and a draft that changed underneath
(nothing signed, the new draft offered in one action)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pydicom
from PyQt6.QtCore import Qt
from sqlalchemy import select
from support import synthetic
from support.sr_checks import check_sr_file

from dicom_node.db import AuditEvent, Draft, DraftState, Transfer
from dicom_node.jobs import JobResult
from dicom_node.review_records import CriticalResult, ReportAddendum
from gui import viewmodels
from gui.window import ReviewerWindow
from plugin.drafting import sr
from plugin.review.service import ReviewService

WAIT = 30000


def wait_idle(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running and w._opening is None, timeout=WAIT)


def row_of(w: ReviewerWindow, patient_id: str) -> int:
    return next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)


def click_row(qtbot, w: ReviewerWindow, patient_id: str) -> None:  # type: ignore[no-untyped-def]
    wait_idle(qtbot, w)
    rect = w.worklist.table.visualRect(w.worklist.model.index(row_of(w, patient_id), 0))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    wait_idle(qtbot, w)


def audits(node: synthetic.NodeFixture, action: str) -> list[AuditEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def no_undo(node: synthetic.NodeFixture) -> ReviewService:
    config = dataclasses.replace(node.config, review=dataclasses.replace(node.config.review, undo_window_s=0))
    return ReviewService(config, node.sessions, node.store)


def highlighted_studies(w: ReviewerWindow) -> list[str]:
    sel = w.worklist.table.selectionModel()
    assert sel is not None
    return [w.worklist_vm.rows[i.row()].study_instance_uid for i in sel.selectedRows()]


# -- critical result ------------------------------------------------------------------------------


def test_critical_result_wording_without_qt() -> None:
    from gui.after_signing import confirmation_line, critical_line, critical_problem
    from plugin.review.results import CriticalNotice

    now = dt.datetime(2026, 11, 28, 9, 30, tzinfo=dt.UTC)
    assert critical_problem("Dr Lee", "ED physician", "telephone", now, now) == ""
    assert "who was told" in critical_problem(" ", "ED physician", "telephone", now, now)
    assert "role" in critical_problem("Dr Lee", "", "telephone", now, now)
    assert "how" in critical_problem("Dr Lee", "ED", "fax", now, now)
    assert "future" in critical_problem("Dr Lee", "ED", "in_person", now + dt.timedelta(hours=1), now)
    notice = CriticalNotice("Dr Lee", "Ward nurse", "secure_message", dt.datetime(2026, 11, 28, 9, 14))
    assert critical_line(notice).startswith("Critical result told to Dr Lee (Ward nurse) by secure message on 2026-11-28")
    assert confirmation_line(None) == "" and "CRITICAL RESULT" in confirmation_line(notice)



def test_critical_result_flag_at_signing_recorded_and_in_the_sr(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    click_row(qtbot, w, "CXR-10001")
    box = w.report.after.critical
    assert box.isVisible() and not box.isChecked()
    # ticked but not filled in: refused before any question, nothing signed
    box.setChecked(True)
    w.sign()
    assert w.errors and "who was told" in w.errors[-1][1]
    assert w.review is not None and not w.review.is_final
    # filled in: the confirmation names it; signed with the record
    box.fill("Dr Ann Lee", "ED physician", "telephone", dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3))
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(text) or True
    w.report.impression.setPlainText("Large right pneumothorax.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        qtbot.keyClick(w.report.impression, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert "CRITICAL RESULT" in asked[-1] and "Dr Ann Lee (ED physician) by telephone" in asked[-1]
    with node.sessions() as s:
        row = s.scalars(select(CriticalResult)).one()
        d = s.get(Draft, row.draft_id)
        assert d is not None and d.state == DraftState.SIGNED and row.sop_instance_uid == d.signed_sop_instance_uid
        path = node.store.abspath(d.signed_path or "")
    assert (row.recipient_name, row.recipient_role, row.method, row.recorded_by) == (
        "Dr Ann Lee", "ED physician", "telephone", "alice")
    assert json.loads(audits(node, "critical_result")[0].detail)["method"] == "telephone"
    check_sr_file(path)
    report = sr.read_report(pydicom.dcmread(path))
    assert report.critical is not None and report.critical.recipient == "Dr Ann Lee"
    # the signed report shows what was recorded; the next study starts unticked
    wait_idle(qtbot, w)
    assert w.report.after.records.critical.isVisible()
    assert "Dr Ann Lee" in w.report.after.records.critical.text()
    assert not box.isVisible()
    w.confirm = lambda title, text: True
    click_row(qtbot, w, "CXR-10002")
    assert box.isVisible() and not box.isChecked() and box.recipient.text() == ""


# -- addendum -------------------------------------------------------------------------------------


def test_addendum_to_a_signed_report_in_the_window(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    svc = no_undo(node)
    w = make_window("alice", svc=svc)
    click_row(qtbot, w, "CXR-10001")
    w.report.findings.setPlainText(w.report.findings.toPlainText().replace("xxxx", "bones"))
    w.report.impression.setPlainText("No acute disease.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    wait_idle(qtbot, w)
    records = w.report.after.records
    assert records.isVisible() and records.add_button.isEnabled()
    draft_id = w.review.detail.draft_id  # type: ignore[union-attr]
    signed_uid = w.review.detail.signed_sop_instance_uid  # type: ignore[union-attr]
    signed_path = node.store.abspath(w.review.signed.signed_path)  # type: ignore[union-attr]
    before = signed_path.read_bytes()
    records.text.setPlainText("On review: small left apical pneumothorax. Discussed with the ward.")
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(text) or True
    with qtbot.waitSignal(w.addendum_added, timeout=WAIT) as blocker:
        qtbot.mouseClick(records.add_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert "MOREAU, Claire" in asked[-1]  # the confirmation names the patient
    uid = blocker.args[0]
    with node.sessions() as s:
        row = s.scalars(select(ReportAddendum)).one()
        transfers = {t.sop_instance_uid for t in s.scalars(select(Transfer))}
    assert (row.sop_instance_uid, row.draft_id, row.predecessor_sop_instance_uid) == (uid, draft_id, signed_uid)
    assert {uid, signed_uid} <= transfers  # both sent
    assert signed_path.read_bytes() == before  # the signed SR is unchanged
    check_sr_file(node.store.abspath(row.path))
    report = sr.read_report(pydicom.dcmread(node.store.abspath(row.path)))
    assert report.predecessors == (signed_uid,) and report.verification_flag == "VERIFIED"
    assert report.addenda[0].text.startswith("On review: small left apical pneumothorax")
    # the window lists it, and the box is empty for the next one
    assert "Addendum by Dr Alice Moreau" in records.addenda.text() and records.text.toPlainText() == ""
    assert [e.actor for e in audits(node, "addendum")] == ["alice"]
    # another reviewer opening the signed report sees the addendum and may add one
    bob = make_window("bob", svc=svc)
    bob.worklist.state.setCurrentText("All")
    click_row(qtbot, bob, "CXR-10001")
    assert "small left apical pneumothorax" in bob.report.after.records.addenda.text()
    assert bob.report.after.records.add_button.isEnabled()


def test_addendum_waits_for_the_undo_window(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")  # review.undo_window_s = 10 (default)
    click_row(qtbot, w, "CXR-10003")
    w.report.impression.setPlainText("Edited impression.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    wait_idle(qtbot, w)
    assert w.report.undo_bar.isVisible() and not w.report.after.records.add_button.isEnabled()
    with qtbot.waitSignal(w.sign_released, timeout=WAIT):
        qtbot.mouseClick(w.report.send_now_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.report.after.records.add_button.isEnabled()


# -- failed, skipped, rejected: reachable ---------------------------------------------------------


def _fail(ctx: object) -> JobResult:
    raise RuntimeError("model bundle missing")


def _skip(ctx: object) -> JobResult:
    return JobResult("skipped", "no chest radiograph in the study (modality CT)")


def _undrafted(node: synthetic.NodeFixture, key: str, pid: str, handler: object) -> str:
    spec = synthetic.SyntheticStudy(key=key, patient_name="Nodraft^Nina", patient_id=pid, size=256,
                                    accession_number=f"A{pid[-4:]}")
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec))
    try:
        synthetic.run_draft_job(node, spec.study_instance_uid, handler=handler)
    except RuntimeError:
        pass
    return spec.study_instance_uid


def test_failed_study_opens_images_and_is_reported_from_scratch(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    uid = _undrafted(node, "gui-fail-1", "ND-0001", _fail)
    w = make_window("alice", svc=no_undo(node))
    click_row(qtbot, w, "ND-0001")
    vm = w.review
    assert vm is not None and vm.detail.draft_id == 0 and vm.read_only
    assert len(w.study.views) == 2  # the images are shown
    assert "NOT DRAFTED" in w.report.banner.text() and "model bundle missing" in w.report.banner.text()
    assert highlighted_studies(w) == [uid]  # the highlight is on the open study
    panel = w.report.after.no_draft
    assert panel.isVisible() and panel.retry_button.isVisible()
    assert not w.report.sign_button.isEnabled() and not w.report.after.critical.isVisible()
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(panel.scratch_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    vm = w.review
    assert vm is not None and vm.detail.draft_id > 0 and vm.holds_claim
    assert w.report.findings.toPlainText() == "" and not w.report.findings.isReadOnly()  # empty editor
    assert "NO AI DRAFT" in w.report.banner.text()
    i = w.worklist_vm.index_of(vm.detail.draft_id)
    cell = w.worklist.model.index(i, viewmodels.column_index("AI draft")).data()
    assert cell.startswith("no AI draft: report from scratch (drafting failed")  # not "drafted"
    assert not w.report.side.isVisible()  # no model output to show
    w.report.findings.setPlainText("Heart size normal. Lungs clear.")
    w.report.impression.setPlainText("No acute cardiopulmonary disease.")
    with qtbot.waitSignal(w.signed, timeout=WAIT):
        w.sign()
    with node.sessions() as s:
        d = s.get(Draft, vm.detail.draft_id)
        assert d is not None and d.state == DraftState.SIGNED
        path = node.store.abspath(d.signed_path or "")
    check_sr_file(path)
    report = sr.read_report(pydicom.dcmread(path))
    assert report.no_ai_draft and report.device_model == "" and report.findings == "Heart size normal. Lungs clear."
    assert not any("AI-GENERATED" in c for c in report.comments)
    assert [e.actor for e in audits(node, "report_from_scratch")] == ["alice"]


def test_failed_study_retry_drafting_and_skipped_study_under_all(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    failed = _undrafted(node, "gui-fail-2", "ND-0002", _fail)
    skipped = _undrafted(node, "gui-skip-1", "ND-0003", _skip)
    w = make_window("alice")
    wait_idle(qtbot, w)
    assert "ND-0003" not in {r.patient_id for r in w.worklist_vm.rows}  # not waiting to be read
    w.worklist.state.setCurrentText("All")
    wait_idle(qtbot, w)
    row = w.worklist_vm.rows[row_of(w, "ND-0003")]
    assert row.state == "skipped" and "no chest radiograph" in row.detail
    assert w.worklist.model.index(row_of(w, "ND-0003"), 0).data(Qt.ItemDataRole.ToolTipRole).count("no chest radiograph")
    click_row(qtbot, w, "ND-0003")
    assert w.review is not None and w.review.detail.study_instance_uid == skipped
    assert "skipped" in w.report.banner.text() and "no chest radiograph" in w.report.banner.text()
    click_row(qtbot, w, "ND-0002")
    with qtbot.waitSignal(w.drafting_retried, timeout=WAIT) as blocker:
        qtbot.mouseClick(w.report.after.no_draft.retry_button, Qt.MouseButton.LeftButton)
    assert blocker.args == [failed]
    [ev] = audits(node, "drafting_retried")
    assert ev.actor == "alice" and ev.study_instance_uid == failed
    # asked twice: refused with a clear message while the job waits
    qtbot.mouseClick(w.report.after.no_draft.retry_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.errors and "drafting is retried only" in w.errors[-1][1]


def test_rejected_draft_reported_from_scratch(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    click_row(qtbot, w, "CXR-10002")
    with qtbot.waitSignal(w.rejected, timeout=WAIT):
        w.reject()
    wait_idle(qtbot, w)
    panel = w.report.after.no_draft
    assert panel.isVisible() and panel.scratch_button.isVisible() and not panel.retry_button.isVisible()
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(panel.scratch_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w)
    assert w.review is not None and w.review.holds_claim and w.report.findings.toPlainText() == ""
    assert "rejected: wrong side marker" in w.report.banner.text()


# -- a draft that changed underneath --------------------------------------------------------------


def _more_images(node: synthetic.NodeFixture, patient_id: str) -> str:
    spec = next(s for s in synthetic.sample_studies(3, size=512, prefix="gui") if s.patient_id == patient_id)
    extra = dataclasses.replace(spec, views=("PA", "LATERAL", "AP"))
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(extra)[2:])
    return spec.study_instance_uid


def test_changed_underneath_stops_signature_and_opens_the_new_draft(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    click_row(qtbot, w, "CXR-10001")
    old = w.review.detail.draft_id  # type: ignore[union-attr]
    w.report.impression.setPlainText("Edited before the new image arrived.")
    study_uid = _more_images(node, "CXR-10001")
    newer = synthetic.run_draft_job(node, study_uid)  # the node drafts all three images; the old draft is superseded
    assert newer != old
    asked: list[tuple[str, str]] = []

    def confirm(title: str, text: str) -> bool:
        asked.append((title, text))
        return True

    w.confirm = confirm
    with qtbot.waitSignal(w.study_changed, timeout=WAIT):
        w.sign()
    # the confirmation of the signature was asked, then the offer of the new draft
    title, text = asked[-1]
    assert title == "The study changed: not signed" and "NOT SIGNED" in text and "Open the new draft now?" in text
    qtbot.waitUntil(lambda: w.review is not None and w.review.detail.draft_id == newer and w._opening is None,
                    timeout=WAIT)
    wait_idle(qtbot, w)
    assert w.review.holds_claim and len(w.study.views) == 3  # type: ignore[union-attr]
    with node.sessions() as s:
        assert s.get(Draft, old).state == DraftState.SUPERSEDED  # type: ignore[union-attr]
        assert not s.scalars(select(Draft).where(Draft.state == DraftState.SIGNED)).all()


def test_changed_underneath_before_the_new_draft_exists(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    click_row(qtbot, w, "CXR-10002")
    w.report.findings.setPlainText(w.report.findings.toPlainText().replace("xxxx", "bones"))
    study_uid = _more_images(node, "CXR-10002")  # received, not drafted yet
    with qtbot.waitSignal(w.study_changed, timeout=WAIT):
        w.sign()
    wait_idle(qtbot, w)
    bar = w.report.after.changed
    assert bar.isVisible() and "NOT SIGNED" in bar.label.text() and "being made" in bar.label.text()
    assert bar.open_button.text() == "Check for the new draft"
    assert w.report.findings.isReadOnly() and not w.report.sign_button.isEnabled()
    qtbot.mouseClick(bar.open_button, Qt.MouseButton.LeftButton)  # not ready yet: says so
    wait_idle(qtbot, w)
    assert "not ready yet" in w.status_label.text()
    newer = synthetic.run_draft_job(node, study_uid)
    with qtbot.waitSignal(w.review_shown, timeout=WAIT) as blocker:
        qtbot.mouseClick(bar.open_button, Qt.MouseButton.LeftButton)
    assert blocker.args == [newer] and not bar.isVisible()
