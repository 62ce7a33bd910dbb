"""The study index: what is stored, by Study / Series / Instance (PS3.3 C.7 Patient-Study-Series).

:func:`register_instance` records one stored object and keeps ``Study.generation`` current:
every *new* received instance bumps it (so a study that gains images after its job ran is
processed again); re-sending an instance that is already indexed with the same content is a
no-op, and objects the node wrote itself (``generated=True``, e.g. our SRs) never bump it.
Each received instance also updates ``Study.priority`` to the most urgent value its request
attributes give (:func:`dicom_node.priority.study_priority`).

A received instance never replaces or removes one the node generated: ``register_instance``
raises :class:`InstanceConflict` for it, and :func:`check_received` (used by the Storage SCP
inside the same transaction) also refuses a received instance whose SOP Instance UID is
already indexed with other content or in another study/series. An identical re-send is not a
conflict.

The caller owns the transaction: call ``session.commit()`` after these functions. Concurrent
first instances of one study may race on the unique Study/Series UIDs; :func:`register_with_retry`
retries such an :class:`~sqlalchemy.exc.IntegrityError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import AuditEvent, Instance, Series, Study, StudyState, db_utcnow
from dicom_node.priority import more_urgent, study_priority

log = logging.getLogger(__name__)


class InstanceConflict(Exception):
    """A received instance clashes with the one already indexed under its SOP Instance UID.

    ``node_object`` is true when the indexed one is an object this node generated (an SR);
    ``study_uid`` is the study of the indexed one. The message carries UIDs only, no PHI.
    """

    def __init__(self, sop_uid: str, reason: str, node_object: bool, study_uid: str = "",
                 stored_path: str = "") -> None:
        super().__init__(f"SOP Instance UID {sop_uid!r} {reason}")
        self.sop_uid = sop_uid
        self.reason = reason
        self.node_object = node_object
        self.study_uid = study_uid
        self.stored_path = stored_path  # where the indexed one is (relative to the store)


def check_received(session: Session, sop_uid: str, relpath: str, sha256: str) -> bool:
    """Decide what to do with a received instance whose file is (or would be) at ``relpath``.

    The comparison is of whole files; the caller may still accept a conflict at the same place
    whose *data set* is identical (a File Meta Information written by another sender).

    Parameters
    ----------
    session:
        An open session (the caller's transaction).
    sop_uid:
        SOP Instance UID of the received object.
    relpath:
        Where its file is or would be, relative to the store.
    sha256:
        SHA-256 of the received file.

    Returns
    -------
    bool
        ``False`` when the SOP Instance UID is new, ``True`` when the same file is already indexed
        at the same place (an identical re-send: nothing to do).

    Raises
    ------
    InstanceConflict
        The UID belongs to an object the node generated (whatever was sent), or is indexed with
        other content or under another study/series.
    """
    row = session.execute(
        select(Instance.path, Instance.sha256, Instance.generated, Study.study_instance_uid)
        .join(Study, Study.id == Instance.study_id)
        .where(Instance.sop_instance_uid == sop_uid)
    ).one_or_none()
    if row is None:
        return False
    path, sha, generated, study_uid = row
    if path == relpath and sha == sha256:
        return True
    if generated:
        raise InstanceConflict(sop_uid, "belongs to an object this node generated", True, study_uid, path)
    if path != relpath:
        raise InstanceConflict(sop_uid, "is already stored in another study or series", False, study_uid, path)
    raise InstanceConflict(sop_uid, "is already stored with different content", False, study_uid, path)


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element must not stop indexing
        return ""
    if value is None:
        return ""
    return str(value).strip()[:limit]


def register_instance(
    session: Session,
    ds: Dataset,
    relpath: str,
    size: int,
    sha256: str,
    calling_ae: str,
    generated: bool = False,
) -> Instance:
    """Create or update the Study, Series and Instance rows for a stored dataset.

    ``ds`` needs the identifying attributes only (it may be read with ``stop_before_pixels``):
    StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID, and the descriptive
    attributes that exist. The transfer syntax is taken from ``ds.file_meta`` when present.

    Parameters
    ----------
    session:
        The caller's session; the caller commits (or use :func:`dicom_node.commit.commit_dataset`).
    ds, relpath, size, sha256:
        The data set and its stored file (relative to the store, size in bytes, SHA-256 hex).
    calling_ae:
        Who sent it (the node's own AE title for objects it generated).
    generated:
        The node generated the object (its SRs): ``Study.generation`` is not bumped.

    Returns
    -------
    Instance
        The (new or updated) row, flushed.

    Raises
    ------
    InstanceConflict
        A received (not ``generated``) instance would change an object the node generated.
    sqlalchemy.exc.IntegrityError
        A concurrent first instance of the same study or series won the race (see
        :func:`register_with_retry`).
    """
    now = db_utcnow(session)  # the database's clock: the promoter's quiet period is measured with it
    study = _study_row(session, ds, now)
    series = _series_row(session, ds, study)
    sop_uid = str(ds.SOPInstanceUID)
    inst = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one_or_none()
    changed = True
    if inst is None:
        inst = Instance(sop_instance_uid=sop_uid)
        session.add(inst)
    else:
        changed = inst.sha256 != sha256 or inst.path != relpath
        if inst.generated and not generated:  # the node's own object is never taken over
            if changed:
                raise InstanceConflict(sop_uid, "belongs to an object this node generated", True,
                                       inst.study.study_instance_uid)
            return inst
    _fill_instance(inst, ds, study, series, relpath, size, sha256, calling_ae, generated)
    if changed:
        inst.received_at = now
    if not generated:
        _note_received(study, ds, changed, now)
    session.flush()
    return inst


#: Study and Series columns taken from the data set: (column, keyword, maximum length)
_STUDY_TEXT = (("patient_id", "PatientID", 64), ("patient_name", "PatientName", 324),
               ("patient_birth_date", "PatientBirthDate", 8), ("patient_sex", "PatientSex", 16),
               ("accession_number", "AccessionNumber", 16), ("study_date", "StudyDate", 8),
               ("study_time", "StudyTime", 16), ("study_description", "StudyDescription", 64),
               ("referring_physician_name", "ReferringPhysicianName", 324), ("study_id_attr", "StudyID", 16))
_SERIES_TEXT = (("modality", "Modality", 16), ("body_part_examined", "BodyPartExamined", 16),
                ("series_number", "SeriesNumber", 12), ("series_description", "SeriesDescription", 64))

R = TypeVar("R", Study, Series)


def _texts(ds: Dataset, columns: tuple[tuple[str, str, int], ...]) -> dict[str, str]:
    return {column: _text(ds, keyword, limit) for column, keyword, limit in columns}


def _row(session: Session, model: type[R], uid_column: Any, uid: str, make: Callable[[], R]) -> R:
    """The row of ``model`` whose ``uid_column`` is ``uid``; ``make()`` added and flushed if none."""
    row = session.scalars(select(model).where(uid_column == uid)).one_or_none()
    if row is None:
        row = make()
        session.add(row)
        session.flush()
    return row


def _study_row(session: Session, ds: Dataset, now: Any) -> Study:
    """The Study row of ``ds``, created from its patient/study attributes if new."""
    uid = str(ds.StudyInstanceUID)
    return _row(session, Study, Study.study_instance_uid, uid, lambda: Study(
        study_instance_uid=uid, **_texts(ds, _STUDY_TEXT), state=StudyState.RECEIVING, generation=0,
        first_received_at=now, last_received_at=now))


def _series_row(session: Session, ds: Dataset, study: Study) -> Series:
    """The Series row of ``ds``, created in ``study`` if new."""
    uid = str(ds.SeriesInstanceUID)
    return _row(session, Series, Series.series_instance_uid, uid, lambda: Series(
        study_id=study.id, series_instance_uid=uid, **_texts(ds, _SERIES_TEXT)))


def _fill_instance(inst: Instance, ds: Dataset, study: Study, series: Series, relpath: str, size: int,
                   sha256: str, calling_ae: str, generated: bool) -> None:
    """The Instance row's columns from ``ds`` and its stored file."""
    meta = getattr(ds, "file_meta", None)
    inst.study_id = study.id
    inst.series_id = series.id
    inst.sop_class_uid = str(ds.SOPClassUID)
    inst.transfer_syntax_uid = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    inst.instance_number = _text(ds, "InstanceNumber", 12)
    inst.view_position = _text(ds, "ViewPosition", 16)
    inst.path = relpath
    inst.size = size
    inst.sha256 = sha256
    inst.calling_ae_title = calling_ae[:16]
    inst.generated = 1 if generated else 0


def _note_received(study: Study, ds: Dataset, changed: bool, now: Any) -> None:
    """A received instance: the study keeps the most urgent priority its requests gave
    (STAT/ED/inpatient/outpatient) and, when the instance is new or changed, a new generation."""
    urgent = more_urgent(study.priority or "", study_priority(ds))
    if urgent != (study.priority or ""):
        study.priority = urgent
    if changed:
        study.generation = (study.generation or 0) + 1
        study.last_received_at = now
        study.state = StudyState.RECEIVING


def register_with_retry(
    sessions: sessionmaker,
    fn: Callable[[Session], Any],
    attempts: int = 5,
) -> Any:
    """Run ``fn(session)`` and commit, retrying a lost race on a unique key or a busy database.

    Parameters
    ----------
    sessions:
        The session factory; each attempt gets a new session.
    fn:
        The transaction's work; it must be safe to run again after a rollback.
    attempts:
        How many times to try.

    Returns
    -------
    Any
        What ``fn`` returned in the attempt that committed.

    Raises
    ------
    sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError
        The last one, when every attempt lost; any other exception of ``fn`` at once.
    """
    last: Exception | None = None
    for _ in range(attempts):
        with sessions() as session:
            try:
                result = fn(session)
                session.commit()
                return result
            except (IntegrityError, OperationalError) as exc:
                session.rollback()
                last = exc
                log.debug("index write retried after %s", type(exc).__name__)
    assert last is not None
    raise last


def audit(
    session: Session,
    actor: str,
    action: str,
    study_uid: str = "",
    object_uid: str = "",
    detail: str = "",
) -> AuditEvent:
    """Append an audit event (who did what to which study/object). Never put PHI in ``detail``.

    Parameters
    ----------
    session:
        The caller's session; the event is committed with the caller's transaction.
    actor:
        A user name or an AE title (cut to 128 characters).
    action:
        What was done (``received``, ``drafted``, ``signed``, ...; cut to 32 characters).
    study_uid, object_uid, detail:
        Which study and object, and a detail text (UIDs and figures only).

    Returns
    -------
    AuditEvent
        The new row (added, not flushed).
    """
    ev = AuditEvent(
        actor=actor[:128], action=action[:32], study_instance_uid=study_uid, object_uid=object_uid, detail=detail
    )
    session.add(ev)
    return ev
