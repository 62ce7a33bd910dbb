"""Inference benchmark: the same bundle through ONNX Runtime and through torch eager, on the same
2-view studies, in one run. Prints JSON.

    python benchmarks/inference.py --bundle default --checkpoint runs/x/best.pt \
        --data ../shared/data/iu_xray --studies 20 --threads 1

- latency of one 2-view study (batch 1), greedy decoding: p50/p90 for ORT and torch eager
  (same preprocessing, same KV-cache decoding loop, same banned tokens, no n-gram block);
- ORT beam-3 p50 (the default decoding) for reference;
- the fraction of studies whose greedy token sequences are identical (ORT vs torch; the
  decoder's ids, before the runtime drops repeated sentences);
- peak RSS after the ORT part (torch not yet imported) and after the torch part;
- with ``--compare-io-binding``: greedy and beam-3 p50 with the decoder's I/O binding on and
  off (``ReportGenerator.io_binding``), interleaved study by study, and whether the texts agree.
The torch part needs ``--checkpoint`` (the checkpoint the bundle was exported from; with a
bundle that has a findings classifier also ``--findings``, its checkpoint) and the ``[train]``
extra; without it only ORT is measured. Not a timed test.

``--hf-random llava-0.5b`` measures an imported image-text-to-text model of realistic size
instead: it builds a random ``LlavaForConditionalGeneration`` from the config in
``HF_RANDOM`` (CLIP vision tower hidden 512 x 6 layers at 224 px / patch 16 = 196 image tokens
per view, Llama language model hidden 1024 x 24 layers, 16 heads / 4 key-value heads, MLP 4096,
vocabulary 32,000: ~0.45 B parameters, 1.8 GB in fp32), imports it with ``cxrnode import-hf``
(fp32, and ``--int8``; the graphs' weights in ONNX external data, ``<graph>.data``), then runs
each variant in its own process (clean peak RSS): per-study latency (2 views + indication,
greedy, ``--max-tokens`` new tokens: the random LM head never prefers the end token), the
first token's latency (encoder graph + prefill of the image and text tokens), decoding tokens/s
after the prefill and end to end, and greedy agreement int8 vs fp32. The load average before and after each variant is recorded
(the machine may be shared). Writes ``--out`` (JSON) as well as printing it.

    python benchmarks/inference.py --hf-random llava-0.5b --studies 4 --max-tokens 32 --threads 2 \
        --out benchmarks/results/inference_llava_0.5b.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_models.data import load_studies, read_image  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput  # noqa: E402


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def _studies(data: str | None, n: int) -> tuple[list[StudyInput], str]:
    if data:
        picked = [s for s in load_studies(data, ["val"]) if len(s.images) == 2][:n]
        out = [StudyInput(views=[(read_image(im.path), im.view) for im in s.images], indication=s.indication)
               for s in picked]
        return out, f"{data} val, first {len(out)} 2-view studies"
    rng = np.random.default_rng(0)
    out = [StudyInput(views=[(rng.random((256, 256), dtype=np.float32), "PA"),
                             (rng.random((256, 256), dtype=np.float32), "LATERAL")], indication="Cough.")
           for _ in range(n)]
    return out, f"{n} synthetic 2-view studies (random pixels)"


#: random image-text-to-text models of realistic size (--hf-random): transformers config kwargs
HF_RANDOM: dict[str, dict[str, Any]] = {
    "llava-0.5b": {
        "vision": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
                   "image_size": 224, "patch_size": 16, "projection_dim": 512},
        "text": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 2048},
    },
}


def build_random_llava(out: Path, config: dict[str, Any], seed: int = 0) -> int:
    """Save a random LlavaForConditionalGeneration checkpoint of ``config`` to ``out`` with a
    byte-level BPE tokenizer of the text model's vocabulary size (bytes, the specials and
    made-up words); returns the parameter count. The LM head's row of the end token is zeroed:
    every study decodes exactly ``max_tokens`` tokens, so the variants decode the same length."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    specials = ["<pad>", "<s>", "</s>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    n = int(config["text"]["vocab_size"])
    i = 0
    while len(vocab) < n:
        vocab.setdefault(f"\u0120w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    vision = CLIPVisionConfig(**config["vision"])
    text = LlamaConfig(**config["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    per_view = (int(config["vision"]["image_size"]) // int(config["vision"]["patch_size"])) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=3, image_seq_length=per_view)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[2] = 0.0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    size = int(config["vision"]["image_size"])
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: mit\n---\n# random LLaVA-shaped model (benchmark)\n", encoding="utf-8")
    return int(sum(p.numel() for p in model.parameters()))


def measure_greedy(gen: ReportGenerator, studies: list[StudyInput], max_tokens: int, warmup: int) -> dict[str, Any]:
    """Per study (batch 1): ``_encode`` (the encoder graph and the prompt's embedding) and greedy
    decoding of ``max_tokens`` tokens (its first step is the prefill of the whole prompt), timed
    apart; the first token (encode + prefill) timed in a separate run of one step, so the
    decoding rate after the prefill is ``(tokens - 1) / (decode - first step)``. The ids are
    kept for the agreement count."""
    for s in studies[:warmup]:
        gen._greedy(gen._encode([s])[1], max_tokens, 0)
    encode_ms, decode_ms, first_ms, tokens, ids = [], [], [], [], []
    for s in studies:
        t0 = time.perf_counter()
        _, state = gen._encode([s])
        t1 = time.perf_counter()
        prompt = int(getattr(state, "mask", np.zeros((1, 0))).shape[1])
        [(seq, _)] = gen._greedy(state, max_tokens, 0)
        t2 = time.perf_counter()
        gen._greedy(gen._encode([s])[1], 1, 0)
        first_ms.append((time.perf_counter() - t2) * 1000)
        encode_ms.append((t1 - t0) * 1000)
        decode_ms.append((t2 - t1) * 1000)
        tokens.append(len(seq))
        ids.append(seq)
    total = [a + b for a, b in zip(encode_ms, decode_ms, strict=True)]
    after = sum(d - (f - e) for d, f, e in zip(decode_ms, first_ms, encode_ms, strict=True))
    return {"study_p50_ms": round(_pct(total, 50), 1), "study_max_ms": round(max(total), 1),
            "encode_p50_ms": round(_pct(encode_ms, 50), 1), "first_token_p50_ms": round(_pct(first_ms, 50), 1),
            "prompt_tokens": prompt,
            "decode_tokens_per_s_after_prefill": round((sum(tokens) - len(tokens)) / (after / 1000), 2),
            "end_to_end_tokens_per_s": round(sum(tokens) / (sum(total) / 1000), 2),
            "mean_tokens": statistics.mean(tokens), "ids": ids}


def _hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss`` it is not inherited from the
    parent across fork + exec (a child of the importing process would report its peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _peak_rss_mb()


def _child(args: argparse.Namespace) -> int:
    """``--greedy-only``: one variant, in this process (its own peak RSS)."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    gen = ReportGenerator(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - t0
    rss_loaded = _hwm_mb()
    studies, source = _studies(args.data or None, args.studies)
    res = measure_greedy(gen, studies, args.max_tokens, args.warmup)
    res.update(bundle=str(gen.bundle.path), precision=gen.bundle.manifest["import"].get("precision", ""),
               studies=source, threads=args.threads, providers=gen.providers, session_load_s=round(load_s, 1),
               peak_rss_mb_after_load=round(rss_loaded, 1), peak_rss_mb=round(_hwm_mb(), 1),
               load_average_before=[round(x, 2) for x in load_before],
               load_average_after=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(res))
    return 0


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20, 1)


def run_hf_random(args: argparse.Namespace, argv: list[str]) -> int:
    """``--hf-random NAME``: build, import (fp32, int8), measure each variant in a child process."""
    from onnx_models.import_hf import import_hf

    config = HF_RANDOM[args.hf_random]
    work = Path(args.workdir or Path(tempfile.gettempdir()) / f"cxrnode-bench-{args.hf_random}")
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": args.hf_random, "config": config,
                              "command": "python benchmarks/inference.py " + " ".join(argv),
                              "cpus": os.cpu_count(), "threads": args.threads, "max_tokens": args.max_tokens,
                              "studies": args.studies, "warmup": args.warmup, "variants": {}}
    ck = work / "ckpt"
    facts = work / "build.json"  # build and import times of the checkpoint and bundles reused
    if facts.is_file():
        result.update(json.loads(facts.read_text(encoding="utf-8")))
    t0 = time.perf_counter()
    if not (ck / "config.json").is_file():
        result["parameters"] = build_random_llava(ck, config)
        result["build_s"] = round(time.perf_counter() - t0, 1)
    result["checkpoint_mb"] = _dir_mb(ck)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        bundle = work / v
        if not (bundle / "manifest.json").is_file():
            t0 = time.perf_counter()
            import_hf(ck, bundle, name=f"random-{args.hf_random}", version="0.0.0", int8=v == "int8",
                      fp16=v == "fp16", check=not args.no_check)
            result.setdefault("import_s", {})[v] = round(time.perf_counter() - t0, 1)
            result.setdefault("import_peak_rss_mb", {})[v] = round(_hwm_mb(), 1)
        m = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        result.setdefault("parameters", m["import"]["parameters"])
        result["variants"][v] = {"bundle_mb": _dir_mb(bundle), "checks": m["import"].get("checks"),
                                 "checks_int8": m["import"].get("checks_int8"),
                                 "external_data": {r: g.get("external_data") for r, g in m["graphs"].items()
                                                   if g.get("external_data")}}
    facts.write_text(json.dumps({k: result[k] for k in ("parameters", "build_s", "import_s", "import_peak_rss_mb")
                                 if k in result}), encoding="utf-8")
    ids: dict[str, list[list[int]]] = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--greedy-only", "--bundle", str(work / v), "--studies", str(args.studies),
               "--max-tokens", str(args.max_tokens), "--threads", str(args.threads), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        ids[v] = res.pop("ids")
        result["variants"][v].update(res)
    if "fp32" in ids:
        for v in (v for v in ids if v != "fp32"):
            same = sum(a == b for a, b in zip(ids["fp32"], ids[v], strict=True))
            result["variants"][v]["greedy_identical_to_fp32"] = f"{same}/{len(ids[v])}"
            result["variants"][v]["speedup_vs_fp32_study_p50"] = round(
                result["variants"]["fp32"]["study_p50_ms"] / result["variants"][v]["study_p50_ms"], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


def compare_io_binding(gen: ReportGenerator, studies: list[StudyInput]) -> dict:
    """p50 latency with ``gen.io_binding`` on and off, greedy and beam 3, each study run with
    both settings back to back (load changes hit both alike); texts compared."""
    times: dict[str, list[float]] = {"greedy_on": [], "greedy_off": [], "beam3_on": [], "beam3_off": []}
    same = 0
    for s in studies:
        texts = {}
        for beam, mode in ((1, "greedy"), (3, "beam3")):
            for on in (True, False):
                gen.io_binding = on
                t0 = time.perf_counter()
                r = gen.generate([s], beam_size=beam)[0]
                times[f"{mode}_{'on' if on else 'off'}"].append((time.perf_counter() - t0) * 1000)
                texts[(mode, on)] = (r.findings, r.impression)
        same += int(texts[("greedy", True)] == texts[("greedy", False)] and texts[("beam3", True)] == texts[("beam3", False)])
    gen.io_binding = True
    out: dict = {f"{k}_p50_ms": round(_pct(v, 50), 1) for k, v in times.items()}
    out["greedy_off_over_on"] = round(_pct(times["greedy_off"], 50) / _pct(times["greedy_on"], 50), 3)
    out["beam3_off_over_on"] = round(_pct(times["beam3_off"], 50) / _pct(times["beam3_on"], 50), 3)
    out["identical_texts"] = f"{same}/{len(studies)}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="default")
    ap.add_argument("--checkpoint", default="", help="torch checkpoint the bundle was exported from")
    ap.add_argument("--findings", default="", help="findings classifier checkpoint the bundle was exported with")
    ap.add_argument("--data", default="", help="dataset folder (uses its val split); synthetic if empty")
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for both ORT and torch (1 is fastest for this small model)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compare-io-binding", action="store_true",
                    help="also time the decoder with I/O binding on and off (same generator, interleaved)")
    ap.add_argument("--hf-random", choices=sorted(HF_RANDOM), default="",
                    help="build, import (fp32, int8) and measure a random Hugging Face model of this config")
    ap.add_argument("--variants", default="fp32,int8", help="--hf-random: the import variants (fp32, int8, fp16)")
    ap.add_argument("--workdir", default="", help="--hf-random: checkpoint and bundles (reused when present)")
    ap.add_argument("--max-tokens", type=int, default=32, help="--hf-random: new tokens per study (greedy)")
    ap.add_argument("--no-check", action="store_true", help="--hf-random: skip import-hf's parity check")
    ap.add_argument("--out", default="", help="--hf-random: also write the JSON here")
    ap.add_argument("--greedy-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.greedy_only:
        return _child(args)
    if args.hf_random:
        return run_hf_random(args, sys.argv[1:] if argv is None else argv)

    gen = ReportGenerator(args.bundle, threads=args.threads)
    studies, source = _studies(args.data or None, args.studies)
    for s in studies[: args.warmup]:
        gen.generate([s], beam_size=1)
    ort_greedy, ort_tokens, ort_ids = [], [], []
    for s in studies:
        t0 = time.perf_counter()
        r = gen.generate([s], beam_size=1, no_repeat_ngram_size=0, grounding=False)[0]  # the decoder alone, as torch
        ort_greedy.append((time.perf_counter() - t0) * 1000)
        # for the parity count: the decoder's own ids, before the runtime's text clean-up
        ort_ids.append(gen._greedy(gen._encode([s])[1], gen.max_tokens, 0)[0][0])
        ort_tokens.append([w for w, _ in r.tokens])
    ort_beam = []
    for s in studies:
        t0 = time.perf_counter()
        gen.generate([s])
        ort_beam.append((time.perf_counter() - t0) * 1000)
    rss_ort = _peak_rss_mb()
    result: dict = {
        "bundle": {"name": gen.name, "version": gen.version, "path": str(gen.bundle.path)},
        "studies": source, "threads": args.threads, "providers": gen.providers,
        "ort": {"greedy_p50_ms": _pct(ort_greedy, 50), "greedy_p90_ms": _pct(ort_greedy, 90),
                "beam3_p50_ms": _pct(ort_beam, 50), "mean_tokens": statistics.mean(len(t) for t in ort_tokens)},
        "peak_rss_mb_ort_only": round(rss_ort, 1),
    }
    if args.compare_io_binding:
        result["io_binding"] = compare_io_binding(gen, studies)
    if args.checkpoint:
        import torch

        from onnx_models.torch_model import load_checkpoint

        torch.set_num_threads(args.threads)
        _, model, _ = load_checkpoint(args.checkpoint)
        model.eval()
        thr = torch.from_numpy(gen.thresholds)
        clf_spec = gen.bundle.manifest["observations"].get("classifier")
        clf = None
        if clf_spec:
            if not args.findings:
                ap.error("this bundle has a findings classifier: pass its checkpoint with --findings")
            from onnx_models.torch_model import FindingsClassifier

            clf = FindingsClassifier()
            clf.load_state_dict(torch.load(args.findings, map_location="cpu", weights_only=False)["model"])
            clf.eval()

        def torch_generate(s: StudyInput) -> list[int]:
            images, view_ids, view_mask = gen._pixels([s])
            ids = gen._indication_ids(s.indication)
            hook = None
            if clf is not None:
                norm = clf_spec["normalisation"]
                big = gen._pixels([s], clf_spec["image_size"], norm["mean"], norm["std"])[0]
                clf_probs = torch.sigmoid(clf(torch.from_numpy(big), torch.from_numpy(view_ids),
                                              torch.from_numpy(view_mask)))

                def hook(p: torch.Tensor) -> torch.Tensor:
                    return clf_probs if clf_spec.get("combine", "replace") == "replace" else (p + clf_probs) / 2

            out = model.greedy(torch.from_numpy(images), torch.from_numpy(view_ids), torch.from_numpy(view_mask),
                               thr, torch.tensor([ids]), torch.ones(1, len(ids)), gen._bos, gen._eos,
                               gen.max_tokens, banned=tuple(gen._banned), sep=gen._sep, probs_hook=hook,
                               eos_penalty=gen.eos_penalty)[0]
            return out

        with torch.inference_mode():
            for s in studies[: args.warmup]:
                torch_generate(s)
            torch_ms, same = [], 0
            for s, o in zip(studies, ort_ids, strict=True):
                t0 = time.perf_counter()
                ids = torch_generate(s)
                torch_ms.append((time.perf_counter() - t0) * 1000)
                same += int(ids == o)
        result["torch_eager"] = {"greedy_p50_ms": _pct(torch_ms, 50), "greedy_p90_ms": _pct(torch_ms, 90)}
        result["speedup_ort_vs_torch_p50"] = round(_pct(torch_ms, 50) / _pct(ort_greedy, 50), 2)
        result["greedy_identical_fraction"] = same / len(studies)
        result["peak_rss_mb_after_torch"] = round(_peak_rss_mb(), 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
