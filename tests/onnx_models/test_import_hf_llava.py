"""``cxrnode import-hf`` on a tiny random ``LlavaForConditionalGeneration`` (CLIP vision tower +
Llama with grouped-query attention, byte-level BPE tokenizer) built here: the decoder-only
contract, the prompt template with the indication and the view names, several views as several
image blocks, ORT vs transformers logits within 1e-4 and identical greedy text, batching, and a
study drafted through the node pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import tiny_llava  # noqa: E402

from onnx_models import cli  # noqa: E402
from onnx_models.bundle import BundleError, load_bundle  # noqa: E402
from onnx_models.import_hf import ImportHFError, import_hf, probe_images  # noqa: E402
from onnx_models.import_hf_llava import hf_prompt_ids  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput, _PrefixState  # noqa: E402

TOL = 1e-4
TEMPLATE = "USER: <image>\nViews: {views}. Indication: {indication}\nASSISTANT:"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llava")
    ck = tiny_llava(root / "ckpt")
    out = root / "bundle"
    assert cli.main(["import-hf", str(ck), "--out", str(out), "--name", "tiny-llava", "--version", "0.0.2",
                     "--prompt-template", TEMPLATE]) == 0
    return ck, out


def _hf(ck: Path):  # type: ignore[no-untyped-def]
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(ck), local_files_only=True, attn_implementation="eager")
    return model.eval(), CLIPImageProcessor.from_pretrained(str(ck), local_files_only=True)


def _pixels(proc, gen: ReportGenerator, study: StudyInput):  # type: ignore[no-untyped-def]
    """The checkpoint's own processor on the runtime-resized grey views (no second resize)."""
    from onnx_models.imaging import resize

    rgb = [np.repeat(np.clip(resize(im, gen.image_size), 0, 1)[:, :, None], 3, axis=2) for im, _ in study.views]
    return proc(images=rgb, do_resize=False, do_center_crop=False, do_rescale=False,
                return_tensors="pt")["pixel_values"]


def _studies() -> list[StudyInput]:
    ims = probe_images(5, size=96)
    return [StudyInput(views=[(ims[0], "PA"), (ims[1], "LATERAL")], indication="Cough and fever for three days."),
            StudyInput(views=[(ims[2], "AP")]),
            StudyInput(views=[(ims[3], "PA")], indication="Chest pain."),
            StudyInput(views=[(1.0 - ims[4], "PA"), (ims[1], "LL")], indication="Fever.")]


def test_manifest_and_checks(imported: tuple[Path, Path]) -> None:
    _, out = imported
    m = load_bundle(out).manifest
    assert m["architecture"] == "decoder-only" and sorted(m["graphs"]) == ["decoder", "embed", "encoder",
                                                                          "view_classifier"]
    assert m["prompt"] == {"template": TEMPLATE, "prefix_tokens": ["<s>"], "empty_indication": "none"}
    assert m["tokenizer"]["bos"] is None and m["tokenizer"]["eos"] == "</s>"
    assert m["decoder"]["heads"] == 2  # the key/value heads of grouped-query attention
    c = m["import"]["checks"]
    assert c["max_abs_logit_diff"] < TOL and c["greedy_identical"] == c["greedy_compared"] == 2
    card = (out / "MODEL_CARD.md").read_text()
    assert "Prompt:" in card and "no start token" in card and "**mit**" in card


def test_prompt_logits_and_greedy_match_transformers(imported: tuple[Path, Path]) -> None:
    ck, out = imported
    model, proc = _hf(ck)
    gen = ReportGenerator(out, threads=1, beam_size=1)
    gen.consistency = False
    image_token = int(model.config.image_token_id)
    for st in _studies():
        _, state = gen._encode([st])
        assert isinstance(state, _PrefixState) and state.prefix is not None
        n = gen._run_encoder(*gen._pixels([st]))["image_embeds"].shape[1]
        assert n == 16 * len(st.views)  # one block of image tokens per view
        ids = hf_prompt_ids(gen, st, n, image_token)
        text = gen.tokenizer.decode(ids, skip_special_tokens=False)
        assert f"Views: {', '.join(v for _, v in st.views)}." in text
        assert (st.indication or "none") in text and text.startswith("<s>USER: <image>")
        pv = _pixels(proc, gen, st)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits.numpy()
        pk, pvv = gen._empty_past(state)
        got = gen._sessions["decoder"].run(["logits"], {"inputs_embeds": state.prefix, "attention_mask": state.mask,
                                                        "past_k": pk, "past_v": pvv})[0]
        assert np.abs(got - ref).max() < TOL
        g = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=16, do_sample=False,
                           num_beams=1, bad_words_ids=[[i] for i in gen._banned] or None)[0, len(ids):].tolist()
        g = g[: g.index(gen._eos)] if gen._eos in g else g
        [r] = gen.generate([st], max_tokens=16)
        words = [w for w, _ in r.tokens]
        import re

        assert words == re.findall(r"\w+|[^\w\s]", gen.tokenizer.decode(g, skip_special_tokens=True))
        assert words and r.impression == ""


