"""The fast normal flow in the real reviewer window (issue 17): Sign & next, the unchanged
draft's question once per session, the remembered layout, text size, the study age, the
status bar, the signed banner, the disabled Reject button, the highlight styles. Run by topic
with ``-k sign_and_next``, ``-k layout``, ``-k highlight``, ``-k probabilities``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from PyQt6.QtCore import QPoint, Qt, QTimer
from PyQt6.QtWidgets import QApplication, QMessageBox
from sqlalchemy import select
from support import synthetic

from dicom_node.db import Draft, DraftState
from gui import viewmodels
from gui.window import ReviewerWindow

WAIT = 30000


def wait_idle(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running and w._opening is None, timeout=WAIT)


def row_of(w: ReviewerWindow, patient_id: str) -> int:
    return next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == patient_id)


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
        return sorted(d.id for d in s.scalars(select(Draft).where(Draft.state == DraftState.SIGNED)))


def answer_sign_question(qtbot, presses: list[tuple[Qt.Key, Qt.KeyboardModifier]],  # type: ignore[no-untyped-def]
                         seen: list[str]) -> Callable[[], None]:
    """Answer the real sign question with keys once it is up (it is modal: a timer acts inside
    its event loop). Records the question's text and each key pressed in ``seen``."""

    def act() -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox):
            QTimer.singleShot(20, act)
            return
        seen.append(box.text())
        QApplication.setActiveWindow(box)  # as on a desktop, the question has the keyboard
        for key, mod in presses:
            qtbot.keyClick(box, key, mod)
            seen.append(f"key {key.name}")
            qtbot.wait(150)  # a mnemonic clicks its check box after 100 ms (animateClick)
        parent = box.parentWidget()
        if parent is not None:  # the keyboard goes back to the window, as on a desktop
            QTimer.singleShot(0, lambda: QApplication.setActiveWindow(parent.window()))

    return act


def real_sign_question(w: ReviewerWindow) -> None:
    w.confirm = w._confirm_dialog  # the window's own dialogs, answered with keys


NO_MOD = Qt.KeyboardModifier.NoModifier


def test_sign_and_next_unchanged_draft_in_two_key_presses(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    """F12 (Sign & next), Enter in the question naming the patient: signed, and the next
    unclaimed study in worklist order is open, claimed, its row highlighted."""
    w = make_window("alice")
    real_sign_question(w)
    first = open_row(qtbot, w, "CXR-10001")
    d = w.review.detail
    seen: list[str] = []
    QTimer.singleShot(0, answer_sign_question(qtbot, [(Qt.Key.Key_Return, NO_MOD)], seen))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT) as shown:
        qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)  # the focus is in the report: no image clicked
    keys = 1 + sum(1 for s in seen if s.startswith("key "))
    assert keys == 2
    assert signed_ids(node) == [first]
    # the question named the patient, ID, accession and study date of the study signed
    assert d.patient_id in seen[0] and d.accession_number in seen[0] and "exactly the AI draft" in seen[0]
    wait_idle(qtbot, w)
    assert w.review is not None and shown.args == [w.review.detail.draft_id]
    assert w.review.detail.patient_id == "CXR-10002" and w.review.holds_claim  # the next row in worklist order
    assert w.report.signing_for.text().startswith("Signing for: ") and "CXR-10002" in w.report.signing_for.text()
    sel = w.worklist.highlighted_drafts()
    assert sel == [w.review.detail.draft_id]
    # the undo window still runs for the signed study, and says whose it is
    assert w.report.undo_bar.isVisible() and "CXR-10001" in w.report.undo_label.text()


