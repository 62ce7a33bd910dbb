"""The health and metrics endpoint of ``cxrnode serve`` and ``cxrnode worker``
(``--health-port N`` or ``node.health_port``; ``node.health_host``, default ``127.0.0.1``).

A small HTTP server (:class:`http.server.ThreadingHTTPServer`) in daemon threads answers:

``GET /healthz``
    ``200`` with a JSON object when every check that applies passes, else ``503`` with the
    failing checks named (``"failing": [...]``)::

        {"status": "ok"|"fail", "role": "serve"|"worker", "host_id": str,
         "checks": {"process":  {"ok": bool, "detail": str},   # the node's threads are running
                    "database": {"ok": bool, "detail": str},   # SELECT 1 answered within db_timeout_s
                    "model":    {"ok": bool, "detail": str}},  # the model bundle is loaded
         "not_applicable": {"model": "<why>"},                 # serve with jobs.workers = 0
         "failing": [name, ...]}

    ``model`` applies to ``cxrnode worker`` and to a ``serve`` that drafts (``jobs.workers > 0``);
    it passes when the bundle was loaded (and one tiny generation run) before the node started.
``GET /livez``
    The ``process`` check alone (``200``/``503``, same JSON shape): for a liveness probe, which
    should not restart a process because the database is down (``/healthz`` is the readiness).
``GET /metrics``
    Prometheus text (OpenMetrics when the scraper asks for it), made by ``prometheus_client`` from
    a registry of this server's own:

    - this process (the Storage SCP of ``serve``; 0 on a worker):
      ``cxrnode_received_instances_total`` (C-STOREs answered with success),
      ``cxrnode_refused_instances_total`` (answered with a failure status),
      ``cxrnode_associations_total``, ``cxrnode_refused_associations_total``,
      ``cxrnode_info{role, host_id, version}``, ``cxrnode_database_up`` (the queries below
      answered), and the library's ``process_*`` metrics;
    - the index database, the same from every process (alert on one scrape target, or aggregate
      with ``max``): the metrics of ``cxrnode status --prometheus`` (queue depth by job state,
      drafts waiting for review, outbound transfers waiting and failed per destination, ages; see
      :mod:`dicom_node.ops`, which owns those figures) and ``cxrnode_job_duration_seconds``.

Labels carry states, destination names, the role and the host id: never patient names or IDs.

Every socket read has a timeout (``request_timeout_s``, per connection), at most
``max_connections`` requests are served at once (others are closed at once), and the database
is asked on a connection of its own (PostgreSQL: ``connect_timeout`` and ``statement_timeout``) in
one background thread per kind of question, so a database that hangs makes ``/healthz`` answer
``503`` in ``db_timeout_s`` instead of hanging the probe.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from dicom_node.config import Config

log = logging.getLogger(__name__)

T = TypeVar("T")

@dataclass(frozen=True)
class Check:
    """One check of ``/healthz``: its ``name``, whether it passed and a short ``detail``."""

    name: str
    ok: bool
    detail: str


class _OneAtATime:
    """Runs a function in a daemon thread and waits for it at most ``timeout`` seconds; callers
    that come while it still runs wait for that same run (a hung database ties up one thread,
    not one per probe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._box: dict[str, Any] = {}

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                box: dict[str, Any] = {}

                def target() -> None:
                    try:
                        box["value"] = fn()
                    except BaseException as exc:  # handed to the caller
                        box["error"] = exc

                self._box = box
                self._thread = threading.Thread(target=target, name=self.name, daemon=True)
                self._thread.start()
            thread, box = self._thread, self._box
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"no answer within {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cxrnode")
    except Exception:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class HealthServer:
    """The ``/healthz`` and ``/metrics`` server of one node process.

    Parameters
    ----------
    config:
        The node's configuration.
    role:
        ``"serve"`` or ``"worker"``.
    host_id:
        This host's name in the reports.
    workers:
        Drafting threads in this process (0: the model check does not apply).
    model:
        The bundle loaded before start (``None``: not loaded).
    threads:
        ``threads()``: the node's threads (all must be alive).
    scp_stats:
        ``scp_stats()``: the Storage SCP's counters (``None`` without an SCP).
    host, port:
        Default to ``node.health_host`` / ``node.health_port`` (port 0 = ephemeral, for tests).
    db_timeout_s, metrics_timeout_s, request_timeout_s:
        Time limits of the database check, of collecting metrics and of one request.
    max_connections:
        Requests served at once (more are refused).
    """

    def __init__(self, config: Config, *, role: str, host_id: str, workers: int, model: str | None,
                 threads: Callable[[], list[threading.Thread]] = list,
                 scp_stats: Callable[[], Any] = lambda: None,
                 host: str | None = None, port: int | None = None, db_timeout_s: float = 2.0,
                 metrics_timeout_s: float = 10.0, request_timeout_s: float = 5.0, max_connections: int = 8) -> None:
        self.config, self.role, self.host_id, self.workers, self.model = config, role, host_id, workers, model
        self.threads, self.scp_stats = threads, scp_stats
        self.host = config.node.health_host if host is None else host
        self._want_port = config.node.health_port if port is None else port
        self.db_timeout_s, self.metrics_timeout_s = db_timeout_s, metrics_timeout_s
        self.request_timeout_s, self.max_connections = request_timeout_s, max_connections
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()
        self._ping = _OneAtATime("cxrnode-health-db")
        self._figures = _OneAtATime("cxrnode-metrics-db")
        self._last_failing: list[str] = []  # what the last /healthz said failed (logged when it changes)
        self._figures_failed = False  # the last scrape's database queries failed (logged when it changes)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_NodeCollector(self))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- the database, on connections of its own ----------------------------------------------
    def engine(self) -> Engine:
        with self._engine_lock:
            if self._engine is None:
                from dicom_node.db import make_engine

                url = self.config.node.resolved_database_url()
                if url.startswith("postgresql"):
                    ms = int(self.metrics_timeout_s * 1000)
                    args: dict[str, Any] = {"connect_timeout": max(2, math.ceil(self.db_timeout_s)),
                                            "options": f"-c statement_timeout={ms}"}
                elif url.startswith("sqlite"):
                    args = {"timeout": self.db_timeout_s, "check_same_thread": False}
                else:
                    args = {}
                self._engine = make_engine(url, poolclass=NullPool, connect_args=args)
            return self._engine

    def _select_1(self) -> float:
        started = time.monotonic()
        with self.engine().connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
        return (time.monotonic() - started) * 1000

    # -- /healthz -----------------------------------------------------------------------------
    def process_check(self) -> Check:
        """The node's threads are all running."""
        threads = self.threads()
        stopped = [t.name for t in threads if not t.is_alive()]
        return Check("process", not stopped, f"thread(s) stopped: {', '.join(stopped)}" if stopped
                     else f"{self.role} running, {len(threads)} thread(s) alive")

    def checks(self) -> tuple[list[Check], dict[str, str]]:
        """The checks that apply to this process, and why the others do not."""
        done: list[Check] = [self.process_check()]
        try:
            ms = self._ping.run(self._select_1, self.db_timeout_s)
            done.append(Check("database", True, f"SELECT 1 answered in {ms:.0f} ms"))
        except Exception as exc:
            done.append(Check("database", False, f"SELECT 1 failed: {_first_line(exc)}"))
        skipped: dict[str, str] = {}
        if self.workers > 0:
            done.append(Check("model", self.model is not None,
                              f"bundle {self.model!r} loaded" if self.model is not None
                              else "no model bundle was loaded for this process's drafting threads"))
        else:
            skipped["model"] = "jobs.workers = 0: this serve drafts nothing (workers run elsewhere)"
        return done, skipped

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """``(HTTP status, JSON body)`` of ``/healthz``."""
        done, skipped = self.checks()
        failing = [c.name for c in done if not c.ok]
        body = {
            "status": "fail" if failing else "ok", "role": self.role, "host_id": self.host_id,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in done},
            "not_applicable": skipped, "failing": failing,
        }
        if failing != self._last_failing:  # a change, not every probe
            if failing:
                log.warning("health check failing: %s", "; ".join(f"{c.name}: {c.detail}" for c in done if not c.ok))
            else:
                log.info("health checks pass again")
            self._last_failing = failing
        return (503 if failing else 200), body

    # -- /metrics -----------------------------------------------------------------------------
    def database_figures(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The status figures (:mod:`dicom_node.ops`) and job durations, by the database's clock."""
        from dicom_node.db import db_utcnow
        from dicom_node.ops import job_durations, queue_summary, status_counts

        def query() -> tuple[dict[str, Any], dict[str, Any]]:
            from sqlalchemy.orm import Session

            with Session(self.engine()) as s:
                now = db_utcnow(s)
                report = {"counts": status_counts(s), "queue": queue_summary(s, self.config, now=now),
                          "generated_at": now.replace(microsecond=0).isoformat() + "Z"}
                return report, job_durations(s)

        return self._figures.run(query, self.metrics_timeout_s)

    def database_figures_or_none(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """:meth:`database_figures`, or ``None`` when the database did not answer in time."""
        try:
            figures = self.database_figures()
        except Exception as exc:
            if not self._figures_failed:
                log.warning("metrics: the index database did not answer: %s", _first_line(exc))
            self._figures_failed = True
            return None
        self._figures_failed = False
        return figures

    def metrics(self, accept: str = "") -> tuple[bytes, str]:
        """``(body, content type)`` of ``/metrics``."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # -- the server ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the health server is not started")
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Bind and serve in a daemon thread; a port that cannot be bound is a
        :class:`~dicom_node.startup.StartupError` naming ``node.health_port``."""
        from dicom_node.startup import health_port_error

        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self._want_port), _Handler, self)
        except OSError as exc:
            raise health_port_error(self.config, exc) from exc
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="cxrnode-health", daemon=True)
        self._thread.start()
        log.info("health and metrics on http://%s:%d (/healthz, /metrics)", self.host, self.port)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


