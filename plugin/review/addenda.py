"""After signing: addenda to a verified report, and what was recorded with it (issue 17).

An addendum is a **new** verified SR (TID 2000; COMPLETE, VERIFIED, FINAL), written by
:func:`plugin.drafting.sr.build_addendum_sr`: it repeats the report it amends unchanged and adds
an "Addendum" section (LN 55107-7, PS3.16 CID 7001) with the text and its byline; its
Predecessor Documents Sequence (PS3.3 C.17.2.3) references the amended SR — the signed report,
or the latest addendum when there is one, so the addenda form one chain. The amended SR is
never changed: both stay in the store and the index (as objects the node generated, which no
peer can replace: :func:`dicom_node.index.check_received`), and the addendum is queued to the
destinations through the outbound path exactly as a signed SR (``kind="signed"``).

Who may amend: any reviewer of the installed configuration (``[[reviewers]]``, the same rule as
signing: :meth:`~plugin.review.service.ReviewService.reviewer`), not only the one who signed.
An addendum waits until the signature's undo window has passed (an undone signature must not
leave an addendum behind). Every addendum is audited (``addendum``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass

import pydicom
import pydicom.errors
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node import index
from dicom_node.commit import Enqueue, StoredFile, commit_dataset
from dicom_node.config import Reviewer
from dicom_node.db import Draft, DraftState, Study, Transfer, TransferState, db_utcnow
from dicom_node.review_records import CriticalResult, ReportAddendum
from plugin.drafting import sr
from plugin.review.results import AddendumResult, CriticalNotice
from plugin.review.service import (
    NotReviewableError,
    PlaceholderError,
    ReviewError,
    ReviewService,
    placeholders,
)

log = logging.getLogger(__name__)

#: the longest addendum accepted (characters)
MAX_ADDENDUM_CHARS = 10000


class AddendumConflictError(ReviewError):
    """Another addendum was added to the same report meanwhile: read it, then add yours again."""


@dataclass(frozen=True)
class ReportRecord:
    """What a signed report carries besides its text; ``latest_sop_instance_uid`` is the newest
    verified SR (the last addendum, else the signed report).

    Attributes
    ----------
    draft_id:
        The signed draft.
    signed_sop_instance_uid:
        The verified SR written at signing.
    critical:
        The critical-result communication recorded at signing (``None``: none).
    addenda:
        Its addenda, oldest first.
    """

    draft_id: int
    signed_sop_instance_uid: str
    critical: CriticalNotice | None
    addenda: tuple[AddendumResult, ...]

    @property
    def latest_sop_instance_uid(self) -> str:
        return self.addenda[-1].sop_instance_uid if self.addenda else self.signed_sop_instance_uid


def _addendum_result(a: ReportAddendum, transfers: int = 0) -> AddendumResult:
    return AddendumResult(
        draft_id=a.draft_id, study_instance_uid=a.study_instance_uid, sop_instance_uid=a.sop_instance_uid,
        path=a.path, predecessor_sop_instance_uid=a.predecessor_sop_instance_uid, text=a.text, author=a.author,
        author_name=a.author_name, created_at=a.created_at, transfers=transfers)


def report_record(service: ReviewService, draft_id: int) -> ReportRecord:
    """The critical-result communication and the addenda of a signed draft.

    Parameters
    ----------
    service:
        The review service.
    draft_id:
        The draft.

    Returns
    -------
    ReportRecord
        The record (no critical result and no addenda for a draft that is not signed).

    Raises
    ------
    NotReviewableError
        The draft does not exist.
    """
    with service.sessions() as s:
        d = s.get(Draft, draft_id)
        if d is None:
            raise NotReviewableError(f"draft {draft_id} does not exist")
        crit = s.scalars(select(CriticalResult).where(CriticalResult.draft_id == draft_id)
                         .order_by(CriticalResult.id.desc()).limit(1)).first()
        rows = s.scalars(select(ReportAddendum).where(ReportAddendum.draft_id == draft_id)
                         .order_by(ReportAddendum.id)).all()
        return ReportRecord(
            draft_id=draft_id,
            signed_sop_instance_uid=d.signed_sop_instance_uid or "",
            critical=CriticalNotice(crit.recipient_name, crit.recipient_role, crit.method, crit.communicated_at,
                                    crit.recorded_by) if crit is not None else None,
            addenda=tuple(_addendum_result(a) for a in rows),
        )


def add_addendum(service: ReviewService, draft_id: int, user: str, text: str) -> AddendumResult:
    """Amend the signed report of ``draft_id`` with ``text``: a new verified SR, stored, indexed,
    audited and queued to the destinations; the amended SR is kept unchanged. On any error
    nothing is committed and no file is left behind.

    Parameters
    ----------
    service:
        The review service.
    draft_id:
        The signed draft.
    user:
        The reviewer's account (a reviewer of the installed configuration).
    text:
        The addendum's text (at most :data:`MAX_ADDENDUM_CHARS`).

    Returns
    -------
    AddendumResult
        The new SR and the transfers queued.

    Raises
    ------
    UnknownReviewerError
        ``user`` is not a reviewer of the installed configuration.
    NotReviewableError
        The draft is not signed.
    ReviewError
        Empty or too long text, the undo window still open, the SR unreadable.
    PlaceholderError
        ``xxxx`` (a de-identification placeholder) in the text.
    AddendumConflictError
        Another addendum was added meanwhile.
    """
    reviewer = service.reviewer(user)
    text = _addendum_text(text)
    now = service.clock()
    pred_uid, pred_path, study_uid = _predecessor(service, draft_id, now)
    ds = _addendum_sr(service, pred_uid, pred_path, text, reviewer)

    def still_latest(s: Session) -> None:
        # the study row first (PostgreSQL): two addenda to one report are made one after the other
        s.execute(select(Study.id).where(Study.study_instance_uid == study_uid).with_for_update()).first()
        latest = s.scalars(select(ReportAddendum.sop_instance_uid).where(ReportAddendum.draft_id == draft_id)
                           .order_by(ReportAddendum.id.desc()).limit(1)).first()
        signed_uid = s.scalar(select(Draft.signed_sop_instance_uid).where(Draft.id == draft_id))
        if (latest or signed_uid) != pred_uid:
            raise AddendumConflictError("another addendum was added to this report meanwhile: "
                                        "read it, then add yours again")

    def addendum_row(s: Session, stored: StoredFile) -> AddendumResult:
        row = ReportAddendum(draft_id=draft_id, study_instance_uid=study_uid, sop_instance_uid=ds.SOPInstanceUID,
                             path=stored.relpath, predecessor_sop_instance_uid=pred_uid, text=text, author=user,
                             author_name=reviewer.display_name, created_at=now)
        s.add(row)
        index.audit(s, user, "addendum", study_uid, ds.SOPInstanceUID,
                    json.dumps({"amends": pred_uid, "verifier": reviewer.display_name,
                                "organisation": reviewer.organisation, "words": len(text.split())}))
        s.flush()
        return _addendum_result(row)

    # one commit (dicom_node.commit): the file, then the index row, the addendum, the audit and the
    # transfers (queued like a signed SR) in one transaction; the file is removed if it fails
    done = commit_dataset(service.store, service.sessions, ds,
                          service.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
                          addendum_row, registered_by=service.config.node.ae_title, prepare=still_latest,
                          enqueue=Enqueue(service.config, "signed"))
    assert done.value is not None
    log.info("draft %s: addendum %s amends %s", draft_id, ds.SOPInstanceUID, pred_uid)
    return dataclasses.replace(done.value, transfers=done.transfers)


def _addendum_text(text: str) -> str:
    """The addendum's text, normalised; a :class:`ReviewError` when empty, too long or holding placeholders."""
    text = (text or "").replace("\r\n", "\n").strip()
    if not text:
        raise ReviewError("the addendum is empty: write what you add to the report")
    if len(text) > MAX_ADDENDUM_CHARS:
        raise ReviewError(f"the addendum is {len(text)} characters long; at most {MAX_ADDENDUM_CHARS}")
    if n := placeholders(text):
        raise PlaceholderError(f"the addendum holds {n} de-identification placeholder(s) (\"xxxx\"): replace them")
    return text


