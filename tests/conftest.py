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
from node_config import node_sections, write_config

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
