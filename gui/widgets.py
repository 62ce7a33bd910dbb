"""Thin PyQt6 widgets of the reviewer: an image view with window/level, zoom and pan; the row of
views of a study; the report editor with its highlighter; the worklist table; a task runner.

Logic lives in :mod:`gui.imaging` and :mod:`gui.viewmodels`; these classes render and forward.
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from PyQt6.QtCore import (
    QAbstractTableModel,
    QEvent,
    QModelIndex,
    QObject,
    QPointF,
    QRectF,
    QRunnable,
    Qt,
    QThreadPool,
    pyqtSignal,
)
from PyQt6.QtGui import (
    QColor,
    QFont,
    QHelpEvent,
    QImage,
    QKeySequence,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QResizeEvent,
    QShortcut,
    QSyntaxHighlighter,
    QTextCharFormat,
    QWheelEvent,
)
from PyQt6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QSizePolicy,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from gui import highlight, imaging, presets, viewmodels
from plugin.review.service import (
    STATE_FAILED,
    STATE_IN_REVIEW,
    STATE_NEW,
    STATE_REJECTED,
    STATE_SIGNED,
    WorklistRow,
)

# -- running blocking work off the GUI thread --------------------------------------------------


class _TaskSignals(QObject):
    done = pyqtSignal(object)
    failed = pyqtSignal(object, str)
    progress = pyqtSignal(int, int, str)


class Task(QRunnable):
    """Runs ``fn(progress)`` in the thread pool; results come back as signals on the GUI thread."""

    def __init__(self, fn: Callable[[Callable[[int, int, str], None]], Any]) -> None:
        super().__init__()
        self.fn = fn
        self.signals = _TaskSignals()
        self.setAutoDelete(False)

    def run(self) -> None:
        try:
            result = self.fn(lambda done, total, what: self.signals.progress.emit(done, total, what))
        except BaseException as exc:  # reported to the GUI thread, never lost
            self.signals.failed.emit(exc, traceback.format_exc())
        else:
            self.signals.done.emit(result)


class TaskRunner(QObject):
    """Keeps tasks alive until they finish and counts how many are running."""

    busy_changed = pyqtSignal(bool)
    progress = pyqtSignal(int, int, str)

    def __init__(self, parent: QObject | None = None, threads: int = 2) -> None:
        super().__init__(parent)
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(threads)
        self.running: set[Task] = set()

    def start(
        self,
        fn: Callable[[Callable[[int, int, str], None]], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException, str], None],
    ) -> Task:
        task = Task(fn)
        self.running.add(task)

        def finish() -> None:
            self.running.discard(task)
            if not self.running:
                self.busy_changed.emit(False)

        def done(result: Any) -> None:
            finish()
            on_done(result)

        def failed(exc: BaseException, tb: str) -> None:
            finish()
            on_error(exc, tb)

        task.signals.done.connect(done)
        task.signals.failed.connect(failed)
        task.signals.progress.connect(self.progress.emit)
        if len(self.running) == 1:
            self.busy_changed.emit(True)
        self.pool.start(task)
        return task

    def wait(self, ms: int = 30000) -> bool:
        return bool(self.pool.waitForDone(ms))


# -- one image ------------------------------------------------------------------------------------


def qimage_from(gray: np.ndarray) -> QImage:
    """A QImage sharing an 8-bit grayscale array (the caller keeps the array alive)."""
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = gray.shape
    return QImage(gray.data, w, h, w, QImage.Format.Format_Grayscale8)  # type: ignore[call-overload]


class ImageView(QWidget):
    """One radiograph: left-drag window/level, right- (or Ctrl-) drag pan, wheel zoom at the
    cursor, double-click fit. Labelled with its view (PA, AP, LATERAL) in the corner and, under
    it, the input gate's verdict on the view (``gate``: text and passed / failed / not checked)."""

    changed = pyqtSignal()
    painted = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state: imaging.ViewState | None = None
        self.transform = imaging.ViewTransform((1, 1), (1, 1))
        self._gray: np.ndarray | None = None
        self._qimage: QImage | None = None
        self._drag: tuple[str, QPointF] | None = None
        self._fresh = False
        self.gate: tuple[str, bool | None] = ("", None)
        # the magnifier (F9): a loupe over the image that follows the mouse (centred until it moves)
        self.loupe = False
        self.loupe_zoom = 3.0  # relative to the image as shown
        self.loupe_size = 260  # screen pixels
        self._mouse: QPointF | None = None
        self._boxes: list[QRectF] = []
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setFocusPolicy(Qt.FocusPolicy.ClickFocus)
        self.setMouseTracking(False)
        self.setToolTip("Drag: window/level · Right-drag or Ctrl-drag: pan · Wheel: zoom · Double-click: fit")

    # -- content ----------------------------------------------------------------------------
    def set_picture(self, picture: imaging.Picture | None, gate: tuple[str, bool | None] = ("", None)) -> None:
        self.gate = gate
        self.state = imaging.ViewState(picture) if picture is not None else None
        if picture is not None:
            self.transform = imaging.ViewTransform((picture.columns, picture.rows), (self.width(), self.height()))
        self._rerender()
        self._fresh = True
        self.update()

    def _rerender(self) -> None:
        if self.state is None:
            self._gray, self._qimage = None, None
            return
        self._gray = self.state.image()
        self._qimage = qimage_from(self._gray)

    def label(self) -> str:
        return self.state.picture.view if self.state else ""

    # -- actions ----------------------------------------------------------------------------
    def toggle_invert(self) -> None:
        if self.state:
            self.state.toggle_invert()
            self._rerender()
            self.update()
            self.changed.emit()

    def reset(self) -> None:
        if self.state:
            self.state.reset()
            self.transform = self.transform.fitted()
            self._rerender()
            self.update()
            self.changed.emit()

    def fit(self) -> None:
        self.transform = self.transform.fitted()
        self.update()
        self.changed.emit()

    def one_to_one(self) -> None:
        self.transform = self.transform.one_to_one()
        self.update()
        self.changed.emit()

    def zoom_by(self, factor: float) -> None:
        self.transform = self.transform.zoomed_at(self.width() / 2, self.height() / 2, factor)
        self.update()
        self.changed.emit()

    def drag_window(self, dx: float, dy: float) -> None:
        if self.state:
            self.state.drag(dx, dy)
            self._rerender()
            self.update()
            self.changed.emit()

    def set_window(self, window: imaging.WindowLevel | None, preset: str = "") -> None:
        """Set the window by key: a preset's, or None for the image's own window as sent."""
        if self.state:
            self.state.set_window(window, preset)
            self._rerender()
            self.update()
            self.changed.emit()

    def apply_preset(self, name: str) -> None:
        """A chest window preset (:mod:`gui.presets`), relative to this image's VOI range."""
        if self.state:
            self.set_window(presets.preset_window(self.state.picture, name, self.state.invert), name)

    def step_window(self, wider: int = 0, brighter: int = 0) -> None:
        """Window/level by key steps (:func:`gui.presets.stepped`)."""
        if self.state:
            s = self.state
            self.set_window(presets.stepped(s.effective_window, s.picture, s.invert, wider, brighter))

    # -- the magnifier ------------------------------------------------------------------------
    def set_loupe(self, on: bool) -> None:
        self.loupe = on
        self.setMouseTracking(on)
        self.update()

    def loupe_centre(self) -> QPointF:
        """Where the loupe is: under the mouse, or at the middle of the view before it moved."""
        return self._mouse if self._mouse is not None else QPointF(self.width() / 2.0, self.height() / 2.0)

    def loupe_rect(self) -> QRectF:
        c, half = self.loupe_centre(), self.loupe_size / 2.0
        return QRectF(c.x() - half, c.y() - half, self.loupe_size, self.loupe_size)

    def _paint_loupe(self, p: QPainter) -> None:
        """The image around the loupe's centre, ``loupe_zoom`` times larger, in a framed square."""
        if self._qimage is None or self.state is None:
            return
        target = self.loupe_rect()
        c = self.loupe_centre()
        ix, iy = self.transform.to_image(c.x(), c.y())
        scale = self.transform.scale * self.loupe_zoom
        half = self.loupe_size / 2.0 / scale  # image pixels either side of the centre
        source = QRectF(ix - half, iy - half, 2 * half, 2 * half)
        p.save()
        p.fillRect(target, QColor(0, 0, 0))
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, scale < 2.0)
        p.drawImage(target, self._qimage, source)
        p.setPen(QPen(QColor(255, 214, 10), 2))
        p.drawRect(target)
        p.restore()

    # -- events -----------------------------------------------------------------------------
    def resizeEvent(self, event: QResizeEvent | None) -> None:  # noqa: N802 (Qt name)
        self.transform = self.transform.resized((self.width(), self.height()))
        super().resizeEvent(event)

    def mousePressEvent(self, event: QMouseEvent | None) -> None:  # noqa: N802
        if event is None:
            return
        pan = event.button() in (Qt.MouseButton.RightButton, Qt.MouseButton.MiddleButton) or (
            event.button() == Qt.MouseButton.LeftButton and event.modifiers() & Qt.KeyboardModifier.ControlModifier
        )
        self._drag = ("pan" if pan else "window", event.position())
        self.setCursor(Qt.CursorShape.ClosedHandCursor if pan else Qt.CursorShape.SizeAllCursor)

    def mouseMoveEvent(self, event: QMouseEvent | None) -> None:  # noqa: N802
        if event is not None and self.loupe:
            self._mouse = event.position()
            self.update()
        if event is None or self._drag is None:
            return
        mode, last = self._drag
        pos = event.position()
        dx, dy = pos.x() - last.x(), pos.y() - last.y()
        self._drag = (mode, pos)
        if mode == "pan":
            self.transform = self.transform.panned(dx, dy)
            self.update()
            self.changed.emit()
        else:
            self.drag_window(dx, dy)

    def mouseReleaseEvent(self, event: QMouseEvent | None) -> None:  # noqa: N802
        self._drag = None
        self.unsetCursor()

    def leaveEvent(self, event: QEvent | None) -> None:  # noqa: N802
        if self.loupe:
            self._mouse = None
            self.update()
        super().leaveEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent | None) -> None:  # noqa: N802
        self.fit()

    def wheelEvent(self, event: QWheelEvent | None) -> None:  # noqa: N802
        if event is None:
            return
        steps = event.angleDelta().y() / 120.0
        if steps:
            p = event.position()
            self.transform = self.transform.zoomed_at(p.x(), p.y(), 1.2**steps)
            self.update()
            self.changed.emit()

    def paintEvent(self, event: QPaintEvent | None) -> None:  # noqa: N802
        self._boxes = []
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(0, 0, 0))
        if self._qimage is not None and self.state is not None:
            t = self.transform
            ox, oy = t.origin()
            target = QRectF(ox, oy, self.state.picture.columns * t.scale, self.state.picture.rows * t.scale)
            p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, t.scale < 2.0)
            p.drawImage(target, self._qimage)
            if self.loupe:
                self._paint_loupe(p)
            self._overlay(p)
        else:
            p.setPen(QColor(120, 120, 120))
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "No image")
        p.end()
        if self._fresh and self.state is not None:
            self._fresh = False
            self.painted.emit()

    def _gate_overlay(self, p: QPainter, top: float) -> None:
        """The input gate's verdict under the view label: green passed, red not used, grey unknown."""
        text, passed = self.gate
        if not text:
            return
        f = QFont(self.font())
        f.setPointSizeF(max(9.5, self.font().pointSizeF() * 1.05))
        f.setBold(passed is False)
        p.setFont(f)
        metrics = p.fontMetrics()
        width = min(self.width() - 20, metrics.horizontalAdvance(text) + 14)
        flags = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter | Qt.TextFlag.TextWordWrap
        bound = metrics.boundingRect(0, 0, int(width) - 14, 400, int(flags.value), text)
        box = QRectF(10, top, width, bound.height() + 8)
        bg = {True: QColor(17, 99, 41, 200), False: QColor(160, 20, 30, 225), None: QColor(60, 60, 60, 190)}[passed]
        p.fillRect(box, bg)
        p.setPen(QColor(255, 255, 255))
        p.drawText(box.adjusted(7, 4, -7, -4), flags, text)

    def _overlay(self, p: QPainter) -> None:
        assert self.state is not None
        margin = 10
        f = QFont(self.font())
        f.setPointSizeF(max(14.0, self.font().pointSizeF() * 1.6))
        f.setBold(True)
        p.setFont(f)
        label = self.state.picture.view
        metrics = p.fontMetrics()
        box = QRectF(margin, margin, metrics.horizontalAdvance(label) + 16, metrics.height() + 6)
        p.fillRect(box, QColor(0, 0, 0, 170))
        p.setPen(QColor(255, 214, 10))
        p.drawText(box, Qt.AlignmentFlag.AlignCenter, label)
        self._gate_overlay(p, box.bottom() + 4)
        small = QFont(self.font())
        small.setPointSizeF(max(9.0, self.font().pointSizeF()))
        p.setFont(small)
        bottom = self.height() - margin
        self._backed_text(p, margin, bottom, self.window_text())
        zoom = f"{self.transform.zoom_percent()} %" + ("  LOUPE" if self.loupe else "")
        self._backed_text(p, self.width() - margin - p.fontMetrics().horizontalAdvance(zoom), bottom, zoom)

    def window_text(self) -> str:
        """The W/L overlay: ``LUNG  W 1234  L 567`` (the preset's name when one is in use)."""
        if self.state is None:
            return ""
        s = self.state
        return (f"{s.preset.upper()}  " if s.preset else "") + s.effective_window.label() + ("  INVERTED" if s.invert else "")

    def overlay_boxes(self) -> list[QRectF]:
        """Where the bottom overlays' dark backing boxes are (for tests and hit checks)."""
        return list(self._boxes)

    def _backed_text(self, p: QPainter, x: float, baseline: float, text: str) -> None:
        """Text readable on any part of a radiograph: light, on a dark backing box."""
        m = p.fontMetrics()
        box = QRectF(x - 4, baseline - m.ascent() - 3, m.horizontalAdvance(text) + 8, m.ascent() + m.descent() + 6)
        p.fillRect(box, QColor(0, 0, 0, 190))
        self._boxes.append(box)
        p.setPen(QColor(240, 240, 240))
        p.drawText(QPointF(x, baseline), text)


