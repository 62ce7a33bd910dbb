"""A real node environment for pipeline tests: config, SQLite index (Alembic), Store, job queue.

Instances go in through the node's Store and ``index.register_instance`` exactly as the SCP
stores them; jobs run through ``dicom_node.jobs`` (promote, claim, run_job), no network.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from dicom_node import index, jobs
from dicom_node.config import Config, load_config
from dicom_node.db import Job, make_engine, migrate, session_factory
from dicom_node.store import Store


def bundle_for_tests() -> str:
    """The model bundle tests use: ``CXRNODE_TEST_BUNDLE`` (a folder) or the shipped ``default``."""
    return os.environ.get("CXRNODE_TEST_BUNDLE", "") or "default"


@dataclass
class NodeEnv:
    config: Config
    sessions: sessionmaker
    store: Store

    def store_instances(self, datasets: list[Dataset], calling_ae: str = "TESTSCU") -> None:
        for ds in datasets:
            relpath = self.store.instance_relpath(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                                  str(ds.SOPInstanceUID))
            size, sha = self.store.write_dataset(ds, relpath)
            with self.sessions() as s, s.begin():
                index.register_instance(s, ds, relpath, size, sha, calling_ae)

    def run_jobs(self, handler: Any) -> list[Job]:
        """Promote every quiet study, run all claimable jobs; return the jobs run (fresh rows)."""
        future = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1)
        jobs.promote_quiet_studies(self.sessions, self.config, now=future)
        ran: list[int] = []
        while (claimed := jobs.claim_job(self.sessions, self.config, "test-worker", now=future)) is not None:
            jobs.run_job(claimed, handler, self.config, self.sessions, self.store)
            ran.append(claimed.job_id)
        with self.sessions() as s:
            rows = list(s.scalars(select(Job).where(Job.id.in_(ran)).order_by(Job.id)))
            for r in rows:
                s.expunge(r)
            return rows


def make_env(root: Path, destinations: list[dict[str, Any]] | None = None, extra: str = "") -> NodeEnv:
    root.mkdir(parents=True, exist_ok=True)
    toml = [
        "[node]",
        f"storage_dir = {json.dumps(str(root / 'store'))}",
        "fsync = false",
        "min_free_space_mb = 0",
        "[study]",
        "quiet_period_s = 0.0",
        "[jobs]",
        "max_attempts = 1",
        "backoff_s = 0.0",
        "[model]",
        "beam_size = 1",
        f"bundle = {json.dumps(bundle_for_tests())}",
    ]
    for d in destinations or []:
        toml.append("[[destinations]]")
        toml += [f"{k} = {json.dumps(v)}" for k, v in d.items()]
    toml.append(extra)
    path = root / "cxrnode.toml"
    path.write_text("\n".join(toml) + "\n")
    config = load_config(path, env={})
    url = config.node.resolved_database_url()
    migrate(url)
    sessions = session_factory(make_engine(url))
    store = Store(config.node.storage_dir, fsync=False)
    return NodeEnv(config, sessions, store)
