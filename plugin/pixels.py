"""From a radiograph's stored pixels to the float image the model reads.

The grayscale pipeline of PS3.3 C.11 ("Image Pixel ... Modality LUT, VOI LUT, Presentation LUT"):

1. decode Pixel Data in whatever transfer syntax the node accepted (pydicom with the
   pylibjpeg / libjpeg / openjpeg / RLE plugins, pyjpegls for JPEG-LS);
2. Modality LUT (C.11.1): Rescale Slope / Intercept or a Modality LUT Sequence;
3. VOI LUT (C.11.2): a VOI LUT Sequence if there is one, else the window selected by
   ``voi_window_index`` (Window Center / Width with VOI LUT Function LINEAR, LINEAR_EXACT or
   SIGMOID), else the full range of the data;
4. presentation: MONOCHROME1 (and Presentation LUT Shape INVERSE on MONOCHROME2) is
   inverted so that air is dark, as the model was trained;
5. resize to the bundle's input size (area averaging when shrinking).

The result is a 2-D float32 array in [0, 1], MONOCHROME2. Everything here is a pure function
of the dataset; a dataset that cannot be read raises :class:`PixelError` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


class PixelError(ValueError):
    """The image's pixels cannot be prepared; the message says why."""


@dataclass(frozen=True)
class PixelOptions:
    voi_window_index: int = 0  # which of several windows (or VOI LUTs) to apply
    size: int = 0  # square output size in pixels; 0 = keep the image's own size


@dataclass(frozen=True)
class PreparedImage:
    """A 2-D float32 image in [0, 1], air dark (MONOCHROME2), and how it was made."""

    array: np.ndarray
    steps: tuple[str, ...]  # e.g. ("decoded 1.2.840.10008.1.2.4.90 2320x2828 12-bit", "window 0 ...")
    original_shape: tuple[int, int]


