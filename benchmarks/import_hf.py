"""Imported Hugging Face encoder-decoder: fp32 vs int8 on this CPU (``cxrnode import-hf --int8``).

Builds a random ``VisionEncoderDecoderModel`` of the CheXpert Plus / RRG24 baselines' shape
(Swin-v2-tiny encoder at 256 px + a 4-layer BERT decoder with cross-attention, hidden 512,
WordPiece vocabulary of 30,522: ~60 M parameters), imports it twice (fp32 and ``--int8``) and
measures, each variant in its own process (clean RSS): per-study latency of
``ReportGenerator.generate`` (greedy, a fixed number of new tokens so that both variants decode
the same length), decoder tokens/s, peak RSS; then greedy agreement int8 vs fp32 on
``--studies`` probe images, and transformers eager (torch) as the peer.

Random weights give flat next-token distributions (near-ties everywhere), which no trained
model has; with ``--peaked`` (default) the LM head's bias is drawn N(0, 2) so that, as in a
trained model, one word is usually clearly preferred. Both are reported when ``--both``.

    python benchmarks/import_hf.py --studies 20 --tokens 60 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "import_hf.json"


def build_checkpoint(out: Path, peaked: bool, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import (
        BertConfig,
        Swinv2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(30522 - len(specials)):
        vocab[f"w{i}" if i % 3 else f"##p{i}"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    enc = Swinv2Config(image_size=256, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                       window_size=8)
    dec = BertConfig(vocab_size=len(vocab), hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                     intermediate_size=2048, max_position_embeddings=256, is_decoder=True, add_cross_attention=True)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = cls, sep, pad
    model = VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():
        bias = model.decoder.cls.predictions.decoder.bias
        if peaked:
            bias.copy_(torch.randn_like(bias) * 2.0)
        bias[sep] = -30.0  # no early stop: both variants decode the same number of tokens
    model.generation_config.decoder_start_token_id = cls
    model.generation_config.eos_token_id = sep
    model.generation_config.pad_token_id = pad
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    ViTImageProcessor(size={"height": 256, "width": 256}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                      resample=3).save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: mit\n---\nRandom weights for benchmarking.\n", encoding="utf-8")
    return out


def _frontal_studies(data: str, split: str, n: int) -> list[tuple[Any, str]]:
    """(first frontal image, findings text) of the first ``n`` studies of ``split`` that have both."""
    from onnx_models.data import load_studies, read_image

    out = []
    for st in load_studies(data, [split]):
        im = next((i for i in st.images if i.projection == "Frontal"), None)
        if im is not None and st.findings.strip():
            out.append((read_image(im.path), st.findings.strip()))
        if len(out) == n:
            break
    return out


def build_trained_checkpoint(out: Path, data: str, studies: int, seconds: float, seed: int = 0,
                             max_steps: int = 0) -> dict[str, Any]:
    """The same ~60 M Swin-v2 + BERT model, its decoder briefly trained on IU X-ray reports so
    that its next-token distributions are peaked as a trained model's are (a random model's are
    near-uniform, where any perturbation flips greedy choices).

    A WordPiece vocabulary learnt from the train split's findings (padded with unreachable
    ``[unusedN]`` entries to BERT's 30,522, so the LM head keeps the baselines' size); the
    encoder stays random and frozen (its tokens of the first frontal image of each of
    ``studies`` train studies are computed once, through the runtime's own preprocessing);
    decoder and encoder-to-decoder projection trained with AdamW for ``seconds`` (or
    ``max_steps`` steps of 8 reports, whichever comes first). Not a
    useful report generator: a model with confident logits to measure quantisation on."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from onnx_models.data import load_studies
    from onnx_models.imaging import prepare
    from onnx_models.import_hf import NODE_MEAN, NODE_STD, hf_pixels

    build_checkpoint(out, peaked=False, seed=seed)
    from transformers import VisionEncoderDecoderModel

    texts = [s.findings.strip() for s in load_studies(data, ["train"]) if s.findings.strip()]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    learn = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    learn.normalizer = normalizers.BertNormalizer(lowercase=True)
    learn.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    learn.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials))
    vocab = dict(sorted(learn.get_vocab().items(), key=lambda kv: kv[1]))
    for i in range(30522 - len(vocab)):
        vocab[f"[unused{i}]"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.save(str(out / "tokenizer.json"))
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

    model = VisionEncoderDecoderModel.from_pretrained(str(out), local_files_only=True, attn_implementation="eager")
    head: Any = model.decoder.cls.predictions.decoder  # type: ignore[union-attr]
    with torch.no_grad():
        head.bias.zero_()  # build_checkpoint's EOS suppression off
    spec = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    pairs = _frontal_studies(data, "train", studies)
    torch.manual_seed(seed)
    feats = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            x = np.stack([prepare(im, 256, NODE_MEAN, NODE_STD)[None] for im, _ in pairs[i:i + 16]])
            feats.append(model.encoder(pixel_values=hf_pixels(x, spec)).last_hidden_state)
    memory = torch.cat(feats)
    seqs = [[cls] + tok.encode(t).ids[:46] + [sep] for _, t in pairs]
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    t0, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < seconds and not (max_steps and steps >= max_steps):
        idx = rng.choice(len(seqs), size=8, replace=False)
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((8, width), pad, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        labels = ids[:, 1:].clone()
        labels[labels == pad] = -100
        logits = model(encoder_outputs=(memory[idx],), decoder_input_ids=ids[:, :-1],
                       decoder_attention_mask=(ids[:, :-1] != pad).long()).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out)
    return {"train_studies": len(pairs), "steps": steps, "batch": 8, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first_10": round(float(np.mean(losses[:10])), 3), "loss_last_10": round(float(np.mean(losses[-10:])), 3),
            "vocabulary_learnt": len(learn.get_vocab())}


def _hwm_mb() -> float:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def rss_variant(bundle: str, tokens: int, threads: int) -> dict[str, Any]:
    """In a fresh process: load one bundle, draft two studies, report the peak RSS."""
    from onnx_models.import_hf import probe_images
    from onnx_models.runtime import ReportGenerator, StudyInput

    gen = ReportGenerator(bundle, threads=threads, beam_size=1)
    for im in probe_images(2, size=512):
        gen.generate([StudyInput(views=[(im, "PA")])], max_tokens=tokens)
    return {"peak_rss_mb": _hwm_mb()}


def _images(data: str, studies: int) -> list[Any]:
    """The probe images: the first frontal image of the first ``studies`` IU X-ray val studies
    with findings (``data``), else deterministic synthetic images."""
    from onnx_models.import_hf import probe_images

    return [im for im, _ in _frontal_studies(data, "val", studies)] if data else probe_images(studies, size=512)


def time_variants(bundles: dict[str, str], studies: int, tokens: int, threads: int, data: str = "") -> dict[str, Any]:
    """In one process, the variants interleaved study by study (the machine is shared: load
    changes during a run hit every variant alike): per-study latency (encoder + bridge +
    ``tokens`` greedy steps, the end token suppressed so that every variant decodes the same
    length), encoder time, decoder tokens/s; then, untimed, each variant's own greedy ids
    (stopping at its end token, at most ``tokens``) for the agreement figures."""
    import numpy as np

    from onnx_models.runtime import ReportGenerator, StudyInput

    gens = {k: ReportGenerator(b, threads=threads, beam_size=1) for k, b in bundles.items()}
    ims = _images(data, studies)
    for g in gens.values():
        g.generate([StudyInput(views=[(ims[0], "PA")])], max_tokens=4)
    stats: dict[str, dict[str, list[Any]]] = {k: {"study": [], "enc": [], "dec": [], "ids": []} for k in gens}
    for im in ims:
        st = [StudyInput(views=[(im, "PA")])]
        for k, g in gens.items():
            g.eos_penalty = 1e9  # fixed length for timing
            t = time.perf_counter()
            _, state = g._encode(st)
            t1 = time.perf_counter()
            g._greedy(state, tokens, 0)
            t2 = time.perf_counter()
            g.eos_penalty = 0.0
            [(seq, _)] = g._greedy(state, tokens, 0)
            stats[k]["study"].append(t2 - t)
            stats[k]["enc"].append(t1 - t)
            stats[k]["dec"].append(t2 - t1)
            stats[k]["ids"].append(seq)
    out = {}
    for k, v in stats.items():
        med = float(np.median(v["study"]))
        out[k] = {"per_study_ms_median": round(1000 * med, 1),
                  "per_study_ms_mean": round(1000 * float(np.mean(v["study"])), 1),
                  "encoder_bridge_ms_median": round(1000 * float(np.median(v["enc"])), 1),
                  "decoder_tokens_per_s": round(tokens / float(np.median(v["dec"])), 1),
                  "tokens_per_s": round(tokens / med, 1),
                  "graph_mb": round(sum((Path(bundles[k]) / f).stat().st_size
                                        for f in ("encoder.onnx", "bridge.onnx", "decoder.onnx")) / 2**20, 1),
                  "ids": v["ids"]}
    return out


def torch_peer(ckpt: Path, studies: int, tokens: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from onnx_models.imaging import prepare
    from onnx_models.import_hf import NODE_MEAN, NODE_STD, hf_pixels, load_model, probe_images

    torch.set_num_threads(threads)
    model = load_model(ckpt)
    spec = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    lat = []
    for im in probe_images(studies, size=512):
        x = prepare(im, 256, NODE_MEAN, NODE_STD)[None, None]
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(pixel_values=hf_pixels(x, spec), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, num_beams=1)
        lat.append(time.perf_counter() - t)
    return {"per_study_ms_median": round(1000 * float(np.median(lat)), 1),
            "peak_rss_mb": _hwm_mb(), "parameters": int(sum(p.numel() for p in model.parameters()))}


def _sub(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def divergence_margins(bundles: dict[str, str], ids: dict[str, list[list[int]]], studies: int,
                       threads: int, data: str = "") -> dict[str, Any]:
    """Where a variant's greedy text first leaves fp32's: fp32's log-probability margin there
    between its own choice and the variant's (small = a near-tie that any perturbation flips),
    and fp32's median top-1 vs top-2 margin over all steps, for scale. Then per step, teacher
    forced on fp32's text (no compounding): how often the variant picks fp32's token, overall
    and at the steps where fp32's top-1 vs top-2 margin is at least 0.02 and 0.1 nats."""
    bundle = bundles["fp32"]
    import numpy as np

    from onnx_models.runtime import ReportGenerator, StudyInput

    gen = ReportGenerator(bundle, threads=threads, beam_size=1)
    ims = _images(data, studies)
    ref = ids["fp32"]
    cache: dict[int, np.ndarray] = {}

    def forced(g: Any, i: int) -> np.ndarray:  # log-probabilities at every step of fp32's own text
        _, st = g._encode([StudyInput(views=[(ims[i], "PA")])])
        pk, pv = g._empty_past(st)
        seq = np.array([[g._bos] + ref[i]], dtype=np.int64)
        logits = g._sessions["decoder"].run(["logits"], {
            "input_ids": seq, "memory_mask": st.memory_mask, "cross_k": st.cross_k, "cross_v": st.cross_v,
            "past_k": pk, "past_v": pv})[0][0].astype(np.float64)
        logits[:, g._banned] = -np.inf
        return np.asarray(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))

    def logprobs(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = forced(gen, i)
        return cache[i]

    top2: list[float] = []
    for i in range(len(ref)):
        best = np.sort(logprobs(i)[:-1], axis=1)[:, -2:]
        top2 += (best[:, 1] - best[:, 0]).tolist()
    out: dict[str, Any] = {}
    for name, seqs in ids.items():
        if name == "fp32":
            continue
        gaps = []
        for i, (a, b) in enumerate(zip(ref, seqs, strict=True)):
            k = next((j for j, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), None)
            if k is not None:
                lp = logprobs(i)[k]
                gaps.append(float(lp[a[k]] - lp[b[k]]))
        other = ReportGenerator(bundles[name], threads=threads, beam_size=1)
        agree, margin = [], []
        for i in range(len(ref)):
            la, lb = logprobs(i)[:-1], forced(other, i)[:-1]
            best = np.sort(la, axis=1)[:, -2:]
            agree += (la.argmax(axis=1) == lb.argmax(axis=1)).tolist()
            margin += (best[:, 1] - best[:, 0]).tolist()
        ag, mg = np.array(agree), np.array(margin)
        steps = {"teacher_forced_step_agreement": round(float(ag.mean()), 4),
                 "step_agreement_where_fp32_margin_ge_0.02": round(float(ag[mg >= 0.02].mean()), 4),
                 "step_agreement_where_fp32_margin_ge_0.1": round(float(ag[mg >= 0.1].mean()), 4),
                 "steps": int(ag.size)}
        out[name] = {**steps, "fp32_margin_at_first_difference_median": round(float(np.median(gaps)), 3) if gaps else None,
                     "fp32_margin_at_first_difference_max": round(float(np.max(gaps)), 3) if gaps else None,
                     "fp32_top1_top2_margin_median_all_steps": round(float(np.median(top2)), 3),
                     "fp32_steps_with_margin_below_0.1": round(float(np.mean(np.array(top2) < 0.1)), 3)}
    return out


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    first = [next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
             for x, y in zip(a, b, strict=True)]
    return {"identical_greedy_text": same, "studies": len(a), "share": round(same / len(a), 3),
            "mean_tokens_before_first_difference": round(sum(first) / len(a), 1)}


#: int8 variants measured: name -> to_int8 options (``--int8`` writes the first)
VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {},
    "int8_lm_head_fp32": {"keep_lm_head": True},
    "int8_lm_head_and_cross_kv_fp32": {"keep_lm_head": True, "roles": ("encoder", "decoder")},
    "int8_text_side_only": {"roles": ("bridge", "decoder")},
    "int8_per_tensor": {"per_channel": False},
    "int8_uint8_weights": {"weight_type": "quint8"},
    "int8_reduce_range": {"reduce_range": True},
}


def measure(work: Path, mode: str, studies: int, tokens: int, threads: int, data: str = "",
            train_studies: int = 400, train_seconds: float = 240.0, variants: tuple[str, ...] = (),
            train_steps: int = 0) -> dict[str, Any]:
    from onnx_models.bundle import write_manifest
    from onnx_models.import_hf import import_hf
    from onnx_models.import_hf_speed import to_int8

    res: dict[str, Any] = {}
    if mode == "trained":
        res["training"] = build_trained_checkpoint(work / "ckpt", data, train_studies, train_seconds,
                                                   max_steps=train_steps)
        ckpt = work / "ckpt"
    else:
        ckpt = build_checkpoint(work / "ckpt", mode == "peaked")
    t = time.perf_counter()
    fp32 = import_hf(ckpt, work / "fp32", name="bench-fp32")
    res.update({"import_fp32_s": round(time.perf_counter() - t, 1),
                "fp32_checks_vs_transformers": json.loads((fp32 / "manifest.json").read_text())["import"]["checks"]})
    bundles = {"fp32": str(fp32)}
    for name in variants or tuple(VARIANTS):
        dst = work / name
        shutil.copytree(fp32, dst)
        m = json.loads((dst / "manifest.json").read_text())
        t = time.perf_counter()
        to_int8(dst, m, **VARIANTS[name])
        write_manifest(dst, m)
        res[f"quantise_{name}_s"] = round(time.perf_counter() - t, 1)
        bundles[name] = str(dst)
    common = ["--studies", str(studies), "--threads", str(threads), "--data", data if mode == "trained" else ""]
    timed = _sub(["--time-variants", json.dumps(bundles), "--tokens", str(tokens), *common])
    ids = {k: v.pop("ids") for k, v in timed.items()}
    res["fp32_greedy_tokens_mean"] = round(sum(map(len, ids["fp32"])) / len(ids["fp32"]), 1)
    margins = _sub(["--margins", json.dumps({"bundles": bundles, "ids": ids}), *common])
    for k in bundles:
        res[k] = {**timed[k], **_sub(["--rss-variant", bundles[k], "--tokens", str(tokens), "--threads", str(threads)])}
        if k != "fp32":
            res[k]["vs_fp32"] = {**_agreement(ids["fp32"], ids[k]), **margins.get(k, {}),
                                 "speedup_per_study": round(res["fp32"]["per_study_ms_median"]
                                                            / res[k]["per_study_ms_median"], 2)}
    res["torch_eager_peer"] = _sub(["--torch-peer", str(ckpt), "--studies", str(min(studies, 3)),
                                    "--tokens", str(tokens), "--threads", str(threads)])
    res["table"] = [{"variant": k, "per_study_ms": res[k]["per_study_ms_median"],
                     "speedup": res[k].get("vs_fp32", {}).get("speedup_per_study", 1.0),
                     "identical_greedy": res[k].get("vs_fp32", {}).get("share", 1.0),
                     "teacher_forced_step_agreement": res[k].get("vs_fp32", {}).get("teacher_forced_step_agreement", 1.0),
                     "graph_mb": res[k]["graph_mb"], "peak_rss_mb": res[k]["peak_rss_mb"]} for k in bundles]
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="trained",
                   help="comma-separated: trained (decoder trained briefly on --data), peaked (random, LM-head "
                        "bias N(0, 2)), flat (random)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "iu_xray"),
                   help="IU X-ray folder (training reports and the val probe images of the trained model)")
    p.add_argument("--train-studies", type=int, default=400)
    p.add_argument("--train-seconds", type=float, default=240.0, help="training time limit")
    p.add_argument("--train-steps", type=int, default=0, help="training step limit (0: none)")
    p.add_argument("--variants", default="", help=f"comma-separated subset of {', '.join(VARIANTS)} (default all)")
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--tokens", type=int, default=60,
                   help="new tokens per timed study (the end token suppressed); the agreement figures use "
                        "each variant's own greedy text, stopping at its end token, at most this long")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--time-variants", default="", help=argparse.SUPPRESS)
    p.add_argument("--rss-variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--margins", default="", help=argparse.SUPPRESS)
    p.add_argument("--torch-peer", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time_variants:
        print(json.dumps(time_variants(json.loads(args.time_variants), args.studies, args.tokens, args.threads,
                                       args.data)))
        return 0
    if args.margins:
        a = json.loads(args.margins)
        print(json.dumps(divergence_margins(a["bundles"], a["ids"], args.studies, args.threads, args.data)))
        return 0
    if args.rss_variant:
        print(json.dumps(rss_variant(args.rss_variant, args.tokens, args.threads)))
        return 0
    if args.torch_peer:
        print(json.dumps(torch_peer(Path(args.torch_peer), args.studies, args.tokens, args.threads)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_import_hf_"))
    variants = tuple(v for v in args.variants.split(",") if v)
    try:
        result: dict[str, Any] = {
            "command": "python benchmarks/import_hf.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": "VisionEncoderDecoderModel: Swin-v2-tiny 256 px (embed 96, depths 2-2-6-2) + BERT "
                     "decoder (4 layers, hidden 512, 8 heads, vocab 30522, cross-attention); trained: decoder "
                     "trained briefly on IU X-ray findings (encoder random, frozen), probes = IU X-ray val "
                     "frontal films; peaked/flat: random weights, synthetic probe images",
            "cpu": os.cpu_count(), "threads": args.threads, "studies": args.studies, "tokens": args.tokens}
        for mode in args.models.split(","):
            result[mode] = measure(work / mode, mode, args.studies, args.tokens, args.threads, args.data,
                                   args.train_studies, args.train_seconds, variants, args.train_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