def test_batching_changes_nothing(imported: tuple[Path, Path]) -> None:
    _, out = imported
    gen = ReportGenerator(out, threads=1)
    studies = _studies()
    together = gen.generate(studies, beam_size=1, max_tokens=12)
    for s, r in zip(studies, together, strict=True):
        [alone] = gen.generate([s], beam_size=1, max_tokens=12)
        assert [w for w, _ in alone.tokens] == [w for w, _ in r.tokens]
        assert np.allclose([p for _, p in alone.tokens], [p for _, p in r.tokens], atol=1e-5)
    gen.consistency = False  # random byte-level text has no sentences the consistency rules keep
    beams = gen.generate(studies[:2], beam_size=3, max_tokens=10)
    assert all(b.tokens for b in beams)
    assert [[w for w, _ in b.tokens] for b in beams] == [[w for w, _ in gen.generate([s], beam_size=3, max_tokens=10)[0]
                                                          .tokens] for s in studies[:2]]


def test_io_binding_changes_nothing(imported: tuple[Path, Path]) -> None:
    """Decoder-only bundles through I/O binding (the cache as OrtValues between steps) give the
    tokens and probabilities of plain ``run`` calls, greedy and beam."""
    _, out = imported
    gen = ReportGenerator(out, threads=1)
    gen.consistency = False
    studies = _studies()[:2]
    assert gen.kv_device == "cpu" and not gen.io_binding
    for beam in (1, 3):
        plain = gen.generate(studies, beam_size=beam, max_tokens=10)
        gen.io_binding = True
        bound = gen.generate(studies, beam_size=beam, max_tokens=10)
        gen.io_binding = False
        assert [r.tokens for r in bound] == [r.tokens for r in plain] and all(r.tokens for r in bound)


def test_template_needs_image_and_int8_variant(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    ck, _ = imported
    with pytest.raises(ImportHFError, match="must contain <image>"):
        import_hf(ck, tmp_path / "x", prompt_template="Indication: {indication}")
    assert not (tmp_path / "x").exists()
    out = import_hf(ck, tmp_path / "b8", int8=True)
    m = load_bundle(out).manifest
    assert m["import"]["precision"].startswith("int8") and "precision" not in m["graphs"]["embed"]
    assert m["import"]["checks_int8"]["greedy_compared"] == 2
    assert {r: g.get("external_data") for r, g in m["graphs"].items() if r != "view_classifier"} == {
        "encoder": "encoder.onnx.data", "embed": "embed.onnx.data", "decoder": "decoder.onnx.data"}
    assert not list(out.glob("*.int8*")) and sorted(m["files"]) == sorted(
        str(p.relative_to(out)) for p in out.iterdir() if p.name != "manifest.json")
    [r] = ReportGenerator(out, threads=1).generate(_studies()[:1], beam_size=1, max_tokens=6)
    assert r.tokens


def test_external_data_drafts_as_without_and_is_verified(tmp_path: Path, imported: tuple[Path, Path]) -> None:
    """The default import keeps the weights in ``<graph>.data`` (ONNX external data, loaded by
    ONNX Runtime from the bundle folder); the same checkpoint imported self-contained drafts
    the same text; a changed or missing data file is refused naming it."""
    ck, out = imported
    m = load_bundle(out).manifest
    assert {r: g.get("external_data") for r, g in m["graphs"].items()} == {
        "encoder": "encoder.onnx.data", "embed": "embed.onnx.data", "decoder": "decoder.onnx.data",
        "view_classifier": None}
    assert {"encoder.onnx.data", "embed.onnx.data", "decoder.onnx.data"} <= set(m["files"])
    assert (out / "decoder.onnx").stat().st_size < (out / "decoder.onnx.data").stat().st_size
    inline = import_hf(ck, tmp_path / "inline", prompt_template=TEMPLATE, check=False, external_data=False)
    mi = load_bundle(inline).manifest
    assert not any("external_data" in g for g in mi["graphs"].values()) and not list(inline.glob("*.data"))
    studies = _studies()
    a = ReportGenerator(out, threads=1).generate(studies, beam_size=1, max_tokens=12)
    b = ReportGenerator(inline, threads=1).generate(studies, beam_size=1, max_tokens=12)
    assert [r.tokens for r in a] == [r.tokens for r in b] and all(r.tokens for r in a)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "decoder.onnx.data", "r+b") as fh:
        fh.seek(64)
        fh.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(BundleError, match=r"checksum mismatch for decoder\.onnx\.data \(the external weights of "
                                          r"graph 'decoder'\)"):
        ReportGenerator(broken, threads=1)
    (broken / "encoder.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"missing file encoder\.onnx\.data \(the external weights of graph "
                                          r"'encoder'\)"):
        load_bundle(broken, verify=False)


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
    study = samples.make_study(1, prefix="hfllava")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert (job.model_name, job.model_version) == ("tiny-llava", "0.0.2")
    with env.sessions() as s:
        [d] = list(s.scalars(select(Draft)))
    assert d.findings and not d.impression and len(json.loads(d.views)) == 2
    path = env.store.abspath(d.path)
    check_sr_file(path)
    assert sr.read_report(dcmread(path)).findings == d.findings
