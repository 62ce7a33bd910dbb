"""``cxrnode demo``: the whole flow on the shipped sample study (or your files), in one command.

Starts the node on its embedded defaults (SQLite, the shipped model bundle, an ephemeral port
on loopback, a 1 s quiet period) in a fresh folder, sends the sample study (PA + lateral CR,
with an indication) to it over DICOM with C-STORE, waits for the draft SR while showing the
job's progress, prints the report and where the SR file is, and stops the node. Given DICOM
files of one study instead (``cxrnode demo FILE...``), it sends those: a film the model cannot
read (the input gate) shows the withheld draft and why. Needs no
configuration, no network and no screen. The folder is kept so the SR can be inspected
(``dsrdump <path>``); delete it when done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.config import Config, Destination, load_config
from dicom_node.db import Draft, Job, Study
from plugin.token_info import TokenInfo

DEMO_AE = "CXRNODE"


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def demo_config(workdir: Path, args: argparse.Namespace) -> Config:
    overrides = [
        f"node.storage_dir={_toml(str(workdir / 'store'))}",
        "node.host=\"127.0.0.1\"",
        "node.port=0",
        f"node.ae_title={_toml(DEMO_AE)}",
        "node.min_free_space_mb=50",
        "node.log_level=\"WARNING\"",
        f"study.quiet_period_s={args.quiet_period}",
        "jobs.workers=1",
        "jobs.poll_interval_s=0.1",
        f"model.bundle={_toml(args.bundle)}",
        f"model.threads={args.threads}",
    ]
    if args.beam_size:
        overrides.append(f"model.beam_size={args.beam_size}")
    return load_config(path=None, overrides=overrides, env={})


def _progress(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.node import Node
    from dicom_node.scu import SendError, send_file
    from plugin.drafting import pipeline, samples

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="cxrnode-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = demo_config(workdir, args)
    files = [Path(f) for f in args.files] or samples.sample_files()
    problem = _check_files(files)
    if problem:
        print(f"cxrnode demo: {problem}", file=sys.stderr)
        return 2
    say = lambda m: _progress(m, args.quiet)  # noqa: E731
    say(f"working folder {workdir}")
    t0 = time.perf_counter()
    try:
        gen = pipeline.generator_for(config)
    except Exception as exc:  # BundleError, ONNX Runtime errors: say which bundle and why
        print(f"cxrnode demo: cannot load the model bundle {args.bundle!r}: {exc}", file=sys.stderr)
        return 1
    say(f"model {gen.name} {gen.version} loaded in {time.perf_counter() - t0:.1f} s (providers {', '.join(gen.providers)})")
    node = Node(config, job_handler=pipeline.handle_job).start()
    try:
        say(f"node {config.node.ae_title} listening on 127.0.0.1:{node.port}")
        dest = Destination(name="demo-node", ae_title=DEMO_AE, host="127.0.0.1", port=node.port)
        study_uid = ""
        for i, path in enumerate(files, 1):
            from pydicom import dcmread

            ds = dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            try:
                send_file(config, dest, path)
            except SendError as exc:
                print(f"cxrnode demo: sending the sample failed: {exc}", file=sys.stderr)
                return 1
            say(f"sent {i}/{len(files)}: {ds.Modality} {ds.get('ViewPosition', '')} {path.name}")
        t_sent = time.perf_counter()
        result = _wait_for_draft(node, study_uid, args.timeout, say)
        if isinstance(result, str):
            print(f"cxrnode demo: {result}", file=sys.stderr)
            return 1
        draft, job_log = result
        elapsed = time.perf_counter() - t_sent
        sr_path = node.store.abspath(draft["path"])
        if args.json:
            print(json.dumps({**draft, "sr_path": str(sr_path), "seconds_after_last_instance": round(elapsed, 2),
                              "workdir": str(workdir)}, indent=2))
        else:
            print(_format(draft, sr_path, elapsed, config.study.quiet_period_s, workdir, job_log if args.verbose else ""))
        return 0
    finally:
        node.stop(grace_s=10)


def _check_files(files: list[Path]) -> str:
    """One line when the given files are not DICOM images of one study, else ''."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    studies = set()
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            return f"{f}: not a readable DICOM file ({exc})"
        if "StudyInstanceUID" not in ds or "SOPInstanceUID" not in ds:
            return f"{f}: no Study/SOP Instance UID"
        studies.add(str(ds.StudyInstanceUID))
    if len(studies) > 1:
        return f"the files belong to {len(studies)} studies; give the files of one study"
    return ""


