"""The commit service: the file and its index rows are committed together or not at all
(SQLite, and the PostgreSQL of CXRNODE_TEST_POSTGRES_URL in a private database)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from support.postgres import private_database

from dicom_node.commit import Committed, Enqueue, StoredFile, commit_dataset, commit_stored
from dicom_node.config import Config
from dicom_node.db import (
    AuditEvent,
    Instance,
    Series,
    Study,
    Transfer,
    make_engine,
    migrate,
    session_factory,
)
from dicom_node.index import audit
from dicom_node.store import Store

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.db'}"
        migrate(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()
        return
    with private_database("commit") as url:
        migrate(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1, "send": "drafts_and_signed"}
    return make_config(destinations=[pacs])


def sr_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    return ds


def relpath_of(store: Store, ds: Dataset) -> str:
    return store.instance_relpath(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as s:
        return {m.__name__: int(s.scalar(select(func.count()).select_from(m)) or 0)
                for m in (Study, Series, Instance, AuditEvent, Transfer)}


class Boom(Exception):
    pass


def test_commit_writes_file_rows_audit_and_transfers(tmp_path: Path, sessions: sessionmaker[Session],
                                                     config: Config) -> None:
    store = Store(tmp_path / "store")
    ds = sr_dataset()
    relpath = relpath_of(store, ds)

    def rows(s: Session, stored: StoredFile) -> str:
        audit(s, "tester", "drafted", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), f"{stored.size} bytes")
        return "extra"

    done = commit_dataset(store, sessions, ds, relpath, rows, registered_by="CXRNODE",
                          enqueue=Enqueue(config, "draft", hold=dt.timedelta(hours=1)))
    assert isinstance(done, Committed) and done.new and done.value == "extra" and done.transfers == 1
    assert store.abspath(relpath).is_file() and store.file_sha256(relpath) == done.stored.sha256
    assert counts(sessions) == {"Study": 1, "Series": 1, "Instance": 1, "AuditEvent": 1, "Transfer": 1}
    with sessions() as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.generated and inst.path == relpath and inst.size == done.stored.size
        t = s.scalars(select(Transfer)).one()
        assert t.next_attempt_at - t.created_at >= dt.timedelta(minutes=59)  # held


@pytest.mark.parametrize("where", ["prepare", "rows"])
def test_a_failed_transaction_removes_the_file_and_leaves_no_rows(
        tmp_path: Path, sessions: sessionmaker[Session], config: Config, where: str) -> None:
    store = Store(tmp_path / "store")
    ds = sr_dataset()
    relpath = relpath_of(store, ds)
    seen: dict[str, Any] = {}

    def prepare(s: Session) -> None:
        seen["file during prepare"] = store.abspath(relpath).is_file()
        if where == "prepare":
            raise Boom("refused")

    def rows(s: Session, stored: StoredFile) -> None:
        seen["file during rows"] = store.abspath(relpath).is_file()
        audit(s, "tester", "drafted", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        s.flush()  # the rows reached the database before the failure
        raise Boom("failed after writing rows")

    with pytest.raises(Boom):
        commit_dataset(store, sessions, ds, relpath, rows, registered_by="CXRNODE", prepare=prepare,
                       enqueue=Enqueue(config, "draft"))
    # a new object's file is placed first, then the transaction (prepare, rows) runs
    assert seen == ({"file during prepare": True} if where == "prepare"
                    else {"file during prepare": True, "file during rows": True})
    assert not store.abspath(relpath).exists()
    assert counts(sessions) == {"Study": 0, "Series": 0, "Instance": 0, "AuditEvent": 0, "Transfer": 0}


def test_a_file_that_was_there_before_is_left_alone(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    store = Store(tmp_path / "store")
    ds = sr_dataset()
    relpath = relpath_of(store, ds)
    store.write_dataset(ds, relpath)  # e.g. the job's previous attempt

    def rows(s: Session, stored: StoredFile) -> None:
        raise Boom("no")

    with pytest.raises(Boom):
        commit_dataset(store, sessions, ds, relpath, rows, registered_by="CXRNODE")
    assert store.abspath(relpath).is_file()
    assert counts(sessions)["Instance"] == 0


def test_commit_stored_retries_keeps_recorded_and_cleans_up(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    store = Store(tmp_path / "store")
    ds = sr_dataset()
    relpath = relpath_of(store, ds)
    size, sha = store.write_dataset(ds, relpath)
    stored = StoredFile(relpath, size, sha)
    first = commit_stored(store, sessions, ds, stored, registered_by="PACS", generated=False, attempts=5)
    assert first.new and first.value is None and first.transfers == 0
    # already recorded: prepare says so, nothing is written and the file stays
    again = commit_stored(store, sessions, ds, stored, registered_by="PACS", generated=False,
                          prepare=lambda s: False, attempts=5)
    assert not again.new and store.abspath(relpath).is_file()
    assert counts(sessions)["Instance"] == 1
    # a failure with remove_on_failure=False (the file is not ours) keeps it
    with pytest.raises(Boom):
        commit_stored(store, sessions, ds, stored, registered_by="PACS", generated=False,
                      prepare=lambda s: (_ for _ in ()).throw(Boom()), remove_on_failure=False)
    assert store.abspath(relpath).is_file()
    with pytest.raises(ValueError, match="attempts"):
        commit_stored(store, sessions, ds, stored, registered_by="PACS", attempts=0)


def test_a_refused_second_writer_never_touches_the_first_ones_file(
        tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    """Two jobs drafting one study generation: the second is refused by its prepare step (the
    pipeline's one-draft-per-generation check, under the study lock). It must not overwrite the
    committed file, or the index's SHA-256 no longer matches the bytes on disk."""
    store = Store(tmp_path / "store")
    first = sr_dataset()
    relpath = relpath_of(store, first)
    done = commit_dataset(store, sessions, first, relpath, registered_by="CXRNODE")
    second = sr_dataset()
    second.SOPInstanceUID = first.SOPInstanceUID  # same deterministic UID, other content
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    second.ContentTime = "235959"

    def already_drafted(s: Session) -> None:
        raise Boom("generation already drafted")

    with pytest.raises(Boom):
        commit_dataset(store, sessions, second, relpath, registered_by="CXRNODE", prepare=already_drafted)
    assert store.file_sha256(relpath) == done.stored.sha256
    with sessions() as s:
        (inst,) = s.scalars(select(Instance)).all()
        assert inst.sha256 == store.file_sha256(relpath)


def test_a_writer_that_loses_the_race_for_a_new_object_fails_before_touching_it(
        tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers saw no file; the first placed it: the second's placement (a hard link, never a
    replace) fails, and neither the first one's file nor the index is changed."""
    store = Store(tmp_path / "store")
    first = sr_dataset()
    relpath = relpath_of(store, first)
    done = commit_dataset(store, sessions, first, relpath, registered_by="CXRNODE")
    second = sr_dataset()
    second.SOPInstanceUID = first.SOPInstanceUID
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    second.ContentTime = "235959"
    monkeypatch.setattr(store, "exists", lambda relpath: False)  # it looked before the first placed it
    with pytest.raises(FileExistsError):
        commit_dataset(store, sessions, second, relpath, registered_by="CXRNODE")
    assert store.file_sha256(relpath) == done.stored.sha256
    with sessions() as s:
        (inst,) = s.scalars(select(Instance)).all()
        assert inst.sha256 == done.stored.sha256
