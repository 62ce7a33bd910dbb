"""What the reviewer marks in a draft, and why: the one highlight policy (Qt-free).

The reviewer and ``benchmarks/highlight.py`` both call :func:`highlight`, so what is measured
on val is what a radiologist sees. Three kinds of mark, each with a reason:

``call``
    A sentence that states an observation (found with the report labeller,
    :func:`onnx_models.labels.label`) whose probability lies near its decision threshold: the
    classifier could as well have called it the other way. "Near" is a distance in log-odds,
    ``|logit(p) - logit(threshold)| < policy.call_margin``. A sentence that states an
    observation the other way from the classifier's call (affirms it below the threshold, or
    negates it at or above it) is marked too: decoder and classifier disagree.
``word``
    A content word the decoder itself was least sure of: probability below ``policy.word_p``,
    a cut-off calibrated per bundle (a low quantile of the decoder's content-word
    probabilities on training drafts, see ``benchmarks/highlight.py``). Function words
    (``the``, ``is``, ``of``...), numbers and the de-identification placeholder ``xxxx`` are
    never marked, nor are negation words (``no``, ``without``): a low probability on a
    sentence-opening "No" says which sentence came next, not doubt about its polarity (that
    doubt is the ``call`` mark's), and in a trial on 400 training drafts marking them made the
    word marks less predictive of errors (ratio 1.6 instead of 1.9).
``grounded``
    Provenance, not doubt: a sentence the grounding step added from the observation classifier
    (the decoder did not write it). Shown in a different style.

Nothing the radiologist typed is ever marked: the current text is aligned with the AI draft
word by word (:class:`difflib.SequenceMatcher`) and only words that still stand as drafted
carry the decoder's probabilities; a sentence mark needs the whole sentence unchanged.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from onnx_models.labels import ABNORMAL_OBSERVATIONS, Presence, label
from plugin.review.service import DEID_PLACEHOLDER

KIND_CALL = "call"
KIND_WORD = "word"
KIND_GROUNDED = "grounded"
#: a de-identification placeholder (``xxxx``) left in the text: never report text, to replace
KIND_DEID = "deid"
#: kinds that say "uncertain" (the grounded mark says where a sentence came from)
UNCERTAIN_KINDS = (KIND_CALL, KIND_WORD)


@dataclass(frozen=True)
class Span:
    """A marked stretch ``text[start:end]`` of the report editor.

    Attributes
    ----------
    start, end:
        Character offsets in the text.
    probability:
        The probability behind the mark.
    kind:
        ``call``, ``word`` or ``grounded``.
    note:
        A short note saying why (for a tooltip).
    """

    start: int
    end: int
    probability: float
    kind: str = KIND_WORD
    note: str = ""


@dataclass(frozen=True)
class HighlightPolicy:
    """The calibrated cut-offs of :func:`highlight`.

    Attributes
    ----------
    word_p:
        Content words the decoder gave a probability below this are marked.
    call_margin:
        An observation call within this many log-odds of its threshold is uncertain.
    mark_disagreement:
        Mark sentences stating an observation against the classifier's call.
    source:
        Where the numbers come from.
    """

    word_p: float
    call_margin: float
    mark_disagreement: bool = True
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.word_p <= 1.0:
            raise ValueError(f"word_p: expected a probability in [0, 1], got {self.word_p!r}")
        if self.call_margin < 0:
            raise ValueError(f"call_margin: expected a log-odds distance >= 0, got {self.call_margin!r}")


#: Calibrated on 400 training-split drafts of the shipped bundle (default 0.3.1) by
#: ``python3 benchmarks/highlight.py``: ``word_p`` is the 5 % quantile of the decoder's
#: content-word probabilities, ``call_margin`` the largest margin keeping the share of marked
#: words within 10 %. Val figures (382 studies) in ``benchmarks/results/highlight.json``.
DEFAULT_POLICY = HighlightPolicy(word_p=0.30, call_margin=0.5, mark_disagreement=True,
                                 source="calibrated on 400 train drafts of bundle default 0.3.1")

#: Words that carry no finding of their own (never marked as uncertain).
FUNCTION_WORDS = frozenset(
    """a an the this that these those there here it its is are was were be been being has have had
    do does did will would can could may might should shall must of in on at to from by for with as
    into onto over under than then and or but nor so if also both either each any all some such
    which who whom whose what where when while within upon per via again seen noted identified
    appear appears appeared appearing visualized demonstrated present xxxx
    no not without free negative""".split()
)

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")


def is_content_word(word: str) -> bool:
    """True for a word that states something (not a function word, a number or ``xxxx``)."""
    w = word.lower()
    return w.isalpha() and len(w) > 1 and w not in FUNCTION_WORDS


#: the de-identification placeholder of the training reports (IU X-ray's ``XXXX``, any case,
#: three or more x, alone or inside a hyphenated word: ``XXXX-year-old``, ``x-XXXX``)
DEID_NOTE = ("De-identification placeholder (\"xxxx\") from the reports the model learned from: not report "
             "text. Replace it with what you see, or delete it; the report cannot be signed while it is here.")


def deid_spans(text: str) -> list[Span]:
    """Every de-identification placeholder in ``text``, as ``deid`` spans. Marked whoever wrote
    it (the model or the reviewer): the report must never carry one."""
    return [Span(m.start(), m.end(), 0.0, KIND_DEID, DEID_NOTE) for m in DEID_PLACEHOLDER.finditer(text)]


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text``: cut after ``.``/``!``/``?`` followed by a space or
    the end, and at line breaks; leading and trailing spaces left out, empty pieces dropped."""
    out: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end() if m.group(0) != "\n" else m.start()
        _add_trimmed(text, start, end, out)
        start = m.end()
    _add_trimmed(text, start, len(text), out)
    return out


