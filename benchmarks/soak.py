"""Soak: a running ``cxrnode serve`` under mixed good traffic and hostile clients (issue 13).

Bounded and loopback only: it starts its own node on 127.0.0.1 (fsync on, SQLite index, one
drafting worker with the shipped model), runs for ``--minutes`` (default 10) and stops by
itself, then checks what the node acknowledged and what it wrote.

Good traffic: pynetdicom senders (and every third study DCMTK ``storescu``) send two-view
studies (512x512 crops of the shared chest radiograph, fresh UIDs, a one-component patient
name); the node drafts an SR for each quiet study.

Hostile clients, all the time:

* half-open: a dozen sockets that send 40 bytes of an A-ASSOCIATE-RQ and stall, replaced as
  soon as the node closes them;
* garbage: connections that send random bytes or PDUs with random fields;
* oversized: a PDU header announcing 4 GiB, a deflate bomb (0.5 MB inflating to 512 MiB) on
  an accepted association, a P-DATA header announcing 2 MiB then silence;
* forged re-sends: the node's own SRs (read from its store, as a PACS would have them) sent
  back with a changed verifier / in another study, an identical echo of them, and received
  images re-sent with changed content.

At the end every instance the node acknowledged with 0x0000 must be on disk and in the index
with the data set byte-identical to what was sent ("lost"), every SR the node generated must
be unchanged on disk and in the index ("node objects altered"), and the patient name must not
be in the node's log. Prints one JSON document (progress to stderr)::

    python benchmarks/soak.py [--minutes 10] [--senders 2] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, cast

import numpy as np
import psutil
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_primitives import C_STORE

SAMPLE = Path("/work/shared/data/dicom_samples/nih_chestxray_dx_implicit_le.dcm")
PATIENT_NAME = "Soakpatientname"  # one component: highdicom used to print it
PATIENT_ID = "SOAK-PID-0042"
CR = "1.2.840.10008.5.1.4.1.1.1"
STORESCU = next((p for p in ("/usr/bin/storescu", "/usr/local/bin/storescu") if Path(p).exists()), "")
CONFIG = {
    "acse_timeout_s": 5.0, "network_timeout_s": 10.0, "dimse_timeout_s": 30.0,
    "max_associations": 8, "max_pending_associations": 8, "max_inflated_mb": 64,
}


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_set_sha(data: bytes) -> str:
    """SHA-256 of a Part 10 file's data set (after the File Meta Information)."""
    return hashlib.sha256(data[144 + int.from_bytes(data[140:144], "little"):]).hexdigest()


# -- the node ----------------------------------------------------------------------------------


def start_node(workdir: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = workdir / "cxrnode.toml"
    node = "\n".join(f"{k} = {v}" for k, v in CONFIG.items())
    cfg.write_text(f"""[node]
ae_title = "CXRNODE"
host = "127.0.0.1"
port = {port}
storage_dir = "{workdir / 'store'}"
min_free_space_mb = 500
fsync = true
log_level = "INFO"
{node}
[security]
allowed_calling_ae_titles = ["MODALITY", "STORESCU", "PACS", "FORGER"]
[study]
quiet_period_s = 2
[jobs]
workers = 1
poll_interval_s = 0.2
""")
    proc = subprocess.Popen([sys.executable, "-m", "installer", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "serve.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cxrnode serve exited with {proc.returncode}; see {workdir / 'serve.log'}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    raise RuntimeError("cxrnode serve did not start")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.stop = stop
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                total = sum(p.memory_info().rss for p in [self.proc, *self.proc.children(recursive=True)])
            except psutil.Error:
                return
            self.samples.append(total / (1 << 20))
            self.stop.wait(0.25)


class Index:
    """Read-only look at the node's SQLite index (what an operator's `status` would see)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)) as db:
            return list(db.execute(sql, args))


# -- good traffic ------------------------------------------------------------------------------


class Ledger:
    """What the node acknowledged (0x0000) and the data set it was sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}
        self.statuses: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def record(self, sop: str, sha: str, status: int | None) -> None:
        with self.lock:
            self.statuses[f"0x{status:04X}" if status is not None else "none"] += 1
            if status == 0:
                self.acked[sop] = sha

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] += 1


def make_template() -> Dataset:
    ds = pydicom.dcmread(SAMPLE)
    arr = ds.pixel_array[:512, :512].astype(ds.pixel_array.dtype)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.Rows, ds.Columns = arr.shape
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    return ds


def write_study(ds: Dataset, folder: Path) -> list[tuple[Path, str, str]]:
    """Two views of a new study: [(path, SOP Instance UID, data set sha256)]. ``ds`` (the
    sender's own template) is changed in place."""
    study, series = generate_uid(), generate_uid()
    out = []
    for view in ("PA", "LL"):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ViewPosition = view
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((path, str(ds.SOPInstanceUID), data_set_sha(path.read_bytes())))
    return out


def send_files(port: int, calling: str, paths: list[Path]) -> list[int | None]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in
                                 (read_file_meta_info(p) for p in paths)}):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    if not assoc.is_established:
        raise ConnectionRefusedError("association rejected" if assoc.is_rejected else "association failed")
    out: list[int | None] = []
    try:
        for p in paths:
            rsp = assoc.send_c_store(p)
            out.append(int(rsp.Status) if rsp and "Status" in rsp else None)
    finally:
        assoc.release()
    return out


