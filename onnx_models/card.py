"""Write a bundle's MODEL_CARD.md from measured results and refresh the manifest checksums.

    python -m onnx_models.card --bundle onnx_models/bundles/default \
        --eval runs/eval_val.json [--bench runs/bench.json]

The training facts (command, seed, epochs, validation AUROC per observation, thresholds) come
from the bundle's manifest (``training``), the metrics from the JSON that ``cxrnode eval
--json`` and ``benchmarks/inference.py`` print. No torch needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .bundle import MANIFEST, load_bundle, write_manifest

SYSTEM_NAMES = {
    "model": "this model",
    "nearest_train_report": "nearest training report (image embedding)",
    "most_common_train_report": "most common training report",
}
COLUMNS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
           "CE14_micro_F1", "CE14_macro_F1", "CE13_micro_P", "CE13_micro_R", "CE13_micro_F1", "CE13_macro_F1"]


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def metrics_table(ev: dict[str, Any]) -> str:
    lines = ["| system | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for key, m in ev["systems"].items():
        lines.append(f"| {SYSTEM_NAMES.get(key, key)} | " + " | ".join(_fmt(m.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def render(manifest: dict[str, Any], evals: list[dict[str, Any]], bench: dict[str, Any] | None) -> str:
    tr = manifest.get("training", {})
    obs = manifest["observations"]
    hist = tr.get("history", [])
    out = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "**Research use only. Not a medical device.** Drafts are unverified until a radiologist "
        "reviews, edits and signs them. Metrics on simulated images do not transfer to real patients.",
        "",
        "## Model",
        "Multi-view chest X-ray report drafter (`architecture: encoder-decoder`, see "
        "`onnx_models/README.md`): a shared CNN per view (128 px, 8x8 tokens) with learned "
        "view-position embeddings (PA, AP, LATERAL, LL, UNKNOWN), 1-4 views with a mask; a "
        "13-observation head trained jointly whose thresholded predictions become prompt tokens "
        "(observation + state) in the decoder memory, next to the image tokens and the clinical "
        "indication; a 3-layer transformer decoder with KV cache writes `findings [SEP] impression`. "
        "A separate 64 px frontal/lateral classifier ships in the bundle (DICOM ViewPosition tags "
        "are unreliable). ONNX graphs run with ONNX Runtime (CPU or CUDA).",
        "",
        "## Data",
        "Indiana University chest X-ray collection (Open-i; Demner-Fushman et al., JAMIA 2016): "
        "**real reports** (indication, findings, impression; CC BY-NC-ND 4.0) with **SIMULATED "
        "radiographs** rendered from a 3D thorax phantom that follows each report (not clinical "
        "images). R2Gen-style split: train 3,062 / val 382 studies; the test split (382) is hidden "
        "and was never used for training or tuning. Sites with the real images can train on the "
        "public Kaggle/Open-i layout (`indiana_reports.csv`, `indiana_projections.csv`, "
        "`images_normalized/`) with the same command; that layout has no split, so ~10 % of "
        "studies go to val by a stable hash of `uid`.",
        "",
        "## Training",
        f"Command: `{tr.get('command', 'cxrnode train --data ../shared/data/iu_xray --out runs/x')}` "
        f"(defaults: {tr.get('epochs', '?')} epochs, batch {tr.get('batch_size', '?')}, AdamW lr "
        f"{tr.get('lr', '?')} with warm-up and cosine decay, seed {tr.get('seed', '?')}, one torch "
        f"thread, ~35-45 min on 2 shared CPU cores). Best checkpoint by validation loss: epoch "
        f"{tr.get('epoch', '?')}. Labels for the observation head: `onnx_models.labels.label` on the "
        "reference report (uncertain = positive). Observation thresholds: "
        f"{tr.get('thresholds_from', 'val')}. Then `cxrnode export --checkpoint runs/x/best.pt "
        "--out onnx_models/bundles/default`.",
        "",
    ]
    if hist:
        out += ["| stage | epoch | train CE | train BCE | val CE | val BCE | val mean AUROC |",
                "|---|---|---|---|---|---|---|"]
        for h in hist:
            stage, ep = ("2 (head)", h["head_epoch"]) if "head_epoch" in h else ("1 (joint)", h["epoch"])
            out.append(f"| {stage} | {ep} | {_fmt(h.get('train_ce'))} | {_fmt(h.get('train_bce'))} | "
                       f"{_fmt(h.get('val_ce'))} | {_fmt(h.get('val_bce'))} | {_fmt(h.get('val_mean_auroc'))} |")
        hf = tr.get("head_finetune")
        if hf:
            out.append(f"\nStage 2 kept head epoch {hf['best_epoch']} (0 = stage 1 unchanged); val mean AUROC "
                       f"after stage 1: {_fmt(hf['stage1_val_mean_auroc'])}.")
        out.append("")
    out += ["## Observation head on val (AUROC, threshold)", "",
            "| observation | AUROC | threshold |", "|---|---|---|"]
    aucs = tr.get("val_auroc", {})
    for name, thr in zip(obs["names"], obs["thresholds"], strict=True):
        out.append(f"| {name} | {_fmt(aucs.get(name))} | {thr:.3f} |")
    out += ["", f"Mean AUROC (val): {_fmt(tr.get('val_mean_auroc'))}; frontal/lateral classifier "
            f"accuracy (val images): {_fmt(tr.get('val_view_accuracy'))}.", ""]
    for ev in evals:
        dec = ev["decoding"]
        out += [
            f"## Report metrics: split `{ev['split']}` ({ev['n_studies']} studies)",
            "",
            f"`cxrnode eval --bundle {manifest['name']} --data <dataset> --split {ev['split']} --json` "
            f"(beam {dec['beam_size']}, no-repeat n-gram {dec['no_repeat_ngram_size']}, max "
            f"{dec['max_tokens']} tokens; views from the bundle's view classifier). Text = findings + "
            "impression, lower-cased; NLG metrics from pycocoevalcap; clinical efficacy (CE) from "
            "`onnx_models.labels` on reference vs. generated text (U-ones); CE14 = 14 CheXpert "
            "observations, CE13 = without No Finding.",
            "",
            metrics_table(ev),
            "",
        ]
        if ev["split"] == "val":
            out.append("Val was used to choose the checkpoint, the observation thresholds and the "
                       "decoding settings, so val figures are optimistic; the hidden test split is the "
                       "honest estimate.")
            out.append("")
    if bench:
        out += ["## Speed", "",
                f"`python benchmarks/inference.py --bundle default --checkpoint runs/x/best.pt --data "
                f"../shared/data/iu_xray --threads {bench.get('threads')}` ({bench.get('studies')}):", "",
                f"- ORT greedy p50 {bench['ort']['greedy_p50_ms']:.0f} ms per 2-view study, beam-3 p50 "
                f"{bench['ort']['beam3_p50_ms']:.0f} ms; peak RSS {bench.get('peak_rss_mb_ort_only')} MB (ORT only)"]
        if "torch_eager" in bench:
            out += [f"- torch eager greedy p50 {bench['torch_eager']['greedy_p50_ms']:.0f} ms: ORT is "
                    f"{bench['speedup_ort_vs_torch_p50']}x faster; identical greedy outputs on "
                    f"{100 * bench['greedy_identical_fraction']:.0f} % of the studies"]
        out.append("")
    out += [
        "## Intended use and limitations",
        "- Research and engineering use only (licence of the reports: non-commercial, no derivatives).",
        "- Trained on simulated radiographs: it has never seen a real chest X-ray.",
        "- The text imitates IU X-ray reporting style, including its `XXXX` de-identification marks.",
        "- Small vocabulary (words seen >= 3 times in training reports); rare findings are under-reported.",
        "- Every draft must be checked and signed by a radiologist; the SR marks it UNVERIFIED until then.",
        "",
    ]
    if manifest.get("input_check"):
        out.append(gate_section(manifest["input_check"]))
    return "\n".join(out)


CARD_GATE_HEADING = "## Input gate"


def gate_section(section: dict[str, Any]) -> str:
    """The model card's ``## Input gate`` section, written from the manifest section."""
    share = section.get("val_rejected_share")
    measured = (f"{share:.1%} of the {section['val_views']} val views are rejected" if share is not None
                else "the share of val views rejected was not measured")
    return f"""{CARD_GATE_HEADING}

Before drafting, every view is scored against the training images (`input_check` in the manifest,
statistics in `{section['statistics']}`; method in `onnx_models/input_gate.py`): the Mahalanobis
distance of the encoder's view embedding (class-conditional means per view position, tied
covariance) plus the Mahalanobis distance of model-free appearance statistics (intensity
quantiles, gradient and fine-detail energy, an 8 x 8 layout thumbnail), each divided by its
median on a training hold-out. A view fails above {section['limit']:.4g}, the {section['quantile']:.1%}
quantile of that hold-out ({section['limit_from_views']} views; statistics fitted on
{section['fitted_on_views']} others); {measured}. Blank images fail without the model; a failing
view that passes once inverted or rotated is reported as such. When no view of a study passes,
the node withholds the draft and says why in the SR (`pipeline.input_check = "enforce"`).

What it means: this model has seen only simulated radiographs, so the gate rejects real
radiographs (all nine real chest films the project tests with are rejected), CT and MR images,
photographs and noise. It cannot tell a good draft from a bad one on images like the training
data; it only refuses images unlike them. Data: {"; ".join(f"{k}: {v}" for k, v in section.get("data", {}).items())}.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--eval", action="append", default=[], help="JSON from `cxrnode eval --json` (repeatable)")
    ap.add_argument("--bench", default="", help="JSON from benchmarks/inference.py")
    args = ap.parse_args(argv)
    b = load_bundle(args.bundle)
    evals = [json.loads(Path(p).read_text()) for p in args.eval]
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    (b.path / "MODEL_CARD.md").write_text(render(b.manifest, evals, bench), encoding="utf-8")
    manifest = json.loads((b.path / MANIFEST).read_text())
    write_manifest(b.path, manifest)
    load_bundle(b.path)
    print(f"model card written to {b.path / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
