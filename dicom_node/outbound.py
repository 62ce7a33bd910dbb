"""The outbound queue: durable C-STORE transfers of our SRs to the configured destinations.

One :class:`~dicom_node.db.Transfer` row per (object, destination). A sender thread claims
due rows with the same lease scheme as the job queue (:mod:`dicom_node.jobs`), sends with
:func:`dicom_node.scu.send_file`, and on failure reschedules with exponential backoff
(``outbound.backoff_s * 2**(attempts-1)``, capped at one hour). After ``outbound.max_attempts``
failed attempts the row ends ``failed`` with the last error, visible in ``cxrnode status``.
Rows survive restarts; a row left ``sending`` by a crashed sender is reclaimed after its lease.
Every time that decides something (when a row is due, when its lease runs out, when the next
attempt is) is the database's clock (:func:`dicom_node.db.db_utcnow`), as for the job queue, so
senders on hosts whose clocks disagree still agree on what is due.

This module is the queue only (no network): other packages call :func:`enqueue` without
importing DIMSE code; the sender thread lives in :mod:`dicom_node.scu`.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Config, Destination
from dicom_node.db import Transfer, TransferState, db_utcnow
from dicom_node.index import audit
from dicom_node.jobs import _is_postgres, backoff_delay
from dicom_node.store import Store

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 3600.0
LEASE_S = 600.0
KINDS = ("draft", "signed")

Sender = Callable[[Config, Destination, str], int]


def wants(destination: Destination, kind: str) -> bool:
    """Does ``destination``'s ``send`` policy want objects of ``kind`` ("draft" or "signed")?"""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind == "signed" or destination.send == "drafts_and_signed"


def enqueue(session: Session, config: Config, sop_instance_uid: str, relpath: str, kind: str) -> list[Transfer]:
    """Add one pending Transfer per destination that wants ``kind``, due now by the database's
    clock; the caller commits (or use :func:`dicom_node.commit.commit_dataset`).

    Parameters
    ----------
    session, config:
        The caller's session; the configuration whose ``destinations`` are asked (:func:`wants`).
    sop_instance_uid, relpath:
        The object to send and its file, relative to the store.
    kind:
        ``"draft"`` or ``"signed"``.

    Returns
    -------
    list[Transfer]
        The new rows (none when no destination wants ``kind``).

    Raises
    ------
    ValueError
        ``kind`` is not one of :data:`KINDS`.
    """
    rows: list[Transfer] = []
    if not any(wants(d, kind) for d in config.destinations):
        return rows
    now = db_utcnow(session)
    for d in config.destinations:
        if wants(d, kind):
            t = Transfer(destination=d.name, sop_instance_uid=sop_instance_uid, path=relpath,
                         state=TransferState.PENDING, attempts=0, next_attempt_at=now, created_at=now)
            session.add(t)
            rows.append(t)
    return rows


def _due(now: dt.datetime):  # type: ignore[no-untyped-def]
    return or_(
        and_(Transfer.state == TransferState.PENDING, Transfer.next_attempt_at <= now),
        and_(Transfer.state == TransferState.SENDING, Transfer.lease_expires_at < now),
    )


def claim_transfer(sessions: sessionmaker, sender_id: str, now: dt.datetime | None = None) -> Transfer | None:
    """Lease one due transfer (``None``: nothing due); ``now`` defaults to the database's clock."""
    token = f"{sender_id}/{uuid.uuid4().hex[:12]}"
    try:
        with sessions() as s:
            if now is None:
                now = db_utcnow(s)  # due and lease expiry by the database's clock, not this host's
            candidate = select(Transfer.id).where(_due(now)).order_by(Transfer.next_attempt_at, Transfer.id).limit(1)
            if _is_postgres(sessions):
                candidate = candidate.with_for_update(skip_locked=True)
            res = s.execute(
                update(Transfer).where(Transfer.id == candidate.scalar_subquery(), _due(now))
                .values(state=TransferState.SENDING, lease_owner=token,
                        lease_expires_at=now + dt.timedelta(seconds=LEASE_S), attempts=Transfer.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                return None
            row = s.scalars(select(Transfer).where(Transfer.lease_owner == token)).one()
            s.commit()
            return row
    except OperationalError as exc:
        log.debug("outbound claim deferred: %s", exc)
        return None


def process_one(sessions: sessionmaker, config: Config, store: Store, sender_id: str,
                send: Sender) -> Transfer | None:
    """Claim and attempt one due transfer with ``send``; return it with its new state (or ``None``)."""
    t = claim_transfer(sessions, sender_id)
    if t is None:
        return None
    dest = next((d for d in config.destinations if d.name == t.destination), None)
    error: str | None = None
    if dest is None:
        error = f"destination {t.destination!r} is no longer configured"
    else:
        try:
            send(config, dest, str(store.abspath(t.path)))
        except Exception as exc:
            error = str(exc) or type(exc).__name__
    values: dict[str, object] = {"lease_owner": None, "lease_expires_at": None}
    with sessions() as s:
        now = db_utcnow(s)  # the next attempt is due when every host agrees it is
        if error is None:
            values.update(state=TransferState.DONE, sent_at=now, last_error=None)
        elif dest is None or t.attempts >= config.outbound.max_attempts:
            values.update(state=TransferState.FAILED, last_error=error)
        else:
            delay = backoff_delay(config.outbound.backoff_s, t.attempts, BACKOFF_CAP_S)
            values.update(state=TransferState.PENDING, last_error=error,
                          next_attempt_at=now + dt.timedelta(seconds=delay))
        s.execute(update(Transfer).where(Transfer.id == t.id, Transfer.lease_owner == t.lease_owner).values(**values))
        if values["state"] in (TransferState.DONE, TransferState.FAILED):
            audit(s, sender_id, "sent" if error is None else "send_failed", object_uid=t.sop_instance_uid,
                  detail=f"to {t.destination}" + (f": {error}" if error else ""))
        s.commit()
        fresh = s.get(Transfer, t.id)
    if error is None:
        log.info("transfer %d: %s sent to %s", t.id, t.sop_instance_uid, t.destination)
    elif values["state"] == TransferState.FAILED:
        log.error("transfer %d of %s to %s failed for good after %d attempts: %s",
                  t.id, t.sop_instance_uid, t.destination, t.attempts, error)
    else:
        log.warning("transfer %d to %s failed (attempt %d), retrying later: %s", t.id, t.destination, t.attempts, error)
    return fresh
