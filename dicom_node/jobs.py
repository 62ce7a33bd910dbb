"""The report-drafting job queue, kept in the index database.

Life of a job::

    study quiet for study.quiet_period_s  --promote-->  pending (study ``queued``)
    new instances while pending           ---------->  waits (study ``receiving``) until quiet again
    pending (not_before <= now)           --claim---->  running (leased to one worker)
    running                               --renew---->  running (lease extended while the handler works)
    running                               --done----->  done | skipped
    running, handler raised               --retry---->  pending, not_before = now + backoff_s * 2**(attempts-1)
    running, attempts == max_attempts     --fail----->  failed (last_error says why)
    running, lease expired (worker died)  --claim---->  running again (counts as an attempt), once the study is quiet

Claiming is one conditional ``UPDATE ... WHERE id = (SELECT ... LIMIT 1) AND <claimable>``
that stamps a unique lease token, so two workers (threads, processes or hosts) never hold the
same job: on SQLite the database serialises writers; on PostgreSQL the inner select uses
``FOR UPDATE SKIP LOCKED`` so concurrent workers skip each other's candidates instead of
waiting. Promotion flips the study to ``queued`` with a conditional update on the study row
in the same transaction that inserts the job, so two promoters cannot both enqueue a study.

A study that gains instances after its job ran has a higher ``Study.generation`` than the job
recorded, goes back to ``receiving`` (see :mod:`dicom_node.index`) and is promoted again once
quiet; the handler (the ``draft`` entry point of group ``cxrnode.job_handlers``) is expected to
supersede the older unsigned draft.

The promoter is the one owner of the quiet rule: only it moves a study from ``receiving`` to
``queued``. A job that is waiting for its study (pending, or running with an expired lease: its
worker died) is not claimed while the study is ``receiving``; once the study is quiet the
promoter moves it back to ``queued`` without queueing a second job, and the claim takes the
study's latest generation. (Reclaiming a dead worker's job while its study still received let
the job draft the newer generation while the study stayed ``receiving``, and the promoter then
queued that generation a second time: two drafts of one version.)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from sqlalchemy import and_, case, exists, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from dicom_node.config import Config, ConfigError, resolve_host_id
from dicom_node.db import Draft, DraftState, Job, JobState, Study, StudyState, db_utcnow, utcnow
from dicom_node.store import Store

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "cxrnode.job_handlers"


@dataclass(frozen=True)
class JobResult:
    """What a job handler reports (an exception instead = a failed attempt, retried).

    Attributes
    ----------
    state:
        ``"done"`` or ``"skipped"``.
    reason:
        Why it was skipped.
    model_name, model_version:
        The model that drafted the report.
    """

    state: str
    reason: str = ""
    model_name: str = ""
    model_version: str = ""


@dataclass(frozen=True)
class JobContext:
    """Everything a ``draft`` job handler needs (frozen).

    Attributes
    ----------
    config:
        The node's configuration.
    sessions:
        Session factory of the index.
    store:
        The node's :class:`~dicom_node.store.Store`.
    job_id:
        The ``Job`` row's id.
    study_instance_uid, study_generation:
        The study to draft and its generation when the job was queued.
    log:
        ``log(message)`` appends a line to ``Job.log``.
    """

    config: Config
    sessions: sessionmaker
    store: Store
    job_id: int
    study_instance_uid: str
    study_generation: int
    log: Callable[[str], None]


JobHandler = Callable[[JobContext], JobResult]
"""A handler may also have a ``prepare(config)`` attribute: each worker calls it once before
its first claim (e.g. to load a model), so the first study does not pay for it."""


class HandlerUnavailable(RuntimeError):
    """The job handler entry point is missing or cannot be imported."""


def load_handler(name: str = "draft") -> JobHandler:
    """The handler registered as ``name`` in entry-point group ``cxrnode.job_handlers``."""
    eps = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    if not eps:
        raise HandlerUnavailable(f"no entry point {name!r} in group {ENTRY_POINT_GROUP!r}; is the plugin installed?")
    try:
        handler = eps[0].load()
    except Exception as exc:
        raise HandlerUnavailable(
            f"entry point {name!r} ({eps[0].value}) of group {ENTRY_POINT_GROUP!r} cannot be loaded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not callable(handler):
        raise HandlerUnavailable(f"entry point {name!r} ({eps[0].value}) is not callable")
    return handler  # type: ignore[no-any-return]


def default_worker_id(host_id: str = "") -> str:
    """``<host id>:<pid>``: ``node.host_id`` (else the host name), so that workers in containers
    sharing the host's network (and so its host name) still say which one holds a lease."""
    try:
        host = resolve_host_id(host_id)
    except ConfigError:  # a host name that is no valid host id: still say which machine
        host = host_id or socket.gethostname()
    return f"{host}:{os.getpid()}"