def good_sender(k: int, port: int, folder: Path, ledger: Ledger, stop: threading.Event) -> None:
    template = make_template()  # one per sender: the study files are written from it in place
    n = 0
    while not stop.is_set():
        files = write_study(template, folder)
        n += 1
        try:
            if STORESCU and k == 1 and n % 3 == 0:
                r = subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", "CXRNODE", "127.0.0.1", str(port),
                                    *[str(f[0]) for f in files]], capture_output=True, text=True, timeout=120,
                                   env={**os.environ, "TCP_NODELAY": "1"})
                ok = r.returncode == 0 and r.stderr.count("Received Store Response (Success)") == len(files)
                for _, sop, sha in files:
                    ledger.record(sop, sha, 0 if ok else None)
                if not ok:
                    ledger.error(f"storescu rc={r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-2:]))
            else:
                statuses = send_files(port, "MODALITY", [f[0] for f in files])
                for (_, sop, sha), status in zip(files, statuses, strict=True):
                    ledger.record(sop, sha, status)
        except (ConnectionRefusedError, OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            ledger.error(f"{type(exc).__name__}: {exc}"[:160])
        time.sleep(0.3)


# -- hostile clients ---------------------------------------------------------------------------


class Hostile:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.max_half_open_held_s = 0.0

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def half_open(port: int, h: Hostile, stop: threading.Event, n: int = 12) -> None:
    rq = (struct.pack(">BBI", 0x01, 0, 200) + struct.pack(">HH", 1, 0) + b"CXRNODE".ljust(16)
          + b"MODALITY".ljust(16))[:40]
    held: list[tuple[socket.socket, float]] = []
    while not stop.is_set():
        still = []
        for s, t in held:
            if closed(s):
                h.count("half_open_closed_by_node")
                with h.lock:
                    h.max_half_open_held_s = max(h.max_half_open_held_s, time.monotonic() - t)
                s.close()
            else:
                still.append((s, t))
        held = still
        while len(held) < n:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(rq)
                held.append((s, time.monotonic()))
                h.count("half_open_opened")
            except OSError:
                h.count("half_open_connect_failed")
                break
        stop.wait(0.2)
    for s, _ in held:
        s.close()


def garbage(port: int, h: Hostile, stop: threading.Event) -> None:
    rnd = random.Random(13)
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                kind = rnd.randrange(3)
                if kind == 0:  # random bytes
                    payload = rnd.randbytes(rnd.randrange(1, 4096))
                elif kind == 1:  # a PDU type the node knows, random body of the announced length
                    body = rnd.randbytes(rnd.randrange(0, 2048))
                    payload = struct.pack(">BBI", rnd.choice([1, 2, 3, 4, 5, 6, 7]), 0, len(body)) + body
                else:  # an unknown PDU type
                    payload = struct.pack(">BBI", rnd.randrange(8, 256), 0, 16) + bytes(16)
                s.sendall(payload)
                h.count("garbage_sent")
                if wait_closed(s, CONFIG["acse_timeout_s"] + 5):
                    h.count("garbage_closed_by_node")
        except OSError:
            h.count("garbage_connection_reset")
        stop.wait(0.1)


def deflate_bomb(inflated_mb: int) -> tuple[bytes, str]:
    header = Dataset()
    header.SOPClassUID = CR
    header.SOPInstanceUID = generate_uid()
    header.StudyInstanceUID = generate_uid()
    header.SeriesInstanceUID = generate_uid()
    header.PatientName = PATIENT_NAME
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, header)
    body = fp.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated_mb << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [z.compress(body)] + [z.compress(bytes(1 << 20)) for _ in range(inflated_mb)] + [z.flush()]
    return b"".join(parts), str(header.SOPInstanceUID)


def raw_store(port: int, calling: str, sop_class: str, sop: str, body: bytes, ts: str) -> int | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    if not assoc.is_established:
        return None
    try:
        req = C_STORE()
        req.MessageID, req.Priority = 1, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop
        req.DataSet = io.BytesIO(body)
        assoc._reactor_checkpoint.clear()  # noqa: SLF001 - we read the response ourselves
        try:
            assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)  # type: ignore[arg-type]
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()  # noqa: SLF001
        return int(cast(Any, rsp).Status) if rsp is not None else None
    finally:
        assoc.release()


