"""The DICOM node: configuration, Storage SCP and SCU (pynetdicom), the durable file store,
the study index and its migrations (SQLAlchemy + Alembic), the job queue that turns quiet
studies into report-drafting jobs, the outbound transfer queue, and the ``serve`` and
``status`` commands. It is the only package that speaks DIMSE; it knows nothing of models,
reports or Qt.

Modules, by what they own:

- :mod:`~dicom_node.config`: the one frozen configuration (:func:`load_config`, :class:`Config`);
- :mod:`~dicom_node.node`: :class:`Node`, the running node (SCP, promoter, workers, sender);
- :mod:`~dicom_node.scp`: the Storage SCP (statuses, association policy, connection limits);
- :mod:`~dicom_node.received`: the checks of a received data set (:func:`inspect_received`);
- :mod:`~dicom_node.pynetdicom_patches`: every use of pynetdicom internals, version-checked,
  with the start-up self-check :func:`fast_path_active`;
- :mod:`~dicom_node.store`: durable files (:class:`Store`);
- :mod:`~dicom_node.index`: Study / Series / Instance rows and the audit trail;
- :mod:`~dicom_node.commit`: **the one commit service** (file -> register + rows + audit +
  enqueue in one transaction -> file removed on failure: :func:`commit_dataset`);
- :mod:`~dicom_node.jobs`: the job queue and the handler contract (:class:`JobContext`,
  :class:`JobResult`);
- :mod:`~dicom_node.outbound` and :mod:`~dicom_node.scu`: the transfer queue and the C-STORE
  sender (:func:`send_file`);
- :mod:`~dicom_node.db`: the schema, engines, sessions and migrations.

The names in ``__all__`` are importable from the package (``from dicom_node import Node``);
each is loaded on first use, so importing one part does not load the rest (pynetdicom, say).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.commit import Committed, Enqueue, StoredFile, commit_dataset, commit_stored
    from dicom_node.config import Config, load_config
    from dicom_node.db import make_engine, migrate, session_factory
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
    from dicom_node.pynetdicom_patches import UnsupportedPynetdicom, fast_path_active
    from dicom_node.received import Rejected, inspect_received
    from dicom_node.scu import SendError, send_file
    from dicom_node.store import OutOfSpace, Store

_EXPORTS: dict[str, str] = {
    "Committed": "dicom_node.commit",
    "Enqueue": "dicom_node.commit",
    "StoredFile": "dicom_node.commit",
    "commit_dataset": "dicom_node.commit",
    "commit_stored": "dicom_node.commit",
    "Config": "dicom_node.config",
    "load_config": "dicom_node.config",
    "make_engine": "dicom_node.db",
    "migrate": "dicom_node.db",
    "session_factory": "dicom_node.db",
    "InstanceConflict": "dicom_node.index",
    "audit": "dicom_node.index",
    "check_received": "dicom_node.index",
    "register_instance": "dicom_node.index",
    "register_with_retry": "dicom_node.index",
    "JobContext": "dicom_node.jobs",
    "JobResult": "dicom_node.jobs",
    "Node": "dicom_node.node",
    "enqueue": "dicom_node.outbound",
    "UnsupportedPynetdicom": "dicom_node.pynetdicom_patches",
    "fast_path_active": "dicom_node.pynetdicom_patches",
    "Rejected": "dicom_node.received",
    "inspect_received": "dicom_node.received",
    "SendError": "dicom_node.scu",
    "send_file": "dicom_node.scu",
    "OutOfSpace": "dicom_node.store",
    "Store": "dicom_node.store",
}

__all__ = [
    "Committed",
    "Config",
    "Enqueue",
    "InstanceConflict",
    "JobContext",
    "JobResult",
    "Node",
    "OutOfSpace",
    "Rejected",
    "SendError",
    "Store",
    "StoredFile",
    "UnsupportedPynetdicom",
    "audit",
    "check_received",
    "commit_dataset",
    "commit_stored",
    "enqueue",
    "fast_path_active",
    "inspect_received",
    "load_config",
    "make_engine",
    "migrate",
    "register_instance",
    "register_with_retry",
    "send_file",
    "session_factory",
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