def backoff_delay(base_s: float, attempts: int, cap_s: float | None = None) -> float:
    """``base_s * 2**(attempts-1)``, capped at ``cap_s``."""
    delay = base_s * (2 ** max(attempts - 1, 0))
    return min(delay, cap_s) if cap_s is not None else delay


def _is_postgres(sessions: sessionmaker) -> bool:
    bind = sessions.kw.get("bind")
    return bind is not None and bind.dialect.name == "postgresql"


# -- promotion -------------------------------------------------------------------------------


def promote_quiet_studies(sessions: sessionmaker, config: Config, now: dt.datetime | None = None) -> list[str]:
    """Turn studies quiet for ``study.quiet_period_s`` into pending jobs; return their UIDs."""
    if now is None:
        with sessions() as s:
            now = db_utcnow(s)  # the database's clock (shared by every host), not this host's
    cutoff = now - dt.timedelta(seconds=config.study.quiet_period_s)
    active = exists().where(Job.study_id == Study.id, Job.state.in_([JobState.PENDING, JobState.RUNNING]))
    last_gen = select(func.max(Job.study_generation)).where(Job.study_id == Study.id).scalar_subquery()
    promoted: list[str] = []
    waiting = exists().where(Job.study_id == Study.id, _waiting_for_study(now))
    with sessions() as s:
        # a study that got more images while its job was still pending, or while its job was
        # running on a worker that died (lease expired): the job takes the latest generation
        # when it is claimed, so the study only needs to be quiet again (no second job)
        s.execute(update(Study).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff, waiting)
                  .values(state=StudyState.QUEUED).execution_options(synchronize_session=False))
        s.commit()
        rows = s.execute(
            select(Study.id, Study.study_instance_uid, Study.generation)
            .where(
                Study.last_received_at <= cutoff,
                Study.state != StudyState.QUEUED,
                or_(Study.state == StudyState.RECEIVING, func.coalesce(last_gen, -1) < Study.generation),
                ~active,
            )
            .order_by(Study.last_received_at)
            .limit(100)
        ).all()
    for study_id, study_uid, generation in rows:
        try:
            with sessions() as s:
                res = s.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.generation == generation, Study.state != StudyState.QUEUED,
                           Study.last_received_at <= cutoff)
                    .values(state=StudyState.QUEUED)
                )
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    s.rollback()
                    continue
                s.execute(insert(Job).values(
                    study_id=study_id, kind="draft", state=JobState.PENDING, study_generation=generation,
                    attempts=0, not_before=now, log=f"{now:%Y-%m-%d %H:%M:%S} queued (generation {generation})\n",
                    model_name="", model_version="", created_at=now, updated_at=now,
                ))
                s.commit()
                promoted.append(study_uid)
                log.info("study %s is quiet: queued a draft job (generation %d)", study_uid, generation)
        except OperationalError as exc:  # busy database: try again next round
            log.debug("promotion of %s deferred: %s", study_uid, exc)
    return promoted


# -- claiming and finishing ------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    job_id: int
    token: str
    study_id: int
    study_instance_uid: str
    study_generation: int
    attempts: int


def _waiting_for_study(now: dt.datetime):  # type: ignore[no-untyped-def]
    """A job that runs (again) once its study is quiet: pending, or running with an expired lease."""
    return or_(Job.state == JobState.PENDING,
               and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now))


def _claimable(now: dt.datetime):  # type: ignore[no-untyped-def]
    # A job waits while its study is receiving again; the promoter (the one owner of the quiet
    # rule) moves the study back to ``queued`` once it is quiet. That holds for a dead worker's
    # job too: reclaimed while the study still received, it would draft the newer generation
    # and the promoter would queue that generation again.
    study_quiet = exists().where(Study.id == Job.study_id, Study.state == StudyState.QUEUED)
    study_not_receiving = exists().where(Study.id == Job.study_id, Study.state != StudyState.RECEIVING)
    return or_(
        and_(Job.state == JobState.PENDING, Job.not_before <= now, study_quiet),
        and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now, study_not_receiving),
    )


