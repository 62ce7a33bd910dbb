"""ReportGenerator on the shipped default bundle: the API other packages build against."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_synth import synthetic_image

from onnx_models.runtime import GeneratedReport, ReportGenerator, StudyInput, _banned_ngram_tokens


@pytest.fixture(scope="module")
def gen() -> ReportGenerator:
    return ReportGenerator("default", threads=1)


def test_attributes(gen: ReportGenerator) -> None:
    assert gen.name == "default" and gen.version
    assert gen.image_size == 128
    assert "CPUExecutionProvider" in gen.providers
    assert gen.beam_size == 3


def test_generate_batch_greedy_and_beam(gen: ReportGenerator) -> None:
    two = StudyInput(views=[(synthetic_image(False, 1, 300), "PA"), (synthetic_image(True, 2, 250), "LATERAL")],
                     indication="Chest pain.")
    one = StudyInput(views=[(synthetic_image(False, 3), "UNKNOWN")])  # no indication, one view
    for beam in (1, 3):
        reports = gen.generate([two, one], beam_size=beam, max_tokens=30, grounding=False)
        assert len(reports) == 2
        for r in reports:
            assert isinstance(r, GeneratedReport)
            assert r.findings or r.impression
            assert set(r.observations) == set(gen.observation_names) and len(r.observations) == 13
            assert all(0.0 <= p <= 1.0 for p in r.observations.values())
            assert 0 < len(r.tokens) <= 30
            assert all(isinstance(w, str) and 0.0 < p <= 1.0 for w, p in r.tokens)
            assert r.duration_ms > 0
    # batching does not change a study's result
    alone = gen.generate([one], beam_size=1, max_tokens=30)[0]
    batched = gen.generate([two, one], beam_size=1, max_tokens=30)[1]
    assert alone.findings == batched.findings and alone.impression == batched.impression


def test_max_tokens_and_empty(gen: ReportGenerator) -> None:
    s = StudyInput(views=[(synthetic_image(False, 5), "PA")], indication="Dyspnea")
    r = gen.generate([s], beam_size=1, max_tokens=3, grounding=False)[0]  # max_tokens bounds the decoder
    assert len(r.tokens) <= 3
    assert gen.generate([]) == []
    with pytest.raises(ValueError, match="no views"):
        gen.generate([StudyInput(views=[])])


def test_no_repeat_ngram() -> None:
    assert sorted(_banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    assert _banned_ngram_tokens([1, 2], 3) == []
    assert _banned_ngram_tokens([1, 2, 3], 0) == []


def test_generated_text_has_no_repeated_trigram(gen: ReportGenerator) -> None:
    s = StudyInput(views=[(synthetic_image(False, 7), "PA"), (synthetic_image(True, 8), "LL")])
    r = gen.generate([s], beam_size=3, no_repeat_ngram_size=3, grounding=False)[0]
    words = [w for w, _ in r.tokens]
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    assert len(grams) == len(set(grams))


def test_classify_views(gen: ReportGenerator) -> None:
    out = gen.classify_views([np.zeros((64, 64), np.float32), synthetic_image(True, 1)])
    assert len(out) == 2
    assert all(label in ("FRONTAL", "LATERAL") and 0.5 <= p <= 1.0 for label, p in out)
    assert gen.classify_views([]) == []


def test_runtime_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, onnx_models.runtime, onnx_models.bundle, onnx_models.evaluate; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eos_penalty_lengthens_without_changing_word_probabilities() -> None:
    """``generation.eos_penalty`` only lowers the end-of-report score: greedy text is the same
    up to where the unpenalised report ended, with the same word probabilities, then goes on."""
    studies = [StudyInput(views=[(synthetic_image(False, s, 200), "PA"), (synthetic_image(True, s + 1, 200), "LATERAL")],
                          indication=ind) for s, ind in ((11, "Cough."), (21, ""), (31, "Chest pain, fever."))]
    plain = ReportGenerator("default", threads=1)
    assert plain.eos_penalty == 2.0  # the shipped setting (model card)
    plain.eos_penalty = 0.0
    longer = ReportGenerator("default", threads=1)
    longer.eos_penalty = 4.0
    a = plain.generate(studies, beam_size=1, grounding=False)
    b = longer.generate(studies, beam_size=1, grounding=False)
    for x, y in zip(a, b, strict=True):
        assert len(y.tokens) >= len(x.tokens)
        assert y.tokens[: len(x.tokens)] == x.tokens
    assert sum(len(y.tokens) for y in b) > sum(len(x.tokens) for x in a)
