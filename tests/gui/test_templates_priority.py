"""The real reviewer window (pytest-qt, offscreen): report templates typed as ``.trigger`` + Tab or
Space, inserted by Ctrl+1..9 and the Ctrl+T picker, signed as the reviewer's text; the Priority
column with its sort and the ⚠ marker of critical drafts floating up."""

from __future__ import annotations

import json

import pytest
from PyQt6.QtCore import Qt
from PyQt6.QtGui import QTextCursor
from sqlalchemy import select, update
from support import synthetic

from dicom_node.db import Draft, Study
from gui import viewmodels
from gui.window import ReviewerWindow
from plugin.review.templates import DEFAULT_FILE, TemplateLibrary, read_file

WAIT = 30000
NORMAL = next(t for t in read_file(DEFAULT_FILE) if t.trigger == "normal").text
NAD = "No acute cardiopulmonary abnormality."


def idle(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running, timeout=WAIT)


def open_patient(qtbot, w: ReviewerWindow, patient_id: str) -> int:  # type: ignore[no-untyped-def]
    idle(qtbot, w)
    i = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)
    draft_id = w.worklist_vm.rows[i].draft_id
    rect = w.worklist.table.visualRect(w.worklist.model.index(i, 1))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    idle(qtbot, w)
    return int(draft_id or 0)


def with_templates(node: synthetic.NodeFixture) -> None:
    TemplateLibrary(node.config, node.sessions).import_templates("root", read_file(DEFAULT_FILE))


def type_at_end(qtbot, editor, text: str) -> None:  # type: ignore[no-untyped-def]
    editor.setFocus()
    editor.moveCursor(QTextCursor.MoveOperation.End)
    qtbot.keyClicks(editor, text)


# -- templates ------------------------------------------------------------------------------------

