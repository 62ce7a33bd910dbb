"""The ⚠ line under the report's banner when the open draft is critical (the worklist's marker,
said where the radiologist reads): which rule of :mod:`plugin.review.critical` the AI draft
crossed and why. Hidden for every other draft, for a withheld one and once signed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PyQt6.QtCore import QObject, Qt
from PyQt6.QtWidgets import QBoxLayout, QLabel

from gui.viewmodels import CRITICAL_MARK
from plugin.review.critical import critical_findings

if TYPE_CHECKING:
    from gui.window import ReviewerWindow

NOTE = ("Reading-order aid from the research model's probabilities and the draft's words, not a "
        "diagnosis (README: critical drafts).")


class CriticalNotice(QObject):
    """Keeps a label under the report pane's banner in step with the open draft."""

    def __init__(self, window: ReviewerWindow) -> None:
        super().__init__(window)
        self.window = window
        report = window.report
        self.label = QLabel("", report)
        self.label.setObjectName("critical_notice")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.label.setStyleSheet("color: #cf222e; font-weight: bold;")
        self.label.setToolTip(NOTE)
        self.label.setVisible(False)
        lay = report.layout()
        if isinstance(lay, QBoxLayout):
            lay.insertWidget(lay.indexOf(report.banner) + 1, self.label)
        window.review_shown.connect(lambda _draft_id: self.update())
        window.signed.connect(lambda _draft_id: self.update())

    def text(self) -> str:
        """What the label says for the open draft ('' = nothing to say)."""
        vm = self.window.review
        if vm is None or vm.is_final or vm.detail.withheld:
            return ""
        d = vm.detail
        found = critical_findings({c.name: c.probability for c in d.observations}, d.findings, d.impression)
        if not found:
            return ""
        return f"{CRITICAL_MARK} Critical draft — " + "; ".join(f.describe() for f in found) + "."

    def update(self) -> None:
        text = self.text()
        self.label.setText(text)
        self.label.setVisible(bool(text))


__all__ = ["CriticalNotice"]
