"""What ``Draft.token_info`` says about a draft besides its words: the input gate's outcome, the
observation probabilities and their decision thresholds (Qt-free, no database).

``token_info`` is one record, :class:`plugin.token_info.TokenInfo` (written with ``to_json``,
read with ``parse``; docs/TEAM_CONTRACTS.md): the types of its gate part (:class:`InputCheck`,
:class:`ViewCheck`) and :func:`decision_thresholds` are re-exported here; the ``parse_*``
functions read one field each through :meth:`TokenInfo.parse`. Drafts written before the gate
have no ``input_check``: :func:`parse_input_check` returns None and the reviewer says "not
checked". Anything unreadable is treated as absent: these are aids, never a failure.

The decision threshold of an observation is the one that decides whether the draft states it:
the grounding step's threshold when the bundle's grounding is on, else the bundle's
observation (prompt) threshold (:func:`decision_thresholds`, the same rule
``onnx_models.runtime.ReportGenerator`` applies).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from plugin.token_info import (
    OUTCOME_OFF,
    OUTCOME_PARTIAL,
    OUTCOME_PASSED,
    OUTCOME_WARNED,
    OUTCOME_WITHHELD,
    OUTCOMES,
    InputCheck,
    TokenInfo,
    ViewCheck,
    decision_thresholds,
)

log = logging.getLogger(__name__)


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


def input_check_from(data: object) -> InputCheck | None:
    """An :class:`InputCheck` from the decoded ``input_check`` object (:meth:`InputCheck.from_json`)."""
    return InputCheck.from_json(data)


def parse_input_check(raw: str | None) -> InputCheck | None:
    """The input gate's outcome from ``Draft.token_info``; None for a draft made before the gate
    (no ``input_check`` key) or an unreadable one (:meth:`TokenInfo.parse`)."""
    return TokenInfo.parse(raw).input_check


def parse_observations(raw: str | None) -> dict[str, float]:
    """``token_info["observations"]`` (name -> probability), in the order written (:meth:`TokenInfo.parse`)."""
    return dict(TokenInfo.parse(raw).observations)


def parse_thresholds(raw: str | None) -> dict[str, float]:
    """``token_info["thresholds"]`` (name -> decision threshold) if the pipeline recorded them, else {}."""
    return dict(TokenInfo.parse(raw).thresholds or {})


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
    "TokenInfo",
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
    return TokenInfo.parse(raw).no_ai_draft_reason
