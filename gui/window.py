"""The reviewer's main window: worklist | views of the study | indication and editable draft.

Database and file work runs in a thread pool (:class:`gui.widgets.TaskRunner`) with progress in
the status bar; the GUI thread only renders view-models. Dialogs (confirm, reason, error) are
attributes so tests can answer them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from PyQt6.QtCore import (
    QByteArray,
    QEvent,
    QItemSelectionModel,
    QObject,
    QSettings,
    QSize,
    Qt,
    QTimer,
    pyqtSignal,
)
from PyQt6.QtGui import QBrush, QCloseEvent, QColor, QFont, QKeySequence, QShortcut, QShowEvent
from PyQt6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QCheckBox,
    QComboBox,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSplitter,
    QStackedWidget,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from gui import tools, viewmodels
from gui.after_signing import AfterSigning, confirmation_line
from gui.critical_notice import CriticalNotice
from gui.keys import KEYS
from gui.priors_panel import PriorPanel
from gui.templates import TemplateHook
from gui.widgets import (
    MARK_COLOURS,
    MarkedEditor,
    StudyViewer,
    TaskRunner,
    UncertainWords,
    WorklistTable,
    diff_html,
)
from plugin.review import addenda, scratch
from plugin.review.service import (
    ClaimConflictError,
    ReviewError,
    ReviewService,
    StudyChangedError,
    SupersededError,
)

log = logging.getLogger(__name__)

STYLE = """
QMainWindow, QWidget#central { background: #f6f8fa; }
QLabel#patient { font-size: 15px; font-weight: 600; color: #1f2328; }
QLabel#banner_draft { background: #fff8c5; color: #7d4e00; border: 1px solid #d4a72c;
    border-radius: 4px; padding: 6px 8px; font-weight: 700; }
QLabel#banner_final { background: #dafbe1; color: #116329; border: 1px solid #4ac26b;
    border-radius: 4px; padding: 6px 8px; font-weight: 700; }
QLabel#banner_blocked { background: #ffebe9; color: #82071e; border: 1px solid #ff8182;
    border-radius: 4px; padding: 6px 8px; font-weight: 700; }
QLabel#banner_withheld { background: #fbefff; color: #512a97; border: 2px solid #8250df;
    border-radius: 4px; padding: 8px; font-weight: 700; font-size: 14px; }
QLabel#gate { color: #57606a; }
QLabel#gate_alert { background: #fff1e5; color: #762c00; border: 1px solid #fb8f44; border-radius: 4px;
    padding: 4px 6px; }
QLabel#signing_for { background: #ffffff; color: #1f2328; border: 2px solid #1f883d; border-radius: 4px;
    padding: 4px 6px; font-weight: 700; }
QFrame#undo_bar { background: #ddf4ff; border: 1px solid #54aeff; border-radius: 4px; }
QLabel#legend { color: #57606a; font-size: 11px; }
QTableWidget#probabilities { font-size: 12px; }
QLabel#section { font-weight: 700; color: #57606a; text-transform: uppercase; margin-top: 6px; }
QLabel#indication { background: #ffffff; border: 1px solid #d0d7de; border-radius: 4px; padding: 6px; }
QLabel#model { color: #57606a; }
QPlainTextEdit, QTextBrowser { background: #ffffff; border: 1px solid #d0d7de; border-radius: 4px;
    font-size: 14px; padding: 4px; }
