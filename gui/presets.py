"""Chest window presets (lung, mediastinum, bone) and window/level steps on keys (Qt-free).

A projection radiograph (CR, DX) has no Hounsfield scale: its values depend on the detector,
the exposure and the processing, so fixed numbers such as CT's lung window (W 1500, L -600)
mean nothing on it. The presets are therefore **relative to the image's own VOI range**: the
window the image came with (Window Center / Width, PS3.3 C.11.2), or, without one, the range
holding 99 % of its pixels (0.5 %-99.5 % quantiles, :func:`gui.imaging._histogram_window`).
Within that range a preset is written in *display* terms, ``t`` running from the end shown
black (0) to the end shown white (1), so MONOCHROME1 and MONOCHROME2 images get the same look:

========== ======= ======= ============================================================
preset     centre  width   what it is for
========== ======= ======= ============================================================
lung       0.45    0.80    the lung fields in mid-greys (vessels, nodules, interstitium,
                           pneumothorax edge); mediastinum and bone white
mediastinum 0.78   0.55    the bright part: heart borders, mediastinal contours, the
                           spine and retrocardiac area through the heart, lines and
                           tubes; lungs black
bone       0.62    0.40    a narrow, high-contrast window through the upper-middle
                           range where ribs, clavicles and spine overlie soft tissue
========== ======= ======= ============================================================

These are starting points, not numbers from a standard, and no radiologist has validated
them: they were picked among candidates by looking at the two real films of
``shared/data/dicom_samples`` (a CR and a DX, MONOCHROME2) and the synthetic studies under each.
The reviewer can still drag or step from them. An image that does carry a Hounsfield scale (``RescaleType`` HU, or
Modality CT: a CT scout, a digitally reconstructed radiograph) gets the usual CT windows
(:data:`HU_PRESETS`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset

from gui.imaging import Picture, WindowLevel

LUNG = "lung"
MEDIASTINUM = "mediastinum"
BONE = "bone"
NAMES = (LUNG, MEDIASTINUM, BONE)


@dataclass(frozen=True)
class RelativePreset:
    """A window in display fractions of the image's VOI range (0 = shown black, 1 = white)."""

    centre: float
    width: float


#: presets for images without a Hounsfield scale (CR, DX): see the module docstring
RELATIVE_PRESETS = {
    LUNG: RelativePreset(0.45, 0.80),
    MEDIASTINUM: RelativePreset(0.78, 0.55),
    BONE: RelativePreset(0.62, 0.40),
}

#: CT windows in Hounsfield units (centre, width), for images that carry that scale
HU_PRESETS = {
    LUNG: WindowLevel(-600.0, 1500.0),
    MEDIASTINUM: WindowLevel(50.0, 350.0),
    BONE: WindowLevel(400.0, 1800.0),
}

#: one key press changes the width by this fraction, or moves the level by this fraction of the width
WIDTH_STEP = 0.10
LEVEL_STEP = 0.05


def has_hounsfield_scale(header: Dataset) -> bool:
    """True when the modality values are Hounsfield units (PS3.3 C.11.1.1.2 Rescale Type ``HU``,
    or a CT image, whose rescaled values are HU by definition)."""
    rescale_type = str(header.get("RescaleType", "") or "").strip().upper()
    modality = str(header.get("Modality", "") or "").strip().upper()
    return rescale_type == "HU" or modality == "CT"


def shown_dark_to_bright(picture: Picture, invert: bool = False) -> bool:
    """True when higher modality values are shown brighter (MONOCHROME2, not inverted)."""
    return picture.inverse == invert


def preset_window(picture: Picture, name: str, invert: bool = False) -> WindowLevel:
    """The window of preset ``name`` for ``picture`` (shown with ``invert`` as the user set it).

    Raises ``KeyError`` naming the presets for an unknown name."""
    if name not in RELATIVE_PRESETS:
        raise KeyError(f"unknown window preset {name!r}: expected one of {', '.join(NAMES)}")
    if has_hounsfield_scale(picture.header):
        return HU_PRESETS[name]
    base = picture.default_window
    lo, width = base.center - base.width / 2.0, max(1.0, base.width)
    rel = RELATIVE_PRESETS[name]
    t = rel.centre if shown_dark_to_bright(picture, invert) else 1.0 - rel.centre
    return WindowLevel(lo + t * width, max(1.0, rel.width * width))


def stepped(window: WindowLevel, picture: Picture, invert: bool, wider: int = 0, brighter: int = 0) -> WindowLevel:
    """The window after key steps: ``wider`` (+1 wider = less contrast, -1 narrower) and
    ``brighter`` (+1 brighter, -1 darker, whatever the photometric interpretation)."""
    width = max(1.0, window.width * (1.0 + WIDTH_STEP) ** wider)
    # a lower centre shows every value brighter when high values are shown bright
    sign = -1.0 if shown_dark_to_bright(picture, invert) else 1.0
    centre = window.center + sign * brighter * LEVEL_STEP * window.width
    return WindowLevel(centre, width)