class _NodeCollector:
    """This process's counters and the database's figures, gathered at each scrape."""

    def __init__(self, health: HealthServer) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        h = self.health
        info = InfoMetricFamily("cxrnode", "This cxrnode process")
        info.add_metric([], {"role": h.role, "host_id": h.host_id, "version": _version()})
        yield info
        stats = h.scp_stats()
        for name, attr, doc in (
            ("cxrnode_received_instances", "stored", "Instances this process's Storage SCP stored (C-STORE success)"),
            ("cxrnode_refused_instances", "failed", "C-STOREs this process's Storage SCP answered with a failure status"),
            ("cxrnode_associations", "associations", "Associations this process's Storage SCP accepted"),
            ("cxrnode_refused_associations", "rejected_associations",
             "Associations this process's Storage SCP rejected (AE title or network not allowed)"),
        ):
            yield CounterMetricFamily(name, doc, value=float(getattr(stats, attr, 0) if stats is not None else 0))
        figures = h.database_figures_or_none()
        up = GaugeMetricFamily("cxrnode_database_up", "1 when the index database answered this scrape's queries")
        up.add_metric([], 0.0 if figures is None else 1.0)
        yield up
        if figures is not None:  # no figures rather than stale ones
            from dicom_node.ops import status_registry

            yield from status_registry(*figures).collect()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], health: HealthServer) -> None:
        self.health = health
        self._slots = threading.BoundedSemaphore(health.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):  # too many at once: close, do not queue
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "cxrnode-health"
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.health.request_timeout_s)  # every read of this connection

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        health = self.server.health
        if path == "/healthz":
            code, body = health.healthz()
            self._send(code, (json.dumps(body) + "\n").encode(), "application/json")
        elif path == "/livez":  # the process only: a liveness probe must not restart it for a database outage
            check = health.process_check()
            live = {"status": "ok" if check.ok else "fail", "checks": {"process": {"ok": check.ok, "detail": check.detail}}}
            self._send(200 if check.ok else 503, (json.dumps(live) + "\n").encode(), "application/json")
        elif path == "/metrics":
            data, content_type = health.metrics(self.headers.get("Accept", ""))
            self._send(200, data, content_type)
        else:
            self._send(404, b'{"error": "not found: /healthz, /livez or /metrics"}\n', "application/json")

    def _send(self, code: int, data: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("health: %s %s", self.address_string(), format % args)
