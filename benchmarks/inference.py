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
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

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
    args = ap.parse_args(argv)

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