def claim_job(sessions: sessionmaker, config: Config, worker_id: str, now: dt.datetime | None = None) -> ClaimedJob | None:
    """Claim one job atomically (or ``None``); a job whose lease ran out too often fails here."""
    while True:
        if now is None:
            try:
                with sessions() as s:
                    now = db_utcnow(s)  # leases expire by the database's clock, not this host's
            except OperationalError as exc:
                log.debug("claim deferred: %s", exc)
                return None
        token = f"{worker_id}/{uuid.uuid4().hex[:12]}"
        candidate = select(Job.id).where(_claimable(now)).order_by(Job.not_before, Job.id).limit(1)
        if _is_postgres(sessions):
            candidate = candidate.with_for_update(skip_locked=True)
        generation = select(Study.generation).where(Study.id == Job.study_id).scalar_subquery()
        try:
            with sessions() as s:
                res = s.execute(
                    update(Job)
                    .where(Job.id == candidate.scalar_subquery(), _claimable(now))
                    .values(state=JobState.RUNNING, lease_owner=token,
                            lease_expires_at=now + dt.timedelta(seconds=config.jobs.lease_s),
                            attempts=Job.attempts + 1, study_generation=generation, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    s.rollback()
                    return None
                row = s.execute(
                    select(Job.id, Job.study_id, Study.study_instance_uid, Job.study_generation, Job.attempts)
                    .join(Study, Study.id == Job.study_id)
                    .where(Job.lease_owner == token)
                ).one()
                s.commit()
        except OperationalError as exc:
            log.debug("claim deferred: %s", exc)
            return None
        job = ClaimedJob(row[0], token, row[1], row[2], row[3], row[4])
        if job.attempts > config.jobs.max_attempts:
            _finish(sessions, job, JobState.FAILED, error=f"gave up after {job.attempts - 1} attempts "
                    "(the last worker stopped renewing its lease)")
            now = None
            continue
        return job


def renew_lease(sessions: sessionmaker, job: ClaimedJob, lease_s: float) -> bool:
    """Extend the lease; ``False`` if it was lost (another worker reclaimed the job)."""
    with sessions() as s:
        res = s.execute(update(Job).where(Job.id == job.job_id, Job.lease_owner == job.token,
                                          Job.state == JobState.RUNNING)
                        .values(lease_expires_at=db_utcnow(s) + dt.timedelta(seconds=lease_s)))
        s.commit()
        return res.rowcount == 1  # type: ignore[attr-defined,no-any-return]


def append_log(sessions: sessionmaker, job_id: int, message: str) -> None:
    line = f"{utcnow():%Y-%m-%d %H:%M:%S} {message.rstrip()}\n"
    for _ in range(5):
        try:
            with sessions() as s:
                s.execute(update(Job).where(Job.id == job_id).values(log=func.coalesce(Job.log, "") + line))
                s.commit()
                return
        except OperationalError:
            time.sleep(0.1)


_STUDY_STATE = {
    JobState.DONE: StudyState.DRAFTED,
    JobState.SKIPPED: StudyState.SKIPPED,
    JobState.FAILED: StudyState.FAILED,
}


def _study_state(job: ClaimedJob, state: str):  # type: ignore[no-untyped-def]
    """The study's state after its job ended ``state``. A job skipped because its generation
    already has a draft (made by another job) leaves the study as that draft says, not
    ``skipped`` (which the worklist shows as a study without a draft)."""
    if state != JobState.SKIPPED:
        return _STUDY_STATE[state]

    def drafted(*states: str):  # type: ignore[no-untyped-def]
        return exists(select(Draft.id).join(Job, Job.id == Draft.job_id).where(
            Draft.study_id == Study.id, Job.study_generation == job.study_generation, Draft.state.in_(states)))

    return case((drafted(DraftState.NEW, DraftState.IN_REVIEW, DraftState.REJECTED), StudyState.DRAFTED),
                (drafted(DraftState.SIGNED), StudyState.SIGNED), else_=StudyState.SKIPPED)


def _finish(sessions: sessionmaker, job: ClaimedJob, state: str, *, error: str | None = None,
            result: JobResult | None = None, duration_ms: float | None = None,
            not_before: dt.datetime | None = None, retry_in_s: float | None = None) -> bool:
    """Record the outcome if we still hold the lease; move the study along if it is unchanged."""
    values: dict[str, object] = {"state": state, "lease_owner": None, "lease_expires_at": None}
    if error is not None:
        values["last_error"] = error
    if result is not None:
        values["model_name"] = result.model_name[:64]
        values["model_version"] = result.model_version[:32]
        values["last_error"] = result.reason or None  # skipped: why; done: clears an earlier error
    if duration_ms is not None:
        values["duration_ms"] = duration_ms
    if not_before is not None:
        values["not_before"] = not_before
    with sessions() as s:
        now = db_utcnow(s)  # the database's clock: a retry is due when every host agrees it is
        values["updated_at"] = now
        if retry_in_s is not None:
            values["not_before"] = now + dt.timedelta(seconds=retry_in_s)
        res = s.execute(update(Job).where(Job.id == job.job_id, Job.lease_owner == job.token).values(**values))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            s.rollback()
            log.warning("job %d: lease lost before it finished; outcome %s discarded", job.job_id, state)
            return False
        if state in _STUDY_STATE:
            s.execute(update(Study).where(Study.id == job.study_id, Study.generation == job.study_generation,
                                          Study.state == StudyState.QUEUED).values(state=_study_state(job, state)))
            # The study gained instances while this job ran and the promoter, seeing the lease
            # expired, marked it quiet again for this job; but the worker was alive and finished
            # the older generation. No job is left to draft the newer one: hand the study back to
            # the promoter (it queues the newer generation) instead of leaving it ``queued``.
            others = exists().where(Job.study_id == Study.id, Job.id != job.job_id,
                                    Job.state.in_([JobState.PENDING, JobState.RUNNING]))
            s.execute(update(Study).where(Study.id == job.study_id, Study.generation != job.study_generation,
                                          Study.state == StudyState.QUEUED, ~others)
                      .values(state=StudyState.RECEIVING).execution_options(synchronize_session=False))
        s.commit()
    return True


def run_job(job: ClaimedJob, handler: JobHandler, config: Config, sessions: sessionmaker, store: Store) -> str:
    """Run ``handler`` on a claimed job, renewing its lease; return the job's new state."""
    ctx = JobContext(config=config, sessions=sessions, store=store, job_id=job.job_id,
                     study_instance_uid=job.study_instance_uid, study_generation=job.study_generation,
                     log=lambda message: append_log(sessions, job.job_id, message))
    # the worker's id (node.host_id:pid:thread): with workers on several hosts (or containers sharing
    # one host name), the log says which one ran it
    append_log(sessions, job.job_id, f"attempt {job.attempts} started (generation {job.study_generation}) "
                                     f"by worker {job.token.rsplit('/', 1)[0]}")
    stop = threading.Event()
    lost = threading.Event()

    def heartbeat() -> None:
        interval = max(config.jobs.lease_s / 3, 0.05)
        while not stop.wait(interval):
            try:
                if not renew_lease(sessions, job, config.jobs.lease_s):
                    lost.set()
                    return
            except Exception:  # a busy database: try again at the next beat
                log.debug("lease renewal of job %d failed", job.job_id, exc_info=True)

    beat = threading.Thread(target=heartbeat, name=f"lease-{job.job_id}", daemon=True)
    beat.start()
    started = time.monotonic()
    error: str | None = None
    result: JobResult | None = None
    try:
        result = handler(ctx)
        if not isinstance(result, JobResult) or result.state not in (JobState.DONE, JobState.SKIPPED):
            error = f"handler returned {result!r}; expected JobResult with state 'done' or 'skipped'"
            result = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("job %d (study %s) attempt %d failed: %s", job.job_id, job.study_instance_uid, job.attempts, error)
        log.debug("job %d traceback:\n%s", job.job_id, traceback.format_exc())
    finally:
        stop.set()
        beat.join()
    duration_ms = (time.monotonic() - started) * 1000
    if lost.is_set():
        log.warning("job %d: lease lost while running", job.job_id)
    if result is not None:
        note = f"{result.state}" + (f": {result.reason}" if result.reason else "")
        append_log(sessions, job.job_id, note)
        if _finish(sessions, job, result.state, result=result, duration_ms=duration_ms):
            log.info("job %d (study %s) %s in %.0f ms", job.job_id, job.study_instance_uid, result.state, duration_ms)
        return result.state
    assert error is not None
    append_log(sessions, job.job_id, f"attempt {job.attempts} failed: {error}")
    if job.attempts >= config.jobs.max_attempts:
        _finish(sessions, job, JobState.FAILED, error=error, duration_ms=duration_ms)
        log.error("job %d (study %s) failed for good after %d attempts", job.job_id, job.study_instance_uid, job.attempts)
        return JobState.FAILED
    delay = backoff_delay(config.jobs.backoff_s, job.attempts)
    _finish(sessions, job, JobState.PENDING, error=error, duration_ms=duration_ms,
            retry_in_s=delay)
    log.info("job %d will be retried in %.0f s", job.job_id, delay)
    return JobState.PENDING


# -- threads ---------------------------------------------------------------------------------


class Promoter(threading.Thread):
    """Promotes quiet studies. It sleeps until the earliest receiving study becomes quiet, or
    until ``received`` says an instance arrived (at most ``jobs.poll_interval_s``, which is what
    other processes sharing the database rely on), and sets ``wake`` when it queued a job, so an
    idle worker claims it at once instead of at its next poll."""

    def __init__(self, config: Config, sessions: sessionmaker, stop: threading.Event,
                 wake: threading.Event | None = None, received: threading.Event | None = None) -> None:
        super().__init__(name="cxrnode-promoter", daemon=True)
        self.config, self.sessions, self.stop_event = config, sessions, stop
        self.wake = wake or threading.Event()
        self.received = received or stop

    def run(self) -> None:
        check_at = 0.0  # monotonic time of the next look at the database
        while not self.stop_event.is_set():
            if time.monotonic() >= check_at:
                try:
                    if promote_quiet_studies(self.sessions, self.config):
                        self.wake.set()
                    delay = seconds_until_next_quiet(self.sessions, self.config)
                except Exception:
                    log.exception("promoting quiet studies failed")
                    delay = None
                poll = self.config.jobs.poll_interval_s
                check_at = time.monotonic() + (poll if delay is None else min(poll, max(delay, 0.01)))
            if self.received.wait(max(check_at - time.monotonic(), 0.0)) and not self.stop_event.is_set():
                self.received.clear()
                # the study that just got an instance cannot be quiet before quiet_period_s from
                # now: no need to ask the database on every instance of a busy ingest
                check_at = min(check_at, time.monotonic() + self.config.study.quiet_period_s)


def seconds_until_next_quiet(sessions: sessionmaker, config: Config) -> float | None:
    """Seconds until the earliest study still receiving has been quiet long enough (None: none is)."""
    with sessions() as s:
        first = s.execute(select(func.min(Study.last_received_at)).where(Study.state == StudyState.RECEIVING)).scalar()
        if first is None:
            return None
        now = db_utcnow(s)
    return (first - now).total_seconds() + config.study.quiet_period_s


class Worker(threading.Thread):
    """Claims and runs jobs until stopped. Without a handler, jobs stay pending (logged)."""

    HANDLER_RETRY_S = 30.0

    def __init__(self, config: Config, sessions: sessionmaker, store: Store, stop: threading.Event,
                 handler: JobHandler | None = None, worker_id: str | None = None, index: int = 0,
                 wake: threading.Event | None = None) -> None:
        super().__init__(name=f"cxrnode-worker-{index}", daemon=True)
        self.config, self.sessions, self.store, self.stop_event = config, sessions, store, stop
        self.wake = wake or threading.Event()
        self.handler = handler
        self._prepared = False
        self.worker_id = worker_id or f"{default_worker_id(config.node.host_id)}:{index}"
        self._next_load = 0.0

    def _resolve(self) -> JobHandler | None:
        if self.handler is None and time.monotonic() >= self._next_load:
            try:
                self.handler = load_handler("draft")
            except HandlerUnavailable as exc:
                self._next_load = time.monotonic() + self.HANDLER_RETRY_S
                log.error("%s: jobs stay pending; retrying in %.0f s", exc, self.HANDLER_RETRY_S)
        if self.handler is not None and not self._prepared:
            self._prepared = True
            prepare = getattr(self.handler, "prepare", None)
            if callable(prepare):
                try:
                    prepare(self.config)
                except Exception:  # the job itself will fail with the reason, visibly
                    log.exception("preparing the job handler failed")
        return self.handler

    def run(self) -> None:
        while not self.stop_event.is_set():
            handler = self._resolve()
            job = None
            if handler is not None:
                try:
                    job = claim_job(self.sessions, self.config, self.worker_id)
                except Exception:
                    log.exception("claiming a job failed")
            if job is None:
                if self.wake.wait(self.config.jobs.poll_interval_s):
                    self.wake.clear()
                continue
            assert handler is not None
            try:
                run_job(job, handler, self.config, self.sessions, self.store)
            except Exception:
                log.exception("job %d: recording its outcome failed", job.job_id)
