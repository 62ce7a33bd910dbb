"""gui.imaging without Qt: quantisation, window/level tables, MONOCHROME1, drag, zoom and pan."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from support import synthetic

from gui import imaging
from plugin.drafting import pixels


def dx(px: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    spec = synthetic.SyntheticStudy(key="img", size=px.shape[0], photometric=photometric, views=("PA",))
    ds = synthetic.make_study(spec)[0]
    ds.PixelData = px.astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = px.shape
    for k in ("WindowCenter", "WindowWidth"):
        if k in ds:
            del ds[k]
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def ramp(n: int = 64, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, n).round().astype(np.uint16), (n, 1))


def test_quantise_is_exact_for_integer_data() -> None:
    values = np.array([[100, 101], [4000, 100]], dtype=np.uint16)
    codes, levels = imaging.quantise(values)
    assert codes.dtype == np.uint16
    np.testing.assert_array_equal(levels[codes], values)
    assert levels[0] == 100 and levels[-1] == 4000


def test_quantise_float_data_to_4096_levels() -> None:
    values = np.linspace(-1000.5, 3000.25, 10000).reshape(100, 100)
    codes, levels = imaging.quantise(values)
    assert len(levels) == 4096
    assert np.max(np.abs(levels[codes] - values)) <= (levels[1] - levels[0]) / 2 + 1e-9


def test_window_table_matches_plugin_pixels() -> None:
    pic = imaging.picture_from_dataset(dx(ramp()))
    w = imaging.WindowLevel(center=2000, width=1000)
    img = imaging.render(pic, w)
    values = pic.levels[pic.codes].astype(np.float64)
    expected = np.rint(np.clip(pixels.window(values, 2000, 1000), 0, 1) * 255)
    np.testing.assert_array_equal(img, expected.astype(np.uint8))
    assert img[:, 0].max() == 0 and img[:, -1].min() == 255  # below / above the window


def test_default_uses_the_header_window_then_the_histogram() -> None:
    with_window = imaging.picture_from_dataset(dx(ramp(), WindowCenter=1000, WindowWidth=400))
    assert with_window.has_voi and with_window.default_window == imaging.WindowLevel(1000, 400)
    without = imaging.picture_from_dataset(dx(ramp()))
    assert not without.has_voi
    assert 0 < without.default_window.width <= 4095
    assert abs(without.default_window.center - 2047.5) < 50


def test_monochrome1_displays_high_values_dark_and_invert_flips() -> None:
    px = ramp()
    m2 = imaging.picture_from_dataset(dx(px, "MONOCHROME2"))
    m1 = imaging.picture_from_dataset(dx(px, "MONOCHROME1"))
    w = imaging.WindowLevel(2048, 4096)
    a2, a1 = imaging.render(m2, w), imaging.render(m1, w)
    assert a2[0, -1] > a2[0, 0] and a1[0, -1] < a1[0, 0]
    np.testing.assert_array_equal(imaging.render(m1, w, invert=True), a2)


def test_rescale_slope_and_intercept_are_applied() -> None:
    pic = imaging.picture_from_dataset(dx(ramp(), RescaleSlope=2, RescaleIntercept=-1024))
    assert pic.levels[0] == -1024 and pic.levels[-1] == 2 * 4095 - 1024


def test_drag_directions_and_limits() -> None:
    w = imaging.WindowLevel(1000, 400)
    assert w.dragged(10, 0, 2.0) == imaging.WindowLevel(1000, 420)  # right: wider
    assert w.dragged(0, 10, 2.0) == imaging.WindowLevel(1020, 400)  # down: higher level
    assert w.dragged(-10000, 0, 2.0).width == 1.0  # never below 1


def test_view_state_drag_changes_the_image_and_reset_restores() -> None:
    state = imaging.ViewState(imaging.picture_from_dataset(dx(ramp(), WindowCenter=2048, WindowWidth=4096)))
    before = state.image().copy()
    state.drag(-300, 0)  # narrower window: more contrast
    after = state.image()
    assert state.window is not None and state.window.width < 4096
    assert not np.array_equal(before, after)
    state.toggle_invert()
    assert state.invert
    state.reset()
    assert state.window is None and not state.invert
    np.testing.assert_array_equal(state.image(), before)


def test_voi_lut_sequence_is_the_default_display() -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [0] * 2048 + [255] * 2048  # a hard threshold at 2048
    ds = dx(ramp())
    ds.VOILUTSequence = [item]
    pic = imaging.picture_from_dataset(ds)
    img = imaging.render(pic, None)
    assert set(np.unique(img)) == {0, 255}


def test_transform_fit_zoom_at_point_pan_and_one_to_one() -> None:
    t = imaging.ViewTransform(image_size=(2048, 2048), viewport=(800, 600))
    assert t.fit_scale == pytest.approx(600 / 2048)
    ox, oy = t.origin()
    assert oy == pytest.approx(0) and ox == pytest.approx((800 - 600) / 2)
    z = t.zoomed_at(300, 200, 2.0)
    assert z.zoom == 2.0
    # the image point under the cursor stays under it
    assert z.to_image(300, 200) == pytest.approx(t.to_image(300, 200))
    p = z.panned(15, -5)
    assert p.to_screen(*z.to_image(300, 200)) == pytest.approx((315, 195))
    assert p.fitted() == imaging.ViewTransform((2048, 2048), (800, 600))
    assert t.one_to_one().scale == pytest.approx(1.0)
    assert t.zoomed_at(0, 0, 1e9).zoom == imaging.ViewTransform.MAX_ZOOM


def test_load_picture_from_the_store(node: synthetic.NodeFixture) -> None:
    from plugin.review.service import ReviewService

    svc = ReviewService(node.config, node.sessions, node.store)
    detail = svc.detail(svc.worklist()[0].draft_id or 0)
    assert len(detail.views) == 2
    for v in detail.views:
        assert v.path is not None and v.path.exists()
        pic = imaging.load_picture(v.path, view=v.view)
        assert (pic.rows, pic.columns) == (512, 512) and pic.view == v.view
        assert imaging.render(pic, None).std() > 10  # a real image, not a flat field
