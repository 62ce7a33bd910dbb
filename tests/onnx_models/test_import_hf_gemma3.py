"""``cxrnode import-hf`` on a tiny random ``Gemma3ForConditionalGeneration`` (SigLIP vision tower,
Gemma 3 projector, Gemma 3 text model with grouped-query attention, local sliding-window and
global layers with their own RoPE (linear scaling on the global ones, as MedGemma-4B), q/k
norms) built here: ORT vs transformers logits within 1e-4 with the image tokens attending
bidirectionally (``token_type_ids``), identical greedy text, a sliding window shorter than the
prompt, batching, and a study drafted through the node pipeline (SR checked by dciodvfy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import README, SENTENCES  # noqa: E402

from onnx_models import cli  # noqa: E402
from onnx_models.bundle import load_bundle  # noqa: E402
from onnx_models.import_hf import family, import_hf, probe_images  # noqa: E402
from onnx_models.import_hf_gemma3 import check_gemma3, hf_inputs, load_gemma3  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput, _PrefixState  # noqa: E402

TOL = 1e-4
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
            "<start_of_turn>", "<end_of_turn>"]
WINDOW = 16  # shorter than every prompt here: the local layers' window is exercised


def tiny_gemma3(out: Path, seed: int = 0, image_size: int = 32) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES + ["user\nViews: PA, LATERAL. Indication: cough and fever.\n\nmodel\n"],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    text = Gemma3TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=16,
                            sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"],
                            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                             "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                                "factor": 8.0}},
                            max_position_embeddings=512, bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                            pad_token_id=ids["<pad>"], initializer_range=0.2)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=8)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                       image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # words, not byte soup (as tiny_llava): embedding dimension 0 is a large constant the
        # residual stream carries to the last norm, and the LM head reads it as "whole word or
        # full stop" (+) or "anything else" (-); the rest of the logit stays random and
        # input-dependent, a few tokens clearly preferred (no argmax near-ties)
        import re

        model.model.language_model.embed_tokens.weight[:, 0] = 8.0
        head = model.lm_head.weight
        head.mul_(3.0)
        for t, i in tok.get_vocab().items():
            head[i, 0] = 2.0 if re.fullmatch(r"\u0120[a-z]{3,}|\.", t) else -2.0
        head[ids["<end_of_turn>"]] *= 0.0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "size": {"height": image_size, "width": image_size},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_pan_and_scan": False}), encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gemma3")
    ck = tiny_gemma3(root / "ckpt")
    out = root / "bundle"
    assert cli.main(["import-hf", str(ck), "--out", str(out), "--name", "tiny-gemma3", "--version", "0.0.3"]) == 0
    return ck, out


def _studies() -> list[StudyInput]:
    ims = probe_images(5, size=96)
    return [StudyInput(views=[(ims[0], "PA"), (ims[1], "LATERAL")], indication="Cough and fever for three days."),
            StudyInput(views=[(ims[2], "AP")]),
            StudyInput(views=[(ims[3], "PA")], indication="Chest pain."),
            StudyInput(views=[(1.0 - ims[4], "PA"), (ims[1], "LL")], indication="Fever.")]


def test_family_manifest_and_checks(imported: tuple[Path, Path]) -> None:
    ck, out = imported
    assert family(json.loads((ck / "config.json").read_text())) == "gemma3"
    b = load_bundle(out)
    m = b.manifest
    assert b.architecture == "decoder-only" and m["import"]["family"] == "gemma3"
    assert m["tokenizer"]["eos"] == "<end_of_turn>" and m["prompt"]["prefix_tokens"] == ["<bos>"]
    assert "<start_of_turn>user" in m["prompt"]["template"] and m["input"]["max_views"] == 2
    c = m["import"]["checks"]
    assert c["max_abs_logit_diff"] < TOL and c["greedy_identical"] == c["greedy_compared"] == 2
    assert "Gemma3ForConditionalGeneration" in m["description"]
    # the decoder-only families always keep their weights in ONNX external data (<graph>.data)
    assert {r: g.get("external_data") for r, g in m["graphs"].items()} == {
        "encoder": "encoder.onnx.data", "embed": "embed.onnx.data", "decoder": "decoder.onnx.data",
        "view_classifier": None}


def test_prompt_logits_and_greedy_match_transformers(imported: tuple[Path, Path]) -> None:
    """On every study (1 and 2 views): logits over the whole prompt within 1e-4, with image
    tokens bidirectional as transformers applies them, and the same greedy tokens."""
    ck, out = imported
    model = load_gemma3(ck)
    gen = ReportGenerator(out, threads=1, beam_size=1)
    studies = _studies()
    res = check_gemma3(model, out, {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, studies, max_tokens=12)
    assert res["max_abs_logit_diff"] < TOL and res["greedy_identical"] == len(studies), res
    # the prompt is longer than the sliding window, the image block is in it as image tokens
    for st in studies:
        ids, types = hf_inputs(gen, model, st)
        assert len(ids) > WINDOW and sum(types) == 4 * len(st.views)
        _, state = gen._encode([st])
        assert isinstance(state, _PrefixState)
        assert int((state.mask > 1.5).sum()) == 4 * len(st.views)
    # the bidirectional image block matters: without token_type_ids transformers' logits differ
    st = studies[0]
    ids, types = hf_inputs(gen, model, st)
    images, _, _ = gen._pixels([st])
    from onnx_models.import_hf import hf_pixels

    pv = hf_pixels(images[0], {"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    with torch.no_grad():
        bi = model(input_ids=torch.tensor([ids]), pixel_values=pv, token_type_ids=torch.tensor([types])).logits
        causal = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits
    assert float((bi - causal).abs().max()) > 1e-3


def test_batching_and_beam(imported: tuple[Path, Path]) -> None:
    _, out = imported
    gen = ReportGenerator(out, threads=1)
    gen.consistency = False
    studies = _studies()
    together = gen.generate(studies, beam_size=1, max_tokens=10)
    for s, r in zip(studies, together, strict=True):
        [alone] = gen.generate([s], beam_size=1, max_tokens=10)
        assert [w for w, _ in alone.tokens] == [w for w, _ in r.tokens]
        assert np.allclose([p for _, p in alone.tokens], [p for _, p in r.tokens], atol=1e-5)
    assert all(r.tokens for r in gen.generate(studies[:2], beam_size=3, max_tokens=8))


def test_int8_variant(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    ck, _ = imported
    out = import_hf(ck, tmp_path / "b8", int8=True)
    m = load_bundle(out).manifest
    assert m["import"]["precision"].startswith("int8") and m["import"]["checks_int8"]["greedy_compared"] == 2
    gen = ReportGenerator(out, threads=1)
    gen.consistency = False  # random text: the consistency rules may keep no sentence
    [r] = gen.generate(_studies()[:1], beam_size=1, max_tokens=6)
    assert r.tokens


def test_drafts_a_study_through_the_node_pipeline(tmp_path: Path, imported: tuple[Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = imported
    from pydicom import dcmread
    from sqlalchemy import select
    from support.nodeenv import make_env
    from support.sr_checks import check_sr_file

    from dicom_node.db import Draft
    from plugin.drafting import pipeline, samples, sr

    monkeypatch.setenv("CXRNODE_TEST_BUNDLE", str(out))
    env = make_env(tmp_path / "node")
    study = samples.make_study(1, prefix="hfgemma3")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert (job.model_name, job.model_version) == ("tiny-gemma3", "0.0.3")
    with env.sessions() as s:
        [d] = list(s.scalars(select(Draft)))
    assert d.findings and not d.impression and len(json.loads(d.views)) == 2
    path = env.store.abspath(d.path)
    check_sr_file(path)
    assert sr.read_report(dcmread(path)).findings == d.findings
