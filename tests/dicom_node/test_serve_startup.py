"""``cxrnode serve`` stops at start with one line naming the key, and a documented exit code
(issue 14): a wrong model bundle, a port in use, a storage folder it cannot write, an
unreachable PostgreSQL, free space below the floor. Real subprocesses, real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from node_config import node_sections, write_config

from dicom_node.startup import EXIT_CONFIG, EXIT_DATABASE, EXIT_DISK, EXIT_PORT, EXIT_STORAGE

CXRNODE = [sys.executable, "-m", "installer"]


def serve(config: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CXRNODE, "serve", "--config", str(config), *extra], capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def cfg(tmp_path: Path, free_port: Any) -> Any:
    def make(**sections: dict[str, Any]) -> Path:
        sections["node"] = {"port": free_port(), **sections.get("node", {})}
        s = node_sections(tmp_path, **sections)
        return write_config(tmp_path / "cxrnode.toml", s)
    return make


def test_a_misspelt_model_bundle_stops_the_node_before_it_listens(cfg: Any) -> None:
    proc = serve(cfg(model={"bundle": "defualt"}))
    assert proc.returncode == EXIT_CONFIG == 2
    line = one_line(proc)
    assert line.startswith("cxrnode serve: model.bundle: 'defualt'"), line
    assert "available: default" in line and "(exit 2)" in line


def test_verbose_adds_the_traceback(cfg: Any) -> None:
    proc = serve(cfg(model={"bundle": "defualt"}), "--verbose")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "BundleError" in proc.stderr


def test_port_in_use(cfg: Any, tmp_path: Path) -> None:
    path = cfg(jobs={"workers": 0})
    port = int(path.read_text().split("port = ")[1].split()[0])
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        proc = serve(path)
    assert proc.returncode == EXIT_PORT == 3
    line = one_line(proc)
    assert f"node.port: 127.0.0.1:{port} is already in use" in line and "choose another node.port" in line


def test_storage_folder_that_cannot_be_written(cfg: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    proc = serve(cfg(node={"storage_dir": str(blocker / "store")}, jobs={"workers": 0}))
    assert proc.returncode == EXIT_STORAGE == 4
    line = one_line(proc)
    assert line.startswith(f"cxrnode serve: node.storage_dir: '{blocker / 'store'}' cannot be created or written")
    assert "chown" in line


def test_unreachable_postgresql(cfg: Any, free_port: Any) -> None:
    url = f"postgresql+psycopg://cxr:s3cret@127.0.0.1:{free_port()}/cxrnode"
    proc = serve(cfg(node={"database_url": url}, jobs={"workers": 0}))
    assert proc.returncode == EXIT_DATABASE == 6
    line = one_line(proc)
    assert line.startswith("cxrnode serve: node.database_url: postgresql+psycopg://cxr:***@127.0.0.1:")
    assert "s3cret" not in proc.stderr and "database server runs" in line


def test_free_space_below_the_floor(cfg: Any) -> None:
    proc = serve(cfg(node={"min_free_space_mb": 10**9}, jobs={"workers": 0}))
    assert proc.returncode == EXIT_DISK == 5
    assert "node.min_free_space_mb:" in one_line(proc)


def test_the_model_loads_before_the_port_is_bound(cfg: Any, tmp_path: Path) -> None:
    """With workers, the node listens only after the model loaded (and json logs are one object a line)."""
    path = cfg(jobs={"workers": 1})
    port = int(path.read_text().split("port = ")[1].split()[0])
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*CXRNODE, "serve", "--config", str(path), "--log-format", "json"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    text = log.read_text()
    records = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    msgs = [r["message"] for r in records]
    loaded = next(i for i, m in enumerate(msgs) if m.startswith("loaded model"))
    started = next(i for i, m in enumerate(msgs) if m.startswith("node CXRNODE started"))
    assert loaded < started, msgs
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert not any(r["logger"].startswith("highdicom") and r["level"] == "INFO" for r in records)
