"""The node: one object that runs the Storage SCP, the quiet-study promoter, the job workers
and the outbound sender against one store and one index database.

``Node(config, job_handler=None)``: ``start()`` migrates the database (Alembic; on PostgreSQL
under the advisory lock of :func:`dicom_node.db.migrate_locked`; ``migrate_schema=False`` leaves
the schema to ``cxrnode migrate``, as ``cxrnode serve`` does on PostgreSQL), removes this host's
spool files left by a crash, binds the SCP (``.port`` is the bound port; config port 0 =
ephemeral) and starts the threads; ``stop()`` stops accepting associations, lets in-flight
ones finish (up to ``node.network_timeout_s``), then stops the threads (a job in progress is
given up to ``grace_s`` to finish; otherwise its lease expires and it is reclaimed later).
Without ``job_handler`` workers use the ``draft`` entry point of ``cxrnode.job_handlers``.
With ``node.health_port`` set, ``start()`` also serves ``/healthz`` and ``/metrics``
(:mod:`dicom_node.health`) once everything else runs, and ``stop()`` stops that first;
``model`` names the bundle the caller loaded for the workers (what ``/healthz`` reports).

Roles: ``role="serve"`` (``cxrnode serve``) runs the SCP, the promoter, ``jobs.workers`` drafting
threads and the outbound sender; ``role="worker"`` (``cxrnode worker``, any number on any host
sharing the PostgreSQL index and the storage folder) runs only drafting threads and the outbound
sender (jobs and transfers are claimed in the database, so several processes never take the same
one). The promoter stays with ``serve``: studies arrive only there and the SCP wakes it at once.

Whatever the umask it inherits (``cxrnode serve`` outside the systemd unit), the node gives
others no access to what it creates or holds: it sets the process umask to the inherited one
plus ``027`` (folders 0750, the SQLite index 0640) and takes the "other" bits off the storage
folder, its spool folder and the SQLite files. In the installed layout (a setgid storage
folder, group = the service and the reviewers on this machine) the group keeps write access
(umask plus ``007``: folders 2770, the index 0660), which the desktop reviewer needs to sign.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from dicom_node.config import Config
from dicom_node.db import make_engine, migrate_locked, session_factory
from dicom_node.health import HealthServer
from dicom_node.jobs import JobHandler, Promoter, Worker
from dicom_node.outbound import Sender
from dicom_node.scp import StorageSCP
from dicom_node.scu import OutboundSender
from dicom_node.store import Store

log = logging.getLogger(__name__)

WORKER_SPOOL_STALE_S = 3600.0  # a worker's spool file untouched this long is a crash's leftover


def shared_with_group(storage_dir: str | os.PathLike[str]) -> bool:
    """True for the installed layout: a storage folder with the setgid bit (group = the service
    and the reviewers on this machine)."""
    try:
        return bool(os.stat(storage_dir).st_mode & stat.S_ISGID)
    except OSError:
        return False


def private_umask(inherited: int, shared: bool) -> int:
    """The umask the node runs with: never any access for others; group write only if shared."""
    return inherited | (0o007 if shared else 0o027)


def restrict_path(path: Path, shared: bool, folder: bool) -> None:
    """Take the access of others off ``path`` (and group write unless shared; a shared SQLite
    file gets group read-write); only for paths this process owns, never through a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    mode = stat.S_IMODE(st.st_mode)
    want = mode & ~(0o007 if shared else 0o027)
    if shared and not folder:
        want |= 0o060
    if want != mode:
        os.chmod(path, want)
        log.info("%s: mode %04o -> %04o (no access for others)", path, mode, want)


