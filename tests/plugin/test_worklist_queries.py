"""The worklist costs a fixed number of SQL statements, whatever the number of studies (issue 15).

Rows are written straight into a migrated index (drafts and failed/skipped studies with their
jobs); every statement the service sends is counted with SQLAlchemy's ``before_cursor_execute``
event, on SQLite and (postgres-marked) on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from support.postgres import private_database

from dicom_node.config import load_config
from dicom_node.db import (
    Draft,
    DraftState,
    Job,
    JobState,
    Study,
    StudyState,
    make_engine,
    migrate,
    session_factory,
)
from dicom_node.store import Store
from plugin.review.service import ReviewService, WorklistRow

NOW = dt.datetime(2026, 11, 28, 9, 0, 0)


def _fill(engine: Engine, n: int) -> None:
    """``n`` drafted studies, ``n`` failed ones (two failed jobs each, the latest says why) and
    ``n`` skipped ones (the skipped job after a failed one)."""
    sessions = session_factory(engine)
    with sessions() as s, s.begin():
        for i in range(n):
            st = Study(study_instance_uid=f"1.2.3.{i}", patient_name=f"Drafted^{i}", patient_id=f"D{i}",
                       accession_number=f"A{i}", state=StudyState.DRAFTED, priority="ED" if i % 2 else "",
                       last_received_at=NOW - dt.timedelta(minutes=i))
            s.add(st)
            s.flush()
            info = {"tokens": [["Lungs", 0.9]], "observations": {"Pneumothorax": 0.9 if i == 0 else 0.01},
                    "grounded": [], "duration_ms": 1.0,
                    "input_check": {"mode": "enforce", "outcome": "passed", "reason": "ok", "views": [], "study": []}}
            s.add(Draft(study_id=st.id, state=DraftState.NEW, sop_instance_uid=f"1.2.3.{i}.9", path=f"d{i}.dcm",
                        findings="Lungs are clear.", token_info=json.dumps(info),
                        views=json.dumps([{"sop_instance_uid": f"1.2.3.{i}.1", "view": "PA"}]),
                        model_name="m", model_version="1", created_at=NOW - dt.timedelta(minutes=i)))
        for kind, state, job_states in (("failed", StudyState.FAILED, (JobState.FAILED, JobState.FAILED)),
                                        ("skipped", StudyState.SKIPPED, (JobState.FAILED, JobState.SKIPPED))):
            for i in range(n):
                st = Study(study_instance_uid=f"1.2.4.{kind}.{i}", patient_name=f"{kind.title()}^{i}",
                           patient_id=f"{kind[0].upper()}{i}", state=state, last_received_at=NOW)
                s.add(st)
                s.flush()
                for k, js in enumerate(job_states):
                    s.add(Job(study_id=st.id, state=js, last_error=f"{kind} {i} attempt {k}", model_name="m",
                              model_version=str(k), created_at=NOW, updated_at=NOW - dt.timedelta(minutes=i + k)))


def _statements(engine: Engine, svc: ReviewService, **kwargs: object) -> tuple[int, list[WorklistRow]]:
    seen: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        rows = svc.worklist(**kwargs)  # type: ignore[arg-type]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen), rows


def _service(url: str, root: Path) -> tuple[Engine, ReviewService]:
    migrate(url)
    engine = make_engine(url)
    config = load_config(None, [f"node.storage_dir={root / 'store'}", f"node.database_url={url}"], env={})
    return engine, ReviewService(config, session_factory(engine), Store(root / "store"), clock=lambda: NOW)


def _check(tmp_path: Path, make_url: Callable[[int], str]) -> None:
    counts: dict[int, int] = {}
    searched: dict[int, int] = {}
    for n in (5, 50):
        url = make_url(n)
        engine, svc = _service(url, tmp_path / f"n{n}")
        try:
            _fill(engine, n)
            every = ("new", "in_review", "signed", "rejected", "failed", "skipped")
            counts[n], rows = _statements(engine, svc, states=every)
            assert len(rows) == 3 * n
            failed = {r.patient_id: r for r in rows if r.state == "failed"}
            skipped = {r.patient_id: r for r in rows if r.state == "skipped"}
            assert len(failed) == n and len(skipped) == n
            # the latest job of the study's own outcome gives the detail, model and age
            assert failed["F3"].detail == "failed 3 attempt 1" and failed["F3"].model_version == "1"
            assert skipped["S3"].detail == "skipped 3 attempt 1" and skipped["S3"].age_s == 4 * 60
            drafted = [r for r in rows if r.state == "new"]
            assert [r.critical != () for r in drafted].count(True) == 1
            assert all(r.input_outcome == "passed" and r.views == ("PA",) for r in drafted)
            # searching still matches across the joined fields of a failed study, as before
            searched[n], found = _statements(engine, svc, states=every, search="failed^3 f3")
            assert [r.patient_id for r in found] == ["F3"]
        finally:
            engine.dispose()
    print("worklist statements:", counts)
    assert counts[5] == counts[50], counts
    assert counts[5] <= 4, counts  # the session's statements + one query for drafts + one for the rest
    assert searched == counts, searched  # a search costs the same


def test_worklist_statements_do_not_grow_with_the_rows_sqlite(tmp_path: Path) -> None:
    _check(tmp_path, lambda n: f"sqlite:///{tmp_path / f'index{n}.db'}")


@pytest.mark.postgres
def test_worklist_statements_do_not_grow_with_the_rows_postgres(tmp_path: Path) -> None:
    with private_database("wlq5") as url5, private_database("wlq50") as url50:
        _check(tmp_path, {5: url5, 50: url50}.__getitem__)
