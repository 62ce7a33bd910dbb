"""The index and the job queue, on SQLite and (marked ``postgres``) PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pydicom
import pytest
from dcmnode_helpers import NIH, make_instance, send_raw, wait_for
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.db import (
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    session_factory,
    utcnow,
)
from dicom_node.index import audit, register_instance
from dicom_node.jobs import (
    HandlerUnavailable,
    JobContext,
    JobResult,
    backoff_delay,
    claim_job,
    load_handler,
    promote_quiet_studies,
    renew_lease,
    run_job,
)
from dicom_node.store import Store

T0 = dt.datetime(2020, 1, 1, 12, 0, 0)  # instances arrived long ago


@pytest.fixture
def sessions(database_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def template() -> pydicom.Dataset:
    return pydicom.dcmread(NIH, stop_before_pixels=True)


def add_instance(sessions, template, study_uid: str, at: dt.datetime, sop_uid: str | None = None,  # type: ignore[no-untyped-def]
                 sha: str = "0" * 64, generated: bool = False) -> None:
    ds = pydicom.Dataset()
    ds.update(template)
    ds.file_meta = template.file_meta
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=None, entropy_srcs=[study_uid])
    ds.SOPInstanceUID = sop_uid or generate_uid()
    with sessions() as s:
        register_instance(s, ds, f"instances/{ds.SOPInstanceUID}.dcm", 10, sha, "MODALITY", generated=generated)
        s.execute(Study.__table__.update().where(Study.study_instance_uid == study_uid).values(last_received_at=at))
        audit(s, "MODALITY", "received", study_uid, str(ds.SOPInstanceUID))
        s.commit()


def study(sessions, uid: str) -> Study:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def jobs(sessions) -> list[Job]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


# -- index ----------------------------------------------------------------------------------


def test_register_instance_generation_rules(sessions, template) -> None:  # type: ignore[no-untyped-def]
    uid, sop = generate_uid(), generate_uid()
    add_instance(sessions, template, uid, T0, sop)
    add_instance(sessions, template, uid, T0, sop)  # same content again: idempotent
    assert study(sessions, uid).generation == 1
    add_instance(sessions, template, uid, T0, sop, sha="1" * 64)  # new content
    assert study(sessions, uid).generation == 2
    add_instance(sessions, template, uid, T0, generated=True)  # our own SR: no bump
    st = study(sessions, uid)
    assert st.generation == 2 and st.patient_id == template.PatientID
    with sessions() as s:
        assert len(s.scalars(select(Instance)).all()) == 2


# -- promotion ------------------------------------------------------------------------------


def test_promotes_only_quiet_studies_once(sessions, template, make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 10})
    quiet, busy = generate_uid(), generate_uid()
    add_instance(sessions, template, quiet, T0)
    add_instance(sessions, template, busy, T0 + dt.timedelta(seconds=8))
    assert promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(seconds=11)) == [quiet]
    assert promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(seconds=12)) == []
    assert study(sessions, quiet).state == StudyState.QUEUED
    assert study(sessions, busy).state == StudyState.RECEIVING
    assert [(j.state, j.study_generation) for j in jobs(sessions)] == [(JobState.PENDING, 1)]
    assert promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(seconds=30)) == [busy]


def test_concurrent_promoters_enqueue_a_study_once(sessions, template, make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1})
    uids = [generate_uid() for _ in range(10)]
    for u in uids:
        add_instance(sessions, template, u, T0)
    results: list[list[str]] = []
    barrier = threading.Barrier(4)

    def promote() -> None:
        barrier.wait()
        results.append(promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(seconds=5)))

    threads = [threading.Thread(target=promote) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    promoted = [u for r in results for u in r]
    assert sorted(promoted) == sorted(uids)
    assert len(jobs(sessions)) == 10


# -- claiming -------------------------------------------------------------------------------


def _queue(sessions, template, config, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    uids = [generate_uid() for _ in range(n)]
    for u in uids:
        add_instance(sessions, template, u, T0)
    promote_quiet_studies(sessions, config)
    return uids


def test_two_workers_never_claim_the_same_job(sessions, template, make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1})
    _queue(sessions, template, config, 30)
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        mine: list[int] = []
        barrier.wait()
        while True:
            job = claim_job(sessions, config, name)
            if job is None:
                # a busy SQLite can defer a claim; stop only when nothing is claimable
                with sessions() as s:
                    if not s.scalars(select(Job.id).where(Job.state == JobState.PENDING)).first():
                        break
                time.sleep(0.01)
                continue
            mine.append(job.job_id)
        claimed[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [j for ids in claimed.values() for j in ids]
    assert len(all_ids) == 30
    assert len(set(all_ids)) == 30  # nobody got a job twice
    owners = {j.lease_owner.split("/")[0] for j in jobs(sessions)}
    assert owners <= {"w0", "w1", "w2", "w3"}
    assert all(j.state == JobState.RUNNING and j.attempts == 1 for j in jobs(sessions))


def test_expired_lease_is_reclaimed_and_old_worker_cannot_finish(sessions, template, make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1}, jobs={"lease_s": 60, "max_attempts": 3})
    _queue(sessions, template, config, 1)
    now = utcnow()
    a = claim_job(sessions, config, "A", now=now)
    assert a is not None
    assert claim_job(sessions, config, "B", now=now + dt.timedelta(seconds=30)) is None  # lease still held
    assert renew_lease(sessions, a, 60)
    b = claim_job(sessions, config, "B", now=now + dt.timedelta(seconds=3600))  # A died: lease ran out
    assert b is not None and b.job_id == a.job_id and b.attempts == 2
    assert not renew_lease(sessions, a, 60)  # A lost it
    store = Store(tmp_path / "store")
    assert run_job(a, lambda ctx: JobResult("done"), config, sessions, store) == "done"
    assert jobs(sessions)[0].state == JobState.RUNNING  # A's outcome was discarded
    assert run_job(b, lambda ctx: JobResult("done", model_name="m", model_version="1"), config, sessions, store) == "done"
    j = jobs(sessions)[0]
    assert j.state == JobState.DONE and j.model_name == "m" and j.lease_owner is None


def test_lease_expiring_too_often_fails_the_job(sessions, template, make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1}, jobs={"lease_s": 10, "max_attempts": 2})
    uid = _queue(sessions, template, config, 1)[0]
    now = utcnow()
    assert claim_job(sessions, config, "A", now=now) is not None
    assert claim_job(sessions, config, "B", now=now + dt.timedelta(seconds=60)) is not None
    assert claim_job(sessions, config, "C", now=now + dt.timedelta(seconds=120)) is None
    j = jobs(sessions)[0]
    assert j.state == JobState.FAILED and "lease" in (j.last_error or "")
    assert study(sessions, uid).state == StudyState.FAILED


def test_failures_retry_with_backoff_then_fail(sessions, template, make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1}, jobs={"backoff_s": 100, "max_attempts": 3})
    uid = _queue(sessions, template, config, 1)[0]
    store = Store(tmp_path / "store")
    calls: list[JobContext] = []

    def broken(ctx: JobContext) -> JobResult:
        calls.append(ctx)
        ctx.log("looking at the study")
        raise RuntimeError("model bundle missing")

    now = utcnow()
    for attempt in (1, 2, 3):
        job = claim_job(sessions, config, "w", now=now)
        assert job is not None and job.attempts == attempt
        state = run_job(job, broken, config, sessions, store)
        j = jobs(sessions)[0]
        assert j.last_error == "RuntimeError: model bundle missing"
        if attempt < 3:
            assert state == JobState.PENDING
            delay = (j.not_before - utcnow()).total_seconds()
            assert backoff_delay(100, attempt) - 60 < delay <= backoff_delay(100, attempt)
            assert claim_job(sessions, config, "w") is None  # not due yet
            now = j.not_before + dt.timedelta(seconds=1)
        else:
            assert state == JobState.FAILED
    assert j.state == JobState.FAILED and j.attempts == 3
    assert "looking at the study" in j.log and "attempt 3 failed" in j.log
    assert study(sessions, uid).state == StudyState.FAILED
    assert [c.study_instance_uid for c in calls] == [uid] * 3


def test_new_instances_after_the_job_requeue_the_study(sessions, template, make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1})
    uid = _queue(sessions, template, config, 1)[0]
    store = Store(tmp_path / "store")
    job = claim_job(sessions, config, "w")
    assert job is not None and job.study_generation == 1
    # an image arrives while the job runs: the outcome must not mark the new generation drafted
    add_instance(sessions, template, uid, T0 + dt.timedelta(hours=2))
    assert run_job(job, lambda ctx: JobResult("done"), config, sessions, store) == JobState.DONE
    assert study(sessions, uid).state == StudyState.RECEIVING
    assert promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(hours=3)) == [uid]
    with sessions() as s:  # due now
        s.execute(Job.__table__.update().values(not_before=T0))
        s.commit()
    job2 = claim_job(sessions, config, "w")
    assert job2 is not None and job2.study_generation == 2
    seen: list[int] = []
    run_job(job2, lambda ctx: (seen.append(ctx.study_generation), JobResult("skipped", reason="no frontal view"))[1],
            config, sessions, store)
    assert seen == [2]
    st = study(sessions, uid)
    assert st.state == StudyState.SKIPPED
    assert [(j.state, j.study_generation) for j in jobs(sessions)] == [(JobState.DONE, 1), (JobState.SKIPPED, 2)]
    assert jobs(sessions)[1].last_error == "no frontal view"
    # nothing new: no third job
    assert promote_quiet_studies(sessions, config, now=T0 + dt.timedelta(hours=5)) == []


def test_bad_handler_result_counts_as_failure(sessions, template, make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(study={"quiet_period_s": 1}, jobs={"max_attempts": 1})
    _queue(sessions, template, config, 1)
    job = claim_job(sessions, config, "w")
    assert job is not None
    assert run_job(job, lambda ctx: "ok", config, sessions, Store(tmp_path / "s")) == JobState.FAILED  # type: ignore[arg-type,return-value]
    assert "expected JobResult" in (jobs(sessions)[0].last_error or "")


def test_missing_handler_entry_point_is_a_clear_error() -> None:
    with pytest.raises(HandlerUnavailable, match="no entry point 'nope'"):
        load_handler("nope")


# -- the node end to end ---------------------------------------------------------------------


def test_node_drafts_a_received_study(make_config, start_node, database_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, int, int]] = []

    def handler(ctx: JobContext) -> JobResult:
        with ctx.sessions() as s:
            n = len(s.scalars(select(Instance).join(Study).where(Study.study_instance_uid == ctx.study_instance_uid)).all())
        seen.append((ctx.study_instance_uid, ctx.study_generation, n))
        ctx.log(f"{n} instances")
        return JobResult("done", model_name="test", model_version="0")

    node = start_node(make_config(node={"database_url": database_url}, study={"quiet_period_s": 0.3},
                                  jobs={"workers": 2}), job_handler=handler)
    uid = generate_uid()
    template = pydicom.dcmread(NIH)
    files = [make_instance(tmp_path / f"{i}.dcm", uid, template=template) for i in range(3)]
    assert send_raw(node.port, files) == [0, 0, 0]
    wait_for(lambda: study(node.sessions, uid).state == StudyState.DRAFTED)
    assert seen == [(uid, 3, 3)]
    j = jobs(node.sessions)[0]
    assert j.state == JobState.DONE and j.model_name == "test" and "3 instances" in j.log


def test_quiet_study_is_drafted_without_waiting_for_the_poll(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The promoter wakes when the study becomes quiet and wakes an idle worker; the handler's
    ``prepare`` runs once per worker before its first claim. With a 60 s poll interval the
    study could not be drafted within the 20 s wait otherwise."""
    prepared: list[str] = []

    def handler(ctx: JobContext) -> JobResult:
        return JobResult("done")

    handler.prepare = lambda config: prepared.append(config.node.ae_title)  # type: ignore[attr-defined]
    node = start_node(make_config(study={"quiet_period_s": 0.3}, jobs={"workers": 1, "poll_interval_s": 60.0}),
                      job_handler=handler)
    wait_for(lambda: prepared, timeout=20)
    uid = generate_uid()
    files = [make_instance(tmp_path / f"{i}.dcm", uid, template=pydicom.dcmread(NIH)) for i in range(2)]
    assert send_raw(node.port, files) == [0, 0]
    wait_for(lambda: study(node.sessions, uid).state == StudyState.DRAFTED, timeout=20)
    assert prepared == ["CXRNODE"]


def test_promoter_does_not_query_the_database_per_received_instance(sessions, make_config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A busy ingest wakes the promoter on every instance; it looks at the database again only
    when a study could have become quiet (quiet_period_s later) or at the poll interval."""
    import dicom_node.jobs as jobs_mod

    calls: list[float] = []
    real = jobs_mod.seconds_until_next_quiet

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs_mod, "seconds_until_next_quiet", counting)
    stop, received = threading.Event(), threading.Event()
    cfg = make_config(study={"quiet_period_s": 0.5}, jobs={"poll_interval_s": 30.0})
    p = jobs_mod.Promoter(cfg, sessions, stop, received=received)
    p.start()
    try:
        wait_for(lambda: len(calls) == 1, timeout=10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.2:  # 120 "instance arrived" signals in 1.2 s
            received.set()
            time.sleep(0.01)
        wait_for(lambda: len(calls) >= 2, timeout=5)
        # one look per quiet period at most, not one per instance
        assert 2 <= len(calls) <= 5, len(calls)
        assert all(b - a >= 0.45 for a, b in zip(calls[1:], calls[2:], strict=False))
    finally:
        stop.set()
        received.set()
        p.join(5)
