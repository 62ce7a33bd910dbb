"""Training (tiny, 1-2 steps), resume, determinism, export and ORT-vs-torch parity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnx_models.bundle import load_bundle  # noqa: E402
from onnx_models.data import load_studies, read_image  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput  # noqa: E402
from onnx_models.train import TrainConfig, auroc, best_thresholds, bucket_batches, train  # noqa: E402


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict = dict(data=str(data), out=str(out), epochs=1, batch_size=4, max_steps=2, warmup_steps=1, threads=1,
                      head_epochs=1)
    base.update(kw)
    return TrainConfig(**base)


def test_checkpoint_contents(tiny_checkpoint: Path) -> None:
    ck = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert {"config", "model", "view_classifier", "tokenizer", "thresholds", "training"} <= set(ck)
    assert len(ck["thresholds"]) == 13
    tr = ck["training"]
    assert tr["seed"] == 13 and tr["epoch"] == 1 and "val_auroc" in tr
    assert tr["head_finetune"]["epochs"] == 1  # stage 2 ran
    assert (tiny_checkpoint.parent / "best_stage1.pt").exists()
    last = torch.load(tiny_checkpoint.parent / "last.pt", map_location="cpu", weights_only=False)
    assert {"optimizer", "epoch", "step"} <= set(last) and last["step"] == 2


def test_deterministic_and_resumable(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    train(_cfg(tiny_data, out))
    a = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)["model"]
    b = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights
    # resume: a second run with more epochs continues from last.pt (epoch 2 only)
    train(_cfg(tiny_data, out, epochs=2, max_steps=3))
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["step"] == 3
    assert [h["epoch"] for h in last["history"]] == [1, 2]


def test_bucket_batches_cover_everything() -> None:
    import random

    lengths = [5, 9, 1, 7, 3, 3, 8, 2, 6, 4]
    batches = bucket_batches(lengths, 3, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == bucket_batches(lengths, 3, random.Random(0))


def test_metrics_helpers() -> None:
    y = np.array([0, 0, 1, 1], dtype=np.float32)
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert np.isnan(auroc(np.zeros(3), np.array([0.1, 0.2, 0.3])))
    t = best_thresholds(np.array([[0], [0], [1], [1]], dtype=np.float32), np.array([[0.1], [0.3], [0.6], [0.9]]))
    assert 0.29 < t[0] <= 0.6  # separates the two classes


def test_export_parity(tiny_checkpoint: Path, tiny_bundle: Path, tiny_data: Path) -> None:
    """ORT and torch agree: observation logits and decoder logits within 1e-4, identical greedy text."""
    from onnx_models.torch_model import ModelConfig, ReportModel

    b = load_bundle(tiny_bundle)
    assert b.name == "tiny" and b.manifest["training"]["seed"] == 13
    ck = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    model = ReportModel(ModelConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    gen = ReportGenerator(tiny_bundle, threads=1)
    studies = load_studies(tiny_data, ["val"])
    inputs = [StudyInput(views=[(read_image(im.path), im.view) for im in s.images], indication=s.indication)
              for s in studies]
    images, view_ids, view_mask = gen._pixels(inputs)
    probs, state = gen._encode(inputs)
    ck_ort, cv_ort, mm_ort, cond_ort = state.cross_k, state.cross_v, state.memory_mask, state.cond
    with torch.no_grad():
        t_img, t_view, t_mask = (torch.from_numpy(x) for x in (images, view_ids, view_mask))
        tokens, obs = model.encode_images(t_img, t_view, t_mask)
        assert np.allclose(torch.sigmoid(obs).numpy(), probs, atol=1e-4)
        states = torch.from_numpy((probs >= gen.thresholds).astype(np.int64))
        ind = [gen._indication_ids(s.indication) for s in inputs]
        li = max(len(x) for x in ind)
        ind_ids = torch.zeros(len(ind), li, dtype=torch.long)
        ind_mask = torch.zeros(len(ind), li)
        for i, x in enumerate(ind):
            ind_ids[i, : len(x)] = torch.tensor(x)
            ind_mask[i, : len(x)] = 1
        ck_t, cv_t, mm_t, cond_t = model.bridge(tokens, t_mask, states, ind_ids, ind_mask)
        assert np.allclose(ck_t.numpy(), ck_ort, atol=1e-4) and np.allclose(cv_t.numpy(), cv_ort, atol=1e-4)
        assert np.allclose(cond_t.numpy(), cond_ort, atol=1e-5)
        # a 3-token prefix, then one step with the cache
        ids = torch.tensor([[gen._bos, 7, 9]] * len(inputs))
        pk, pv = model.empty_past(len(inputs))
        logits_t, pk_t, pv_t = model.decode(ids, mm_t, ck_t, cv_t, pk, pv, cond_t)
        logits_o, pk_o, pv_o = gen._sessions["decoder"].run(None, {
            "input_ids": ids.numpy(), "memory_mask": mm_ort, "cross_k": ck_ort, "cross_v": cv_ort,
            "past_k": pk.numpy(), "past_v": pv.numpy(), "cond": cond_ort})
        assert np.abs(logits_t.numpy() - logits_o).max() < 1e-4
        step_t, _, _ = model.decode(torch.tensor([[11]] * len(inputs)), mm_t, ck_t, cv_t, pk_t, pv_t, cond_t)
        step_o, _, _ = gen._sessions["decoder"].run(None, {
            "input_ids": np.array([[11]] * len(inputs), dtype=np.int64), "memory_mask": mm_ort,
            "cross_k": ck_ort, "cross_v": cv_ort, "past_k": pk_o, "past_v": pv_o, "cond": cond_ort})
        assert np.abs(step_t.numpy() - step_o).max() < 1e-4
        # greedy: identical token sequences
        t_out = model.greedy(t_img, t_view, t_mask, torch.from_numpy(gen.thresholds), ind_ids, ind_mask,
                             gen._bos, gen._eos, 20, banned=tuple(gen._banned), sep=gen._sep)
    o_out = gen._greedy(state, 20, 0)
    assert [ids for ids, _ in o_out] == t_out


def test_export_replaces_bundle_and_keeps_card(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from onnx_models.export import export_bundle

    out = tmp_path / "b"
    export_bundle(tiny_checkpoint, out, model_card="# card v1\n")
    assert (out / "MODEL_CARD.md").read_text() == "# card v1\n"
    export_bundle(tiny_checkpoint, out)  # no card given: the existing one is kept
    assert (out / "MODEL_CARD.md").read_text() == "# card v1\n"
    load_bundle(out)
    shutil.rmtree(out)


def test_init_from_and_freeze_image(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Text-side fine-tuning from a checkpoint leaves the image side and the head untouched."""
    out = tmp_path / "ft"
    train(_cfg(tiny_data, out, init_from=str(tiny_checkpoint), freeze_image=True, head_epochs=0))
    a = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    b = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    image_side = [k for k in a["model"] if k.startswith(("encoder.", "view_emb.", "enc_ln.", "head."))]
    assert image_side and all(torch.equal(a["model"][k], b["model"][k]) for k in image_side)
    assert not torch.equal(a["model"]["layers.0.ff.0.weight"], b["model"]["layers.0.ff.0.weight"])
