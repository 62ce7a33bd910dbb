"""``cxrnode doctor`` against real pieces: a migrated SQLite index, a running Node answering
C-ECHO, a port held by something that is not DICOM, a closed destination port, a full tmpfs,
a corrupted model bundle, TLS certificates made by openssl."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from installer_helpers import REPO, free_port

from dicom_node.config import load_config
from dicom_node.db import migrate
from installer.doctor import FAIL, OK, WARN, Check, run_checks


def write_config(path: Path, storage: Path, port: int, extra: str = "", **node: Any) -> Path:
    lines = ["[node]", f'storage_dir = "{storage}"', 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in node.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    storage = tmp_path / "data"
    storage.mkdir()
    cfg = write_config(tmp_path / "cxrnode.toml", storage, free_port())
    migrate(load_config(cfg, env={}).node.resolved_database_url())
    return {"tmp": tmp_path, "storage": storage, "config": cfg}


def by_name(results: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in results}


def test_healthy_basics_and_exit_status(site: dict[str, Any]) -> None:
    r = by_name(run_checks(str(site["config"]), inference=False))
    for name in ("config", "storage writable", "storage free space", "database", "listening port", "tls", "queue"):
        assert r[name].status == OK, (name, r[name])
    assert r["destinations"].status == WARN  # none configured
    assert r["inference"].status == WARN  # skipped on request
    proc = subprocess.run([sys.executable, "-m", "installer", "doctor", "--config", str(site["config"]),
                           "--json", "--no-inference", "--set", "model.bundle=" + str(site["tmp"] / "nomodel")],
                          capture_output=True, text=True, cwd=REPO)
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["ok"] is False  # the missing model bundle is a FAIL
    assert {c["name"]: c["status"] for c in out["checks"]}["model bundle"] == FAIL


def test_invalid_config_fails_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 99999\n")
    r = run_checks(str(bad), inference=False)
    assert [c.status for c in r] == [FAIL] and "node.port" in r[0].detail


def test_reviewers_in_a_file_others_can_write_are_a_warning(site: dict[str, Any]) -> None:
    cfg = site["config"]
    cfg.write_text(cfg.read_text() + '\n[[reviewers]]\nusername = "jdoe"\ndisplay_name = "Doe^Jane"\n')
    cfg.chmod(0o640)
    if os.geteuid() == 0:
        assert by_name(run_checks(str(cfg), inference=False))["config"].status == OK
    cfg.chmod(0o666)
    check = by_name(run_checks(str(cfg), inference=False))["config"]
    assert check.status == WARN and "the reviewers cannot sign" in check.detail and "writable by others" in check.detail
    assert check.hint.startswith(f"make the file root's and writable by root only: chown root: {cfg}")


def test_database_not_migrated(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = write_config(tmp_path / "c.toml", tmp_path / "data", free_port())
    r = by_name(run_checks(str(cfg), inference=False))
    assert r["database"].status == FAIL and "no database file" in r["database"].detail
    assert r["queue"].status == FAIL


@pytest.fixture
def not_dicom_listener() -> Iterator[int]:
    """A TCP server on loopback that answers like a web server, not a DICOM node."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield int(srv.getsockname()[1])
    stop.set()
    t.join()
    srv.close()


def test_wrong_port_in_use_by_something_else_fails(site: dict[str, Any], not_dicom_listener: int) -> None:
    r = by_name(run_checks(str(site["config"]), [f"node.port={not_dicom_listener}"], inference=False,
                           echo_timeout_s=3))
    assert r["listening port"].status == FAIL, r["listening port"]
    assert "in use by something that does not answer C-ECHO" in r["listening port"].detail


def test_port_not_bindable_fails(site: dict[str, Any]) -> None:
    r = by_name(run_checks(str(site["config"]), ["node.host=192.0.2.1"], inference=False))  # TEST-NET, not ours
    assert r["listening port"].status == FAIL and "cannot bind" in r["listening port"].detail


