"""Scale-out end to end (issue 16): one ``cxrnode serve`` with ``jobs.workers = 0`` and two
``cxrnode worker`` processes, each in its own working folder, on one storage root and one real
PostgreSQL database, all on loopback.

- ``cxrnode migrate`` is started twice at the same moment against the fresh database: both exit
  0 and the schema is applied once (the detailed version, with the refusals of an unknown
  revision, is ``tests/dicom_node/test_scale_out.py::test_two_migrations_at_once_apply_once``).
- 40 studies (the shipped 2-view sample under new UIDs, 256x256) are sent on 40 parallel
  associations; each is drafted exactly once: one job, done, one draft, one ``drafted`` event.
- While the studies are drafted, one worker is caught holding a job (the database shows a
  ``running`` job whose lease owner is that worker's pid), frozen, checked again, and killed
  with ``kill -9``; its job is finished by the other worker once the lease (8 s here) ran out.
- A second ``serve`` (another host id, another port) started on the same storage root while the
  first runs leaves the first host's spool file alone, cleans its own, and its study is drafted
  by the surviving worker.

The in-process variant of the spool check is
``tests/dicom_node/test_scale_out.py::test_second_host_leaves_first_hosts_spool_alone``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node_config import node_sections, write_config  # noqa: E402
from support.postgres import private_database  # noqa: E402

from dicom_node.db import (  # noqa: E402
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
from plugin.drafting.samples import make_study  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CXRNODE = [sys.executable, "-m", "installer"]
STUDIES = 40
LEASE_S = 8.0


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")


class Proc:
    """A ``cxrnode`` subprocess in its own working folder, ready once its stderr says ``ready``."""

    def __init__(self, name: str, args: list[str], tmp_path: Path, ready: str) -> None:
        self.name = name
        self.log = tmp_path / f"{name}.log"
        cwd = tmp_path / name  # another working folder for every "host"
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([*CXRNODE, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        wait_for(lambda: self._ready(ready), timeout=180, interval=0.1, what=f"{name}: {ready!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return f"--- {self.name} ---\n" + self.log.read_text(errors="replace")[-3000:]

    def _ready(self, needle: str) -> bool:
        assert self.proc.poll() is None, self.tail()
        return needle in self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case the test froze it and failed
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def send_study(port: int, number: int, prefix: str) -> str:
    """One 2-view study in one association; every C-STORE must be acknowledged with 0x0000."""
    datasets = make_study(number, prefix=prefix)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established, f"study {number}: association refused or aborted"
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, f"study {number}: {status}"
    finally:
        assoc.release()
    return str(datasets[0].StudyInstanceUID)


@pytest.fixture
def pg_database() -> Iterator[str]:
    with private_database("e2e_scale") as url:
        yield url


def owned_by(pid: int) -> Any:
    """Jobs running under a lease of the process ``pid`` (lease owner ``<host>:<pid>:<thread>/<token>``)."""
    return (Job.state == JobState.RUNNING) & Job.lease_owner.like(f"%:{pid}:%")


def test_serve_two_workers_kill_one_second_serve(pg_database: str, tmp_path: Path, free_port: Any) -> None:
    shared = tmp_path / "shared"
    port, port2 = free_port(), free_port()
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(
        tmp_path,
        node={"database_url": pg_database, "port": port, "storage_dir": str(shared), "max_associations": 48,
              "max_pending_associations": 48},  # 40 senders open at the same moment
        # long enough that no study is promoted between its two instances on this loaded machine
        study={"quiet_period_s": 4.0},
        jobs={"workers": 0, "poll_interval_s": 0.1, "lease_s": LEASE_S, "backoff_s": 0.2, "max_attempts": 3},
        model={"threads": 1}))
    conf = ["--config", str(cfg)]

    # -- two `cxrnode migrate` at the same moment on the fresh database: both succeed, applied once
    migrations = [subprocess.Popen([*CXRNODE, "migrate", *conf], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in migrations]
    assert [p.returncode for p in migrations] == [0, 0], outs
    said = sorted(o[0] for o in outs)
    assert "already at revision" in said[0] and "upgraded from an empty database" in said[1], said
    rev, head = current_revision(pg_database)
    assert rev == head

    engine = make_engine(pg_database)
    sessions = session_factory(engine)
    procs: list[Proc] = []
    try:
        serve = Proc("serve", ["serve", *conf, "--set", 'node.host_id="receiver"'], tmp_path, "listening on")
        procs.append(serve)
        worker_a, worker_b = (
            Proc(name, ["worker", *conf, "--threads", "1", "--set", f'node.host_id="{name}"'], tmp_path,
                 "drafting thread(s)")
            for name in ("worker-a", "worker-b"))
        procs += [worker_a, worker_b]

        # -- 40 studies on 40 parallel associations; meanwhile catch worker A holding a job
        sent: list[str] = []
        send_error: list[BaseException] = []

        def send_all() -> None:
            try:
                with ThreadPoolExecutor(max_workers=STUDIES) as pool:
                    sent.extend(pool.map(lambda i: send_study(port, i, "scale-e2e"), range(STUDIES)))
            except BaseException as exc:  # reported by the main thread
                send_error.append(exc)

        sender = threading.Thread(target=send_all, name="senders")
        sender.start()

        killed_at = 0.0
        victim: tuple[int, str] | None = None  # (job id, lease owner) held by worker A when killed
        deadline = time.monotonic() + 150
        while victim is None and time.monotonic() < deadline:
            with sessions() as s:
                held = s.execute(select(Job.id, Job.lease_owner).where(owned_by(worker_a.pid))).first()
            if held is None:
                time.sleep(0.02)
                continue
            worker_a.proc.send_signal(signal.SIGSTOP)  # frozen: it can neither finish nor renew
            with sessions() as s:
                still = s.execute(select(Job.id).where(Job.id == held[0], Job.lease_owner == held[1],
                                                       Job.state == JobState.RUNNING)).first()
            if still is None:  # it finished in between: let it go on and catch the next one
                worker_a.proc.send_signal(signal.SIGCONT)
                continue
            os.kill(worker_a.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            assert worker_a.proc.wait(timeout=10) == -signal.SIGKILL
            victim = (held[0], str(held[1]))
        assert victim is not None, "worker A never held a job\n" + "\n".join(p.tail() for p in procs)

        sender.join(timeout=180)
        assert not sender.is_alive() and not send_error, send_error
        assert len(set(sent)) == STUDIES

        # the victim's job stays with the dead worker until its lease runs out (by the database's
        # clock), then worker B takes it over and finishes it
        with sessions() as s:
            lease_end = s.scalar(select(Job.lease_expires_at).where(Job.id == victim[0]))
        assert lease_end is not None
        polls_before_expiry = 0

        def victim_done() -> bool:
            nonlocal polls_before_expiry
            with sessions() as s:
                now = s.scalar(select(text("timezone('UTC', now())")))
                job = s.get(Job, victim[0])
                assert job is not None
                if now < lease_end:
                    polls_before_expiry += 1
                    assert (job.state, job.lease_owner) == (JobState.RUNNING, victim[1]), \
                        f"taken over before its lease ran out: {job.state} {job.lease_owner}"
                return job.state == JobState.DONE

        wait_for(victim_done, timeout=LEASE_S + 120, interval=0.1, what="the killed worker's job to be finished")
        taken_over_after = time.monotonic() - killed_at
        assert polls_before_expiry > 0

        def all_drafted() -> bool:
            with sessions() as s:
                states = s.scalars(select(Study.state)).all()
                assert StudyState.FAILED not in states, "\n".join(p.tail() for p in procs)
                return len(states) == STUDIES and all(st == StudyState.DRAFTED for st in states)

        wait_for(all_drafted, timeout=180, interval=0.5, what="every study drafted")
        time.sleep(1.0)  # a second drafting of any study would show up now

        with sessions() as s:
            assert set(s.scalars(select(Study.study_instance_uid)).all()) == set(sent)
            jobs = {j.id: j for j in s.scalars(select(Job)).all()}
            table = sorted((j.study_id, j.id, j.state, j.attempts, j.study_generation) for j in jobs.values())
            assert len(jobs) == STUDIES and all(j.state == JobState.DONE for j in jobs.values()), table
            attempts = Counter(j.attempts for j in jobs.values())
            assert attempts == Counter({1: STUDIES - 1, 2: 1}), attempts  # only the victim ran twice
            victim_job = jobs[victim[0]]
            assert victim_job.attempts == 2
            assert f":{worker_a.pid}:" in victim[1]
            # the log line of attempt 1 is written just after the claim: A may have died in between
            ran_by = re.findall(r"attempt (\d) started .* by worker \S+:(\d+):\d+", victim_job.log)
            assert ran_by in ([("1", str(worker_a.pid)), ("2", str(worker_b.pid))],
                              [("2", str(worker_b.pid))]), victim_job.log
            per_study = Counter(s.scalars(select(Draft.study_id)).all())
            assert len(per_study) == STUDIES and set(per_study.values()) == {1}, per_study
            drafted = Counter(s.scalars(select(AuditEvent.study_instance_uid)
                                        .where(AuditEvent.action == "drafted")).all())
            assert drafted == Counter(dict.fromkeys(sent, 1)), drafted
            draft_paths = s.scalars(select(Draft.path)).all()
        assert all((shared / p).is_file() for p in draft_paths)
        # renewed every lease_s / 3 while alive: at least 2/3 of a lease was left when it died
        assert taken_over_after >= LEASE_S * 2 / 3 - 1.0, taken_over_after

        # -- a second serve on the same storage root while the first runs
        first_spool = shared / "tmp" / "receiver" / "in-flight-instance"
        first_spool.write_bytes(b"\0" * 128 + b"DICM" + b"x" * 1024)  # as if host 1 were receiving
        own_leftover = shared / "tmp" / "receiver-2" / "left-by-a-crash"
        own_leftover.parent.mkdir(exist_ok=True)
        own_leftover.write_bytes(b"partial")
        serve2 = Proc("serve-2", ["serve", *conf, "--set", 'node.host_id="receiver-2"', "--set", f"node.port={port2}"],
                      tmp_path, "listening on")
        procs.append(serve2)
        assert first_spool.read_bytes().startswith(b"\0" * 128 + b"DICM"), "the second serve touched host 1's spool"
        assert not own_leftover.exists(), "the second serve did not clean its own spool"
        extra = send_study(port2, STUDIES, "scale-e2e")  # received by host 2, drafted by worker B

        def extra_drafted() -> bool:
            with sessions() as s:
                return s.scalar(select(Study.state).where(Study.study_instance_uid == extra)) == StudyState.DRAFTED

        wait_for(extra_drafted, timeout=120, what="the second receiver's study to be drafted")
        with sessions() as s:
            log = s.scalar(select(Job.log).join(Study, Study.id == Job.study_id)
                           .where(Study.study_instance_uid == extra))
        assert f":{worker_b.pid}:" in (log or ""), log
        assert first_spool.exists()
    finally:
        engine.dispose()
        codes = {p.name: p.stop() for p in procs}
    assert codes == {"serve": 0, "worker-a": -signal.SIGKILL, "worker-b": 0, "serve-2": 0}, \
        (codes, "\n".join(p.tail() for p in procs))