def decode(ds: Any) -> np.ndarray:
    """The stored values of the first frame, as the transfer syntax encodes them."""
    if "PixelData" not in ds:
        raise PixelError("no Pixel Data (7FE0,0010)")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types: missing plugin, corrupt stream...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PixelError(f"cannot decode Pixel Data (transfer syntax {ts}): {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise PixelError(f"expected a colour image of shape (rows, columns, 3), got {arr.shape}")
        rgb = arr.astype(np.float32)
        return np.asarray(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    if samples != 1:
        raise PixelError(f"SamplesPerPixel {samples} is not supported")
    if arr.ndim != 2:
        raise PixelError(f"expected a 2-D image, got shape {arr.shape}")
    return np.asarray(arr)


def modality_lut(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.1: stored values -> modality values (float64)."""
    if "ModalityLUTSequence" in ds:
        item = ds.ModalityLUTSequence[0]
        return apply_lut(arr.astype(np.float64), item, "Modality LUT Sequence"), "Modality LUT Sequence"
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out = arr.astype(np.float64)
    if slope != 1.0 or intercept != 0.0:
        return out * slope + intercept, f"rescale slope {slope:g} intercept {intercept:g}"
    return out, "no rescale"


def _as_list(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        return [float(v) for v in value]
    return [float(value)]


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing, output scaled to [0, 1] instead of [ymin, ymax]."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        if width <= 0:
            raise PixelError(f"Window Width must be > 0 for SIGMOID, got {width:g}")
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PixelError(f"Window Width must be > 0 for LINEAR_EXACT, got {width:g}")
        lo, hi = center - width / 2.0, center + width / 2.0
        return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if function != "LINEAR":
        raise PixelError(f"VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    if width < 1:
        raise PixelError(f"Window Width must be >= 1 for LINEAR, got {width:g}")
    # C.11.2.1.2.1: if x <= c - 0.5 - (w-1)/2 -> ymin; x > c - 0.5 + (w-1)/2 -> ymax
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip(((values - (center - 0.5)) / (width - 1.0)) + 0.5, 0.0, 1.0)


def lut_table(item: Any, what: str) -> np.ndarray:
    """The LUT Data of a Modality or VOI LUT item as an array (US, SS or OW encoded)."""
    data = item.get("LUTData", None)
    if data is None:
        raise PixelError(f"{what}: no LUT Data")
    if isinstance(data, bytes | bytearray):
        table = np.frombuffer(bytes(data), dtype="<u2").astype(np.float64)
    elif isinstance(data, int | float):
        table = np.asarray([data], dtype=np.float64)
    else:
        table = np.asarray(list(data), dtype=np.float64)
    if table.size == 0:
        raise PixelError(f"{what}: empty LUT Data")
    return table


def apply_lut(values: np.ndarray, item: Any, what: str) -> np.ndarray:
    """PS3.3 C.11.1.1 / C.11.2.1.1: index a LUT by value; out-of-range values clamp to its ends.

    LUT Descriptor = (number of entries, 0 meaning 65536; first value mapped; bits per entry).
    """
    table = lut_table(item, what)
    try:
        n, first, _bits = (int(v) for v in item.LUTDescriptor)
    except Exception as exc:
        raise PixelError(f"{what}: invalid LUT Descriptor: {exc}") from exc
    n = n or 65536
    if first >= 32768 and values.min() < 0:  # first mapped value of a signed image stored as US
        first -= 65536
    table = table[:n]
    idx = np.clip(np.round(values).astype(np.int64) - first, 0, len(table) - 1)
    return table[idx]


def voi(values: np.ndarray, ds: Any, index: int = 0) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.2: modality values -> display values in [0, 1].

    A VOI LUT Sequence wins over windows (as most viewers do); ``index`` picks among several
    (falling back to the last one when there are fewer). Without either, the data's own range.
    """
    luts = ds.get("VOILUTSequence", None)
    if luts:
        i = min(index, len(luts) - 1)
        item = luts[i]
        out = apply_lut(values, item, f"VOI LUT Sequence item {i}")
        table = lut_table(item, f"VOI LUT Sequence item {i}")
        lo, hi = float(table.min()), float(table.max())
        if hi <= lo:
            raise PixelError(f"VOI LUT Sequence item {i} is constant")
        explanation = str(item.get("LUTExplanation", "") or "")
        return np.clip((out - lo) / (hi - lo), 0.0, 1.0), f"VOI LUT {i}" + (f" ({explanation})" if explanation else "")
    centers = _as_list(ds.get("WindowCenter", None))
    widths = _as_list(ds.get("WindowWidth", None))
    if centers and widths:
        i = min(index, len(centers) - 1, len(widths) - 1)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        try:
            windowed = window(values, centers[i], widths[i], function)
            return windowed, f"window {i} center {centers[i]:g} width {widths[i]:g} {function.upper()}"
        except PixelError:
            pass  # an unusable window (width 0, unknown function): fall back to the data range
    bits = int(ds.get("BitsStored", 0) or 0)
    rescaled = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1 or float(
        ds.get("RescaleIntercept", 0) or 0) != 0
    if 0 < bits <= 8 and not rescaled and int(ds.get("PixelRepresentation", 0) or 0) == 0:
        top = float(2**bits - 1)  # 8-bit display-ready data (e.g. Secondary Capture): as stored
        return np.clip(values / top, 0.0, 1.0), f"nominal range 0..{top:g} (no window)"
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values), "constant image"
    return (values - lo) / (hi - lo), f"full range {lo:g}..{hi:g} (no usable window)"


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize a [0, 1] image to ``size`` x ``size`` (area averaging when shrinking)."""
    if size <= 0 or img.shape == (size, size):
        return img
    pil = Image.fromarray(img.astype(np.float32), mode="F")
    shrinking = img.shape[0] > size or img.shape[1] > size
    out = pil.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def prepare(ds: Any, options: PixelOptions = PixelOptions()) -> PreparedImage:
    """The full pipeline: decode, Modality LUT, VOI, MONOCHROME1 inversion, resize."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                           "YBR_RCT", "YBR_ICT", "PALETTE COLOR"):
        raise PixelError(f"PhotometricInterpretation {photometric or '(none)'} is not supported")
    if photometric == "PALETTE COLOR":
        raise PixelError("PALETTE COLOR images are not radiographs to read")
    stored = decode(ds)
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    bits = int(ds.get("BitsStored", 8) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    steps = [f"decoded {ts or 'dataset'} {stored.shape[1]}x{stored.shape[0]} {bits}-bit"
             f"{' signed' if signed else ''} {photometric}"]
    if photometric.startswith(("RGB", "YBR")):
        values = stored.astype(np.float64)
        top = 255.0 if values.max() <= 255 else float(values.max())
        display = values / top
        steps.append("colour to luminance")
    else:
        values, how = modality_lut(stored, ds)
        steps.append(how)
        display, how = voi(values, ds, options.voi_window_index)
        steps.append(how)
    invert = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "") or "").upper() == "INVERSE"
    )
    if invert:
        display = 1.0 - display
        steps.append(f"inverted ({photometric}{', Presentation LUT Shape INVERSE' if photometric == 'MONOCHROME2' else ''})")
    if not np.all(np.isfinite(display)):
        raise PixelError("pixel values are not finite after the LUTs")
    img = np.clip(display, 0.0, 1.0).astype(np.float32)
    original = (int(img.shape[0]), int(img.shape[1]))
    if options.size:
        img = resize(img, options.size)
        steps.append(f"resized to {options.size}x{options.size}")
    return PreparedImage(array=np.ascontiguousarray(img, dtype=np.float32), steps=tuple(steps), original_shape=original)
