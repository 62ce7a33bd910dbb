"""Shared helpers for the installer suites: free ports, DCMTK tools, the offline namespace."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> str | None:
    """Path of the DCMTK tool (not pynetdicom's app of the same name, which a venv may put first)."""
    for cand in (f"/usr/bin/{tool}", shutil.which(tool)):
        if not cand or not Path(cand).is_file():
            continue
        out = subprocess.run([cand, "--version"], capture_output=True, text=True)
        if "dcmtk" in (out.stdout + out.stderr).lower() or "offis" in (out.stdout + out.stderr).lower():
            return cand
    return None


def offline_prefix() -> list[str]:
    """``unshare -n`` (a network namespace with no network at all) when this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def example_config_text() -> str:
    return (REPO / "installer" / "templates" / "cxrnode.example.toml").read_text(encoding="utf-8")
