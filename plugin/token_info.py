"""``Draft.token_info``: what a draft records besides its words, one typed record serialised one way.

:class:`TokenInfo` is written by the drafting pipeline (:mod:`plugin.drafting.pipeline`) and by
a report from scratch (:mod:`plugin.review.scratch`) with :meth:`TokenInfo.to_json`, and read by
everything else (:mod:`plugin.review.service`, :mod:`plugin.review.draft_info`,
:mod:`plugin.review.critical`, :mod:`plugin.review.priors`, the ``demo``) with
:meth:`TokenInfo.parse` (docs/TEAM_CONTRACTS.md). The JSON object:

``tokens``
    ``[[word, probability], ...]``: the decoder's words (probabilities to 4 places).
``observations``
    ``{name: probability}``: the observation probabilities, in the order the model gave them.
``thresholds`` (optional)
    ``{name: threshold}``: the decision thresholds of the drafting bundle
    (:func:`decision_thresholds`); absent in a withheld draft and in older drafts.
``grounded``
    ``[[sentence, probability], ...]``: the sentences the grounding step added.
``duration_ms``
    The generation time (0 when nothing was generated).
``input_check`` (optional)
    The input gate's outcome (:class:`InputCheck`; ``onnx_models.input_gate.GateDecision.as_json``);
    absent in a draft made before the gate ("not checked").
``prior`` (optional)
    ``{"outcome", "reason", "study_instance_uid"?, "study_date"?}``: the prior fetched for
    comparison (absent when priors were off).
``no_ai_draft`` (optional)
    ``{"reason": ...}``: a report written from scratch, with why there is no AI draft.

Reading is lenient: rows written before a key existed read as its absence, anything unreadable
(broken JSON, a value of the wrong type) as empty: these are aids, never a failure. Stdlib only:
drafting and review both use it, neither owns it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "OUTCOMES",
    "OUTCOME_OFF",
    "OUTCOME_PARTIAL",
    "OUTCOME_PASSED",
    "OUTCOME_WARNED",
    "OUTCOME_WITHHELD",
    "InputCheck",
    "TokenInfo",
    "ViewCheck",
    "decision_thresholds",
]

OUTCOME_PASSED = "passed"
OUTCOME_PARTIAL = "partial"
OUTCOME_WITHHELD = "withheld"
OUTCOME_WARNED = "warned"
OUTCOME_OFF = "off"
OUTCOMES = (OUTCOME_PASSED, OUTCOME_PARTIAL, OUTCOME_WITHHELD, OUTCOME_WARNED, OUTCOME_OFF)

#: word-piece markers a tokenizer may leave on a word (GPT-2 ``Ġ``, SentencePiece ``▁``, WordPiece ``##``)
_MARKERS = ("Ġ", "▁")


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

    @classmethod
    def from_json(cls, data: Any) -> InputCheck | None:
        """An :class:`InputCheck` from the decoded ``input_check`` object; None if absent, or its
        outcome is not one of :data:`OUTCOMES` (the rest is read leniently)."""
        if not isinstance(data, dict):
            return None
        outcome = str(data.get("outcome", "")).strip().lower()
        if outcome not in OUTCOMES:
            log.debug("token_info input_check: unknown outcome %r", outcome)
            return None
        views = [
            ViewCheck(
                sop_instance_uid=str(v.get("sop_instance_uid", "")),
                view=str(v.get("view", "") or "UNKNOWN"),
                passed=bool(v.get("passed", False)),
                reasons=_strings(v.get("reasons")),
                ood_score=_number(v.get("ood_score")),
                ood_limit=_number(v.get("ood_limit")),
            )
            for v in data.get("views") or () if isinstance(v, dict)
        ]
        return cls(
            mode=str(data.get("mode", "")).strip().lower(),
            outcome=outcome,
            reason=str(data.get("reason", "") or "").strip(),
            views=tuple(views),
            study=_strings(data.get("study")),
        )

    def to_json(self) -> dict[str, Any]:
        """The decoded JSON object (the shape of ``GateDecision.as_json()``)."""
        return {"mode": self.mode, "outcome": self.outcome, "reason": self.reason,
                "views": [{"sop_instance_uid": v.sop_instance_uid, "view": v.view, "passed": v.passed,
                           "reasons": list(v.reasons), "ood_score": v.ood_score, "ood_limit": v.ood_limit}
                          for v in self.views],
                "study": list(self.study)}


@dataclass(frozen=True)
class TokenInfo:
    """What one draft records besides its words (see the module docstring for the JSON).

    Attributes
    ----------
    tokens:
        The decoder's words with their probabilities (word-piece markers removed when read).
    observations:
        Observation name -> probability.
    grounded:
        The sentences the grounding step added, with the probability behind each.
    duration_ms:
        The generation time.
    thresholds:
        Observation name -> decision threshold of the drafting bundle.
    input_check:
        The input gate's outcome.
    prior:
        The prior fetched for comparison (``outcome``, ``reason``, ...).
    no_ai_draft:
        A report from scratch: why there is no AI draft.

    ``thresholds``, ``input_check``, ``prior`` and ``no_ai_draft`` are None when not recorded
    (the key is then left out of the JSON).
    """

    tokens: tuple[tuple[str, float], ...] = ()
    observations: Mapping[str, float] = field(default_factory=dict)
    grounded: tuple[tuple[str, float], ...] = ()
    duration_ms: float = 0.0
    thresholds: Mapping[str, float] | None = None
    input_check: InputCheck | None = None
    prior: Mapping[str, str] | None = None
    #: a report from scratch: why there is no AI draft (None: an AI draft)
    no_ai_draft: str | None = None

    @property
    def no_ai_draft_reason(self) -> str:
        """Why the draft row holds no AI draft; "" for an AI draft."""
        return self.no_ai_draft or ""

    def to_json(self) -> str:
        """The one serialisation (``Draft.token_info``): probabilities to 4 places, the time to 0.1 ms."""
        data: dict[str, Any] = {
            "tokens": [[w, round(float(p), 4)] for w, p in self.tokens],
            "observations": {k: round(float(v), 4) for k, v in self.observations.items()},
        }
        if self.thresholds is not None:
            data["thresholds"] = dict(self.thresholds)
        data["grounded"] = [[s, round(float(p), 4)] for s, p in self.grounded]
        data["duration_ms"] = round(float(self.duration_ms), 1)
        if self.input_check is not None:
            data["input_check"] = self.input_check.to_json()
        if self.prior is not None:
            data["prior"] = dict(self.prior)
        if self.no_ai_draft is not None:
            data["no_ai_draft"] = {"reason": self.no_ai_draft}
        return json.dumps(data)

    @classmethod
    def parse(cls, raw: str | None) -> TokenInfo:
        """The record of ``Draft.token_info`` (any row the node ever wrote; see the module docstring).

        Word-piece markers (``Ġ``, ``▁``, ``##``) are taken off the words; pairs that are not
        ``[str, number]`` are left out; an unreadable or non-object value reads as empty.
        """
        try:
            data = json.loads(raw or "")
        except (TypeError, ValueError):
            return cls()
        if not isinstance(data, dict):
            return cls()
        thresholds = data.get("thresholds")
        prior = data.get("prior")
        no_ai = data.get("no_ai_draft")
        return cls(
            tokens=tuple((word, p) for w, p in _pairs(data.get("tokens")) if (word := _word(w))),
            observations=_number_map(data.get("observations")),
            grounded=_pairs(data.get("grounded")),
            duration_ms=_number(data.get("duration_ms")) or 0.0,
            thresholds=_number_map(thresholds) if isinstance(thresholds, dict) else None,
            input_check=InputCheck.from_json(data.get("input_check")),
            prior={str(k): str(v) for k, v in prior.items()} if isinstance(prior, dict) else None,
            no_ai_draft=str(no_ai.get("reason") or "no AI draft") if isinstance(no_ai, dict) else None,
        )


def decision_thresholds(manifest: Mapping[str, Any]) -> dict[str, float]:
    """Decision threshold per observation of a bundle manifest: the grounding step's thresholds
    when grounding is enabled (they decide what the draft states), else the observation
    (prompt) thresholds. The pipeline records them as ``thresholds``; the same rule
    ``onnx_models.runtime.ReportGenerator`` applies.

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


def _word(w: str) -> str:
    for marker in _MARKERS:
        w = w.replace(marker, "")
    return w.removeprefix("##").strip()


def _pairs(items: Any) -> tuple[tuple[str, float], ...]:
    """``[[text, number], ...]`` as pairs; anything else is left out."""
    if not isinstance(items, list):
        return ()
    return tuple((i[0], float(i[1])) for i in items
                 if isinstance(i, list | tuple) and len(i) >= 2 and isinstance(i[0], str)
                 and isinstance(i[1], int | float) and not isinstance(i[1], bool))


def _number(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(float(x)):
        return float(x)
    return None


def _number_map(x: Any) -> dict[str, float]:
    if not isinstance(x, dict):
        return {}
    return {str(k): v for k, v in ((k, _number(v)) for k, v in x.items()) if v is not None}


def _strings(x: Any) -> tuple[str, ...]:
    if isinstance(x, str):
        return (x,) if x else ()
    if isinstance(x, list | tuple):
        return tuple(str(i) for i in x if isinstance(i, str | int | float) and str(i))
    return ()
