"""The grounding step of ``ReportGenerator.generate`` (``manifest["generation"]["grounding"]``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from onnx_synth import synthetic_image

from onnx_models.bundle import BundleError, load_bundle, write_manifest
from onnx_models.runtime import GeneratedReport, Grounding, ReportGenerator, StudyInput
from onnx_models.tokenizer import detokenize

NAMES = load_bundle("default").manifest["observations"]["names"]


@pytest.fixture(scope="module")
def grounding() -> Grounding:
    g = Grounding.from_manifest(load_bundle("default").manifest["generation"])
    assert g is not None
    return g


def _probs(**positive: float) -> dict[str, float]:
    return {n: positive.get(n.replace(" ", "_"), 0.0) for n in NAMES}


def _thresholds() -> dict[str, float]:
    return {n: 0.5 for n in NAMES}


def test_manifest_section(grounding: Grounding) -> None:
    assert grounding.enabled and grounding.section == "findings" and grounding.skip_if_negated
    assert set(grounding.sentences) == set(NAMES)
    assert grounding.thresholds is not None and len(grounding.thresholds) == 13
    # every templated sentence is affirmed by its own patterns (no loop of re-adding)
    for obs, sentence in grounding.sentences.items():
        assert grounding.mention(obs, sentence) == "positive", obs


def test_every_sentence_is_in_the_vocabulary() -> None:
    gen = ReportGenerator("default", threads=1)
    assert gen.grounding is not None
    for sentence in gen.grounding.sentences.values():
        assert "[UNK]" not in gen.tokenizer.encode(sentence).tokens, sentence


def test_added_when_positive_and_missing(grounding: Grounding) -> None:
    text = "The heart is normal in size. The lungs are clear. No acute cardiopulmonary abnormality."
    added = grounding.additions(text, _probs(Pleural_Effusion=0.9, Atelectasis=0.2), _thresholds())
    assert added == [("Pleural Effusion", "There is a small pleural effusion.", 0.9)]


def test_not_added_when_already_mentioned(grounding: Grounding) -> None:
    text = "There is a small right pleural effusion. Mild cardiomegaly."
    assert grounding.additions(text, _probs(Pleural_Effusion=0.9, Cardiomegaly=0.8), _thresholds()) == []
    # affirmed after a negated mention in another sentence still counts as mentioned
    assert grounding.mention("Pneumothorax", "No pneumothorax. Small apical pneumothorax.") == "positive"


def test_negated_mention(grounding: Grounding) -> None:
    """Documented choice: an explicit negation by the decoder is kept and nothing is added (no
    "No pleural effusion. Small pleural effusion." drafts); ``skip_if_negated: false`` adds."""
    text = "No focal consolidation, pneumothorax or pleural effusion. Mild degenerative changes of the spine."
    assert grounding.mention("Pleural Effusion", text) == "negated"
    assert grounding.mention("Cardiomegaly", text) is None
    probs = _probs(Pleural_Effusion=0.9, Cardiomegaly=0.9)
    assert [o for o, _, _ in grounding.additions(text, probs, _thresholds())] == ["Cardiomegaly"]
    adding = dataclasses.replace(grounding, skip_if_negated=False)
    assert [o for o, _, _ in adding.additions(text, probs, _thresholds())] == ["Cardiomegaly", "Pleural Effusion"]
    # a clause break ends the negation's scope
    assert grounding.mention("Atelectasis", "No effusion, but there is basilar atelectasis.") == "positive"


def _tokens(text: str) -> list[tuple[str, float]]:
    return [(w, 0.9) for w in text.lower().replace(".", " .").replace(",", " ,").split()]


def test_replace_negated_and_drop_below(grounding: Grounding) -> None:
    """The classifier wins both ways: a sentence negating a head-positive observation goes (and
    the observation's sentence is added), a sentence affirming an observation the head rules
    out (probability below ``drop_below``) goes."""
    g = dataclasses.replace(grounding, replace_negated=True, drop_below=0.2)
    text = "No pleural effusion or pneumothorax. The heart is enlarged. The lungs are clear."
    probs = _probs(Pleural_Effusion=0.9, Cardiomegaly=0.05, Lung_Opacity=0.1)
    assert g.contradicted(text, probs, _thresholds()) == {"Pleural Effusion"}
    assert "Cardiomegaly" in g.unsupported(probs) and "Pleural Effusion" not in g.unsupported(probs)
    kept = g.drop_sentences(_tokens(text), {"Pleural Effusion"}, g.unsupported(probs))
    assert detokenize([w for w, _ in kept]) == "The lungs are clear."
    # an unrelated negation stays
    kept = g.drop_sentences(_tokens("No pneumothorax. Normal heart."), {"Pleural Effusion"}, set())
    assert detokenize([w for w, _ in kept]) == "No pneumothorax. Normal heart."
    assert dataclasses.replace(grounding, drop_below=None).unsupported(probs) == set()


def test_generate_with_replace_negated_never_contradicts_the_head() -> None:
    gen = ReportGenerator("default", threads=1)
    assert gen.grounding is not None
    gen.grounding = dataclasses.replace(gen.grounding, thresholds=[0.0] * 13, replace_negated=True, drop_below=None)
    [r] = gen.generate([_study()], beam_size=1)
    text = r.findings + " " + r.impression
    for o in NAMES:  # all head-positive: each is affirmed, none negated
        assert gen.grounding.mention(o, text) == "positive", o


def _study() -> StudyInput:
    return StudyInput(views=[(synthetic_image(False, 1, 300), "PA"), (synthetic_image(True, 2, 250), "LATERAL")],
                      indication="Chest pain.")


def test_generate_appends_sentences_with_head_probability() -> None:
    gen = ReportGenerator("default", threads=1)
    assert gen.grounding is not None
    s = _study()
    [off] = gen.generate([s], beam_size=1, grounding=False)
    # every observation "positive" for the grounding step; only additions (no sentence dropped)
    gen.grounding = dataclasses.replace(gen.grounding, thresholds=[0.0] * 13, replace_negated=False, drop_below=None)
    [on] = gen.generate([s], beam_size=1)
    assert on.impression == off.impression  # the impression is never edited
    assert on.findings.startswith(off.findings)
    text = off.findings + " " + off.impression
    missing = [o for o in NAMES if gen.grounding.mention(o, text) is None]
    assert missing
    for o in missing:
        assert gen.grounding.sentences[o] in on.findings
    assert on.grounded == [(gen.grounding.sentences[o], on.observations[o]) for o in missing] and off.grounded == []
    # decoder tokens unchanged; the added tokens sit at the end of the findings and carry the
    # head probability of their observation (the reviewer highlights them as uncertain)
    k = _findings_len(off)
    extra = len(on.tokens) - len(off.tokens)
    assert extra > 0
    assert on.tokens[:k] == off.tokens[:k] and on.tokens[k + extra :] == off.tokens[k:]
    new = on.tokens[k : k + extra]
    assert {round(p, 6) for _, p in new} <= {round(on.observations[o], 6) for o in missing}


def _findings_len(r: GeneratedReport) -> int:
    for k in range(len(r.tokens) + 1):
        if detokenize([w for w, _ in r.tokens[:k]]) == r.findings and (
            detokenize([w for w, _ in r.tokens[k:]]) == r.impression
        ):
            return k
    raise AssertionError("tokens do not split into findings and impression")


def test_manifest_flag_and_default_off(tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(load_bundle("default").path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["generation"]["grounding"]["enabled"] = False
    m["generation"]["grounding"]["thresholds"] = [0.0] * 13
    write_manifest(copy, m)
    gen = ReportGenerator(copy, threads=1)
    s = _study()
    [off] = gen.generate([s], beam_size=1)
    [forced] = gen.generate([s], beam_size=1, grounding=True)
    assert len(forced.tokens) > len(off.tokens)
    # a bundle without the section (older bundles) generates as before
    del m["generation"]["grounding"]
    write_manifest(copy, m)
    plain = ReportGenerator(copy, threads=1)
    assert plain.grounding is None
    [r] = plain.generate([s], beam_size=1, grounding=True)
    assert r.findings == off.findings and r.tokens == off.tokens


def test_checksums_still_verify(tmp_path: Path) -> None:
    b = load_bundle("default")
    assert "grounding" in b.manifest["generation"]
    copy = tmp_path / "b"
    shutil.copytree(b.path, copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(copy)


def test_normal_phrasings_count_as_negations(grounding: Grounding) -> None:
    """"Heart size is normal." negates cardiomegaly as "no cardiomegaly" does, so the classifier
    winning over it never leaves "The heart is enlarged." next to "Heart size is normal."."""
    for obs, text in (("Cardiomegaly", "Heart size is normal."), ("Cardiomegaly", "The heart is normal in size."),
                      ("Lung Opacity", "The lungs are clear."), ("Atelectasis", "Right lung clear."),
                      ("Pleural Effusion", "The costophrenic angles are sharp."),
                      ("Fracture", "The osseous structures are intact.")):
        assert grounding.mention(obs, text) == "negated", (obs, text)
    assert grounding.mention("Pleural Effusion", "Blunting of the left costophrenic angle.") == "positive"
    g = dataclasses.replace(grounding, replace_negated=True)
    text = "Heart size is normal. The lungs are clear."
    probs = _probs(Cardiomegaly=0.9)
    kept = g.drop_sentences(_tokens(text), g.contradicted(text, probs, _thresholds()), set())
    assert detokenize([w for w, _ in kept]) == "The lungs are clear."


def test_repeated_sentences_are_dropped() -> None:
    from onnx_models.runtime import _drop_repeated_sentences

    toks = _tokens("Right lung clear. Minimal atelectasis. Right lung clear. Minimal atelectasis. No effusion.")
    assert detokenize([w for w, _ in _drop_repeated_sentences(toks)]) == "Right lung clear. Minimal atelectasis. No effusion."
    assert _drop_repeated_sentences([]) == []
