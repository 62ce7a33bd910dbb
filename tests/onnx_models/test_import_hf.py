"""``cxrnode import-hf`` on tiny random VisionEncoderDecoderModel checkpoints built here (no
download): ONNX Runtime vs transformers logits within 1e-4, identical greedy tokens and text,
the bundle checks, int8/fp16 variants, and a study drafted through the node pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import tiny_ved  # noqa: E402

from onnx_models import cli  # noqa: E402
from onnx_models.bundle import load_bundle  # noqa: E402
from onnx_models.import_hf import ImportHFError, import_hf, probe_images, read_checkpoint  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    ck = tiny_ved(root / "ckpt")
    out = root / "bundle"
    assert cli.main(["import-hf", str(ck), "--out", str(out), "--name", "tiny-ved", "--version", "0.0.1"]) == 0
    return ck, out


def _hf(ck: Path):  # type: ignore[no-untyped-def]
    from transformers import VisionEncoderDecoderModel, ViTImageProcessor

    model = VisionEncoderDecoderModel.from_pretrained(str(ck), local_files_only=True, attn_implementation="eager")
    return model.eval(), ViTImageProcessor.from_pretrained(str(ck), local_files_only=True)


def _hf_pixels(proc, gen: ReportGenerator, study: StudyInput, view: int = 0):  # type: ignore[no-untyped-def]
    """pixel_values as the checkpoint's own image processor makes them from the runtime-resized
    grey image (copied to RGB; no second resize or rescale)."""
    from onnx_models.imaging import resize

    img = np.clip(resize(study.views[view][0], gen.image_size), 0.0, 1.0)
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    return proc(images=[rgb], do_resize=False, do_rescale=False, return_tensors="pt")["pixel_values"]


def _studies() -> list[StudyInput]:
    ims = probe_images(4, size=200)
    return [StudyInput(views=[(ims[0], "PA")], indication="Cough."), StudyInput(views=[(ims[1], "AP")]),
            StudyInput(views=[(ims[2], "PA")]), StudyInput(views=[(1.0 - ims[3], "PA")])]


def test_bundle_checks_and_manifest(imported: tuple[Path, Path]) -> None:
    _, out = imported
    b = load_bundle(out)
    m = b.manifest
    assert b.architecture == "encoder-decoder" and m["name"] == "tiny-ved"
    assert sorted(m["graphs"]) == ["bridge", "decoder", "encoder", "view_classifier"]
    assert m["tokenizer"]["level"] == "subword" and m["tokenizer"]["bos"] == "[CLS]" and m["tokenizer"]["eos"] == "[SEP]"
    assert m["tokenizer"]["section_separator"] is None and m["generation"]["section"] == "findings"
    assert m["input"]["image_size"] == 32 and m["input"]["max_views"] == 1
    assert m["input"]["image_processor"]["resample"] == "bicubic"
    assert m["input"]["image_processor"]["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert m["observations"]["names"] == [] and "input_check" not in m
    assert m["import"]["input_gate"].startswith("off")
    checks = m["import"]["checks"]
    assert checks["max_abs_logit_diff"] < TOL and checks["greedy_identical"] == checks["greedy_compared"] == 3
    assert m["import"]["readme"]["license"] == "mit" and m["import"]["weights"]["model.safetensors"]
    card = (out / "MODEL_CARD.md").read_text()
    for needle in ("**mit**", "PhysioNet", "input gate is **off**", "greedy token ids identical on 3 of 3",
                   "model.safetensors"):
        assert needle in card, needle


def test_logits_match_transformers(imported: tuple[Path, Path]) -> None:
    ck, out = imported
    model, proc = _hf(ck)
    gen = ReportGenerator(out, threads=1)
    studies = _studies()
    _, st = gen._encode(studies)
    pv = torch.cat([_hf_pixels(proc, gen, s) for s in studies])
    ids = torch.tensor([[gen._bos, 7, 12, 30, 9, 41]] * len(studies))
    with torch.no_grad():
        ref = model(pixel_values=pv, decoder_input_ids=ids).logits.numpy()
    pk, pv0 = gen._empty_past(st)
    feed = {"memory_mask": st.memory_mask, "cross_k": st.cross_k, "cross_v": st.cross_v}
    full, k, v = gen._sessions["decoder"].run(None, {"input_ids": ids.numpy(), "past_k": pk, "past_v": pv0, **feed})
    assert np.abs(full - ref).max() < TOL
    # the same logits one cached step at a time
    pk, pv0 = gen._empty_past(st)
    for t in range(ids.shape[1]):
        step, pk, pv0 = gen._sessions["decoder"].run(None, {"input_ids": ids[:, t : t + 1].numpy(), "past_k": pk,
                                                            "past_v": pv0, **feed})
        assert np.abs(step[:, 0] - ref[:, t]).max() < TOL
    assert pk.shape[3] == ids.shape[1]


def test_greedy_text_identical_to_transformers(imported: tuple[Path, Path]) -> None:
    ck, out = imported
    model, proc = _hf(ck)
    gen = ReportGenerator(out, threads=1, beam_size=1)
    gen.consistency = False  # compare the decoder's text itself
    studies = _studies()
    reports = gen.generate(studies, max_tokens=20)
    seqs = []
    for s, r in zip(studies, reports, strict=True):
        ref = model.generate(pixel_values=_hf_pixels(proc, gen, s), max_new_tokens=20, do_sample=False, num_beams=1,
                             bad_words_ids=[[i] for i in gen._banned])[0].tolist()[1:]
        ref = ref[: ref.index(gen._eos)] if gen._eos in ref else ref
        seqs.append(tuple(ref))
        text = gen.tokenizer.decode(ref, skip_special_tokens=True)
        assert [w for w, _ in r.tokens] == re.findall(r"\w+|[^\w\s]", text)
        assert all(0.0 < p <= 1.0 for _, p in r.tokens)
        assert r.impression == "" and r.observations == {} and r.grounded == []
    assert len(set(seqs)) >= 2  # the inputs matter: the comparison is not of one fixed text
    # batching changes nothing
    alone = [gen.generate([s], max_tokens=20)[0] for s in studies]
    assert [a.tokens for a in alone] == [r.tokens for r in reports]


def test_all_views_concatenated(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    ck, _ = imported
    out = import_hf(ck, tmp_path / "b", views="all", section="impression")
    gen = ReportGenerator(out, threads=1)
    assert gen.bundle.manifest["input"]["max_views"] == 4
    model, proc = _hf(ck)
    ims = probe_images(3, size=64)
    studies = [StudyInput(views=[(ims[0], "PA"), (ims[1], "LATERAL")]), StudyInput(views=[(ims[2], "AP")])]
    _, st = gen._encode(studies)
    assert st.memory_mask.tolist()[1] == [1.0] * (st.memory_mask.shape[1] // 2) + [0.0] * (st.memory_mask.shape[1] // 2)
    ids = torch.tensor([[gen._bos, 5, 9]] * 2)
    pk, pv = gen._empty_past(st)
    logits = gen._sessions["decoder"].run(["logits"], {"input_ids": ids.numpy(), "memory_mask": st.memory_mask,
                                                       "cross_k": st.cross_k, "cross_v": st.cross_v,
                                                       "past_k": pk, "past_v": pv})[0]
    with torch.no_grad():
        for i, s in enumerate(studies):
            mem = torch.cat([model.encoder(pixel_values=_hf_pixels(proc, gen, s, j)).last_hidden_state
                             for j in range(len(s.views))], dim=1)
            ref = model.decoder(input_ids=ids[i : i + 1], encoder_hidden_states=mem).logits.numpy()
            assert np.abs(logits[i : i + 1] - ref).max() < TOL
    [r] = gen.generate(studies[:1], beam_size=1, max_tokens=6)
    assert r.findings == "" and r.impression


def test_missing_files_and_remote_code_are_refused(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    ck, _ = imported
    with pytest.raises(ImportHFError, match="not a folder"):
        read_checkpoint(tmp_path / "nowhere")
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.json").write_text((ck / "config.json").read_text())
    with pytest.raises(ImportHFError, match=r"lacks model\.safetensors .*preprocessor_config\.json.*tokenizer\.json"):
        read_checkpoint(part)
    for f in ("model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        (part / f).write_bytes((ck / f).read_bytes())
    cfg = json.loads((ck / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.X"}
    (part / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportHFError, match="remote code"):
        read_checkpoint(part)
    cfg.pop("auto_map")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (part / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportHFError, match="not supported by import-hf"):
        import_hf(part, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ImportHFError, match="no prompt"):
        import_hf(ck, tmp_path / "x", prompt_template="{indication}")


def test_int8_variant(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    ck, _ = imported
    out = import_hf(ck, tmp_path / "b8", int8=True)
    m = load_bundle(out).manifest
    assert m["import"]["precision"].startswith("int8")
    c = m["import"]["checks_int8"]
    assert c["greedy_compared"] == 3 and c["max_abs_logit_diff"] < 1.0
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "decoder.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert "int8 graphs vs transformers" in (out / "MODEL_CARD.md").read_text()
    [r] = ReportGenerator(out, threads=1).generate(_studies()[:1], beam_size=1, max_tokens=8)
    assert r.tokens


def test_fp16_variant_and_provider_choice(tmp_path: Path, imported: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ck, _ = imported
    out = import_hf(ck, tmp_path / "b16", fp16=True)
    m = load_bundle(out).manifest
    assert m["import"]["precision"].startswith("fp16") and m["import"]["providers"][0] == "CUDAExecutionProvider"
    import onnx
    from onnx import TensorProto

    g = onnx.load(str(out / "decoder.onnx")).graph
    assert any(t.data_type == TensorProto.FLOAT16 for t in g.initializer)
    assert all(i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64) for i in g.input)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in g.output)
    from onnx_models import runtime

    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    assert runtime.choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


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
    study = samples.make_study(1, prefix="hfimp")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert (job.model_name, job.model_version) == ("tiny-ved", "0.0.1")
    assert "the model reads at most 1 views" in job.log  # first frontal read, the lateral named
    with env.sessions() as s:
        [d] = list(s.scalars(select(Draft)))
    assert d.findings and not d.impression
    path = env.store.abspath(d.path)
    check_sr_file(path)
    rep = sr.read_report(dcmread(path))
    assert rep.findings == d.findings and rep.device_model == "tiny-ved 0.0.1"
    views = json.loads(d.views)
    assert views[0]["view"] in ("PA", "AP")


def test_calibration_images_turn_the_gate_on(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    from PIL import Image

    ck, _ = imported
    films = tmp_path / "films"
    films.mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    for i in range(140):  # smooth "chests": two dark lungs in a brighter body, varied a little
        img = 0.55 + 0.1 * rng.normal() - 0.35 * ((((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2) < 1) \
            - 0.35 * ((((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2) < 1) + rng.normal(0, 0.03, (64, 64))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(films / f"f{i:03d}.png")
    out = import_hf(ck, tmp_path / "gated", calibration_images=films)
    m = load_bundle(out).manifest
    assert m["input_check"]["fitted_on_views"] + m["input_check"]["limit_from_views"] == 140
    assert "input_check.npz" in m["files"] and m["import"]["input_gate"] == "on: fitted on films"
    assert "input gate is **off**" not in (out / "MODEL_CARD.md").read_text()
    gen = ReportGenerator(out, threads=1)
    film = np.asarray(Image.open(films / "f000.png"), dtype=np.float32) / 255.0
    noise = np.random.default_rng(9).uniform(0, 1, (64, 64)).astype(np.float32)
    checks = gen.check_inputs([film, noise], ["PA", "PA"])
    assert checks is not None and len(checks) == 2
    assert checks[0].passed and not checks[1].passed, checks
    with pytest.raises(ImportHFError, match="no image files"):
        import_hf(ck, tmp_path / "x", calibration_images=tmp_path / "empty")


def test_vocab_txt_checkpoint_and_generation_config(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    """A checkpoint with a BERT vocab.txt and no tokenizer.json (transformers builds the fast
    tokenizer), and decoding defaults from its generation_config.json."""
    import shutil

    ck, _ = imported
    copy = tmp_path / "ck"
    shutil.copytree(ck, copy)
    vocab = json.loads((copy / "tokenizer.json").read_text())["model"]["vocab"]
    (copy / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    gc = json.loads((copy / "generation_config.json").read_text())
    gc.update(num_beams=3, max_length=40, no_repeat_ngram_size=3)
    (copy / "generation_config.json").write_text(json.dumps(gc))
    out = import_hf(copy, tmp_path / "b")
    m = load_bundle(out).manifest
    assert m["import"]["checks"]["max_abs_logit_diff"] < TOL and m["import"]["checks"]["greedy_identical"] == 3
    assert (m["generation"]["beam_size"], m["generation"]["max_tokens"], m["generation"]["no_repeat_ngram_size"]) == (3, 40, 3)
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab() == vocab
