"""Open the review service from a configuration: the database (its schema checked as ``cxrnode
serve`` checks it) and the store.

The reviewer (``gui``) starts here, so it never touches the schema module itself: what it gets
back is a :class:`~plugin.review.service.ReviewService` returning typed results.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config
from dicom_node.db import make_engine, session_factory
from dicom_node.startup import prepare_schema
from dicom_node.store import Store
from plugin.review.service import ReviewService


def open_sessions(config: Config) -> sessionmaker[Session]:
    """Sessions on ``config``'s database, its schema prepared as ``serve`` does (see
    :func:`open_service`). For the reviewer's other Qt-free tools (``cxrnode templates``), so
    ``gui`` never opens the schema module itself.

    Parameters
    ----------
    config:
        The configuration naming the database.

    Returns
    -------
    sqlalchemy.orm.sessionmaker
        The session factory.

    Raises
    ------
    dicom_node.startup.StartupError
        The index cannot be used.
    """
    prepare_schema(config)
    return session_factory(make_engine(config.node.resolved_database_url()))


def open_service(config: Config, claim_timeout_s: float | None = None) -> ReviewService:
    """A :class:`ReviewService` on ``config``'s database and store. The schema is prepared as
    ``serve`` does (:func:`dicom_node.startup.prepare_schema`): the embedded SQLite index migrated
    under the lock, a PostgreSQL one only checked (``cxrnode migrate`` changes it).

    Parameters
    ----------
    config:
        The configuration (database, store, ``[review]``).
    claim_timeout_s:
        How long a claim lasts without a heartbeat (default: ``review.claim_timeout_s``).

    Returns
    -------
    ReviewService
        The service.

    Raises
    ------
    dicom_node.startup.StartupError
        The index cannot be used (one line: ``exc.line(command)``).
    """
    sessions = open_sessions(config)
    store = Store(config.node.storage_dir, fsync=config.node.fsync, min_free_space_mb=config.node.min_free_space_mb)
    return ReviewService(config, sessions, store,
                         claim_timeout_s=claim_timeout_s or config.review.claim_timeout_s)


__all__ = ["open_service", "open_sessions"]
