"""The study index: SQLAlchemy 2 models and the engine/session factory.

Tables: studies, series, instances (what the SCP stored), jobs (the report-drafting queue),
drafts (each SR we wrote for a study: the draft and, once signed, the verified SR), outbound
(C-STORE transfers to destinations, with retries), audit_events (append-only: the database
itself refuses UPDATE and DELETE on it, see migration 0002) and report_templates (the reviewers'
text snippets, migration 0005).

The schema is created and upgraded only by Alembic (``dicom_node/migrations``); call
:func:`migrate` at start. SQLite runs in WAL mode with a busy timeout so the SCP, workers and
the reviewer can share one file; PostgreSQL is supported for multi-host sites.

Patient names and IDs are stored (the reviewer shows them) but never logged.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

UID = String(64)


def utcnow() -> dt.datetime:
    """Now, as naive UTC: what the schema's ``DateTime`` columns hold (this host's clock; see
    :func:`db_utcnow` for the database's).

    Returns
    -------
    datetime.datetime
        The current time in UTC without ``tzinfo``.
    """
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def db_utcnow(session: Any) -> dt.datetime:
    """The database's clock, as naive UTC (what the columns hold): on PostgreSQL
    ``timezone('UTC', now())`` (the transaction's start), so hosts sharing one index agree on
    quiet periods and lease expiry whatever their own clocks say; on SQLite (one host) this
    host's :func:`utcnow`."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return utcnow()
    from sqlalchemy import func, select

    value = session.execute(select(func.timezone("UTC", func.now()))).scalar_one()
    return value.replace(tzinfo=None) if value.tzinfo is not None else value  # type: ignore[no-any-return]


class Base(DeclarativeBase):
    pass


class StudyState:
    """Values of ``Study.state``."""

    RECEIVING = "receiving"  # instances arriving; not quiet yet
    QUEUED = "queued"  # quiet; a job is pending or running
    DRAFTED = "drafted"  # a draft SR exists for the current set of instances
    SKIPPED = "skipped"  # nothing to read (no chest radiograph), see the job's reason
    FAILED = "failed"  # the job failed for good, see its last_error
    SIGNED = "signed"  # the radiologist signed; verified SR exists


class JobState:
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # the study gained images; a newer job replaces this one


class DraftState:
    NEW = "new"
    IN_REVIEW = "in_review"
    SIGNED = "signed"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer draft for the same study replaces this unsigned one


class TransferState:
    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(324), default="")
    study_id_attr: Mapped[str] = mapped_column("study_id", String(16), default="")
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    # bumped on every new instance; a job records the generation it processed
    generation: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    # STAT / ED / inpatient / outpatient ("" = not stated): dicom_node.priority, the most urgent
    # value the study's received instances gave (migration 0005)
    priority: Mapped[str] = mapped_column(String(16), default="", server_default="")

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    instances: Mapped[list[Instance]] = relationship(back_populates="study", viewonly=True)
    jobs: Mapped[list[Job]] = relationship(back_populates="study", cascade="all, delete-orphan", order_by="Job.id")
    drafts: Mapped[list[Draft]] = relationship(back_populates="study", cascade="all, delete-orphan", order_by="Draft.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[str] = mapped_column(String(12), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[str] = mapped_column(String(12), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")  # the tag as sent; not trusted
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    generated: Mapped[int] = mapped_column(Integer, default=0)  # 1 for SRs this node wrote

    study: Mapped[Study] = relationship(back_populates="instances")
    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="draft")
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    study_generation: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    log: Mapped[str] = mapped_column(Text, default="")  # human-readable job log, one line per event
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(32), default="")
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Draft(Base):
    """One drafted report: the draft SR and, after sign-off, its verified successor."""

    __tablename__ = "drafts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=DraftState.NEW, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    indication: Mapped[str] = mapped_column(Text, default="")
    findings: Mapped[str] = mapped_column(Text, default="")
    impression: Mapped[str] = mapped_column(Text, default="")
    token_info: Mapped[str] = mapped_column(Text, default="")  # JSON: words with probabilities
    views: Mapped[str] = mapped_column(Text, default="")  # JSON: [{sop_instance_uid, view, source}]
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # filled when signed
    signed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    signed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    signed_sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, unique=True)
    signed_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    signed_findings: Mapped[str | None] = mapped_column(Text, nullable=True)
    signed_impression: Mapped[str | None] = mapped_column(Text, nullable=True)
    reject_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    study: Mapped[Study] = relationship(back_populates="drafts")


