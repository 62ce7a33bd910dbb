"""A private PostgreSQL database for one test, on the server of ``CXRNODE_TEST_POSTGRES_URL``.

Other suites share the server, so each test that needs an empty database creates its own and
drops it afterwards (``WITH (FORCE)``: a node that did not stop cleanly still lets go). Without
the variable the test is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_ENV = "CXRNODE_TEST_POSTGRES_URL"


@contextmanager
def database_on(server: str, prefix: str) -> Iterator[str]:
    """The URL of a new, empty database ``cxrnode_<prefix>_<random>`` on the PostgreSQL
    ``server`` (a URL), dropped on exit (tests and benchmarks alike)."""
    name = f"cxrnode_{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def private_database(prefix: str) -> Iterator[str]:
    """:func:`database_on` the server of ``CXRNODE_TEST_POSTGRES_URL``; the test is skipped
    when it is not set."""
    server = os.environ.get(POSTGRES_ENV, "")
    if not server:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    with database_on(server, prefix) as url:
        yield url
