"""Qt-free image logic of the reviewer: loading a view, window/level, invert, zoom and pan.

The grayscale pipeline is PS3.3 C.11 as implemented by :mod:`plugin.drafting.pixels` (decode, Modality
LUT, VOI LUT or window, MONOCHROME1 / Presentation LUT Shape INVERSE). For interactive
window/level on 2048 x 2048 12-bit images the modality values are quantised once into integer
codes (exact for integer data), and every change of window becomes a small lookup table over
those codes (``plugin.drafting.pixels.window`` evaluated on the code values) applied with one
``numpy.take``: a few milliseconds per drag step instead of a float pass over 4 M pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset

from plugin.drafting import pixels

MAX_CODES = 65536


@dataclass(frozen=True)
class WindowLevel:
    """A linear VOI window (PS3.3 C.11.2.1.2) in modality units."""

    center: float
    width: float

    def dragged(self, dx: float, dy: float, units_per_pixel: float) -> WindowLevel:
        """Mouse drag: right widens the window (less contrast), down raises the level (darker)."""
        width = max(1.0, self.width + dx * units_per_pixel)
        return WindowLevel(self.center + dy * units_per_pixel, width)

    def label(self) -> str:
        return f"W {self.width:.0f}  L {self.center:.0f}"


@dataclass(frozen=True)
class Picture:
    """One loaded view, ready to be windowed.

    ``codes`` (uint16, rows x columns) index ``levels`` (float64): the modality value of a pixel
    is ``levels[codes[y, x]]``. ``header`` is the dataset without Pixel Data (for the VOI).
    """

    sop_instance_uid: str
    view: str
    codes: np.ndarray
    levels: np.ndarray
    header: Dataset
    inverse: bool  # MONOCHROME1 or Presentation LUT Shape INVERSE: high values display dark
    default_window: WindowLevel  # the image's own window, or one fitted to its histogram
    has_voi: bool  # a window or VOI LUT in the header (the default view uses it as sent)
    voi_window_index: int = 0
    pixel_spacing: tuple[float, float] | None = None

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def columns(self) -> int:
        return int(self.codes.shape[1])

    @property
    def value_range(self) -> float:
        return float(self.levels[-1] - self.levels[0]) if len(self.levels) > 1 else 1.0


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        if hasattr(value, "__iter__") and not isinstance(value, str | bytes):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _window_from_header(ds: Dataset, index: int) -> WindowLevel | None:
    centers = ds.get("WindowCenter", None)
    widths = ds.get("WindowWidth", None)
    if centers is None or widths is None:
        return None
    cs = list(centers) if hasattr(centers, "__iter__") and not isinstance(centers, str) else [centers]
    ws = list(widths) if hasattr(widths, "__iter__") and not isinstance(widths, str) else [widths]
    if not cs or not ws:
        return None
    i = min(index, len(cs) - 1, len(ws) - 1)
    c, w = _first(cs[i]), _first(ws[i])
    if c is None or w is None or w < 1:
        return None
    return WindowLevel(c, w)


def _histogram_window(codes: np.ndarray, levels: np.ndarray, lo_q: float = 0.005, hi_q: float = 0.995) -> WindowLevel:
    hist = np.bincount(codes.ravel(), minlength=len(levels))
    cdf = np.cumsum(hist, dtype=np.float64)
    total = cdf[-1] if len(cdf) else 0.0
    if total <= 0:
        return WindowLevel(float(levels[0]), 1.0)
    lo = levels[int(np.searchsorted(cdf, lo_q * total))]
    hi = levels[min(int(np.searchsorted(cdf, hi_q * total)), len(levels) - 1)]
    width = max(1.0, float(hi - lo))
    return WindowLevel(float(lo + hi) / 2.0, width)


def quantise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint16, levels float64) with ``levels[codes] ~= values`` (exact for integers)."""
    if values.size == 0:
        raise pixels.PixelError("empty image")
    vmin = values.min()
    vmax = values.max()
    if not (math.isfinite(float(vmin)) and math.isfinite(float(vmax))):
        raise pixels.PixelError("pixel values are not finite after the Modality LUT")
    integral = bool(np.issubdtype(values.dtype, np.integer)) or bool(np.all(values == np.round(values)))
    span = float(vmax) - float(vmin)
    if integral and span < MAX_CODES:
        codes = (values.astype(np.int64) - int(vmin)).astype(np.uint16)
        levels = float(vmin) + np.arange(int(span) + 1, dtype=np.float64)
        return codes, levels
    n = 4096
    step = span / (n - 1) if span > 0 else 1.0
    codes = np.rint((values.astype(np.float64) - float(vmin)) / step).astype(np.uint16)
    levels = float(vmin) + step * np.arange(n, dtype=np.float64)
    return codes, levels


