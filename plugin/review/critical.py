"""Critical drafts: which observations make a draft float to the top of its priority in the
worklist, with a marker (Qt-free, no database). The one rule is :data:`CRITICAL_RULES`.

A draft is *critical* when, for any rule,

* the model's probability of the rule's observation (``token_info["observations"]``) is at least
  the rule's ``min_probability``, or
* the draft's own text (findings + impression, read by the report labeller
  :mod:`onnx_models.labels`) affirms the observation (present, not negated, not uncertain) in a
  sentence that also matches the rule's ``qualifier`` (e.g. *large* effusion, *new*
  consolidation), or matches the rule's ``pattern`` outright (device malposition) without a
  negation.

The rules and why their numbers are what they are:

======================  ===================  ===========  =============================================
marker                  observation          p at least   text that makes it critical
======================  ===================  ===========  =============================================
pneumothorax            Pneumothorax         0.50         any affirmed pneumothorax
large pleural effusion  Pleural Effusion     0.80         an affirmed effusion called large / massive /
                                                          moderate-to-large
new consolidation       Consolidation        0.70         an affirmed consolidation called new /
                                                          developing / increasing
device malposition      (none)               —            "malpositioned", or a tube / line / tip in a
                                                          main bronchus, too high / low / deep,
                                                          coiled, kinked, in the oesophagus
======================  ===================  ===========  =============================================

Honest limits. The probabilities come from a research model trained on simulated films; on
its tuning split the pneumothorax probability separates present from absent no better than
chance (AUROC 0.41, ``onnx_models/bundles/default/MODEL_CARD.md``), so the pneumothorax
marker mostly fires from the draft's text. The model measures neither size nor change: "large"
effusion is approximated by a very confident call (0.80, twice the grounding threshold 0.40)
and "new" consolidation by a confident one (0.70) — the model does not see priors. Device
*presence* (Support Devices) is not malposition: only the text rule can say a device is
misplaced. The marker is a reading-order aid, never a diagnosis; a draft with no marker may
still hold a critical finding.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from onnx_models.labels import Presence, mentions, sentences


@dataclass(frozen=True)
class CriticalRule:
    """One critical finding: its marker text, the observation probability that crosses it, and
    the words of the draft that state it.

    Attributes
    ----------
    marker:
        The text shown in the worklist and the reviewer.
    observation:
        The model's observation name (``""``: the model cannot detect it).
    min_probability:
        The probability at or above which the observation is critical.
    qualifier:
        The draft affirms ``observation`` in a sentence matching this (``None``: any affirmation).
    pattern:
        Or the draft states it in these words (no observation needed), unless negated.
    """

    marker: str
    observation: str = ""  # the model's observation name ("" = the model cannot detect it)
    min_probability: float | None = None
    #: the draft affirms ``observation`` in a sentence matching this (None: any affirmation)
    qualifier: re.Pattern[str] | None = None
    #: or the draft states it in these words (no observation needed), unless negated
    pattern: re.Pattern[str] | None = None


#: a sentence without any of these words cannot cross a text rule (skips the labeller for it)
_RELEVANT = re.compile(r"pneumothora|effusion|pleural fluid|costophrenic|consolidat|tube|tip|line|catheter|cannula"
                       r"|malposit|misplace")
_NEGATED = re.compile(r"\b(?:no|not|without|negative for|free of|resolved|removed)\b")

#: the one rule (documented in the module docstring and the README)
CRITICAL_RULES: tuple[CriticalRule, ...] = (
    CriticalRule("pneumothorax", "Pneumothorax", 0.50),
    CriticalRule("large pleural effusion", "Pleural Effusion", 0.80,
                 qualifier=re.compile(r"\b(?:large|massive|moderate(?:\s*-\s*|\s+to\s+)large|huge)\b")),
    CriticalRule("new consolidation", "Consolidation", 0.70,
                 qualifier=re.compile(r"\b(?:new|newly|developing|increasing|interval development)\b")),
    CriticalRule("device malposition",
                 pattern=re.compile(
                     r"\bmal-?position\w*|\bmisplace\w*"
                     r"|\b(?:tube|tip|line|catheter|cannula)\b[^.;]*?\b(?:(?:right|left) main\s*(?:stem)?\s*bronch\w*"
                     r"|too (?:high|low|deep|proximal|distal)|coiled|kinked|(?:o|oe|e)sophag\w*)")),
)


@dataclass(frozen=True)
class CriticalFinding:
    """Why a draft is critical: the rule's marker and what crossed it.

    Attributes
    ----------
    marker:
        The rule's marker.
    probability, threshold:
        The model's probability and the rule's, when the probability crossed it.
    sentence:
        The draft's sentence, when the text crossed it.
    """

    marker: str
    probability: float | None = None
    threshold: float | None = None
    sentence: str = ""

    def describe(self) -> str:
        if self.probability is not None and self.threshold is not None:
            return f"{self.marker}: model probability {self.probability:.2f} ≥ {self.threshold:.2f}"
        return f"{self.marker}: the draft says \u201c{self.sentence}\u201d"


def _affirmed(sentence: str, observation: str) -> bool:
    return any(m.observation == observation and m.presence is Presence.PRESENT and not m.normal
               for m in mentions(sentence))


def critical_findings(observations: Mapping[str, float], findings: str = "", impression: str = "",
                      rules: tuple[CriticalRule, ...] = CRITICAL_RULES) -> tuple[CriticalFinding, ...]:
    """The critical findings of one draft, one per rule at most, in the order of ``rules``; the
    probability wins over the text when both cross.

    Parameters
    ----------
    observations:
        The draft's observation probabilities (``token_info["observations"]``).
    findings, impression:
        The draft's text.
    rules:
        The table to apply (:data:`CRITICAL_RULES`).

    Returns
    -------
    tuple[CriticalFinding, ...]
        The findings (empty: not critical).
    """
    said = [s for s in sentences(f"{findings}\n{impression}") if _RELEVANT.search(s)]
    out: list[CriticalFinding] = []
    for rule in rules:
        p = observations.get(rule.observation) if rule.observation else None
        if p is not None and rule.min_probability is not None and p >= rule.min_probability:
            out.append(CriticalFinding(rule.marker, probability=p, threshold=rule.min_probability))
            continue
        for s in said:
            if rule.observation and _affirmed(s, rule.observation) and (rule.qualifier is None or rule.qualifier.search(s)):
                out.append(CriticalFinding(rule.marker, sentence=s))
                break
            if rule.pattern is not None and (m := rule.pattern.search(s)) and not _NEGATED.search(s[:m.start()]):
                out.append(CriticalFinding(rule.marker, sentence=s))
                break
    return tuple(out)


def critical_markers(token_info: str, findings: str, impression: str) -> tuple[str, ...]:
    """The markers of a draft from its stored columns (``Draft.token_info``, findings,
    impression), one line per rule crossed (:meth:`CriticalFinding.describe`)."""
    from plugin.token_info import TokenInfo

    return markers_of(TokenInfo.parse(token_info).observations, findings, impression)


def markers_of(observations: Mapping[str, float], findings: str, impression: str) -> tuple[str, ...]:
    """:func:`critical_markers` of a parsed ``token_info`` (its ``observations``)."""
    wanted = tuple(sorted((r.observation, observations[r.observation]) for r in CRITICAL_RULES
                          if r.observation in observations))
    return _markers(wanted, findings, impression)


@functools.lru_cache(maxsize=4096)
def _markers(observed: tuple[tuple[str, float], ...], findings: str, impression: str) -> tuple[str, ...]:
    # cached on the few probabilities the rules read and the text (a draft's never change), not
    # on the whole token_info: the worklist asks again at every refresh
    return tuple(f.describe() for f in critical_findings(dict(observed), findings, impression))


__all__ = ["CRITICAL_RULES", "CriticalFinding", "CriticalRule", "critical_findings", "critical_markers", "markers_of"]
