"""Train the bundle's findings classifier (``cxrnode train-findings``).

A separate, full-resolution image classifier over the 13 abnormal observations
(:class:`~onnx_models.torch_model.FindingsClassifier`). The report model's own head sees the
views at 128 px, where small nodules vanish; this one sees them at the dataset's 256 px. Its
probabilities drive the decoder's diagnosis prompts and the grounding step.

Honest thresholds: the classifier trains on the ``train`` split minus a stable 10 % "tune"
part (``sha256(study_id)[0] < 26``); the checkpoint and the per-observation thresholds are
chosen on "tune" only, so metrics on ``val`` are held out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import VIEWS, Study, is_tune, load_studies, read_image
from .imaging import resize
from .labels import ABNORMAL_OBSERVATIONS, binary_vector, label
from .torch_model import FindingsClassifier
from .train import augment, auroc, best_thresholds

log = logging.getLogger(__name__)


@dataclass
class FindingsConfig:
    data: str
    out: str
    epochs: int = 14
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    image_size: int = 256
    seed: int = 13
    threads: int = 2
    max_train_studies: int = 0  # tests use a tiny subset
    max_steps: int = 0


def _pixels(studies: list[Study], size: int, cache: Path) -> list[np.ndarray]:
    key = hashlib.sha256(json.dumps([[str(i.path) for i in s.images] for s in studies]).encode()
                         + str(size).encode()).hexdigest()[:16]
    f = cache / f"findings-pixels-{key}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=True)
        return list(z["images"])
    out = []
    for s in tqdm(studies, desc=f"images {size}px", unit="study", file=sys.stderr):
        px = [resize(read_image(im.path), size) for im in s.images]
        out.append((np.stack(px).clip(0, 1) * 255).round().astype(np.uint8))
    arr = np.empty(len(out), dtype=object)
    arr[:] = out
    np.savez(f, images=arr)
    return out


def _batch(px: list[np.ndarray], views: list[list[int]], idx: list[int], max_views: int,
           mean: float, std: float, rng: random.Random | None) -> tuple[torch.Tensor, ...]:
    sel = []
    for i in idx:
        order = list(range(len(views[i])))
        if rng is not None:
            rng.shuffle(order)
        sel.append(order[:max_views])
    b, v, s = len(idx), max(len(o) for o in sel), px[idx[0]].shape[-1]
    images = torch.zeros(b, v, 1, s, s)
    view_ids = torch.full((b, v), VIEWS.index("UNKNOWN"), dtype=torch.long)
    mask = torch.zeros(b, v)
    for bi, (i, order) in enumerate(zip(idx, sel, strict=True)):
        for vj, k in enumerate(order):
            img = torch.from_numpy(px[i][k].astype(np.float32) / 255.0)
            if rng is not None:
                img = augment(img, rng, shift=12)
            images[bi, vj, 0] = (img - mean) / std
            view_ids[bi, vj] = views[i][k] if rng is None or rng.random() > 0.1 else VIEWS.index("UNKNOWN")
            mask[bi, vj] = 1.0
    return images, view_ids, mask


def predict(model: FindingsClassifier, px: list[np.ndarray], views: list[list[int]],
            mean: float, std: float, max_views: int = 4, batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(px), batch_size):
            idx = list(range(i, min(i + batch_size, len(px))))
            out.append(torch.sigmoid(model(*_batch(px, views, idx, max_views, mean, std, None))).numpy())
    return np.concatenate(out)


def micro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred & (y > 0.5)).sum())
    return 2 * tp / max(1.0, float(pred.sum() + (y > 0.5).sum()))


def train_findings(fc: FindingsConfig) -> Path:
    torch.set_num_threads(fc.threads)
    torch.manual_seed(fc.seed)
    rng = random.Random(fc.seed)
    out = Path(fc.out)
    out.mkdir(parents=True, exist_ok=True)
    studies = load_studies(fc.data, ["train"])
    if fc.max_train_studies:
        studies = studies[: fc.max_train_studies]
    tune_s = [s for s in studies if is_tune(s.study_id)]
    fit_s = [s for s in studies if not is_tune(s.study_id)]
    if not fit_s or not tune_s:
        raise SystemExit(f"{fc.data}: need train studies on both sides of the tune hold-out")
    log.info("findings classifier: fit %d studies, tune %d (val untouched)", len(fit_s), len(tune_s))
    px_fit, px_tune = _pixels(fit_s, fc.image_size, out), _pixels(tune_s, fc.image_size, out)
    v_fit = [[VIEWS.index(im.view) for im in s.images] for s in fit_s]
    v_tune = [[VIEWS.index(im.view) for im in s.images] for s in tune_s]
    y_fit = np.array([binary_vector(label(s.report), ABNORMAL_OBSERVATIONS) for s in fit_s], np.float32)
    y_tune = np.array([binary_vector(label(s.report), ABNORMAL_OBSERVATIONS) for s in tune_s], np.float32)
    sample = np.concatenate([p.reshape(-1)[::97] for p in px_fit]).astype(np.float32) / 255.0
    mean, std = round(float(sample.mean()), 4), round(max(float(sample.std()), 0.02), 4)
    pos = y_fit.sum(0)
    pos_weight = torch.from_numpy(np.clip(np.sqrt((len(y_fit) - pos) / np.maximum(pos, 1)), 1, 8)).float()

    model = FindingsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=fc.lr, weight_decay=fc.weight_decay)
    steps_per_epoch = math.ceil(len(fit_s) / fc.batch_size)
    total = fc.epochs * steps_per_epoch
    start_epoch, step, best = 0, 0, -1.0
    history: list[dict[str, Any]] = []
    last = out / "findings_last.pt"
    if last.exists():  # resume
        st = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start_epoch, step, best, history = st["epoch"], st["step"], st["best"], st["history"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        log.info("resumed from %s at epoch %d", last, start_epoch)
    command = f"cxrnode train-findings --data {fc.data} --out {fc.out} --epochs {fc.epochs} --seed {fc.seed}"
    for epoch in range(start_epoch, fc.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        order = list(range(len(fit_s)))
        rng.shuffle(order)
        batches = [order[i : i + fc.batch_size] for i in range(0, len(order), fc.batch_size)]
        bar = tqdm(batches, desc=f"findings epoch {epoch + 1}/{fc.epochs}", unit="batch", file=sys.stderr)
        for idx in bar:
            for g in opt.param_groups:  # one-cycle cosine with a short warm-up
                g["lr"] = fc.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            x = _batch(px_fit, v_fit, idx, 4, mean, std, rng)
            loss = F.binary_cross_entropy_with_logits(model(*x), torch.from_numpy(y_fit[idx]), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.set_postfix(bce=f"{np.mean(losses[-50:]):.3f}")
            if fc.max_steps and step >= fc.max_steps:
                break
        p = predict(model, px_tune, v_tune, mean, std)
        aucs = [auroc(y_tune[:, j], p[:, j]) for j in range(y_tune.shape[1])]
        thr = best_thresholds(y_tune, p)
        f1 = micro_f1(y_tune, p >= np.array(thr)[None, :])
        finite = [a for a in aucs if not math.isnan(a)]
        score = float(np.mean(finite)) if finite else 0.0  # a tiny tune set may have no positives
        rec = {"epoch": epoch + 1, "train_bce": float(np.mean(losses)), "tune_mean_auroc": score,
               "tune_micro_f1": f1, "seconds": round(time.perf_counter() - t0, 1)}
        history.append(rec)
        log.info("findings epoch %d: %s", epoch + 1, json.dumps(rec))
        state = {"model": model.state_dict(), "config": asdict(fc), "command": command, "mean": mean, "std": std,
                 "thresholds": thr, "tune_auroc": dict(zip(ABNORMAL_OBSERVATIONS, aucs, strict=True)),
                 "epoch": epoch + 1, "history": history}
        if score > best:
            best = score
            torch.save(state, out / "findings_best.pt")
        torch.save({**state, "opt": opt.state_dict(), "step": step, "best": best, "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state()}, last)
        if fc.max_steps and step >= fc.max_steps:
            break
    return out / "findings_best.pt"
