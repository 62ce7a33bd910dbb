"""gui.highlight, the one highlight policy (no Qt): uncertain calls, unsure words, provenance, and
never the radiologist's own typing."""

from __future__ import annotations

import pytest

from gui import highlight as hl
from gui.highlight import HighlightPolicy, highlight

POLICY = HighlightPolicy(word_p=0.3, call_margin=0.5)
THRESHOLDS = {"Cardiomegaly": 0.4, "Pleural Effusion": 0.4, "Pneumothorax": 0.4, "Lung Opacity": 0.4}


def tokens_of(text: str, p: float = 0.95, low: dict[str, float] | None = None) -> list[tuple[str, float]]:
    """The decoder's tokens for ``text`` (lower-cased words and punctuation), all at ``p`` except ``low``."""
    import re

    low = low or {}
    return [(w, low.get(w, p)) for w in re.findall(r"\w+|[^\w\s]", text.lower())]


def marked(text: str, spans: list[hl.Span], kind: str | None = None) -> list[str]:
    return [text[s.start:s.end] for s in spans if kind is None or s.kind == kind]


def test_sentence_near_its_threshold_is_an_uncertain_call() -> None:
    draft = "The heart is enlarged. No pleural effusion. No pneumothorax."
    obs = {"Cardiomegaly": 0.45, "Pleural Effusion": 0.05, "Pneumothorax": 0.36}
    spans = highlight(draft, draft, tokens_of(draft), obs, THRESHOLDS, policy=POLICY)
    assert marked(draft, spans) == ["The heart is enlarged.", "No pneumothorax."]
    assert all(s.kind == hl.KIND_CALL for s in spans)
    assert spans[0].note == "Cardiomegaly: p 0.45, above its threshold 0.40"
    assert spans[1].probability == pytest.approx(0.36)
    # far from the threshold on both sides: nothing is uncertain
    sure = {"Cardiomegaly": 0.95, "Pleural Effusion": 0.01, "Pneumothorax": 0.02}
    assert highlight(draft, draft, tokens_of(draft), sure, THRESHOLDS, policy=POLICY) == []
    # without a threshold an observation is never a call; a zero margin marks only disagreements
    assert highlight(draft, draft, tokens_of(draft), obs, {}, policy=POLICY) == []
    assert highlight(draft, draft, tokens_of(draft), obs, THRESHOLDS, policy=HighlightPolicy(0.0, 0.0)) == []


def test_a_sentence_stated_against_the_classifier_is_marked() -> None:
    draft = "The heart is enlarged. There is a small pleural effusion."
    obs = {"Cardiomegaly": 0.02, "Pleural Effusion": 0.97}
    spans = highlight(draft, draft, tokens_of(draft), obs, THRESHOLDS, policy=POLICY)
    assert marked(draft, spans) == ["The heart is enlarged."]
    assert "the text says present, the classifier the opposite" in spans[0].note
    off = HighlightPolicy(word_p=0.3, call_margin=0.5, mark_disagreement=False)
    assert highlight(draft, draft, tokens_of(draft), obs, THRESHOLDS, policy=off) == []


def test_unsure_content_words_only() -> None:
    draft = "The lungs are clear. Mild degenerative changes of the spine."
    toks = tokens_of(draft, low={"the": 0.05, "are": 0.1, "mild": 0.12, "degenerative": 0.29, "spine": 0.31})
    spans = highlight(draft, draft, toks, {}, {}, policy=POLICY)
    assert marked(draft, spans) == ["Mild", "degenerative"]  # 'the', 'are' are function words; 0.31 is above
    assert {s.kind for s in spans} == {hl.KIND_WORD}
    assert spans[0].note == "the model was unsure of this word (p 0.12)"
    # negations and the de-identification placeholder are never word marks
    draft2 = "No xxxx deformity."
    assert marked(draft2, highlight(draft2, draft2, tokens_of(draft2, p=0.01), {}, {}, policy=POLICY)) == ["deformity"]


