"""The DICOM node: configuration, Storage SCP and SCU (pynetdicom), the durable file store,
the study index and its migrations (SQLAlchemy + Alembic), the job queue that turns quiet
studies into report-drafting jobs, the outbound transfer queue, priors by Query/Retrieve, and
the ``serve``, ``status`` and ``jobs`` commands. It is the only package that speaks DIMSE; it
knows nothing of models, reports or Qt.

Modules, by what they own:

- :mod:`~dicom_node.config`: the one frozen configuration (:func:`load_config`, :class:`Config`,
  :class:`ConfigError`, :func:`parse_overrides` for ``--set``);
- :mod:`~dicom_node.startup`: the checks before serving (:class:`StartupError`,
  :func:`prepare_schema`);
- :mod:`~dicom_node.node`: :class:`Node`, the running node (SCP, promoter, workers, sender);
- :mod:`~dicom_node.scp`: the Storage SCP (statuses, association policy, connection limits);
- :mod:`~dicom_node.received`: the checks of a received data set (:func:`inspect_received`);
- :mod:`~dicom_node.pynetdicom_patches`: every use of pynetdicom internals, version-checked,
  with the start-up self-check :func:`fast_path_active`;
- :mod:`~dicom_node.store`: durable files (:class:`Store`);
- :mod:`~dicom_node.index`: Study / Series / Instance rows and the audit trail;
- :mod:`~dicom_node.priority`: the study's reading priority from its request attributes
  (:func:`study_priority`);
- :mod:`~dicom_node.commit`: **the one commit service** (file -> register + rows + audit +
  enqueue in one transaction -> file removed on failure: :func:`commit_dataset`);
- :mod:`~dicom_node.jobs`: the job queue and the handler contract (:class:`JobContext`,
  :class:`JobResult`);
- :mod:`~dicom_node.outbound` and :mod:`~dicom_node.scu`: the transfer queue and the C-STORE
  sender (:func:`send_file`);
- :mod:`~dicom_node.qr` and :mod:`~dicom_node.priors`: the patient's prior studies by C-FIND /
  C-GET (:class:`QRSession`, :func:`fetch_priors`);
- :mod:`~dicom_node.health`: the HTTP health and metrics endpoint (:class:`HealthServer`);
- :mod:`~dicom_node.ops`: queue summaries and retries for ``status`` and ``jobs``;
- :mod:`~dicom_node.db` and :mod:`~dicom_node.review_records`: the schema, engines, sessions
  and migrations (the review tables: critical results, addenda).

The names in ``__all__`` are importable from the package (``from dicom_node import Node``);
each is loaded on first use (PEP 562), so importing one part does not load the rest:
``import dicom_node`` loads neither pynetdicom nor SQLAlchemy (the installer imports
:mod:`dicom_node.config` before any dependency is installed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.commit import Committed, Enqueue, StoredFile, commit_dataset, commit_stored
    from dicom_node.config import (
        Config,
        ConfigError,
        Destination,
        PipelineConfig,
        Reviewer,
        load_config,
        parse_overrides,
    )
    from dicom_node.db import make_engine, migrate, session_factory, utcnow
    from dicom_node.health import HealthServer
    from dicom_node.index import (
        InstanceConflict,
        audit,
        check_received,
        register_instance,
        register_with_retry,
    )
    from dicom_node.jobs import JobContext, JobResult
    from dicom_node.node import Node
    from dicom_node.outbound import enqueue
    from dicom_node.priority import more_urgent, study_priority
    from dicom_node.priors import FetchOutcome, fetch_priors
    from dicom_node.pynetdicom_patches import UnsupportedPynetdicom, fast_path_active
    from dicom_node.qr import QRError, QRSession
    from dicom_node.received import Rejected, inspect_received
    from dicom_node.scu import SendError, send_file
    from dicom_node.startup import StartupError, prepare_schema
    from dicom_node.store import OutOfSpace, Store

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "Committed": "dicom_node.commit",
    "Enqueue": "dicom_node.commit",
    "StoredFile": "dicom_node.commit",
    "commit_dataset": "dicom_node.commit",
    "commit_stored": "dicom_node.commit",
    "Config": "dicom_node.config",
    "ConfigError": "dicom_node.config",
    "Destination": "dicom_node.config",
    "PipelineConfig": "dicom_node.config",
    "Reviewer": "dicom_node.config",
    "load_config": "dicom_node.config",
    "parse_overrides": "dicom_node.config",
    "make_engine": "dicom_node.db",
    "migrate": "dicom_node.db",
    "session_factory": "dicom_node.db",
    "utcnow": "dicom_node.db",
    "HealthServer": "dicom_node.health",
    "InstanceConflict": "dicom_node.index",
    "audit": "dicom_node.index",
    "check_received": "dicom_node.index",
    "register_instance": "dicom_node.index",
    "register_with_retry": "dicom_node.index",
    "JobContext": "dicom_node.jobs",
    "JobResult": "dicom_node.jobs",
    "Node": "dicom_node.node",
    "enqueue": "dicom_node.outbound",
    "more_urgent": "dicom_node.priority",
    "study_priority": "dicom_node.priority",
    "FetchOutcome": "dicom_node.priors",
    "fetch_priors": "dicom_node.priors",
    "UnsupportedPynetdicom": "dicom_node.pynetdicom_patches",
    "fast_path_active": "dicom_node.pynetdicom_patches",
    "QRError": "dicom_node.qr",
    "QRSession": "dicom_node.qr",
    "Rejected": "dicom_node.received",
    "inspect_received": "dicom_node.received",
    "SendError": "dicom_node.scu",
    "send_file": "dicom_node.scu",
    "StartupError": "dicom_node.startup",
    "prepare_schema": "dicom_node.startup",
    "OutOfSpace": "dicom_node.store",
    "Store": "dicom_node.store",
}

__all__ = [
    "Committed",
    "Config",
    "ConfigError",
    "Destination",
    "Enqueue",
    "FetchOutcome",
    "HealthServer",
    "InstanceConflict",
    "JobContext",
    "JobResult",
    "Node",
    "OutOfSpace",
    "PipelineConfig",
    "QRError",
    "QRSession",
    "Rejected",
    "Reviewer",
    "SendError",
    "StartupError",
    "Store",
    "StoredFile",
    "UnsupportedPynetdicom",
    "audit",
    "check_received",
    "commit_dataset",
    "commit_stored",
    "enqueue",
    "fast_path_active",
    "fetch_priors",
    "inspect_received",
    "load_config",
    "make_engine",
    "migrate",
    "more_urgent",
    "parse_overrides",
    "prepare_schema",
    "register_instance",
    "register_with_retry",
    "send_file",
    "session_factory",
    "study_priority",
    "utcnow",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dicom_node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
