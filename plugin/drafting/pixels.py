"""From a radiograph's stored pixels to the float image the model reads.

The grayscale pipeline of PS3.3 C.11 ("Image Pixel ... Modality LUT, VOI LUT, Presentation LUT"),
with pydicom doing the standard parts:

1. decode Pixel Data in whatever transfer syntax the node accepted (pydicom with the
   pylibjpeg / libjpeg / openjpeg / RLE plugins, pyjpegls for JPEG-LS); a failure is a
   :class:`PixelError` saying why;
2. Modality LUT (C.11.1): ``pydicom.pixels.apply_modality_lut`` (Rescale Slope / Intercept or a
   Modality LUT Sequence, US or OW data in the dataset's own byte order);
3. VOI LUT (C.11.2): a VOI LUT Sequence if there is one (``pydicom.pixels.apply_voi``), else the
   window selected by ``voi_window_index`` (``pydicom.pixels.apply_windowing``: Window Center /
   Width with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID) -- the two halves of
   ``apply_voi_lut``; an index past the end takes the last one. What pydicom lacks is added
   here: output scaled to [0, 1]; without a usable window, 8-bit unsigned display-ready data
   (Secondary Capture, an 8-bit MONOCHROME2 CR) is taken as stored (``value / 255``, exactly
   what ``cxrnode eval`` reads from an image file: :func:`onnx_models.data.to_unit_range`) and
   anything else is scaled from its own minimum to its maximum;
4. presentation: MONOCHROME1 (and Presentation LUT Shape INVERSE on MONOCHROME2) is inverted so
   that air is dark, as the model was trained; colour images become luminance (Rec. 601).

The result is a 2-D float32 array in [0, 1], MONOCHROME2, at the image's own size: resizing and
normalising belong to the runtime alone (``onnx_models.runtime.StudyInput``), so the node, eval,
training and ``cxrnode doctor`` give the model the same input. There is no size cap: on this
2-core machine the LUT stage of a 3,000 x 3,000 12-bit image takes 0.35-0.8 s (a cap applied
after the LUTs would not save it) and the runtime's three resizes of it (view classifier, report
model, findings classifier) 60-100 ms, of which a 1,024 px cap would save about 90 % -- not
worth a second resizer whose output differs from the runtime's for sizes it does not halve
exactly. Everything here is a pure function of the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing
from pydicom.sequence import Sequence

from onnx_models.data import to_unit_range


class PixelError(ValueError):
    """The image's pixels cannot be prepared; the message says why."""


@dataclass(frozen=True)
class PixelOptions:
    """How stored pixels become the model's input.

    Attributes
    ----------
    voi_window_index:
        Which of several VOI windows (or VOI LUTs) to apply (0 = the first).
    """
    voi_window_index: int = 0  # which of several windows (or VOI LUTs) to apply


@dataclass(frozen=True)
class PreparedImage:
    """A 2-D float32 image in [0, 1], air dark (MONOCHROME2), and how it was made.

    Attributes
    ----------
    array:
        The image, at its native size (the runtime resizes it).
    steps:
        What was done, in order (e.g. the decoder, the window applied), for the job log.
    original_shape:
        Rows and columns as stored.
    """

    array: np.ndarray
    steps: tuple[str, ...]  # e.g. ("decoded 1.2.840.10008.1.2.4.90 2320x2828 12-bit", "window 0 ...")
    original_shape: tuple[int, int]


def decode(ds: Any) -> np.ndarray:
    """The stored values of the first frame, as the transfer syntax encodes them (colour images
    as luminance, float64)."""
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


def _lut_view(ds: Any, keyword: str = "", index: int = 0) -> Any:
    """What pydicom needs to read ``ds``'s LUTs right: ``ds`` itself, or a shallow copy (the
    header only; pixel data are shared) that fixes three things pydicom's functions lack:

    - a dataset built in memory (e.g. a header copied without its file meta) says it is
      little endian, so OW LUT Data can be unpacked (the node stores every dataset with its
      transfer syntax, so only such copies need it);
    - the ``keyword`` sequence holds only item ``index`` with a LUT Descriptor of 16 bits per
      entry: pydicom indexes a LUT with an array of the entries' own width (an 8-bit LUT with
      more than 256 entries wraps around) and has no dtype for 10..15-bit Modality LUTs; the
      values are the same (OW data are 16-bit words; US values fit);
    - the first mapped value of a signed image's LUT written as US (C.11.1.1: it is SS when
      Pixel Representation is 1) is read as signed.
    """
    meta = getattr(ds, "file_meta", None)
    has_syntax = meta is not None and "TransferSyntaxUID" in meta
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if (has_syntax or little is not None) and not keyword:
        return ds
    view = Dataset()
    view.update(ds)
    if has_syntax:  # pydicom takes the byte order from the file meta when there is one
        view.file_meta = ds.file_meta
    else:
        view.set_original_encoding(bool(implicit), True if little is None else bool(little))
    if keyword:
        item = ds[keyword].value[index]
        n, first, _bits = (int(v) for v in item.LUTDescriptor)
        if first >= 32768 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
            first -= 65536
        fixed = Dataset()
        fixed.update(item)
        fixed["LUTDescriptor"] = DataElement(0x00283002, "SS" if first < 0 else "US", [n, first, 16])
        view[keyword] = DataElement(ds[keyword].tag, "SQ", Sequence([fixed]))
    return view


