"""The reviewer's safety records and after-signing tools (issue 17), beside the report:

- :class:`CriticalResultBox` — at signing: "Critical result communicated", who was told (name,
  role), how (telephone, in person, secure message) and when; recorded with the signature and
  written into the verified SR.
- :class:`RecordsPanel` — on a signed report: the critical result recorded with it, its addenda,
  and a box to add one (a new verified SR that references the signed one).
- :class:`NoDraftPanel` — on a study with no usable AI draft (drafting failed or skipped, or the
  draft rejected): report it from scratch, or ask for drafting again.
- :class:`ChangedBar` — when the study gained images while its draft was open: why nothing was
  signed, and one button to open the new draft.

Qt widgets only; the wording comes from the Qt-free helpers below (tested without Qt).
"""

from __future__ import annotations

import datetime as dt

from PyQt6.QtCore import QDateTime, pyqtSignal
from PyQt6.QtWidgets import (
    QComboBox,
    QDateTimeEdit,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from gui import viewmodels
from plugin.review.addenda import ReportRecord
from plugin.review.results import COMMUNICATION_METHODS, CriticalNotice
from plugin.review.service import STATE_FAILED, STATE_REJECTED, STATE_SKIPPED

#: roles offered for the person told (free text is accepted too)
ROLES = ("Referring physician", "ED physician", "Attending physician", "Ward nurse", "On-call physician")

STYLE = """
QGroupBox#critical { font-weight: 700; color: #82071e; border: 1px solid #ff8182; border-radius: 4px;
    margin-top: 8px; padding: 6px 4px 4px 4px; }
QGroupBox#critical::title { subcontrol-origin: margin; left: 8px; padding: 0 4px; }
QFrame#records { background: #ffffff; border: 1px solid #d0d7de; border-radius: 4px; }
QFrame#no_draft { background: #fbefff; border: 1px solid #8250df; border-radius: 4px; }
QFrame#changed { background: #ffebe9; border: 2px solid #cf222e; border-radius: 4px; }
QLabel#critical_line { color: #82071e; font-weight: 700; }
"""


# -- Qt-free wording ------------------------------------------------------------------------------


def critical_problem(recipient: str, role: str, method: str, when: dt.datetime, now: dt.datetime | None = None) -> str:
    """Why the critical-result fields cannot be recorded ('' if they can); ``when`` aware."""
    if not recipient.strip():
        return "Critical result: say who was told (name)."
    if not role.strip():
        return "Critical result: say the role of the person told (e.g. referring physician)."
    if method not in COMMUNICATION_METHODS:
        return "Critical result: say how they were told (telephone, in person, secure message)."
    if when > (now or dt.datetime.now(dt.UTC)) + dt.timedelta(minutes=5):
        return "Critical result: the time they were told is in the future."
    return ""


def critical_line(notice: CriticalNotice) -> str:
    """``Critical result told to Dr Lee (ED physician) by telephone on 2026-11-28 09:14 CET.``"""
    how = {"telephone": "by telephone", "in_person": "in person", "secure_message": "by secure message"}
    return (f"Critical result told to {notice.recipient} ({notice.role}) {how.get(notice.method, notice.method)} "
            f"on {viewmodels.local_time(notice.communicated_at)}.")


def addendum_lines(record: ReportRecord | None) -> list[str]:
    """One line per addendum, oldest first: ``Addendum by Dr Bob Okafor, 2026-11-28 10:02 CET: text``."""
    if record is None:
        return []
    return [f"Addendum by {viewmodels.person_display(a.author_name)}, {viewmodels.local_time(a.created_at)}: {a.text}"
            for a in record.addenda]


def confirmation_line(notice: CriticalNotice | None) -> str:
    """What the sign confirmation adds when a critical result is flagged ('' if none)."""
    return "" if notice is None else "\n\nCRITICAL RESULT recorded with this report:\n" + critical_line(notice)


# -- widgets --------------------------------------------------------------------------------------


class CriticalResultBox(QGroupBox):
    """At signing: tick "Critical result communicated" and say who was told, how and when."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Critical result communicated", parent)
        self.setObjectName("critical")
        self.setCheckable(True)
        self.setChecked(False)
        self.setToolTip("Tick when you told a clinician of a critical result: who, how and when are recorded "
                        "(audited) and written into the verified report")
        form = QFormLayout(self)
        form.setContentsMargins(6, 4, 6, 4)
        self.recipient = QLineEdit(self)
        self.recipient.setPlaceholderText("Name of the person told, e.g. Dr Ann Lee")
        self.role = QComboBox(self)
        self.role.setEditable(True)
        self.role.addItems(ROLES)
        self.method = QComboBox(self)
        for key, label in COMMUNICATION_METHODS.items():
            self.method.addItem(label, key)
        self.when = QDateTimeEdit(self)
        self.when.setCalendarPopup(True)
        self.when.setDisplayFormat("yyyy-MM-dd HH:mm")
        form.addRow("Told", self.recipient)
        form.addRow("Role", self.role)
        form.addRow("How", self.method)
        form.addRow("When", self.when)
        self.toggled.connect(self._toggled)
        self.reset()

    def _toggled(self, on: bool) -> None:
        if on:
            self.when.setDateTime(QDateTime.currentDateTime())
            self.recipient.setFocus()

    def reset(self) -> None:
        """Unticked and empty (each study starts without a critical result)."""
        self.setChecked(False)
        self.recipient.clear()
        self.role.setCurrentIndex(0)
        self.method.setCurrentIndex(0)
        self.when.setDateTime(QDateTime.currentDateTime())

    def fill(self, recipient: str, role: str, method: str, when: dt.datetime | None = None) -> None:
        """Tick and fill the fields (tests, screenshots)."""
        self.setChecked(True)
        self.recipient.setText(recipient)
        self.role.setCurrentText(role)
        self.method.setCurrentIndex(max(0, self.method.findData(method)))
        if when is not None:
            self.when.setDateTime(QDateTime.fromSecsSinceEpoch(int(when.timestamp())))

    def _when(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.when.dateTime().toSecsSinceEpoch(), dt.UTC)

    def problem(self) -> str:
        """Why the ticked box cannot be recorded ('' if it can, or if it is not ticked)."""
        if not self.isChecked():
            return ""
        return critical_problem(self.recipient.text(), self.role.currentText(), str(self.method.currentData()),
                                self._when())

    def notice(self) -> CriticalNotice | None:
        """The critical result to record with the signature (None: not ticked)."""
        if not self.isChecked():
            return None
        return CriticalNotice(self.recipient.text().strip(), self.role.currentText().strip(),
                              str(self.method.currentData()), self._when())


class RecordsPanel(QFrame):
    """A signed report's records: the critical result, the addenda, and adding one."""

    add_requested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("records")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        self.critical = QLabel("", self)
        self.critical.setObjectName("critical_line")
        self.critical.setWordWrap(True)
        lay.addWidget(self.critical)
        self.addenda = QLabel("", self)
        self.addenda.setWordWrap(True)
        lay.addWidget(self.addenda)
        row = QHBoxLayout()
        self.text = QPlainTextEdit(self)
        self.text.setPlaceholderText("Addendum to the signed report (a new verified report is sent; "
                                     "the signed one is kept unchanged)")
        self.text.setMaximumHeight(70)
        row.addWidget(self.text, 1)
        self.add_button = QPushButton("Add addendum", self)
        self.add_button.setToolTip("Sign the addendum as your configured name: a new verified report that "
                                   "references the signed one, sent to the destinations")
        self.add_button.clicked.connect(self.add_requested.emit)
        row.addWidget(self.add_button)
        lay.addLayout(row)

    def show_record(self, record: ReportRecord | None, can_add: bool) -> None:
        crit = record.critical if record is not None else None
        self.critical.setText(critical_line(crit) if crit is not None else "")
        self.critical.setVisible(crit is not None)
        lines = addendum_lines(record)
        self.addenda.setText("\n".join(lines))
        self.addenda.setVisible(bool(lines))
        self.text.setEnabled(can_add)
        self.add_button.setEnabled(can_add)


class NoDraftPanel(QFrame):
    """A study with no usable AI draft: report it from scratch, or draft it again."""

    scratch_requested = pyqtSignal()
    retry_requested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("no_draft")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        self.label = QLabel("", self)
        self.label.setWordWrap(True)
        lay.addWidget(self.label, 1)
        self.scratch_button = QPushButton("Report from scratch", self)
        self.scratch_button.setToolTip("Write the report yourself with an empty editor; signed like any report")
        self.retry_button = QPushButton("Retry drafting", self)
        self.retry_button.setToolTip("Ask the node to draft this study again (a new job; audited)")
        self.scratch_button.clicked.connect(self.scratch_requested.emit)
        self.retry_button.clicked.connect(self.retry_requested.emit)
        lay.addWidget(self.scratch_button)
        lay.addWidget(self.retry_button)

    def show_for(self, vm: viewmodels.ReviewModel | None) -> None:
        d = vm.detail if vm is not None else None
        if d is None or d.state not in (STATE_FAILED, STATE_SKIPPED, STATE_REJECTED):
            self.setVisible(False)
            return
        self.label.setText("No AI draft to review for this study." if d.draft_id else
                           f"Not drafted: {d.no_ai_draft_reason or d.reject_reason}.")
        self.retry_button.setVisible(d.state != STATE_REJECTED)
        self.setVisible(True)


class ChangedBar(QFrame):
    """The study gained images while its draft was open: nothing was signed; open the new draft."""

    open_requested = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("changed")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        self.label = QLabel("", self)
        self.label.setWordWrap(True)
        lay.addWidget(self.label, 1)
        self.open_button = QPushButton("Open the new draft", self)
        self.open_button.clicked.connect(self.open_requested.emit)
        lay.addWidget(self.open_button)
        self.setVisible(False)

    def show_change(self, text: str, ready: bool) -> None:
        self.label.setText(text)
        self.open_button.setText("Open the new draft" if ready else "Check for the new draft")
        self.setVisible(True)


class AfterSigning(QWidget):
    """The four parts above, stacked; :meth:`show_for` shows the ones that apply to a study."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setStyleSheet(STYLE)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        self.changed = ChangedBar(self)
        self.no_draft = NoDraftPanel(self)
        self.records = RecordsPanel(self)
        self.critical = CriticalResultBox(self)
        for w in (self.changed, self.no_draft, self.records, self.critical):
            lay.addWidget(w)
        self._draft_id: int | None = None

    def show_for(self, vm: viewmodels.ReviewModel | None, undo_pending: bool = False) -> None:
        draft_id = vm.detail.draft_id if vm is not None else None
        if draft_id != self._draft_id:  # another study: nothing carried over from the last one
            self._draft_id = draft_id
            self.critical.reset()
            self.records.text.clear()
            self.changed.setVisible(False)
        self.no_draft.show_for(vm)
        final = vm is not None and vm.is_final
        self.records.setVisible(final)
        if final and vm is not None:
            self.records.show_record(vm.record, can_add=not undo_pending and vm.service.is_reviewer(vm.user))
        self.critical.setVisible(vm is not None and not vm.read_only)
