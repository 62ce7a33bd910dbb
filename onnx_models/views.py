"""The view of a chest radiograph: one rule for the node, ``cxrnode eval`` and ``cxrnode doctor``.

Real archives often tag laterals ``PA`` or leave ViewPosition (0018,5101, PS3.3 C.8.11.5) empty,
so the bundle's view classifier (``ReportGenerator.classify_views``: FRONTAL or LATERAL) decides
the projection and the tag only refines it (PA/AP, LATERAL/LL) when it agrees:

- no view in the tags: the classifier's projection, as PA (the usual erect chest view) or LATERAL;
- tags agree with the classifier: the tags' more specific view;
- tags disagree: the classifier's projection (PA or LATERAL), and the note says so.

Views are then given to the model in one order (:func:`order`: PA, AP, LATERAL, LL, UNKNOWN,
ties kept in the order the images came), so that the node, which reads the instances in
series / instance-number order, and eval, which reads a study's images in its file order, give
the generator the same input. Pure functions, stdlib only: ``plugin.drafting.views`` (DICOM headers) and
``onnx_models.evaluate`` (dataset files) both call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: the views the report generator understands (``onnx_models.runtime.StudyInput``)
VIEWS: tuple[str, ...] = ("PA", "AP", "LATERAL", "LL", "UNKNOWN")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL"})
CLASSIFIER_LABELS = ("FRONTAL", "LATERAL")

#: ViewPosition (0018,5101) values seen in the wild -> the model's view (PS3.3 C.8.11.5.1.1
#: defines AP, PA, LL, RL, RLD, LLD, RLO, LLO; the rest are common site variants)
VIEW_POSITIONS: dict[str, str] = {
    "PA": "PA", "AP": "AP", "LL": "LL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL",
    "L": "LATERAL", "LLAT": "LL", "RLAT": "LATERAL", "PA LAT": "LATERAL", "LARGE LATERAL": "LATERAL",
    "AP SUPINE": "AP", "APS": "AP", "AP ERECT": "AP", "PA ERECT": "PA",
}

#: the order views are given to the model in
ORDER: dict[str, int] = {"PA": 0, "AP": 1, "LATERAL": 2, "LL": 3, "UNKNOWN": 4}


def view_from_position(view_position: str) -> str:
    """The view a ViewPosition (0018,5101) value states.

    Parameters
    ----------
    view_position:
        The attribute's value (any case, padded or not).

    Returns
    -------
    str
        ``PA``, ``AP``, ``LATERAL`` or ``LL``, or ``""`` when it states none we know.
    """
    return VIEW_POSITIONS.get(" ".join(str(view_position or "").upper().split()), "")


def projection(view: str) -> str:
    """FRONTAL, LATERAL or "" for a view name (``FRONTAL`` itself counts as frontal)."""
    if view in FRONTAL_VIEWS or view == "FRONTAL":
        return "FRONTAL"
    if view in LATERAL_VIEWS:
        return "LATERAL"
    return ""


@dataclass(frozen=True)
class ViewDecision:
    view: str  # one of VIEWS except UNKNOWN: what the generator is told
    source: str  # "tags" (the classifier agrees) or "classifier" (tags missing or overruled)
    note: str  # one line for the job log


def resolve(tag_view: str, classifier: tuple[str, float], tag_source: str = "ViewPosition",
            conflict: str = "") -> ViewDecision:
    """Decide one image's view from the view its tags state and the classifier's output.

    ``tag_view``: one of :data:`VIEWS` (or "" / UNKNOWN when the tags state none);
    ``classifier``: ``(label, probability)`` from ``ReportGenerator.classify_views``, label
    FRONTAL or LATERAL; ``conflict``: the tags' own disagreement, appended to the note.
    """
    label, prob = str(classifier[0]).upper(), float(classifier[1])
    if label not in CLASSIFIER_LABELS:
        raise ValueError(f"view classifier label must be FRONTAL or LATERAL, got {classifier[0]!r}")
    tag_proj = projection(tag_view)
    default = "PA" if label == "FRONTAL" else "LATERAL"
    if not tag_proj:
        view, source = default, "classifier"
        note = f"no view in the tags; classifier says {label} ({prob:.2f}): using {view}"
    elif tag_proj == label:
        view, source = tag_view, "tags"
        note = f"{tag_source} {tag_view} agrees with the classifier ({label} {prob:.2f})"
    else:
        view, source = default, "classifier"
        note = f"{tag_source} says {tag_view} but the classifier says {label} ({prob:.2f}): using {view}"
    if conflict:
        note += f" (tags disagree: {conflict})"
    return ViewDecision(view, source, note)


def order(views: Sequence[str]) -> list[int]:
    """Indices of ``views`` in the order the model is given them (see the module docstring)."""
    return sorted(range(len(views)), key=lambda i: (ORDER.get(views[i], len(ORDER)), i))