def test_running_node_answers_and_unreachable_destination_fails(site: dict[str, Any]) -> None:
    from dicom_node.node import Node

    closed = free_port()  # nothing listens there
    cfg = load_config(site["config"], ["jobs.workers=0"], env={})  # the SCP is what is checked here
    node = Node(cfg)
    node.start()
    try:
        extra = (f'\n[[destinations]]\nname = "self"\nae_title = "CXRNODE"\nhost = "127.0.0.1"\nport = {node.port}\n'
                 f'\n[[destinations]]\nname = "gone"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {closed}\n')
        cfg_path = write_config(site["tmp"] / "d.toml", site["storage"], node.port, extra)
        r = by_name(run_checks(str(cfg_path), inference=False, echo_timeout_s=3))
    finally:
        node.stop()
    assert r["listening port"].status == OK and "answers C-ECHO" in r["listening port"].detail
    assert r["destination self"].status == OK
    assert r["destination gone"].status == FAIL and f"PACS@127.0.0.1:{closed}" in r["destination gone"].detail


def test_free_space_floor_above_free_space_fails(site: dict[str, Any]) -> None:
    free_mb = shutil.disk_usage(site["storage"]).free // (1024 * 1024)
    r = by_name(run_checks(str(site["config"]), [f"node.min_free_space_mb={free_mb + 1024}"], inference=False))
    assert r["storage free space"].status == FAIL and "0xA700" in r["storage free space"].detail
    r = by_name(run_checks(str(site["config"]), [f"node.min_free_space_mb={free_mb * 2 // 3}"], inference=False))
    assert r["storage free space"].status == WARN


