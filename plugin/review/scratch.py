"""Studies with no usable AI draft stay reachable (issue 17): open their images, report them from
scratch, or ask for drafting again.

- :func:`study_detail`: a read-only :class:`~plugin.review.service.DraftDetail` of a study with
  no draft (drafting failed, or the pipeline skipped it), ``draft_id == 0``: its images and why
  it has no draft, for the reviewer to look at.
- :func:`report_from_scratch`: the radiologist writes the report with an empty editor. The node
  makes a placeholder draft (:func:`plugin.drafting.sr.build_no_ai_draft_sr`: no text, coded
  "No AI draft", never sent) and a draft row claimed by the reviewer; its job is of kind
  ``manual``, finished at the study's current generation, so the sign path is the one every draft
  takes (claim, "changed underneath" check, verified SR with Predecessor Documents, undo window,
  outbound queue) and the verified SR carries no AI text and no device observer. Works for a
  failed, skipped or rejected study, i.e. any study with no open or signed draft. Audited
  ``report_from_scratch``.
- :func:`retry_drafting`: a new ``draft`` job for a failed or skipped study (audited
  ``drafting_retried``); the worker picks it up like any job.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import pydicom
import pydicom.errors
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicom_node import index
from dicom_node.commit import StoredFile, commit_dataset
from dicom_node.db import Draft, DraftState, Instance, Job, JobState, Study, StudyState
from plugin.drafting import sr
from plugin.drafting.indication import extract
from plugin.review.results import RetryResult
from plugin.review.service import (
    STATE_FAILED,
    STATE_SKIPPED,
    DraftDetail,
    NotReviewableError,
    ReviewError,
    ReviewService,
    ViewRef,
)
from plugin.token_info import TokenInfo

log = logging.getLogger(__name__)


def _study(s: Session, study_uid: str) -> Study:
    st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
    if st is None:
        raise NotReviewableError(f"study {study_uid} is not in the index")
    return st


def _no_draft_reason(s: Session, st: Study) -> str:
    """Why the study has no AI draft to review, in one plain line."""
    job = s.scalars(select(Job).where(Job.study_id == st.id, Job.kind == "draft")
                    .order_by(Job.id.desc()).limit(1)).first()
    rejected = s.scalars(select(Draft).where(Draft.study_id == st.id, Draft.state == DraftState.REJECTED)
                         .order_by(Draft.id.desc()).limit(1)).first()
    if rejected is not None and st.state != StudyState.FAILED:
        return f"the AI draft was rejected: {rejected.reject_reason or 'no reason given'}"
    if st.state == StudyState.SKIPPED:
        return f"drafting skipped the study: {(job.last_error if job else '') or 'nothing the model can read'}"
    if st.state == StudyState.FAILED:
        return f"drafting failed: {(job.last_error if job else '') or 'unknown error'}"
    return "no AI draft"


def _images(s: Session, st: Study) -> list[Instance]:
    return list(s.scalars(select(Instance).where(Instance.study_id == st.id, Instance.generated == 0)
                          .order_by(Instance.id)).all())


def study_detail(service: ReviewService, study_uid: str) -> DraftDetail:
    """The images of a study that has no draft, read-only.

    Parameters
    ----------
    service:
        The review service.
    study_uid:
        The study.

    Returns
    -------
    DraftDetail
        ``draft_id == 0``, state ``failed`` or ``skipped``, the reason in ``reject_reason``
        and ``no_ai_draft_reason``.

    Raises
    ------
    NotReviewableError
        The study is not in the index.
    """
    with service.sessions() as s:
        st = _study(s, study_uid)
        reason = _no_draft_reason(s, st)
        views = tuple(ViewRef(sop_instance_uid=i.sop_instance_uid, view=(i.view_position or "UNKNOWN").upper(),
                              source="tag", path=service.store.abspath(i.path)) for i in _images(s, st))
        state = STATE_SKIPPED if st.state == StudyState.SKIPPED else STATE_FAILED
        return DraftDetail(
            draft_id=0, study_instance_uid=st.study_instance_uid, sop_instance_uid="", path=Path(),
            patient_name=st.patient_name, patient_id=st.patient_id, patient_birth_date=st.patient_birth_date,
            patient_sex=st.patient_sex, study_date=st.study_date, study_description=st.study_description,
            accession_number=st.accession_number, indication="", findings="", impression="", tokens=(),
            views=views, model_name="", model_version="", created_at=st.last_received_at, state=state,
            claimed_by="", claimed_at=None, reject_reason=reason, no_ai_draft_reason=reason,
        )


def report_from_scratch(service: ReviewService, study_uid: str, user: str) -> int:
    """Start a report with no AI text for ``study_uid``, claimed by ``user`` (open it like any
    draft: the editor is empty, Sign writes the verified SR).

    Parameters
    ----------
    service:
        The review service.
    study_uid:
        The study.
    user:
        The reviewer's account.

    Returns
    -------
    int
        The new draft's id.

    Raises
    ------
    ReviewError
        The study has an open draft (review that one) or a signed one (add an addendum instead),
        drafting runs, or its images cannot be read.
    UnknownReviewerError
        ``user`` is not a reviewer of the installed configuration.
    """
    service.reviewer(user)
    now = service.clock()
    with service.sessions() as s:
        st = _study(s, study_uid)
        _refuse_busy(s, st, "report it from scratch")
        reason = _no_draft_reason(s, st)
        images = [(i.sop_instance_uid, i.view_position, i.path) for i in _images(s, st)]
        generation = st.generation
    if not images:
        raise ReviewError("the study has no images in the store to report from")
    sources = []
    for _uid, _view, relpath in images:
        try:
            sources.append(service.store.read_dataset(relpath, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ReviewError(f"cannot read image {_uid} of the study: {exc}") from exc
    pipe = service.config.pipeline
    indication = extract(sources, pipe.indication_sources, pipe.indication_max_chars).text
    try:
        ds = sr.build_no_ai_draft_sr(sources, reason, indication=indication)
    except sr.SRError as exc:
        raise ReviewError(f"cannot start a report for this study: {exc}") from exc
    taken: dict[str, Any] = {}

    def study_unchanged(s: Session) -> None:
        taken["study"] = _unchanged_study(s, study_uid, generation)

    def draft_row(s: Session, stored: StoredFile) -> int:
        st = taken["study"]
        job = _new_job(s, st, "manual", JobState.DONE, generation, now,
                       f"reported from scratch by {user}: {reason}")
        d = Draft(study_id=st.id, job_id=job.id, state=DraftState.IN_REVIEW, sop_instance_uid=ds.SOPInstanceUID,
                  path=stored.relpath, indication=indication, findings="", impression="",
                  token_info=TokenInfo(no_ai_draft=reason).to_json(), views=_views_json(images),
                  model_name="", model_version="", created_at=now, claimed_by=user, claimed_at=now)
        s.add(d)
        st.state = StudyState.DRAFTED
        s.flush()
        index.audit(s, user, "report_from_scratch", study_uid, ds.SOPInstanceUID, json.dumps({"reason": reason}))
        return int(d.id)

    # one commit (dicom_node.commit): the placeholder SR's file, then its index row, the manual job,
    # the draft and the audit in one transaction; the file is removed if it fails. Never enqueued
    done = commit_dataset(service.store, service.sessions, ds,
                          service.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID),
                          draft_row, registered_by=service.config.node.ae_title, prepare=study_unchanged)
    assert done.value is not None
    log.info("study %s: report from scratch started (draft %s)", study_uid, done.value)
    return done.value


def retry_drafting(service: ReviewService, study_uid: str, user: str) -> RetryResult:
    """Queue a new drafting job for a study whose drafting failed or was skipped (audited
    ``drafting_retried``).

    Parameters
    ----------
    service:
        The review service.
    study_uid:
        The study.
    user:
        The reviewer's account (audited).

    Returns
    -------
    RetryResult
        The job queued.

    Raises
    ------
    NotReviewableError
        The study is not in the index.
    ReviewError
        A job is pending or running, or the study has an open or signed draft.
    """
    service.reviewer(user)
    now = service.clock()
    with service.sessions() as s, s.begin():
        st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid).with_for_update()).one_or_none()
        if st is None:
            raise NotReviewableError(f"study {study_uid} is not in the index")
        if st.state not in (StudyState.FAILED, StudyState.SKIPPED):
            raise ReviewError("drafting is retried only for a study whose drafting failed or was skipped; "
                              "report a rejected draft's study from scratch")
        _refuse_busy(s, st, "retry drafting")
        job = _new_job(s, st, "draft", JobState.PENDING, st.generation, now,
                       f"queued again by {user} (generation {st.generation})")
        s.execute(update(Study).where(Study.id == st.id).values(state=StudyState.QUEUED)
                  .execution_options(synchronize_session=False))
        index.audit(s, user, "drafting_retried", study_uid, "",
                    json.dumps({"job": job.id, "was": st.state, "generation": st.generation}))
        result = RetryResult(study_uid, int(job.id), int(st.generation))
    log.info("study %s: drafting queued again (job %s)", study_uid, result.job_id)
    return result


def _unchanged_study(s: Session, study_uid: str, generation: int) -> Study:
    """The study row, locked, if it is still at ``generation`` and nothing else is reporting it."""
    st = s.scalars(select(Study).where(Study.study_instance_uid == study_uid).with_for_update()).one()
    if st.generation != generation:
        raise ReviewError("the study gained images just now: wait for its new draft, then open it")
    _refuse_busy(s, st, "report it from scratch")
    return st


def _views_json(images: list[tuple[str, str, str]]) -> str:
    """``Draft.views`` of a report from scratch: every image, its view as tagged."""
    return json.dumps([{"sop_instance_uid": uid, "view": (view or "UNKNOWN").upper(), "source": "tag"}
                       for uid, view, _ in images])


def _new_job(s: Session, st: Study, kind: str, state: str, generation: int, now: dt.datetime, line: str) -> Job:
    """A job row of the study (added and flushed: its id is known), its log starting with ``line``."""
    job = Job(study_id=st.id, kind=kind, state=state, study_generation=generation, attempts=0, not_before=now,
              log=f"{now:%Y-%m-%d %H:%M:%S} {line}\n", created_at=now, updated_at=now)
    s.add(job)
    s.flush()
    return job


def _refuse_busy(s: Session, st: Study, what: str) -> None:
    active = s.scalar(select(func.count(Job.id)).where(
        Job.study_id == st.id, Job.state.in_((JobState.PENDING, JobState.RUNNING))))
    if active:
        raise ReviewError(f"drafting is running for this study: wait for its draft before you {what}")
    row = s.execute(select(Draft.id, Draft.state).where(
        Draft.study_id == st.id, Draft.state.in_((DraftState.NEW, DraftState.IN_REVIEW, DraftState.SIGNED)))
        .order_by(Draft.id.desc()).limit(1)).first()
    if row is not None:
        if row[1] == DraftState.SIGNED:
            raise ReviewError(f"the study is already reported (draft {row[0]} is signed): add an addendum instead")
        raise ReviewError(f"the study has an open draft (draft {row[0]}): open and review it instead")


__all__ = ["report_from_scratch", "retry_drafting", "study_detail"]
