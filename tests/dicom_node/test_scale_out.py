"""Several hosts on one storage folder and one database (issue 16): per-host spool folders,
``cxrnode migrate`` under an advisory lock, ``cxrnode worker`` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_config import node_sections, write_config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from dicom_node.config import ConfigError
from dicom_node.db import current_revision, make_engine
from dicom_node.startup import EXIT_CONFIG

# -- 1. each host spools into storage_dir/tmp/<host id> and cleans only that ------------------


def test_second_host_leaves_first_hosts_spool_alone(make_config: Any, start_node: Any, tmp_path: Path) -> None:
    a = start_node(make_config(node={"host_id": "host-a"}), job_handler=lambda ctx: None)
    assert a.store.tmp_dir == a.store.root / "tmp" / "host-a"
    in_flight = a.store.new_spool()  # host A is receiving an instance right now
    in_flight.write(b"\0" * 128 + b"DICM" + b"x" * 4096)
    stale = a.store.root / "tmp" / "host-b" / "left-by-a-crash"  # host B's own leftover
    stale.parent.mkdir()
    stale.write_bytes(b"partial")

    b = start_node(make_config(node={"host_id": "host-b"}), job_handler=lambda ctx: None)
    assert b.store.root == a.store.root and b.store.tmp_dir == a.store.root / "tmp" / "host-b"
    assert Path(in_flight.name).exists(), "starting host B deleted host A's spool file in flight"
    assert not stale.exists(), "host B did not clean its own spool"
    size, _sha = a.store.commit_spool(in_flight, "instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert size == 128 + 4 + 4096 and a.store.abspath("instances/1.2.3/1.2.3.4/1.2.3.4.5.dcm").exists()

    # host A restarting cleans its own folder again (a crash's leftovers), not host B's
    b_in_flight = b.store.new_spool()
    b_in_flight.write(b"y" * 100)
    a_left = a.store.new_spool()
    a_left.write(b"z")
    a.stop(grace_s=5.0)
    a.start()
    assert not Path(a_left.name).exists() and Path(b_in_flight.name).exists()
    b_in_flight.discard()


@pytest.mark.parametrize("bad", ["..", "a/b", "host id", "x" * 65, "h\t"])
def test_host_id_is_a_safe_folder_name(make_config: Any, bad: str) -> None:
    with pytest.raises(ConfigError, match="node.host_id"):
        make_config(node={"host_id": bad})


def test_default_host_id_is_the_host_name(make_config: Any) -> None:
    import socket

    cfg = make_config()
    assert cfg.node.host_id == "" and cfg.node.resolved_host_id() == socket.gethostname().split(".")[0]





# -- 2. `cxrnode migrate` is the only command that changes a PostgreSQL schema ------------------

CXRNODE = [sys.executable, "-m", "installer"]


def cxrnode(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CXRNODE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A private, empty PostgreSQL database (created and dropped here: other suites share the server)."""
    server = os.environ.get("CXRNODE_TEST_POSTGRES_URL", "")
    if not server:
        pytest.skip("CXRNODE_TEST_POSTGRES_URL is not set")
    name = f"cxrnode_scale_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.postgres
def test_two_migrations_at_once_apply_once(pg_database: str, tmp_path: Path, free_port: Any) -> None:
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(
        tmp_path, node={"database_url": pg_database, "port": free_port()}, jobs={"workers": 0}))
    # serve refuses the empty database with one line (exit 2) and creates nothing
    r = cxrnode("serve", "--config", str(cfg))
    assert r.returncode == EXIT_CONFIG and "run `cxrnode migrate` first" in one_line(r)
    assert current_revision(pg_database)[0] is None

    procs = [subprocess.Popen([*CXRNODE, "migrate", "--config", str(cfg)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = sorted(o[0] for o in outs)
    assert "already at revision" in said[0] and "upgraded from an empty database" in said[1], said
    rev, head = current_revision(pg_database)
    assert rev == head
    engine = make_engine(pg_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
            # a newer cxrnode migrated the database: this one refuses it (serve and worker), and
            # so does its migrate, without touching it
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffffffff9999'"))
            conn.commit()
    finally:
        engine.dispose()
    for command in ("serve", "worker"):
        r = cxrnode(command, "--config", str(cfg))
        line = one_line(r)
        assert r.returncode == EXIT_CONFIG and line.startswith(f"cxrnode {command}: node.database_url:"), r.stderr
        assert "'ffffffff9999', newer than this cxrnode" in line
    r = cxrnode("migrate", "--config", str(cfg))
    assert r.returncode == EXIT_CONFIG and "newer than this cxrnode" in one_line(r)
    assert current_revision(pg_database)[0] == "ffffffff9999"


def test_worker_refuses_sqlite(make_config: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "w.toml", node_sections(tmp_path))
    r = cxrnode("worker", "--config", str(cfg))
    assert r.returncode == EXIT_CONFIG
    assert one_line(r).startswith("cxrnode worker: node.database_url: cxrnode worker needs PostgreSQL")


def test_migrate_and_serve_on_sqlite_as_before(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m.toml", node_sections(tmp_path))
    r = cxrnode("migrate", "--config", str(cfg))
    assert r.returncode == 0 and "upgraded from an empty database" in r.stdout, r.stderr
    r = cxrnode("migrate", "--config", str(cfg))
    assert r.returncode == 0 and "already at revision" in r.stdout, r.stderr