def test_sign_and_next_once_per_session_skips_claimed_rows_and_guards_double_press(
        qtbot, make_window, node, service) -> None:  # type: ignore[no-untyped-def]
    bobs = next(r.draft_id for r in service.worklist() if r.patient_id == "CXR-10002")
    service.claim(bobs, "bob")  # not unclaimed: Sign & next passes over it
    w = make_window("alice")
    real_sign_question(w)
    first = open_row(qtbot, w, "CXR-10001")
    seen: list[str] = []
    QTimer.singleShot(0, answer_sign_question(
        qtbot, [(Qt.Key.Key_D, Qt.KeyboardModifier.AltModifier), (Qt.Key.Key_Return, NO_MOD)], seen))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    wait_idle(qtbot, w)
    assert w.skip_unchanged_confirmation, seen
    assert "without asking this session" in w.report.signer.text()
    assert w.review.detail.patient_id == "CXR-10003" and w.review.holds_claim
    third = w.review.detail.draft_id
    # a second press right after the study appeared is not a reading: nothing is signed
    w.min_dwell_s = 5.0
    w._shown_at = time.monotonic()
    qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    w.tasks.wait()
    assert signed_ids(node) == [first] and "a moment ago" in w.status_label.text()
    # once looked at: one key, no question (this session), and nothing else is waiting
    w.min_dwell_s = 0.0
    seen.clear()
    w.confirm = lambda title, text: seen.append(text) is None and False  # would refuse, if asked
    with qtbot.waitSignal(w.signed, timeout=WAIT) as blocker:
        qtbot.keyClick(w.report.findings, Qt.Key.Key_F12)
    wait_idle(qtbot, w)
    assert blocker.args == [third] and seen == []
    assert signed_ids(node) == sorted([first, third])
    assert "No other" in w.status_label.text()
    assert w.review.detail.draft_id == third and w.review.is_final
    # an edited report is still asked about every time (a new session is not needed for that)
    assert w.report.signing_for.text().startswith("Signed for: ")