def _wait_for_draft(node: Any, study_uid: str, timeout: float, say: Any) -> tuple[dict[str, Any], str] | str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        with node.sessions() as s:
            study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
            job = None
            draft = None
            if study is not None:
                job = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())).first()
                draft = s.scalars(select(Draft).where(Draft.study_id == study.id).order_by(Draft.id.desc())).first()
            state = f"study {study.state if study else 'not yet indexed'}"
            if job is not None:
                state += f", job {job.state} (attempt {job.attempts})"
            if state != last:
                say(state)
                last = state
            if draft is not None and job is not None and job.state == "done":
                return ({
                    "study_instance_uid": study_uid,
                    "sop_instance_uid": draft.sop_instance_uid,
                    "path": draft.path,
                    "indication": draft.indication,
                    "findings": draft.findings,
                    "impression": draft.impression,
                    "views": json.loads(draft.views or "[]"),
                    "model": f"{draft.model_name} {draft.model_version}",
                    "job_ms": job.duration_ms,
                    "input_check": gate.to_json() if (gate := TokenInfo.parse(draft.token_info).input_check) else {},
                }, job.log or "")
            if job is not None and job.state in ("skipped", "failed"):
                return f"the job ended {job.state}: {job.last_error}\n{job.log}"
        time.sleep(0.1)
    return f"no draft after {timeout:.0f} s (last state: {last})"


def _format(draft: dict[str, Any], sr_path: Path, elapsed: float, quiet: float, workdir: Path, job_log: str) -> str:
    views = ", ".join(f"{v['view']} ({v['source']})" for v in draft["views"])
    gate = draft.get("input_check") or {}
    failed = [f"             {v['view']} {v['sop_instance_uid']}: {'; '.join(v['reasons'])}"
              for v in gate.get("views", []) if not v.get("passed")]
    if gate.get("outcome") == "withheld":
        head = ["AI DRAFT WITHHELD - NOT DRAFTED (the model cannot read these images; a radiologist "
                "reports from scratch)",
                f"model      : {draft['model']}",
                f"views      : {views}",
                f"INDICATION : {draft['indication'] or '(none)'}",
                f"WITHHELD   : {gate.get('reason', '')}"]
    else:
        head = ["AI-GENERATED DRAFT - UNVERIFIED (research use only; a radiologist must review and sign)",
                f"model      : {draft['model']}",
                f"views      : {views}",
                f"input check: {gate.get('outcome', 'not recorded')}"
                + (f" ({gate['reason']})" if gate.get("outcome") not in (None, "passed") else ""),
                f"INDICATION : {draft['indication'] or '(none)'}",
                f"FINDINGS   : {draft['findings']}",
                f"IMPRESSION : {draft['impression']}"]
    lines = ["", *head, *(["not used   :", *failed] if failed else []), "",
        f"draft SR   : {sr_path}",
        f"             (Comprehensive SR, TID 2000; try: dsrdump {sr_path})",
        f"timing     : draft committed {elapsed:.2f} s after the last instance "
        f"(quiet period {quiet:g} s, job {draft['job_ms'] or 0:.0f} ms)",
        f"folder     : {workdir} (kept; delete it when done)",
    ]
    if job_log:
        lines += ["", "job log:", job_log]
    return "\n".join(lines)


def add_subcommands(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the node on the shipped sample study (or your DICOM files) and print the AI draft",
        description="Start the node (SQLite, shipped model, ephemeral port, 1 s quiet period) in a temporary "
                    "folder, send the shipped 2-view sample study (or the FILEs given: DICOM images of one "
                    "study) over DICOM, wait for the draft SR, print it and where the SR file is, and stop. "
                    "A film the model cannot read is shown as withheld, with the reason. Needs no "
                    "configuration and no screen.",
    )
    demo.add_argument("files", nargs="*", metavar="FILE",
                      help="DICOM files of one study to send instead of the shipped sample")
    demo.add_argument("--workdir", metavar="DIR", help="folder for the store and database (default: a new temporary folder)")
    demo.add_argument("--bundle", default="default", help="model bundle name or folder (default: the shipped one)")
    demo.add_argument("--beam-size", type=int, default=0, metavar="N", help="beam width (default: the config default)")
    demo.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime threads (0 = its default)")
    demo.add_argument("--quiet-period", type=float, default=1.0, metavar="S", help="study quiet period in seconds (default 1)")
    demo.add_argument("--timeout", type=float, default=300.0, metavar="S", help="give up after S seconds (default 300)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--verbose", action="store_true", help="also print the job log")
    demo.add_argument("--quiet", action="store_true", help="no progress messages")
    demo.set_defaults(func=cmd_demo)
