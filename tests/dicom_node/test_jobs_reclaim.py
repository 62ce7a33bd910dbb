"""A dead worker's job is reclaimed only once its study is quiet, and one version (generation) of
a study gets one draft: on SQLite and on the real PostgreSQL of ``CXRNODE_TEST_POSTGRES_URL``
(a private database per test, tests/support/postgres.py).

The first test is the reproduction of the double draft found by the scale-out work
(a job reclaimed while its study still received took the newer generation; the study stayed
``receiving`` and the promoter queued that generation again): it fails on the code before the fix.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_config import node_sections, write_config
from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker
from support.nodeenv import NodeEnv, bundle_for_tests
from support.postgres import private_database

from dicom_node import jobs
from dicom_node.config import Config, load_config
from dicom_node.db import (
    Draft,
    DraftState,
    Job,
    JobState,
    Study,
    StudyState,
    db_utcnow,
    make_engine,
    migrate,
    session_factory,
)
from dicom_node.scu import OutboundSender
from dicom_node.store import Store

STUDY = "1.2.826.0.1.3680043.10.1234.1"
HOST_ID = "drafter-7"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.db'}"
        migrate(url)
        yield url
        return
    with private_database("reclaim") as url:
        migrate(url)
        yield url


@pytest.fixture
def node(database_url: str, tmp_path: Path) -> Iterator[tuple[Config, sessionmaker]]:
    config = load_config(write_config(tmp_path / "c.toml", node_sections(
        tmp_path, node={"database_url": database_url, "host_id": HOST_ID},
        study={"quiet_period_s": 1.0}, jobs={"lease_s": 5.0})), env={})
    engine = make_engine(database_url)
    try:
        yield config, session_factory(engine)
    finally:
        engine.dispose()


def _add_study(sessions: sessionmaker, quiet_for_s: float) -> None:
    with sessions() as s:
        at = db_utcnow(s) - dt.timedelta(seconds=quiet_for_s)
        s.add(Study(study_instance_uid=STUDY, state=StudyState.RECEIVING, generation=1,
                    first_received_at=at, last_received_at=at))
        s.commit()


def _new_instance(sessions: sessionmaker) -> None:
    """What dicom_node.index does when an instance arrives: a new generation, receiving again."""
    with sessions() as s:
        s.execute(update(Study).values(generation=Study.generation + 1, state=StudyState.RECEIVING,
                                       last_received_at=db_utcnow(s)))
        s.commit()


def _quiet(sessions: sessionmaker, seconds: float = 5.0) -> None:
    """The study's last instance arrived ``seconds`` ago (by the database's clock)."""
    with sessions() as s:
        s.execute(update(Study).values(last_received_at=db_utcnow(s) - dt.timedelta(seconds=seconds)))
        s.commit()


def _lease_runs_out(sessions: sessionmaker) -> None:
    """The worker holding the job died: its lease expired a second ago."""
    with sessions() as s:
        s.execute(update(Job).where(Job.state == JobState.RUNNING)
                  .values(lease_expires_at=db_utcnow(s) - dt.timedelta(seconds=1)))
        s.commit()


def _study_state(sessions: sessionmaker) -> str:
    with sessions() as s:
        return str(s.scalar(select(Study.state)))


def _jobs(sessions: sessionmaker) -> list[tuple[str, int]]:
    with sessions() as s:
        return [(str(st), int(g)) for st, g in s.execute(select(Job.state, Job.study_generation).order_by(Job.id))]


def test_dead_workers_job_waits_for_its_study_to_be_quiet_and_is_drafted_once(
        node: tuple[Config, sessionmaker]) -> None:
    config, sessions = node
    _add_study(sessions, quiet_for_s=5.0)
    assert jobs.promote_quiet_studies(sessions, config) == [STUDY]
    a = jobs.claim_job(sessions, config, "hostA:1:0")
    assert a is not None and a.study_generation == 1
    _new_instance(sessions)  # the study's second instance arrives while A holds the job
    _lease_runs_out(sessions)  # ... and A dies
    # B must not take the job while the study is still receiving (the old code did, at generation 2)
    assert jobs.claim_job(sessions, config, "hostB:2:0") is None
    assert jobs.promote_quiet_studies(sessions, config) == []  # not quiet yet
    assert _study_state(sessions) == StudyState.RECEIVING
    _quiet(sessions)
    # quiet: the promoter hands the study back to the waiting job, and queues no second one
    assert jobs.promote_quiet_studies(sessions, config) == []
    assert _study_state(sessions) == StudyState.QUEUED
    b = jobs.claim_job(sessions, config, "hostB:2:0")
    assert b is not None and (b.job_id, b.study_generation, b.attempts) == (a.job_id, 2, 2)
    assert jobs._finish(sessions, b, JobState.DONE)
    assert _study_state(sessions) == StudyState.DRAFTED
    assert not jobs._finish(sessions, a, JobState.DONE)  # A's lease is gone: its outcome is discarded
    _quiet(sessions)
    assert jobs.promote_quiet_studies(sessions, config) == []  # generation 2 is not queued again
    assert _jobs(sessions) == [(JobState.DONE, 2)]


def test_worker_that_outlived_its_lease_hands_the_newer_generation_to_the_promoter(
        node: tuple[Config, sessionmaker]) -> None:
    """A's lease expired (a stall, not a death) while the study got a new instance and became
    quiet: the promoter marks it queued for the waiting job, then A renews and finishes the older
    generation. The study goes back to the promoter, which queues the newer generation once."""
    config, sessions = node
    _add_study(sessions, quiet_for_s=5.0)
    jobs.promote_quiet_studies(sessions, config)
    a = jobs.claim_job(sessions, config, "hostA:1:0")
    assert a is not None
    _new_instance(sessions)
    _lease_runs_out(sessions)
    _quiet(sessions)
    assert jobs.promote_quiet_studies(sessions, config) == []
    assert _study_state(sessions) == StudyState.QUEUED
    assert jobs.renew_lease(sessions, a, config.jobs.lease_s)  # A wakes up before anyone reclaimed
    assert jobs.claim_job(sessions, config, "hostB:2:0") is None
    assert jobs._finish(sessions, a, JobState.DONE)  # generation 1 drafted
    assert _study_state(sessions) == StudyState.RECEIVING  # not left "queued" with no job
    assert jobs.promote_quiet_studies(sessions, config) == [STUDY]
    b = jobs.claim_job(sessions, config, "hostB:2:0")
    assert b is not None and b.study_generation == 2
    assert jobs._finish(sessions, b, JobState.DONE)
    assert _study_state(sessions) == StudyState.DRAFTED
    assert jobs.promote_quiet_studies(sessions, config) == []
    assert _jobs(sessions) == [(JobState.DONE, 1), (JobState.DONE, 2)]


def test_worker_and_outbound_ids_carry_the_host_id(node: tuple[Config, sessionmaker], tmp_path: Path) -> None:
    config, sessions = node
    stop = threading.Event()
    store = Store(config.node.storage_dir, fsync=False)
    worker = jobs.Worker(config, sessions, store, stop, index=3)
    assert worker.worker_id == f"{HOST_ID}:{os.getpid()}:3"
    assert OutboundSender(config, sessions, store, stop).sender_id == f"{HOST_ID}:{os.getpid()}:outbound"
    assert jobs.default_worker_id("").endswith(f":{os.getpid()}")  # no host_id: the host name
    # the lease and the job log say which worker ran it
    _add_study(sessions, quiet_for_s=5.0)
    jobs.promote_quiet_studies(sessions, config)
    claimed = jobs.claim_job(sessions, config, worker.worker_id)
    assert claimed is not None and claimed.token.startswith(f"{HOST_ID}:{os.getpid()}:3/")
    jobs.run_job(claimed, lambda ctx: jobs.JobResult("skipped", "test"), config, sessions, store)
    with sessions() as s:
        assert f"by worker {HOST_ID}:{os.getpid()}:3\n" in str(s.scalar(select(Job.log)))


# -- one draft per study generation, through the real pipeline and model -------------------------


def _pipeline_env(database_url: str, root: Path) -> NodeEnv:
    root.mkdir(parents=True, exist_ok=True)
    path = write_config(root / "cxrnode.toml", {
        "node": {"storage_dir": str(root / "store"), "fsync": False, "min_free_space_mb": 0,
                 "database_url": database_url},
        "study": {"quiet_period_s": 0.0},
        "jobs": {"max_attempts": 1, "backoff_s": 0.0},
        "model": {"beam_size": 1, "bundle": bundle_for_tests()},
    })
    config = load_config(path, env={})
    return NodeEnv(config, session_factory(make_engine(database_url)), Store(config.node.storage_dir, fsync=False))


def _second_job_for_same_generation(env: NodeEnv) -> None:
    """What the double-draft bug left behind: another pending job for the drafted generation."""
    with env.sessions() as s:
        study = s.scalars(select(Study)).one()
        now = db_utcnow(s)
        s.add(Job(study_id=study.id, kind="draft", state=JobState.PENDING, study_generation=study.generation,
                  attempts=0, not_before=now, log="", model_name="", model_version="", created_at=now,
                  updated_at=now))
        study.state = StudyState.QUEUED
        s.commit()


def _drafts(env: NodeEnv) -> list[tuple[str, str]]:
    with env.sessions() as s:
        return [(str(u), str(st)) for u, st in s.execute(select(Draft.sop_instance_uid, Draft.state).order_by(Draft.id))]


@pytest.mark.parametrize("race", [False, True], ids=["sequential", "both-past-the-first-check"])
def test_two_jobs_for_one_study_generation_write_one_draft(database_url: str, tmp_path: Path, race: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from plugin.drafting import pipeline, samples

    env = _pipeline_env(database_url, tmp_path / "node")
    study = samples.make_study(11, prefix="reclaim")
    env.store_instances(study)
    [first] = env.run_jobs(pipeline.handle_job)
    assert first.state == JobState.DONE, first.log
    [(uid, _)] = _drafts(env)
    _second_job_for_same_generation(env)
    if race:
        # both jobs got past the checks before either committed (before the model's work and
        # before the file is written): the one in the commit's transaction (study row locked) refuses
        real = pipeline.drafted_elsewhere
        calls: list[Any] = []

        def first_check_passes(s: Any, study_id: int, ctx: Any) -> str | None:
            calls.append(ctx.job_id)
            return None if len(calls) <= 2 else real(s, study_id, ctx)

        monkeypatch.setattr(pipeline, "drafted_elsewhere", first_check_passes)
    [second] = env.run_jobs(pipeline.handle_job)
    assert second.state == JobState.SKIPPED, second.log
    reason = second.last_error or ""
    assert f"generation {first.study_generation} of the study already has draft {uid}" in reason
    assert f"job {first.id}" in reason and reason in second.log
    assert _drafts(env) == [(uid, DraftState.NEW)]  # one draft, still open: not superseded by a copy
    with env.sessions() as s:
        # the study is drafted (the worklist shows its draft), not "skipped"
        assert s.scalar(select(Study.state)) == StudyState.DRAFTED
        assert list(s.scalars(select(Draft.job_id))) == [first.id]
        relpath = str(s.scalar(select(Draft.path)))
    assert env.store.abspath(relpath).exists()  # the first job's SR file stays
    if race:
        assert len(calls) == 3
    env.sessions.kw["bind"].dispose()


def test_a_reclaimed_attempt_does_not_commit_the_older_generation(database_url: str, tmp_path: Path) -> None:
    """A stalled worker whose job was reclaimed at a newer generation writes no draft."""
    from dicom_node.jobs import JobContext
    from plugin.drafting import pipeline, samples

    env = _pipeline_env(database_url, tmp_path / "node")
    study = samples.make_study(12, prefix="reclaim")
    env.store_instances(study)
    with env.sessions() as s:
        generation = int(s.scalar(select(Study.generation)) or 0)
    jobs.promote_quiet_studies(env.sessions, env.config,
                               now=dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1))
    with env.sessions() as s:
        job_id = int(s.scalar(select(Job.id)) or 0)
        # another worker reclaimed the job after a new instance: the row says the newer generation
        s.execute(update(Job).values(state=JobState.RUNNING, study_generation=generation + 1))
        s.commit()
    lines: list[str] = []
    result = pipeline.handle_job(JobContext(env.config, env.sessions, env.store, job_id, str(study[0].StudyInstanceUID),
                                            generation, lines.append))
    assert result.state == JobState.SKIPPED and f"reclaimed at generation {generation + 1}" in result.reason
    assert _drafts(env) == []
    env.sessions.kw["bind"].dispose()