QPlainTextEdit[readOnly="true"] { background: #f6f8fa; color: #424a53; }
QPushButton { padding: 6px 14px; border-radius: 4px; border: 1px solid #d0d7de; background: #ffffff; }
QPushButton:disabled { color: #8c959f; background: #f6f8fa; }
QPushButton#sign { background: #1f883d; color: white; border: 1px solid #1a7f37; font-weight: 700; }
QPushButton#sign:disabled { background: #94d3a2; border-color: #94d3a2; }
QPushButton#reject { color: #cf222e; }
QPushButton#reject:disabled { color: #8c959f; background: #f6f8fa; border-color: #d8dee4; }
QTableView { background: #ffffff; alternate-background-color: #f6f8fa; border: 1px solid #d0d7de;
    selection-background-color: #ddf4ff; selection-color: #1f2328; }
QHeaderView::section { background: #f6f8fa; border: none; border-bottom: 1px solid #d0d7de;
    padding: 4px; font-weight: 600; }
QLabel#title { font-size: 15px; font-weight: 700; color: #1f2328; }
StudyViewer { background: #0d1117; }
"""


class WorklistPane(QWidget):
    """Search, state filter, the table and a row count."""

    def __init__(self, vm: viewmodels.WorklistModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.vm = vm
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 6, 4, 4)
        lay.setSpacing(4)
        # one line above the table (title, search, filter, refresh): the rows get the height
        head = QHBoxLayout()
        title = QLabel("Worklist", self)
        title.setObjectName("title")
        head.addWidget(title)
        self.refresh_button = QToolButton(self)
        self.refresh_button.setText("⟳")
        self.refresh_button.setToolTip("Refresh now (F5); refreshes by itself")
        filters = head
        self.search = QLineEdit(self)
        self.search.setPlaceholderText("Search name, ID, accession (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        filters.addWidget(self.search, 1)
        self.state = QComboBox(self)
        self.state.addItems(list(viewmodels.STATE_FILTERS))
        self.state.setToolTip("Which drafts to list")
        filters.addWidget(self.state)
        filters.addWidget(self.refresh_button)
        lay.addLayout(filters)
        self.model = WorklistTable(vm, self)
        self.table = QTableView(self)
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setAlternatingRowColors(True)
        vheader = self.table.verticalHeader()
        assert vheader is not None
        vheader.setVisible(False)
        vheader.setDefaultSectionSize(22)
        self.table.setShowGrid(False)
        self.table.setWordWrap(False)
        header = self.table.horizontalHeader()
        assert header is not None
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)  # widths are remembered (QSettings)
        header.setStretchLastSection(True)
        header.setSortIndicator(vm.sort_column, Qt.SortOrder.DescendingOrder if vm.descending else Qt.SortOrder.AscendingOrder)
        self.table.setSortingEnabled(True)
        lay.addWidget(self.table, 1)
        self.count = QLabel("", self)
        self.count.setObjectName("model")
        lay.addWidget(self.count)
        self.syncing = False

    def select_draft(self, draft_id: int | None) -> None:
        """Highlight (select and make current) the row of ``draft_id``; nothing is highlighted
        when it is None or not listed. Programmatic: ``syncing`` is set while it runs so that the
        window does not take it for the reviewer choosing a row."""
        i = self.vm.index_of(draft_id) if draft_id is not None else -1
        sel = self.table.selectionModel()
        if sel is None:
            return
        self.syncing = True
        try:
            if i >= 0:
                sel.setCurrentIndex(
                    self.model.index(i, 0),
                    QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows,
                )
                self.table.scrollTo(self.model.index(i, 0))
            else:
                sel.clearSelection()
                sel.setCurrentIndex(self.model.index(-1, -1), QItemSelectionModel.SelectionFlag.NoUpdate)
        finally:
            self.syncing = False

    def select_study(self, study_uid: str) -> None:
        """Highlight the row of a study with no draft (failed or skipped), found by its study UID."""
        i = next((k for k, r in enumerate(self.vm.rows) if r.draft_id is None and r.study_instance_uid == study_uid), -1)
        sel = self.table.selectionModel()
        if sel is None or i < 0:
            return
        self.syncing = True
        try:
            sel.setCurrentIndex(self.model.index(i, 0),
                                QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows)
            self.table.scrollTo(self.model.index(i, 0))
        finally:
            self.syncing = False

    def highlighted_drafts(self) -> list[int | None]:
        """Draft ids of the highlighted rows (at most one)."""
        sel = self.table.selectionModel()
        if sel is None:
            return []
        rows = sorted({i.row() for i in sel.selectedRows()})
        return [self.vm.rows[r].draft_id for r in rows if 0 <= r < len(self.vm.rows)]


class ReportPane(QWidget):
    """Patient line, status banner, model, indication, Findings / Impression editors, diff, buttons."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.vm: viewmodels.ReviewModel | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 8, 8, 8)
        lay.setSpacing(6)
        self.patient = QLabel("No study open", self)
        self.patient.setObjectName("patient")
        self.patient.setWordWrap(True)
        self.patient.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.patient)
        self.banner = QLabel("", self)
        self.banner.setObjectName("banner_draft")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        lay.addWidget(self.banner)
        self.model_line = QLabel("", self)
        self.model_line.setObjectName("model")
        lay.addWidget(self.model_line)
        self.gate = QLabel("", self)
        self.gate.setObjectName("gate")
        self.gate.setWordWrap(True)
        self.gate.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.gate)

        lay.addWidget(self._section("Indication"))
        self.indication = QLabel("", self)
        self.indication.setObjectName("indication")
        self.indication.setWordWrap(True)
        self.indication.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.indication)

        tools = QHBoxLayout()
        self.highlight = QCheckBox("Highlight", self)
        self.highlight.setChecked(True)
        self.highlight.setToolTip(
            "Amber sentence: an observation whose probability is close to its threshold (an uncertain call), "
            "or stated against the classifier. Orange word: one the model was least sure of. Blue underline: a "
            "sentence added from the findings classifier (where it came from, not a doubt). Hover a mark for the numbers; your own typing is never marked. "
            "Red, struck through (always, even with Highlight off): a de-identification placeholder \"xxxx\", not report text: "
            "replace it; the report cannot be signed while one is left."
        )
        tools.addWidget(self.highlight)
        legend = " ".join(
            f"<span style='background:{MARK_COLOURS[k][0]}'>&nbsp;{t}&nbsp;</span>"
            for k, t in (("call", "uncertain call"), ("word", "unsure word"))
        ) + f" <span style='color:{MARK_COLOURS['grounded'][1]}; text-decoration:underline'>added by classifier</span>" + (
            f" <span style='background:{MARK_COLOURS['deid'][0]}; text-decoration:line-through'>&nbsp;xxxx&nbsp;</span>"
            " replace"
        )
        self.legend = QLabel(legend, self)
        self.legend.setObjectName("legend")
        tools.addWidget(self.legend)
        tools.addStretch(1)
        self.diff_button = QPushButton("Changes vs AI draft (Ctrl+D)", self)
        self.diff_button.setCheckable(True)
        tools.addWidget(self.diff_button)
        lay.addLayout(tools)

        self.stack = QStackedWidget(self)
        editors = QWidget(self)
        el = QVBoxLayout(editors)
        el.setContentsMargins(0, 0, 0, 0)
        el.addWidget(self._section("Findings"))
        self.findings = MarkedEditor(editors)
        self.findings.setTabChangesFocus(True)
        el.addWidget(self.findings, 3)
        el.addWidget(self._section("Impression"))
        self.impression = MarkedEditor(editors)
        self.impression.setTabChangesFocus(True)
        el.addWidget(self.impression, 1)
        # the observation probabilities beside the text, each with its threshold
        side = QWidget(self)
        sl = QVBoxLayout(side)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.addWidget(self._section("Observations"))
        self.probabilities = QTableWidget(0, 3, side)
        self.probabilities.setObjectName("probabilities")
        self.probabilities.setHorizontalHeaderLabels(["Observation", "p", "thr"])
        self.probabilities.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.probabilities.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        self.probabilities.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.probabilities.setShowGrid(False)
        self.probabilities.setWordWrap(False)
        vh = self.probabilities.verticalHeader()
        if vh is not None:
            vh.setVisible(False)
            vh.setDefaultSectionSize(20)
        hh = self.probabilities.horizontalHeader()
        if hh is not None:
            hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
            hh.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
            hh.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.probabilities.setToolTip("The model's observation probabilities and the thresholds that decide "
                                      "what the draft states. Bold: called present; amber: close to the "
                                      "threshold (an uncertain call).")
        sl.addWidget(self.probabilities, 1)
        self.probabilities_note = QLabel("", side)
        self.probabilities_note.setObjectName("legend")
        self.probabilities_note.setWordWrap(True)
        sl.addWidget(self.probabilities_note)
        self.side = side
        page = QSplitter(Qt.Orientation.Horizontal, self)
        page.addWidget(editors)
        page.addWidget(side)
        page.setStretchFactor(0, 3)
        page.setStretchFactor(1, 2)
        page.setSizes([380, 230])
        page.setChildrenCollapsible(False)
        self.stack.addWidget(page)
        self.diff_view = QTextBrowser(self)
        self.stack.addWidget(self.diff_view)
        lay.addWidget(self.stack, 1)

        self.hl_findings = UncertainWords(self.findings, lambda t: self._spans("findings", t))
        self.hl_impression = UncertainWords(self.impression, lambda t: self._spans("impression", t))
        self.findings.marks, self.impression.marks = self.hl_findings, self.hl_impression

        # the undo window after signing (review.undo_window_s): the SR is held until it passes
        self.undo_bar = QFrame(self)
        self.undo_bar.setObjectName("undo_bar")
        ub = QHBoxLayout(self.undo_bar)
        ub.setContentsMargins(6, 4, 6, 4)
        self.undo_label = QLabel("", self.undo_bar)
        self.undo_label.setWordWrap(True)
        ub.addWidget(self.undo_label, 1)
        self.undo_button = QPushButton("Undo (Ctrl+Z)", self.undo_bar)
        self.undo_button.setToolTip("Withdraw the signature before the report is sent: the draft comes back to you")
        self.send_now_button = QPushButton("Send now", self.undo_bar)
        self.send_now_button.setToolTip("End the undo window: queue the verified report to its destinations now")
        ub.addWidget(self.undo_button)
        ub.addWidget(self.send_now_button)
        self.undo_bar.setVisible(False)
        lay.addWidget(self.undo_bar)
        # critical result at signing, addenda, no-draft actions, "changed underneath" (gui.after_signing)
        self.after = AfterSigning(self)
        lay.addWidget(self.after)
        self.signing_for = QLabel("", self)
        self.signing_for.setObjectName("signing_for")
        self.signing_for.setWordWrap(True)
        self.signing_for.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.signing_for.setToolTip("The study Sign (Ctrl+Enter) signs: always the open one, highlighted in the worklist")
        lay.addWidget(self.signing_for)
        buttons = QHBoxLayout()
        self.reject_button = QPushButton("Reject…", self)
        self.reject_button.setObjectName("reject")
        self.reject_button.setToolTip("Reject the draft with a reason (Ctrl+Shift+R)")
        self.skip_button = QPushButton("Skip", self)
        self.skip_button.setToolTip("Give the draft back to the worklist and open the next one")
        self.next_button = QPushButton("Next (Ctrl+N)", self)
        self.sign_button = QPushButton("Sign  (Ctrl+Enter)", self)
        self.sign_button.setObjectName("sign")
        self.sign_button.setToolTip("Sign as your configured name: writes the verified report and sends it")
        buttons.addWidget(self.reject_button)
        buttons.addWidget(self.skip_button)
        buttons.addStretch(1)
        buttons.addWidget(self.next_button)
        buttons.addWidget(self.sign_button)
        self.sign_next_button = QPushButton("Sign && next  (F12)", self)
        self.sign_next_button.setObjectName("sign")  # the same green: it signs too
        self.sign_next_button.setToolTip("Sign, then open the next unclaimed study in worklist order "
                                         "(F12 or Ctrl+Shift+Enter)")
        buttons.addWidget(self.sign_next_button)
        lay.addLayout(buttons)
        self.signer = QLabel("", self)
        self.signer.setObjectName("model")
        self.signer.setWordWrap(True)
        lay.addWidget(self.signer)

        self.findings.textChanged.connect(self._edited)
        self.impression.textChanged.connect(self._edited)
        self.highlight.toggled.connect(self._toggle_highlight)
        self.diff_button.toggled.connect(self.show_diff)
        self.show_review(None)

    def _section(self, text: str) -> QLabel:
        lab = QLabel(text.upper(), self)
        lab.setObjectName("section")
        return lab

    def _spans(self, section: str, text: str) -> list[viewmodels.Span]:
        if self.vm is None:
            return []
        f = text if section == "findings" else self.findings.toPlainText()
        i = text if section == "impression" else self.impression.toPlainText()
        probe = viewmodels.ReviewModel(self.vm.service, self.vm.user, self.vm.detail, False, findings=f, impression=i,
                                       policy=self.vm.policy)
        return probe.highlights(section)

    def _toggle_highlight(self, on: bool) -> None:
        for h in (self.hl_findings, self.hl_impression):
            h.refresh(on)

    def _edited(self) -> None:
        if self.vm is not None and not self.vm.read_only:
            self.vm.set_text(self.findings.toPlainText(), self.impression.toPlainText())
            self._update_buttons()
            if self.diff_button.isChecked():
                self.show_diff(True)

    def show_diff(self, on: bool) -> None:
        if on and self.vm is not None:
            body = (
                "<h4 style='margin:4px 0'>Findings</h4><p>" + diff_html(self.vm.word_diff("findings")) + "</p>"
                "<h4 style='margin:4px 0'>Impression</h4><p>" + diff_html(self.vm.word_diff("impression")) + "</p>"
            )
            if not self.vm.edited:
                body = "<p style='color:#57606a'><i>No changes: the text is the AI draft.</i></p>" + body
            self.diff_view.setHtml(body)
            self.stack.setCurrentIndex(1)
        else:
            self.stack.setCurrentIndex(0)
        if self.diff_button.isChecked() != on:
            self.diff_button.setChecked(on)

    def show_probabilities(self, vm: viewmodels.ReviewModel | None) -> None:
        """Fill the observations panel: name, probability, threshold; bold when called present,
        amber when close to the threshold."""
        rows = vm.observation_rows() if vm is not None else []
        t = self.probabilities
        t.setRowCount(len(rows))
        bold = QFont(t.font())
        bold.setBold(True)
        amber = QBrush(QColor(MARK_COLOURS["call"][0]))
        for i, r in enumerate(rows):
            for j, text in enumerate(r.text()):
                item = QTableWidgetItem(text)
                item.setToolTip(r.tooltip())
                if j:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if r.called:
                    item.setFont(bold)
                if r.uncertain:
                    item.setBackground(amber)
                t.setItem(i, j, item)
        if vm is None:
            note = ""
        elif vm.detail.withheld:
            note = "Withheld: the model's output on these images is not shown."
        elif not rows:
            note = "No observation probabilities were recorded with this draft."
        elif all(r.threshold is None for r in rows):
            note = "Thresholds unknown: the model that drafted this is not the one installed."
        else:
            note = "Bold: called present (p ≥ threshold). Amber: close to the threshold."
        self.probabilities_note.setText(note)

    def _update_buttons(self) -> None:
        vm = self.vm
        self.sign_button.setEnabled(bool(vm and vm.can_sign))
        self.sign_next_button.setEnabled(bool(vm and vm.can_sign))
        self.reject_button.setEnabled(bool(vm and vm.can_reject))
        self.skip_button.setEnabled(vm is not None)
        self.diff_button.setEnabled(vm is not None)

    def show_review(self, vm: viewmodels.ReviewModel | None, signer: str = "") -> None:
        self.vm = None  # no edit events while filling
        if vm is None:
            self.patient.setText("No study open")
            self.banner.setVisible(False)
            self.gate.setText("")
            self.gate.setVisible(False)
            self.show_probabilities(None)
            self.side.setVisible(True)
            self.model_line.setText("")
            self.indication.setText("")
            self.findings.setPlainText("")
            self.impression.setPlainText("")
            for e in (self.findings, self.impression):
                e.setReadOnly(True)
            self.signer.setText("")
            self.signing_for.setText("")
            self.signing_for.setVisible(False)
            self.after.show_for(None)
            self._update_buttons()
            return
        self.signing_for.setText(("Signed for: " if vm.is_final else "Signing for: ") + vm.signing_for())
        self.signing_for.setVisible(True)
        self.patient.setText(vm.patient_line())
        kind, text = vm.banner()
        self.banner.setObjectName(f"banner_{kind}")
        self.banner.setText(text)
        self.banner.setVisible(True)
        style = self.banner.style()
        if style is not None:
            style.unpolish(self.banner)
            style.polish(self.banner)
        self.model_line.setText(vm.model_line())
        gate = vm.gate
        alert = gate is not None and gate.outcome in ("partial", "warned")
        self.gate.setObjectName("gate_alert" if alert else "gate")
        lines = vm.gate_lines()
        if vm.detail.withheld:
            lines = lines[1:]  # the banner already says why; here what each view failed on
        self.gate.setText("\n".join(lines))
        self.gate.setVisible(bool(lines))
        gstyle = self.gate.style()
        if gstyle is not None:
            gstyle.unpolish(self.gate)
            gstyle.polish(self.gate)
        self.show_probabilities(vm)
        self.indication.setText(vm.detail.indication or "(no indication in the request)")
        self.findings.setPlainText(vm.findings)
        self.impression.setPlainText(vm.impression)
        withheld = vm.no_ai_text and not vm.is_final
        self.side.setVisible(not withheld)  # no model output to show: the editors take the room
        self.findings.setPlaceholderText("No AI draft: write the findings here." if withheld else "")
        self.impression.setPlaceholderText("Write the impression here." if withheld else "")
        for e in (self.findings, self.impression):
            e.setReadOnly(vm.read_only)
            e.setProperty("readOnly", vm.read_only)
            st = e.style()
            if st is not None:
                st.unpolish(e)
                st.polish(e)
        self.signer.setText(signer)
        self.after.show_for(vm, undo_pending=self.undo_bar.isVisible())
        self.vm = vm
        self._toggle_highlight(self.highlight.isChecked() and not vm.is_final)
        self._update_buttons()
        self.show_diff(self.diff_button.isChecked())


class ReviewerWindow(QMainWindow):
    """The reviewer: the worklist above the views, the report full height beside them.

    Parameters
    ----------
    service:
        The review service.
    user:
        The authenticated account (the OS user in :mod:`gui.cli`).
    refresh_interval_s:
        How often the worklist is fetched again (0: only on request).
    study_uid:
        A study to open once the worklist is first fetched (``""``: none).
    settings:
        Where window geometry and text size are kept (``None``: the user's QSettings).
    """

    review_shown = pyqtSignal(int)  # draft id: views painted and draft text filled
    signed = pyqtSignal(int)
    sign_undone = pyqtSignal(int)
    sign_released = pyqtSignal(int)  # the undo window ended (passed, or Send now): the SR goes out
    rejected = pyqtSignal(int)
    addendum_added = pyqtSignal(str)  # SOP Instance UID of the addendum's verified SR
    drafting_retried = pyqtSignal(str)  # Study Instance UID
    study_changed = pyqtSignal(str)  # why nothing was signed: the study gained images
    worklist_refreshed = pyqtSignal()
    failed = pyqtSignal(str)

    def __init__(
        self,
        service: ReviewService,
        user: str,
        refresh_interval_s: float = 15.0,
        study_uid: str = "",
        settings: QSettings | None = None,
    ) -> None:
        super().__init__()
        self.service = service
        self.user = user
        self.tasks = TaskRunner(self)
        self.worklist_vm = viewmodels.WorklistModel(service, user=user)
        self.review: viewmodels.ReviewModel | None = None
        self._opening: int | None = None
        self._refreshing = False
        self._refresh_again = False
        self._pending_study_uid = study_uid
        # dialogs, replaceable by tests
        self.confirm: Callable[[str, str], bool] = self._confirm_dialog
        self.ask_reason: Callable[[], str | None] = self._reason_dialog
        self.show_error: Callable[[str, str], None] = self._error_dialog
        # the sign question: (title, text, offer "don't ask again") -> (sign?, don't ask again?)
        self.confirm_sign: Callable[[str, str, bool], tuple[bool, bool]] = self._confirm_sign
        self.settings = settings if settings is not None else tools.open_settings()
        self.skip_unchanged_confirmation = False  # "don't ask again for unchanged drafts this session"
        self.min_dwell_s = 0.5  # a study shown less than this is not signed unasked (double key press)
        self.status_timeout_s = 12.0  # status messages clear after this (errors: 3x)
        self.text_px = tools.clamp_text_px(int(self.settings.value("text/size_px", tools.DEFAULT_TEXT_PX) or 14))
        self._signing: int | None = None  # draft being signed (no second signature meanwhile)
        self._shown_at = 0.0  # monotonic time the open study was shown
        self._undo_who = ""  # the study whose signature Undo withdraws
        self._image_fullscreen = False
        self._widths_restored = False  # worklist column widths came from the settings
        self.key_help: tools.KeyHelp | None = None

        reviewer = service.find_reviewer(user)  # installed configuration only (docs/SECURITY.md)
        who = (
            f"{viewmodels.person_display(reviewer.display_name)} ({reviewer.organisation})"
            if reviewer
            else f"{user} — not a configured reviewer (read-only)"
        )
        self.setWindowTitle(f"cxrnode reviewer — {who}")
        self._apply_text_size()
        self.resize(QSize(1600, 900))

        self.worklist = WorklistPane(self.worklist_vm, self)
        self.study = StudyViewer(self)
        self.report = ReportPane(self)
        lower = QSplitter(Qt.Orientation.Horizontal, self)
        self.lower_splitter = lower
        # the current views and, beside them, the prior's (Ctrl+P shows or hides it)
        self.priors = PriorPanel(self)
        self.compare = QSplitter(Qt.Orientation.Horizontal, self)
        self.compare.addWidget(self.study)
        self.compare.addWidget(self.priors)
        self.compare.setStretchFactor(0, 1)
        self.compare.setStretchFactor(1, 1)
        self.compare.setSizes([500, 500])
        self.priors.link(self.study)
        # worklist above the views on the left, the report the full height on the right: the
        # report's many parts never squeeze the worklist below ten rows
        splitter = QSplitter(Qt.Orientation.Vertical, self)
        splitter.addWidget(self.worklist)
        splitter.addWidget(self.compare)
        splitter.setStretchFactor(0, 0)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([320, 580])  # the worklist shows ten rows or more
        lower.addWidget(splitter)
        lower.addWidget(self.report)
        lower.setStretchFactor(0, 1)
        lower.setStretchFactor(1, 0)
        lower.setSizes([1100, 500])
        lower.setObjectName("central")
        self.setCentralWidget(lower)
        self.splitter = splitter

        bar = self.statusBar()
        assert bar is not None
        self.status_label = QLabel("", self)
        self.progress = QProgressBar(self)
        self.progress.setMaximumWidth(220)
        self.progress.setTextVisible(True)
        self.progress.setVisible(False)
        self.user_label = QLabel(f"Signed in as {user}", self)
        bar.addWidget(self.status_label, 1)
        bar.addPermanentWidget(self.progress)
        bar.addPermanentWidget(self.user_label)
        sep = QFrame(self)
        sep.setFrameShape(QFrame.Shape.VLine)
        bar.addPermanentWidget(sep)
        self.tasks.busy_changed.connect(self._busy)
        self.tasks.progress.connect(self._progress)

        # wiring
        w = self.worklist
        w.refresh_button.clicked.connect(self.refresh)
        w.search.textChanged.connect(self._search_changed)
        w.state.currentTextChanged.connect(self._filter_changed)
        w.model.sort_requested.connect(self.refresh)
        # the highlighted row is always the open study: choosing a row (click, arrow keys, Enter)
        # opens it, and every other change of the open study moves the highlight (_sync_selection)
        sel_model = w.table.selectionModel()
        assert sel_model is not None
        sel_model.currentRowChanged.connect(lambda cur, prev: self._current_row_changed(cur.row()))
        w.table.clicked.connect(lambda idx: self._row_chosen(idx.row()))  # also the row already current
        w.table.activated.connect(lambda idx: self._row_chosen(idx.row()))
        self.report.sign_button.clicked.connect(self.sign)
        self.report.sign_next_button.clicked.connect(self.sign_and_next)
        self.report.reject_button.clicked.connect(self.reject)
        self.report.skip_button.clicked.connect(self.skip)
        self.report.next_button.clicked.connect(self.next)
        self.study.all_painted.connect(self._painted)
        self.report.undo_button.clicked.connect(self.undo_sign)
        self.report.after.records.add_requested.connect(self.add_addendum)
        self.report.after.no_draft.scratch_requested.connect(self.report_from_scratch)
        self.report.after.no_draft.retry_requested.connect(self.retry_drafting)
        self.report.after.changed.open_requested.connect(self.open_new_draft)
        self._newer: tuple[str, int | None] | None = None  # (study UID, newer draft) after a change underneath
        self.report.send_now_button.clicked.connect(self.send_now)
        self._undo: tuple[int, float] | None = None  # (draft id, monotonic deadline) while undo is offered
        self.undo_timer = QTimer(self)
        self.undo_timer.setInterval(250)
        self.undo_timer.timeout.connect(self._undo_tick)
        self.undo_shortcut = QShortcut(QKeySequence("Ctrl+Z"), self)
        self.undo_shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
        self.undo_shortcut.activated.connect(self.undo_sign)
        self.undo_shortcut.setEnabled(False)
        for keys, slot in (
            ("Ctrl+Return", self.sign),
            ("Ctrl+Enter", self.sign),
            ("Ctrl+N", self.next),
            ("Ctrl+Shift+R", self.reject),
            ("Ctrl+D", lambda: self.report.diff_button.toggle()),
            ("Ctrl+F", self._focus_search),
            ("F5", self.refresh),
        ):
            sc = QShortcut(QKeySequence(keys), self)
            sc.setContext(Qt.ShortcutContext.WindowShortcut)
            sc.activated.connect(slot)
        self.timer = QTimer(self)
        self.timer.setInterval(max(1000, int(refresh_interval_s * 1000)))
        self.timer.timeout.connect(self.refresh)
        if refresh_interval_s > 0:
            self.timer.start()
        # an open draft's claim is renewed while the reviewer is working on it (any key, click or
        # wheel in this window since the last beat); left alone, it expires for the others
        self._activity = False
        self.heartbeat = QTimer(self)
        self.heartbeat.setInterval(max(1000, int(service.claim_timeout_s * 1000 / 3)))
        self.heartbeat.timeout.connect(self._heartbeat)
        self.heartbeat.start()
        app = QApplication.instance()
        if app is not None:
            app.installEventFilter(self)
        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(250)
        self._search_timer.timeout.connect(self.refresh)
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.timeout.connect(lambda: self.status_label.setText(""))
        self._bind_keys()
        self.template_hook = TemplateHook(self)  # report templates: .trigger + Tab, Ctrl+1..9, Ctrl+T
        self.critical_notice = CriticalNotice(self)  # the ⚠ line of a critical draft under the banner
        self.restore_layout()
        self.refresh()

    # -- keeping the claim ------------------------------------------------------------------
    def eventFilter(self, obj: QObject | None, event: QEvent | None) -> bool:  # noqa: N802 (Qt name)
        if (
            event is not None
            and event.type() in (QEvent.Type.KeyPress, QEvent.Type.MouseButtonPress, QEvent.Type.Wheel)
            and isinstance(obj, QWidget)
            and obj.window() is self
        ):
            self._activity = True
        return False

    def _heartbeat(self) -> None:
        """Renew the claim of the open draft if the reviewer did something since the last beat."""
        vm = self.review
        if vm is None or not vm.holds_claim or vm.is_final or not vm.detail.is_open or not self._activity:
            return
        self._activity = False
        draft_id = vm.detail.draft_id

        def lost(exc: BaseException, tb: str) -> None:
            if self.review is vm and isinstance(exc, StudyChangedError | SupersededError):
                self._study_changed(vm, exc)
                return
            if self.review is vm and isinstance(exc, ReviewError):
                vm.holds_claim = False
                vm.notice = f"read-only: {exc}"
                self.report.show_review(vm, self._signer_text())
                self.say(f"The draft is no longer yours: {exc}")
                self.failed.emit(str(exc))

        self.tasks.start(lambda progress: self.service.claim(draft_id, self.user), lambda _: None, lost)

    # -- dialogs ----------------------------------------------------------------------------
    def _confirm_dialog(self, title: str, text: str) -> bool:
        answer = QMessageBox.question(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _reason_dialog(self) -> str | None:
        text, ok = QInputDialog.getMultiLineText(self, "Reject the draft", "Why is this draft rejected? (required)")
        return text if ok else None

    def _error_dialog(self, title: str, text: str) -> None:
        QMessageBox.warning(self, title, text)

    # -- status -----------------------------------------------------------------------------
    def say(self, text: str, timeout_s: float | None = None) -> None:
        """Show a status message; it clears after ``timeout_s`` (default ``status_timeout_s``)
        unless a newer one replaced it."""
        self.status_label.setText(text)
        t = self.status_timeout_s if timeout_s is None else timeout_s
        if t > 0 and text:
            self._status_timer.start(int(t * 1000))
        else:
            self._status_timer.stop()

    def _busy(self, busy: bool) -> None:
        self.progress.setVisible(busy)
        if busy:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1)

    def _progress(self, done: int, total: int, what: str) -> None:
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(done)
        self.progress.setFormat(what)

    def _fail(self, title: str) -> Callable[[BaseException, str], None]:
        def handler(exc: BaseException, tb: str) -> None:
            if not isinstance(exc, ReviewError):
                log.error("%s: %s", title, tb)
            message = str(exc) or type(exc).__name__
            self.say(f"{title}: {message}", self.status_timeout_s * 3)
            self.failed.emit(message)
            self.show_error(title, message)

        return handler

    # -- worklist ---------------------------------------------------------------------------
    def _focus_search(self) -> None:
        self.worklist.search.setFocus()
        self.worklist.search.selectAll()

    def _search_changed(self, text: str) -> None:
        self.worklist_vm.search = text
        self._search_timer.start()

    def _filter_changed(self, text: str) -> None:
        self.worklist_vm.state_filter = text
        self.refresh()

    def refresh(self) -> None:
        """Refetch the worklist off the GUI thread (one at a time; a request during one queues)."""
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        self.tasks.start(lambda progress: self.worklist_vm.fetch(), self._refreshed, self._refresh_failed)

    def _refreshed(self, rows: list[Any]) -> None:
        self._refreshing = False
        self.worklist.model.set_rows(rows)
        if rows and not self._widths_restored:  # first rows, no remembered widths: fit the columns once
            self._widths_restored = True
            self.worklist.table.resizeColumnsToContents()
        self._sync_selection()
        n_open = sum(1 for r in rows if r.state == "new")
        self.worklist.count.setText(f"{len(rows)} studies · {n_open} waiting")
        self.worklist_refreshed.emit()
        if self._refresh_again:
            self._refresh_again = False
            self.refresh()
        if self._pending_study_uid:
            uid, self._pending_study_uid = self._pending_study_uid, ""
            self.open_study(uid)

    def _refresh_failed(self, exc: BaseException, tb: str) -> None:
        self._refreshing = False
        log.warning("worklist refresh failed: %s", exc)
        self.say(f"Worklist could not be refreshed: {exc}")

    def _sync_selection(self) -> None:
        """Highlight the open study's row (or the one being opened); none if it is not listed."""
        target = self._opening if self._opening is not None else (self.review.detail.draft_id if self.review else None)
        if target == 0 and self.review is not None and self.review.detail.draft_id == 0:
            self.worklist.select_study(self.review.detail.study_instance_uid)  # a study with no draft
            return
        self.worklist.select_draft(target)

    def _current_row_changed(self, row: int) -> None:
        if self.worklist.syncing:
            return
        self._row_chosen(row)

    def _row_chosen(self, row: int) -> None:
        if 0 <= row < len(self.worklist_vm.rows):
            r = self.worklist_vm.rows[row]
            if r.draft_id is None:  # failed or skipped: its images, report from scratch, retry
                self.open_study_images(r.study_instance_uid)
                return
            self.open_draft(r.draft_id)

    # -- opening ----------------------------------------------------------------------------
    def open_study(self, study_uid: str) -> None:
        """Context launch: open the current draft of a study (by Study Instance UID)."""

        def find(progress: Callable[[int, int, str], None]) -> int | None:
            return self.service.find_draft(study_uid)

        def found(draft_id: int | None) -> None:
            if draft_id is None:
                self.say(f"No draft for study {study_uid} (yet).")
                self.failed.emit(f"no draft for study {study_uid}")
            else:
                self.open_draft(draft_id)

        self.tasks.start(find, found, self._fail("Cannot open the study"))

    def open_draft(self, draft_id: int) -> None:
        """Claim (when possible) and show a draft; the previous one is released."""
        if self._opening == draft_id or (
            self.review and self.review.detail.draft_id == draft_id and self._opening is None
            and (self.review.holds_claim or self.review.is_final)
        ):
            return
        previous = self.review
        if previous is not None and previous.holds_claim and not previous.is_final and previous.edited:
            if not self.confirm("Discard your changes?",
                                "You edited this draft but did not sign it. Discard your changes and open another study?"):
                QTimer.singleShot(0, self._sync_selection)
                return
        self._opening = draft_id
        self._sync_selection()
        self.say("Opening…")

        def work(progress: Callable[[int, int, str], None]) -> viewmodels.ReviewModel:
            if previous is not None:
                previous.release()
            return viewmodels.open_review(self.service, self.user, draft_id, progress=progress)

        self.tasks.start(work, self._opened, self._open_failed)

    def _open_failed(self, exc: BaseException, tb: str) -> None:
        self._opening = None
        vm = self.review
        if vm is not None and not vm.holds_claim and not vm.is_final and not vm.notice:
            # its claim was given back before the other study failed to open: say so, read-only
            vm.notice = "read-only: released when another study was opened; choose it in the worklist to claim it again"
            self.report.show_review(vm, self._signer_text())
        self._sync_selection()  # back to the study still open
        self._fail("Cannot open the draft")(exc, tb)

    def _opened(self, vm: viewmodels.ReviewModel) -> None:
        if self._opening != vm.detail.draft_id:  # superseded by a later click
            if vm.holds_claim:
                self.tasks.start(lambda progress: vm.release(), lambda _: None, lambda e, tb: None)
            return
        self.review = vm
        self.report.show_review(vm, self._signer_text())
        self.study.set_pictures(vm.pictures, [vm.view_gate(p.sop_instance_uid) for p in vm.pictures])
        self.priors.show_prior(vm.prior)
        self._sync_selection()
        self.say(vm.banner()[1])
        if vm.view_errors:
            self.say("Not every view can be shown — " + "; ".join(vm.view_errors))
            self.show_error("Some views cannot be shown", "\n".join(vm.view_errors))
        if vm.holds_claim:
            self.report.findings.setFocus()
        if self._undo is not None:
            self._undo_tick()  # the undo bar says at once whose signature it withdraws
        self.refresh()

    def _painted(self) -> None:
        if self.review is not None and self._opening == self.review.detail.draft_id:
            import time

            self._opening = None
            self._shown_at = time.monotonic()
            self.review_shown.emit(self.review.detail.draft_id)

    def _signer_text(self) -> str:
        try:
            r = self.service.reviewer(self.user)  # installed configuration only (docs/SECURITY.md)
        except ReviewError as exc:
            return f"Read-only, you cannot sign: {exc}"
        text = f"Signing as {viewmodels.person_display(r.display_name)}, {r.organisation} (account {self.user})"
        if self.skip_unchanged_confirmation:
            text += ". Unchanged AI drafts are signed without asking this session."
        return text

    # -- actions ----------------------------------------------------------------------------
    def sign(self, and_next: bool = False) -> None:
        """Sign the open study (Ctrl+Enter); with ``and_next`` (Sign & next) then open the next
        unclaimed study in worklist order. What is signed is always the study shown."""
        vm = self.review
        if vm is None or self._opening is not None or self._signing is not None:
            return
        if not vm.can_sign:
            self.say("This report cannot be signed: " + vm.banner()[1])
            return
        refusal = vm.sign_refusal()
        if refusal:  # "xxxx" left in the text: never signed as report text
            self.say("Not signed: de-identification placeholders (\"xxxx\") are left in the report.")
            self.show_error("Not signed", refusal)
            return
        if [d for d in self.worklist.highlighted_drafts() if d != vm.detail.draft_id]:
            # never sign one study while another is highlighted (cannot happen; checked anyway)
            self._sync_selection()
            self.say("Not signed: the highlighted worklist row was not the open study. Check the patient and sign again.")
            return
        if self.report.vm is not vm:  # the pane shows another study (cannot happen; checked anyway)
            self.say("Not signed: the report shown is not the open study. Open it again and sign.")
            return
        critical_box = self.report.after.critical
        if critical_box.problem():  # the critical-result box is ticked but not filled in
            self.say("Not signed: " + critical_box.problem())
            self.show_error("Not signed", critical_box.problem())
            return
        critical = critical_box.notice()
        title, text = vm.sign_confirmation()  # names the open study: patient, ID, accession, date
        text += confirmation_line(critical)
        unchanged = vm.needs_confirmation() and critical is None  # a critical result is always confirmed
        if unchanged and self.skip_unchanged_confirmation:
            # not asked (the reviewer chose so this session; "Signing for" names the study), but a
            # study shown a moment ago is never signed unasked: a double key press is not a reading
            import time

            if time.monotonic() - self._shown_at < self.min_dwell_s:
                self.say("Not signed: this study opened a moment ago. Look at it, then sign.")
                return
        else:
            ok, once = self.confirm_sign(title, text, unchanged)
            if not ok:
                self.say("Not signed.")
                return
            if once and unchanged:
                self.skip_unchanged_confirmation = True
                self.report.signer.setText(self._signer_text())
        candidates = self.worklist_vm.open_rows_after(vm.detail.draft_id) if and_next else []
        self._signing = vm.detail.draft_id
        self.report.sign_button.setEnabled(False)
        self.report.sign_next_button.setEnabled(False)
        self.report.reject_button.setEnabled(False)
        for editor in (self.report.findings, self.report.impression):
            editor.setReadOnly(True)  # what is signed is what is on screen now
        self.say("Signing…")

        def work(progress: Callable[[int, int, str], None]) -> Any:
            progress(0, 1, "Signing…")
            return vm.sign(critical)

        def done(_: Any) -> None:
            self._signing = None
            self.report.show_review(vm, self._signer_text())
            n = len(self.service.config.destinations)
            window = self.service.config.review.undo_window_s
            if window > 0:
                self._start_undo(vm.detail.draft_id, window, vm.signing_for())
                self.say(f"Signed. The verified report goes to {n} destination(s) in {window:g} s: Undo (Ctrl+Z) until then.")
            else:
                self.say(f"Signed. Verified report stored and queued to {n} destination(s).")
            self.signed.emit(vm.detail.draft_id)
            if and_next:
                self._open_next_unclaimed(candidates)
            self.refresh()

        def failed(exc: BaseException, tb: str) -> None:
            self._signing = None
            if isinstance(exc, StudyChangedError | SupersededError):
                self._study_changed(vm, exc)
                self.refresh()
                return
            if isinstance(exc, ClaimConflictError):
                vm.holds_claim = False
                vm.notice = f"read-only: {exc}"
            self.report.show_review(vm, self._signer_text())
            self._fail("Not signed")(exc, tb)
            self.refresh()

        self.tasks.start(work, done, failed)

    # -- a draft that changed underneath ---------------------------------------------------
    def _study_changed(self, vm: viewmodels.ReviewModel, exc: BaseException) -> None:
        """The study gained images while its draft was open: nothing was signed. Say so plainly,
        keep the draft read-only, and offer the new draft in one action (the dialog's Yes, or the
        bar's button; when the new draft is still being made, the button looks for it)."""
        newer = exc.newer_draft_id if isinstance(exc, SupersededError) else None
        self._newer = (vm.detail.study_instance_uid, newer)
        vm.holds_claim = False  # it can no longer be signed: the edit is not "unsigned work" to keep
        vm.notice = "cannot be signed: the study gained images after this draft was made"
        self.report.show_review(vm, self._signer_text())
        text = (f"NOT SIGNED — new images arrived for {vm.signing_for()} after this draft was made, "
                "so it no longer describes the whole study.")
        text += (" A new draft covering every image is ready." if newer is not None else
                 " A new draft is being made; it replaces this one when it is ready.")
        self.report.after.changed.show_change(text, newer is not None)
        self.say(text)
        self.study_changed.emit(str(exc))
        if newer is not None and self.confirm(
                "The study changed: not signed",
                f"{text}\n\n{exc}\n\nOpen the new draft now? Your edits to this draft are not carried over: "
                "read the new images and the new draft."):
            self.open_new_draft()

    def open_new_draft(self) -> None:
        """Open the draft that replaces the one that changed underneath (or look for it)."""
        if self._newer is None:
            return
        study_uid, newer = self._newer

        def found(draft_id: int | None) -> None:
            current = self.review.detail.draft_id if self.review else None
            if draft_id is None or draft_id == current:
                self.say("The new draft is not ready yet: it appears in the worklist when it is.")
                return
            self._newer = None
            self.report.after.changed.setVisible(False)
            self.open_draft(draft_id)

        if newer is not None:
            found(newer)
        else:
            self.tasks.start(lambda progress: self.service.find_draft(study_uid), found,
                             self._fail("Cannot look for the new draft"))

    # -- after signing: addenda; studies with no draft ---------------------------------------
    def add_addendum(self) -> None:
        """Add the typed addendum to the open signed report: a new verified SR (audited, sent)."""
        vm = self.review
        if vm is None or not vm.is_final:
            return
        text = self.report.after.records.text.toPlainText().strip()
        if not text:
            self.show_error("No addendum", "Write the addendum first.")
            return
        if not self.confirm("Add this addendum?",
                            f"Patient: {vm.signing_for()}\n\n{text}\n\nSign it as your addendum to the verified "
                            "report? A new verified report is sent; the signed one is kept unchanged."):
            self.say("No addendum added.")
            return
        draft_id = vm.detail.draft_id

        def work(progress: Callable[[int, int, str], None]) -> tuple[Any, Any]:
            progress(0, 1, "Adding the addendum…")
            result = addenda.add_addendum(self.service, draft_id, self.user, text)
            return result, addenda.report_record(self.service, draft_id)

        def done(out: tuple[Any, Any]) -> None:
            result, record = out
            if self.review is vm:
                vm.record = record
                self.report.after.records.text.clear()
                self.report.show_review(vm, self._signer_text())
            self.say(f"Addendum signed: a new verified report, queued to {result.transfers} destination(s).")
            self.addendum_added.emit(result.sop_instance_uid)

        self.tasks.start(work, done, self._fail("No addendum added"))

    def open_study_images(self, study_uid: str) -> None:
        """Show a study with no draft (drafting failed or skipped): its images, read-only, with
        Report from scratch and Retry drafting."""
        previous = self.review
        if previous is not None and previous.holds_claim and not previous.is_final and previous.edited:
            if not self.confirm("Discard your changes?",
                                "You edited this draft but did not sign it. Discard your changes and open another study?"):
                QTimer.singleShot(0, self._sync_selection)
                return
        self._opening = 0
        self.say("Opening…")

        def work(progress: Callable[[int, int, str], None]) -> viewmodels.ReviewModel:
            if previous is not None:
                previous.release()
            return viewmodels.open_study_images(self.service, self.user, study_uid, progress=progress)

        self.tasks.start(work, self._opened, self._open_failed)

    def report_from_scratch(self) -> None:
        """Start a report with an empty editor for the open study (no AI text); sign as usual."""
        vm = self.review
        if vm is None:
            return
        study_uid = vm.detail.study_instance_uid
        self.say("Starting a report from scratch…")
        self.tasks.start(lambda progress: scratch.report_from_scratch(self.service, study_uid, self.user),
                         self.open_draft, self._fail("Cannot report from scratch"))

    def retry_drafting(self) -> None:
        """Queue drafting again for the open study (failed or skipped); audited."""
        vm = self.review
        if vm is None:
            return
        study_uid = vm.detail.study_instance_uid

        def done(result: Any) -> None:
            self.say(f"Drafting queued again (job {result.job_id}): the draft appears in the worklist when it is made.")
            self.drafting_retried.emit(study_uid)
            self.refresh()

        self.tasks.start(lambda progress: scratch.retry_drafting(self.service, study_uid, self.user), done,
                         self._fail("Drafting not queued"))

    # -- the undo window after signing ---------------------------------------------------
    def _start_undo(self, draft_id: int, window_s: float, who: str = "") -> None:
        import time

        self._undo = (draft_id, time.monotonic() + window_s)
        self._undo_who = who
        self.report.undo_bar.setVisible(True)
        if self.report.vm is not None:  # no addendum while the signature can be undone
            self.report.after.show_for(self.report.vm, undo_pending=True)
        self.undo_shortcut.setEnabled(True)
        self._undo_tick()
        self.undo_timer.start()

    def _end_undo(self) -> None:
        self._undo = None
        self.undo_timer.stop()
        self.undo_shortcut.setEnabled(False)
        self.report.undo_bar.setVisible(False)
        if self.report.vm is not None:  # the signed report may now take an addendum
            self.report.after.show_for(self.report.vm)

    def _undo_tick(self) -> None:
        import time

        if self._undo is None:
            return
        draft_id, deadline = self._undo
        left = deadline - time.monotonic()
        if left <= 0:  # passed: the report goes out as signed
            self._end_undo()
            self.sign_released.emit(draft_id)
            return
        if self.review is not None and self.review.detail.draft_id == draft_id:
            self.report.undo_label.setText(f"Signed. Sending in {left:.0f} s: Undo returns the report to you.")
        else:  # moved on (Sign & next): the window still runs and says whose report it is
            self.report.undo_label.setText(f"Signed {self._undo_who}. Sending in {left:.0f} s: "
                                           "Undo reopens that study with your report.")

    def undo_sign(self) -> None:
        """Withdraw the signature within the undo window: nothing is sent, the draft (with the
        signed text) is back in the editor, claimed by this reviewer (audited)."""
        if self._undo is None or self._opening is not None or self._signing is not None:
            return
        draft_id = self._undo[0]
        current = self.review if self.review is not None and self.review.detail.draft_id != draft_id else None
        if current is not None and current.holds_claim and not current.is_final and current.edited and not self.confirm(
                "Discard your changes?", f"Undo reopens the signed study ({self._undo_who}). "
                                         "Discard your changes to the study open now?"):
            return
        self._end_undo()
        self.say("Undoing the signature…")
        self._opening = draft_id  # nothing else is opened or signed meanwhile

        def work(progress: Callable[[int, int, str], None]) -> viewmodels.ReviewModel:
            findings, impression = self.service.undo_sign(draft_id, self.user)
            if current is not None:
                current.release()  # the study moved on to is given back
            vm = viewmodels.open_review(self.service, self.user, draft_id, progress=progress)
            if vm.holds_claim:
                vm.findings, vm.impression = findings, impression
            return vm

        def done(vm: viewmodels.ReviewModel) -> None:
            self._opening = draft_id
            self._opened(vm)
            self.say("Signature undone: nothing was sent; the report is back in your hands.")
            self.sign_undone.emit(draft_id)

        def failed(exc: BaseException, tb: str) -> None:
            self._opening = None
            if current is not None and not current.holds_claim and self.review is current:
                current.notice = "read-only: released for the undo; choose it in the worklist to claim it again"
                self.report.show_review(current, self._signer_text())
            self._sync_selection()
            self._fail("Not undone")(exc, tb)
            self.sign_released.emit(draft_id)

        self.tasks.start(work, done, failed)

    def send_now(self) -> None:
        """End the undo window at once: the verified report is queued to its destinations now."""
        if self._undo is None:
            return
        draft_id = self._undo[0]
        self._end_undo()

        def done(n: int) -> None:
            self.say(f"Sent: the verified report is queued to {n} destination(s).")
            self.sign_released.emit(draft_id)

        self.tasks.start(lambda progress: self.service.send_signed_now(draft_id, self.user), done,
                         self._fail("Not sent"))

    def reject(self) -> None:
        vm = self.review
        if vm is None or not vm.can_reject:
            return
        reason = self.ask_reason()
        if reason is None:
            return
        if not reason.strip():
            self.show_error("Not rejected", "A reason is required to reject a draft.")
            return

        def done(_: Any) -> None:
            self.report.show_review(vm, self._signer_text())
            self.say("Rejected. No report was sent.")
            self.rejected.emit(vm.detail.draft_id)
            self.refresh()

        self.tasks.start(lambda progress: vm.reject(reason), done, self._fail("Not rejected"))

    def skip(self) -> None:
        """Give the draft back and move on."""
        vm = self.review
        if vm is None:
            return
        if vm.edited and vm.holds_claim and not vm.is_final and not self.confirm(
            "Discard your changes?", "Skip this draft and discard your changes?"
        ):
            return
        nxt = self.worklist_vm.next_open_after(vm.detail.draft_id)
        self.review = None
        self._sync_selection()
        self.report.show_review(None)
        self.study.set_pictures([])

        def work(progress: Callable[[int, int, str], None]) -> bool:
            return vm.release()

        def done(_: Any) -> None:
            self.say("Skipped.")
            if nxt is not None and nxt.draft_id is not None:
                self.open_draft(nxt.draft_id)
            else:
                self.refresh()

        self.tasks.start(work, done, self._fail("Skip"))

    def next(self) -> None:
        """Open the next draft waiting in the worklist."""
        current = self.review.detail.draft_id if self.review else None
        nxt = self.worklist_vm.next_open_after(current)
        if nxt is None or nxt.draft_id is None:
            self.say("No other draft is waiting.")
            return
        self.open_draft(nxt.draft_id)

    # -- the fast normal flow: Sign & next, the sign question -----------------------------------
    def sign_and_next(self) -> None:
        """Sign the open study, then open the next unclaimed one in worklist order (F12)."""
        self.sign(and_next=True)

    def _confirm_sign(self, title: str, text: str, offer_session: bool) -> tuple[bool, bool]:
        if self.confirm != self._confirm_dialog:  # answered through ``confirm`` (tests, embedding)
            return self.confirm(title, text), False
        return tools.sign_question(self, title, text, offer_session)

    def _open_next_unclaimed(self, candidates: list[int]) -> None:
        """Open the first of ``candidates`` this reviewer can claim (another reviewer may have
        taken one since the worklist was fetched: it is passed over, not opened read-only)."""
        if not candidates:
            self.say("Signed. No other draft is waiting.")
            return
        first = candidates[0]
        self._opening = first
        self._sync_selection()

        def work(progress: Callable[[int, int, str], None]) -> viewmodels.ReviewModel | None:
            for draft_id in candidates:
                vm = viewmodels.open_review(self.service, self.user, draft_id, progress=progress)
                if vm.holds_claim:
                    return vm
            return None

        def done(vm: viewmodels.ReviewModel | None) -> None:
            if self._opening != first:  # the reviewer chose another study meanwhile
                if vm is not None:
                    self.tasks.start(lambda progress: vm.release(), lambda _: None, lambda e, tb: None)
                return
            if vm is None:
                self._opening = None
                self._sync_selection()
                self.say("Signed. No other unclaimed draft is waiting.")
                return
            self._opening = vm.detail.draft_id
            self._opened(vm)

        def failed(exc: BaseException, tb: str) -> None:
            if self._opening == first:
                self._opening = None
                self._sync_selection()
            self._fail("Signed, but the next study cannot be opened")(exc, tb)

        self.tasks.start(work, done, failed)

    # -- keys ---------------------------------------------------------------------------------
    #: actions bound where the window is built (above), not from the table
    _BOUND_INLINE = frozenset({"sign", "undo_sign", "reject", "toggle_diff", "next", "focus_search", "refresh"})

    def toggle_prior(self) -> None:
        """Show or hide the prior study beside the current views (Ctrl+P)."""
        self.priors.toggle()

    def _bind_keys(self) -> None:
        """Window-wide shortcuts of :data:`gui.keys.KEYS` (they work with the focus anywhere)."""
        self.shortcuts: dict[str, list[QShortcut]] = {}
        for k in KEYS:
            if not k.window_wide or k.action in self._BOUND_INLINE:
                continue
            slot = getattr(self, k.action, None)
            if slot is None:  # an action of the table this window does not have (yet)
                log.warning("key table: the window has no action %r", k.action)
                continue
            for seq in k.keys + k.aliases:
                sc = QShortcut(QKeySequence(seq), self)
                sc.setContext(Qt.ShortcutContext.WindowShortcut)
                sc.setWhatsThis(k.text)
                sc.activated.connect(slot)
                self.shortcuts.setdefault(k.action, []).append(sc)
        self.escape_shortcut = QShortcut(QKeySequence("Esc"), self)
        self.escape_shortcut.setWhatsThis("Leave images full screen")
        self.escape_shortcut.activated.connect(self.toggle_image_fullscreen)
        self.escape_shortcut.setEnabled(False)

    def show_key_help(self) -> None:
        """F1 or ?: every shortcut of the window."""
        if self.key_help is None:
            self.key_help = tools.KeyHelp(self)
        self.key_help.show()
        self.key_help.raise_()

    # -- image tools on keys (all views, no image needs the focus) ------------------------------
    def _preset(self, name: str) -> None:
        if not self.study.views:
            return
        self.study.apply_preset(name)
        self.say(f"{name.capitalize()} window.")

    def preset_lung(self) -> None:
        self._preset("lung")

    def preset_mediastinum(self) -> None:
        self._preset("mediastinum")

    def preset_bone(self) -> None:
        self._preset("bone")

    def window_as_sent(self) -> None:
        self.study.window_as_sent()

    def window_narrower(self) -> None:
        self.study.step_window(wider=-1)

    def window_wider(self) -> None:
        self.study.step_window(wider=1)

    def level_brighter(self) -> None:
        self.study.step_window(brighter=1)

    def level_darker(self) -> None:
        self.study.step_window(brighter=-1)

    def invert_all(self) -> None:
        self.study.buttons["invert"].click()

    def zoom_in_all(self) -> None:
        self.study.buttons["zoom_in"].click()

    def zoom_out_all(self) -> None:
        self.study.buttons["zoom_out"].click()

    def fit_all(self) -> None:
        self.study.buttons["fit"].click()

    def toggle_magnifier(self) -> None:
        self.study.set_magnifier(not self.study.magnifier)
        self.say("Magnifier on: the loupe follows the mouse (F9 turns it off)." if self.study.magnifier
                 else "Magnifier off.")

    def cycle_single_view(self) -> None:
        i = self.study.cycle_single_view()
        if i is not None and i < len(self.study.views):
            self.say(f"One view: {self.study.views[i].label()} (F8: next view).")
        else:
            self.say("All views.")

    def toggle_image_fullscreen(self) -> None:
        """F11: the images alone, full screen; F11 or Esc gives the worklist and report back."""
        on = not self._image_fullscreen
        self._image_fullscreen = on
        self.worklist.setVisible(not on)
        self.report.setVisible(not on)
        self.escape_shortcut.setEnabled(on)
        if on:
            self._was_maximized = self.isMaximized()
            self.showFullScreen()
        elif getattr(self, "_was_maximized", False):
            self.showMaximized()
        else:
            self.showNormal()

    # -- text size and layout, remembered (QSettings) -------------------------------------------
    def _apply_text_size(self) -> None:
        self.setStyleSheet(STYLE + tools.text_size_style(self.text_px))

    def set_text_px(self, px: int) -> None:
        self.text_px = tools.clamp_text_px(px)
        self._apply_text_size()
        self.settings.setValue("text/size_px", self.text_px)
        self.say(f"Text size {self.text_px} px.")

    def text_bigger(self) -> None:
        self.set_text_px(self.text_px + 1)

    def text_smaller(self) -> None:
        self.set_text_px(self.text_px - 1)

    def text_reset(self) -> None:
        self.set_text_px(tools.DEFAULT_TEXT_PX)

    def save_layout(self) -> None:
        """Window geometry, splitters, worklist column widths (by title), sort and filter."""
        st = self.settings
        g = self.normalGeometry() if not self._image_fullscreen else self.geometry()
        st.setValue("window/rect", json.dumps([g.x(), g.y(), g.width(), g.height()]))
        st.setValue("window/maximized", "1" if self.isMaximized() else "0")
        st.setValue("window/splitter", self.splitter.saveState())
        st.setValue("window/lower", self.lower_splitter.saveState())
        header = self.worklist.table.horizontalHeader()
        if header is not None:
            widths = {c.title: header.sectionSize(i) for i, c in enumerate(viewmodels.COLUMNS)}
            st.setValue("worklist/widths", json.dumps(widths))
        st.setValue("worklist/sort", viewmodels.COLUMNS[self.worklist_vm.sort_column].title)
        st.setValue("worklist/descending", "1" if self.worklist_vm.descending else "0")
        st.setValue("worklist/filter", self.worklist_vm.state_filter)
        st.sync()

    def restore_layout(self) -> None:
        """Put back what :meth:`save_layout` kept; anything missing or unknown keeps its default."""
        st = self.settings
        try:
            x, y, width, height = (int(v) for v in json.loads(str(st.value("window/rect", "") or "null")))
        except (TypeError, ValueError):
            pass
        else:
            if width >= 400 and height >= 300:
                self.setGeometry(x, y, width, height)
                self._restore_geometry: tuple[int, int, int, int] | None = (x, y, width, height)  # again when shown
        if str(st.value("window/maximized", "0")) == "1":
            self.setWindowState(self.windowState() | Qt.WindowState.WindowMaximized)
        for key, restore in (("window/splitter", self.splitter.restoreState),
                             ("window/lower", self.lower_splitter.restoreState)):
            value = st.value(key)
            if isinstance(value, QByteArray) and not value.isEmpty():
                restore(value)
        header = self.worklist.table.horizontalHeader()
        try:
            widths = json.loads(str(st.value("worklist/widths", "") or "{}"))
        except ValueError:
            widths = {}
        self._widths_restored = bool(widths)
        if header is not None and isinstance(widths, dict):
            for i, c in enumerate(viewmodels.COLUMNS):
                w = widths.get(c.title)
                if isinstance(w, int) and 20 <= w <= 2000:
                    header.resizeSection(i, w)
        titles = [c.title for c in viewmodels.COLUMNS]
        sort = str(st.value("worklist/sort", "") or "")
        if sort in titles and viewmodels.COLUMNS[titles.index(sort)].key:
            self.worklist_vm.sort_column = titles.index(sort)
            self.worklist_vm.descending = str(st.value("worklist/descending", "1")) == "1"
            if header is not None:
                header.setSortIndicator(self.worklist_vm.sort_column, Qt.SortOrder.DescendingOrder
                                        if self.worklist_vm.descending else Qt.SortOrder.AscendingOrder)
        state_filter = str(st.value("worklist/filter", "") or "")
        if state_filter in viewmodels.STATE_FILTERS and state_filter != self.worklist_vm.state_filter:
            self.worklist.state.blockSignals(True)
            self.worklist.state.setCurrentText(state_filter)
            self.worklist.state.blockSignals(False)
            self.worklist_vm.state_filter = state_filter

    def showEvent(self, event: QShowEvent | None) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        geometry = getattr(self, "_restore_geometry", None)
        if geometry is not None:
            self._restore_geometry = None
            QTimer.singleShot(0, lambda: self.setGeometry(*geometry))  # after the platform placed it

    def closeEvent(self, event: QCloseEvent | None) -> None:  # noqa: N802
        self.save_layout()
        self.timer.stop()
        self.heartbeat.stop()
        vm = self.review
        if vm is not None and vm.holds_claim and not vm.is_final:
            if vm.edited and not self.confirm("Quit?", "You have unsigned changes. Quit and discard them?"):
                if event is not None:
                    event.ignore()
                return
            try:
                vm.release()
            except Exception:  # the database may be gone; the claim then simply expires
                log.warning("could not release draft %s on exit", vm.detail.draft_id, exc_info=True)
        self.tasks.wait(10000)
        app = QApplication.instance()
        if app is not None:
            app.removeEventFilter(self)
        super().closeEvent(event)