def test_sign_and_next_edited_report_is_always_asked(qtbot, make_window, node) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    w.skip_unchanged_confirmation = True  # chosen earlier this session
    first = open_row(qtbot, w, "CXR-10001")
    asked: list[str] = []
    w.confirm = lambda title, text: asked.append(title) is None
    w.report.impression.setFocus()
    w.report.impression.moveCursor(w.report.impression.textCursor().MoveOperation.End)
    qtbot.keyClicks(w.report.impression, " No change.")
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.keyClick(w.report.impression, Qt.Key.Key_Return,
                       Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert asked == ["Sign this report?"]
    assert signed_ids(node) == [first]
    wait_idle(qtbot, w)
    assert w.review.detail.patient_id == "CXR-10002"
    # the same with the button beside Sign (it is enabled only when Sign is)
    assert w.report.sign_next_button.isEnabled() == w.report.sign_button.isEnabled()
    w.report.findings.setPlainText(w.report.findings.toPlainText().replace("xxxx", "bones"))
    with qtbot.waitSignal(w.signed, timeout=WAIT) as blocker:
        w.report.sign_next_button.click()
    assert blocker.args == [w.review.detail.draft_id] and w.review.detail.patient_id == "CXR-10002"


def test_signed_banner_names_the_reviewer_in_local_time(qtbot, make_window, node, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        w = make_window("alice")
        open_row(qtbot, w, "CXR-10001")
        with qtbot.waitSignal(w.signed, timeout=WAIT):
            w.sign()
        text = w.report.banner.text()
        r = w.service.reviewer("alice")
        assert f"VERIFIED by {viewmodels.person_display(r.display_name)} on " in text
        assert "UTC" not in text and " by alice " not in text
        assert text.split(" on ")[1].split(".")[0].endswith(("EST", "EDT"))
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_disabled_reject_button_looks_disabled(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    def reddish(btn) -> int:  # type: ignore[no-untyped-def]
        img = btn.grab().toImage()
        n = 0
        for y in range(0, img.height(), 2):
            for x in range(0, img.width(), 2):
                c = img.pixelColor(x, y)
                n += c.red() > 150 and c.green() < 110 and c.blue() < 110
        return n

    w = make_window("alice")
    wait_idle(qtbot, w)
    btn = w.report.reject_button
    assert not btn.isEnabled() and reddish(btn) == 0  # grey, like the other disabled buttons
    open_row(qtbot, w, "CXR-10001")
    assert btn.isEnabled() and reddish(btn) > 0  # red text when it can be used


def test_status_bar_clears_stale_messages(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    wait_idle(qtbot, w)
    w.status_timeout_s = 0.2
    w.say("Signed.")
    assert w.status_label.text() == "Signed."
    qtbot.waitUntil(lambda: w.status_label.text() == "", timeout=3000)
    w.say("First.")
    qtbot.wait(120)
    w.say("Second.")  # a newer message gets its own time
    qtbot.wait(120)
    assert w.status_label.text() == "Second."
    qtbot.waitUntil(lambda: w.status_label.text() == "", timeout=3000)


def test_layout_worklist_rows_study_age_and_remembered_layout(qtbot, make_window, service) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    wait_idle(qtbot, w)
    table = w.worklist.table
    # more than five rows fit in the worklist at the default layout
    row_h = table.verticalHeader().defaultSectionSize()
    assert table.viewport().height() // row_h >= 9
    # the first time, columns fit their contents: the patient's name is never cut
    patient = viewmodels.column_index("Patient")
    assert table.horizontalHeader().sectionSize(patient) >= table.sizeHintForColumn(patient)
    # the study's age beside the draft's
    age_col, draft_col = viewmodels.column_index("Study age"), viewmodels.column_index("Draft age")
    r = w.worklist_vm.rows[0]
    assert w.worklist.model.index(0, age_col).data() == viewmodels.format_study_age(r.study_date) != ""
    assert w.worklist.model.headerData(age_col, Qt.Orientation.Horizontal) == "Study age"
    assert w.worklist.model.index(0, draft_col).data().endswith(("s", "min"))
    # change the layout: geometry, a column width, the sort, the filter, the text size
    w.resize(1300, 800)
    size = (w.width(), w.height())
    header = table.horizontalHeader()
    header.resizeSection(0, 260)
    table.sortByColumn(viewmodels.column_index("Patient ID"), Qt.SortOrder.AscendingOrder)
    wait_idle(qtbot, w)
    w.worklist.state.setCurrentText("All")
    wait_idle(qtbot, w)
    qtbot.keyClick(w, Qt.Key.Key_Equal, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(w, Qt.Key.Key_Equal, Qt.KeyboardModifier.ControlModifier)
    assert w.text_px == 16
    w.close()
    # a new window (a new session) comes back as it was left
    w2 = ReviewerWindow(service, "alice", refresh_interval_s=0)
    qtbot.addWidget(w2)
    w2.show()
    wait_idle(qtbot, w2)
    qtbot.waitUntil(lambda: (w2.width(), w2.height()) == size, timeout=3000)
    assert w2.worklist.table.horizontalHeader().sectionSize(0) == 260
    assert viewmodels.COLUMNS[w2.worklist_vm.sort_column].title == "Patient ID" and not w2.worklist_vm.descending
    assert w2.worklist.table.horizontalHeader().sortIndicatorSection() == viewmodels.column_index("Patient ID")
    assert w2.worklist.state.currentText() == "All" and w2.worklist_vm.state_filter == "All"
    assert [r.patient_id for r in w2.worklist_vm.rows] == sorted(r.patient_id for r in w2.worklist_vm.rows)
    assert w2.text_px == 16 and "font-size: 16px" in w2.styleSheet()
    assert w2.report.findings.font().pixelSize() == 16
    qtbot.keyClick(w2, Qt.Key.Key_0, Qt.KeyboardModifier.ControlModifier)
    assert w2.text_px == 14 and w2.report.findings.font().pixelSize() == 14
    qtbot.keyClick(w2, Qt.Key.Key_Minus, Qt.KeyboardModifier.ControlModifier)
    assert w2.text_px == 13
    w2.close()


def test_highlight_grounded_sentence_and_unsure_word_styled_apart(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    """A sentence the grounding step added (blue dotted underline, no background) is told from a
    word the decoder was unsure of (orange, wavy underline); each says its probability."""
    w = make_window("alice")
    open_row(qtbot, w, "CXR-10001")
    d = w.review.detail
    findings = "Heart size is normal. Small left pleural effusion."
    tokens = tuple((t, 0.99) for t in "heart size is normal .".split()) + (("Small", 0.12),)
    detail = type(d)(**{**d.__dict__, "findings": findings, "impression": "", "tokens": tokens,
                        "grounded": (("Small left pleural effusion.", 0.81),), "observations": ()})
    w.review.detail = detail
    w.review.findings, w.review.impression = findings, ""
    w.report.show_review(w.review, "")
    spans = {s.kind: s for s in w.report.hl_findings.shown_spans()}
    assert set(spans) == {"grounded"}  # a word inside a grounded sentence is not marked again
    g = spans["grounded"]
    assert findings[g.start:g.end] == "Small left pleural effusion." and "p 0.81" in g.note
    fmt = w.report.hl_findings.formats["grounded"]
    assert fmt.underlineStyle().name == "DotLine" and fmt.background().style() == Qt.BrushStyle.NoBrush
    # the same low-probability word outside a grounded sentence is an unsure word, styled apart
    detail2 = type(d)(**{**detail.__dict__, "findings": "Heart size is normal. Small effusion.",
                         "grounded": ()})
    w.review.detail = detail2
    w.review.findings = detail2.findings
    w.report.show_review(w.review, "")
    words = [s for s in w.report.hl_findings.shown_spans() if s.kind == "word"]
    assert [detail2.findings[s.start:s.end] for s in words] == ["Small"] and "p 0.12" in words[0].note
    wfmt = w.report.hl_findings.formats["word"]
    assert wfmt.underlineStyle().name == "WaveUnderline" and wfmt.background().color().name() == "#ffc58a"
    # the tooltip over the word gives its probability
    editor = w.report.findings
    rect = editor.cursorRect(editor.textCursor())
    cursor = editor.textCursor()
    cursor.setPosition(words[0].start + 1)
    rect = editor.cursorRect(cursor)
    assert w.report.hl_findings.span_at(editor.cursorForPosition(rect.center()).position()) == words[0]
    assert rect.center() != QPoint(0, 0)


@pytest.mark.parametrize("days,text", [(0, "today"), (1, "1 d"), (45, "45 d"), (200, "6 mo"), (800, "2 y")])
def test_layout_study_age_text(days: int, text: str) -> None:
    import datetime as dt

    today = dt.date(2026, 11, 28)
    assert viewmodels.format_study_age((today - dt.timedelta(days=days)).strftime("%Y%m%d"), today) == text
    assert viewmodels.format_study_age("", today) == ""


def test_probabilities_panel_shows_thresholds_and_uncertain_calls(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    """Each observation with its probability and decision threshold; a call near its threshold
    (within the policy's margin) is amber, one called present is bold; the tooltip says why."""
    from plugin.review.draft_info import ObservationCall

    w = make_window("alice")
    open_row(qtbot, w, "CXR-10001")
    d = w.review.detail
    calls = (ObservationCall("Pleural Effusion", 0.41, 0.40), ObservationCall("Pneumothorax", 0.02, 0.30),
             ObservationCall("Cardiomegaly", 0.90, 0.45), ObservationCall("Fracture", 0.20, None))
    w.review.detail = type(d)(**{**d.__dict__, "observations": calls})
    w.report.show_review(w.review, "")
    t = w.report.probabilities
    rows = {t.item(i, 0).text(): i for i in range(t.rowCount())}
    assert [t.item(rows["Pleural Effusion"], j).text() for j in range(3)] == ["Pleural Effusion", "0.41", "0.40"]
    amber = t.item(rows["Pleural Effusion"], 0).background().color().name()
    assert amber == "#ffe082" and "uncertain call" in t.item(rows["Pleural Effusion"], 0).toolTip()
    assert t.item(rows["Pneumothorax"], 0).background().style() == Qt.BrushStyle.NoBrush  # far below: not marked
    assert t.item(rows["Cardiomegaly"], 0).font().bold() and not t.item(rows["Pneumothorax"], 0).font().bold()
    assert t.item(rows["Fracture"], 2).text() == "—" and "no threshold" in t.item(rows["Fracture"], 0).toolTip()
    # the panel's text follows the text size (Ctrl+=)
    before = t.font().pixelSize()
    qtbot.keyClick(w.report.findings, Qt.Key.Key_Equal, Qt.KeyboardModifier.ControlModifier)
    assert t.font().pixelSize() == before + 1
