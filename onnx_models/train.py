"""Train the reference report model on a dataset folder (either layout, see ``data.py``).

``cxrnode train --data ../shared/data/iu_xray --out runs/x`` : deterministic for a seed
(single-process data pipeline, seeded generators), tqdm progress, a checkpoint after every
epoch (``last.pt``, with optimiser and RNG state: re-running the same command resumes) and the
best one by validation loss (``best.pt``). After the last epoch the observation thresholds are
chosen on the validation split (F1-optimal per observation) and the head's per-observation
AUROC on validation is stored in the checkpoint for the model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import VIEWS, Study, load_studies, read_image
from .imaging import resize
from .labels import ABNORMAL_OBSERVATIONS, binary_vector, label
from .tokenizer import build_tokenizer
from .torch_model import ModelConfig, ReportModel, ViewClassifier, load_checkpoint

log = logging.getLogger(__name__)
UNKNOWN = VIEWS.index("UNKNOWN")


@dataclass
class TrainConfig:
    data: str
    out: str
    epochs: int = 8
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 300
    seed: int = 13
    threads: int = 1
    max_train_studies: int = 0  # 0 = all (tests use a tiny subset)
    max_val_studies: int = 0
    max_steps: int = 0  # 0 = no limit (tests stop after 1-2 steps)
    head_weight: float = 1.0
    head_epochs: int = 4  # stage 2: encoder + observation head only (BCE), decoder frozen
    init_from: str = ""  # start from this checkpoint's weights (missing parameters stay new)
    freeze_image: bool = False  # train only the text side (bridge + decoder); image side frozen
    view_dropout: float = 0.1
    indication_dropout: float = 0.1
    prompt_noise: float = 0.01
    label_smoothing: float = 0.1


# --- data -----------------------------------------------------------------------------------
@dataclass
class Encoded:
    images: list[np.ndarray]  # per study: (n_views, S, S) float16 in [0, 1]
    small: list[np.ndarray]  # per study: (n_views, s, s) for the view classifier
    views: list[list[int]]
    lateral: list[list[int]]  # -1 unknown projection
    indications: list[list[int]]
    reports: list[list[int]]
    labels: np.ndarray  # (N, 13)
    none_id: int  # the tokenizer's [NONE]: the indication of a study without one (and indication dropout)

    def pos_weight(self) -> torch.Tensor:
        """Positive-class weights of the observation loss: sqrt(negatives / positives) per
        observation, clipped to [1, 5] (computed on the training split, used for every split)."""
        pos = self.labels.sum(0)
        return torch.from_numpy(np.clip(np.sqrt((len(self.labels) - pos) / np.maximum(pos, 1)), 1, 5)).float()


def _study_seq(tok: Any, s: Study, cfg: ModelConfig) -> list[int]:
    bos, eos, sep = (tok.token_to_id(t) for t in ("[BOS]", "[EOS]", "[SEP]"))
    f = tok.encode(s.findings).ids if s.findings.strip() else []
    i = tok.encode(s.impression).ids if s.impression.strip() else []
    seq = [bos] + f + [sep] + i
    return seq[: cfg.max_report_tokens + 1] + [eos]


def encode_studies(studies: list[Study], tok: Any, cfg: ModelConfig, cache: Path | None) -> Encoded:
    key = hashlib.sha256(
        json.dumps([[str(im.path) for im in s.images] for s in studies]).encode()
        + f"{cfg.image_size}/{cfg.view_image_size}".encode()
    ).hexdigest()[:16]
    cached = cache / f"pixels-{key}.npz" if cache else None
    if cached is not None and cached.exists():
        z = np.load(cached, allow_pickle=True)
        images, small = list(z["images"]), list(z["small"])
    else:
        images, small = [], []
        for s in tqdm(studies, desc="images", unit="study", file=sys.stderr):
            px = [read_image(im.path) for im in s.images]
            images.append(np.stack([resize(p, cfg.image_size) for p in px]).clip(0, 1).astype(np.float16))
            small.append(np.stack([resize(p, cfg.view_image_size) for p in px]).clip(0, 1).astype(np.float16))
        if cached is not None:
            arr_i = np.empty(len(images), dtype=object)
            arr_s = np.empty(len(small), dtype=object)
            arr_i[:] = images
            arr_s[:] = small
            np.savez(cached, images=arr_i, small=arr_s)
    none = tok.token_to_id("[NONE]")
    inds = []
    for s in studies:
        ids = tok.encode(s.indication).ids[: cfg.max_indication_tokens] if s.indication.strip() else []
        inds.append(ids or [none])
    return Encoded(
        images=images,
        small=small,
        views=[[VIEWS.index(im.view) for im in s.images] for s in studies],
        lateral=[[{"frontal": 0, "lateral": 1}.get(im.projection.lower(), -1) for im in s.images] for s in studies],
        indications=inds,
        reports=[_study_seq(tok, s, cfg) for s in studies],
        labels=np.array([binary_vector(label(s.report), ABNORMAL_OBSERVATIONS) for s in studies], dtype=np.float32),
        none_id=int(none or 0),
    )


def make_batch(enc: Encoded, idx: list[int], cfg: ModelConfig, tc: TrainConfig, mean: float, std: float,
               rng: random.Random | None) -> dict[str, torch.Tensor]:
    """Collate studies; with ``rng`` apply augmentation and view/indication/prompt dropout."""
    sel_views = []
    for i in idx:
        order = list(range(len(enc.views[i])))
        if rng is not None:
            rng.shuffle(order)
            if len(order) > 1 and rng.random() < 0.15:
                order = order[:-1]
        sel_views.append(order[: cfg.max_views])
    b, v, s = len(idx), max(len(o) for o in sel_views), cfg.image_size
    images = torch.zeros(b, v, 1, s, s)
    view_ids = torch.full((b, v), UNKNOWN, dtype=torch.long)
    view_mask = torch.zeros(b, v)
    small, lat = [], []
    for bi, (i, order) in enumerate(zip(idx, sel_views, strict=True)):
        for vj, k in enumerate(order):
            img = torch.from_numpy(enc.images[i][k].astype(np.float32))
            if rng is not None:
                img = augment(img, rng)
            images[bi, vj, 0] = (img - mean) / std
            view_ids[bi, vj] = UNKNOWN if (rng is not None and rng.random() < tc.view_dropout) else enc.views[i][k]
            view_mask[bi, vj] = 1.0
            if enc.lateral[i][k] >= 0:
                sm = torch.from_numpy(enc.small[i][k].astype(np.float32))
                if rng is not None:
                    sm = augment(sm, rng, shift=3)
                small.append((sm - mean) / std)
                lat.append(enc.lateral[i][k])
    li = max(len(enc.indications[i]) for i in idx)
    ind = torch.zeros(b, li, dtype=torch.long)
    ind_mask = torch.zeros(b, li)
    for bi, i in enumerate(idx):
        ids = enc.indications[i]
        if rng is not None and rng.random() < tc.indication_dropout:
            ids = [enc.none_id]
        ind[bi, : len(ids)] = torch.tensor(ids)
        ind_mask[bi, : len(ids)] = 1.0
    lr = max(len(enc.reports[i]) for i in idx)
    rep = torch.zeros(b, lr, dtype=torch.long)
    for bi, i in enumerate(idx):
        rep[bi, : len(enc.reports[i])] = torch.tensor(enc.reports[i])
    labels = torch.from_numpy(enc.labels[idx])
    states = labels.clone()
    if rng is not None and tc.prompt_noise > 0:
        flip = torch.tensor([[rng.random() < tc.prompt_noise for _ in range(labels.shape[1])] for _ in idx])
        states = torch.where(flip, 1.0 - states, states)
    return {
        "images": images, "view_ids": view_ids, "view_mask": view_mask,
        "ind": ind, "ind_mask": ind_mask, "report": rep, "labels": labels,
        "states": states.long(),
        "small": torch.stack(small).unsqueeze(1) if small else torch.zeros(0, 1, cfg.view_image_size, cfg.view_image_size),
        "lateral": torch.tensor(lat, dtype=torch.long),
    }


def augment(img: torch.Tensor, rng: random.Random, shift: int = 6) -> torch.Tensor:
    """Small translation (no flips: laterality matters) and a contrast/gamma jitter."""
    dy, dx = rng.randint(-shift, shift), rng.randint(-shift, shift)
    img = torch.roll(img, shifts=(dy, dx), dims=(0, 1))
    if dy > 0:
        img[:dy] = 0
    elif dy < 0:
        img[dy:] = 0
    if dx > 0:
        img[:, :dx] = 0
    elif dx < 0:
        img[:, dx:] = 0
    gamma = math.exp(rng.uniform(-0.2, 0.2))
    return img.clamp(0, 1).pow(gamma) * rng.uniform(0.9, 1.1)


def bucket_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar report length (less padding, same epoch content)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _image_side(model: ReportModel) -> list[torch.nn.Module]:
    return [model.encoder, model.view_emb, model.enc_ln, model.head]


def _train_mode(model: ReportModel, view_clf: ViewClassifier, tc: TrainConfig) -> None:
    """Training mode, except frozen modules stay in eval mode (BatchNorm statistics fixed)."""
    model.train()
    view_clf.train()
    if tc.freeze_image:
        for m in _image_side(model) + [view_clf]:
            m.eval()


# --- metrics --------------------------------------------------------------------------------
def auroc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    allp = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    r = np.arange(1, len(order) + 1, dtype=np.float64)
    while i < len(allp):
        j = i
        while j + 1 < len(allp) and allp[j + 1] == allp[i]:
            j += 1
        r[i : j + 1] = (i + j + 2) / 2.0
        i = j + 1
    ranks[order] = r
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def best_thresholds(y: np.ndarray, p: np.ndarray) -> list[float]:
    out = []
    for j in range(y.shape[1]):
        best, best_t = -1.0, 0.5
        for t in np.arange(0.05, 0.96, 0.025):
            pred = p[:, j] >= t
            tp = float((pred & (y[:, j] > 0.5)).sum())
            f1 = 2 * tp / max(1.0, pred.sum() + (y[:, j] > 0.5).sum())
            if f1 > best + 1e-9:
                best, best_t = f1, float(t)
        out.append(round(best_t, 3))
    return out


# --- loop -----------------------------------------------------------------------------------
def _lr(step: int, total: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _losses(model: ReportModel, batch: dict[str, torch.Tensor], tc: TrainConfig,
            pos_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rep = batch["report"]
    logits, obs_logits = model(batch["images"], batch["view_ids"], batch["view_mask"], batch["states"],
                               batch["ind"], batch["ind_mask"], rep[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rep[:, 1:].reshape(-1), ignore_index=0,
                         label_smoothing=tc.label_smoothing)
    bce = F.binary_cross_entropy_with_logits(obs_logits, batch["labels"], pos_weight=pos_weight)
    return ce, bce


@torch.no_grad()
def evaluate_split(model: ReportModel, view_clf: ViewClassifier, enc: Encoded, cfg: ModelConfig,
                   tc: TrainConfig, mean: float, std: float, pos_weight: torch.Tensor) -> dict[str, Any]:
    model.eval()
    view_clf.eval()
    n = len(enc.reports)
    ces, bces, probs, correct, total = [], [], [], 0, 0
    for start in range(0, n, 32):
        idx = list(range(start, min(n, start + 32)))
        batch = make_batch(enc, idx, cfg, tc, mean, std, None)
        tc0 = TrainConfig(**{**tc.__dict__, "label_smoothing": 0.0})
        ce, bce = _losses(model, batch, tc0, pos_weight)
        ces.append(float(ce) * len(idx))
        bces.append(float(bce) * len(idx))
        _, obs = model.encode_images(batch["images"], batch["view_ids"], batch["view_mask"])
        probs.append(torch.sigmoid(obs).numpy())
        if len(batch["lateral"]):
            pred = view_clf(batch["small"]).argmax(-1)
            correct += int((pred == batch["lateral"]).sum())
            total += len(batch["lateral"])
    p = np.concatenate(probs)
    aucs = {o: auroc(enc.labels[:, j], p[:, j]) for j, o in enumerate(ABNORMAL_OBSERVATIONS)}
    valid = [a for a in aucs.values() if not math.isnan(a)]
    _train_mode(model, view_clf, tc)
    return {
        "ce": sum(ces) / n, "bce": sum(bces) / n, "probs": p,
        "auroc": aucs, "mean_auroc": float(np.mean(valid)) if valid else float("nan"),
        "view_accuracy": correct / max(1, total),
    }


def _prepare_data(tc: TrainConfig, out: Path) -> tuple[Any, ModelConfig, Encoded, Encoded, float, float]:
    """The tokenizer (trained on the training split), the model config, both splits encoded and
    the pixel mean/std of the training images."""
    train_s = load_studies(tc.data, ["train"])
    val_s = load_studies(tc.data, ["val"])
    if tc.max_train_studies:
        train_s = train_s[: tc.max_train_studies]
    if tc.max_val_studies:
        val_s = val_s[: tc.max_val_studies]
    if not train_s or not val_s:
        raise SystemExit(f"{tc.data}: need studies in both the train and the val split")
    tok = build_tokenizer([s.report for s in train_s] + [s.indication for s in train_s])
    cfg = ModelConfig(vocab_size=tok.get_vocab_size())
    log.info("train %d studies, val %d, vocab %d", len(train_s), len(val_s), cfg.vocab_size)
    tr = encode_studies(train_s, tok, cfg, out)
    va = encode_studies(val_s, tok, cfg, out)
    allpx = np.concatenate([im.reshape(-1)[::97] for im in tr.images]).astype(np.float32)
    mean, std = round(float(allpx.mean()), 4), round(float(allpx.std()), 4)
    if not std > 0.02:  # (nearly) constant pixels, e.g. a tiny test set: keep a sane scale
        std = 0.25
    return tok, cfg, tr, va, mean, std


def _build_model(tc: TrainConfig, cfg: ModelConfig, tok: Any) -> tuple[ReportModel, ViewClassifier, Any]:
    """The model and view classifier (optionally initialised from ``tc.init_from``, the image side
    frozen with ``tc.freeze_image``) and their AdamW optimizer (no decay on norms, biases and
    embeddings)."""
    model = ReportModel(cfg)
    view_clf = ViewClassifier()
    if tc.init_from:
        init = torch.load(tc.init_from, map_location="cpu", weights_only=False)
        if init["tokenizer"] != tok.to_str():
            raise SystemExit(f"{tc.init_from}: trained with another tokenizer (other data?)")
        missing, unexpected = model.load_state_dict(init["model"], strict=False)
        view_clf.load_state_dict(init["view_classifier"])
        log.info("initialised from %s (new parameters: %s)", tc.init_from, missing)
    if tc.freeze_image:
        for m in _image_side(model) + [view_clf]:
            for p_ in m.parameters():
                p_.requires_grad_(False)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    named = list(model.named_parameters()) + [("vc." + k, v) for k, v in view_clf.named_parameters()]
    for n_, p_ in [(n, p) for n, p in named if p.requires_grad]:
        (no_decay if p_.ndim < 2 or "emb" in n_ or "pos" in n_ else decay).append(p_)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    return model, view_clf, opt


def _resume(last: Path, tok: Any, cfg: ModelConfig, model: ReportModel, view_clf: ViewClassifier,
            opt: Any) -> tuple[int, int, float, list[dict[str, Any]]]:
    """(first epoch, step, best score, history): from ``last.pt`` when it belongs to this
    data and config, else a fresh start."""
    if not last.exists():
        return 0, 0, float("inf"), []
    ck = torch.load(last, map_location="cpu", weights_only=False)
    if ck.get("tokenizer") != tok.to_str() or ck["config"] != cfg.to_dict():
        log.warning("%s does not match this data/config; starting afresh", last)
        return 0, 0, float("inf"), []
    model.load_state_dict(ck["model"])
    view_clf.load_state_dict(ck["view_classifier"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["torch_rng"])
    log.info("resuming from %s at epoch %d", last, ck["epoch"])
    return ck["epoch"], ck["step"], ck["best"], ck.get("history", [])


def _train_epoch(model: ReportModel, view_clf: ViewClassifier, opt: Any, tr: Encoded, cfg: ModelConfig,
                 tc: TrainConfig, mean: float, std: float, pos_weight: torch.Tensor, epoch: int, step: int,
                 total: int) -> tuple[int, float, float]:
    """One stage-1 epoch (report cross-entropy + weighted observation BCE + view classifier);
    returns (step after it, mean train CE, mean train BCE). Stops early at ``tc.max_steps``."""
    rng = random.Random(tc.seed * 1000 + epoch)
    batches = bucket_batches([len(r) for r in tr.reports], tc.batch_size, rng)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", file=sys.stderr, mininterval=5)
    run_ce = run_bce = 0.0
    nb = 0
    for idx in bar:
        batch = make_batch(tr, idx, cfg, tc, mean, std, rng)
        for g in opt.param_groups:
            g["lr"] = _lr(step, total, tc)
        ce, bce = _losses(model, batch, tc, pos_weight)
        loss = ce + tc.head_weight * bce
        if len(batch["lateral"]) and not tc.freeze_image:
            loss = loss + 0.2 * F.cross_entropy(view_clf(batch["small"]), batch["lateral"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p_ for g in opt.param_groups for p_ in g["params"]], 1.0)
        opt.step()
        step += 1
        nb += 1
        run_ce += ce.item()
        run_bce += bce.item()
        bar.set_postfix(ce=f"{run_ce / nb:.3f}", bce=f"{run_bce / nb:.3f}")
        if tc.max_steps and step >= tc.max_steps:
            break
    bar.close()
    return step, run_ce / max(1, nb), run_bce / max(1, nb)


def train(tc: TrainConfig) -> Path:
    """Train the report model (stage 1: report + observations + view classifier, the epoch with
    the best validation loss kept; stage 2: :func:`finetune_head`) into ``tc.out``; resumes from
    ``last.pt`` there. Returns the path of ``best.pt``.

    Raises
    ------
    SystemExit
        A split without studies, an ``init_from`` checkpoint of another tokenizer.
    """
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    out = Path(tc.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, cfg, tr, va, mean, std = _prepare_data(tc, out)
    pos_weight = tr.pos_weight()
    model, view_clf, opt = _build_model(tc, cfg, tok)
    total = math.ceil(len(tr.reports) / tc.batch_size) * tc.epochs
    last = out / "last.pt"
    start_epoch, step, best, history = _resume(last, tok, cfg, model, view_clf, opt)
    command = "cxrnode train " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in tc.__dict__.items() if k in ("data", "out")
    )
    _train_mode(model, view_clf, tc)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.time()
        step, train_ce, train_bce = _train_epoch(model, view_clf, opt, tr, cfg, tc, mean, std, pos_weight, epoch,
                                                 step, total)
        ev = evaluate_split(model, view_clf, va, cfg, tc, mean, std, pos_weight)
        score = ev["ce"] + ev["bce"]
        if math.isnan(score):
            score = float("inf")
        rec = {"epoch": epoch + 1, "train_ce": train_ce, "train_bce": train_bce,
               "val_ce": ev["ce"], "val_bce": ev["bce"], "val_mean_auroc": ev["mean_auroc"],
               "val_view_accuracy": ev["view_accuracy"], "seconds": round(time.time() - t0, 1)}
        history.append(rec)
        log.info("epoch %d: %s", epoch + 1, json.dumps(rec))
        print(json.dumps(rec), file=sys.stderr, flush=True)
        state = {
            "config": cfg.to_dict(), "model": model.state_dict(), "view_classifier": view_clf.state_dict(),
            "tokenizer": tok.to_str(), "pixel_mean": mean, "pixel_std": std,
        }
        if score < best or not (out / "best_stage1.pt").exists():
            best = score
            _finish(state, ev, va, epoch + 1, tc, command, history, out / "best_stage1.pt")
        torch.save({**state, "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step, "best": best,
                    "history": history, "torch_rng": torch.get_rng_state()}, out / "last.pt.tmp")
        (out / "last.pt.tmp").replace(last)
        if tc.max_steps and step >= tc.max_steps:
            break
    if not (out / "best_stage1.pt").exists() and (out / "best.pt").exists():
        (out / "best.pt").replace(out / "best_stage1.pt")  # run folder of an older version
    if not (out / "best_stage1.pt").exists():  # pragma: no cover - only when no epoch ran
        raise SystemExit("no epoch completed")
    if tc.head_epochs > 0:
        finetune_head(tc, tr, va, out, mean, std)
    else:
        shutil.copyfile(out / "best_stage1.pt", out / "best.pt")
    return out / "best.pt"


def finetune_head(tc: TrainConfig, tr: Encoded, va: Encoded, out: Path, mean: float, std: float) -> None:
    """Stage 2: sharpen the observation head. The report decoder (trained with the reference
    labels as prompts) stays frozen; the image encoder, the view embedding and the head are
    trained on the BCE loss alone for ``head_epochs`` epochs; the epoch with the best validation
    mean AUROC is kept (stage 1 stays in ``best_stage1.pt``)."""
    stage1 = out / "best_stage1.pt"
    pos_weight = tr.pos_weight()
    ck, model, view_clf = load_checkpoint(stage1)
    cfg = model.cfg
    torch.manual_seed(tc.seed + 1)
    trainable = [model.encoder, model.view_emb, model.enc_ln, model.head]
    for p_ in model.parameters():
        p_.requires_grad_(False)
    params = [p_ for m in trainable for p_ in m.parameters()]
    for p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(len(tr.reports) / tc.batch_size)
    total = steps_per_epoch * tc.head_epochs
    ev0 = evaluate_split(model, view_clf, va, cfg, tc, mean, std, pos_weight)
    best_auc, best_state, best_ev, best_epoch = ev0["mean_auroc"], None, ev0, 0
    log.info("stage 2 start: val mean AUROC %.4f", best_auc)
    history = list(ck["training"].get("history", []))
    step = 0
    for epoch in range(tc.head_epochs):
        model.train()
        rng = random.Random(tc.seed * 7919 + epoch)
        order = list(range(len(tr.reports)))
        rng.shuffle(order)
        batches = [order[i : i + tc.batch_size] for i in range(0, len(order), tc.batch_size)]
        bar = tqdm(batches, desc=f"head {epoch + 1}/{tc.head_epochs}", unit="batch", file=sys.stderr, mininterval=5)
        run = 0.0
        for n, idx in enumerate(bar, 1):
            batch = make_batch(tr, idx, cfg, tc, mean, std, rng)
            for g in opt.param_groups:
                g["lr"] = tc.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            _, obs = model.encode_images(batch["images"], batch["view_ids"], batch["view_mask"])
            loss = F.binary_cross_entropy_with_logits(obs, batch["labels"], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            run += loss.item()
            bar.set_postfix(bce=f"{run / n:.3f}")
            if tc.max_steps and n >= tc.max_steps:
                break
        bar.close()
        ev = evaluate_split(model, view_clf, va, cfg, tc, mean, std, pos_weight)
        rec = {"head_epoch": epoch + 1, "train_bce": run / max(1, n), "val_ce": ev["ce"], "val_bce": ev["bce"],
               "val_mean_auroc": ev["mean_auroc"]}
        history.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        if ev["mean_auroc"] > best_auc:
            best_auc, best_ev, best_epoch = ev["mean_auroc"], ev, epoch + 1
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    state = {k: ck[k] for k in ("config", "view_classifier", "tokenizer", "pixel_mean", "pixel_std")}
    state["model"] = model.state_dict()
    tr_info = ck["training"]
    command = tr_info["command"]
    _finish(state, best_ev, va, tr_info["epoch"], tc, command, history, out / "best.pt")
    final = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    final["training"]["head_finetune"] = {"epochs": tc.head_epochs, "best_epoch": best_epoch,
                                          "stage1_val_mean_auroc": round(ev0["mean_auroc"], 4)}
    torch.save(final, out / "best.pt")


def _finish(state: dict[str, Any], ev: dict[str, Any], va: Encoded, epoch: int, tc: TrainConfig,
            command: str, history: list[dict[str, Any]], path: Path) -> None:
    thresholds = best_thresholds(va.labels, ev["probs"])
    ck = {**state, "thresholds": thresholds, "training": {
        "command": command, "seed": tc.seed, "epoch": epoch, "epochs": tc.epochs,
        "batch_size": tc.batch_size, "lr": tc.lr,
        "val_auroc": {k: (None if math.isnan(v) else round(v, 4)) for k, v in ev["auroc"].items()},
        "val_mean_auroc": round(ev["mean_auroc"], 4), "val_view_accuracy": round(ev["view_accuracy"], 4),
        "thresholds_from": "val (F1-optimal per observation)", "history": list(history),
    }}
    torch.save(ck, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
