"""Does the node deliver what ``cxrnode eval`` measures? Both paths on the same val studies.

    python benchmarks/node_vs_eval.py [--limit N] [--scales 4,5,6,7,8] [--profile 40]
                                      [--out benchmarks/results/node_vs_eval.json]

1. **eval**: ``onnx_models.evaluate.evaluate(..., predictions=...)`` on the split (the JPEG files,
   one ONNX Runtime thread as the node runs).
2. **node**: the real node (Storage SCP, promoter, one worker with the model, SQLite) on loopback;
   every study is sent with C-STORE as CR files built from the eval pixels
   (``tests/support/iu_dicom.py``, ``cr12``): upsampled by pixel replication (factor cycling
   through ``--scales``: 1,024-2,048 px for the 256 px images), MONOCHROME1, 12 bits stored, a
   LINEAR window that maps back to the eval pixels, headers modelled on the collection's real
   CR headers, the ViewPosition tags ``studies.jsonl`` has (lying and empty ones included), the
   indication in the request attributes. The draft SRs are read back from the node's store.
   The model reads the indication as trained (``Indication.model_text``: de-identification
   marks kept); removing them used to cost the node 0.05 BLEU-4 on val.
3. **eval_with_node_indication** (diagnostic, ``--no-decompose`` skips it): eval's pixels and
   views with the indication the node shows people (``Draft.indication``, cleaned), i.e. what
   the node would score if the model read the cleaned text.

Both sides are scored by the same functions (``onnx_models.evaluate.nlg_metrics`` /
``clinical_metrics``); the share of identical texts is reported, and every study whose text
differs is attributed (views differ / indication differs / neither). ``--profile N`` compares
the model input arrays of N studies: eval's image vs the node's prepared DICOM pixels after the
runtime's own resize + normalisation at each input size the bundle uses.

Prints one JSON object and writes it to ``--out``. Not a test: no assertion. Takes 15-30 min
for the 382 val studies on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from sqlalchemy import select
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))

from iu_dicom import IU_XRAY, load_metadata, write_study  # noqa: E402

from dicom_node.config import Destination, PipelineConfig, load_config  # noqa: E402
from dicom_node.db import Draft, Job, Study  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from dicom_node.scu import send_file  # noqa: E402
from onnx_models import imaging  # noqa: E402
from onnx_models.data import load_studies, read_image  # noqa: E402
from onnx_models.evaluate import _inputs, clinical_metrics, evaluate, nlg_metrics  # noqa: E402
from onnx_models.runtime import ReportGenerator  # noqa: E402
from plugin.drafting import pipeline, sr  # noqa: E402
from plugin.drafting.pixels import prepare  # noqa: E402

KEYS = ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "CE13_micro_P", "CE13_micro_R", "CE13_micro_F1", "CE14_micro_F1")


def join(findings: str, impression: str) -> str:
    return " ".join(t for t in (findings, impression) if t)


def scores(refs: list[str], hyps: list[str]) -> dict[str, float]:
    m = {**nlg_metrics(refs, hyps, meteor=False), **clinical_metrics(refs, hyps)}
    return {k: round(float(m[k]), 4) for k in KEYS}


def subset_folder(data: Path, ids: set[str], folder: Path) -> Path:
    """A dataset folder holding only these studies (absolute image paths), for evaluate()."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(data / "studies.jsonl", encoding="utf-8") as fh, \
            open(folder / "studies.jsonl", "w", encoding="utf-8") as out:
        for line in fh:
            if not line.strip():
                continue
            d = json.loads(line)
            if d["study_id"] in ids:
                for im in d["images"]:
                    im["file"] = str(data / im["file"])
                out.write(json.dumps(d) + "\n")
    return folder