class Transfer(Base):
    """One outbound C-STORE of one file to one destination."""

    __tablename__ = "outbound"
    __table_args__ = (Index("ix_outbound_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir
    state: Mapped[str] = mapped_column(String(16), default=TransferState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    """One line of the audit trail. Append-only: the database refuses UPDATE and DELETE
    (triggers of migration 0002 on SQLite and PostgreSQL), so rows are only ever added."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # AE title, worker id or user name
    action: Mapped[str] = mapped_column(String(32))  # received, drafted, claimed, signed, rejected, sent...
    study_instance_uid: Mapped[str] = mapped_column(UID, default="")
    object_uid: Mapped[str] = mapped_column(UID, default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class ReportTemplate(Base):
    """A site-defined text snippet (macro) the reviewer inserts by its trigger word (``.normal``)
    or its slot key (Ctrl+1..9); managed by reviewers with the ``templates`` role, every change
    audited (``plugin.review.templates``; migration 0005)."""

    __tablename__ = "report_templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(32), unique=True)  # typed as ".trigger"
    name: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)  # 1..9 or None
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_by: Mapped[str] = mapped_column(String(128), default="")


class PriorStudy(Base):
    """A prior study of a patient fetched from the PACS for comparison (issue 17, migration
    0003). Read-only and kept apart: its files live under ``storage_dir/priors/`` and it is never
    a :class:`Study` (never drafted, never sent); deleted after ``priors.retention_days`` unless
    an open draft still compares with it (:func:`dicom_node.priors.prune`)."""

    __tablename__ = "prior_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")  # e.g. "CR\\SR"
    source: Mapped[str] = mapped_column(String(128), default="")  # the Q/R destination (AE@host:port)
    #: the report found with it: "sr", "pdf", "text" or "" (none); its SOP Instance UID and text
    report_kind: Mapped[str] = mapped_column(String(8), default="")
    report_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    report_text: Mapped[str] = mapped_column(Text, default="")
    fetched_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)

    instances: Mapped[list[PriorInstance]] = relationship(back_populates="prior", cascade="all, delete-orphan",
                                                          order_by="PriorInstance.id")


class PriorInstance(Base):
    """One object of a prior study (image or report) in ``storage_dir/priors/``."""

    __tablename__ = "prior_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prior_id: Mapped[int] = mapped_column(ForeignKey("prior_studies.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    path: Mapped[str] = mapped_column(String(512))  # relative to storage_dir, under priors/

    prior: Mapped[PriorStudy] = relationship(back_populates="instances")


class DraftPrior(Base):
    """Which prior a draft was compared with (its SR names it); keeps the prior from pruning
    while the draft is open."""

    __tablename__ = "draft_priors"

    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id", ondelete="CASCADE"), primary_key=True)
    prior_id: Mapped[int] = mapped_column(ForeignKey("prior_studies.id", ondelete="CASCADE"), primary_key=True,
                                          index=True)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An SQLAlchemy engine for ``url``; SQLite gets WAL, ``synchronous=FULL``, a 30 s busy
    timeout and foreign keys, other databases ``pool_pre_ping``.

    Parameters
    ----------
    url:
        SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``).
    **kwargs:
        Passed to :func:`sqlalchemy.create_engine` (the defaults above are only set when absent).

    Returns
    -------
    sqlalchemy.engine.Engine
        The engine (no connection is opened yet).
    """
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` with Alembic (creates it, and an SQLite
    file's folder, if new). Schema changes only ever come from a revision in
    ``dicom_node/migrations/versions/``.

    Parameters
    ----------
    url:
        SQLAlchemy URL of the index.
    revision:
        Alembic revision to upgrade to (``"head"``: the newest this code knows).
    """
    from alembic import command

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def alembic_config(url: str | None = None) -> Any:
    """The Alembic configuration of cxrnode's migrations (for ``url``, when given), for
    ``alembic.command`` calls: upgrade here, downgrade in ``cxrnode upgrade --rollback``."""
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def head_revision() -> str:
    """The newest schema revision this code knows."""
    return str(_script_directory().get_current_head() or "")


#: key of the PostgreSQL advisory lock ``cxrnode migrate`` holds while Alembic runs (any bigint
#: unique to cxrnode; here the bytes of "cxrnode" read as an integer)
MIGRATION_LOCK_KEY = int.from_bytes(b"cxrnode", "big")


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def migrate_locked(url: str, revision: str = "head") -> tuple[str | None, str | None]:
    """``cxrnode migrate``: upgrade like :func:`migrate`, on PostgreSQL while holding a
    session-level advisory lock (``pg_advisory_lock``), so hosts that migrate at the same time
    run Alembic one after the other (the second finds the schema current and changes nothing).
    Returns ``(revision before, revision after)``. A database at a revision this code does not
    know (a newer cxrnode migrated it) raises :class:`SchemaMismatch` and is not touched."""
    if is_sqlite(url):
        before = current_revision(url)[0] if Path(url.removeprefix("sqlite:///")).exists() else None
        _refuse_unknown(before)
        migrate(url, revision)
        return before, current_revision(url)[0]
    from sqlalchemy import text
    from sqlalchemy.pool import NullPool

    engine = make_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as lock:
            lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            try:
                before = current_revision(url)[0]
                _refuse_unknown(before)
                migrate(url, revision)
                return before, current_revision(url)[0]
            finally:
                lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


class SchemaMismatch(Exception):
    """The database's schema is not the one this code was written for (one line, for the CLI)."""


def _refuse_unknown(rev: str | None) -> None:
    if rev is not None and rev not in known_revisions():
        raise SchemaMismatch(f"the database schema is at revision {rev!r}, newer than this cxrnode knows "
                             f"(its newest is {_script_directory().get_current_head()!r}); upgrade cxrnode on this host")


def known_revisions() -> set[str]:
    return {s.revision for s in _script_directory().walk_revisions()}


def check_schema(url: str) -> None:
    """Raise :class:`SchemaMismatch` unless the database is exactly at this code's Alembic head
    (``serve`` and ``worker`` on PostgreSQL run only on a schema they know; only ``cxrnode
    migrate`` changes it)."""
    rev, head = current_revision(url)
    if rev == head:
        return
    if rev is None:
        raise SchemaMismatch("the database has no cxrnode schema yet; run `cxrnode migrate` first")
    _refuse_unknown(rev)
    raise SchemaMismatch(f"the database schema is at revision {rev!r}, this cxrnode needs {head!r}; "
                         "run `cxrnode migrate` (with this version of cxrnode)")


def current_revision(url: str) -> tuple[str | None, str]:
    """(revision the database is at, head revision of this code)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.pool import NullPool

    head = _script_directory().get_current_head() or ""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision(), head
    finally:
        engine.dispose()


def session_factory(engine: Engine) -> sessionmaker:
    """The session factory every part of the node uses (``expire_on_commit=False``: rows stay
    readable after their transaction, e.g. to log their UIDs).

    Parameters
    ----------
    engine:
        An engine from :func:`make_engine`.

    Returns
    -------
    sqlalchemy.orm.sessionmaker
        Call it for a new :class:`~sqlalchemy.orm.Session`.
    """
    return sessionmaker(engine, expire_on_commit=False)
