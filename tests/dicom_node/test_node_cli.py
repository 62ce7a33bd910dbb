"""``cxrnode serve`` / ``cxrnode status`` as subprocesses, including ``kill -9`` mid-study."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from dcmnode_helpers import (
    NIH,
    PATIENT_ID,
    PATIENT_NAME,
    _chunked_send,
    associate,
    dataset_bytes,
    make_instance,
    wait_for,
)
from node_config import node_sections, write_config
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.config import load_config
from dicom_node.db import JobState, StudyState, make_engine, session_factory
from dicom_node.jobs import JobContext, JobResult, claim_job, run_job
from dicom_node.store import Store

CXRNODE = [sys.executable, "-m", "installer"]


def cxrnode(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CXRNODE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config_file(tmp_path: Path, free_port) -> Path:  # type: ignore[no-untyped-def]
    sections = node_sections(tmp_path, node={"port": free_port()}, jobs={"workers": 0}, study={"quiet_period_s": 0.5})
    return write_config(tmp_path / "cxrnode.toml", sections)


class Serve:
    """A ``cxrnode serve`` subprocess (every one started is killed at the end of its test)."""

    started: list[subprocess.Popen[bytes]] = []

    def __init__(self, config_file: Path, log: Path) -> None:
        self.config = load_config(config_file, env={})
        self.log = log
        self.proc = subprocess.Popen([*CXRNODE, "serve", "--config", str(config_file)],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
        Serve.started.append(self.proc)
        wait_for(self._ready, timeout=60, interval=0.1)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"cxrnode serve exited with {self.proc.returncode}: {self.log.read_text()}")
        a = associate(self.config.node.port)
        if a.is_established:
            a.release()
            return True
        return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@pytest.fixture(autouse=True)
def _no_leftover_serve():  # type: ignore[no-untyped-def]
    yield
    while Serve.started:
        proc = Serve.started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_help_lists_config_and_set() -> None:
    for cmd in ("serve", "status"):
        r = cxrnode(cmd, "--help")
        assert r.returncode == 0
        assert "--config" in r.stdout and "--set" in r.stdout
    assert "--json" in cxrnode("status", "--help").stdout


def test_bad_setting_fails_with_the_key_name(config_file: Path) -> None:
    r = cxrnode("serve", "--config", str(config_file), "--set", "node.max_associations=0")
    assert r.returncode == 2
    assert "node.max_associations" in r.stderr


def test_status_without_a_database(tmp_path: Path) -> None:
    r = cxrnode("status", "--set", f"node.storage_dir='{tmp_path / 'nothing'}'")
    assert r.returncode == 1
    assert "cxrnode serve" in r.stderr or "cannot open" in r.stderr


def sqlite_rows(config_file: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    url = load_config(config_file, env={}).node.resolved_database_url()
    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_kill_9_mid_study_then_restart(config_file: Path, tmp_path: Path) -> None:
    """Everything acknowledged survives ``kill -9`` byte for byte; the study is still processed."""
    config = load_config(config_file, env={})
    study = generate_uid()
    template = pydicom.dcmread(NIH)
    files = [make_instance(tmp_path / "study" / f"{i:02d}.dcm", study, template=template, InstanceNumber=i)
             for i in range(24)]
    log = tmp_path / "serve.log"
    serve = Serve(config_file, log)

    acked: list[Path] = []
    failed: list[Path] = []

    def sender() -> None:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5  # the peer will vanish
        ae.add_requested_context(template.SOPClassUID, [str(template.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title="CXRNODE")
        for f in files:
            try:
                rsp = assoc.send_c_store(f)
            except Exception:
                failed.append(f)
                continue
            if rsp and "Status" in rsp and rsp.Status == 0:
                acked.append(f)
            else:
                failed.append(f)
        if assoc.is_established:
            assoc.release()

    t = threading.Thread(target=sender)
    _chunked_send(+1)
    try:
        t.start()
        wait_for(lambda: len(acked) >= 8, timeout=120)
        serve.proc.kill()  # SIGKILL mid-association
        serve.proc.wait(timeout=30)
        t.join(timeout=120)
    finally:
        _chunked_send(-1)
    assert 8 <= len(acked) < len(files), "the kill must land mid-study"

    serve = Serve(config_file, log)
    try:
        store = Store(config.node.storage_dir)
        rows = dict(sqlite_rows(config_file, "SELECT sop_instance_uid, path FROM instances"))
        for f in acked:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            assert uid in rows, "an acknowledged instance is missing from the index"
            assert dataset_bytes(store.abspath(rows[uid])) == dataset_bytes(f)
        assert list(store.tmp_dir.iterdir()) == []  # partial spool files were removed
        # the sender resends what was not acknowledged (a PACS would retry the same way)
        rest = [f for f in files if f not in acked]
        r = subprocess.run(["/usr/bin/storescu", "-aec", "CXRNODE", "127.0.0.1", str(config.node.port),
                            *map(str, rest)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr

        def queued() -> dict | None:  # type: ignore[type-arg]
            r = cxrnode("status", "--config", str(config_file), "--json")
            assert r.returncode == 0, r.stderr
            report = json.loads(r.stdout)
            st = next(s for s in report["studies"] if s["study_instance_uid"] == study)
            return report if st["state"] == StudyState.QUEUED and st["generation"] >= 24 else None

        report = wait_for(queued, timeout=60, interval=0.3)
        st = report["studies"][0]
        assert st["instances"] == 24 and st["state"] == StudyState.QUEUED
        assert st["jobs"][0]["state"] == JobState.PENDING

        # a worker (here in this process, sharing the database) processes the study
        engine = make_engine(config.node.resolved_database_url())
        sessions = session_factory(engine)
        seen: list[int] = []

        def handler(ctx: JobContext) -> JobResult:
            seen.append(ctx.study_generation)
            return JobResult("done", model_name="test")

        job = claim_job(sessions, config, "test-worker")
        assert job is not None and job.study_instance_uid == study
        assert run_job(job, handler, config, sessions, store) == JobState.DONE
        engine.dispose()
        r = cxrnode("status", "--config", str(config_file), "--json")
        report = json.loads(r.stdout)
        assert report["schema"] == "cxrnode.status/1"
        st = report["studies"][0]
        assert st["state"] == StudyState.DRAFTED and st["jobs"][0]["state"] == JobState.DONE
        assert seen and seen[0] >= 24
        text = cxrnode("status", "--config", str(config_file)).stdout
        assert study in text and "done" in text
        assert PATIENT_NAME not in r.stdout + text and PATIENT_ID not in r.stdout + text
    finally:
        code = serve.stop(signal.SIGTERM)
    assert code == 0
    out = log.read_text()
    assert "shutting down" in out and "node stopped" in out
    assert PATIENT_NAME not in out and PATIENT_ID not in out


def test_status_json_schema(make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dicom_node.cli import collect_status
    from dicom_node.db import Draft, Transfer, migrate
    from dicom_node.index import register_instance

    config = make_config()
    url = config.node.resolved_database_url()
    migrate(url)
    engine = make_engine(url)
    f = make_instance(tmp_path / "a.dcm", generate_uid())
    ds = pydicom.dcmread(f)
    with session_factory(engine)() as s:
        inst = register_instance(s, ds, "instances/a.dcm", 1, "0" * 64, "X")
        s.add(Draft(study_id=inst.study_id, sop_instance_uid="1.2.3", path="instances/sr.dcm",
                    signed_sop_instance_uid="1.2.4", signed_path="instances/signed.dcm"))
        s.add(Transfer(destination="pacs", sop_instance_uid="1.2.4", path="instances/signed.dcm"))
        s.commit()
    engine.dispose()
    report = collect_status(config)
    assert set(report) >= {"schema", "generated_at", "node", "counts", "studies", "outbound"}
    st = report["studies"][0]
    assert set(st) >= {"study_instance_uid", "state", "generation", "instances", "jobs", "drafts"}
    assert st["instances"] == 1 and st["state"] == StudyState.RECEIVING
    root = Path(config.node.storage_dir).resolve()
    d = st["drafts"][0]
    assert d["path"] == str(root / "instances/sr.dcm")
    assert d["signed_path"] == str(root / "instances/signed.dcm")
    assert report["outbound"][0]["state"] == "pending" and report["counts"]["outbound"] == {"pending": 1}
    json.dumps(report)  # serialisable
