"""``cxrnode doctor`` a monitoring system can trust (issue 14): the node service down is FAIL
(stopped on purpose is WARN with its own code), no reviewers is WARN on a node and FAIL on a
reviewer workstation, waiting jobs that carry errors are WARN with their ids and the last error,
the missing bundle's hint lists the installed ones, the display of a reviewer workstation is
probed in a subprocess, and ``--json`` has a versioned schema. Real SQLite index, real Node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from installer_helpers import REPO, free_port

from dicom_node.config import load_config
from dicom_node.db import migrate
from installer import doctor
from installer.doctor import FAIL, OK, WARN, Check, run_checks

REVIEWER = '\n[[reviewers]]\nusername = "alice"\ndisplay_name = "Doe^Alice"\n'


def write(path: Path, storage: Path, port: int, extra: str = "") -> Path:
    path.write_text(f'[node]\nstorage_dir = "{storage}"\nhost = "127.0.0.1"\nport = {port}\n' + extra)
    return path


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    storage = tmp_path / "data"
    storage.mkdir()
    port = free_port()
    cfg = write(tmp_path / "cxrnode.toml", storage, port)
    migrate(load_config(cfg, env={}).node.resolved_database_url())
    return {"tmp": tmp_path, "storage": storage, "config": cfg, "port": port}


def by_name(results: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in results}


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "installer", "doctor", "--json", "--no-inference", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=180, env=env)
    return proc.returncode, json.loads(proc.stdout)


def test_json_schema_and_a_node_that_is_not_running_is_a_fail(site: dict[str, Any]) -> None:
    rc, out = cli("--config", str(site["config"]))
    assert out["schema"] == "cxrnode.doctor/1" and out["role"] == "node"
    assert set(out) >= {"schema", "generated_at", "role", "ok", "status", "summary", "checks"}
    for c in out["checks"]:
        assert set(c) == {"name", "status", "code", "detail", "hint", "data"} and c["code"], c
    checks = {c["name"]: c for c in out["checks"]}
    svc = checks["node service"]
    assert svc["status"] == FAIL and svc["code"] == "node.not_running", svc
    assert rc == 1 and out["ok"] is False and out["status"] == FAIL
    assert checks["reviewers"]["status"] == WARN and checks["reviewers"]["code"] == "reviewers.none"
    assert "display" not in checks  # not a reviewer workstation
    # without a specific reason the code is "<check>.<level>", the check's name in snake case
    assert checks["storage writable"]["code"] == "storage_writable.ok"
    assert checks["destinations"]["code"] == "destinations.warn"


def test_a_running_node_is_ok(site: dict[str, Any]) -> None:
    from dicom_node.node import Node

    node = Node(load_config(site["config"], ["jobs.workers=0"], env={}))
    node.start()
    try:
        r = by_name(run_checks(str(site["config"]), inference=False, echo_timeout_s=3))
    finally:
        node.stop()
    assert r["node service"].status == OK and r["node service"].code == "service.running"


@pytest.mark.parametrize(("props", "status", "code"), [
    ({"ActiveState": "active", "SubState": "running", "Result": "success"}, OK, "service.running"),
    ({"ActiveState": "inactive", "SubState": "dead", "Result": "success"}, WARN, "service.stopped"),
    ({"ActiveState": "failed", "SubState": "failed", "Result": "exit-code"}, FAIL, "service.down"),
    ({"ActiveState": "activating", "SubState": "auto-restart", "Result": "exit-code"}, FAIL, "service.down"),
])
def test_systemd_states(site: dict[str, Any], monkeypatch: pytest.MonkeyPatch, props: dict[str, str], status: str,
                        code: str) -> None:
    """With an installed unit, systemd's own state decides (parsed from `systemctl show` output)."""
    monkeypatch.setattr(doctor, "_installed_unit", lambda: "cxrnode.service")
    monkeypatch.setattr(doctor, "_systemctl_show", lambda unit: {"LoadState": "loaded", "UnitFileState": "enabled",
                                                                **props})
    r = by_name(run_checks(str(site["config"]), inference=False))["node service"]
    assert (r.status, r.code) == (status, code), r
    if status != OK:
        assert "cxrnode.service" in r.hint


def test_reviewers_warn_on_a_node_fail_on_a_workstation(site: dict[str, Any]) -> None:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    rc, out = cli("--config", str(site["config"]), "--role", "reviewer", env=env)
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["reviewers"]["status"] == FAIL and rc == 1
    assert "node service" not in checks  # no service on a workstation
    assert checks["display"]["status"] == OK and checks["display"]["data"]["platform"] == "offscreen", checks["display"]
    with_one = write(site["tmp"] / "r.toml", site["storage"], site["port"], REVIEWER)
    assert by_name(run_checks(str(with_one), inference=False, role="reviewer"))["reviewers"].status == OK


def test_display_without_a_screen_is_a_fail_that_says_what_is_missing(site: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(k, raising=False)
    r = by_name(run_checks(str(site["config"]), inference=False, role="both"))
    assert r["display"].status == FAIL and r["display"].code == "display.missing"
    assert "neither DISPLAY nor WAYLAND_DISPLAY" in r["display"].detail


def test_waiting_jobs_with_errors_are_a_warning_with_ids_and_the_last_error(site: dict[str, Any]) -> None:
    from dicom_node.db import Job, JobState, Study, make_engine, session_factory, utcnow

    engine = make_engine(load_config(site["config"], env={}).node.resolved_database_url())
    with session_factory(engine)() as s:
        ids = []
        for i, err in enumerate(["BundleError: model bundle 'defualt' not found", "OSError: disk"]):
            st = Study(study_instance_uid=f"1.2.3.{i}")
            s.add(st)
            s.flush()
            job = Job(study_id=st.id, state=JobState.PENDING, last_error=err, attempts=1,
                      updated_at=utcnow().replace(second=i))
            s.add(job)
            s.flush()
            ids.append(job.id)
        s.commit()
    engine.dispose()
    q = by_name(run_checks(str(site["config"]), inference=False))["queue"]
    assert q.status == WARN and q.code == "queue.job_errors", q
    assert sorted(q.data["erring_job_ids"]) == sorted(ids)
    assert q.data["last_error"] == "OSError: disk" and "last: OSError: disk" in q.detail
    assert "cxrnode jobs show" in q.hint


def test_missing_bundle_hint_lists_the_installed_bundles(site: dict[str, Any]) -> None:
    m = by_name(run_checks(str(site["config"]), ["model.bundle=defualt"], inference=False))["model bundle"]
    assert m.status == FAIL and m.code == "model.not_found"
    assert "default" in m.data["available"] and "installed bundle (default" in m.hint
    assert "corrupt" not in m.hint