def _rescaled(ds: Any) -> bool:
    return bool(ds.get("ModalityLUTSequence", None)) or (
        "RescaleSlope" in ds and "RescaleIntercept" in ds
        and (float(ds.RescaleSlope if ds.RescaleSlope is not None else 1) != 1.0
             or float(ds.RescaleIntercept if ds.RescaleIntercept is not None else 0) != 0.0))


def modality_lut(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.1: stored values -> modality values (``pydicom.pixels.apply_modality_lut``)."""
    try:
        lut = bool(ds.get("ModalityLUTSequence", None))
        out = apply_modality_lut(arr, _lut_view(ds, "ModalityLUTSequence" if lut else ""))
    except Exception as exc:  # a malformed LUT (descriptor, data, bit depth)
        raise PixelError(f"cannot apply the Modality LUT: {type(exc).__name__}: {exc}") from exc
    if ds.get("ModalityLUTSequence", None):
        return out, "Modality LUT Sequence"
    if _rescaled(ds):
        return out, f"rescale slope {float(ds.RescaleSlope):g} intercept {float(ds.RescaleIntercept):g}"
    return out, "no rescale"


def _as_list(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple) or hasattr(value, "__iter__") and not isinstance(value, str | bytes):
        return [float(v) for v in value]
    return [float(value)]


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing (``pydicom.pixels.apply_windowing``), output in [0, 1].

    Run on a one-bit output range ([0, 1]) so pydicom's result is the unit-range one as is.
    An unusable window (width below the function's minimum, unknown function) is a PixelError.
    """
    header = Dataset()
    header.PhotometricInterpretation = "MONOCHROME2"
    header.BitsStored = 1
    header.PixelRepresentation = 0
    # FD, not DS: a window dragged in the reviewer is any float, and DS text would round it
    header.add_new(0x00281050, "FD", float(center))  # Window Center
    header.add_new(0x00281051, "FD", float(width))  # Window Width
    header.VOILUTFunction = (function or "LINEAR").strip().upper()
    if header.VOILUTFunction not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise PixelError(f"VOI LUT Function {function!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    try:
        return np.asarray(apply_windowing(np.asarray(values), header), dtype=np.float64)
    except ValueError as exc:  # widths below the minimum of the function
        raise PixelError(f"unusable window center {center:g} width {width:g} {header.VOILUTFunction}: {exc}") from exc


def _voi_lut(values: np.ndarray, ds: Any, index: int) -> tuple[np.ndarray, str]:
    luts = ds.VOILUTSequence
    i = min(max(index, 0), len(luts) - 1)
    item = luts[i]
    what = f"VOI LUT Sequence item {i}"
    try:
        n, first, _bits = (int(v) for v in item.LUTDescriptor)
    except Exception as exc:
        raise PixelError(f"{what}: invalid LUT Descriptor: {exc}") from exc
    if item.get("LUTData", None) is None:
        raise PixelError(f"{what}: no LUT Data")
    n = n or 65536
    try:
        view = _lut_view(ds, "VOILUTSequence", i)
        first = int(view.VOILUTSequence[0].LUTDescriptor[1])
        # pydicom indexes the LUT with the input values: integers (modality values after a
        # rescale are floats; C.11.2.1.1 maps them to the nearest entry), clipped to its domain
        idx = np.clip(np.rint(values), first, first + n - 1).astype(np.int64)
        out = apply_voi(idx, view, 0)
        table = apply_voi(np.arange(first, first + n, dtype=np.int64), view, 0)
    except Exception as exc:  # malformed data, unsupported bit depth
        raise PixelError(f"{what}: {type(exc).__name__}: {exc}") from exc
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        raise PixelError(f"{what} is constant")
    explanation = str(item.get("LUTExplanation", "") or "")
    return (np.clip((out.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0),
            f"VOI LUT {i}" + (f" ({explanation})" if explanation else ""))


def voi(values: np.ndarray, ds: Any, index: int = 0) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.2: modality values -> display values in [0, 1].

    A VOI LUT Sequence wins over windows (as pydicom's ``apply_voi_lut`` and most viewers do);
    ``index`` picks among several (the last one when there are fewer). Without either, or with
    an unusable window, the nominal range of 8-bit display-ready data or the data's own range.
    """
    if ds.get("VOILUTSequence", None):
        return _voi_lut(values, ds, index)
    centers = _as_list(ds.get("WindowCenter", None))
    widths = _as_list(ds.get("WindowWidth", None))
    if centers and widths:
        i = min(max(index, 0), len(centers) - 1, len(widths) - 1)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            windowed = window(values, centers[i], widths[i], function)
            return windowed, f"window {i} center {centers[i]:g} width {widths[i]:g} {function}"
        except PixelError:
            pass  # an unusable window (width 0, unknown function): fall back to the data range
    bits = int(ds.get("BitsStored", 0) or 0)
    if 0 < bits <= 8 and not _rescaled(ds) and int(ds.get("PixelRepresentation", 0) or 0) == 0:
        top = float(2**bits - 1)  # 8-bit display-ready data (e.g. Secondary Capture): as stored
        return to_unit_range(values, top, np.float64), f"nominal range 0..{top:g} (no window)"
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64), "constant image"
    return (values.astype(np.float64) - lo) / (hi - lo), f"full range {lo:g}..{hi:g} (no usable window)"


def prepare(ds: Any, options: PixelOptions = PixelOptions()) -> PreparedImage:
    """The full pipeline: decode, Modality LUT, VOI, MONOCHROME1 inversion; native size."""
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
    return PreparedImage(array=np.ascontiguousarray(img), steps=tuple(steps),
                         original_shape=(int(img.shape[0]), int(img.shape[1])))