def test_the_radiologists_typing_is_never_marked() -> None:
    draft = "The heart is enlarged. Mild degenerative changes."
    toks = tokens_of(draft, low={"enlarged": 0.1, "mild": 0.1})
    obs = {"Cardiomegaly": 0.42}
    assert marked(draft, highlight(draft, draft, toks, obs, THRESHOLDS, policy=POLICY)) == [
        "The heart is enlarged.", "Mild"]
    # typed: a new first sentence with the same words, and "mildly" inserted into the drafted one.
    # The edited sentence is no longer the model's call; its surviving word 'enlarged' still is
    # the model's word (marked where it stands), the typed copies of 'Mild'/'enlarged' are not.
    now = "Mild cardiomegaly, heart enlarged. The heart is mildly enlarged. Mild degenerative changes."
    spans = highlight(draft, now, toks, obs, THRESHOLDS, policy=POLICY)
    assert [(now[s.start:s.end], s.start, s.kind) for s in spans] == [
        ("enlarged", now.index("mildly enlarged") + 7, "word"), ("Mild", now.index("Mild degenerative"), "word")]
    # a drafted sentence keeps its call mark wherever it moved; word marks follow the words in
    # order only, so the words of a sentence moved before it count as retyped (never a false mark)
    moved = "Mild degenerative changes. The heart is enlarged."
    assert marked(moved, highlight(draft, moved, toks, obs, THRESHOLDS, policy=POLICY)) == ["The heart is enlarged."]
    # everything typed from scratch (a withheld draft): nothing
    assert highlight("\n", "The heart is enlarged.\nCardiomegaly.", [], obs, THRESHOLDS, policy=POLICY) == []


def test_grounded_sentences_are_provenance_not_doubt() -> None:
    draft = "The lungs are clear. There is a small pleural effusion."
    toks = tokens_of("The lungs are clear.") + tokens_of("There is a small pleural effusion.", p=0.9)
    obs = {"Pleural Effusion": 0.9}
    spans = highlight(draft, draft, toks, obs, THRESHOLDS, [("There is a small pleural effusion.", 0.9)], POLICY)
    assert [(draft[s.start:s.end], s.kind) for s in spans] == [("There is a small pleural effusion.", "grounded")]
    assert "findings classifier" in spans[0].note
    # a grounded sentence at its threshold is also an uncertain call; its words are not marked again
    spans = highlight(draft, draft, tokens_of(draft, p=0.1), {"Pleural Effusion": 0.41}, THRESHOLDS,
                      [("There is a small pleural effusion.", 0.41)], POLICY)
    assert sorted(s.kind for s in spans if s.start >= draft.index("There")) == ["call", "grounded"]
    assert marked(draft, spans, hl.KIND_WORD) == ["lungs", "clear"]


def test_sentences_words_and_alignment() -> None:
    text = "Heart normal. No x-xxxx.\nImpression 1. 2.5 cm nodule!"
    assert [text[a:b] for a, b in hl.sentence_spans(text)] == [
        "Heart normal.", "No x-xxxx.", "Impression 1.", "2.5 cm nodule!"]
    assert hl.sentence_spans("  \n ") == []
    # word pieces 'x' '-' 'xxxx' line up with the text's words; an unknown token is skipped
    draft = "No comparison chest x-xxxx."
    probs = hl.word_probabilities(draft, draft, [("no", 0.2), ("comparison", 0.7), ("chest", 0.9), ("x", 0.8),
                                                 ("-", 0.9), ("xxxx", 0.95), ("<unk>", 0.1), (".", 0.9)])
    assert probs == [0.2, 0.7, 0.9, 0.8, 0.95]
    assert hl.word_probabilities(draft, "Comparison chest x-xxxx today.", [("comparison", 0.7)]) == [0.7, None, None,
                                                                                                       None, None]
    assert hl.is_content_word("effusion") and not hl.is_content_word("the") and not hl.is_content_word("2")
    assert hl.sentence_calls("No pleural effusion or pneumothorax.") == (("Pneumothorax", False),
                                                                         ("Pleural Effusion", False))


def test_calibration_helpers_and_policy_checks() -> None:
    draft = "The heart is enlarged. There is a small pleural effusion."
    toks = tokens_of(draft, low={"enlarged": 0.2})
    probs = hl.content_word_probabilities(draft, toks, [("There is a small pleural effusion.", 0.8)])
    assert probs == [0.95, 0.2]  # heart, enlarged; the grounded sentence's words are the classifier's
    with pytest.raises(ValueError, match="word_p"):
        HighlightPolicy(word_p=1.5, call_margin=0.5)
    with pytest.raises(ValueError, match="call_margin"):
        HighlightPolicy(word_p=0.2, call_margin=-1)
    assert 0 < hl.DEFAULT_POLICY.word_p < 0.5 and hl.DEFAULT_POLICY.call_margin > 0