def oversized(port: int, h: Hostile, stop: threading.Event) -> None:
    bomb, bomb_sop = deflate_bomb(512)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            if i % 3 == 0:  # a header asking for a 4 GiB PDU
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + bytes(65536))
                    h.count("huge_pdu_header_closed_by_node" if wait_closed(s, 5) else "huge_pdu_header_still_open")
            elif i % 3 == 1:  # the deflate bomb
                status = raw_store(port, "MODALITY", CR, bomb_sop, bomb, DeflatedExplicitVRLittleEndian)
                h.count(f"deflate_bomb_0x{status:04X}" if status is not None else "deflate_bomb_no_status")
            else:  # on an accepted association: a P-DATA header announcing 2 MiB, 1 KiB of it, silence
                ae = AE(ae_title="MODALITY")
                ae.add_requested_context(CR, [ExplicitVRLittleEndian])
                ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
                assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
                if assoc.is_established:
                    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
                    sock.sendall(struct.pack(">BBI", 0x04, 0, 2 << 20) + bytes(1024))  # type: ignore[union-attr]
                    t0 = time.monotonic()
                    while assoc.is_alive() and time.monotonic() - t0 < CONFIG["network_timeout_s"] + 10:
                        time.sleep(0.1)
                    h.count("stalled_pdata_closed_by_node" if not assoc.is_alive() else "stalled_pdata_still_open")
                    if assoc.is_alive():
                        assoc.abort()
                else:
                    h.count("stalled_pdata_not_associated")
        except OSError:
            h.count("oversized_connection_reset")
        stop.wait(0.5)


def forger(port: int, index: Index, store: Path, ledger: Ledger, folder: Path, h: Hostile,
           node_objects: dict[str, tuple[str, str]], stop: threading.Event) -> None:
    rnd = random.Random(42)
    i = 0
    while not stop.is_set():
        stop.wait(0.7)
        i += 1
        try:
            generated = index.query("SELECT sop_instance_uid, path, sha256 FROM instances WHERE generated = 1")
        except sqlite3.Error:
            continue
        for sop, path, sha in generated:
            node_objects.setdefault(sop, (path, sha))
        try:
            if generated and i % 4 != 3:
                sop, path, _ = rnd.choice(generated)
                data = (store / path).read_bytes()
                ds = pydicom.dcmread(io.BytesIO(data))
                mode = rnd.choice(["verifier", "moved", "echo"])
                if mode == "verifier":
                    ds.VerifyingObserverSequence = Sequence([Dataset()])
                    ds.VerifyingObserverSequence[0].VerifyingObserverName = "Mallory^Eve"
                    ds.VerificationFlag = "VERIFIED"
                elif mode == "moved":
                    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
                out = folder / f"forged-{i}.dcm"
                if mode == "echo":
                    out.write_bytes(data)
                else:
                    ds.save_as(out, enforce_file_format=True)
                [status] = send_files(port, "PACS" if mode == "echo" else "FORGER", [out])
                h.count(f"forged_node_sr_{mode}_0x{status:04X}" if status is not None else f"forged_node_sr_{mode}_none")
                out.unlink()
            else:  # a received image re-sent with other content
                with ledger.lock:
                    if not ledger.acked:
                        continue
                    sop = rnd.choice(list(ledger.acked))
                rows = index.query("SELECT path FROM instances WHERE sop_instance_uid = ?", sop)
                if not rows:
                    continue
                ds = pydicom.dcmread(store / rows[0][0])
                ds.ImageComments = "forged"
                out = folder / f"forged-{i}.dcm"
                ds.save_as(out, enforce_file_format=True)
                [status] = send_files(port, "FORGER", [out])
                h.count(f"forged_image_0x{status:04X}" if status is not None else "forged_image_none")
                out.unlink()
        except (OSError, ConnectionRefusedError, ValueError) as exc:
            h.count(f"forger_{type(exc).__name__}")


# -- the run -----------------------------------------------------------------------------------