class StudyViewer(QWidget):
    """Every view of the study side by side, with Invert / Reset / Fit / 1:1 / zoom buttons."""

    all_painted = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.views: list[ImageView] = []
        self._waiting: set[int] = set()
        self.magnifier = False
        self.single: int | None = None  # the view shown alone (F8), None: all side by side
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(4)
        bar = QHBoxLayout()
        bar.setContentsMargins(6, 4, 6, 0)
        self.buttons: dict[str, QToolButton] = {}
        for key, text, tip, shortcut in (
            ("invert", "Invert", "Invert grey scale (I)", "I"),
            ("reset", "Reset", "Reset window/level, zoom and pan (R)", "R"),
            ("fit", "Fit", "Fit to window (F)", "F"),
            ("one", "1:1", "One image pixel per screen pixel (1)", "1"),
            ("zoom_in", "Zoom +", "Zoom in (+)", "+"),
            ("zoom_out", "Zoom −", "Zoom out (-)", "-"),
        ):
            b = QToolButton(self)
            b.setText(text)
            b.setToolTip(tip)
            b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
            bar.addWidget(b)
            self.buttons[key] = b
            sc = QShortcut(QKeySequence(shortcut), self)
            sc.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            sc.activated.connect(b.click)
        self.buttons["invert"].clicked.connect(lambda: self._each(ImageView.toggle_invert))
        self.buttons["reset"].clicked.connect(lambda: self._each(ImageView.reset))
        self.buttons["fit"].clicked.connect(lambda: self._each(ImageView.fit))
        self.buttons["one"].clicked.connect(lambda: self._each(ImageView.one_to_one))
        self.buttons["zoom_in"].clicked.connect(lambda: self._each(lambda v: v.zoom_by(1.25)))
        self.buttons["zoom_out"].clicked.connect(lambda: self._each(lambda v: v.zoom_by(0.8)))
        bar.addStretch(1)
        self.hint = QLabel("Drag: window/level · Right-drag: pan · Wheel: zoom · Double-click: fit", self)
        self.hint.setStyleSheet("color: #8a8f98;")
        bar.addWidget(self.hint)
        outer.addLayout(bar)
        self.row = QHBoxLayout()
        self.row.setContentsMargins(4, 0, 4, 4)
        self.row.setSpacing(4)
        outer.addLayout(self.row, 1)
        self.placeholder = QLabel("Choose a study in the worklist", self)
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setStyleSheet("color: #8a8f98; background: #111; font-size: 15px;")
        self.row.addWidget(self.placeholder, 1)

    def _each(self, fn: Callable[[ImageView], None]) -> None:
        for v in self.views:
            fn(v)

    # -- keyboard tools over every view (window-wide keys, gui.keys) -------------------------------
    def apply_preset(self, name: str) -> None:
        self._each(lambda v: v.apply_preset(name))

    def window_as_sent(self) -> None:
        self._each(lambda v: v.set_window(None))

    def step_window(self, wider: int = 0, brighter: int = 0) -> None:
        self._each(lambda v: v.step_window(wider, brighter))

    def set_magnifier(self, on: bool) -> None:
        self.magnifier = on
        self._each(lambda v: v.set_loupe(on))

    def cycle_single_view(self) -> int | None:
        """One view at a time: all -> the first -> the next ... -> all again. Returns the index of
        the view shown alone, None when all are shown."""
        n = len(self.views)
        if n == 0:
            self.single = None
        elif self.single is None:
            self.single = 0
        else:
            self.single = self.single + 1 if self.single + 1 < n else None
        self._show_single()
        return self.single

    def _show_single(self) -> None:
        if self.single is not None and self.single >= len(self.views):
            self.single = None
        for i, v in enumerate(self.views):
            v.setVisible(self.single is None or i == self.single)

    def set_pictures(self, pictures: list[imaging.Picture],
                     gates: list[tuple[str, bool | None]] | None = None) -> None:
        """Show the pictures side by side (reusing widgets), each with its input-gate line;
        ``all_painted`` once all are drawn."""
        while len(self.views) > len(pictures):
            v = self.views.pop()
            self.row.removeWidget(v)
            v.deleteLater()
        while len(self.views) < len(pictures):
            v = ImageView(self)
            i = len(self.views)
            v.painted.connect(lambda i=i: self._painted(i))
            self.views.append(v)
            self.row.addWidget(v, 1)
        self.placeholder.setVisible(not pictures)
        self._waiting = set(range(len(pictures)))
        gates = gates if gates is not None and len(gates) == len(pictures) else [("", None)] * len(pictures)
        for v, pic, gate in zip(self.views, pictures, gates, strict=True):
            v.set_picture(pic, gate)
            v.set_loupe(self.magnifier)
        self._show_single()  # a hidden view is never painted: only wait for the shown ones
        self._waiting = {i for i, v in enumerate(self.views) if not v.isHidden()}
        if not pictures:
            self.all_painted.emit()

    def _painted(self, i: int) -> None:
        if i in self._waiting:
            self._waiting.discard(i)
            if not self._waiting:
                self.all_painted.emit()

    def labels(self) -> list[str]:
        return [v.label() for v in self.views]

    def gate_texts(self) -> list[str]:
        return [v.gate[0] for v in self.views]