def picture_from_dataset(ds: Dataset, view: str = "", voi_window_index: int = 0) -> Picture:
    """Decode and quantise one image (see the module docstring); :class:`plugin.drafting.pixels.PixelError`."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    stored = pixels.decode(ds)
    if photometric.startswith(("RGB", "YBR")) or stored.dtype.kind == "f":
        values: np.ndarray = np.asarray(stored, dtype=np.float64)
    else:
        rescaled = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1.0 or float(
            ds.get("RescaleIntercept", 0) or 0
        ) != 0.0
        values = pixels.modality_lut(stored, ds)[0] if rescaled else stored
    codes, levels = quantise(values)
    header = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            header.add(elem)
    header_window = _window_from_header(ds, voi_window_index)
    has_voi = header_window is not None or bool(ds.get("VOILUTSequence", None))
    default = header_window or _histogram_window(codes, levels)
    inverse = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "") or "").upper() == "INVERSE"
    )
    spacing = ds.get("PixelSpacing", None) or ds.get("ImagerPixelSpacing", None)
    ps = (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None
    return Picture(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        view=view or str(ds.get("ViewPosition", "") or "UNKNOWN"),
        codes=np.ascontiguousarray(codes),
        levels=levels,
        header=header,
        inverse=inverse,
        default_window=default,
        has_voi=has_voi,
        voi_window_index=voi_window_index,
        pixel_spacing=ps,
    )


def load_picture(path: str | Path, view: str = "", voi_window_index: int = 0) -> Picture:
    """Read a stored image file and make a :class:`Picture` of it."""
    ds = pydicom.dcmread(path)
    return picture_from_dataset(ds, view=view, voi_window_index=voi_window_index)


def lut(picture: Picture, window: WindowLevel | None, invert: bool = False) -> np.ndarray:
    """The uint8 display table over the picture's codes.

    ``window`` None = the image's own VOI as sent (VOI LUT Sequence or Window Center/Width, via
    :func:`plugin.drafting.pixels.voi`), else a LINEAR window. The result is inverted for MONOCHROME1 and
    once more when the user asks (``invert``), so 255 is always "displayed bright".
    """
    if window is None and picture.has_voi:
        display, _ = pixels.voi(picture.levels, picture.header, picture.voi_window_index)
    else:
        w = window or picture.default_window
        display = pixels.window(picture.levels, w.center, max(1.0, w.width), "LINEAR")
    if picture.inverse != invert:
        display = 1.0 - display
    return np.asarray(np.clip(np.rint(display * 255.0), 0, 255), dtype=np.uint8)


def render(picture: Picture, window: WindowLevel | None, invert: bool = False) -> np.ndarray:
    """The 8-bit display image (rows x columns, C-contiguous) for a window."""
    return np.take(lut(picture, window, invert), picture.codes)


def drag_sensitivity(picture: Picture) -> float:
    """Modality units per screen pixel of drag: the full range in about 1000 pixels."""
    return max(picture.value_range / 1000.0, 0.05)


@dataclass(frozen=True)
class ViewTransform:
    """Where an image of ``image_size`` sits in a viewport of ``viewport``: fit x zoom, then pan.

    ``zoom`` is relative to fit (1.0 = the whole image fits); ``pan`` is in screen pixels from
    the centred position. All pure; the widget paints with :meth:`scale` and :meth:`origin`.
    """

    image_size: tuple[int, int]  # (width, height)
    viewport: tuple[int, int]  # (width, height)
    zoom: float = 1.0
    pan: tuple[float, float] = (0.0, 0.0)

    MIN_ZOOM = 0.1
    MAX_ZOOM = 40.0

    @property
    def fit_scale(self) -> float:
        iw, ih = self.image_size
        vw, vh = self.viewport
        if iw <= 0 or ih <= 0 or vw <= 0 or vh <= 0:
            return 1.0
        return min(vw / iw, vh / ih)

    @property
    def scale(self) -> float:
        return self.fit_scale * self.zoom

    def origin(self) -> tuple[float, float]:
        """Screen position of the image's top-left corner."""
        iw, ih = self.image_size
        vw, vh = self.viewport
        s = self.scale
        return (vw - iw * s) / 2.0 + self.pan[0], (vh - ih * s) / 2.0 + self.pan[1]

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        ox, oy = self.origin()
        return (x - ox) / self.scale, (y - oy) / self.scale

    def to_screen(self, ix: float, iy: float) -> tuple[float, float]:
        ox, oy = self.origin()
        return ox + ix * self.scale, oy + iy * self.scale

    def zoomed_at(self, x: float, y: float, factor: float) -> ViewTransform:
        """Zoom by ``factor`` keeping the image point under (x, y) where it is."""
        new_zoom = min(self.MAX_ZOOM, max(self.MIN_ZOOM, self.zoom * factor))
        ix, iy = self.to_image(x, y)
        moved = replace(self, zoom=new_zoom)
        sx, sy = moved.to_screen(ix, iy)
        return replace(moved, pan=(moved.pan[0] + x - sx, moved.pan[1] + y - sy))

    def panned(self, dx: float, dy: float) -> ViewTransform:
        return replace(self, pan=(self.pan[0] + dx, self.pan[1] + dy))

    def fitted(self) -> ViewTransform:
        return replace(self, zoom=1.0, pan=(0.0, 0.0))

    def one_to_one(self) -> ViewTransform:
        """One image pixel per screen pixel, centred."""
        fs = self.fit_scale
        return replace(self, zoom=1.0 / fs if fs > 0 else 1.0, pan=(0.0, 0.0))

    def resized(self, viewport: tuple[int, int]) -> ViewTransform:
        return replace(self, viewport=viewport)

    def zoom_percent(self) -> int:
        return int(math.floor(self.scale * 100 + 0.5))


@dataclass
class ViewState:
    """The mutable display state of one view (held by the widget, tested without Qt)."""

    picture: Picture
    window: WindowLevel | None = None  # None = as sent
    invert: bool = False
    preset: str = ""  # the window preset in use (gui.presets), "" once dragged or stepped

    @property
    def effective_window(self) -> WindowLevel:
        return self.window or self.picture.default_window

    def drag(self, dx: float, dy: float) -> None:
        self.window = self.effective_window.dragged(dx, dy, drag_sensitivity(self.picture))
        self.preset = ""

    def set_window(self, window: WindowLevel | None, preset: str = "") -> None:
        """A window chosen by key (a preset, or None: the image's own window as sent)."""
        self.window, self.preset = window, preset

    def toggle_invert(self) -> None:
        self.invert = not self.invert

    def reset(self) -> None:
        self.window = None
        self.invert = False
        self.preset = ""

    def image(self) -> np.ndarray:
        return render(self.picture, self.window, self.invert)
