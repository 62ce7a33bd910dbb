"""Following a study from the command line: ``cxrnode jobs`` (list, show, retry) and the queue
figures of ``cxrnode status --json`` / ``--prometheus``.

Everything here reads the index database with UIDs only: no patient names or IDs are returned.
A retry is audited (:func:`dicom_node.index.audit`, action ``job_retried``) and noted in the
job's own log.

Metrics of ``cxrnode status --prometheus FILE`` (a node_exporter textfile; written atomically)::

    cxrnode_studies{state}                             studies per state
    cxrnode_jobs{state}                                jobs per state (pending, running, done, skipped, failed, superseded)
    cxrnode_jobs_waiting_with_errors                   pending/running jobs whose last attempt failed
    cxrnode_oldest_pending_job_age_seconds             age of the oldest pending job (0: none)
    cxrnode_drafts_waiting_review                      drafts new or in review
    cxrnode_oldest_draft_waiting_review_age_seconds    age of the oldest of them (0: none)
    cxrnode_outbound_waiting{destination}              transfers pending or sending, per destination
    cxrnode_outbound_failed{destination}               transfers failed for good, per destination
    cxrnode_status_generated_timestamp_seconds         when the file was written (alert on staleness)

The ``/metrics`` endpoint of ``serve`` and ``worker`` (:mod:`dicom_node.health`) serves the same
metrics from the same functions (:func:`status_counts`, :func:`queue_summary`,
:func:`status_registry`), plus ``cxrnode_job_duration_seconds`` (:func:`job_durations`, a histogram
of the handler's time per finished job), all database-wide.

Example alerts: ``cxrnode_oldest_pending_job_age_seconds > 900`` (a stuck queue),
``cxrnode_jobs{state="failed"} > 0``, ``time() - cxrnode_status_generated_timestamp_seconds > 600``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from dicom_node.config import Config
from dicom_node.db import (
    Draft,
    DraftState,
    Job,
    JobState,
    Study,
    StudyState,
    Transfer,
    TransferState,
    db_utcnow,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

JOBS_SCHEMA = "cxrnode.jobs/1"
JOB_SCHEMA = "cxrnode.job/1"
WAITING_REVIEW = (DraftState.NEW, DraftState.IN_REVIEW)


def _ts(value: dt.datetime | None) -> str | None:
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"


def _age(now: dt.datetime, then: dt.datetime | None) -> float | None:
    return None if then is None else round(max((now - then).total_seconds(), 0.0), 1)


def queue_summary(s: Session, config: Config, now: dt.datetime | None = None) -> dict[str, Any]:
    """Queue depth and ages for ``status --json`` (key ``queue``) and the Prometheus metrics."""
    now = now or db_utcnow(s)  # ages by the database's clock, as the queue decides
    waiting = (JobState.PENDING, JobState.RUNNING)
    oldest_pending = s.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.PENDING))
    with_errors = s.scalar(select(func.count()).select_from(Job).where(
        Job.state.in_(waiting), Job.last_error.is_not(None), Job.last_error != "")) or 0
    drafts_waiting = s.scalar(select(func.count()).select_from(Draft).where(Draft.state.in_(WAITING_REVIEW))) or 0
    oldest_draft = s.scalar(select(func.min(Draft.created_at)).where(Draft.state.in_(WAITING_REVIEW)))
    out_waiting = {d.name: 0 for d in config.destinations}
    out_failed = {d.name: 0 for d in config.destinations}
    for dest, state, n in s.execute(select(Transfer.destination, Transfer.state, func.count())
                                    .group_by(Transfer.destination, Transfer.state)).all():
        if state in (TransferState.PENDING, TransferState.SENDING):
            out_waiting[dest] = out_waiting.get(dest, 0) + int(n)
        elif state == TransferState.FAILED:
            out_failed[dest] = out_failed.get(dest, 0) + int(n)
            out_waiting.setdefault(dest, 0)
    jobs = dict(Counter(s.scalars(select(Job.state)).all()))
    return {
        "jobs_pending": int(jobs.get(JobState.PENDING, 0)),
        "jobs_running": int(jobs.get(JobState.RUNNING, 0)),
        "jobs_waiting_with_errors": int(with_errors),
        "oldest_pending_job_age_s": _age(now, oldest_pending),
        "drafts_waiting_review": int(drafts_waiting),
        "oldest_draft_waiting_review_age_s": _age(now, oldest_draft),
        "outbound_waiting": out_waiting,
        "outbound_failed": out_failed,
    }


# -- jobs ------------------------------------------------------------------------------------


def _job_row(j: Job, study_uid: str) -> dict[str, Any]:
    return {"id": j.id, "study_instance_uid": study_uid, "state": j.state, "attempts": j.attempts,
            "study_generation": j.study_generation, "last_error": j.last_error or None,
            "model_name": j.model_name, "model_version": j.model_version,
            "duration_ms": None if j.duration_ms is None else round(j.duration_ms, 1),
            "created_at": _ts(j.created_at), "updated_at": _ts(j.updated_at), "not_before": _ts(j.not_before)}


def list_jobs(s: Session, states: list[str] | None = None, study_uid: str = "", limit: int = 100) -> list[dict[str, Any]]:
    """Jobs, newest first, optionally only some states or one study."""
    q = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id)
    if states:
        q = q.where(Job.state.in_(states))
    if study_uid:
        q = q.where(Study.study_instance_uid == study_uid)
    return [_job_row(j, uid) for j, uid in s.execute(q.order_by(Job.id.desc()).limit(limit)).all()]


def _input_check(token_info: str) -> dict[str, Any] | None:
    try:
        info = json.loads(token_info) if token_info else {}
    except ValueError:
        return None
    check = info.get("input_check") if isinstance(info, dict) else None
    return check if isinstance(check, dict) else None


def job_detail(s: Session, config: Config, job_id: int) -> dict[str, Any] | None:
    """One job with its whole log, its study and the SRs it wrote (with the input gate's outcome)."""
    row = s.execute(select(Job, Study).join(Study, Study.id == Job.study_id).where(Job.id == job_id)).first()
    if row is None:
        return None
    job, study = row
    root = config.storage_path.resolve()
    drafts = s.scalars(select(Draft).where(Draft.job_id == job_id).order_by(Draft.id)).all()
    newer = s.scalar(select(func.max(Job.id)).where(Job.study_id == study.id, Job.id > job_id))
    return {
        "schema": JOB_SCHEMA,
        **_job_row(job, study.study_instance_uid),
        "study": {"state": study.state, "generation": study.generation, "last_received_at": _ts(study.last_received_at)},
        "newer_job_id": newer,
        "log": job.log or "",
        "srs": [
            {"draft_id": d.id, "state": d.state, "sop_instance_uid": d.sop_instance_uid,
             "path": str(root / d.path) if d.path else None, "model": f"{d.model_name} {d.model_version}".strip(),
             "created_at": _ts(d.created_at), "input_check": _input_check(d.token_info),
             "signed_sop_instance_uid": d.signed_sop_instance_uid,
             "signed_path": str(root / d.signed_path) if d.signed_path else None,
             "signed_by": d.signed_by, "signed_at": _ts(d.signed_at)}
            for d in drafts
        ],
    }


class RetryRefused(Exception):
    """The job cannot be retried (the reason says why)."""


@dataclass(frozen=True)
class Retried:
    job_id: int
    study_instance_uid: str
    was: str


def retry_job(s: Session, job_id: int, actor: str) -> Retried:
    """Put a failed job back in the queue (attempts from zero), or make a pending one due now.
    Refused for a job a newer job of its study replaced, and for running/done/skipped jobs.
    Audited; the caller commits."""
    from dicom_node.index import audit

    row = s.execute(select(Job, Study).join(Study, Study.id == Job.study_id).where(Job.id == job_id)).first()
    if row is None:
        raise RetryRefused(f"job {job_id}: no such job")
    job, study = row
    if job.state not in (JobState.FAILED, JobState.PENDING):
        raise RetryRefused(f"job {job_id} is {job.state}: only failed or pending jobs can be retried")
    newer = s.scalar(select(func.max(Job.id)).where(Job.study_id == study.id, Job.id > job_id))
    if newer is not None:
        raise RetryRefused(f"job {job_id}: the study has a newer job ({newer}); retry that one")
    now = db_utcnow(s)  # due now by the clock every worker claims by
    was = job.state
    detail = f"job {job_id} was {was} after {job.attempts} attempt(s)" + (f": {job.last_error}" if job.last_error else "")
    job.state, job.not_before, job.updated_at = JobState.PENDING, now, now
    job.lease_owner, job.lease_expires_at = None, None
    if was == JobState.FAILED:
        job.attempts = 0
    job.log = (job.log or "") + f"{now:%Y-%m-%d %H:%M:%S} retried by {actor} (was {was})\n"
    if study.state in (StudyState.FAILED, StudyState.QUEUED) and study.generation >= job.study_generation:
        study.state = StudyState.QUEUED  # claimable again (a study still receiving is promoted when quiet)
    audit(s, actor, "job_retried", study_uid=study.study_instance_uid, detail=detail[:2000])
    return Retried(job_id, study.study_instance_uid, was)


def retry_failed(s: Session, actor: str) -> tuple[list[Retried], list[str]]:
    """Retry every failed job that no newer job replaced; returns (retried, refusals)."""
    done: list[Retried] = []
    refused: list[str] = []
    for job_id in s.scalars(select(Job.id).where(Job.state == JobState.FAILED).order_by(Job.id)).all():
        try:
            done.append(retry_job(s, job_id, actor))
        except RetryRefused as exc:
            refused.append(str(exc))
    return done, refused


# -- prometheus ------------------------------------------------------------------------------


def status_counts(s: Session) -> dict[str, dict[str, int]]:
    """Studies, jobs and outbound transfers per state (``status --json``'s ``counts``)."""
    def per_state(column: Any) -> dict[str, int]:
        return {state: int(n) for state, n in s.execute(select(column, func.count()).group_by(column)).all()}

    return {"studies": per_state(Study.state), "jobs": per_state(Job.state), "outbound": per_state(Transfer.state)}


#: upper bounds (seconds) of the job duration histogram: a draft takes seconds on a CPU
JOB_DURATION_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def job_durations(s: Session, buckets_s: tuple[float, ...] = JOB_DURATION_BUCKETS_S) -> dict[str, Any]:
    """Durations of finished jobs (done or skipped; the handler's run, ``Job.duration_ms``) as a
    cumulative histogram: ``{"buckets": [(le_s, count), ...], "count": n, "sum_s": total}``."""
    finished = and_(Job.state.in_((JobState.DONE, JobState.SKIPPED)), Job.duration_ms.is_not(None))
    row = s.execute(select(
        func.count(), func.coalesce(func.sum(Job.duration_ms), 0.0),
        *[func.coalesce(func.sum(case((Job.duration_ms <= b * 1000.0, 1), else_=0)), 0) for b in buckets_s],
    ).where(finished)).one()
    return {"buckets": [(b, int(n)) for b, n in zip(buckets_s, row[2:], strict=True)],
            "count": int(row[0]), "sum_s": float(row[1]) / 1000.0}


def status_registry(report: dict[str, Any], durations: dict[str, Any] | None = None) -> CollectorRegistry:
    """The queue figures of ``report`` (``counts``, ``queue``, ``generated_at`` as in
    ``collect_status``) as Prometheus metrics in a registry of their own; with ``durations``
    (:func:`job_durations`) also ``cxrnode_job_duration_seconds``. Shared by ``status
    --prometheus`` and the ``/metrics`` endpoint (:mod:`dicom_node.health`)."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    q = report["queue"]
    studies = Gauge("cxrnode_studies", "Studies per state", ["state"], registry=reg)
    for state, n in report["counts"]["studies"].items():
        studies.labels(state).set(n)
    jobs = Gauge("cxrnode_jobs", "Report-drafting jobs per state", ["state"], registry=reg)
    for state in (JobState.PENDING, JobState.RUNNING, JobState.DONE, JobState.SKIPPED, JobState.FAILED,
                  JobState.SUPERSEDED):
        jobs.labels(state).set(report["counts"]["jobs"].get(state, 0))
    Gauge("cxrnode_jobs_waiting_with_errors", "Pending or running jobs whose last attempt failed",
          registry=reg).set(q["jobs_waiting_with_errors"])
    Gauge("cxrnode_oldest_pending_job_age_seconds", "Age of the oldest pending job (0: none)",
          registry=reg).set(q["oldest_pending_job_age_s"] or 0)
    Gauge("cxrnode_drafts_waiting_review", "Drafts new or in review", registry=reg).set(q["drafts_waiting_review"])
    Gauge("cxrnode_oldest_draft_waiting_review_age_seconds", "Age of the oldest draft waiting for review (0: none)",
          registry=reg).set(q["oldest_draft_waiting_review_age_s"] or 0)
    waiting = Gauge("cxrnode_outbound_waiting", "Outbound transfers pending or sending", ["destination"], registry=reg)
    for dest, n in q["outbound_waiting"].items():
        waiting.labels(dest).set(n)
    failed = Gauge("cxrnode_outbound_failed", "Outbound transfers failed for good", ["destination"], registry=reg)
    for dest, n in q["outbound_failed"].items():
        failed.labels(dest).set(n)
    generated = dt.datetime.fromisoformat(report["generated_at"].removesuffix("Z")).replace(tzinfo=dt.UTC)
    Gauge("cxrnode_status_generated_timestamp_seconds", "When this status was generated (Unix time)",
          registry=reg).set(generated.timestamp())
    if durations is not None:
        _DurationHistogram(durations).register_in(reg)
    return reg


class _DurationHistogram:
    """``cxrnode_job_duration_seconds``: the database's figures (:func:`job_durations`) as a
    histogram family (a custom collector: the library's Histogram only counts observations made
    in this process)."""

    def __init__(self, durations: dict[str, Any]) -> None:
        self.durations = durations

    def register_in(self, reg: CollectorRegistry) -> None:
        reg.register(self)  # type: ignore[arg-type]

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        d = self.durations
        family = HistogramMetricFamily("cxrnode_job_duration_seconds",
                                       "Time the handler took per finished (done or skipped) drafting job")
        family.add_metric([], [(_le(b), n) for b, n in d["buckets"]] + [("+Inf", d["count"])], d["sum_s"])
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


def write_prometheus(report: dict[str, Any], path: str) -> None:
    """Write ``report`` (``collect_status``'s dict) as a node_exporter textfile (atomically), or
    to stdout when ``path`` is ``-``."""
    from prometheus_client import generate_latest, write_to_textfile

    reg = status_registry(report)
    if path == "-":
        os.write(1, generate_latest(reg))
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(path, reg)
