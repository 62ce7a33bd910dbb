"""``cxrnode doctor`` reports the decoding speed of the installed bundle (tokens/s of a greedy
dry-run generation on the shipped sample study), in its line and in ``--json``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from installer_helpers import REPO, free_port

from dicom_node.config import load_config
from dicom_node.db import migrate
from installer.doctor import OK, run_checks


def _config(tmp_path: Path) -> Path:
    storage = tmp_path / "data"
    storage.mkdir()
    cfg = tmp_path / "cxrnode.toml"
    cfg.write_text(f'[node]\nstorage_dir = "{storage}"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    migrate(load_config(cfg, env={}).node.resolved_database_url())
    return cfg


def test_inference_row_reports_tokens_per_s(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    [row] = [c for c in run_checks(str(cfg), ["model.beam_size=1", "model.max_report_tokens=16"])
             if c.name == "inference"]
    assert row.status == OK, row
    assert 1 <= row.data["greedy_tokens"] <= 16
    assert row.data["tokens_per_s"] > 0 and "tokens/s" in row.detail
    proc = subprocess.run([sys.executable, "-m", "installer", "doctor", "--config", str(cfg), "--json",
                           "--set", "model.max_report_tokens=8"], capture_output=True, text=True, cwd=REPO)
    inference = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}["inference"]
    assert inference["status"] == OK and inference["data"]["tokens_per_s"] > 0, inference
