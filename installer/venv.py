"""One virtual environment per installed version, built offline from the bundle's wheelhouse, and
the commands the installer runs with that version's own interpreter.

Those commands are the module :mod:`installer.in_venv` run as ``python -I -m installer.in_venv``
(``-I``: neither the working directory nor ``PYTHON*`` variables can shadow the installed
packages), so the version being installed migrates its own database schema and renders its own
unit. Standard library only.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from installer.bundle import say
from installer.layout import InstallError


def clean_pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no site pip.conf: it could point at an index
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def create_venv(bundle: Path, info: dict[str, Any], target: Path) -> Path:
    """A virtual environment at ``target`` with cxrnode and its pinned dependencies, offline."""
    wheelhouse = bundle / "wheelhouse"
    pip_wheels = sorted(wheelhouse.glob("pip-*.whl"))
    own = sorted(wheelhouse.glob("cxrnode-*.whl"))
    if not pip_wheels or not own:
        raise InstallError(f"{wheelhouse}: no pip or cxrnode wheel; the bundle is incomplete")
    if (sys.version_info.major, sys.version_info.minor) != (3, 11) and info.get("python") == "cp311":
        say(f"note: the bundle's wheels are for CPython 3.11; this is {sys.version.split()[0]}")
    env = clean_pip_env()
    # -I: the working directory (wherever root ran install.sh from) is not on sys.path
    subprocess.run([base_python(), "-I", "-m", "venv", "--without-pip", str(target)], check=True, env=env)
    py = target / "bin" / "python"
    pip = [str(py), str(pip_wheels[-1] / "pip"), "install", "--isolated", "--no-index",
           "--find-links", str(wheelhouse), "--no-cache-dir", "--progress-bar", "off", "-q"]
    say("  installing the runtime dependencies from the wheelhouse (no network)")
    check_call([*pip, "-r", str(wheelhouse / "requirements.txt"), str(pip_wheels[-1])], env, "pip install")
    say("  installing cxrnode")
    check_call([*pip, "--no-deps", str(own[-1])], env, "pip install cxrnode")
    return py


def check_call(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout



def run_in(py: Path, *args: str) -> str:
    """``py -I -m installer.in_venv ARGS``: a command of :mod:`installer.in_venv` run by an installed
    version's interpreter; its standard output."""
    env = clean_pip_env()
    env.pop("CXRNODE_CONFIG", None)
    return check_call([str(py), "-I", "-m", "installer.in_venv", *args], env, "running the installed cxrnode").strip()


def migrate_with(py: Path, config: Path, revision: str = "head") -> dict[str, str]:
    """Upgrade the database of ``config`` to ``revision`` with ``py``'s migrations;
    ``{"revision": ..., "head": ...}`` afterwards."""
    out = run_in(py, "migrate", str(config), revision)
    return dict(json.loads(out.splitlines()[-1]))


def downgrade_with(py: Path, config: str, revision: str) -> None:
    """Downgrade the database of ``config`` to ``revision`` with ``py``'s migrations (which know
    the newer revisions being undone)."""
    run_in(py, "downgrade", config, revision)


def schema_head(py: Path) -> str:
    """The newest schema revision the version of ``py`` knows."""
    return run_in(py, "head")


def backup_sqlite(url: str, dest_dir: Path, label: str) -> Path | None:
    """A consistent copy of the SQLite index (taken while the node may be running)."""
    if not url.startswith("sqlite:///"):
        return None
    src = Path(url.removeprefix("sqlite:///"))
    if not src.is_file():
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"cxrnode-{label}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.db"
    with sqlite3.connect(src) as s, sqlite3.connect(dest) as d:
        s.backup(d)
    return dest