def _predecessor(service: ReviewService, draft_id: int, now: dt.datetime) -> tuple[str, str, str]:
    """The SR the addendum amends (the latest addendum, else the signed report): its SOP Instance
    UID and store path, and the study's UID. Refused while the signature can still be undone."""
    window = dt.timedelta(seconds=service.config.review.undo_window_s)
    with service.sessions() as s:
        d = s.get(Draft, draft_id)
        if d is None:
            raise NotReviewableError(f"draft {draft_id} does not exist")
        if d.state != DraftState.SIGNED or not d.signed_sop_instance_uid or not d.signed_path:
            raise NotReviewableError(f"draft {draft_id} is not signed: only a signed report takes an addendum; "
                                     "edit and sign the draft instead")
        # while the signature can still be undone (within the window, nothing released to be sent)
        # the report is the signer's to change: an addendum would outlive an undone signature
        queued = s.scalar(select(func.count(Transfer.id)).where(
            Transfer.sop_instance_uid == d.signed_sop_instance_uid)) or 0
        held = s.scalar(select(func.count(Transfer.id)).where(
            Transfer.sop_instance_uid == d.signed_sop_instance_uid, Transfer.state == TransferState.PENDING,
            Transfer.attempts == 0, Transfer.next_attempt_at > db_utcnow(s))) or 0
        within = d.signed_at is not None and bool(window) and now < d.signed_at + window
        if held == queued and (within or held > 0):
            raise ReviewError("the signature can still be undone: undo it to change the report, or send it "
                              "(Send now) before adding an addendum")
        last = s.scalars(select(ReportAddendum).where(ReportAddendum.draft_id == draft_id)
                         .order_by(ReportAddendum.id.desc()).limit(1)).first()
        pred_uid, pred_path = (last.sop_instance_uid, last.path) if last else (d.signed_sop_instance_uid, d.signed_path)
        return pred_uid, pred_path, d.study.study_instance_uid


def _addendum_sr(service: ReviewService, pred_uid: str, pred_path: str, text: str, reviewer: Reviewer) -> Dataset:
    """The addendum SR amending the predecessor read from the store (plugin.drafting.sr)."""
    try:
        predecessor = service.store.read_dataset(pred_path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ReviewError(f"cannot read the verified report {pred_uid} from the store: {exc}") from exc
    added_at = dt.datetime.now(dt.UTC).astimezone()
    try:
        return sr.build_addendum_sr(predecessor, text, reviewer.display_name, reviewer.organisation, added_at)
    except sr.SRError as exc:
        raise ReviewError(f"cannot write the addendum: {exc}") from exc


__all__ = ["MAX_ADDENDUM_CHARS", "AddendumConflictError", "ReportRecord", "add_addendum", "report_record"]
