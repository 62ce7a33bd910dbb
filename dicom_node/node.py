"""The node: one object that runs the Storage SCP, the quiet-study promoter, the job workers
and the outbound sender against one store and one index database.

``Node(config, job_handler=None)``: ``start()`` migrates the database (Alembic), removes
spool files left by a crash, binds the SCP (``.port`` is the bound port; config port 0 =
ephemeral) and starts the threads; ``stop()`` stops accepting associations, lets in-flight
ones finish (up to ``node.network_timeout_s``), then stops the threads (a job in progress is
given up to ``grace_s`` to finish; otherwise its lease expires and it is reclaimed later).
Without ``job_handler`` workers use the ``draft`` entry point of ``cxrnode.job_handlers``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from dicom_node.config import Config
from dicom_node.db import make_engine, migrate, session_factory
from dicom_node.jobs import JobHandler, Promoter, Worker
from dicom_node.outbound import Sender
from dicom_node.scp import StorageSCP
from dicom_node.scu import OutboundSender
from dicom_node.store import Store

log = logging.getLogger(__name__)


class Node:
    def __init__(self, config: Config, job_handler: JobHandler | None = None, sender: Sender | None = None) -> None:
        self.config = config
        self.job_handler = job_handler
        self.sender = sender
        self.store = Store(config.node.storage_dir, fsync=config.node.fsync,
                           min_free_space_mb=config.node.min_free_space_mb)
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
        removed = self.store.clean_spool()
        if removed:
            log.warning("removed %d incomplete spool file(s) left by an earlier run", removed)
        migrate(url)
        self.engine = make_engine(url)
        self.sessions = session_factory(self.engine)
        self._stop.clear()
        self.scp = StorageSCP(self.config, self.store, self.sessions, on_stored=lambda _uid: self._received.set())
        self._port = self.scp.start()
        self._threads = [Promoter(self.config, self.sessions, self._stop, wake=self._wake, received=self._received)]
        self._threads += [
            Worker(self.config, self.sessions, self.store, self._stop, handler=self.job_handler, index=i,
                   wake=self._wake)
            for i in range(self.config.jobs.workers)
        ]
        self._threads.append(OutboundSender(self.config, self.sessions, self.store, self._stop, send=self.sender))
        for t in self._threads:
            t.start()
        log.info("node %s started: port %d, %d worker(s), %d destination(s)", self.config.node.ae_title,
                 self._port, self.config.jobs.workers, len(self.config.destinations))
        return self

    def stop(self, grace_s: float | None = None) -> None:
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
        log.info("node stopped")

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
