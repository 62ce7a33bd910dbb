"""What ``Draft.token_info`` says about a draft besides its words: the input gate's outcome, the
observation probabilities and their decision thresholds (Qt-free, no database).

``token_info`` is the JSON ``plugin.drafting.pipeline`` writes with every draft (docs/TEAM_CONTRACTS.md):
``tokens``, ``observations`` (name -> probability), ``grounded``, ``duration_ms``, optionally
``thresholds`` (name -> decision threshold) and ``input_check`` (the input gate: ``mode``,
``outcome``, ``reason``, per-view results and study-level notes). Drafts written before the gate
have no ``input_check``: :func:`parse_input_check` returns None and the reviewer says "not
checked". Anything unreadable is treated as absent: these are aids, never a failure.

The decision threshold of an observation is the one that decides whether the draft states it:
the grounding step's threshold when the bundle's grounding is on, else the bundle's
observation (prompt) threshold (:func:`decision_thresholds`, the same rule
``onnx_models.runtime.ReportGenerator`` applies).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

OUTCOME_PASSED = "passed"
OUTCOME_PARTIAL = "partial"
OUTCOME_WITHHELD = "withheld"
OUTCOME_WARNED = "warned"
OUTCOME_OFF = "off"
OUTCOMES = (OUTCOME_PASSED, OUTCOME_PARTIAL, OUTCOME_WITHHELD, OUTCOME_WARNED, OUTCOME_OFF)


@dataclass(frozen=True)
class ViewCheck:
    """The input gate's verdict on one view, as recorded in ``token_info["input_check"]``.

    Attributes
    ----------
    sop_instance_uid, view:
        The image and its view.
    passed:
        Whether the gate let it through.
    reasons:
        Why not, in plain words.
    ood_score, ood_limit:
        The gate's score and its limit (``None``: not recorded).
    """

    sop_instance_uid: str
    view: str
    passed: bool
    reasons: tuple[str, ...] = ()
    ood_score: float | None = None
    ood_limit: float | None = None

    def summary(self) -> str:
        """``passed`` or ``not used: <reasons>`` (one line)."""
        if self.passed:
            return "passed the input check"
        return "not used: " + ("; ".join(self.reasons) or "failed the input check")


@dataclass(frozen=True)
class InputCheck:
    """``token_info["input_check"]``: how the gate judged the study before drafting.

    Attributes
    ----------
    mode:
        ``enforce``, ``warn`` or ``off``.
    outcome:
        ``passed``, ``partial``, ``withheld``, ``warned`` or ``off``.
    reason:
        One plain sentence.
    views:
        The verdict on each view.
    study:
        Study-level notes (e.g. ``"frontal-only study"``).
    """

    mode: str  # enforce | warn | off
    outcome: str  # passed | partial | withheld | warned | off
    reason: str = ""
    views: tuple[ViewCheck, ...] = ()
    study: tuple[str, ...] = ()

    @property
    def withheld(self) -> bool:
        return self.outcome == OUTCOME_WITHHELD

    @property
    def failed_views(self) -> tuple[ViewCheck, ...]:
        return tuple(v for v in self.views if not v.passed)

    def for_view(self, sop_instance_uid: str) -> ViewCheck | None:
        return next((v for v in self.views if v.sop_instance_uid == sop_instance_uid), None)


@dataclass(frozen=True)
class ObservationCall:
    """One observation probability with its decision threshold.

    Attributes
    ----------
    name:
        The observation (CheXpert name).
    probability:
        The model's probability.
    threshold:
        The decision threshold (``None`` when unknown).
    """

    name: str
    probability: float
    threshold: float | None = None

    @property
    def called(self) -> bool | None:
        """True when the classifier calls it present, None without a threshold."""
        return None if self.threshold is None else self.probability >= self.threshold

    def log_odds_from_threshold(self) -> float | None:
        if self.threshold is None:
            return None
        return _logit(self.probability) - _logit(self.threshold)


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _load(raw: str | None) -> dict[str, Any]:
    try:
        data = json.loads(raw or "")
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x)):
        return float(x)
    return None


def _strings(x: Any) -> tuple[str, ...]:
    if isinstance(x, str):
        return (x,) if x else ()
    if isinstance(x, list | tuple):
        return tuple(str(i) for i in x if isinstance(i, str | int | float) and str(i))
    return ()


def input_check_from(data: Any) -> InputCheck | None:
    """An :class:`InputCheck` from the decoded ``input_check`` object; None if absent or unreadable."""
    if not isinstance(data, dict):
        return None
    outcome = str(data.get("outcome", "")).strip().lower()
    if outcome not in OUTCOMES:
        log.debug("token_info input_check: unknown outcome %r", outcome)
        return None
    views = []
    for v in data.get("views") or ():
        if not isinstance(v, dict):
            continue
        views.append(ViewCheck(
            sop_instance_uid=str(v.get("sop_instance_uid", "")),
            view=str(v.get("view", "") or "UNKNOWN"),
            passed=bool(v.get("passed", False)),
            reasons=_strings(v.get("reasons")),
            ood_score=_number(v.get("ood_score")),
            ood_limit=_number(v.get("ood_limit")),
        ))
    return InputCheck(
        mode=str(data.get("mode", "")).strip().lower(),
        outcome=outcome,
        reason=str(data.get("reason", "") or "").strip(),
        views=tuple(views),
        study=_strings(data.get("study")),
    )


def parse_input_check(raw: str | None) -> InputCheck | None:
    """The input gate's outcome from ``Draft.token_info``; None for a draft made before the gate
    (no ``input_check`` key) or an unreadable one."""
    return input_check_from(_load(raw).get("input_check"))


def _number_map(x: Any) -> dict[str, float]:
    if not isinstance(x, dict):
        return {}
    return {str(k): v for k, v in ((k, _number(v)) for k, v in x.items()) if v is not None}


def parse_observations(raw: str | None) -> dict[str, float]:
    """``token_info["observations"]`` (name -> probability), in the order written."""
    return _number_map(_load(raw).get("observations"))


def parse_thresholds(raw: str | None) -> dict[str, float]:
    """``token_info["thresholds"]`` (name -> decision threshold), if the pipeline recorded them."""
    return _number_map(_load(raw).get("thresholds"))


def decision_thresholds(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Decision threshold per observation of a bundle manifest: the grounding step's thresholds
    when grounding is enabled (they decide what the draft states), else the observation
    (prompt) thresholds.

    Parameters
    ----------
    manifest:
        A bundle's manifest.

    Returns
    -------
    dict[str, float]
        Threshold by observation name; ``{}`` when the manifest has none.
    """
    obs = manifest.get("observations") or {}
    names = [str(n) for n in obs.get("names", [])]
    thr = obs.get("thresholds")
    grounding = (manifest.get("generation") or {}).get("grounding") or {}
    if grounding.get("enabled") and grounding.get("thresholds"):
        thr = grounding["thresholds"]
    if not names or not isinstance(thr, list) or len(thr) != len(names):
        return {}
    return {n: float(t) for n, t in zip(names, thr, strict=True)}


