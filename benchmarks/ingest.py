"""Ingest benchmark: DCMTK ``storescu`` -> ``cxrnode serve`` (fsync on) vs DCMTK ``storescp``.

The same files are sent with 1 and N parallel ``storescu`` processes (one association each,
files split round-robin) to (a) ``cxrnode serve`` with durability on (fsync of every file and
its folder, SQLite index in WAL with synchronous=FULL), (b) DCMTK ``storescp`` (``--fork``,
so it also serves parallel associations; it does not fsync) and (c) ``cxrnode serve`` with
``node.fsync = false``, to show what durability costs, and (d) ``storescp --ignore``, which
receives and discards: the most the senders can deliver on this machine. DCMTK runs with ``TCP_NODELAY=1``
(Debian's build leaves Nagle on otherwise, which costs ~90 ms per small file on loopback).
Two sets are built from the
shared real chest radiograph with fresh UIDs: large (2048x2048x16 bit, ~8 MB) and small
(128x128x16 bit, ~33 KB). Wall time runs from launching the senders until all have exited and
every file was acknowledged. Peak RSS is sampled every 20 ms over the receiver's process tree.

    python benchmarks/ingest.py [--large 200] [--small 2000] [--senders 1 8] [--targets ...] [--workdir DIR]

Prints one JSON document to stdout (progress to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
from pydicom.uid import generate_uid

SAMPLE = Path("/work/shared/data/dicom_samples/nih_chestxray_dx_implicit_le.dcm")
DCMTK = {tool: next((str(Path(d) / tool) for d in ("/usr/bin", "/usr/local/bin") if (Path(d) / tool).exists()), tool)
         for tool in ("storescu", "storescp")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_set(out: Path, n: int, size: int) -> list[Path]:
    """``n`` files of ``size`` x ``size`` 16-bit pixels made from the real sample, new UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.dcm"))
    if len(existing) == n:
        return existing
    for p in existing:
        p.unlink()
    ds = pydicom.dcmread(SAMPLE)
    img = ds.pixel_array.astype(np.uint16) * 16  # 8 -> 12 bit
    reps = max(size // img.shape[0], 1)
    big = np.kron(img, np.ones((reps, reps), dtype=np.uint16)) if reps > 1 else img
    big = big[:: max(img.shape[0] // size, 1), :: max(img.shape[0] // size, 1)][:size, :size]
    ds.Rows, ds.Columns = big.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(big).tobytes()
    study = generate_uid()
    series = generate_uid()
    files = []
    for i in range(n):
        ds.StudyInstanceUID = study if i % 50 else (study := generate_uid())
        ds.SeriesInstanceUID = series if i % 50 else (series := generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self.stop.wait(0.02)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("receiver did not start")


def start_cxrnode(workdir: Path, port: int, fsync: bool = True) -> subprocess.Popen[bytes]:
    cfg = workdir / "cxrnode.toml"
    cfg.write_text(
        f"""[node]
ae_title = "CXRNODE"
host = "127.0.0.1"
port = {port}
storage_dir = "{workdir / 'store'}"
min_free_space_mb = 500
fsync = {"true" if fsync else "false"}
max_associations = 32
log_level = "WARNING"
[study]
quiet_period_s = 3600
[jobs]
workers = 0
"""
    )
    return subprocess.Popen([sys.executable, "-m", "installer", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "serve.log", "wb"))  # noqa: SIM115


def start_storescp(workdir: Path, port: int, ignore: bool = False) -> subprocess.Popen[bytes]:
    out = workdir / "out"
    out.mkdir()
    extra = ["--ignore"] if ignore else []
    return subprocess.Popen([DCMTK["storescp"], "--fork", "+xa", "-pm", *extra, "-aet", "CXRNODE", "-od", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "storescp.log", "wb"), env=DCMTK_ENV)  # noqa: SIM115


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # this DCMTK build keeps Nagle on unless asked


def run_one(target: str, files: list[Path], senders: int, root: Path) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=root))
    port = free_port()
    if target.startswith("cxrnode"):
        proc = start_cxrnode(workdir, port, fsync=target == "cxrnode")
    else:
        proc = start_storescp(workdir, port, ignore=target == "storescp-ignore")
    try:
        wait_port(port, proc)
        time.sleep(0.5)
        sampler = RssSampler(proc.pid)
        sampler.start()
        chunks = [files[i::senders] for i in range(senders)]
        t0 = time.perf_counter()
        procs = [subprocess.Popen([DCMTK["storescu"], "-aec", "CXRNODE", "127.0.0.1", str(port), *map(str, c)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV) for c in chunks if c]
        errors = []
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                errors.append(err.decode(errors="replace")[-300:])
        elapsed = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        total = sum(f.stat().st_size for f in files)
        received = (len(list((workdir / "store" / "instances").rglob("*.dcm"))) if target.startswith("cxrnode")
                    else None if target == "storescp-ignore" else len(list((workdir / "out").iterdir())))
        return {
            "target": target,
            "senders": senders,
            "files": len(files),
            "received": received,
            "megabytes": round(total / 1e6, 1),
            "seconds": round(elapsed, 2),
            "mb_per_s": round(total / 1e6 / elapsed, 1),
            "files_per_s": round(len(files) / elapsed, 1),
            "peak_rss_mb": round(sampler.peak / 1e6, 1),
            "errors": errors,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", type=int, default=200, help="number of ~8 MB files (default 200)")
    ap.add_argument("--small", type=int, default=2000, help="number of ~33 KB files (default 2000)")
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 8], help="parallel storescu counts (default 1 8)")
    ap.add_argument("--targets", nargs="+", default=["cxrnode", "storescp", "cxrnode-nofsync", "storescp-ignore"],
                    choices=["cxrnode", "storescp", "cxrnode-nofsync", "storescp-ignore"],
                    help="receivers to measure (cxrnode-nofsync: node.fsync=false, for the cost of durability; "
                         "storescp-ignore: storescp --ignore, receives and discards: the senders' ceiling)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cxrnode-bench")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log("building the file sets ...")
    sets = {"large": build_set(args.workdir / "large", args.large, 2048),
            "small": build_set(args.workdir / "small", args.small, 128)}
    results = []
    for name, files in sets.items():
        if not files:
            continue
        for senders in args.senders:
            for target in args.targets:
                log(f"{name}: {len(files)} files, {senders} sender(s) -> {target}")
                r = run_one(target, files, senders, args.workdir)
                r["set"] = name
                log(f"  {r['mb_per_s']} MB/s, {r['files_per_s']} files/s, peak RSS {r['peak_rss_mb']} MB")
                results.append(r)
    ratios = {}
    for name in sets:
        for senders in args.senders:
            ours = next((r for r in results if r["set"] == name and r["senders"] == senders and r["target"] == "cxrnode"), None)
            peer = next((r for r in results if r["set"] == name and r["senders"] == senders and r["target"] == "storescp"), None)
            if ours and peer:
                ratios[f"{name}/{senders}"] = round(ours["mb_per_s"] / peer["mb_per_s"], 2)
    report = {
        "benchmark": "cxrnode ingest vs DCMTK storescp",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "cxrnode": {"fsync": True, "index": "sqlite (WAL, synchronous=FULL)"},
        "cxrnode-nofsync": {"fsync": False, "index": "sqlite (WAL, synchronous=FULL)"},
        "storescp": {"fsync": False, "mode": "--fork"},
        "storescp-ignore": {"mode": "--fork --ignore (receive and discard: what the senders can deliver)"},
        "results": results,
        "throughput_ratio_cxrnode_over_storescp": ratios,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