def test_template_trigger_word_expands_on_tab_and_space_and_is_signed(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    with_templates(node)
    w = make_window("alice")
    draft_id = open_patient(qtbot, w, "CXR-10002")
    qtbot.waitUntil(lambda: len(w.template_hook.templates) == 13, timeout=WAIT)
    findings, impression = w.report.findings, w.report.impression
    findings.setPlainText("")
    type_at_end(qtbot, findings, ".normal")
    qtbot.keyClick(findings, Qt.Key.Key_Tab)
    assert findings.toPlainText() == NORMAL  # the trigger word is replaced, not kept
    assert findings.hasFocus()  # Tab was used up by the expansion, focus did not move
    impression.setPlainText("")
    type_at_end(qtbot, impression, ".NAD")
    qtbot.keyClick(impression, Qt.Key.Key_Space)
    assert impression.toPlainText() == NAD + " "  # Space is typed after the text
    # an unknown trigger is left alone and Tab moves on as before
    type_at_end(qtbot, impression, ".nosuch")
    qtbot.keyClick(impression, Qt.Key.Key_Tab)
    assert impression.toPlainText().endswith(".nosuch")
    impression.setPlainText(NAD)
    w.sign()
    qtbot.waitUntil(lambda: w.review is not None and w.review.is_final, timeout=WAIT)
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None and d.signed_findings == NORMAL and d.signed_impression == NAD


def test_template_slot_keys_and_picker_insert_at_the_cursor(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    with_templates(node)
    w = make_window("alice")
    open_patient(qtbot, w, "CXR-10001")
    qtbot.waitUntil(lambda: len(w.template_hook.templates) == 13, timeout=WAIT)
    findings, impression = w.report.findings, w.report.impression
    impression.setPlainText("")
    impression.setFocus()
    qtbot.keyClick(impression, Qt.Key.Key_2, Qt.KeyboardModifier.ControlModifier)
    assert impression.toPlainText() == NAD
    # with the focus outside the editors, Ctrl+1 goes into Findings at its cursor (a space first)
    findings.setPlainText("Portable film.")
    findings.moveCursor(QTextCursor.MoveOperation.End)
    w.worklist.search.setFocus()
    qtbot.keyClick(w.worklist.search, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert findings.toPlainText() == "Portable film. " + NORMAL
    assert w.report.findings.hasFocus()
    # Ctrl+T: the picker lists slotted templates first; the chosen one is inserted
    offered: list[str] = []

    def choose(templates):  # type: ignore[no-untyped-def]
        offered.extend(t.trigger for t in templates)
        return next(t for t in templates if t.trigger == "pleura")

    w.template_hook.choose = choose
    impression.setFocus()
    impression.moveCursor(QTextCursor.MoveOperation.End)
    qtbot.keyClick(impression, Qt.Key.Key_T, Qt.KeyboardModifier.ControlModifier)
    assert offered[:3] == ["normal", "nad", "normalap"]
    assert impression.toPlainText() == NAD + " No pleural effusion or pneumothorax."
    # an empty slot says so and changes nothing
    qtbot.keyClick(impression, Qt.Key.Key_9, Qt.KeyboardModifier.ControlModifier)
    assert "No template on Ctrl+9" in w.status_label.text()


def test_template_picker_dialog_filters_as_you_type(qtbot) -> None:  # type: ignore[no-untyped-def]
    from gui.templates import TemplatePicker

    picker = TemplatePicker(read_file(DEFAULT_FILE))
    qtbot.addWidget(picker)
    assert picker.list.count() == 13
    qtbot.keyClicks(picker.filter, "effusion")
    shown = [picker.list.item(i).data(Qt.ItemDataRole.UserRole).trigger for i in range(picker.list.count())]
    assert shown == ["normal", "normalap", "pleura"]  # trigger, name or text holds the word
    qtbot.keyClick(picker.filter, Qt.Key.Key_Down)
    assert picker.chosen() is not None


def test_template_not_inserted_into_a_read_only_report(qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    with_templates(node)
    rows = service.worklist()
    held = next(r for r in rows if r.patient_id == "CXR-10003")
    service.claim(held.draft_id, "bob")  # bob holds it: alice sees it read-only
    w = make_window("alice")
    open_patient(qtbot, w, "CXR-10003")
    qtbot.waitUntil(lambda: len(w.template_hook.templates) == 13, timeout=WAIT)
    assert w.review is not None and w.review.read_only
    before = w.report.findings.toPlainText()
    qtbot.keyClick(w.report.findings, Qt.Key.Key_1, Qt.KeyboardModifier.ControlModifier)
    assert w.report.findings.toPlainText() == before
    assert "No report open for editing" in w.status_label.text()


# -- priority and critical drafts --------------------------------------------------------------

def _set_priorities(node: synthetic.NodeFixture) -> None:
    """CXR-10001 outpatient, CXR-10002 outpatient with a critical draft, CXR-10003 from the ED."""
    with node.sessions() as s, s.begin():
        for pid, prio in (("CXR-10001", "outpatient"), ("CXR-10002", "outpatient"), ("CXR-10003", "ED")):
            s.execute(update(Study).where(Study.patient_id == pid).values(priority=prio))
        st = s.scalars(select(Study).where(Study.patient_id == "CXR-10002")).one()
        d = s.scalars(select(Draft).where(Draft.study_id == st.id)).one()
        info = json.loads(d.token_info or "{}")
        info.setdefault("observations", {})["Pneumothorax"] = 0.91
        s.execute(update(Draft).where(Draft.id == d.id).values(token_info=json.dumps(info)))


def test_priority_column_sorts_most_urgent_first_and_reverses(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    _set_priorities(node)
    w = make_window("alice")
    idle(qtbot, w)
    col = viewmodels.column_index("Priority")
    assert col == 0 and w.worklist.table.horizontalHeader().sortIndicatorSection() == col
    ids = [r.patient_id for r in w.worklist_vm.rows]
    assert ids == ["CXR-10003", "CXR-10002", "CXR-10001"]  # ED, then outpatient with the critical one first
    cells = [w.worklist.model.index(i, col).data() for i in range(3)]
    assert cells == ["ED", "⚠ outpatient", "outpatient"]
    # sort by another column, then back on Priority, descending: least urgent first
    w.worklist.table.sortByColumn(viewmodels.column_index("Patient ID"), Qt.SortOrder.AscendingOrder)
    idle(qtbot, w)
    assert [r.patient_id for r in w.worklist_vm.rows] == ["CXR-10001", "CXR-10002", "CXR-10003"]
    w.worklist.table.sortByColumn(col, Qt.SortOrder.DescendingOrder)
    idle(qtbot, w)
    assert [r.patient_id for r in w.worklist_vm.rows] == ids[::-1]
    w.worklist.table.sortByColumn(col, Qt.SortOrder.AscendingOrder)
    idle(qtbot, w)
    assert [r.patient_id for r in w.worklist_vm.rows] == ids


def test_critical_draft_floats_up_with_a_marker_and_says_why(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    _set_priorities(node)
    w = make_window("alice")
    idle(qtbot, w)
    col = viewmodels.column_index("Priority")
    i = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == "CXR-10002")
    j = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == "CXR-10001")
    assert i < j  # same priority (outpatient): the critical draft is above the older one
    index = w.worklist.model.index(i, col)
    assert index.data().startswith(viewmodels.CRITICAL_MARK)
    tip = index.data(Qt.ItemDataRole.ToolTipRole)
    assert "pneumothorax: model probability 0.91 ≥ 0.50" in tip and "Priority: outpatient" in tip
    assert index.data(Qt.ItemDataRole.ForegroundRole).name() == "#cf222e"
    assert w.worklist.model.index(j, col).data(Qt.ItemDataRole.ForegroundRole) is None


def test_template_saved_from_the_selection_by_a_reviewer_with_the_role(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.config import load_config
    from dicom_node.db import AuditEvent
    from plugin.review.service import ReviewService
    from plugin.review.templates import Template

    cfg = node.root / "cxrnode.toml"
    text = cfg.read_text(encoding="utf-8")
    cfg.write_text(text.replace('organisation = "Hôpital Saint-Louis, Radiology"\n',
                                'organisation = "Hôpital Saint-Louis, Radiology"\nroles = ["templates"]\n', 1),
                   encoding="utf-8")
    svc = ReviewService(load_config(cfg, env={}), node.sessions, node.store)
    w = make_window("alice", svc=svc)
    open_patient(qtbot, w, "CXR-10002")
    findings = w.report.findings
    findings.setPlainText("Sternotomy wires are intact.")
    findings.setFocus()
    findings.selectAll()
    asked: list[str] = []
    w.template_hook.ask_new = lambda t: (asked.append(t), Template("wires", "Sternotomy wires", "", 7))[1]
    qtbot.keyClick(findings, Qt.Key.Key_T, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: "wires" in w.template_hook.templates, timeout=WAIT)
    idle(qtbot, w)
    assert asked == ["Sternotomy wires are intact."]
    saved = TemplateLibrary(node.config, node.sessions).by_trigger()["wires"]
    assert (saved.text, saved.slot, saved.updated_by) == ("Sternotomy wires are intact.", 7, "alice")
    with node.sessions() as s:
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "template_added")).one()
        assert ev.actor == "alice" and json.loads(ev.detail)["text"] == "Sternotomy wires are intact."
    # and it is usable at once: Ctrl+7 in the impression
    w.report.impression.setPlainText("")
    w.report.impression.setFocus()
    qtbot.keyClick(w.report.impression, Qt.Key.Key_7, Qt.KeyboardModifier.ControlModifier)
    assert w.report.impression.toPlainText() == "Sternotomy wires are intact."


def test_template_save_refused_without_the_role(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")  # the gui fixtures' alice has no roles
    open_patient(qtbot, w, "CXR-10001")
    w.report.findings.setPlainText("Some words.")
    w.report.findings.setFocus()
    w.report.findings.selectAll()
    w.template_hook.ask_new = lambda t: pytest.fail("the role holder's dialog must not open")
    qtbot.keyClick(w.report.findings, Qt.Key.Key_T,
                   Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert 'Only reviewers with the "templates" role' in w.status_label.text()
    assert TemplateLibrary(node.config, node.sessions).templates() == []


def test_critical_notice_under_the_banner_of_an_open_critical_draft(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    _set_priorities(node)
    w = make_window("alice")
    open_patient(qtbot, w, "CXR-10002")
    notice = w.critical_notice.label
    assert notice.isVisible()
    assert notice.text() == "⚠ Critical draft — pneumothorax: model probability 0.91 ≥ 0.50."
    open_patient(qtbot, w, "CXR-10001")  # not critical: nothing is said
    assert not notice.isVisible() and notice.text() == ""
