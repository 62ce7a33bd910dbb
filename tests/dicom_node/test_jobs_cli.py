"""Follow a study from the command line against a real node (issue 14): a receive-only
``cxrnode serve`` takes the shipped sample study over DICOM, its job fails (a handler that
raises, in this process, on the same index), ``cxrnode jobs`` lists and shows it, ``jobs retry``
queues it again (audited), a second ``cxrnode serve`` with a worker drafts it with the shipped
model, and ``jobs show`` / ``status --json`` / ``status --prometheus`` show the SR, the input
gate's outcome and the queue figures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dcmnode_helpers import wait_for
from node_config import node_sections, write_config
from pynetdicom import AE
from support.postgres import private_database

from dicom_node.config import load_config
from dicom_node.db import make_engine, session_factory
from dicom_node.jobs import JobContext, JobResult, claim_job, run_job
from dicom_node.store import Store
from plugin.drafting.samples import sample_files

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sample_files()
CXRNODE = [sys.executable, "-m", "installer"]


def cxrnode(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CXRNODE, *args], capture_output=True, text=True, timeout=180)


class Serve:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([*CXRNODE, "serve", "--config", str(config)], stdout=subprocess.DEVNULL,
                                         stderr=err)
        wait_for(self._ready, timeout=120, interval=0.1)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        return "listening on" in self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        assert self.proc.wait(timeout=60) == 0, self.log.read_text()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in the store, or a private PostgreSQL database (created and dropped here, so tests
    sharing the server are not disturbed)."""
    if request.param == "sqlite":
        yield ""
        return
    from dicom_node.db import migrate_locked

    with private_database("jobs") as url:
        migrate_locked(url)  # on PostgreSQL only `cxrnode migrate` changes the schema; serve refuses an empty one
        yield url


@pytest.fixture
def site(tmp_path: Path, free_port: Any, database_url: str) -> dict[str, Any]:
    closed = free_port()  # the PACS is down: drafts wait in the outbound queue
    node = {"port": free_port(), **({"database_url": database_url} if database_url else {})}
    sections = node_sections(tmp_path, node=node, jobs={"workers": 0, "max_attempts": 1},
                             study={"quiet_period_s": 0.3},
                             destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": closed,
                                            "send": "drafts_and_signed"}],
                             outbound={"backoff_s": 600.0, "max_attempts": 5})
    cfg = write_config(tmp_path / "cxrnode.toml", sections)
    return {"tmp": tmp_path, "config": cfg, "sections": sections}


def send_sample(port: int) -> str:
    ae = AE(ae_title="MODALITY")
    datasets = [pydicom.dcmread(f) for f in SAMPLES]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    return str(datasets[0].StudyInstanceUID)


