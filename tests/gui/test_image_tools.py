"""Image tools from the keyboard in the real reviewer window (issue 17), with the focus in the
report editor (no image clicked first): chest window presets, window/level steps, magnifier,
one view at a time, images full screen, the W/L overlay on bright images, the key help.
Run by topic with ``-k preset``, ``-k magnifier``."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from PyQt6.QtCore import QPoint, Qt
from PyQt6.QtGui import QKeySequence, QShortcut
from support import synthetic

from gui import imaging, presets
from gui.keys import KEYS
from gui.widgets import ImageView
from gui.window import ReviewerWindow

WAIT = 30000


def open_first(qtbot, w: ReviewerWindow) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(lambda: not w._refreshing and not w.tasks.running, timeout=WAIT)
    i = next(i for i, r in enumerate(w.worklist_vm.rows) if r.patient_id == "CXR-10001")
    rect = w.worklist.table.visualRect(w.worklist.model.index(i, 0))
    with qtbot.waitSignal(w.review_shown, timeout=WAIT):
        qtbot.mouseClick(w.worklist.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: not w.tasks.running and w._opening is None, timeout=WAIT)
    assert w.report.findings.hasFocus() or w.focusWidget() is w.report.findings


def key(qtbot, w: ReviewerWindow, k: Qt.Key, mod: Qt.KeyboardModifier = Qt.KeyboardModifier.NoModifier) -> None:  # type: ignore[no-untyped-def]
    """A key pressed while the report editor has the focus."""
    qtbot.keyClick(w.report.findings, k, mod)


# -- presets without Qt -----------------------------------------------------------------------------

def picture(photometric: str = "MONOCHROME2", **attrs: object) -> imaging.Picture:
    px = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (64, 1))
    spec = synthetic.SyntheticStudy(key="preset", size=64, photometric=photometric, views=("PA",))
    ds: Dataset = synthetic.make_study(spec)[0]
    ds.PixelData = px.tobytes()
    ds.Rows = ds.Columns = 64
    ds.WindowCenter, ds.WindowWidth = 2048, 4000
    for k, v in attrs.items():
        setattr(ds, k, v)
    return imaging.picture_from_dataset(ds)


def shown_mean(pic: imaging.Picture, window: imaging.WindowLevel, invert: bool = False) -> float:
    return float(imaging.render(pic, window, invert).mean())


def test_preset_windows_are_relative_to_the_voi_range() -> None:
    m2 = picture()
    lung, medi, bone = (presets.preset_window(m2, n) for n in presets.NAMES)
    lo = m2.default_window.center - m2.default_window.width / 2
    assert lung == imaging.WindowLevel(lo + 0.45 * 4000, 0.80 * 4000)
    assert lung.center < bone.center < medi.center  # lung spreads the dark end, mediastinum the bright
    assert bone.width < lung.width  # bone: the narrowest, most contrast
    # the same look on MONOCHROME1 (high values shown dark) and with the user's invert
    m1 = picture("MONOCHROME1")
    for name in presets.NAMES:
        a = shown_mean(m2, presets.preset_window(m2, name))
        assert shown_mean(m1, presets.preset_window(m1, name)) == pytest.approx(a, abs=1.0)
        assert shown_mean(m2, presets.preset_window(m2, name, invert=True), invert=True) == pytest.approx(a, abs=1.0)
    # lung shows the image brighter than mediastinum does (the dark lungs opened up)
    assert shown_mean(m2, lung) > shown_mean(m2, medi)
    # an image with a Hounsfield scale gets CT's windows
    ct = picture(RescaleType="HU", RescaleSlope=1, RescaleIntercept=-1024)
    assert presets.preset_window(ct, presets.LUNG) == imaging.WindowLevel(-600, 1500)
    assert presets.has_hounsfield_scale(ct.header) and not presets.has_hounsfield_scale(m2.header)
    with pytest.raises(KeyError, match="expected one of lung, mediastinum, bone"):
        presets.preset_window(m2, "brain")


def test_preset_steps_brighter_and_narrower_whatever_the_photometric() -> None:
    for pic in (picture(), picture("MONOCHROME1")):
        w = pic.default_window
        brighter = presets.stepped(w, pic, False, brighter=1)
        assert shown_mean(pic, brighter) > shown_mean(pic, w)
        narrower = presets.stepped(w, pic, False, wider=-1)
        assert narrower.width == pytest.approx(w.width / 1.1) and narrower.center == w.center


# -- in the window ----------------------------------------------------------------------------------

def test_preset_keys_work_from_the_report_editor(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_first(qtbot, w)
    text = w.report.findings.toPlainText()
    views: list[ImageView] = w.study.views
    for k, name in ((Qt.Key.Key_F2, "lung"), (Qt.Key.Key_F3, "mediastinum"), (Qt.Key.Key_F4, "bone")):
        key(qtbot, w, k)
        for v in views:
            assert v.state is not None and v.state.preset == name
            assert v.state.window == presets.preset_window(v.state.picture, name, v.state.invert)
            assert v.window_text().startswith(name.upper() + "  W ")
    assert w.report.findings.toPlainText() == text  # nothing typed into the report
    # window/level keys step from the preset
    v = views[0]
    before = v.state.effective_window
    gray = v._gray.copy()
    key(qtbot, w, Qt.Key.Key_Left, Qt.KeyboardModifier.AltModifier)  # narrower
    assert v.state.effective_window.width == pytest.approx(before.width / 1.1) and v.state.preset == ""
    key(qtbot, w, Qt.Key.Key_Right, Qt.KeyboardModifier.AltModifier)  # wider again
    assert v.state.effective_window.width == pytest.approx(before.width)
    key(qtbot, w, Qt.Key.Key_Up, Qt.KeyboardModifier.AltModifier)  # brighter
    assert v._gray.mean() > gray.mean()
    key(qtbot, w, Qt.Key.Key_Down, Qt.KeyboardModifier.AltModifier)
    key(qtbot, w, Qt.Key.Key_Down, Qt.KeyboardModifier.AltModifier)  # darker
    assert v._gray.mean() < gray.mean()
    # invert, zoom and fit on Alt keys; F6: the image's own window
    key(qtbot, w, Qt.Key.Key_I, Qt.KeyboardModifier.AltModifier)
    assert all(x.state.invert for x in views)
    key(qtbot, w, Qt.Key.Key_Equal, Qt.KeyboardModifier.AltModifier)
    assert all(x.transform.zoom > 1.0 for x in views)
    key(qtbot, w, Qt.Key.Key_0, Qt.KeyboardModifier.AltModifier)
    assert all(x.transform.zoom == 1.0 for x in views)
    key(qtbot, w, Qt.Key.Key_F6)
    assert all(x.state.window is None and x.state.preset == "" for x in views)
    assert w.report.findings.toPlainText() == text


def test_preset_overlay_is_readable_on_a_white_image(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    """The W/L line sits on a dark box: legible where the radiograph is white."""
    w = make_window("alice")
    open_first(qtbot, w)
    v: ImageView = w.study.views[0]
    lo = float(v.state.picture.levels[0])
    v.set_window(imaging.WindowLevel(lo - 10, 1.0))  # every pixel shown white
    img = v.grab().toImage()
    boxes = v.overlay_boxes()
    assert len(boxes) == 2  # W/L (left) and zoom (right)
    box = boxes[0].toRect().intersected(v.rect())
    lum = np.array([[img.pixelColor(x, y).lightness() for x in range(box.left(), box.right())]
                    for y in range(box.top(), box.bottom())])
    assert lum.size and np.median(lum) < 60  # the backing is dark
    assert (lum > 200).mean() > 0.03  # the light text on it
    # outside the boxes the image is white indeed
    assert img.pixelColor(v.width() // 2, v.height() // 2).lightness() > 240


def test_magnifier_loupe_follows_the_mouse(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_first(qtbot, w)
    v: ImageView = w.study.views[0]
    plain = v.grab().toImage()
    key(qtbot, w, Qt.Key.Key_F9)
    assert w.study.magnifier and all(x.loupe and x.hasMouseTracking() for x in w.study.views)
    c = v.loupe_rect().center()  # centred before the mouse moves
    assert abs(c.x() - v.width() / 2) < 1 and abs(c.y() - v.height() / 2) < 1
    target = QPoint(v.width() // 3, v.height() // 2)
    qtbot.mouseMove(v, target)
    qtbot.waitUntil(lambda: v.loupe_rect().center().toPoint() == target, timeout=3000)
    loupe = v.grab().toImage()
    r = v.loupe_rect().toRect().intersected(v.rect())
    changed = sum(plain.pixel(x, y) != loupe.pixel(x, y) for x in range(r.left(), r.right(), 4)
                  for y in range(r.top(), r.bottom(), 4))
    assert changed > 0.5 * (r.width() // 4) * (r.height() // 4)  # the image under it is magnified
    # away from the loupe the picture is as it was
    far = QPoint(r.right() + 40, r.center().y()) if r.right() + 40 < v.width() - 20 else QPoint(20, v.height() // 2)
    assert plain.pixel(far) == loupe.pixel(far)
    key(qtbot, w, Qt.Key.Key_F9)
    assert not w.study.magnifier and not v.loupe


def test_magnifier_single_view_and_full_screen_keys(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_first(qtbot, w)
    a, b = w.study.views
    width_both = a.width()
    key(qtbot, w, Qt.Key.Key_F8)
    qtbot.waitUntil(lambda: not b.isVisible() and a.isVisible(), timeout=3000)
    qtbot.waitUntil(lambda: a.width() > width_both * 1.5, timeout=3000)  # the one view takes the room
    key(qtbot, w, Qt.Key.Key_F8)
    qtbot.waitUntil(lambda: b.isVisible() and not a.isVisible(), timeout=3000)
    key(qtbot, w, Qt.Key.Key_F8)
    qtbot.waitUntil(lambda: a.isVisible() and b.isVisible(), timeout=3000)
    # F11: the images alone, full screen; Esc gives the worklist and the report back
    key(qtbot, w, Qt.Key.Key_F11)
    qtbot.waitUntil(lambda: not w.worklist.isVisible() and not w.report.isVisible(), timeout=3000)
    assert w.isFullScreen()
    qtbot.keyClick(w, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: w.worklist.isVisible() and w.report.isVisible(), timeout=3000)
    assert not w.isFullScreen()


def test_key_help_lists_every_shortcut_of_the_window(qtbot, make_window) -> None:  # type: ignore[no-untyped-def]
    w = make_window("alice")
    open_first(qtbot, w)
    key(qtbot, w, Qt.Key.Key_F1)
    help_ = w.key_help
    assert help_ is not None and help_.isVisible()
    shown = " / ".join(help_.shown_keys())
    normal = {QKeySequence(p).toString() for k in help_.shown_keys() for p in k.split(" / ")}
    normal |= {QKeySequence(a).toString() for k in KEYS for a in k.aliases}  # bound, not listed
    for sc in w.findChildren(QShortcut):
        seq = sc.key().toString()
        assert seq in normal or seq.replace("Return", "Enter") in shown, f"{seq} is not in the key help"
    # and every key of the table is there, the image keys too
    for k in KEYS:
        assert k.shown() in help_.shown_keys()
    help_.close()
    # "?" typed in the report is text, not the help
    w.report.findings.moveCursor(w.report.findings.textCursor().MoveOperation.End)
    qtbot.keyClick(w.report.findings, Qt.Key.Key_Question, Qt.KeyboardModifier.ShiftModifier)
    assert w.report.findings.toPlainText().endswith("?") and not help_.isVisible()
    # "?" opens it where nothing is typed (the worklist), F1 anywhere
    w.worklist.table.setFocus()
    qtbot.keyClick(w.worklist.table, Qt.Key.Key_Question, Qt.KeyboardModifier.ShiftModifier)  # as typed
    assert help_.isVisible()


def test_key_help_readme_keys_table_is_the_key_table() -> None:
    """README's keys table is :func:`gui.keys.markdown_table` (regenerate it when a key changes)."""
    from pathlib import Path

    from gui.keys import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme
