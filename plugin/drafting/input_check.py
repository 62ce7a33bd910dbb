"""The drafting side of the input gate: the checks that need the DICOM header.

``onnx_models.input_gate`` scores each view against the model's training images and
:func:`decide` (re-exported here; ``cxrnode eval`` applies the same rule) turns the verdicts and
``pipeline.input_check`` into a :class:`GateDecision`; this module adds what only the header
tells: a field of view implausible for a chest film. Pure functions, no database, no network.
"""

from __future__ import annotations

from typing import Any

from onnx_models.input_gate import MODES, GateDecision, decide

__all__ = ["MODES", "GateDecision", "decide", "field_of_view_problem", "FIELD_OF_VIEW_MM"]
#: plausible longer side of a chest radiograph's field of view, in mm. Detectors are 35 x 43
#: or 43 x 43 cm; the floor is generous because secondary captures often keep the spacing of
#: the original after downsampling (the SIIM sample: 1,024 px x 0.168 mm = 172 mm)
FIELD_OF_VIEW_MM = (150.0, 600.0)


def field_of_view_problem(ds: Any) -> str | None:
    """Whether the header's pixel spacing says the image cannot be an adult chest film (Imager
    Pixel Spacing, else Pixel Spacing, times Rows/Columns; PS3.3 C.8.11.7, C.7.6.2): a header
    check of the input gate, passed to :func:`onnx_models.input_gate.decide`.

    Parameters
    ----------
    ds:
        The image's data set (a header suffices).

    Returns
    -------
    str or None
        A sentence saying what is wrong; ``None`` when plausible or not stated.
    """
    spacing = ds.get("ImagerPixelSpacing", None) or ds.get("PixelSpacing", None)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    try:
        dy, dx = (float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if dy <= 0 or dx <= 0 or not rows or not cols:
        return None
    longer = max(rows * dy, cols * dx)
    lo, hi = FIELD_OF_VIEW_MM
    if longer < lo or longer > hi:
        return (f"field of view {longer:.0f} mm is implausible for an adult chest radiograph "
                f"(expected {lo:.0f}-{hi:.0f} mm)")
    return None
