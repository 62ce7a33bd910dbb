"""The reviewer's small Qt pieces around the fast flow: the sign confirmation with its
once-per-session opt-out, the key-help dialog, and where the layout is remembered (QSettings).
"""

from __future__ import annotations

import html

from PyQt6.QtCore import QSettings, Qt
from PyQt6.QtGui import QKeySequence, QShortcut
from PyQt6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QLabel,
    QMessageBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from gui import keys

#: the opt-out offered when an unchanged AI draft is signed (it lasts until the reviewer quits)
DONT_ASK_TEXT = "&Don't ask again for unchanged drafts this session"

DEFAULT_TEXT_PX = 14
MIN_TEXT_PX, MAX_TEXT_PX = 10, 28


def open_settings() -> QSettings:
    """Where the reviewer keeps its layout and text size: an INI file in the user's scope
    (``~/.config/cxrnode/reviewer.ini``; tests point ``QSettings.setPath`` elsewhere)."""
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, "cxrnode", "reviewer")


def clamp_text_px(px: int) -> int:
    return max(MIN_TEXT_PX, min(MAX_TEXT_PX, int(px)))


def text_size_style(px: int) -> str:
    """The style-sheet rules that set the report's and the worklist's text size."""
    small = max(MIN_TEXT_PX - 1, px - 2)
    return (f"\nQPlainTextEdit, QTextBrowser {{ font-size: {px}px; }}"
            f"\nQLabel#indication, QLabel#patient, QLabel#signing_for {{ font-size: {px}px; }}"
            f"\nQTableView {{ font-size: {px - 1}px; }}"
            f"\nQTableWidget#probabilities {{ font-size: {small}px; }}")


def sign_question(parent: QWidget, title: str, text: str, offer_session: bool) -> tuple[bool, bool]:
    """Ask before signing. Enter signs (the patient is named in ``text``), Esc does not; for an
    unchanged draft a check box offers not to ask again this session. Returns (sign, don't ask)."""
    box = QMessageBox(QMessageBox.Icon.Question, title, text, QMessageBox.StandardButton.NoButton, parent)
    sign = box.addButton("&Sign", QMessageBox.ButtonRole.AcceptRole)
    cancel = box.addButton("Cancel", QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(sign)
    box.setEscapeButton(cancel)
    check: QCheckBox | None = None
    if offer_session:
        check = QCheckBox(DONT_ASK_TEXT, box)
        box.setCheckBox(check)
    box.setObjectName("sign_question")
    box.exec()
    answer = box.clickedButton() is sign, bool(check is not None and check.isChecked() and box.clickedButton() is sign)
    box.deleteLater()
    return answer


class KeyHelp(QDialog):
    """Every shortcut of the window (F1 or ?): the table of :mod:`gui.keys`, then any other
    shortcut the window holds (its ``whatsThis`` as the description)."""

    def __init__(self, window: QWidget) -> None:
        super().__init__(window)
        self.setWindowTitle("Keys of the reviewer")
        self.setObjectName("key_help")
        lay = QVBoxLayout(self)
        intro = QLabel("Window-wide keys work wherever the focus is, the report editor included: no image needs "
                       "to be clicked first.", self)
        intro.setWordWrap(True)
        lay.addWidget(intro)
        rows: list[tuple[str, str, str]] = [(k.group, k.shown(), k.text) for g in keys.GROUPS for k in keys.KEYS
                                            if k.group == g]
        known = {QKeySequence(s).toString() for k in keys.KEYS for s in k.keys + k.aliases}
        for sc in window.findChildren(QShortcut):
            seq = sc.key().toString()
            if seq and seq not in known:
                rows.append(("Other", seq, sc.whatsThis() or "(no description)"))
                known.add(seq)
        self.table = QTableWidget(len(rows), 3, self)
        self.table.setHorizontalHeaderLabels(["", "Keys", "Action"])
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QTableWidget.SelectionMode.NoSelection)
        vh = self.table.verticalHeader()
        if vh is not None:
            vh.setVisible(False)
        for i, row in enumerate(rows):
            for j, text in enumerate(row):
                self.table.setItem(i, j, QTableWidgetItem(text))
        hh = self.table.horizontalHeader()
        if hh is not None:
            hh.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
            hh.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
            hh.setStretchLastSection(True)
        lay.addWidget(self.table, 1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.resize(720, 640)
        self.setWindowModality(Qt.WindowModality.NonModal)

    def shown_keys(self) -> list[str]:
        out = []
        for i in range(self.table.rowCount()):
            item = self.table.item(i, 1)
            if item is not None:
                out.append(item.text())
        return out

    def as_html(self) -> str:  # pragma: no cover - convenience for copying into docs
        return "".join(f"<tr><td>{html.escape(self.table.item(i, 1).text())}</td>"  # type: ignore[union-attr]
                       f"<td>{html.escape(self.table.item(i, 2).text())}</td></tr>"  # type: ignore[union-attr]
                       for i in range(self.table.rowCount()))
