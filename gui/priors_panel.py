"""The prior panel: the patient's most recent prior chest radiograph beside the current views,
its report text under it (next to the draft), dated and marked read-only; or "No prior chest
radiographs found". Window/level, invert, zoom and pan are linked both ways with the current
views (:func:`gui.prior_model.linked_window`); Ctrl+P shows or hides the panel.
"""

from __future__ import annotations

from dataclasses import replace

from PyQt6.QtCore import Qt
from PyQt6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from gui import prior_model
from gui.widgets import ImageView, StudyViewer

HEADER_STYLE = ("background: #3a2a00; color: #ffd60a; font-weight: bold; padding: 4px 8px; "
                "border: 1px solid #8a6d00;")
MESSAGE_STYLE = "color: #c8ccd2; background: #111; font-size: 15px; padding: 12px;"


class PriorPanel(QWidget):
    """The prior's views (read-only, linked to the current ones) and its report text.

    Parameters
    ----------
    parent:
        The Qt parent widget.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model: prior_model.PriorModel | None = None
        self.views: list[ImageView] = []
        self.current: StudyViewer | None = None
        self._syncing = False
        self.hidden_by_user = False  # Ctrl+P hid it: it stays hidden from study to study
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 4, 0, 0)
        lay.setSpacing(4)
        self.header = QLabel("No prior shown", self)
        self.header.setObjectName("prior_header")
        self.header.setStyleSheet(HEADER_STYLE)
        self.header.setWordWrap(True)
        self.header.setMinimumWidth(120)
        self.header.setToolTip("The prior study is read-only: it cannot be edited or signed here. "
                               "Window/level and zoom follow the current views (Ctrl+P hides it).")
        lay.addWidget(self.header)
        self.split = QSplitter(Qt.Orientation.Vertical, self)
        images = QWidget(self.split)
        self.row = QHBoxLayout(images)
        self.row.setContentsMargins(0, 0, 0, 0)
        self.row.setSpacing(4)
        self.message = QLabel(prior_model.NO_PRIOR, images)
        self.message.setObjectName("prior_message")
        self.message.setWordWrap(True)
        self.message.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.message.setStyleSheet(MESSAGE_STYLE)
        self.row.addWidget(self.message, 1)
        box = QWidget(self.split)
        blay = QVBoxLayout(box)
        blay.setContentsMargins(0, 0, 0, 0)
        self.report_title = QLabel("", box)
        self.report_title.setWordWrap(True)
        self.report_title.setObjectName("prior_report_title")
        blay.addWidget(self.report_title)
        self.report = QPlainTextEdit(box)
        self.report.setObjectName("prior_report")
        self.report.setReadOnly(True)
        self.report.setPlaceholderText("The prior's report appears here.")
        blay.addWidget(self.report, 1)
        self.split.addWidget(images)
        self.split.addWidget(box)
        self.split.setSizes([420, 180])
        lay.addWidget(self.split, 1)

    # -- content ------------------------------------------------------------------------------
    def show_prior(self, model: prior_model.PriorModel | None) -> None:
        self.model = model
        pictures = model.pictures if model is not None else []
        while len(self.views) > len(pictures):
            v = self.views.pop()
            self.row.removeWidget(v)
            v.deleteLater()
        while len(self.views) < len(pictures):
            v = ImageView(self)
            v.setMinimumSize(100, 100)  # beside the current views, the prior gives way first
            v.setToolTip("Prior view (read-only). Window/level and zoom are linked with the current views.")
            v.changed.connect(lambda v=v: self._from_prior(v))
            self.views.append(v)
            self.row.addWidget(v, 1)
        for v, pic in zip(self.views, pictures, strict=True):
            v.set_picture(pic, ("prior · read-only", None))
        if model is None:
            self.header.setText("No prior shown")
            self.message.setText("")
        else:
            self.header.setText(model.header())
            self.message.setText(model.message() or ("; ".join(model.errors) if not pictures else ""))
        self.message.setVisible(not pictures)
        self.report_title.setText(model.report_title() if model is not None else "")
        self.report.setPlainText(model.report_text() if model is not None else "")
        self.report.setVisible(bool(model is not None and model.found))
        self._place(model)
        self._from_current()

    def _place(self, model: prior_model.PriorModel | None) -> None:
        """A found prior gets half the image area; "none found" / "unavailable" a narrow strip that
        says so; a draft made with priors off (or no draft) no panel at all."""
        shown = model is not None and model.detail.outcome != "off"
        self.setVisible(shown and not self.hidden_by_user)
        splitter = self.parentWidget()
        if shown and isinstance(splitter, QSplitter) and splitter.indexOf(self) == 1:
            total = sum(splitter.sizes()) or 1000
            side = total // 2 if model is not None and model.found else min(280, total // 3)
            splitter.setSizes([total - side, side])

    def toggle(self) -> None:
        """Show or hide the panel (Ctrl+P); remembered while the window is open."""
        self.hidden_by_user = self.isVisible()
        self.setVisible(not self.hidden_by_user)
        if not self.hidden_by_user:
            self._place(self.model)

    def header_text(self) -> str:
        return self.header.text()

    def labels(self) -> list[str]:
        return [v.label() for v in self.views]

    # -- linking ------------------------------------------------------------------------------
    def link(self, current: StudyViewer) -> None:
        """Follow ``current``'s views (and let them follow ours); views it adds later too."""
        self.current = current
        # its mouse hint may be clipped, so that the current and the prior views share the width
        current.hint.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        current.all_painted.connect(self._connect_current)
        self._connect_current()

    def _connect_current(self) -> None:
        if self.current is None:
            return
        for v in self.current.views:
            if not v.property("prior_linked"):
                v.setProperty("prior_linked", True)
                v.changed.connect(lambda v=v: self._mirror(v, self.views))

    def _from_current(self) -> None:
        if self.current is not None and self.current.views:
            self._mirror(self.current.views[0], self.views)

    def _from_prior(self, source: ImageView) -> None:
        if self.current is not None:
            self._mirror(source, [*self.current.views, *(v for v in self.views if v is not source)])

    def _mirror(self, source: ImageView, targets: list[ImageView]) -> None:
        if self._syncing or source.state is None:
            return
        self._syncing = True
        try:
            for t in targets:
                if t is source or t.state is None:
                    continue
                t.state.window = prior_model.linked_window(source.state, t.state.picture)
                t.state.invert = source.state.invert
                t.transform = replace(t.transform, zoom=source.transform.zoom, pan=source.transform.pan)
                t._rerender()
                t.update()
        finally:
            self._syncing = False
