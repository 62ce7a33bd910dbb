"""Several hosts on one storage folder and one database (issue 16): per-host spool folders,
``cxrnode migrate`` under an advisory lock, ``cxrnode worker`` processes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dcmnode_helpers import wait_for
from node_config import node_sections, write_config
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select, text
from support.postgres import private_database

from dicom_node.config import ConfigError
from dicom_node.db import (
    AuditEvent,
    Draft,
    Job,
    JobState,
    Study,
    StudyState,
    current_revision,
    make_engine,
    session_factory,
)
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
    with private_database("scale") as url:
        yield url


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


# -- 3. one serve (jobs.workers = 0) and two `cxrnode worker` processes ------------------------

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "plugin" / "drafting" / "samples" / "study653").glob("*.dcm"))


class Proc:
    """A ``cxrnode`` subprocess, ready once its stderr shows ``ready``; stopped with SIGTERM."""

    def __init__(self, args: list[str], log: Path, ready: str, cwd: Path) -> None:
        self.log = log
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([*CXRNODE, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        wait_for(lambda: self._ready(ready), timeout=180, interval=0.1)

    def _ready(self, text_: str) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return text_ in self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=60)


def send_study(port: int, n: int) -> str:
    """The shipped sample study under new UIDs (study ``n``), in one association."""
    study_uid = generate_uid(entropy_srcs=["scale-out", str(uuid.uuid4()), str(n)])
    datasets = []
    for i, f in enumerate(SAMPLES):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "series", str(i)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        datasets.append(ds)
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    return study_uid


@pytest.mark.postgres
def test_serve_and_two_workers_draft_each_study_once(pg_database: str, tmp_path: Path, free_port: Any) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(
        tmp_path, node={"database_url": pg_database, "port": port, "storage_dir": str(tmp_path / "shared")},
        jobs={"workers": 0, "poll_interval_s": 0.1, "lease_s": 60.0}, study={"quiet_period_s": 1.0}))
    assert cxrnode("migrate", "--config", str(cfg)).returncode == 0
    procs: list[Proc] = []
    try:
        procs.append(Proc(["serve", "--config", str(cfg), "--set", 'node.host_id="receiver"'],
                          tmp_path / "serve.log", "listening on", cwd=tmp_path / "serve"))
        for name in ("worker-a", "worker-b"):  # other folders, one storage root, one database
            procs.append(Proc(["worker", "--config", str(cfg), "--threads", "1", "--set", f'node.host_id="{name}"'],
                              tmp_path / f"{name}.log", "drafting thread(s)", cwd=tmp_path / name))
        n = 8
        with ThreadPoolExecutor(max_workers=n) as pool:
            sent = set(pool.map(lambda i: send_study(port, i), range(n)))
        assert len(sent) == n

        engine = make_engine(pg_database)
        sessions = session_factory(engine)
        try:
            def all_drafted() -> bool:
                with sessions() as s:
                    states = s.scalars(select(Study.state)).all()
                    assert StudyState.FAILED not in states, [p.log.read_text()[-3000:] for p in procs]
                    return len(states) == n and all(st == StudyState.DRAFTED for st in states)

            wait_for(all_drafted, timeout=300, interval=0.5)
            time.sleep(1.0)  # a second drafting of any study would show up now
            with sessions() as s:
                assert set(s.scalars(select(Study.study_instance_uid)).all()) == sent
                jobs = s.scalars(select(Job)).all()
                assert len(jobs) == n and all(j.state == JobState.DONE and j.attempts == 1 for j in jobs)
                per_study = Counter(s.scalars(select(Draft.study_id)).all())
                assert len(per_study) == n and set(per_study.values()) == {1}, per_study
                drafted = Counter(s.scalars(select(AuditEvent.study_instance_uid)
                                            .where(AuditEvent.action == "drafted")).all())
                assert drafted == Counter(dict.fromkeys(sent, 1))
                ran_by = {re.search(r"by worker \S+:(\d+):\d+\b", j.log or "").group(1)  # type: ignore[union-attr]
                          for j in jobs}
                pids = {str(p.proc.pid) for p in procs[1:]}
                assert ran_by <= pids and len(ran_by) == 2, (ran_by, pids)  # both workers drafted, serve none
        finally:
            engine.dispose()
        # every host spooled into its own folder, and nothing is left in flight
        spool = tmp_path / "shared" / "tmp"
        assert {p.name for p in spool.iterdir()} >= {"receiver", "worker-a", "worker-b"}
        assert [p for p in spool.rglob("*") if p.is_file()] == []
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0] * len(procs), [p.log.read_text()[-2000:] for p in procs]


# -- 4. the database's clock decides quiet periods and lease expiry ----------------------------


@pytest.mark.postgres
def test_quiet_periods_and_leases_use_the_database_clock(pg_database: str, make_config: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    import dicom_node.db as db_mod
    import dicom_node.jobs as jobs_mod
    from dicom_node.db import db_utcnow, migrate_locked
    from dicom_node.jobs import claim_job, promote_quiet_studies

    migrate_locked(pg_database)
    config = make_config(node={"database_url": pg_database}, study={"quiet_period_s": 10.0}, jobs={"lease_s": 60.0})
    engine = make_engine(pg_database)
    sessions = session_factory(engine)
    try:
        with sessions() as s:
            now = db_utcnow(s)
            s.add(Study(study_instance_uid="1.2.826.0.1.3680043.10.1.1", state=StudyState.RECEIVING, generation=1,
                        first_received_at=now, last_received_at=now))
            s.commit()
        # this host's clock runs an hour fast: by it the study is long quiet and every lease expired
        skewed = lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1)  # noqa: E731
        monkeypatch.setattr(jobs_mod, "utcnow", skewed)
        monkeypatch.setattr(db_mod, "utcnow", skewed)
        assert promote_quiet_studies(sessions, config) == [], "quiet by this host's clock, not the database's"
        with sessions() as s:
            s.execute(text("UPDATE studies SET last_received_at = timezone('UTC', now()) - interval '11 seconds'"))
            s.commit()
        assert promote_quiet_studies(sessions, config) == ["1.2.826.0.1.3680043.10.1.1"]
        first = claim_job(sessions, config, "host-a:1:0")
        assert first is not None
        with sessions() as s:
            lease = s.scalar(select(Job.lease_expires_at))
            assert lease is not None and abs((lease - db_utcnow(s)).total_seconds() - 60.0) < 5.0
        assert claim_job(sessions, config, "host-b:2:0") is None, "reclaimed by a host whose clock is ahead"
        with sessions() as s:  # the lease really runs out (by the database's clock)
            s.execute(text("UPDATE jobs SET lease_expires_at = timezone('UTC', now()) - interval '1 second'"))
            s.commit()
        second = claim_job(sessions, config, "host-b:2:0")
        assert second is not None and second.job_id == first.job_id and second.attempts == 2
    finally:
        engine.dispose()
