"""Report consistency: one checker and the rules that make a draft pass it.

A draft reads like a careful radiologist wrote it when

- **no contradiction**: every observation has one state in the whole report (findings and
  impression). A sentence that affirms an observation (present or uncertain, as
  :mod:`onnx_models.labels` reads it) and another that negates it, explicitly ("no pleural
  effusion") or with a normal phrasing that covers it ("heart size is normal", "the lungs are
  clear", "no acute cardiopulmonary abnormality"), contradict each other;
- **no duplicate**: within a section an observation is affirmed in one sentence (two findings of
  one kind on opposite sides, "right upper lobe opacity" and "left basilar opacity", are two
  findings), no sentence is repeated word for word, and the impression does not give an
  observation another side or size than the findings;
- **no fragment**: every sentence has a content word and does not end on a dangling word
  ("There is a.", "1. 2.", a stray "."), an article agrees with its noun ("a small bilateral
  pleural effusions"), and list numbers ("1.", "2.") appear only in the impression, each before
  a sentence, counting up from 1 (the IU X-ray reference style: numbered impressions only).

:func:`check` finds these :class:`Issue` s in a report; :func:`rates` counts them per 100 reports
(``cxrnode eval`` prints them for the drafts and the reference reports); :func:`make_consistent`
applies the rules to a draft's tokens (word, probability), sentence by sentence, so every kept
word keeps its probability:

- fragments are dropped; agreement is fixed ("There is a ... effusions" -> "There are ...
  effusions"); list numbers are dropped where they are not allowed and renumbered where they are;
- a contradiction keeps the side the observation probability supports (probability >= its
  threshold: affirmed) and removes the other side: the item of a negated list ("No pneumothorax
  or pleural effusion." -> "No pneumothorax."), else the clause ("..., there is no effusion"),
  else the sentence, whichever is the least that leaves everything else said as it was; an
  impression sentence that says "no acute abnormality" under supported acute findings is
  replaced by a summary of the findings ("Small right pleural effusion.");
- of the sentences that affirm one observation in a section, the most specific one is kept
  (most size/side/location words, no repeated words, then the decoder's mean probability, then
  the earliest); a sentence is only dropped when everything it affirms is said elsewhere; a
  sentence that repeats itself ("airspace disease with left lower lobe airspace disease with
  ...") is cut where the repeat starts;
- an impression sentence whose side or size disagrees with the findings is dropped on the same
  condition.

Pure functions, standard library and the labeller only (the runtime and the eval use them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import labels
from .labels import Presence
from .tokenizer import join_words

__all__ = ["Issue", "Edit", "KINDS", "check", "check_tokens", "rates", "make_consistent", "split_sentences",
           "text_tokens", "ACUTE"]

Token = tuple[str, float]
SECTIONS = ("findings", "impression")
KINDS = ("contradiction", "duplicate", "fragment")

#: observations that "no acute (cardiopulmonary) abnormality" rules out (Lung Opacity only for
#: airspace opacity, not scarring or fibrosis); cardiomegaly, nodules, atelectasis, old
#: fractures and devices often stand beside such an impression in the reference reports
ACUTE = ("Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Pneumothorax", "Pleural Effusion")
#: observations that can be present more than once (two nodules, clips and wires): a duplicate
#: is the same kind of finding (same mention word) said twice, not the same observation
_MULTIPLE = {"Lung Lesion", "Lung Opacity", "Fracture", "Support Devices", "Pleural Other"}
_LUNG = ("Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
_ALL = tuple(labels.PATHOLOGIES)

_ENDS = frozenset(".;!?")
_WORDS = re.compile(r"\w+|[^\w\s]")

# --- normal phrasings that cover observations (in one clause) ------------------------------------
_NOT_NORMAL = re.compile(r"\b(?:enlarge\w*|large|cardiomegaly|widen\w*|prominen\w*|abnormal\b|increased|"
                         r"upper limits? of normal|top normal|high normal|borderline)")
_BONE = re.compile(r"\b(?:osseous|bony|bone|bones|skeletal|osseus|ribs?|spine|thoracic spine)\b")
_COVER: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    (re.compile(r"\b(?:heart|cardiac)\b.*\b(?:normal|within normal limits|unremarkable|not enlarged)\b"
                r"|\bnormal (?:heart|cardiac)\b"), ("Cardiomegaly",)),
    (re.compile(r"\bcardiomediastin\w*\b.*\b(?:normal|within normal limits|unremarkable|stable)\b"
                r"|\bnormal cardiomediastin"), ("Cardiomegaly", "Enlarged Cardiomediastinum")),
    (re.compile(r"\bmediastin\w*\b.*\b(?:normal|within normal limits|unremarkable)\b|\bnormal mediastin"),
     ("Enlarged Cardiomediastinum",)),
    (re.compile(r"\blungs?\b(?: fields)?(?: are| is| appear| remain)?(?: now)?(?: \w+ and)? clear\b"
                r"|\bclear lungs?\b|\blungs? (?:are |is )?(?:grossly )?(?:normal|unremarkable)\b"),
     _LUNG),
    (re.compile(r"\b(?:pleural spaces?|costophrenic (?:angles?|sulci|recesses))\b.*\b(?:clear|sharp|normal)\b"),
     ("Pleural Effusion",)),
    (re.compile(r"\b(?:osseous|bony|bone|skeletal|osseus)\b.*\b(?:intact|unremarkable|normal|"
                r"within normal limits|without acute)|\bno acute (?:bony|osseous|osseus|bone|skeletal)"),
     ("Fracture",)),
    (re.compile(r"\b(?:normal|negative|unremarkable|clear) (?:chest|exam\w*|study|radiograph\w*)\b"
                r"|^(?:normal|negative)(?: chest)?$"), _ALL),
    (re.compile(r"\b(?:no|without|negative for|free of)\b(?: \w+){0,3}? (?:acute|active)\b(?! (?:bony|osseous|osseus|bone|skeletal))"
                r"(?: \w+){0,4}? (?:abnormalit\w*|disease|process\w*|findings?|patholog\w*|changes?)\b"),
     ACUTE),
]
_CLAUSES = re.compile(r"[,;:]|\b(?:but|however|although|except|with|which|without evidence)\b")
_ACUTE_OPACITY = re.compile(r"air ?-?space|infiltrat|opacit|consolidat|haz")
_CHRONIC = re.compile(r"scar|fibros|fibrotic|granulom|calcifi|chronic|\bold\b|healed|remote|deformit|reticul|"
                      r"interstitial|emphysem|copd")

# --- words ---------------------------------------------------------------------------------------
_SIDES = {"right": "R", "left": "L", "bilateral": "B", "bilaterally": "B", "bibasilar": "B",
          "bibasal": "B", "both": "B", "bilat": "B"}
_SIZES = {"tiny": "small", "trace": "small", "minimal": "small", "small": "small", "mild": "small",
          "mildly": "small", "slight": "small", "slightly": "small", "minimally": "small",
          "moderate": "moderate", "moderately": "moderate", "large": "large", "massive": "large",
          "severe": "large", "severely": "large", "marked": "large", "markedly": "large"}
_PLACES = {"upper", "lower", "middle", "lobe", "base", "bases", "basilar", "basal", "apex", "apical",
           "apices", "lingula", "lingular", "hilar", "perihilar", "retrocardiac", "lateral", "medial",
           "anterior", "posterior", "inferior", "superior", "mid", "midline", "focal", "patchy", "diffuse",
           "subsegmental", "streaky", "linear", "calcified", "chronic", "stable", "new"}
_STOP = {"a", "an", "the", "there", "is", "are", "was", "were", "be", "been", "has", "have", "of",
         "in", "on", "at", "to", "with", "and", "or", "for", "by", "from", "no", "not", "than", "this",
         "that", "these", "those", "as", "it", "its", "which", "also", "again", "seen", "noted",
         "identified", "xxxx", "greater", "less", "more", "most", "very", "some", "side", "sided",
         "appear", "appears", "within", "without", "but", "nor", "into", "versus", "vs", "may"}
_MODIFIERS = set(_SIDES) | set(_SIZES) | _PLACES
_DANGLING = {"a", "an", "the", "of", "in", "on", "at", "to", "with", "and", "or", "for", "by", "from",
             "is", "are", "was", "were", "be", "there", "no", "without", "than", "which", "that",
             "as", "but", "nor", "into", "within", "versus", "vs", "may", "could", "represent"}
_HEAD_STOP = {"of", "in", "on", "at", "to", "with", "and", "or", "is", "are", "which", "that", "from",
              "the", "there", "without", "no", "seen", "noted", "identified", "present", "again", "for",
              "within", "along", "involving", "overlying", "projecting", "measuring", "likely", "was",
              "were", "has", "does", "appears", "remains", "seems", "measures", "represents", "persists",
              "suggests", "extends", "projects", "overlies", "obscures", "abuts", "versus", "vs", "but"}
#: findings named in the singular that "there are" cannot introduce
_SINGULAR = {"effusion", "opacity", "nodule", "mass", "lesion", "infiltrate", "density", "consolidation",
             "pneumothorax", "fracture", "atelectasis", "edema", "cardiomegaly", "pneumonia", "granuloma",
             "calcification", "abnormality", "disease", "process", "congestion", "thickening", "scarring"}
_PLURAL_OK = re.compile(r"(?:ss|is|us|ous|os|ax|ex|ix)$")
_NUMBER = re.compile(r"\d{1,2}")
_DUE = re.compile(r"list number \d+ where (\d+) is due")


def _plural(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not _PLURAL_OK.search(word) and word.isalpha()


# --- data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    """One consistency problem: ``kind`` is ``contradiction``, ``duplicate`` or ``fragment``;
    ``sentences`` are (section, index) of the sentences involved; ``detail`` says which rule."""

    kind: str
    detail: str
    sentences: tuple[tuple[str, int], ...]
    observation: str = ""
    #: the observation, or for one that can occur more than once, the kind of finding
    key: str = ""


@dataclass
class _Statement:
    """An affirmed observation in one sentence, with the side and size words of its sentence."""

    key: str
    observation: str
    sides: frozenset[str]
    sizes: frozenset[str]


@dataclass
class _Sentence:
    section: str
    index: int
    tokens: list[Token]
    words: list[str] = field(default_factory=list)
    text: str = ""
    marker: int | None = None
    affirmed: dict[str, _Statement] = field(default_factory=dict)  # key -> statement
    affirmed_obs: set[str] = field(default_factory=set)
    negated: set[str] = field(default_factory=set)
    covered: set[str] = field(default_factory=set)  # negated by a normal phrasing
    repeats: bool = False  # a content word or a mention said twice inside the sentence
    twice: set[str] = field(default_factory=set)  # keys affirmed twice inside the sentence

    @property
    def ref(self) -> tuple[str, int]:
        return (self.section, self.index)

    @property
    def specificity(self) -> tuple[int, float, int]:
        qualifiers = sum(1 for w in self.words if w in _MODIFIERS)
        mean_p = sum(p for _, p in self.tokens) / max(1, len(self.tokens))
        return (qualifiers - (10 if self.repeats else 0), mean_p, -self.index)


# --- splitting -----------------------------------------------------------------------------------
def _explode(tokens: Iterable[Token]) -> list[Token]:
    """Tokens with runs of punctuation ("..", ".,") split into one token per character."""
    out: list[Token] = []
    for w, p in tokens:
        if len(w) > 1 and not re.search(r"\w", w):
            out += [(c, p) for c in w if not c.isspace()]
        else:
            out.append((w, p))
    return out


def split_sentences(tokens: Sequence[Token]) -> list[list[Token]]:
    """``tokens`` cut after each sentence-ending token (``.;!?``; the last piece may lack one);
    an empty word also ends a sentence and is left out."""
    out: list[list[Token]] = [[]]
    for tok in tokens:
        if tok[0]:
            out[-1].append(tok)
        if tok[0] in _ENDS or not tok[0]:
            out.append([])
    return [s for s in out if s]


def text_tokens(text: str, prob: float = 1.0) -> list[Token]:
    """A report text as tokens (lower-cased words and single punctuation marks, like the
    tokenizer's), each with ``prob``."""
    return [(w, prob) for w in _WORDS.findall(text.lower())]


def _detok(words: Sequence[str]) -> str:
    return join_words(words).lower()


# --- analysis ------------------------------------------------------------------------------------
def _covered(text: str) -> set[str]:
    """The keys a normal phrasing in ``text`` rules out (of the observations that can occur more
    than once, only acute airspace opacity and an acute fracture)."""
    out: set[str] = set()
    for clause in _CLAUSES.split(text.rstrip(".;!? ")):
        clause = clause.strip()
        if not clause:
            continue
        for pat, observations in _COVER:
            if observations == ACUTE and _BONE.search(clause):
                continue  # "osseous structures are without acute abnormality": the bones only
            if pat.search(clause) and (observations == ACUTE or not _NOT_NORMAL.search(clause)):
                out.update(o for o in observations if o not in _MULTIPLE)
                if "Lung Opacity" in observations:
                    out.update(("Lung Opacity:acute", "Lung Opacity:infil"))
                if "Fracture" in observations:
                    out.add("Fracture:fract")
    return out


def _key(observation: str, mention_text: str, sentence: str) -> str:
    """What one statement is about: the observation, or for an observation that can occur more
    than once its kind ("chronic" for scarring, healed fractures; "acute" for airspace opacity;
    else the mention word: "nodule", "clips")."""
    if observation not in _MULTIPLE:
        return observation
    if _CHRONIC.search(sentence):
        return f"{observation}:chronic"
    if observation == "Lung Opacity" and _ACUTE_OPACITY.search(mention_text):
        # "opacity" is wider than "infiltrate": "no acute infiltrate" beside "basilar opacities"
        # (atelectasis, scarring) is how radiologists write, not a contradiction
        return f"{observation}:infil" if "infiltrat" in mention_text else f"{observation}:acute"
    stem = re.sub(r"[^a-z]", "", mention_text.split()[-1] if mention_text.split() else mention_text)
    return f"{observation}:{stem[:5]}"


def _observation(key: str) -> str:
    return key.split(":", 1)[0]


def _analyse(section: str, index: int, tokens: list[Token]) -> _Sentence:
    s = _Sentence(section, index, tokens)
    s.words = [w.lower() for w, _ in tokens]
    s.text = _detok(s.words)
    body = [w for w in s.words if w not in _ENDS]
    if len(body) == 1 and _NUMBER.fullmatch(body[0]):
        s.marker = int(body[0])
        return s
    sides = frozenset(_SIDES[w] for w in body if w in _SIDES)
    sizes = frozenset(_SIZES[w] for w in body if w in _SIZES)
    seen_keys: dict[str, list[tuple[int, int]]] = {}
    for m in labels.mentions(s.text.rstrip(".;!? ")):
        if m.observation == labels.NO_FINDING:
            continue
        key = _key(m.observation, m.text, s.text)
        if m.presence is Presence.ABSENT:
            s.negated.add(key)
            continue
        word = re.sub(r"[^a-z]", "", (m.text.split() or [""])[-1])[:5]
        spans = seen_keys.setdefault(f"{key}|{word}", [])
        if not any(m.start < e and b < m.end for b, e in spans):  # overlapping patterns: one mention
            spans.append((m.start, m.end))
        s.affirmed[key] = _Statement(key, m.observation, sides, sizes)
        s.affirmed_obs.add(m.observation)
    s.negated -= set(s.affirmed)
    s.covered = _covered(s.text) - set(s.affirmed)
    s.twice = {k.split("|")[0] for k, spans in seen_keys.items() if len(spans) > 1}
    content = [w for w in body if w.isalpha() and len(w) > 2 and w not in _STOP and w not in _MODIFIERS]
    s.repeats = bool(s.twice) or len(content) != len(set(content))
    return s


def _negates(s: _Sentence, key: str) -> bool:
    return key in s.negated or key in s.covered


def _analyse_report(sections: Mapping[str, list[list[Token]]]) -> list[_Sentence]:
    return [_analyse(sec, i, toks) for sec in SECTIONS for i, toks in enumerate(sections.get(sec, []))]


# --- the checker ---------------------------------------------------------------------------------
def _fragment(s: _Sentence, following: _Sentence | None, allowed_numbers: bool,
              expected: int) -> str | None:
    """Why ``s`` is a fragment (None when it is not)."""
    body = [w for w in s.words if w not in _ENDS]
    if s.marker is not None:
        if not allowed_numbers:
            return "list number outside the impression"
        if following is None or following.marker is not None or _fragment(following, None, False, 0):
            return "list number without a sentence"
        if s.marker != expected:
            return f"list number {s.marker} where {expected} is due"
        return None
    if not body or all(not re.search(r"\w", w) for w in body):
        return "no words"
    content = [w for w in body if re.fullmatch(r"[a-z]+", w) and len(w) > 2
               and w not in _STOP and w not in _MODIFIERS]
    if not content:
        return "no content word"
    if body[-1] in _DANGLING:
        return f"ends on {body[-1]!r}"
    if _agreement(body) is not None:
        return "article before a plural noun"
    return None


def _head(words: Sequence[str]) -> str | None:
    """The last word of the noun phrase at the start of ``words``."""
    head = None
    for v in words:
        if v in _HEAD_STOP or not re.fullmatch(r"[a-z]+|-", v) or (head and v.endswith("ing")):
            break
        if v != "-":
            head = v
            if _plural(v):
                break  # "low lung volumes causing ...": the head is found
    return head


def _agreement(words: Sequence[str]) -> int | None:
    """Index of an article ("a", "an") whose noun phrase ends on a plural noun, or of "are" in
    "there are (no) ..." before a singular finding ("There are small right pleural effusion."),
    else None."""
    for i, w in enumerate(words):
        if w in ("a", "an") and i + 1 < len(words) and words[i + 1] not in ("few", "couple", "number", "lot", "series"):
            head = _head(words[i + 1 :])
            if head is not None and _plural(head):
                return i
        elif w == "are" and i >= 1 and words[i - 1] == "there":
            rest = words[i + 1 :]
            head = _head(rest[1:] if rest[:1] == ["no"] else rest)
            if head in _SINGULAR:
                return i
    return None


def _issues(sents: list[_Sentence]) -> list[Issue]:
    issues: list[Issue] = []
    # fragments and list numbers
    for sec in SECTIONS:
        in_sec = [s for s in sents if s.section == sec]
        expected = 1
        for j, s in enumerate(in_sec):
            nxt = in_sec[j + 1] if j + 1 < len(in_sec) else None
            why = _fragment(s, nxt, sec == "impression", expected)
            if why:
                issues.append(Issue("fragment", why, (s.ref,)))
            elif s.marker is not None:
                expected += 1
    live = [s for s in sents if s.marker is None]
    # contradictions: one state per observation in the whole report
    for key in sorted({k for s in live for k in s.affirmed}):
        pro = [s for s in live if key in s.affirmed]
        con = [s for s in live if s not in pro and _negates(s, key)]
        if con:
            issues.append(Issue("contradiction", "affirmed and negated", tuple(s.ref for s in pro + con),
                                _observation(key), key))
    # duplicates: within a section
    for sec in SECTIONS:
        in_sec = [s for s in live if s.section == sec]
        seen: dict[str, _Sentence] = {}
        for s in in_sec:
            key = " ".join(w for w in s.words if w not in _ENDS)
            if key and key in seen:
                issues.append(Issue("duplicate", "repeated sentence", (seen[key].ref, s.ref)))
            seen.setdefault(key, s)
        for key, group in _groups(in_sec).items():
            for sub in _by_side(group, key):
                if len(sub) > 1:
                    issues.append(Issue("duplicate", "stated twice", tuple(s.ref for s in sub),
                                        sub[0].affirmed[key].observation, key))
        for s in in_sec:
            if s.twice:
                issues.append(Issue("duplicate", "stated twice in one sentence", (s.ref,),
                                    s.affirmed[min(s.twice)].observation))
            elif _side_clash(s.words) is not None and any(_observation(k) != "Support Devices" for k in s.affirmed):
                issues.append(Issue("duplicate", "right and left for one finding in one sentence", (s.ref,),
                                    next(iter(s.affirmed.values())).observation))
    # the impression against the findings: side and size
    fnd = _groups([s for s in live if s.section == "findings"])
    for key, group in _groups([s for s in live if s.section == "impression"]).items():
        if key not in fnd:
            continue
        f_sides = _side_set(fnd[key], key)
        f_sizes = frozenset().union(*(s.affirmed[key].sizes for s in fnd[key]))
        for s in group:
            st = s.affirmed[key]
            sides = _side_set([s], key)
            if (sides and f_sides and not sides <= f_sides) or (st.sizes and f_sizes and not st.sizes <= f_sizes):
                issues.append(Issue("duplicate", "impression disagrees with the findings (side or size)",
                                    (fnd[key][0].ref, s.ref), st.observation))
    return issues


def _groups(sents: Iterable[_Sentence]) -> dict[str, list[_Sentence]]:
    out: dict[str, list[_Sentence]] = {}
    for s in sents:
        for key in s.affirmed:
            out.setdefault(key, []).append(s)
    return out


def _side_set(group: Iterable[_Sentence], key: str) -> frozenset[str]:
    sides: set[str] = set()
    for s in group:
        for side in s.affirmed[key].sides:
            sides |= {"L", "R"} if side == "B" else {side}
    return frozenset(sides)


def _by_side(group: list[_Sentence], key: str) -> list[list[_Sentence]]:
    """The statements of one finding that are one finding: when every statement names one side
    ("small left pleural effusion", "large right pleural effusion"), one group per side (two
    findings); otherwise (a bilateral or unsided statement among them) all of them."""
    sides = [s.affirmed[key].sides for s in group]
    if not all(len(x) == 1 and "B" not in x for x in sides):
        return [group]
    out: dict[str, list[_Sentence]] = {}
    for s, x in zip(group, sides, strict=True):
        out.setdefault(next(iter(x)), []).append(s)
    return list(out.values())


def check_tokens(findings: Sequence[Token], impression: Sequence[Token]) -> list[Issue]:
    """The issues of a report given as tokens (word, probability)."""
    return _issues(_analyse_report({"findings": split_sentences(_explode(findings)),
                                    "impression": split_sentences(_explode(impression))}))


def check(findings: str, impression: str = "") -> list[Issue]:
    """The issues of a report given as text (a draft or a reference report)."""
    return check_tokens(text_tokens(findings), text_tokens(impression))


def rates(reports: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Issues per 100 reports by kind (``contradiction``, ``duplicate``, ``fragment``), and the
    share of reports (per 100) with at least one issue of the kind (``*_reports``)."""
    n = 0
    counts = dict.fromkeys(KINDS, 0)
    affected = dict.fromkeys(KINDS, 0)
    for findings, impression in reports:
        n += 1
        kinds = [i.kind for i in check(findings, impression)]
        for k in KINDS:
            counts[k] += kinds.count(k)
            affected[k] += k in kinds
    out: dict[str, float] = {}
    for k in KINDS:
        out[f"{k}_per_100"] = 100.0 * counts[k] / n if n else 0.0
    for k in KINDS:
        out[f"{k}_reports_per_100"] = 100.0 * affected[k] / n if n else 0.0
    return out


# --- the rules -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """One change the rules made: ``action`` (drop, fix, renumber, summarise), the sentence's
    text before, and why."""

    action: str
    section: str
    before: str
    reason: str


def make_consistent(
    findings: Sequence[Token],
    impression: Sequence[Token],
    probabilities: Mapping[str, float] | None = None,
    thresholds: Mapping[str, float] | None = None,
    max_rounds: int = 6,
) -> tuple[list[Token], list[Token], list[Edit]]:
    """Apply the rules (module docstring) to a draft; returns its findings and impression tokens
    and the edits made. ``probabilities``/``thresholds``: the observation probabilities and
    the thresholds at which an observation counts as present (an observation without a
    probability: the affirmed side wins)."""
    probs = dict(probabilities or {})
    thr = dict(thresholds or {})
    secs: dict[str, list[list[Token]]] = {"findings": split_sentences(_explode(findings)),
                                          "impression": split_sentences(_explode(impression))}
    edits: list[Edit] = []
    for _ in range(max_rounds):
        sents = _analyse_report(secs)
        issues = _issues(sents)
        if not issues:
            break
        by_ref = {s.ref: s for s in sents}
        drop: dict[tuple[str, int], str] = {}
        replace: dict[tuple[str, int], tuple[str, str, list[list[Token]]]] = {}
        fixed: dict[tuple[str, int], list[Token]] = {}
        for issue in issues:
            if issue.kind == "fragment":
                ref = issue.sentences[0]
                s = by_ref[ref]
                if issue.detail == "article before a plural noun":
                    fixed[ref] = _fix_agreement(s.tokens)
                elif due := _DUE.fullmatch(issue.detail):
                    fixed[ref] = [(due.group(1), s.tokens[0][1]), *s.tokens[1:]]
                else:
                    drop[ref] = f"fragment: {issue.detail}"
        if not drop and not fixed:
            for issue in issues:
                if issue.kind == "contradiction":
                    _resolve_contradiction(issue, by_ref, probs, thr, sents, drop, replace)
            if not drop and not replace:
                for issue in issues:
                    if issue.kind == "duplicate":
                        _resolve_duplicate(issue, by_ref, sents, drop, replace)
        if not drop and not fixed and not replace:
            break  # what is left cannot be fixed by dropping (e.g. a repeat inside a kept sentence)
        new: dict[str, list[list[Token]]] = {sec: [] for sec in SECTIONS}
        for s in sents:
            if s.ref in replace:
                action, reason, pieces = replace[s.ref]
                edits.append(Edit(action, s.section, _detok(s.words), reason))
                new[s.section] += pieces
            elif s.ref in drop:
                edits.append(Edit("drop", s.section, _detok(s.words), drop[s.ref]))
            elif s.ref in fixed:
                edits.append(Edit("fix", s.section, _detok(s.words), "agreement or list number"))
                new[s.section].append(fixed[s.ref])
            else:
                new[s.section].append(s.tokens)
        secs = new
    return ([t for s in secs["findings"] for t in s], [t for s in secs["impression"] for t in s], edits)


def _fix_agreement(tokens: list[Token]) -> list[Token]:
    words = [w.lower() for w, _ in tokens]
    i = _agreement(words)
    if i is None:
        return tokens
    out = list(tokens)
    if words[i] == "are":
        out[i] = ("is", out[i][1])
        return out
    if i >= 1 and words[i - 1] == "is":
        out[i - 1] = ("are", out[i - 1][1])
    del out[i]
    return out


def _supported(obs: str, probs: Mapping[str, float], thr: Mapping[str, float]) -> bool:
    if obs not in probs:
        return True
    return probs[obs] >= thr.get(obs, 0.5)


def _resolve_contradiction(issue: Issue, by_ref: dict[tuple[str, int], _Sentence], probs: Mapping[str, float],
                           thr: Mapping[str, float], sents: list[_Sentence],
                           drop: dict[tuple[str, int], str],
                           replace: dict[tuple[str, int], tuple[str, str, list[list[Token]]]]) -> None:
    obs, key = issue.observation, issue.key
    group = [by_ref[r] for r in issue.sentences]
    pro = [s for s in group if key in s.affirmed]
    con = [s for s in group if s not in pro]
    p = probs.get(obs, float("nan"))
    supported = _supported(obs, probs, thr)
    why = (f"negates {obs} (probability {p:.2f} supports it)" if supported
           else f"affirms {obs} (probability {p:.2f} does not support it)")
    for s in con if supported else pro:
        if s.ref in drop or s.ref in replace:
            continue
        if supported and s.section == "impression" and obs in ACUTE and key not in s.negated and key in s.covered:
            # keep what else the sentence says ("Mild cardiomegaly, no acute findings."), then
            # summarise the findings it denied
            rest = _trim(s, key, negating=True)
            said = _analyse(s.section, s.index, rest).affirmed_obs if rest else set()
            summary = _summary(sents, drop, said)
            if summary or rest:
                replace[s.ref] = ("summarise", "no acute abnormality under supported acute findings",
                                  ([rest] if rest else []) + summary)
                continue
        trimmed = (_without_item(s, key) if supported else []) or _trim(s, key, negating=supported)
        if trimmed:
            replace[s.ref] = ("trim", why, [trimmed])
        else:
            drop[s.ref] = why


_SEPARATORS = {",", "or", "and", "nor"}
_CUES = {"no", "not", "without", "negative", "for", "free", "of", "evidence", "there", "is", "are", "any",
         "specifically", "identified", "seen"}


def _without_item(s: _Sentence, key: str) -> list[Token]:
    """``s`` without the item of a negated list that negates ``key`` ("No pneumothorax or pleural
    effusion." -> "No pneumothorax."), when everything else the sentence says stays as it was;
    else empty."""
    body = [t for t in s.tokens if t[0] not in _ENDS]
    if key not in s.negated or not body:
        return []
    # items: runs between separators; item 0 starts with the negation cue
    bounds, start = [], 0
    for i, (w, _) in enumerate(body):
        if w.lower() in _SEPARATORS:
            bounds.append((start, i))
            start = i + 1
    bounds.append((start, len(body)))
    if len(bounds) < 2:
        return []
    for n, (a, b) in enumerate(bounds):
        if n == 0:
            cue = a
            while cue < b and body[cue][0].lower() in _CUES:
                cue += 1
            if cue == a or cue >= b:
                continue
            nxt = bounds[1][0]  # drop the item and the separator after it
            out = body[:cue] + body[nxt:]
        else:
            out = body[: bounds[n - 1][1]] + body[b:]
        while out and out[-1][0].lower() in _SEPARATORS:
            out.pop()
        if not out:
            continue
        words = [w.lower() for w, _ in out]
        # "A, or B" with two items left -> "A or B"; a list that now ends "A, B" -> "A or B"
        if words.count(",") == 1 and ", or" in " ".join(words):
            out = [t for t in out if t[0] != ","]
        elif n == len(bounds) - 1 and "or" not in words and "and" not in words and "," in words:
            last = max(i for i, w in enumerate(words) if w == ",")
            if any(w in ("no", "without", "negative") for w in words[:last]):  # a comma of the list
                out[last] = ("or", out[last][1])
        cand = [*out, (".", s.tokens[-1][1])]
        a2 = _analyse(s.section, s.index, cand)
        if (key in a2.negated or key in a2.covered or key in a2.affirmed or set(a2.affirmed) != set(s.affirmed)
                or a2.negated != s.negated - {key} or not a2.negated):
            continue
        return cand
    return []


def _trim(s: _Sentence, key: str, negating: bool) -> list[Token]:
    """``s`` without its comma-separated clauses that (read alone) negate ``key`` (``negating``)
    or affirm it; empty when that leaves nothing, or a clause that says nothing by itself
    ("Stable cardiomegaly, mediastinal contours.": no)."""
    clauses: list[list[Token]] = [[]]
    for tok in s.tokens:
        if tok[0] == ",":
            clauses.append([])
        elif tok[0] not in _ENDS:
            clauses[-1].append(tok)
    if len(clauses) < 2:
        return []
    kept, removed = [], False
    for clause in clauses:
        a = _analyse(s.section, s.index, clause)
        hit = _negates(a, key) if negating else key in a.affirmed
        if hit:
            removed = True
        elif clause:
            if not (a.affirmed or a.negated or a.covered):
                return []
            # read alone, the clause must say what it said in the sentence ("without evidence of
            # focal airspace disease, pleural effusion, or pneumothorax": "pleural effusion" alone
            # would affirm it)
            if not (set(a.affirmed) <= set(s.affirmed) and a.negated <= s.negated | s.covered
                    and a.covered <= s.negated | s.covered):
                return []
            kept.append(clause)
    if not removed or not kept:
        return []
    out: list[Token] = []
    for clause in kept:
        if out:
            out.append((",", clause[0][1]))
        out += clause
    return [*out, (".", s.tokens[-1][1])]


def _summary(sents: list[_Sentence], drop: Mapping[tuple[str, int], str],
             said: Iterable[str] = ()) -> list[list[Token]]:
    """The impression that summarises the findings: each findings sentence that affirms a
    pathology not in ``said``, as a short phrase ("There is a small right pleural effusion." ->
    "Small right pleural effusion.")."""
    out: list[list[Token]] = []
    seen: set[str] = set(said)
    for s in sents:
        if s.section != "findings" or s.ref in drop or s.marker is not None:
            continue
        observations = [o for o in s.affirmed_obs if o in labels.PATHOLOGIES and o not in seen]
        if not observations:
            continue
        seen.update(s.affirmed_obs)
        phrase = _phrase(s.tokens)
        if phrase:
            out.append(phrase)
    return out


def _phrase(tokens: list[Token]) -> list[Token]:
    clauses: list[list[Token]] = [[]]
    for tok in tokens:
        if tok[0] in (",", ";") or tok[0] in _ENDS:
            clauses.append([])
        else:
            clauses[-1].append(tok)
    keep = [c for c in clauses if c and any(m.presence is not Presence.ABSENT and m.observation in labels.PATHOLOGIES
                                            for m in labels.mentions(_detok([w for w, _ in c])))]
    if not keep:
        return []
    words = keep[0]
    lower = [w.lower() for w, _ in words]
    if lower[:2] in (["there", "is"], ["there", "are"]):
        words = words[2:]
        if words and words[0][0].lower() in ("a", "an"):
            words = words[1:]
    if not words:
        return []
    return [*words, (".", words[-1][1])]


def _resolve_duplicate(issue: Issue, by_ref: dict[tuple[str, int], _Sentence], sents: list[_Sentence],
                       drop: dict[tuple[str, int], str],
                       replace: dict[tuple[str, int], tuple[str, str, list[list[Token]]]]) -> None:
    group = [by_ref[r] for r in issue.sentences]
    if issue.detail == "repeated sentence":
        drop.setdefault(group[-1].ref, "repeats an earlier sentence")
        return
    if issue.detail.startswith("right and left"):
        s = group[0]
        i = _side_clash(s.words)
        if s.ref in drop or s.ref in replace or i is None:
            return
        cut = list(s.tokens[:i])
        while cut and (cut[-1][0].lower() in _DANGLING or cut[-1][0].lower() in _STOP):
            cut.pop()
        cand = [*cut, (".", s.tokens[-1][1])] if cut else []
        if cand and set(_analyse(s.section, s.index, cand).affirmed) == set(s.affirmed):
            replace[s.ref] = ("trim", "right and left for one finding in one sentence", [cand])
        elif _said_elsewhere(s, sents, drop):
            drop[s.ref] = "right and left for one finding in one sentence, said elsewhere"
        return
    if issue.detail == "stated twice in one sentence":
        s = group[0]
        if s.ref in drop or s.ref in replace:
            return
        cut = _cut_repeat(s.tokens)
        if cut and not _analyse(s.section, s.index, cut).twice:
            replace[s.ref] = ("trim", f"{issue.observation} stated twice in the sentence", [cut])
        elif _said_elsewhere(s, sents, drop):
            drop[s.ref] = f"{issue.observation} stated twice in the sentence and said elsewhere"
        return
    if issue.detail.startswith("impression disagrees"):
        s = group[-1]
        if _said_elsewhere(s, sents, drop, ignore_impression=True):
            drop.setdefault(s.ref, f"disagrees with the findings on {issue.observation}")
        return
    if len(group) < 2:
        return
    # a sentence that says something no other sentence says stays; of the others the most
    # specific stays unless one that must stay already says it
    anchored = [s for s in group if not _said_elsewhere(s, sents, drop)]
    best = max(anchored or group, key=lambda s: s.specificity)
    for s in group:
        if s is best or s.ref in drop or s in anchored:
            continue
        drop[s.ref] = f"{issue.observation} is stated more specifically in another sentence"


def _side_clash(words: Sequence[str]) -> int | None:
    """Index of a side word that contradicts an earlier one with nothing joining them
    ("right middle lobe atelectasis left base"; not "right and left", "right greater than
    left", "left catheter with tip in the right atrium"), else None."""
    side, joined = "", False
    for i, w in enumerate(words):
        if w in ("and", "or", ",", "greater", "than", "bilateral", "bilaterally", "with", "to", "from",
                 "versus", "vs", "both"):
            joined = True
        elif w in ("right", "left"):
            if side and w != side and not joined:
                return i
            side, joined = w, False
    return None


def _cut_repeat(tokens: list[Token]) -> list[Token]:
    """The sentence up to where it starts repeating itself ("left lower lobe airspace disease
    with left lower lobe airspace disease with ..." -> "left lower lobe airspace disease."), with
    trailing function and qualifier words removed; empty when there is no such repeat."""
    words = [w.lower() for w, _ in tokens]
    seen: dict[tuple[str, str], int] = {}
    for i in range(len(words) - 1):
        pair = (words[i], words[i + 1])
        if not any(w.isalpha() and w not in _STOP and w not in _MODIFIERS for w in pair):
            continue
        j = seen.setdefault(pair, i)
        if j < i - 1:
            # back up over the qualifiers that start the repeat ("... with left lower lobe")
            k = i
            while k > j + 2 and (words[k - 1] in _MODIFIERS or words[k - 1] in _STOP or words[k - 1] == ","):
                k -= 1
            out = list(tokens[:k])
            while out and (out[-1][0].lower() in _DANGLING or out[-1][0].lower() in _STOP
                           or out[-1][0] in (",", "-")):
                out.pop()
            return [*out, (".", tokens[-1][1])] if out else []
    return []


def _said_elsewhere(s: _Sentence, sents: list[_Sentence], drop: Mapping[tuple[str, int], str],
                    ignore_impression: bool = False) -> bool:
    """True when every key ``s`` affirms is affirmed by a kept sentence of its section (or, with
    ``ignore_impression``, of the findings) and ``s`` negates nothing that is not negated
    elsewhere."""
    others = [t for t in sents if t is not s and t.ref not in drop
              and t.section == ("findings" if ignore_impression else s.section)]
    for key in s.affirmed:
        if not any(key in t.affirmed for t in others):
            return False
    return all(any(k in t.negated or k in t.covered for t in others) for k in s.negated)