def _add_trimmed(text: str, a: int, b: int, out: list[tuple[int, int]]) -> None:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    if b > a:
        out.append((a, b))


@functools.lru_cache(maxsize=4096)
def sentence_calls(sentence: str) -> tuple[tuple[str, bool], ...]:
    """The abnormal observations a sentence states, each with its U-ones state (True for
    present or uncertain, False for absent), from the report labeller."""
    labels = label(sentence)
    return tuple((o, labels[o] in (Presence.PRESENT, Presence.UNCERTAIN))
                 for o in ABNORMAL_OBSERVATIONS if o in labels)


def _norm(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


def _words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group(0).lower()) for m in _WORD.finditer(text)]


def _align(a: Sequence[str], b: Sequence[str]) -> dict[int, int]:
    """Index map ``a -> b`` for the words the two sequences share in order (difflib blocks)."""
    out: dict[int, int] = {}
    sm = difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False)
    for i, j, n in sm.get_matching_blocks():
        for k in range(n):
            out[i + k] = j + k
    return out


def word_probabilities(draft: str, text: str, tokens: Iterable[tuple[str, float]]) -> list[float | None]:
    """The decoder's probability for each word (``\\w+``) of ``text``; None for a word the
    radiologist typed or changed (not in the AI ``draft`` at that place) or that no token gave."""
    tok_words: list[str] = []
    tok_probs: list[float] = []
    for raw, p in tokens:
        for w in _WORD.findall(raw.lower()):
            tok_words.append(w)
            tok_probs.append(float(p))
    draft_words = [w for _, _, w in _words(draft)]
    text_words = [w for _, _, w in _words(text)]
    tok_to_draft = _align(tok_words, draft_words)
    draft_p: list[float | None] = [None] * len(draft_words)
    for i, j in tok_to_draft.items():
        draft_p[j] = tok_probs[i]
    draft_to_text = _align(draft_words, text_words)
    out: list[float | None] = [None] * len(text_words)
    for j, k in draft_to_text.items():
        out[k] = draft_p[j]
    return out


def grounded_spans(text: str, sentences: Iterable[tuple[str, float]]) -> list[Span]:
    """Spans of ``text`` where the added ``sentences`` still stand (case-insensitive; an
    edited sentence is no longer marked)."""
    low = text.lower()
    spans = []
    for sentence, p in sentences:
        needle = sentence.strip().lower()
        start = low.find(needle) if needle else -1
        while start >= 0:
            spans.append(Span(start, start + len(needle), p, KIND_GROUNDED,
                              f"added from the findings classifier (p {p:.2f}), not written by the decoder"))
            start = low.find(needle, start + len(needle))
    return sorted(spans, key=lambda s: s.start)


