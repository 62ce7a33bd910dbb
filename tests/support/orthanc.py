"""A real Orthanc (the Debian package's server) on loopback, standing in for the PACS.

``OrthancServer(workdir, modalities)`` writes a configuration JSON (ephemeral HTTP and DICOM
ports, its own storage folder, no plugins, no authentication on loopback, a DicomModalities
entry per peer), starts ``Orthanc`` and waits for its REST API. ``stop()`` terminates the
process it started (by its pid); ``start()`` again reuses the same folder and ports, so the
archive survives a restart.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AE_TITLE = "ORTHANC"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available() -> bool:
    return Path(ORTHANC_BIN).exists()


class OrthancServer:
    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]]) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> None:
        cfg: dict[str, Any] = {
            "Name": "cxrnode-e2e-pacs",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": AE_TITLE,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            "SaveJobs": False,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
            "ConcurrentJobs": 1,
        }
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def start(self, timeout: float = 60.0) -> OrthancServer:
        if self.proc is not None:
            raise RuntimeError("Orthanc is already running")
        self.write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                self._request("GET", "/system", timeout=2)
                return self
            except OSError:  # URLError, connection refused, timeout
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    # -- REST helpers --------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, json_body: Any = None,
                 timeout: float = 60) -> bytes:
        headers = {}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # raises HTTPError on 4xx/5xx
            data: bytes = resp.read()
            return data

    def upload(self, path: Path) -> dict[str, Any]:
        return self.upload_bytes(path.read_bytes())

    def upload_bytes(self, data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._request("POST", "/instances", body=data))
        return result

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        ids: list[str] = json.loads(self._request("POST", "/tools/find", json_body={"Level": level, "Query": query}))
        return ids

    def send_to_modality(self, modality: str, resources: list[str]) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._request(
            "POST", f"/modalities/{modality}/store", json_body={"Resources": resources, "Synchronous": True},
            timeout=120))
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._request("GET", f"/instances/{orthanc_id}/file")
