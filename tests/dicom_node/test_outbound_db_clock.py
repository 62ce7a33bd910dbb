"""The outbound queue decides by the database's clock (issue 16): when a transfer is due, when
its lease runs out and when the next attempt is do not follow this host's clock, so senders on
several hosts (whose clocks disagree) agree on them. Real PostgreSQL, a real C-STORE attempt to
a loopback port where nothing listens."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dcmnode_helpers import make_instance
from pydicom.uid import generate_uid
from sqlalchemy import select, text
from support.postgres import private_database

import dicom_node.db as db_mod
from dicom_node.db import (
    Transfer,
    TransferState,
    db_utcnow,
    make_engine,
    migrate_locked,
    session_factory,
)
from dicom_node.outbound import claim_transfer, enqueue, process_one
from dicom_node.scu import send_file
from dicom_node.store import Store

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url() -> Iterator[str]:
    with private_database("outclock") as url:
        migrate_locked(url)
        yield url


def _skew(monkeypatch: pytest.MonkeyPatch, offset: dt.timedelta) -> None:
    """This host's clock runs ``offset`` off: every ``utcnow`` the node's modules could use."""
    import dicom_node.jobs as jobs_mod
    import dicom_node.outbound as outbound_mod

    def skewed() -> dt.datetime:
        return dt.datetime.now(dt.UTC).replace(tzinfo=None) + offset

    monkeypatch.setattr(db_mod, "utcnow", skewed)
    monkeypatch.setattr(jobs_mod, "utcnow", skewed)
    monkeypatch.setattr(outbound_mod, "utcnow", skewed, raising=False)  # the module used it before


def _db_now(sessions: Any) -> dt.datetime:
    with sessions() as s:
        return db_utcnow(s)


def test_transfer_decisions_follow_the_database_clock(pg_url: str, make_config: Any, free_port: Any,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = free_port()  # nothing listens there: each attempt really fails to connect
    config = make_config(node={"database_url": pg_url},
                         destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dead}],
                         outbound={"max_attempts": 5, "backoff_s": 120.0})
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    store = Store(tmp_path / "store", fsync=False)
    ds = pydicom.dcmread(make_instance(tmp_path / "sr.dcm", generate_uid()))
    rel = store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.write_dataset(ds, rel)
    try:
        # 1. this host's clock is a day behind: a transfer queued now is still due now (by the
        #    database), not in a day
        _skew(monkeypatch, -dt.timedelta(days=1))
        with sessions() as s:
            (t,) = enqueue(s, config, str(ds.SOPInstanceUID), rel, "signed")
            s.commit()
            queued_at = t.next_attempt_at
        assert abs((queued_at - _db_now(sessions)).total_seconds()) < 5, queued_at

        # 2. the attempt fails (connection refused): the next one is backoff_s after the
        #    database's now, whatever this host's clock says
        tried = process_one(sessions, config, store, "host-a:1:outbound", send_file)
        assert tried is not None and tried.state == TransferState.PENDING and tried.attempts == 1
        assert "pacs" in (tried.last_error or "")  # the real attempt failed (nothing listens)
        delay = (tried.next_attempt_at - _db_now(sessions)).total_seconds()
        assert 110 < delay <= 120, f"next attempt {delay:.0f} s after the database's now, expected ~120"

        # 3. a host whose clock runs a day ahead sees it due at once by its own clock: it must not
        #    claim it before the database says so
        _skew(monkeypatch, dt.timedelta(days=1))
        assert claim_transfer(sessions, "host-b:2:outbound") is None, "claimed by a host whose clock is ahead"
        with sessions() as s:
            s.execute(text("UPDATE outbound SET next_attempt_at = timezone('UTC', now()) - interval '1 second'"))
            s.commit()
        taken = claim_transfer(sessions, "host-b:2:outbound")
        assert taken is not None and taken.attempts == 2
        lease = taken.lease_expires_at
        assert lease is not None and 590 < (lease - _db_now(sessions)).total_seconds() <= 600

        # 4. the lease is not taken over while the database says it runs, however far ahead this
        #    host is; once it has run out (by the database) another sender reclaims it
        assert claim_transfer(sessions, "host-c:3:outbound") is None, "a running lease was taken over"
        _skew(monkeypatch, -dt.timedelta(days=1))
        with sessions() as s:
            s.execute(text("UPDATE outbound SET lease_expires_at = timezone('UTC', now()) - interval '1 second'"))
            s.commit()
        again = claim_transfer(sessions, "host-c:3:outbound")
        assert again is not None and again.id == taken.id and again.attempts == 3
        with sessions() as s:
            row = s.scalars(select(Transfer)).one()
            assert row.lease_owner is not None and row.lease_owner.startswith("host-c:3:outbound/")
    finally:
        engine.dispose()


def test_a_retried_job_is_due_by_the_database_clock(pg_url: str, make_config: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``cxrnode jobs retry`` run on a host whose clock is a day ahead: the job is due now for
    every worker (claimed at once), not in a day."""
    import dicom_node.ops as ops_mod
    from dicom_node.db import Job, JobState, Study, StudyState
    from dicom_node.jobs import claim_job
    from dicom_node.ops import retry_job

    config = make_config(node={"database_url": pg_url})
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    try:
        with sessions() as s:
            now = db_utcnow(s)
            study = Study(study_instance_uid="1.2.826.0.1.3680043.10.2.1", state=StudyState.FAILED, generation=1,
                          first_received_at=now, last_received_at=now)
            s.add(study)
            s.flush()
            s.add(Job(study_id=study.id, kind="draft", state=JobState.FAILED, study_generation=1, attempts=3,
                      not_before=now, log="", model_name="", model_version="", created_at=now, updated_at=now,
                      last_error="RuntimeError: boom"))
            s.commit()
        _skew(monkeypatch, dt.timedelta(days=1))
        monkeypatch.setattr(ops_mod, "utcnow", lambda: dt.datetime(2099, 1, 1), raising=False)  # used before
        with sessions() as s:
            job_id = s.scalars(select(Job.id)).one()
            retry_job(s, job_id, "admin")
            s.commit()
            not_before = s.scalars(select(Job.not_before)).one()
            assert abs((not_before - db_utcnow(s)).total_seconds()) < 5, not_before
        claimed = claim_job(sessions, config, "host-a:1:0")
        assert claimed is not None and claimed.job_id == job_id
    finally:
        engine.dispose()