def verify(index: Index, store: Path, ledger: Ledger, node_objects: dict[str, tuple[str, str]]) -> dict[str, Any]:
    rows = {sop: (path, sha, gen) for sop, path, sha, gen in
            index.query("SELECT sop_instance_uid, path, sha256, generated FROM instances")}
    lost = []
    for sop, sent_sha in ledger.acked.items():
        row = rows.get(sop)
        try:
            data = (store / row[0]).read_bytes() if row else b""
        except OSError:
            data = b""
        if not row or not data or data_set_sha(data) != sent_sha or hashlib.sha256(data).hexdigest() != row[1]:
            lost.append(sop)
    altered = []
    for sop, (path, sha) in node_objects.items():
        row = rows.get(sop)
        try:
            on_disk = hashlib.sha256((store / path).read_bytes()).hexdigest()
        except OSError:
            on_disk = ""
        if not row or row[2] != 1 or row[0] != path or row[1] != sha or on_disk != sha:
            altered.append(sop)
    return {"acknowledged": len(ledger.acked), "acknowledged_lost": len(lost), "lost_examples": lost[:5],
            "node_objects_checked": len(node_objects), "node_objects_altered": len(altered),
            "altered_examples": altered[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    ap.add_argument("--senders", type=int, default=2, help="parallel good senders (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cxrnode-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sent = workdir / "sent"
    sent.mkdir(exist_ok=True)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are
    port = free_port()
    log(f"starting cxrnode serve on 127.0.0.1:{port} in {workdir}")
    node = start_node(workdir, port)
    store = workdir / "store"
    index = Index(store / "cxrnode.db")
    stop, hostile_stop, sampler_stop = threading.Event(), threading.Event(), threading.Event()
    sampler = RssSampler(node.pid, sampler_stop)
    sampler.start()
    ledger, h = Ledger(), Hostile()
    node_objects: dict[str, tuple[str, str]] = {}
    good = [threading.Thread(target=good_sender, args=(k, port, sent, ledger, stop), daemon=True)
            for k in range(args.senders)]
    hostile = [threading.Thread(target=half_open, args=(port, h, hostile_stop), daemon=True),
               threading.Thread(target=garbage, args=(port, h, hostile_stop), daemon=True),
               threading.Thread(target=oversized, args=(port, h, hostile_stop), daemon=True),
               threading.Thread(target=forger, args=(port, index, store, ledger, sent, h, node_objects, hostile_stop),
                                daemon=True)]
    t0 = time.monotonic()
    for t in good + hostile:
        t.start()
    end = t0 + args.minutes * 60
    while time.monotonic() < end and node.poll() is None:
        time.sleep(min(15.0, max(end - time.monotonic(), 0)))
        log(f"{time.monotonic() - t0:.0f} s: {len(ledger.acked)} acknowledged, {sum(h.counts.values())} hostile "
            f"events, node RSS {sampler.samples[-1] if sampler.samples else 0:.0f} MB")
    hostile_stop.set()
    stop.set()
    for t in good + hostile:
        t.join(timeout=120)
    elapsed = time.monotonic() - t0
    alive = node.poll() is None
    time.sleep(3)  # let the last drafts land before the node objects are checked
    with contextlib.suppress(sqlite3.Error):
        for sop, path, sha in index.query("SELECT sop_instance_uid, path, sha256 FROM instances WHERE generated = 1"):
            node_objects.setdefault(sop, (path, sha))
    result = verify(index, store, ledger, node_objects)
    drafts = index.query("SELECT count(*) FROM drafts")[0][0]
    refused_audits = index.query("SELECT count(*) FROM audit_events WHERE action = 'store-refused'")[0][0]
    sampler_stop.set()
    sampler.join()
    node.terminate()
    try:
        exit_code = node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        node.kill()
        exit_code = node.wait()
    serve_log = (workdir / "serve.log").read_text(errors="replace")
    rss = sampler.samples or [0.0]
    good_refused = sum(v for k, v in ledger.statuses.items() if k != "0x0000")
    out = {
        "benchmark": "cxrnode soak: good traffic + hostile clients on loopback",
        "minutes": round(elapsed / 60, 2),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "node_config": CONFIG,
        "good": {"senders": args.senders, "stored": len(ledger.acked), "refused": good_refused,
                 "statuses": dict(ledger.statuses), "errors": dict(ledger.errors), "drafts_written": drafts},
        "hostile": dict(sorted(h.counts.items())),
        "half_open_max_held_s": round(h.max_half_open_held_s, 2),
        "refusals_audited": refused_audits,
        **result,
        "node_alive_at_end": alive,
        "node_exit_code": exit_code,
        "rss_mb": {"min": round(min(rss), 1), "max": round(max(rss), 1), "first": round(rss[0], 1),
                   "last": round(rss[-1], 1), "samples": len(rss)},
        "patient_name_in_log": PATIENT_NAME in serve_log or PATIENT_ID in serve_log,
        "log_lines": serve_log.count("\n"),
    }
    print(json.dumps(out, indent=2))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = (result["acknowledged_lost"] == 0 and result["node_objects_altered"] == 0 and alive
          and not out["patient_name_in_log"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
