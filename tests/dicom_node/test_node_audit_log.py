"""Issue 13 item 8: the audit table is append-only on SQLite and PostgreSQL (migration 0002).

The attack: someone with the node's database connection (a bug, a reviewer's session, a script
run with the node's credentials) rewrites or erases the trail of who signed what. UPDATE and
DELETE must fail in the database itself, whatever client sends them; INSERT keeps working.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from support.postgres import private_database

from dicom_node import index
from dicom_node.db import AuditEvent, current_revision, make_engine, migrate, session_factory

POSTGRES_ENV = "CXRNODE_TEST_POSTGRES_URL"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database of our own (dropped afterwards; other suites share the server)."""
    with private_database("audit") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _audited(url: str) -> tuple[Engine, int]:
    migrate(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as s, s.begin():
        ev = index.audit(s, "alice", "signed", "1.2.3", "1.2.3.4", '{"verifier": "Doe^Jane"}')
        s.flush()
        ev_id = ev.id
    return engine, ev_id


def _rows(engine: Engine, ev_id: int) -> list[tuple[str, str]]:
    with session_factory(engine)() as s:
        return [(e.actor, e.action) for e in s.scalars(select(AuditEvent).where(AuditEvent.id == ev_id))]


def test_audit_rows_cannot_be_updated_or_deleted(url: str) -> None:
    engine, ev_id = _audited(url)
    sessions = session_factory(engine)
    try:
        for stmt in (update(AuditEvent).where(AuditEvent.id == ev_id).values(actor="mallory"),
                     delete(AuditEvent).where(AuditEvent.id == ev_id),
                     delete(AuditEvent)):
            with pytest.raises(DBAPIError, match="audit_events is append-only"), sessions() as s, s.begin():
                s.execute(stmt)
        with sessions() as s, s.begin():  # the ORM way, too
            ev = s.get(AuditEvent, ev_id)
            assert ev is not None
            ev.detail = "rewritten"
            with pytest.raises(DBAPIError, match="append-only"):
                s.flush()
        assert _rows(engine, ev_id) == [("alice", "signed")]
        with sessions() as s, s.begin():  # appending still works
            index.audit(s, "bob", "claimed", "1.2.3", "1.2.3.4", "")
        with sessions() as s:
            assert s.scalar(select(func.count(AuditEvent.id))) == 2
    finally:
        engine.dispose()


def test_sqlite_refuses_outside_sqlalchemy_too(tmp_path: Path) -> None:
    """The sqlite3 command-line way (what a reviewer in the node's group could do to the file)."""
    db = tmp_path / "index.db"
    engine, ev_id = _audited(f"sqlite:///{db}")
    engine.dispose()
    con = sqlite3.connect(db)
    try:
        for sql in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
        assert con.execute("SELECT actor FROM audit_events").fetchall() == [("alice",)]
    finally:
        con.close()


@pytest.mark.postgres
def test_postgresql_refuses_truncate(postgres_url: str) -> None:
    engine, ev_id = _audited(postgres_url)
    try:
        with pytest.raises(DBAPIError, match="append-only: TRUNCATE refused"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_events"))
        assert _rows(engine, ev_id) == [("alice", "signed")]
    finally:
        engine.dispose()


def _downgrade(url: str, revision: str) -> None:
    """What ``cxrnode upgrade --rollback`` runs (``python -m installer.in_venv downgrade``)."""
    from alembic import command

    import dicom_node.db as db

    command.downgrade(db.alembic_config(url), revision)


def test_the_migration_goes_down_and_up(url: str) -> None:
    migrate(url)
    assert current_revision(url)[0] == current_revision(url)[1]
    _downgrade(url, "0001")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # at 0001 the table is an ordinary table again
            conn.execute(text("INSERT INTO audit_events (at, actor, action, study_instance_uid, object_uid, detail) "
                              "VALUES (CURRENT_TIMESTAMP, 'a', 'x', '', '', '')"))
            conn.execute(text("DELETE FROM audit_events"))
    finally:
        engine.dispose()
    migrate(url)
    engine, ev_id = _audited(url)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("DELETE FROM audit_events"))
    finally:
        engine.dispose()
