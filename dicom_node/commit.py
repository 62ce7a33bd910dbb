"""The one commit service: an object's file and its index rows are committed together or not at all.

Every object the node keeps goes through the same steps: the file is made durable in the store
(:meth:`~dicom_node.store.Store.write_dataset`: temp file, fsync, placed without replacing
anything, fsync of the folder), then **one** database transaction runs the caller's ``prepare``
step (locks, refusals), registers the instance (:func:`~dicom_node.index.register_instance`),
writes the caller's own rows and audit events, and enqueues the object to the destinations that
want it (:func:`~dicom_node.outbound.enqueue`); if anything in the transaction fails, nothing is
committed and the file written for it is removed again. A file already at the object's path (a
committed object, or one left by an attempt that died before its transaction) is never replaced
before ``prepare`` has run: of two writers of one object, the refused one never touches the
other's file.

:func:`commit_dataset` does all of it for an object the node writes (a draft SR, its rendering,
a verified SR); :func:`commit_stored` is the transaction and the clean-up for a file already
placed by the caller (the Storage SCP places received files itself, with a no-replace link).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import index, outbound
from dicom_node.config import Config
from dicom_node.store import Store

__all__ = ["Committed", "Enqueue", "StoredFile", "commit_dataset", "commit_stored"]

T = TypeVar("T")


@dataclass(frozen=True)
class StoredFile:
    """A file in the store: where (relative to the store) and what (size, SHA-256).

    Attributes
    ----------
    relpath:
        Path relative to the store's root.
    size:
        Size in bytes.
    sha256:
        SHA-256 of the file, hex.
    """

    relpath: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Enqueue:
    """Send the committed object to the destinations whose ``send`` policy wants ``kind``.

    Attributes
    ----------
    config:
        The configuration naming the destinations.
    kind:
        ``"draft"`` or ``"signed"``.
    hold:
        Delay before the transfer is due (the reviewer's undo window).
    """

    config: Config
    kind: str
    hold: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True)
class Committed(Generic[T]):
    """What a commit did.

    Attributes
    ----------
    stored:
        The file (:class:`StoredFile`).
    new:
        Whether rows were written (``False``: ``prepare`` found the object already recorded and
        nothing was written).
    value:
        The callback's value.
    transfers:
        How many transfers were queued.
    """

    stored: StoredFile
    new: bool
    value: T | None
    transfers: int


def commit_dataset(
    store: Store,
    sessions: sessionmaker[Session],
    ds: Dataset,
    relpath: str,
    rows: Callable[[Session, StoredFile], T] | None = None,
    *,
    registered_by: str,
    generated: bool = True,
    prepare: Callable[[Session], bool | None] | None = None,
    enqueue: Enqueue | None = None,
) -> Committed[T]:
    """Write ``ds`` durably at ``relpath`` and record it in one transaction (see the module).

    Parameters
    ----------
    store, sessions:
        The store the file goes to and the index it is recorded in.
    ds:
        The data set, with its File Meta Information.
    relpath:
        Where it goes, relative to the store (``Store.instance_relpath``).
    rows:
        ``rows(session, stored)``: the caller's own rows and audit events, written in the same
        transaction after the instance is registered; its return value is ``Committed.value``.
    registered_by:
        The AE title recorded as the instance's calling AE (the node's own for its objects).
    generated:
        Whether the node generated the object (its SRs: ``Study.generation`` is not bumped and
        no received instance may replace it).
    prepare:
        ``prepare(session)``: runs first in the transaction (take locks, refuse with an
        exception); returning ``False`` means the object is already recorded: nothing is
        written and the file is kept.
    enqueue:
        Queue the object to the destinations that want it (see :class:`Enqueue`).

    Returns
    -------
    Committed
        The stored file, ``new``, the value of ``rows`` and the number of transfers queued.

    Raises
    ------
    dicom_node.store.OutOfSpace, OSError
        The file could not be written (nothing was recorded).
    Exception
        Whatever the transaction raised (``prepare``, ``rows``,
        :class:`~dicom_node.index.InstanceConflict`, a database error): nothing was committed
        and the file written by this call was removed.
    """
    if not store.exists(relpath):
        # a new object: placed without replacing (a hard link), so of two writers racing for one
        # object (two jobs drafting one study generation) the second fails here and never touches
        # the first one's file; then the transaction, and the file removed if it fails
        size, sha256 = store.write_dataset(ds, relpath, replace=False)
        return commit_stored(store, sessions, ds, StoredFile(relpath, size, sha256), rows,
                             registered_by=registered_by, generated=generated, prepare=prepare, enqueue=enqueue)
    # a file is already there (a committed object, or one left by an attempt that died before its
    # transaction): prepare (the caller's locks and refusals) runs first, so a refused writer
    # never touches it, and the file is replaced inside the transaction
    with sessions() as session, session.begin():
        if prepare is not None and prepare(session) is False:
            return Committed(_existing(store, relpath), False, None, 0)
        size, sha256 = store.write_dataset(ds, relpath)
        return _record(session, ds, StoredFile(relpath, size, sha256), rows, registered_by, generated, enqueue)


def _existing(store: Store, relpath: str) -> StoredFile:
    """The file already at ``relpath`` (size -1 and no hash when there is none)."""
    sha = store.file_sha256(relpath)
    return StoredFile(relpath, store.abspath(relpath).stat().st_size if sha else -1, sha or "")


def _record(session: Session, ds: Dataset, stored: StoredFile, rows: Callable[[Session, StoredFile], T] | None,
            registered_by: str, generated: bool, enqueue: Enqueue | None) -> Committed[T]:
    """Register the instance, write the caller's rows and enqueue it, in ``session``'s transaction."""
    index.register_instance(session, ds, stored.relpath, stored.size, stored.sha256, registered_by,
                            generated=generated)
    value = rows(session, stored) if rows is not None else None
    transfers = 0
    if enqueue is not None:
        queued = outbound.enqueue(session, enqueue.config, str(ds.SOPInstanceUID), stored.relpath, enqueue.kind)
        for t in queued:
            if enqueue.hold:
                t.next_attempt_at = t.next_attempt_at + enqueue.hold
        transfers = len(queued)
    return Committed(stored, True, value, transfers)


def commit_stored(
    store: Store,
    sessions: sessionmaker[Session],
    ds: Dataset,
    stored: StoredFile,
    rows: Callable[[Session, StoredFile], T] | None = None,
    *,
    registered_by: str,
    generated: bool = True,
    prepare: Callable[[Session], bool | None] | None = None,
    enqueue: Enqueue | None = None,
    remove_on_failure: bool = True,
    attempts: int = 1,
) -> Committed[T]:
    """Record a file already in the store in one transaction; remove it if that fails.

    Parameters
    ----------
    store, sessions, ds, rows, registered_by, generated, prepare, enqueue:
        As for :func:`commit_dataset`.
    stored:
        The file already placed at ``stored.relpath``.
    remove_on_failure:
        Remove the file when the transaction fails (``False`` when the caller did not place
        it: it belongs to someone else).
    attempts:
        Run the transaction up to this many times when it loses a race on a unique key or the
        database is busy (:func:`~dicom_node.index.register_with_retry`); 1: no retry.

    Returns
    -------
    Committed
        As for :func:`commit_dataset`.

    Raises
    ------
    Exception
        Whatever the transaction raised, after the clean-up (nothing was committed).
    """
    if attempts < 1:
        raise ValueError(f"attempts: expected at least 1, got {attempts}")

    def transaction(session: Session) -> Committed[T]:
        if prepare is not None and prepare(session) is False:
            return Committed(stored, False, None, 0)
        return _record(session, ds, stored, rows, registered_by, generated, enqueue)

    try:
        if attempts > 1:
            result: Committed[T] = index.register_with_retry(sessions, transaction, attempts)
            return result
        with sessions() as session, session.begin():
            return transaction(session)
    except BaseException:
        if remove_on_failure:
            store.remove(stored.relpath)
        raise
