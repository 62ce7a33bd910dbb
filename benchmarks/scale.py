"""Scale-out throughput: drafted studies per minute with 1, 2 and 3 ``cxrnode worker`` processes.

    CXRNODE_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:55432/postgres \\
        python benchmarks/scale.py [--studies 12] [--workers 1,2,3] [--out benchmarks/results/scale.json]

For each setting: a fresh PostgreSQL database on the server of ``--postgres-url`` (default
``$CXRNODE_TEST_POSTGRES_URL``), ``cxrnode migrate``, one ``cxrnode serve`` with
``jobs.workers = 0`` and N ``cxrnode worker --threads 1`` processes (each with its own
``node.host_id`` and working folder) on one storage root, all real processes on loopback. The
studies (the shipped 2-view sample under new UIDs) are sent with C-STORE (DCMTK ``storescu``,
one association per study, 4 at a time) while the workers wait out the quiet period (longer than
the sending takes), so every study becomes due after the last C-STORE and the workers drain a
full queue. ``--repeat N`` runs all settings N times, interleaved, and reports the medians: on a
shared machine one run is not enough.

Throughput = studies / (last job done - first job queued), both read from the database's clock,
times 60. Also reported: the job durations, the CPU time the cxrnode processes used (per study,
and the rate all cores could sustain at that cost: an estimate that holds only when nothing else
runs), the 1-minute load average before and after (other work on a shared machine takes cores
from the workers), and the machine's core count: the shipped model is small and inference is CPU-bound ONNX Runtime
(``model.threads = 1`` per worker, one intra-op thread, so N workers want N cores), so on a
machine with ``os.cpu_count()`` cores more workers than cores cannot help.

Baseline in the same run: one ``cxrnode serve`` drafting by itself (``jobs.workers = 1``), the
single-host set-up. Prints one JSON object (and writes it to ``--out``). Not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.postgres

from support.postgres import database_on  # noqa: E402

from dicom_node.config import Destination, load_config  # noqa: E402
from dicom_node.db import Draft, Job, JobState, Study, StudyState, make_engine, session_factory  # noqa: E402
from dicom_node.scu import send_file  # noqa: E402
from plugin.drafting.samples import make_study  # noqa: E402

CXRNODE = [sys.executable, "-m", "installer"]
LIMITS = ("CPU-bound ONNX Runtime inference (encoder + decoder with beam search) on {cpus} cores: each "
          "worker runs one drafting thread with model.threads = 1 (one intra-op thread), so a worker "
          "keeps about one core busy; past {cpus} workers the processes share the cores and the "
          "throughput cannot grow. serve (SCP, promoter), PostgreSQL and storescu share the same cores.")


def summary(values: list[float], digits: int = 1) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {"p50": round(statistics.median(s), digits), "mean": round(statistics.fmean(s), digits),
            "min": round(s[0], digits), "max": round(s[-1], digits)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A ``cxrnode`` subprocess, ready once its stderr shows ``ready``."""

    def __init__(self, name: str, args: list[str], workdir: Path, ready: str, timeout: float = 180) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        (workdir / name).mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([*CXRNODE, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=workdir / name)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + timeout
        while ready not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def storescu() -> str | None:
    for d in ("/usr/bin", "/usr/local/bin"):  # DCMTK's, not the pyenv shim of pynetdicom's app
        if (Path(d) / "storescu").exists():
            return str(Path(d) / "storescu")
    return None


def send_study(port: int, paths: list[Path], config: Any) -> None:
    exe = storescu()
    if exe:
        r = subprocess.run([exe, "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(port), *map(str, paths)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"storescu exit {r.returncode}: {r.stderr.strip()[-500:]}")
    else:  # one association per instance through the node's own SCU
        dest = Destination(name="node", ae_title="CXRNODE", host="127.0.0.1", port=port)
        for p in paths:
            send_file(config, dest, p)


def write_studies(folder: Path, n: int, prefix: str) -> list[list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        paths = []
        for ds in make_study(i, prefix=prefix):
            p = folder / f"{i:03d}_{ds.SeriesNumber}_{ds.InstanceNumber}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
        out.append(paths)
    return out


def run_setting(args: argparse.Namespace, workers: int, workdir: Path, tag: str = "") -> dict[str, Any]:
    """``workers`` worker processes (0: serve drafts itself with one thread, the single-host baseline)."""
    label = f"{workers}-workers" if workers else "serve-alone"
    wd = workdir / f"{label}-{tag}"
    wd.mkdir()
    port = free_port()
    with database_on(args.postgres_url, "bench_scale") as url:
        sections = {
            "node": {"ae_title": "CXRNODE", "host": "127.0.0.1", "port": port, "storage_dir": str(wd / "shared"),
                     "database_url": url, "min_free_space_mb": 50, "log_level": "INFO", "fsync": True},
            "study": {"quiet_period_s": args.quiet_period},
            "jobs": {"workers": 0 if workers else 1, "poll_interval_s": args.poll_interval, "lease_s": 60.0},
            "model": {"threads": args.threads, "bundle": args.bundle},
        }
        cfg = wd / "cxrnode.toml"
        cfg.write_text("".join(f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                               for sec, vals in sections.items()))
        config = load_config(cfg, env={})
        r = subprocess.run([*CXRNODE, "migrate", "--config", str(cfg)], capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"cxrnode migrate failed: {r.stderr}")
        studies = write_studies(wd / "studies", args.studies, f"scale-{label}-{tag}")
        procs: list[Proc] = []
        try:
            procs.append(Proc("serve", ["serve", "--config", str(cfg), "--set", 'node.host_id="receiver"'], wd,
                              "listening on"))
            for i in range(workers):
                procs.append(Proc(f"worker-{i}", ["worker", "--config", str(cfg), "--threads", "1",
                                                  "--set", f'node.host_id="worker-{i}"'], wd, "drafting thread(s)"))
            cpu0 = {p.name: p.cpu_s() for p in procs}
            load_before = os.getloadavg()[0]
            t_send = time.monotonic()
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda paths: send_study(port, paths, config), studies))
            sent_s = time.monotonic() - t_send
            engine = make_engine(url)
            sessions = session_factory(engine)
            try:
                deadline = time.monotonic() + args.timeout
                while True:
                    with sessions() as s:
                        states = s.scalars(select(Study.state)).all()
                    if len(states) == args.studies and all(st in (StudyState.DRAFTED, StudyState.FAILED,
                                                                   StudyState.SKIPPED) for st in states):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{label}: not drafted in {args.timeout} s: {sorted(states)}")
                    time.sleep(0.2)
                cpu = {p.name: round(p.cpu_s() - cpu0[p.name], 1) for p in procs}
                load_after = os.getloadavg()[0]
                with sessions() as s:
                    first_queued, last_done = s.execute(
                        select(func.min(Job.created_at), func.max(Job.updated_at))).one()
                    jobs = s.scalars(select(Job)).all()
                    drafts = s.scalar(select(func.count()).select_from(Draft))
                    token_info = s.scalars(select(Draft.token_info)).all()
            finally:
                engine.dispose()
        finally:
            codes = [p.stop() for p in procs]
    window_s = (last_done - first_queued).total_seconds() if isinstance(last_done, dt.datetime) else float("nan")
    done = [j for j in jobs if j.state == JobState.DONE]
    gen_ms = [float(json.loads(t or "{}").get("duration_ms", "nan")) for t in token_info]
    ran_by = sorted({(j.log or "").split(" by worker ")[-1].split("\n")[0].split(":")[1] for j in done
                     if " by worker " in (j.log or "")})
    worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker")) if workers else cpu.get("serve", 0.0)
    return {
        "setting": label,
        "worker_processes": workers,
        "drafting_threads": workers or 1,
        "studies": args.studies,
        "drafted": len(done),
        "drafts": drafts,
        "failed_or_skipped": args.studies - len(done),
        "jobs_run_by_processes": len(ran_by),
        "send_s": round(sent_s, 2),
        "all_sent_before_first_due": sent_s < args.quiet_period,
        "drain_window_s": round(window_s, 2),
        "studies_per_minute": round(len(done) / window_s * 60, 1) if window_s > 0 else None,
        "job_ms": summary([float(j.duration_ms) for j in done if j.duration_ms is not None]),
        "generation_ms": summary([g for g in gen_ms if g == g]),
        "cpu_s": cpu,
        "drafting_cpu_s": round(worker_cpu, 1),
        "drafting_cores_busy": round(worker_cpu / window_s, 2) if window_s > 0 else None,
        # CPU time of every cxrnode process (serve + workers) per drafted study, and the rate all
        # of this machine's cores could sustain at that cost if nothing else ran (an estimate)
        "cxrnode_cpu_s_per_study": round(sum(cpu.values()) / len(done), 3) if done else None,
        "cpu_ceiling_studies_per_minute": (round((os.cpu_count() or 1) * 60 / (sum(cpu.values()) / len(done)), 1)
                                           if done and sum(cpu.values()) > 0 else None),
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "exit_codes": codes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.postgres_url:
        raise SystemExit("scale.py: give --postgres-url or set CXRNODE_TEST_POSTGRES_URL (a PostgreSQL server "
                         "where it may create and drop databases)")
    workdir = Path(tempfile.mkdtemp(prefix="cxrnode-bench-scale-"))
    cpus = os.cpu_count() or 1
    try:
        settings = [0] if args.baseline else []
        settings += [int(w) for w in args.workers.split(",")]
        results = []
        for rep in range(args.repeat):  # interleaved, so a change in the machine's load hits every setting
            for n in settings:
                print(f"scale.py: round {rep + 1}/{args.repeat}: {n or 'serve alone'} ...", file=sys.stderr, flush=True)
                results.append(run_setting(args, n, workdir, tag=f"r{rep}"))
        by_setting: dict[str, Any] = {}
        for r in results:
            entry = by_setting.setdefault(r["setting"], {"worker_processes": r["worker_processes"], "runs": []})
            entry["runs"].append(r["studies_per_minute"])
        for entry in by_setting.values():
            entry["median"] = statistics.median([v for v in entry["runs"] if v is not None] or [0.0])
        by_n = {e["worker_processes"]: e["median"] for e in by_setting.values() if e["worker_processes"]}
        one = by_n.get(1)
        return {
            "benchmark": "cxrnode scale-out: drafted studies per minute, one serve (jobs.workers = 0) + N cxrnode "
                         "worker processes, PostgreSQL, C-STORE on loopback",
            "machine": {"cpus": cpus, "python": platform.python_version(), "platform": platform.platform(),
                        "note": f"this machine has {cpus} cores (os.cpu_count()); every process of every "
                                "setting (serve, workers, PostgreSQL, senders) runs on them, and other "
                                "work on the machine shares them too (see load_average_1min per setting)"},
            "limited_by": LIMITS.format(cpus=cpus),
            "studies_per_minute": by_setting,
            "speedup_vs_1_worker": {str(n): round(v / one, 2) for n, v in by_n.items()} if one else {},
            "results": results,
            "settings": {"studies_per_setting": args.studies, "views_per_study": 2, "image": "256x256 CR sample",
                         "quiet_period_s": args.quiet_period, "poll_interval_s": args.poll_interval,
                         "model": args.bundle, "model.threads": args.threads, "worker_threads": 1,
                         "fsync": True, "database": "PostgreSQL (local server)",
                         "sender": "DCMTK storescu, 4 associations at a time" if storescu() else "dicom_node.scu"},
        }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=12, help="studies per setting")
    p.add_argument("--workers", default="1,2,3", help="worker process counts to measure, comma-separated")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip serve drafting alone (jobs.workers = 1)")
    p.add_argument("--repeat", type=int, default=1, help="rounds over all settings (interleaved); medians reported")
    p.add_argument("--quiet-period", type=float, default=8.0,
                   help="study.quiet_period_s: longer than sending all studies takes, so every study is due "
                        "after the last C-STORE and the workers drain a full queue without ingest beside them")
    p.add_argument("--poll-interval", type=float, default=0.1, help="jobs.poll_interval_s")
    p.add_argument("--threads", type=int, default=1, help="model.threads (ONNX Runtime intra-op threads per worker)")
    p.add_argument("--bundle", default="default")
    p.add_argument("--postgres-url", default=os.environ.get("CXRNODE_TEST_POSTGRES_URL", ""))
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--out", help="also write the JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    out = json.dumps(result, indent=2)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")
    return 0 if all(r["drafted"] == r["studies"] for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