def run_eval(args: argparse.Namespace, data: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    predictions = workdir / "eval_predictions.jsonl"
    evaluate(bundle=args.bundle, data=str(data), split=args.split, predictions=str(predictions),
             threads=args.threads, baselines=False, meteor=False, input_check=args.input_check)
    return {r["study_id"]: r for r in map(json.loads, predictions.read_text().splitlines())}


def run_node(args: argparse.Namespace, studies: list[Any], workdir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    overrides = [
        f"node.storage_dir={json.dumps(str(workdir / 'store'))}", 'node.host="127.0.0.1"', "node.port=0",
        "node.fsync=false", "node.min_free_space_mb=0", 'node.log_level="WARNING"',
        "study.quiet_period_s=0.5", "jobs.workers=1", "jobs.poll_interval_s=0.1",
        f"model.bundle={json.dumps(args.bundle)}", f"model.threads={args.threads}",
    ]
    if hasattr(PipelineConfig(), "input_check"):
        overrides.append(f"pipeline.input_check={json.dumps(args.input_check)}")
    config = load_config(overrides=overrides, env={})
    metadata = load_metadata(Path(args.data))
    scales = [int(s) for s in args.scales.split(",")]
    pipeline.generator_for(config)  # load the model before the clock starts
    node = Node(config, job_handler=pipeline.handle_job).start()
    uids: dict[str, str] = {}
    sizes: list[int] = []
    t0 = time.perf_counter()
    try:
        dest = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=node.port)
        for i, s in enumerate(tqdm(studies, desc="send", unit="study", file=sys.stderr)):
            scale = scales[i % len(scales)]
            folder = workdir / "dicom" / s.study_id
            files = write_study(s, folder, kind="cr12", scale=scale, metadata=metadata)
            first = dcmread(files[0], stop_before_pixels=True)
            uids[s.study_id] = str(first.StudyInstanceUID)
            sizes.append(int(first.Rows))
            for f in files:
                status = send_file(config, dest, f)
                if status != 0x0000:
                    raise RuntimeError(f"study {s.study_id}: C-STORE status 0x{status:04X}")
            shutil.rmtree(folder)  # the node keeps its own copy
        t_sent = time.perf_counter()
        out: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        pending = dict(uids)
        bar = tqdm(total=len(pending), desc="drafts", unit="study", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        assert node.sessions is not None
        while pending and time.monotonic() < deadline:
            with node.sessions() as sess:
                for sid, uid in list(pending.items()):
                    row = sess.execute(select(Draft.path, Draft.views, Draft.indication)
                                       .join(Study, Draft.study_id == Study.id)
                                       .where(Study.study_instance_uid == uid)).first()
                    if row is None:
                        ended = sess.execute(select(Job.state, Job.last_error).join(Study, Job.study_id == Study.id)
                                             .where(Study.study_instance_uid == uid,
                                                    Job.state.in_(("failed", "skipped")))).first()
                        if ended is not None:
                            failures[sid] = f"{ended[0]}: {ended[1]}"
                            del pending[sid]
                            bar.update(1)
                        continue
                    report = sr.read_report(dcmread(node.store.abspath(row.path)))
                    out[sid] = {"findings": report.findings, "impression": report.impression,
                                "views": [v["view"] for v in json.loads(row.views or "[]")],
                                "indication": row.indication or ""}
                    del pending[sid]
                    bar.update(1)
            time.sleep(0.5)
        bar.close()
        t_done = time.perf_counter()
    finally:
        node.stop(grace_s=10)
    for sid in pending:
        failures[sid] = "timeout"
    info = {"rows_px": {"min": min(sizes), "max": max(sizes)}, "scales": scales, "failures": failures,
            "seconds_sending": round(t_sent - t0, 1), "seconds_total": round(t_done - t0, 1)}
    return out, info


def run_eval_with_node_indication(args: argparse.Namespace, studies: list[Any],
                                  node: dict[str, dict[str, Any]]) -> dict[str, str]:
    gen = ReportGenerator(args.bundle, threads=args.threads)
    texts: dict[str, str] = {}
    todo = [s for s in studies if s.study_id in node]
    for i in tqdm(range(0, len(todo), 8), desc="eval, node indication", unit="batch", file=sys.stderr):
        chunk = todo[i:i + 8]
        inputs, _ = _inputs(gen, chunk)
        inputs = [dataclasses.replace(x, indication=node[s.study_id]["indication"]) for x, s in zip(inputs, chunk, strict=True)]
        for s, r in zip(chunk, gen.generate(inputs), strict=True):
            texts[s.study_id] = join(r.findings, r.impression)
    return texts


def profile_inputs(args: argparse.Namespace, studies: list[Any]) -> dict[str, Any]:
    """Max |difference| of the model inputs (after the runtime's resize + normalisation) between
    eval's image and the node's prepared CR pixels, per input size the bundle uses."""
    gen = ReportGenerator(args.bundle, threads=args.threads)
    sizes = {"view_classifier": int(getattr(gen, "_vc_size", 64)), "report_model": int(gen.image_size)}
    clf = getattr(gen, "_clf", None)
    if clf:
        sizes["findings_classifier"] = int(clf[1])
    mean, std = float(getattr(gen, "_mean", 0.5)), float(getattr(gen, "_std", 0.25))
    metadata = load_metadata(Path(args.data))
    scales = [int(s) for s in args.scales.split(",")]
    per_scale: dict[int, dict[str, list[float]]] = {}
    native_equal = 0
    n = 0
    with tempfile.TemporaryDirectory(prefix="cxrnode-profile-") as tmp:
        for i, s in enumerate(tqdm(studies[: args.profile], desc="profile", unit="study", file=sys.stderr)):
            scale = scales[i % len(scales)]
            files = write_study(s, Path(tmp) / s.study_id, kind="cr12", scale=scale, metadata=metadata)
            for im, f in zip(s.images, files, strict=True):
                ev = read_image(im.path)
                nd = prepare(dcmread(f)).array
                n += 1
                native_equal += int(np.array_equal(nd[::scale, ::scale], ev))
                d = per_scale.setdefault(scale, {k: [] for k in sizes})
                for name, size in sizes.items():
                    a = imaging.prepare(ev, size, mean, std)
                    b = imaging.prepare(nd, size, mean, std)
                    d[name].append(float(np.abs(a - b).max() * std))  # in [0, 1] pixel units
    return {
        "images": n,
        "node_pixels_equal_eval_pixels_before_resize": native_equal,
        "input_sizes": sizes,
        "max_abs_diff_after_runtime_resize_in_unit_pixels": {
            f"x{scale} ({256 * scale} px)": {k: {"max": round(max(v), 6), "mean": round(float(np.mean(v)), 6),
                                                 "identical_share": round(float(np.mean([x == 0 for x in v])), 3)}
                                             for k, v in d.items()}
            for scale, d in sorted(per_scale.items())},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    studies = load_studies(data, [args.split])
    if args.limit:
        studies = studies[: args.limit]
    workdir = Path(tempfile.mkdtemp(prefix="cxrnode-node-vs-eval-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        evaluated = run_eval(args, subset_folder(data, {s.study_id for s in studies}, workdir / "data"), workdir)
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        node, node_info = run_node(args, studies, workdir)
        t_node = time.perf_counter() - t0
        both = [s for s in studies if s.study_id in node and s.study_id in evaluated]
        refs = [s.report for s in both]
        ev_text = {sid: join(r["findings"], r["impression"]) for sid, r in evaluated.items()}
        node_text = {sid: join(r["findings"], r["impression"]) for sid, r in node.items()}
        metrics = {"eval": scores(refs, [ev_text[s.study_id] for s in both]),
                   "node": scores(refs, [node_text[s.study_id] for s in both])}
        identical = {"node_vs_eval": round(float(np.mean([ev_text[s.study_id] == node_text[s.study_id] for s in both])), 4)}
        attribution = {"views_differ": 0, "indication_differs": 0, "neither": 0}
        examples: list[dict[str, Any]] = []
        for s in both:
            if ev_text[s.study_id] == node_text[s.study_id]:
                continue
            ev_views, node_views = evaluated[s.study_id]["views"], node[s.study_id]["views"]
            if ev_views != node_views:
                attribution["views_differ"] += 1
            elif node[s.study_id]["indication"] != s.indication.strip():
                attribution["indication_differs"] += 1
            else:
                attribution["neither"] += 1
            if len(examples) < 5:
                examples.append({"study_id": s.study_id, "eval_views": ev_views, "node_views": node_views,
                                 "eval_indication": s.indication, "node_indication": node[s.study_id]["indication"],
                                 "eval": ev_text[s.study_id], "node": node_text[s.study_id]})
        t_dec = 0.0
        if args.decompose:
            t0 = time.perf_counter()
            dec = run_eval_with_node_indication(args, both, node)
            t_dec = time.perf_counter() - t0
            metrics["eval_with_node_indication"] = scores(refs, [dec[s.study_id] for s in both])
            identical["node_vs_eval_with_node_indication"] = round(
                float(np.mean([dec[s.study_id] == node_text[s.study_id] for s in both])), 4)
        delta = {k: round(metrics["node"][k] - metrics["eval"][k], 4) for k in KEYS}
        profile = profile_inputs(args, studies) if args.profile else None
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "cxrnode node vs eval: the same val studies through `cxrnode eval` (JPEG files) and through "
                     "the running node (CR DICOM over C-STORE -> draft SR)",
        "split": args.split, "n_studies": len(both), "bundle": args.bundle,
        "node_pixels": {"kind": "CR, MONOCHROME1, 12 bits stored, LINEAR window back to the eval pixels, "
                                "upsampled by pixel replication", **node_info},
        "input_check": args.input_check,
        "metrics": metrics,
        "node_minus_eval": delta,
        "target": "node within 0.01 of eval on BLEU-4 and CE13 micro-F1",
        "meets_target": abs(delta["BLEU-4"]) <= 0.01 and abs(delta["CE13_micro_F1"]) <= 0.01,
        "identical_texts": identical,
        "differing_texts": attribution,
        "examples": examples,
        "input_profile": profile,
        "seconds": {"eval": round(t_eval, 1), "node": round(t_node, 1), "eval_with_node_indication": round(t_dec, 1)},
        "threads": args.threads, "cpu_count": os.cpu_count(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(IU_XRAY))
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="first N studies of the split (0 = all)")
    p.add_argument("--bundle", default="default")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads on both sides (node default 1)")
    p.add_argument("--scales", default="4,5,6,7,8", help="upsampling factors, cycled over the studies")
    p.add_argument("--input-check", default="off", choices=("enforce", "warn", "off"),
                   help="pipeline.input_check on the node and in eval (default off: every study is drafted)")
    p.add_argument("--no-decompose", dest="decompose", action="store_false",
                   help="skip the eval run with the node's indication")
    p.add_argument("--profile", type=int, default=40, help="compare model inputs for the first N studies (0 = skip)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for all drafts")
    p.add_argument("--workdir", default=None, help="folder for the temporary store (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store")
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
