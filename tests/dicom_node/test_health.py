"""``/healthz`` and ``/metrics`` of ``cxrnode serve`` and ``cxrnode worker`` (issue 16): real
processes on a real PostgreSQL, real associations on loopback, real HTTP; a database that hangs
or is gone, a model not loaded, a dead thread, slow and idle clients."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dcmnode_helpers import PATIENT_ID, PATIENT_NAME, make_instance, wait_for
from node_config import node_sections, write_config
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from support.postgres import private_database

from dicom_node.config import ConfigError
from dicom_node.health import HealthServer
from dicom_node.startup import EXIT_HEALTH_PORT

CXRNODE = [sys.executable, "-m", "installer"]


def get(url: str, timeout: float = 30.0) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    code, body, ctype = get(f"http://127.0.0.1:{port}/healthz")
    assert ctype == "application/json"
    return code, json.loads(body)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metrics(port: int) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    code, body, ctype = get(f"http://127.0.0.1:{port}/metrics")
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype)
    text = body.decode()
    return text, samples(text)


class Proc:
    """A ``cxrnode`` subprocess, ready once its stderr shows ``ready``; stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path, ready: str) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([*CXRNODE, *args], stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: self._ready(ready), timeout=240, interval=0.1)

    def _ready(self, text_: str) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return text_ in self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def send(port: int, files: list[Path], calling: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture
def pg_database() -> Iterator[str]:
    with private_database("health") as url:
        yield url


# -- the real processes ------------------------------------------------------------------------


@pytest.mark.postgres
def test_serve_and_worker_answer_healthz_and_metrics(pg_database: str, tmp_path: Path, free_port: Any) -> None:
    scp_port, serve_health, worker_health = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(
        tmp_path, node={"database_url": pg_database, "port": scp_port},
        security={"allowed_calling_ae_titles": ["MODALITY"]},
        jobs={"workers": 0, "poll_interval_s": 0.2}, study={"quiet_period_s": 1.0}))
    assert subprocess.run([*CXRNODE, "migrate", "--config", str(cfg)], capture_output=True, timeout=180).returncode == 0
    serve = Proc(["serve", "--config", str(cfg), "--health-port", str(serve_health), "--set", 'node.host_id="rx"'],
                 tmp_path / "serve.log", "cxrnode: CXRNODE listening on")  # the ready line, not the SCP log
    worker: Proc | None = None
    try:
        # serve with jobs.workers = 0: alive, database answers; the model does not apply
        code, body = healthz(serve_health)
        assert code == 200 and body["status"] == "ok" and body["role"] == "serve" and body["host_id"] == "rx", body
        assert set(body["checks"]) == {"process", "database"} and body["failing"] == []
        assert "jobs.workers = 0" in body["not_applicable"]["model"]
        assert body["checks"]["database"]["detail"].startswith("SELECT 1 answered in")

        # one study in; the same SOP Instance UID with other content refused (0xC214); a calling
        # AE title that is not allowed: association rejected
        study = generate_uid()
        sop = generate_uid()
        first = make_instance(tmp_path / "in" / "1.dcm", study, sop_uid=sop, ViewPosition="PA")
        clash = make_instance(tmp_path / "in" / "2.dcm", study, sop_uid=sop, ViewPosition="PA",
                              StudyDescription="other content")
        assert send(scp_port, [first, clash]) == [0x0000, 0xC214]
        assert send(scp_port, [first], calling="INTRUDER") == []

        def pending_job() -> dict[Any, float] | None:
            m = metrics(serve_health)[1]
            return m if m[("cxrnode_jobs", (("state", "pending"),))] == 1 else None

        m = wait_for(pending_job, timeout=60, interval=0.3)  # quiet: queued, nobody drafts it yet
        read_at = time.monotonic()
        assert m[("cxrnode_received_instances_total", ())] == 1
        assert m[("cxrnode_refused_instances_total", ())] == 1
        assert m[("cxrnode_refused_associations_total", ())] == 1
        assert m[("cxrnode_database_up", ())] == 1
        assert m[("cxrnode_info", (("host_id", "rx"), ("role", "serve"), ("version", _version())))] == 1
        assert m[("cxrnode_job_duration_seconds_count", ())] == 0
        assert m[("cxrnode_drafts_waiting_review", ())] == 0

        # one owner for each number: `cxrnode status --prometheus -` says the same
        status = subprocess.run([*CXRNODE, "status", "--config", str(cfg), "--prometheus", "-"],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        from_status = samples(status.stdout)
        shared = {k: v for k, v in from_status.items() if k[0] != "cxrnode_status_generated_timestamp_seconds"}
        between = time.monotonic() - read_at + 1.0
        assert len(shared) >= 10
        for k, v in shared.items():  # ages move on between the two reads
            assert abs(m[k] - v) <= (between if k[0].endswith("_age_seconds") else 0.0), (k, v, m[k], between)

        # a worker (another process, its own health port) loads the model and drafts the study
        worker = Proc(["worker", "--config", str(cfg), "--threads", "1", "--health-port", str(worker_health),
                       "--set", 'node.host_id="gpu1"'], tmp_path / "worker.log", "drafting thread(s)")
        code, body = healthz(worker_health)
        assert code == 200 and body["role"] == "worker" and body["not_applicable"] == {}, body
        assert set(body["checks"]) == {"process", "database", "model"}
        assert body["checks"]["model"] == {"ok": True, "detail": "bundle 'default' loaded"}

        def finished() -> tuple[str, dict[Any, float]] | None:
            text, m = metrics(worker_health)
            return (text, m) if m[("cxrnode_job_duration_seconds_count", ())] == 1 else None

        text, m = wait_for(finished, timeout=240, interval=0.5)
        assert m[("cxrnode_jobs", (("state", "pending"),))] == 0
        assert m[("cxrnode_jobs", (("state", "done"),))] + m[("cxrnode_jobs", (("state", "skipped"),))] == 1
        assert m[("cxrnode_job_duration_seconds_bucket", (("le", "+Inf"),))] == 1
        assert m[("cxrnode_job_duration_seconds_sum", ())] > 0
        assert m[("cxrnode_received_instances_total", ())] == 0  # a worker has no SCP
        # the database-wide figures are the same from both processes
        serve_text, sm = metrics(serve_health)
        for key in (("cxrnode_jobs", (("state", "done"),)), ("cxrnode_drafts_waiting_review", ()),
                    ("cxrnode_job_duration_seconds_count", ())):
            assert sm[key] == m[key], key
        for out in (text, serve_text):  # no patient names or IDs, only states, names and UIDs
            assert PATIENT_NAME not in out and PATIENT_ID not in out and "Secret" not in out
        assert get(f"http://127.0.0.1:{serve_health}/nothing")[0] == 404
    finally:
        codes = [p.stop() for p in ([worker] if worker else []) + [serve]]
    assert codes == [0] * len(codes), [p.log.read_text()[-2000:] for p in ([worker] if worker else []) + [serve]]
    with pytest.raises(OSError):  # stopped with the node
        socket.create_connection(("127.0.0.1", serve_health), timeout=2).close()
    for log in (tmp_path / "serve.log", tmp_path / "worker.log"):
        assert PATIENT_NAME not in log.read_text() and PATIENT_ID not in log.read_text()


def _version() -> str:
    from importlib.metadata import version

    return version("cxrnode")


def test_a_health_port_in_use_stops_serve_with_one_line(tmp_path: Path, free_port: Any) -> None:
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path, jobs={"workers": 0}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([*CXRNODE, "serve", "--config", str(cfg), "--health-port", str(port)],
                           capture_output=True, text=True, timeout=180)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == EXIT_HEALTH_PORT == 8, r.stderr
    assert len(lines) == 1 and lines[0] == (
        f"cxrnode serve: node.health_port: 127.0.0.1:{port} is already in use; stop the other program "
        f"(see: ss -ltnp 'sport = :{port}') or choose another node.health_port (--health-port) (exit 8)")


def test_health_port_is_a_checked_key(make_config: Any) -> None:
    assert make_config().node.health_port == 0 and make_config().node.health_host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"^node.health_port: expected a number between 0 and 65535"):
        make_config(node={"health_port": 70000})
    from dicom_node.cli import build_parser, config_from_args

    args = build_parser().parse_args(["worker", "--set", "node.health_port=1", "--health-port", "9464",
                                      "--set", 'node.storage_dir="/tmp/x"'])
    assert config_from_args(args).node.health_port == 9464  # the flag wins, like --set


