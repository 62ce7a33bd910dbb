"""Shared fixtures: free ports, a temporary configuration, a running Node, database URLs.

The PostgreSQL variants run when ``CXRNODE_TEST_POSTGRES_URL`` is set (``.ci/run`` starts a
server on port 55432); otherwise they are skipped.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import Config, load_config

POSTGRES_ENV = "CXRNODE_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A function returning a currently free TCP port on loopback."""
    return _free_port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML config: ``{"node": {...}, "destinations": [{...}]}``."""
    lines: list[str] = []
    for section, values in sections.items():
        if isinstance(values, list):
            for item in values:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def node_sections(tmp_path: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
    """Config sections for a fast, loopback-only test node under ``tmp_path``."""
    sections: dict[str, Any] = {
        "node": {
            "ae_title": "CXRNODE",
            "host": "127.0.0.1",
            "port": 0,
            "storage_dir": str(tmp_path / "store"),
            "min_free_space_mb": 0,
            "fsync": True,
            "acse_timeout_s": 10.0,
            "dimse_timeout_s": 20.0,
            "network_timeout_s": 20.0,
            "log_level": "INFO",
        },
        "study": {"quiet_period_s": 0.5},
        "jobs": {"workers": 1, "poll_interval_s": 0.05, "lease_s": 30.0, "backoff_s": 0.2, "max_attempts": 3},
        "outbound": {"backoff_s": 0.1, "max_attempts": 3},
    }
    for section, values in overrides.items():
        if isinstance(values, list):
            sections[section] = values
        else:
            sections.setdefault(section, {}).update(values)
    return sections




@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """``make_config(node={...}, security={...}, destinations=[...])`` -> a validated Config."""
    counter = iter(range(1000))

    def make(**overrides: Any) -> Config:
        path = write_config(tmp_path / f"cxrnode-{next(counter)}.toml", node_sections(tmp_path, **overrides))
        return load_config(path, env={})

    return make


@pytest.fixture
def start_node() -> Iterator[Callable[..., Any]]:
    """``start_node(config, job_handler=None, sender=None)`` -> a started Node, stopped at teardown."""
    from dicom_node.node import Node

    nodes: list[Node] = []

    def start(config: Config, job_handler: Any = None, sender: Any = None) -> Node:
        node = Node(config, job_handler=job_handler, sender=sender)
        node.start()
        nodes.append(node)
        return node

    yield start
    for n in reversed(nodes):
        n.stop(grace_s=5.0)


def _reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from dicom_node.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated index database: SQLite always, PostgreSQL when configured."""
    from dicom_node.db import migrate

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.db'}"
    else:
        url = os.environ.get(POSTGRES_ENV, "")
        if not url:
            pytest.skip(f"{POSTGRES_ENV} is not set")
        _reset_postgres(url)
    migrate(url)
    return url
