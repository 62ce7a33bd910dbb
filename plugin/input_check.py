"""The drafting side of the input gate: which views the model may read, and what to say.

``onnx_models.input_gate`` scores each view against the model's training images; this module
adds the checks that need the DICOM header (a field of view implausible for an adult chest),
applies ``pipeline.input_check`` (``enforce`` | ``warn`` | ``off``) and says what happened, in
the shape ``Draft.token_info["input_check"]`` carries (docs/TEAM_CONTRACTS.md,
``plugin.draft_info``). Pure functions over frozen dataclasses: no database, no network.

- ``enforce``: the draft is written from the views that pass; a study whose views all fail
  gets no generated findings (``withheld``); some failing views make it ``partial``.
- ``warn``: every view is read; failures are recorded and the draft is ``warned``.
- ``off`` (or a bundle without ``input_check``): nothing is checked (``off``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from onnx_models.input_gate import ViewCheck

MODES = ("enforce", "warn", "off")
#: plausible longer side of a chest radiograph's field of view, in mm. Detectors are 35 x 43
#: or 43 x 43 cm; the floor is generous because secondary captures often keep the spacing of
#: the original after downsampling (the SIIM sample: 1,024 px x 0.168 mm = 172 mm)
FIELD_OF_VIEW_MM = (150.0, 600.0)
FRONTAL = ("PA", "AP")
LATERAL = ("LATERAL", "LL")


def field_of_view_problem(ds: Any) -> str | None:
    """A sentence when the header's pixel spacing says the image cannot be an adult chest film
    (Imager Pixel Spacing, else Pixel Spacing, times Rows/Columns; PS3.3 C.8.11.7, C.7.6.2);
    None when plausible or not stated."""
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


@dataclass(frozen=True)
class GateDecision:
    """What the pipeline does with the study's views and what it records."""

    mode: str
    outcome: str  # passed | partial | withheld | warned | off
    reason: str
    use: tuple[int, ...]  # indexes of the views the model reads
    views: tuple[dict[str, Any], ...] = ()
    study: tuple[str, ...] = field(default=())

    @property
    def withheld(self) -> bool:
        return self.outcome == "withheld"

    def notes(self) -> tuple[str, ...]:
        """Sentences for the SR: the views not used (or used despite failing) and why."""
        out = []
        for v in self.views:
            if not v["passed"]:
                verb = "read despite failing the input check" if self.outcome == "warned" else "not used"
                out.append(f"View {v['view']} ({v['sop_instance_uid']}) {verb}: {'; '.join(v['reasons'])}.")
        return tuple(out)

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "outcome": self.outcome, "reason": self.reason,
                "views": [dict(v) for v in self.views], "study": list(self.study)}


def _study_notes(views: Sequence[str]) -> tuple[str, ...]:
    if views and all(v in FRONTAL for v in views):
        return ("frontal-only study (no lateral view)",)
    if views and all(v in LATERAL for v in views):
        return ("lateral-only study (no frontal view)",)
    return ()


def decide(mode: str, sop_instance_uids: Sequence[str], views: Sequence[str],
           checks: Sequence[ViewCheck] | None, header_problems: Sequence[Sequence[str]]) -> GateDecision:
    """Combine the model's verdicts (``checks``; None when the bundle has no gate or the mode is
    ``off``) with the header problems per view into a :class:`GateDecision`."""
    if mode not in MODES:
        raise ValueError(f"input_check mode must be one of {MODES}, got {mode!r}")
    n = len(views)
    if mode == "off" or checks is None:
        why = "pipeline.input_check is off" if mode == "off" else "the model bundle has no input gate"
        return GateDecision(mode, "off", f"not checked: {why}", tuple(range(n)), study=_study_notes(views))
    rows: list[dict[str, Any]] = []
    for uid, view, check, extra in zip(sop_instance_uids, views, checks, header_problems, strict=True):
        reasons = [*extra, *check.reasons]
        rows.append({"sop_instance_uid": uid, "view": view, "passed": not reasons, "reasons": reasons,
                     "ood_score": round(check.scores["score"], 3) if "score" in check.scores else None,
                     "ood_limit": round(check.limits["score"], 3) if "score" in check.limits else None})
    passed = tuple(i for i, r in enumerate(rows) if r["passed"])
    failed = [r for r in rows if not r["passed"]]
    if not failed:
        return GateDecision(mode, "passed", "every view is like the images the model was trained on",
                            tuple(range(n)), tuple(rows), _study_notes(views))
    if mode == "warn":
        return GateDecision(mode, "warned", f"{len(failed)} of {n} view(s) failed the input check; drafted "
                            "from every view anyway (pipeline.input_check = warn)",
                            tuple(range(n)), tuple(rows), _study_notes(views))
    if not passed:
        reasons = sorted({reason for r in failed for reason in r["reasons"]})
        why = reasons[0] if len(reasons) == 1 else "; ".join(f"{r['view']}: {r['reasons'][0]}" for r in failed)
        return GateDecision(mode, "withheld", f"no view can be read by the model: {why}", (), tuple(rows),
                            _study_notes(views))
    return GateDecision(mode, "partial", f"{len(failed)} of {n} view(s) not used: "
                        + "; ".join(f"{r['view']}: {r['reasons'][0]}" for r in failed),
                        passed, tuple(rows), _study_notes([views[i] for i in passed]))
