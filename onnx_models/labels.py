"""A transparent, rule-based CheXpert-style labeller for chest X-ray report text.

``label(text)`` finds mentions of the 14 CheXpert observations (Irvin et al., AAAI 2019) with
regular expressions, and classifies each mention as present, absent (negated) or uncertain
from cue words in the same clause, in the spirit of NegEx / the CheXpert labeller. The rules
are deliberately short and readable: every decision can be traced to one pattern below.

Used by
- the model evaluation (clinical efficacy: labels of the reference vs. the generated text),
- the model training (targets for the multi-label observation head),
- the SR builder, which codes findings with ``SNOMED`` (DICOM PS3.16 coding scheme ``SCT``).

It imports only the standard library, so every layer (runtime, offline tooling, ``plugin``) may
use it.

Aggregation over several mentions of one observation: PRESENT wins over UNCERTAIN, which wins
over ABSENT. ``No Finding`` is derived: PRESENT when none of the 12 pathologies (everything but
``No Finding`` and ``Support Devices``) is PRESENT or UNCERTAIN, else ABSENT. Observations that
are not mentioned are left out of the result.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "OBSERVATIONS",
    "ABNORMAL_OBSERVATIONS",
    "PATHOLOGIES",
    "NO_FINDING",
    "Presence",
    "SNOMED",
    "SNOMED_UNVERIFIED",
    "Mention",
    "label",
    "mentions",
    "sentences",
    "binary_vector",
]


class Presence(enum.Enum):
    """State of one observation in a report."""

    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


NO_FINDING = "No Finding"

#: The 14 CheXpert observations, in CheXpert's order.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The 13 abnormal observations (everything but ``No Finding``).
ABNORMAL_OBSERVATIONS: tuple[str, ...] = OBSERVATIONS[1:]

#: Observations that make a study abnormal (``Support Devices`` does not).
PATHOLOGIES: tuple[str, ...] = tuple(o for o in ABNORMAL_OBSERVATIONS if o != "Support Devices")

#: SNOMED CT concept per observation: (code, code meaning), coding scheme designator ``SCT``.
SNOMED: dict[str, tuple[str, str]] = {
    "No Finding": ("281900007", "No abnormality detected"),
    "Enlarged Cardiomediastinum": ("371794008", "Mediastinal enlargement"),
    "Cardiomegaly": ("8186001", "Cardiomegaly"),
    "Lung Lesion": ("309529002", "Lung mass"),
    "Lung Opacity": ("301230006", "Lung finding"),
    "Edema": ("19242006", "Pulmonary edema"),
    "Consolidation": ("95436008", "Lung consolidation"),
    "Pneumonia": ("233604007", "Pneumonia"),
    "Atelectasis": ("46621007", "Atelectasis"),
    "Pneumothorax": ("36118008", "Pneumothorax"),
    "Pleural Effusion": ("60046008", "Pleural effusion"),
    "Pleural Other": ("79644005", "Disorder of pleura"),
    "Fracture": ("125605004", "Fracture of bone"),
    "Support Devices": ("49062001", "Device"),
}

#: Codes above that could not be checked against a SNOMED CT terminology server when this
#: table was written (no network); a site should confirm them with its terminology service.
#: "Lung Opacity" uses the broader (verified) "Lung finding" for want of a verified opacity
#: concept; "Lung Lesion" uses "Lung mass" (parent of "Pulmonary nodule").
SNOMED_UNVERIFIED: frozenset[str] = frozenset({"Enlarged Cardiomediastinum", "Pleural Other"})

# --- mention patterns -------------------------------------------------------------------------
_M: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"enlarged cardiomediastin\w*",
        r"cardiomediastinal (?:silhouette|contour|shadow)s? (?:is |are |appears? |remains? )?"
        r"(?:mildly |moderately |markedly |slightly )?(?:enlarged|widened|prominent)",
        r"cardiomediastinal (?:enlargement|widening|prominence)",
        r"widened mediastinum",
        r"mediastinal (?:widening|enlargement|prominence)",
        r"mediastinum (?:is |appears )?(?:mildly |slightly )?(?:widened|enlarged|prominent)",
        r"(?:enlarged|prominent|widened) (?:superior )?mediastin\w*",
        r"enlarged (?:hilum|hila|hilar)\w*|hilar (?:enlargement|prominence|fullness)",
    ],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"(?:enlarged|large|prominent) (?:heart|cardiac (?:silhouette|size|shadow))",
        r"(?:heart|cardiac (?:silhouette|size|shadow))(?: size)? (?:is |are |appears? |remains? |"
        r"has |is again )?(?:(?:mildly|moderately|markedly|severely|slightly|again|borderline|"
        r"stably|top normal to mildly)\s)*(?:enlarged|increased|large|prominent)",
        r"(?:cardiac|heart) enlargement|enlargement of the (?:heart|cardiac silhouette)",
    ],
    "Lung Lesion": [
        r"nodul\w*",
        r"\bmass(?:es)?\b",
        r"\blesions?\b",
        r"\btumou?r\w*",
        r"carcinoma\w*",
        r"neoplas\w*",
        r"metasta\w*",
        r"\bcavit\w*",
    ],
    "Lung Opacity": [
        r"opaci\w*",
        r"infiltrat\w*",
        r"air ?-?space (?:disease|process)",
        r"increased (?:density|densities|attenuation)",
        r"interstitial (?:marking|opaci|pattern|prominence|disease|lung disease|changes|thickening)\w*",
        r"reticula\w*",
        r"\bscar(?:ring|s)?\b",
        r"fibros\w*|fibrotic",
        r"\bhaz(?:y|iness)\b",
        r"\bdensit(?:y|ies)\b",
    ],
    "Edema": [
        r"edema",
        r"(?:pulmonary |vascular |venous )congestion",
        r"heart failure|\bchf\b",
        r"vascular (?:prominence|engorgement|indistinctness)",
        r"cephalization",
    ],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"pneumoni\w*", r"(?<!granulomatous )infecti\w*"],
    "Atelectasis": [r"atelecta\w*", r"\bcollapse\w*"],
    "Pneumothorax": [r"pneumothora\w*"],
    "Pleural Effusion": [
        r"(?<!pericardial )effusion\w*",
        r"pleural fluid",
        r"(?:blunting|blunted|blunt) (?:of )?(?:the )?(?:\w+ )?costophrenic",
        r"costophrenic (?:angle |sulcus |recess )?(?:blunting|is blunted|are blunted)",
    ],
    "Pleural Other": [
        r"pleural (?:thickening|plaques?|calcification\w*|scarring|reaction)",
        r"pleural(?:-| )parenchymal (?:scarring|thickening)",
        r"apical (?:pleural )?(?:cap|capping|thickening)",
        r"fibrothorax",
    ],
    "Fracture": [r"fractur\w*", r"\bfx\b"],
    "Support Devices": [
        r"pacemaker\w*|\bpacer\b|defibrillator|\bicd\b|\baicd\b",
        r"catheter\w*|\bpicc\b|\bport-?a-?cath\b|\bport\b",
        r"(?:central|venous|jugular|subclavian|midline) (?:venous )?(?:line|catheter)",
        r"(?:endotracheal|tracheostomy|nasogastric|enteric|feeding|chest|gastric|et|ng) tube",
        r"sternotomy|sternal wires?|\bwires?\b",
        r"surgical clips?|\bclips\b|\bstents?\b|prosthe\w*|valve replacement|\bhardware\b|"
        r"\bdrains?\b|\bleads?\b|\bcabg\b",
    ],
}

# Phrases that say an observation is normal (ABSENT) without a negation word.
_NORMAL: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"(?:heart|cardiac) (?:size|silhouette)s? (?:is |are |appears? |remains? )?"
        r"(?:normal|within normal limits|not enlarged|unremarkable|stable and normal)",
        r"normal (?:heart|cardiac) (?:size|silhouette)",
    ],
    "Enlarged Cardiomediastinum": [
        r"(?:cardio)?mediastin\w* (?:silhouette|contour|contours|shadow|size)s? (?:is |are |appears? )?"
        r"(?:normal|within normal limits|unremarkable|stable)",
        r"normal (?:cardio)?mediastinal (?:silhouette|contour|contours)",
        r"mediastinum (?:is )?(?:normal|unremarkable|within normal limits)",
    ],
}

_NEG_PRE = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|"
    r"resolved|removal of|removed|rule out|ruled out|nor|neither|never)\b"
)
# "no change in cardiomegaly", "no significant interval change": not a negation of the finding
_NEG_EXCEPTIONS = re.compile(
    r"\b(?:no|not) (?:significant |substantial |appreciable |interval |significantly )*"
    r"(?:change|changed|increase|increased|decrease|decreased|worse|worsening|progression)\b"
    r"(?: (?:in|of))?|\bnot (?:only|well|certain)\b"
)
_NEG_POST = re.compile(
    r"^[^.;,]{0,40}?\b(?:(?:is|are|was|were|has been|have been) (?:not|no longer) "
    r"(?:seen|identified|present|visualized|evident|appreciated|demonstrated|noted|visible)|"
    r"(?:has|have) resolved|resolved|(?:is|are) absent|(?:is|are) negative)\b"
)
_UNC_PRE = re.compile(
    r"\b(?:may|might|possibl[ey]|probabl[ey]|likely|suspicious|suspected|suspect|questionabl[ey]|"
    r"question of|questioned|cannot (?:be )?(?:exclude|excluded|rule out|ruled out)|"
    r"can't (?:exclude|rule out)|difficult to exclude|not excluded|could|suggest\w*|"
    r"concerning for|concern for|consider\w*|versus|vs|borderline|equivocal|differential|"
    r"presumed|presumably|indeterminate|atypical|maybe|perhaps|vs\.)\b|\?"
)
_UNC_POST = re.compile(
    r"^[^.;]{0,50}?\b(?:(?:cannot|can not|can't) be (?:excluded|ruled out)|not (?:be )?excluded|"
    r"(?:is|are) (?:not )?(?:likely|possible|suspected|questioned)|versus|vs|or not)\b"
)
_NEG_THEN_SUGGEST = re.compile(
    r"\b(?:no|without|not|negative for|free of)\b.*\b(?:to suggest|suggest(?:ing|ive of)|"
    r"to indicate|indicat(?:ing|ive of)|concerning for|compatible with|consistent with)\b"
)
# words that end the scope of a preceding cue
_CLAUSE_BREAK = re.compile(
    r"\b(?:but|however|although|though|except|aside from|apart from|other than|which|whereas|"
    r"yet|with interval|there is|there are|there has been|there has|and there)\b|[;:]"
)

_COMPILED = {obs: [re.compile(p) for p in pats] for obs, pats in _M.items()}
_COMPILED_NORMAL = {obs: [re.compile(p) for p in pats] for obs, pats in _NORMAL.items()}
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\.(?=[A-Z])|\n+|(?<=\.)$")


def _normalise(text: str) -> str:
    text = text.replace("x-XXXX", "x-ray")
    return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str) -> Iterable[str]:
    for sent in re.split(r"(?<=[.!?])\s+|\n+", _normalise(text)):
        # "1. Cardiomegaly. 2. No effusion." -> list numbers are not sentences of their own
        sent = re.sub(r"^\d+\s*[.)]\s*", "", sent.strip())
        for piece in re.split(r"\.(?=[A-Za-z])", sent):
            piece = piece.strip().lower().rstrip(".")
            if piece:
                yield piece


def _classify(sentence: str, start: int, end: int) -> Presence:
    """Classify one mention at ``sentence[start:end]`` from cues in its clause."""
    before = sentence[:start]
    breaks = list(_CLAUSE_BREAK.finditer(before))
    scope = before[breaks[-1].end() :] if breaks else before
    after = sentence[end:]
    after_scope = _CLAUSE_BREAK.split(after, maxsplit=1)[0]
    cleaned = _NEG_EXCEPTIONS.sub(" ", scope)
    if _NEG_THEN_SUGGEST.search(cleaned):  # "no focal opacity to suggest pneumonia"
        return Presence.ABSENT
    unc = _UNC_PRE.search(scope)
    if unc and unc.group(0) == "suspicious" and _NEG_PRE.search(_NEG_EXCEPTIONS.sub(" ", scope[: unc.start()])):
        unc = None  # "no focal consolidation, suspicious pulmonary opacity or effusion": negated list
    if unc or _UNC_POST.search(after_scope):
        return Presence.UNCERTAIN
    if _NEG_PRE.search(cleaned) or _NEG_POST.search(after_scope):
        return Presence.ABSENT
    return Presence.PRESENT


_RANK = {Presence.ABSENT: 0, Presence.UNCERTAIN: 1, Presence.PRESENT: 2}


@dataclass(frozen=True)
class Mention:
    """One mention of an observation in a sentence: ``sentence[start:end]`` matched one of the
    observation's patterns.

    Attributes
    ----------
    observation:
        The CheXpert observation name.
    presence:
        Present, absent or uncertain in its clause.
    start, end:
        Character offsets in the (lower-cased) sentence.
    text:
        The matched words.
    normal:
        One of the observation's normal phrasings (always ABSENT).
    """

    observation: str
    presence: Presence
    start: int
    end: int
    text: str
    normal: bool = False


def sentences(text: str) -> list[str]:
    """``text`` as the labeller reads it.

    Parameters
    ----------
    text:
        Report text.

    Returns
    -------
    list[str]
        Lower-cased sentences, list numbers removed.
    """
    return list(_sentences(text))


def mentions(sentence: str) -> list[Mention]:
    """Every mention of an observation in one sentence, with its presence: the engine behind
    :func:`label`, the grounding step and the SR's coded findings.

    Parameters
    ----------
    sentence:
        One lower-cased sentence (see :func:`sentences`).

    Returns
    -------
    list[Mention]
        The mentions, in pattern order.
    """
    out: list[Mention] = []
    for obs, pats in _COMPILED_NORMAL.items():
        for pat in pats:
            m = pat.search(sentence)
            if m:
                out.append(Mention(obs, Presence.ABSENT, m.start(), m.end(), m.group(0), normal=True))
    for obs, pats in _COMPILED.items():
        for pat in pats:
            for m in pat.finditer(sentence):
                out.append(Mention(obs, _classify(sentence, m.start(), m.end()), m.start(), m.end(), m.group(0)))
    return out


def label(text: str) -> dict[str, Presence]:
    """Label a report (findings and/or impression text) with the 14 CheXpert observations.

    Parameters
    ----------
    text:
        Report text (any case; several sentences).

    Returns
    -------
    dict[str, Presence]
        ``{observation: Presence}`` for the observations the text mentions, plus the derived
        ``No Finding`` (see the module docstring); observations not mentioned are left out. An
        empty text gives an empty dict.
    """
    result: dict[str, Presence] = {}
    if not text or not text.strip():
        return result
    for sentence in _sentences(text):
        for mention in mentions(sentence):
            old = result.get(mention.observation)
            if old is None or _RANK[mention.presence] > _RANK[old]:
                result[mention.observation] = mention.presence
    positive = any(
        result.get(o) in (Presence.PRESENT, Presence.UNCERTAIN) for o in PATHOLOGIES
    )
    result[NO_FINDING] = Presence.ABSENT if positive else Presence.PRESENT
    return {o: result[o] for o in OBSERVATIONS if o in result}


def binary_vector(
    labels: Mapping[str, Presence], observations: Iterable[str] = OBSERVATIONS
) -> list[int]:
    """1 where an observation is PRESENT or UNCERTAIN ("U-ones" policy), else 0."""
    return [
        1 if labels.get(o) in (Presence.PRESENT, Presence.UNCERTAIN) else 0 for o in observations
    ]