class Node:
    """The running node (see the module docstring): ``start()``, ``stop(grace_s)``, ``.port``.

    Parameters
    ----------
    config:
        The validated configuration.
    job_handler:
        The ``draft`` job handler; by default the ``cxrnode.job_handlers`` entry point.
    sender:
        How transfers are sent (default :func:`dicom_node.scu.send_file`); tests pass their own.
    migrate_schema:
        Migrate the database at start (``False``: ``cxrnode migrate`` does it).
    role:
        ``"serve"`` (SCP, promoter, workers, sender) or ``"worker"`` (workers and sender).
    workers:
        Override ``jobs.workers``.
    model:
        The model bundle the workers loaded before start (reported by ``/healthz``).

    Raises
    ------
    ValueError
        An unknown ``role``.
    """

    def __init__(self, config: Config, job_handler: JobHandler | None = None, sender: Sender | None = None,
                 migrate_schema: bool = True, role: str = "serve", workers: int | None = None,
                 model: str | None = None) -> None:
        if role not in ("serve", "worker"):
            raise ValueError(f"role: expected 'serve' or 'worker', got {role!r}")
        self.config = config
        self.migrate_schema = migrate_schema  # False: the schema is someone else's (cxrnode migrate)
        self.role = role
        # serve: jobs.workers threads (0 = none); worker: at least one
        self.workers = workers if workers is not None else (
            config.jobs.workers if role == "serve" else max(1, config.jobs.workers))
        self.job_handler = job_handler
        self.sender = sender
        self.model = model  # the bundle loaded for the workers before start (reported by /healthz)
        self.health: HealthServer | None = None
        self._shared = shared_with_group(config.node.storage_dir)
        self._umask_before: int | None = None  # the inherited umask while the node runs
        before = os.umask(0o077)
        try:
            os.umask(private_umask(before, self._shared))
            # worker processes (any number on one host) write their SRs through tmp/<host id>/workers
            self.store = Store(config.node.storage_dir, fsync=config.node.fsync,
                               min_free_space_mb=config.node.min_free_space_mb, host_id=config.node.host_id,
                               spool_subdir="workers" if role == "worker" else "")
        finally:
            os.umask(before)
        self.engine: Engine | None = None
        self.sessions: sessionmaker | None = None
        self.scp: StorageSCP | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the promoter queued a job: idle workers claim it now
        self._received = threading.Event()  # the SCP stored an instance: the promoter re-plans
        self._threads: list[threading.Thread] = []
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the node is not started")
        return self._port

    def start(self) -> Node:
        url = self.config.node.resolved_database_url()
        if self._umask_before is None:  # process-wide, from start() to stop()
            self._umask_before = os.umask(0o077)
            os.umask(private_umask(self._umask_before, self._shared))
        # this host's spool only: other hosts may be receiving. Workers share one folder per host,
        # so a worker removes only files untouched for an hour (an SR is written in milliseconds)
        removed = self.store.clean_spool(older_than_s=WORKER_SPOOL_STALE_S if self.role == "worker" else 0.0)
        if removed:
            log.warning("removed %d incomplete spool file(s) left by an earlier run on host %r", removed,
                        self.store.host_id)
        if self.migrate_schema:
            migrate_locked(url)
        self._restrict(url)
        self.engine = make_engine(url)
        self.sessions = session_factory(self.engine)
        self._stop.clear()
        self._threads = []
        if self.role == "serve":
            # the promoter stays with the receiver: studies arrive only here, and the SCP wakes it
            self.scp = StorageSCP(self.config, self.store, self.sessions, on_stored=lambda _uid: self._received.set())
            self._port = self.scp.start()
            self._threads.append(Promoter(self.config, self.sessions, self._stop, wake=self._wake,
                                          received=self._received))
            if self.config.priors.enabled:  # priors fetched for comparison are kept priors.retention_days
                from dicom_node.priors import PriorPruner

                self._threads.append(PriorPruner(self.config, self.sessions, self.store, self._stop))
        self._threads += [
            Worker(self.config, self.sessions, self.store, self._stop, handler=self.job_handler, index=i,
                   wake=self._wake)
            for i in range(self.workers)
        ]
        self._threads.append(OutboundSender(self.config, self.sessions, self.store, self._stop, send=self.sender))
        for t in self._threads:
            t.start()
        if self.config.node.health_port:
            self.health = HealthServer(
                self.config, role=self.role, host_id=self.store.host_id, workers=self.workers, model=self.model,
                threads=lambda: list(self._threads),
                scp_stats=lambda: self.scp.stats if self.scp is not None else None).start()
        if self.role == "serve":
            log.info("node %s started: port %d, %d worker(s), %d destination(s)", self.config.node.ae_title,
                     self._port, self.workers, len(self.config.destinations))
        else:
            log.info("worker started on host %r: %d worker thread(s), %d destination(s)", self.store.host_id,
                     self.workers, len(self.config.destinations))
        return self

    def _restrict(self, url: str) -> None:
        """No access for others on the storage folder, the spool and the SQLite index, also when
        an earlier run (or another umask) created them open."""
        restrict_path(self.store.root, self._shared, folder=True)
        restrict_path(self.store.spool_root, self._shared, folder=True)
        restrict_path(self.store.host_spool, self._shared, folder=True)
        restrict_path(self.store.tmp_dir, self._shared, folder=True)
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///"))
            for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                restrict_path(p, self._shared, folder=False)

    def stop(self, grace_s: float | None = None) -> None:
        if self.health is not None:  # probes fail from now on: no new work is routed here
            self.health.stop()
            self.health = None
        if self.scp is not None:
            self.scp.stop(grace_s)
            self.scp = None
        self._stop.set()
        self._wake.set()
        self._received.set()
        for t in self._threads:
            t.join(timeout=grace_s if grace_s is not None else 30.0)
            if t.is_alive():
                log.warning("%s still busy at shutdown; its job will be reclaimed after the lease", t.name)
        self._threads = []
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None
        if self._umask_before is not None:
            os.umask(self._umask_before)
            self._umask_before = None
        log.info("node stopped")

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
