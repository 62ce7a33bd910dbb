"""The reviewer (``cxrnode review``, ``cxrnode worklist``) treats the schema as ``serve`` does
(issue 16): on PostgreSQL it never migrates (only ``cxrnode migrate`` does, under its lock) and
refuses a schema it does not know with one line; the embedded SQLite index of a single host is
migrated under the same lock as ``serve``'s, and refused on a network filesystem."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_config import node_sections, write_config
from sqlalchemy import text
from support.postgres import private_database

import dicom_node.startup as startup
from dicom_node.db import _script_directory, current_revision, make_engine
from dicom_node.startup import EXIT_CONFIG, EXIT_DATABASE, EXIT_NETWORK_FS

CXRNODE = [sys.executable, "-m", "installer"]


def cxrnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CXRNODE, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def set_revision(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


@pytest.fixture
def pg_database() -> Iterator[str]:
    with private_database("review") as url:
        yield url


@pytest.mark.postgres
def test_the_reviewer_never_migrates_postgresql(pg_database: str, tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path, node={"database_url": pg_database})))
    # an empty database: refused with the command to run, and left empty
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == EXIT_CONFIG
    assert one_line(r) == ("cxrnode worklist: node.database_url: the database has no cxrnode schema yet; "
                           "run `cxrnode migrate` first (exit 2)")
    r = cxrnode("review", "--config", cfg, env={"QT_QPA_PLATFORM": "offscreen"})  # before any window
    assert r.returncode == EXIT_CONFIG and one_line(r).startswith("cxrnode review: node.database_url: the database "
                                                                  "has no cxrnode schema yet")
    assert current_revision(pg_database)[0] is None

    assert cxrnode("migrate", "--config", cfg).returncode == 0
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == 0 and r.stdout.strip() == "No drafts.", r.stderr

    # behind this code (a rolling upgrade: the new reviewer before `cxrnode migrate`): refused, untouched
    head = _script_directory().get_current_head()
    older = _script_directory().get_revision(head).down_revision
    assert isinstance(older, str)
    set_revision(pg_database, older)
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == EXIT_CONFIG and "run `cxrnode migrate`" in one_line(r)
    assert current_revision(pg_database)[0] == older, "the reviewer migrated the shared database"

    # ahead of this code (a newer cxrnode migrated it): refused with what to do
    set_revision(pg_database, "ffffffff9999")
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == EXIT_CONFIG and "newer than this cxrnode knows" in one_line(r)


def test_an_unreachable_database_is_one_line(tmp_path: Path, free_port: Any) -> None:
    url = f"postgresql+psycopg://cxrnode@127.0.0.1:{free_port()}/cxrnode"
    cfg = str(write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path, node={"database_url": url})))
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == EXIT_DATABASE and one_line(r).startswith("cxrnode worklist: node.database_url: ")
    assert "cannot be reached" in one_line(r)


def test_the_embedded_sqlite_index_is_migrated_as_serve_does(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path)))
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == 0 and r.stdout.strip() == "No drafts.", r.stderr
    rev, head = current_revision(f"sqlite:///{tmp_path / 'store' / 'cxrnode.db'}")
    assert rev == head
    set_revision(f"sqlite:///{tmp_path / 'store' / 'cxrnode.db'}", "ffffffff9999")
    r = cxrnode("worklist", "--config", cfg)
    assert r.returncode == EXIT_CONFIG and "newer than this cxrnode knows" in one_line(r)


def test_sqlite_on_a_network_filesystem_is_refused_by_the_reviewer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gui.cli import main

    cfg = str(write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path)))
    share = str(tmp_path.resolve())
    monkeypatch.setattr(startup, "read_mountinfo",
                        lambda: f"27 1 254:0 / / rw - ext4 /dev/vda rw\n90 27 0:90 / {share} rw - nfs4 srv:/x rw\n")
    assert main(["worklist", "--config", cfg]) == EXIT_NETWORK_FS
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("cxrnode worklist: node.database_url: the SQLite index"), err
    assert not (tmp_path / "store" / "cxrnode.db").exists()