def jobs_json(config: Path, *args: str) -> Any:
    proc = cxrnode("jobs", "--config", str(config), *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_follow_a_failed_job_retry_it_and_see_the_draft(site: dict[str, Any]) -> None:
    cfg_path: Path = site["config"]
    config = load_config(cfg_path, env={})
    receiver = Serve(cfg_path, site["tmp"] / "serve1.log")
    try:
        study_uid = send_sample(config.node.port)
        listed = wait_for(lambda: jobs_json(cfg_path, "--state", "pending", "--json")["jobs"], timeout=60)
    finally:
        receiver.stop()
    assert listed[0]["study_instance_uid"] == study_uid

    # a worker in this process, on the same index, whose handler fails
    engine = make_engine(config.node.resolved_database_url())
    sessions = session_factory(engine)

    def broken(ctx: JobContext) -> JobResult:
        raise RuntimeError("scanner offline")

    job = wait_for(lambda: claim_job(sessions, config, "test-worker"), timeout=30)
    assert run_job(job, broken, config, sessions, Store(config.node.storage_dir)) == "failed"
    engine.dispose()

    out = jobs_json(cfg_path, "--state", "failed", "--json")
    assert out["schema"] == "cxrnode.jobs/1"
    assert [(j["id"], j["last_error"]) for j in out["jobs"]] == [(job.job_id, "RuntimeError: scanner offline")]
    assert jobs_json(cfg_path, "--study-uid", "1.2.3.4.5", "--json")["jobs"] == []
    text = cxrnode("jobs", "--config", str(cfg_path), "show", str(job.job_id)).stdout
    assert "attempt 1 failed: RuntimeError: scanner offline" in text and "SRs written: none" in text

    status = json.loads(cxrnode("status", "--config", str(cfg_path), "--json").stdout)
    assert status["queue"]["jobs_pending"] == 0 and status["queue"]["oldest_pending_job_age_s"] is None

    proc = cxrnode("jobs", "--config", str(cfg_path), "retry", str(job.job_id))
    assert proc.returncode == 0 and f"job {job.job_id} (study {study_uid}): was failed, queued again" in proc.stdout
    from sqlalchemy import select

    from dicom_node.db import AuditEvent

    engine = make_engine(config.node.resolved_database_url())
    with session_factory(engine)() as s:
        audited = s.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.study_instance_uid,
                                   AuditEvent.detail).where(AuditEvent.action == "job_retried")).all()
    engine.dispose()
    assert len(audited) == 1 and audited[0][2] == study_uid and "scanner offline" in audited[0][3]
    status = json.loads(cxrnode("status", "--config", str(cfg_path), "--json").stdout)
    assert status["queue"]["jobs_pending"] == 1 and status["queue"]["oldest_pending_job_age_s"] >= 0

    # a node with a worker drafts the retried job with the shipped model
    worker_cfg = write_config(site["tmp"] / "worker.toml", {**site["sections"], "jobs": {
        **site["sections"]["jobs"], "workers": 1}})
    drafter = Serve(worker_cfg, site["tmp"] / "serve2.log")
    try:
        shown = wait_for(lambda: (d := jobs_json(cfg_path, "show", str(job.job_id), "--json"))["state"] == "done"
                         and d, timeout=180, interval=0.5)
    finally:
        drafter.stop()
    assert shown["schema"] == "cxrnode.job/1" and shown["attempts"] == 1 and shown["last_error"] is None
    assert "retried by" in shown["log"] and "views" in shown["log"]
    (sr,) = shown["srs"]
    assert Path(sr["path"]).is_file() and sr["state"] == "new"
    assert sr["input_check"]["outcome"] in ("passed", "partial", "warned", "withheld")
    text = cxrnode("jobs", "--config", str(cfg_path), "show", str(job.job_id)).stdout
    assert f"draft {sr['draft_id']} (new) {sr['sop_instance_uid']}" in text and "input gate " in text

    proc = cxrnode("jobs", "--config", str(cfg_path), "retry", str(job.job_id))
    assert proc.returncode == 1 and "is done: only failed or pending jobs can be retried" in proc.stderr

    status = json.loads(cxrnode("status", "--config", str(cfg_path), "--json").stdout)
    q = status["queue"]
    assert q["drafts_waiting_review"] == 1 and q["oldest_draft_waiting_review_age_s"] >= 0
    assert q["outbound_waiting"]["pacs"] + q["outbound_failed"]["pacs"] == 1

    from prometheus_client.parser import text_string_to_metric_families

    prom = site["tmp"] / "textfile" / "cxrnode.prom"
    assert cxrnode("status", "--config", str(cfg_path), "--prometheus", str(prom)).returncode == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    assert samples[("cxrnode_drafts_waiting_review", ())] == 1
    assert samples[("cxrnode_jobs", (("state", "done"),))] == 1
    assert samples[("cxrnode_jobs", (("state", "failed"),))] == 0
    assert samples[("cxrnode_oldest_pending_job_age_seconds", ())] == 0
    assert ("cxrnode_outbound_waiting", (("destination", "pacs"),)) in samples
    assert samples[("cxrnode_status_generated_timestamp_seconds", ())] > 1.7e9
    assert not list(prom.parent.glob("*.tmp*"))  # written atomically


def test_retry_refusals_and_an_empty_queue(site: dict[str, Any]) -> None:
    from dicom_node.db import migrate

    migrate(load_config(site["config"], env={}).node.resolved_database_url())
    proc = cxrnode("jobs", "--config", str(site["config"]), "retry", "99")
    assert proc.returncode == 1 and "job 99: no such job" in proc.stderr
    proc = cxrnode("jobs", "--config", str(site["config"]), "retry")
    assert proc.returncode == 2 and "give a job ID or --failed" in proc.stderr
    proc = cxrnode("jobs", "--config", str(site["config"]), "retry", "--failed")
    assert proc.returncode == 0 and "No failed jobs." in proc.stdout
    assert cxrnode("jobs", "--config", str(site["config"])).stdout.strip() == "No jobs."
    proc = cxrnode("jobs", "--config", str(site["config"]), "show", "7")
    assert proc.returncode == 1 and "no job 7" in proc.stderr