# -- the report editor --------------------------------------------------------------------------


def _mark_format(background: str, underline: str, style: QTextCharFormat.UnderlineStyle) -> QTextCharFormat:
    fmt = QTextCharFormat()
    if background:
        fmt.setBackground(QColor(background))
    fmt.setUnderlineStyle(style)
    fmt.setUnderlineColor(QColor(underline))
    return fmt


#: how each kind of mark looks (gui.highlight), (background, underline): an uncertain call is a
#: whole sentence in amber, an unsure word orange with a wavy underline; a sentence added by the
#: classifier is only underlined in blue (where it came from, not a highlight: no background)
MARK_COLOURS = {
    highlight.KIND_CALL: ("#ffe082", "#c87800"),
    highlight.KIND_WORD: ("#ffc58a", "#d1242f"),
    highlight.KIND_GROUNDED: ("", "#0969da"),
    highlight.KIND_DEID: ("#ff8182", "#82071e"),
}


class UncertainWords(QSyntaxHighlighter):
    """Marks what the policy says is worth a second look (``spans(text)`` gives the spans; each
    kind of :class:`gui.highlight.Span` has its own format, see :data:`MARK_COLOURS`)."""

    def __init__(self, editor: QPlainTextEdit, spans: Callable[[str], list[viewmodels.Span]]) -> None:
        super().__init__(editor.document())
        self.editor = editor
        self.spans = spans
        self.enabled = True
        styles = {
            highlight.KIND_CALL: QTextCharFormat.UnderlineStyle.NoUnderline,
            highlight.KIND_WORD: QTextCharFormat.UnderlineStyle.WaveUnderline,
            highlight.KIND_GROUNDED: QTextCharFormat.UnderlineStyle.DotLine,
            highlight.KIND_DEID: QTextCharFormat.UnderlineStyle.SingleUnderline,
        }
        self.formats = {k: _mark_format(bg, ul, styles[k]) for k, (bg, ul) in MARK_COLOURS.items()}
        self.formats[highlight.KIND_DEID].setFontStrikeOut(True)  # not report text
        self.fmt = self.formats[highlight.KIND_CALL]
        self._cache: tuple[str, list[viewmodels.Span]] = ("\x00", [])

    def refresh(self, enabled: bool) -> None:
        """Recompute the spans (the draft changed) and repaint."""
        self.enabled = enabled
        self._cache = ("\x00", [])
        self.rehighlight()

    def current_spans(self) -> list[viewmodels.Span]:
        text = self.editor.toPlainText()
        if self._cache[0] != text:
            self._cache = (text, self.spans(text))
        return self._cache[1]

    def shown_spans(self) -> list[viewmodels.Span]:
        """The marks drawn now: all of them, or with Highlight off only the ``xxxx`` placeholders
        (those are never shown as report text)."""
        spans = self.current_spans()
        return spans if self.enabled else [s for s in spans if s.kind == highlight.KIND_DEID]

    def span_at(self, position: int) -> viewmodels.Span | None:
        """The mark under a character position (innermost: a word inside a sentence), or None."""
        inside = [s for s in self.shown_spans() if s.start <= position < s.end]
        return min(inside, key=lambda s: s.end - s.start) if inside else None

    def highlightBlock(self, text: str | None) -> None:  # noqa: N802 (Qt name)
        if not text:
            return
        start = self.currentBlock().position()
        end = start + len(text)
        # provenance first, then uncertain calls over it, then the words, placeholders on top
        order = {highlight.KIND_GROUNDED: 0, highlight.KIND_CALL: 1, highlight.KIND_WORD: 2, highlight.KIND_DEID: 4}
        for s in sorted(self.shown_spans(), key=lambda s: (order.get(s.kind, 3), -(s.end - s.start))):
            if s.end > start and s.start < end:
                a = max(s.start, start) - start
                self.setFormat(a, min(s.end, end) - start - a, self.formats.get(s.kind, self.fmt))