# -- the checks, one by one, in this process ---------------------------------------------------


@pytest.fixture
def serve_health() -> Iterator[Any]:
    servers: list[HealthServer] = []

    def start(config: Any, **kwargs: Any) -> HealthServer:
        kwargs.setdefault("role", "serve")
        kwargs.setdefault("host_id", "h1")
        kwargs.setdefault("workers", 0)
        kwargs.setdefault("model", None)
        h = HealthServer(config, host="127.0.0.1", port=0, **kwargs).start()
        servers.append(h)
        return h

    yield start
    for h in servers:
        h.stop()


class _SilentPeer:
    """A TCP listener that accepts and never says a word: a database that hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


def test_healthz_on_sqlite_is_ok(make_config: Any, serve_health: Any) -> None:
    from dicom_node.db import migrate

    config = make_config()
    migrate(config.node.resolved_database_url())
    alive = threading.Thread(target=time.sleep, args=(30,), daemon=True)
    alive.start()
    h = serve_health(config, threads=lambda: [alive])
    code, body = healthz(h.port)
    assert code == 200 and body["failing"] == [] and body["checks"]["process"]["ok"], body
    text, m = metrics(h.port)
    assert m[("cxrnode_database_up", ())] == 1 and ("cxrnode_jobs", (("state", "failed"),)) in m
    assert "process_cpu_seconds_total" in text  # the library's process collector, in our own registry
    from prometheus_client import REGISTRY, generate_latest

    assert b"cxrnode_" not in generate_latest(REGISTRY), "cxrnode metrics leaked into the global registry"


def test_a_database_that_hangs_fails_healthz_in_time(make_config: Any, serve_health: Any) -> None:
    peer = _SilentPeer()
    try:
        config = make_config(node={"database_url": f"postgresql+psycopg://cxrnode@127.0.0.1:{peer.port}/cxrnode"})
        h = serve_health(config, db_timeout_s=1.0, metrics_timeout_s=1.0)
        for _ in range(2):  # the second probe waits for the same stuck attempt, not a new one
            started = time.monotonic()
            code, body = healthz(h.port)
            took = time.monotonic() - started
            assert code == 503 and body["status"] == "fail" and body["failing"] == ["database"], body
            assert "no answer within 1 s" in body["checks"]["database"]["detail"] or "timeout" in \
                body["checks"]["database"]["detail"].lower(), body
            assert took < 5.0, f"/healthz took {took:.1f} s with a hung database"
        code, live, _ = get(f"http://127.0.0.1:{h.port}/livez")  # liveness: the process is fine
        assert code == 200 and json.loads(live)["status"] == "ok"
        started = time.monotonic()
        _text, m = metrics(h.port)
        assert m[("cxrnode_database_up", ())] == 0 and time.monotonic() - started < 5.0
        assert ("cxrnode_jobs", (("state", "pending"),)) not in m  # no figures rather than stale ones
    finally:
        peer.close()


def test_a_database_that_is_gone_fails_healthz(make_config: Any, serve_health: Any, free_port: Any) -> None:
    config = make_config(node={"database_url": f"postgresql+psycopg://cxrnode@127.0.0.1:{free_port()}/cxrnode"})
    code, body = healthz(serve_health(config).port)
    assert code == 503 and body["failing"] == ["database"]
    assert body["checks"]["database"]["detail"].startswith("SELECT 1 failed: OperationalError"), body


def test_a_model_not_loaded_and_a_dead_thread_fail_healthz(make_config: Any, serve_health: Any) -> None:
    from dicom_node.db import migrate

    config = make_config()
    migrate(config.node.resolved_database_url())
    dead = threading.Thread(target=lambda: None, name="cxrnode-worker-0")
    dead.start()
    dead.join()
    h = serve_health(config, workers=1, model=None, threads=lambda: [dead])
    code, body = healthz(h.port)
    assert code == 503 and body["failing"] == ["process", "model"], body
    assert body["checks"]["process"]["detail"] == "thread(s) stopped: cxrnode-worker-0"
    assert body["checks"]["model"]["detail"] == "no model bundle was loaded for this process's drafting threads"
    code, raw, _ = get(f"http://127.0.0.1:{h.port}/livez")
    assert code == 503 and json.loads(raw)["checks"]["process"]["detail"] == "thread(s) stopped: cxrnode-worker-0"
    ok = serve_health(config, role="worker", workers=2, model="default", threads=lambda: [])
    code, body = healthz(ok.port)
    assert code == 200 and body["checks"]["model"]["detail"] == "bundle 'default' loaded"


def test_every_read_has_a_timeout_and_idle_clients_cannot_crowd_it_out(make_config: Any, serve_health: Any) -> None:
    from dicom_node.db import migrate

    config = make_config()
    migrate(config.node.resolved_database_url())
    h = serve_health(config, request_timeout_s=0.5, max_connections=2)
    idle = [socket.create_connection(("127.0.0.1", h.port), timeout=10) for _ in range(2)]
    idle[1].sendall(b"GET /hea")  # half a request line, then nothing
    time.sleep(0.1)
    extra = socket.create_connection(("127.0.0.1", h.port), timeout=10)
    started = time.monotonic()
    assert extra.recv(1) == b"" and time.monotonic() - started < 2.0  # over the limit: closed at once
    extra.close()
    for s in idle:  # each closed by the server once its read timed out
        started = time.monotonic()
        s.recv(1024)
        assert time.monotonic() - started < 5.0
        s.close()
    wait_for(lambda: get(f"http://127.0.0.1:{h.port}/healthz")[0] == 200, timeout=10)


def test_the_health_server_binds_where_it_is_told(make_config: Any, free_port: Any) -> None:
    """``node.health_host`` decides the address: 127.0.0.1 answers, another local address does not."""
    from dicom_node.db import migrate

    port = free_port()
    config = make_config(node={"health_port": port, "health_host": "127.0.0.2"})
    migrate(config.node.resolved_database_url())
    h = HealthServer(config, role="serve", host_id="h", workers=0, model=None).start()
    try:
        assert h.port == port
        assert get(f"http://127.0.0.2:{port}/healthz")[0] == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        h.stop()
