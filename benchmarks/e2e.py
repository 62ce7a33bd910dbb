"""End-to-end latency of the node: last instance acknowledged -> draft SR committed.

    python benchmarks/e2e.py [--studies 50] [--quiet-period 1.0] [--bundle default] [--out result.json]

Starts the real node (Storage SCP, promoter, one worker with the model, SQLite, fsync on) on
loopback in a temporary folder, then for each of N distinct 2-view studies (copies of the
shipped CR sample with their own UIDs) sends both instances with C-STORE, notes when the
last one was acknowledged, and polls the index (every 5 ms) until the study's draft is
committed. Studies are sent one after another (an idle node, the latency a radiologist
sees). Reported latency = (committed - last acknowledged) - quiet period, so it measures
what the node adds: the promoter's poll, queueing, the job (reading, pixels, view classifier,
generation, SR building, durable write, index transaction).

Peer in the same run: the same C-STORE of the same files to DCMTK's ``storescp`` (when
installed), to put the node's ingest time next to a plain Storage SCP's.

Prints one JSON object (and writes it to ``--out`` if given). Not a test: no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.config import Destination, load_config  # noqa: E402
from dicom_node.db import Draft, Job, Study  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from dicom_node.scu import send_file  # noqa: E402
from plugin.drafting import pipeline, samples  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "p50": round(pct(values, 0.5), digits),
        "p95": round(pct(values, 0.95), digits),
        "mean": round(statistics.fmean(values), digits) if values else float("nan"),
        "min": round(min(values), digits) if values else float("nan"),
        "max": round(max(values), digits) if values else float("nan"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_study(folder: Path, number: int) -> list[Path]:
    paths = []
    for ds in samples.make_study(number, prefix="bench"):
        p = folder / f"{number:03d}_{ds.InstanceNumber}_{ds.SeriesNumber}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def peer_storescp(config: Any, studies: list[list[Path]], workdir: Path) -> dict[str, Any] | None:
    exe = shutil.which("storescp", path="/usr/bin") or shutil.which("storescp")
    if exe is None or "pyenv" in exe:  # need DCMTK's, not a Python shim
        exe = "/usr/bin/storescp" if Path("/usr/bin/storescp").exists() else None
    if exe is None:
        return None
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen([exe, "-od", str(out), "-aet", "STORESCP", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        dest = Destination(name="storescp", ae_title="STORESCP", host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        times = []
        for paths in studies:
            t0 = time.perf_counter()
            for p in paths:
                send_file(config, dest, p)
            times.append((time.perf_counter() - t0) * 1000)
        return {"peer": "DCMTK storescp", "ingest_ms_per_study": summary(times, 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="cxrnode-bench-"))
    try:
        overrides = [
            f"node.storage_dir={json.dumps(str(workdir / 'store'))}",
            'node.host="127.0.0.1"', "node.port=0", 'node.log_level="WARNING"', "node.min_free_space_mb=50",
            f"study.quiet_period_s={args.quiet_period}", "jobs.workers=1",
            f"jobs.poll_interval_s={args.poll_interval}",
            f"model.bundle={json.dumps(args.bundle)}", f"model.threads={args.threads}",
        ]
        if args.beam_size:
            overrides.append(f"model.beam_size={args.beam_size}")
        config = load_config(overrides=overrides, env={})
        studies_dir = workdir / "studies"
        studies_dir.mkdir()
        studies = [write_study(studies_dir, i) for i in range(args.studies + args.warmup)]
        gen = pipeline.generator_for(config)  # load the model before timing
        node = Node(config, job_handler=pipeline.handle_job).start()
        latencies: list[float] = []
        ingest: list[float] = []
        job_ms: list[float] = []
        gen_ms: list[float] = []
        failures: list[str] = []
        try:
            dest = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=node.port)
            for i, paths in enumerate(tqdm(studies, desc="studies", file=sys.stderr)):
                study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
                t0 = time.perf_counter()
                for p in paths:
                    send_file(config, dest, p)
                t_ack = time.perf_counter()
                deadline = t_ack + args.timeout
                outcome = None
                while time.perf_counter() < deadline:
                    assert node.sessions is not None
                    with node.sessions() as s:
                        row = s.execute(
                            select(Draft.id, Draft.token_info, Job.duration_ms, Job.state)
                            .join(Study, Draft.study_id == Study.id).join(Job, Draft.job_id == Job.id)
                            .where(Study.study_instance_uid == study_uid)
                        ).first()
                        if row is None:
                            failed = s.execute(select(Job.state, Job.last_error).join(Study, Job.study_id == Study.id)
                                               .where(Study.study_instance_uid == study_uid,
                                                      Job.state.in_(("failed", "skipped")))).first()
                            if failed:
                                outcome = f"job {failed[0]}: {failed[1]}"
                                break
                    if row is not None:
                        outcome = row
                        break
                    time.sleep(0.005)
                t_seen = time.perf_counter()
                if i < args.warmup:
                    continue
                if outcome is None or isinstance(outcome, str):
                    failures.append(f"study {i}: {outcome or 'timeout'}")
                    continue
                ingest.append((t_ack - t0) * 1000)
                latencies.append(t_seen - t_ack - config.study.quiet_period_s)
                # the job's duration is recorded just after the handler returns: wait for it
                dur = None
                until = time.perf_counter() + 10
                while dur is None and time.perf_counter() < until:
                    with node.sessions() as s:
                        dur = s.execute(select(Job.duration_ms).join(Draft, Draft.job_id == Job.id)
                                        .where(Draft.id == outcome[0], Job.state == "done")).scalar()
                    time.sleep(0.005)
                if dur is not None:
                    job_ms.append(float(dur))
                info = json.loads(outcome[1] or "{}")
                if "duration_ms" in info:
                    gen_ms.append(float(info["duration_ms"]))
        finally:
            node.stop(grace_s=10)
        peer = peer_storescp(config, studies[args.warmup:], workdir) if args.peer else None
        return {
            "benchmark": "cxrnode e2e: last instance acknowledged -> draft SR committed, minus the quiet period",
            "studies": len(latencies),
            "views_per_study": 2,
            "failures": failures,
            "latency_s": summary(latencies),
            "target_p50_s": 1.0,
            "meets_target": bool(latencies) and pct(latencies, 0.5) < 1.0,
            "job_ms": summary(job_ms, 1),
            "generation_ms": summary(gen_ms, 1),
            "ingest_ms_per_study": {"node": summary(ingest, 1), **({"peer": peer} if peer else {})},
            "settings": {
                "quiet_period_s": config.study.quiet_period_s,
                "poll_interval_s": config.jobs.poll_interval_s,
                "fsync": config.node.fsync,
                "database": "SQLite",
                "model": f"{gen.name} {gen.version}",
                "providers": list(gen.providers),
                "beam_size": gen.beam_size,
                "threads": config.model.threads,
                "image_size": gen.image_size,
            },
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=50)
    p.add_argument("--warmup", type=int, default=2, help="studies sent first and not counted")
    p.add_argument("--quiet-period", type=float, default=1.0)
    p.add_argument("--poll-interval", type=float, default=0.05, help="jobs.poll_interval_s (promoter and workers)")
    p.add_argument("--bundle", default="default")
    p.add_argument("--beam-size", type=int, default=0, help="0 = the config default")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the DCMTK storescp comparison")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--out", help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["studies"] else 1


if __name__ == "__main__":
    sys.exit(main())