def _mount_tmpfs(where: Path, size: str) -> bool:
    if not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_full_disk_on_a_small_tmpfs_fails(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (not root or no mount permission); the floor test covers free space")
    try:
        cfg = write_config(tmp_path / "c.toml", mnt, free_port())
        migrate(load_config(cfg, env={}).node.resolved_database_url())
        with open(mnt / "filler", "wb") as f:  # fill the volume to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = by_name(run_checks(str(cfg), inference=False))
        assert r["storage free space"].status == FAIL
        assert r["storage writable"].status == FAIL and "cannot write" in r["storage writable"].detail
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fake_model_bundle(path: Path) -> Path:
    """A structurally valid bundle (the real loader checks it) with placeholder graph files."""
    from onnx_models.bundle import FORMAT_NAME, FORMAT_VERSION, write_manifest

    path.mkdir()
    for name in ("encoder.onnx", "bridge.onnx", "decoder.onnx", "tokenizer.json"):
        (path / name).write_bytes(b"placeholder " + name.encode() * 100)
    write_manifest(path, {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": "fake", "version": "0",
        "task": "cxr-report", "architecture": "encoder-decoder",
        "graphs": {r: {"file": f"{r}.onnx"} for r in ("encoder", "bridge", "decoder")},
        "tokenizer": {"file": "tokenizer.json"}, "input": {}, "generation": {},
    })
    return path


def _corrupt_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_broken_model_file_fails(site: dict[str, Any]) -> None:
    bundle = _fake_model_bundle(site["tmp"] / "model")
    r = by_name(run_checks(str(site["config"]), [f'model.bundle="{bundle}"'], inference=False))
    assert r["model bundle"].status == OK, r["model bundle"]
    _corrupt_one_byte(bundle / "decoder.onnx")
    r = by_name(run_checks(str(site["config"]), [f'model.bundle="{bundle}"'], inference=False))
    assert r["model bundle"].status == FAIL and "checksum mismatch for decoder.onnx" in r["model bundle"].detail


def test_shipped_model_and_inference_then_a_corrupted_copy_fails(site: dict[str, Any]) -> None:
    from onnx_models.bundle import BUNDLES_DIR

    default = BUNDLES_DIR / "default"
    assert (default / "manifest.json").is_file(), f"the shipped model bundle {default} is missing"
    r = by_name(run_checks(str(site["config"]), ["model.beam_size=1", "model.max_report_tokens=16"]))
    assert r["model bundle"].status == OK, r["model bundle"]
    assert r["onnx runtime"].status in (OK, WARN) and "CPUExecutionProvider" in r["onnx runtime"].data["in_use"]
    assert r["inference"].status == OK, r["inference"]
    assert r["inference"].data["latency_ms"] > 0 and r["inference"].data["views"] >= 1
    copy = site["tmp"] / "copy"
    shutil.copytree(default, copy)
    graph = json.loads((copy / "manifest.json").read_text())["graphs"]["decoder"]["file"]
    _corrupt_one_byte(copy / graph)
    r = by_name(run_checks(str(site["config"]), [f'model.bundle="{copy}"']))
    assert r["model bundle"].status == FAIL and "checksum mismatch" in r["model bundle"].detail
    assert r["inference"].status == FAIL


def _openssl_cert(tmp: Path, days: int) -> tuple[Path, Path]:
    cert, key = tmp / f"c{days}.pem", tmp / f"k{days}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=cxrnode-test",
                    "-days", str(days), "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    key.chmod(0o600)  # as a site should keep it (doctor FAILs a key others can read)
    return cert, key


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl command not installed")
def test_tls_days_to_expiry_and_unreadable_key(site: dict[str, Any]) -> None:
    for days, status in ((400, OK), (10, WARN)):
        cert, key = _openssl_cert(site["tmp"], days)
        sets = [f'security.tls_certificate="{cert}"', f'security.tls_private_key="{key}"']
        r = by_name(run_checks(str(site["config"]), sets, inference=False))
        assert r["tls"].status == status, r["tls"]
        assert r["tls"].data["days_left"] in (days - 1, days)
    other_cert, _ = _openssl_cert(site["tmp"], 401)
    mismatched = [f'security.tls_certificate="{other_cert}"', f'security.tls_private_key="{key}"']
    assert by_name(run_checks(str(site["config"]), mismatched, inference=False))["tls"].status == FAIL
    missing = [f'security.tls_certificate="{cert}"', f'security.tls_private_key="{site["tmp"] / "nokey.pem"}"']
    r = by_name(run_checks(str(site["config"]), missing, inference=False))
    assert r["tls"].status == FAIL and "not readable" in r["tls"].detail


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl command not installed")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_private_key_readable_by_group_or_others_fails_with_a_chmod_600_hint(site: dict[str, Any], mode: int) -> None:
    cert, key = _openssl_cert(site["tmp"], 400)
    sets = [f'security.tls_certificate="{cert}"', f'security.tls_private_key="{key}"']
    assert by_name(run_checks(str(site["config"]), sets, inference=False))["tls"].status == OK
    key.chmod(mode)
    tls = by_name(run_checks(str(site["config"]), sets, inference=False))["tls"]
    assert tls.status == FAIL and f"mode {mode:04o}" in tls.detail, tls
    assert tls.hint.startswith(f"chmod 600 {key}") and "0640" not in tls.hint and "group" not in tls.hint, tls.hint


def test_queue_health_reports_failed_jobs(site: dict[str, Any]) -> None:
    from dicom_node.db import Job, JobState, Study, make_engine, session_factory

    engine = make_engine(load_config(site["config"], env={}).node.resolved_database_url())
    with session_factory(engine)() as s:
        st = Study(study_instance_uid="1.2.3")
        s.add(st)
        s.flush()
        s.add(Job(study_id=st.id, state=JobState.FAILED, last_error="boom"))
        s.commit()
    engine.dispose()
    r = by_name(run_checks(str(site["config"]), inference=False))
    assert r["queue"].status == WARN and r["queue"].data["jobs_failed"] == 1


def test_node_with_an_ae_whitelist_is_up_but_rejects_us_as_a_destination(site: dict[str, Any]) -> None:
    from dicom_node.node import Node

    cfg = load_config(site["config"], ["jobs.workers=0", 'security.allowed_calling_ae_titles=["MODALITY"]'], env={})
    node = Node(cfg)
    node.start()
    try:
        extra = ('\n[security]\nallowed_calling_ae_titles = ["MODALITY"]\n'
                 f'\n[[destinations]]\nname = "strict"\nae_title = "CXRNODE"\nhost = "127.0.0.1"\nport = {node.port}\n')
        cfg_path = write_config(site["tmp"] / "w.toml", site["storage"], node.port, extra)
        r = by_name(run_checks(str(cfg_path), inference=False, echo_timeout_s=3))
    finally:
        node.stop()
    assert r["listening port"].status == OK and "policy" in r["listening port"].detail, r["listening port"]
    assert r["destination strict"].status == FAIL and "rejected the association" in r["destination strict"].detail