class MarkedEditor(QPlainTextEdit):
    """The report editor: hovering a mark shows why it is marked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.marks: UncertainWords | None = None

    def event(self, e: QEvent | None) -> bool:
        if e is not None and e.type() == QEvent.Type.ToolTip and self.marks is not None and isinstance(e, QHelpEvent):
            cursor = self.cursorForPosition(self.viewport().mapFromGlobal(e.globalPos()))  # type: ignore[union-attr]
            span = self.marks.span_at(cursor.position())  # with Highlight off: only "xxxx" marks
            if span is not None and span.note:
                QToolTip.showText(e.globalPos(), span.note, self)
            else:
                QToolTip.hideText()
                e.ignore()
            return True
        return super().event(e)


def diff_html(parts: list[tuple[str, str]]) -> str:
    """Word diff as HTML: deletions struck through in red, insertions in green."""
    out = []
    for op, text in parts:
        t = highlight.DEID_PLACEHOLDER.sub(  # never shown as report text, here either
            lambda m: f'<span style="background:#ff8182;text-decoration:line-through">{m.group(0)}</span>',
            html.escape(text))
        if op == "-":
            out.append(f'<span style="background:#ffd7d5;color:#82071e;text-decoration:line-through">{t}</span>')
        elif op == "+":
            out.append(f'<span style="background:#ccffd8;color:#055d20">{t}</span>')
        else:
            out.append(t)
    return " ".join(out) or "<i>(empty)</i>"


# -- the worklist table -------------------------------------------------------------------------

STATE_COLOURS = {
    STATE_NEW: QColor(9, 105, 218),
    STATE_IN_REVIEW: QColor(154, 103, 0),
    STATE_SIGNED: QColor(26, 127, 55),
    STATE_REJECTED: QColor(110, 119, 129),
    STATE_FAILED: QColor(207, 34, 46),
}


GATE_COLOURS = {
    "withheld": QColor(130, 80, 223),
    "partial": QColor(154, 103, 0),
    "warned": QColor(207, 34, 46),
}


#: the Priority column: a critical draft in red, STAT and ED in warm colours
CRITICAL_COLOUR = QColor(207, 34, 46)
PRIORITY_COLOURS = {"STAT": QColor(207, 34, 46), "ED": QColor(188, 76, 0)}


class WorklistTable(QAbstractTableModel):
    """Qt face of :class:`gui.viewmodels.WorklistModel`; sorting asks for a refetch."""

    sort_requested = pyqtSignal()

    def __init__(self, vm: viewmodels.WorklistModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.vm = vm

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self.vm.rows)

    def columnCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(viewmodels.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole) -> Any:  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return viewmodels.COLUMNS[section].title
        return None

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self.vm.rows):
            return None
        row: WorklistRow = self.vm.rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return viewmodels.cell_text(row, index.column(), self.vm.user)
        if role == Qt.ItemDataRole.ToolTipRole:
            return viewmodels.row_tooltip(row)
        if role == Qt.ItemDataRole.ForegroundRole and viewmodels.COLUMNS[index.column()].title == "State":
            return STATE_COLOURS.get(row.state)
        if role == Qt.ItemDataRole.ForegroundRole and viewmodels.COLUMNS[index.column()].title == "AI draft":
            return GATE_COLOURS.get(row.input_outcome)
        if viewmodels.COLUMNS[index.column()].title == "Priority":
            if role == Qt.ItemDataRole.ForegroundRole:
                return CRITICAL_COLOUR if row.critical else PRIORITY_COLOURS.get(row.priority)
            if role == Qt.ItemDataRole.FontRole and (row.critical or row.priority in PRIORITY_COLOURS):
                f = QFont()
                f.setBold(True)
                return f
        if role == Qt.ItemDataRole.FontRole and row.state == STATE_NEW:
            f = QFont()
            f.setBold(True)
            return f
        if role == Qt.ItemDataRole.UserRole:
            return row.draft_id
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        if self.vm.sort_by(column, order == Qt.SortOrder.DescendingOrder):
            self.sort_requested.emit()

    def set_rows(self, rows: list[WorklistRow]) -> None:
        self.beginResetModel()
        self.vm.set_rows(rows)
        self.endResetModel()