@functools.lru_cache(maxsize=8)
def bundle_thresholds(bundle: str, model_name: str, model_version: str) -> dict[str, float]:
    """Decision thresholds of the configured ``bundle`` if it is the model (name and version) that
    made the draft; {} otherwise or when the bundle cannot be read (its files are not hashed:
    only the manifest is read)."""
    from onnx_models.bundle import BundleError, load_bundle

    try:
        b = load_bundle(bundle, verify=False)
    except (BundleError, OSError, ValueError) as exc:
        log.debug("thresholds: bundle %r unreadable: %s", bundle, exc)
        return {}
    if (b.name, b.version) != (model_name, model_version):
        return {}
    return decision_thresholds(b.manifest)


def observation_calls(observations: Mapping[str, float], thresholds: Mapping[str, float]) -> tuple[ObservationCall, ...]:
    """Observations with their thresholds, most probable first."""
    calls = [ObservationCall(n, p, thresholds.get(n)) for n, p in observations.items()]
    return tuple(sorted(calls, key=lambda c: -c.probability))


__all__ = [
    "InputCheck",
    "OUTCOMES",
    "OUTCOME_OFF",
    "OUTCOME_PARTIAL",
    "OUTCOME_PASSED",
    "OUTCOME_WARNED",
    "OUTCOME_WITHHELD",
    "ObservationCall",
    "ViewCheck",
    "bundle_thresholds",
    "decision_thresholds",
    "input_check_from",
    "observation_calls",
    "parse_input_check",
    "parse_observations",
    "parse_thresholds",
    "parse_no_ai_draft",
]


def parse_no_ai_draft(raw: str | None) -> str:
    """Why a draft row holds no AI draft (``token_info["no_ai_draft"]["reason"]``, written when a
    radiologist reports a study from scratch: :mod:`plugin.review.scratch`); "" for an AI draft."""
    try:
        data = json.loads(raw or "")
    except (TypeError, ValueError):
        return ""
    item = data.get("no_ai_draft") if isinstance(data, dict) else None
    if not isinstance(item, dict):
        return ""
    return str(item.get("reason") or "no AI draft")