def call_note(observation: str, p: float, threshold: float, stated: bool) -> str:
    side = "above" if p >= threshold else "below"
    text = f"{observation}: p {p:.2f}, {side} its threshold {threshold:.2f}"
    if stated != (p >= threshold):
        text += " — the text says " + ("present" if stated else "absent") + ", the classifier the opposite"
    return text


def highlight(
    draft: str,
    text: str,
    tokens: Iterable[tuple[str, float]],
    observations: Mapping[str, float],
    thresholds: Mapping[str, float],
    grounded: Iterable[tuple[str, float]] = (),
    policy: HighlightPolicy = DEFAULT_POLICY,
) -> list[Span]:
    """The marks of ``text`` (the report as it stands now) against the AI ``draft`` it came from.

    ``tokens`` are the decoder's words with probabilities (``Draft.token_info["tokens"]``),
    ``observations`` the observation probabilities and ``thresholds`` their decision thresholds
    (an observation without a threshold is never a ``call``); ``grounded`` the sentences the
    grounding step added. Sorted by start; a word inside a ``call`` sentence is not marked again.
    """
    grounded = list(grounded)
    spans: list[Span] = []
    draft_sentences = {_norm(draft[a:b]) for a, b in sentence_spans(draft)}
    call_ranges: list[tuple[int, int]] = []
    for a, b in sentence_spans(text):
        sentence = text[a:b]
        if _norm(sentence) not in draft_sentences:
            continue  # written or edited by the radiologist: not the model's call any more
        notes: list[tuple[float, str]] = []
        for obs, stated in sentence_calls(sentence):
            p, t = observations.get(obs), thresholds.get(obs)
            if p is None or t is None:
                continue
            distance = abs(logit(p) - logit(t))
            against = policy.mark_disagreement and stated != (p >= t)
            if distance < policy.call_margin or against:
                notes.append((p, call_note(obs, p, t, stated)))
        if notes:
            spans.append(Span(a, b, min(p for p, _ in notes), KIND_CALL, "; ".join(n for _, n in notes)))
            call_ranges.append((a, b))
    spans += grounded_spans(text, grounded)
    grounded_ranges = [(s.start, s.end) for s in spans if s.kind == KIND_GROUNDED]
    probs = word_probabilities(draft, text, tokens)
    for (a, b, w), p in zip(_words(text), probs, strict=True):
        if p is None or p >= policy.word_p or not is_content_word(w):
            continue
        if any(s <= a and b <= e for s, e in call_ranges + grounded_ranges):
            continue
        spans.append(Span(a, b, p, KIND_WORD, f"the model was unsure of this word (p {p:.2f})"))
    return sorted(spans, key=lambda s: (s.start, s.end))


def draft_words(draft: str, tokens: Iterable[tuple[str, float]], grounded: Iterable[tuple[str, float]] = ()
                ) -> list[tuple[str, float | None, bool]]:
    """Each word of the AI ``draft``: (word, the decoder's probability or None, True when it
    lies in a sentence the grounding step added, whose probability is the classifier's)."""
    inside = [(s.start, s.end) for s in grounded_spans(draft, grounded)]
    probs = word_probabilities(draft, draft, tokens)
    return [(w, p, any(s <= a and b <= e for s, e in inside))
            for (a, b, w), p in zip(_words(draft), probs, strict=True)]


def content_word_probabilities(draft: str, tokens: Iterable[tuple[str, float]],
                               grounded: Iterable[tuple[str, float]] = ()) -> list[float]:
    """The decoder's probabilities of the content words of one draft (the grounded sentences'
    words left out), for calibrating ``word_p``."""
    return [p for w, p, g in draft_words(draft, tokens, grounded) if p is not None and not g and is_content_word(w)]


__all__ = [
    "DEFAULT_POLICY",
    "FUNCTION_WORDS",
    "HighlightPolicy",
    "DEID_PLACEHOLDER",
    "KIND_CALL",
    "KIND_DEID",
    "KIND_GROUNDED",
    "KIND_WORD",
    "Span",
    "UNCERTAIN_KINDS",
    "content_word_probabilities",
    "deid_spans",
    "draft_words",
    "grounded_spans",
    "highlight",
    "is_content_word",
    "sentence_calls",
    "sentence_spans",
    "word_probabilities",
]
