"""``cxrnode serve`` as a site runs it, fed real films with DCMTK's storescu: every one is
withheld with a reason, and its SR passes dciodvfy (the input gate, issue 11)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from node_config import node_sections, write_config
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.gate_images import REAL_DICOM, REAL_PICTURES, real_films

from dicom_node.config import load_config
from dicom_node.db import Draft, Job, Study, make_engine, session_factory

pytestmark = pytest.mark.slow
STORESCU = "/usr/bin/storescu"  # DCMTK's (a venv's pynetdicom storescu may shadow it on PATH)


def _cr_file(pixels: np.ndarray, path: Path) -> Path:
    """A real photograph-format film as a 12-bit MONOCHROME1 CR file of a study of its own."""
    from support.synth import image  # tests/plugin/synth.py

    values = np.round((1.0 - pixels) * 4095).astype(np.int64)
    ds = image(values, bits=12, photometric="MONOCHROME1", study_uid=generate_uid())
    ds.save_as(path, enforce_file_format=True)
    return path


def test_serve_withholds_every_real_film(tmp_path: Path, free_port) -> None:  # type: ignore[no-untyped-def]
    if not Path(STORESCU).exists() or shutil.which("dciodvfy") is None:
        pytest.skip("needs DCMTK storescu and dicom3tools dciodvfy")
    port = free_port()
    sections = node_sections(tmp_path, node={"port": port}, study={"quiet_period_s": 0.5},
                             jobs={"workers": 1, "poll_interval_s": 0.1}, model={"beam_size": 1})
    config_file = write_config(tmp_path / "cxrnode.toml", sections)
    config = load_config(config_file, env={})
    films = real_films()
    files = list(REAL_DICOM) + [_cr_file(films[p.name], tmp_path / f"{p.stem}.dcm") for p in REAL_PICTURES]
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    assert len(studies) == 8  # the SIIM and RSNA samples are one NIH image (one study)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "installer", "serve", "--config", str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the listener
            r = subprocess.run(["echoscu", "-aec", "CXRNODE", "127.0.0.1", str(port)], capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for f in files:
            r = subprocess.run([STORESCU, "-xy", "-aec", "CXRNODE", "127.0.0.1", str(port), str(f)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (f, r.stdout, r.stderr)
        sessions = session_factory(make_engine(config.node.resolved_database_url()))
        deadline = time.monotonic() + 180
        while True:
            with sessions() as s:
                done = s.scalars(select(Job).where(Job.state.in_(("done", "failed", "skipped")))).all()
                if len(done) == len(studies):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        with sessions() as s:
            assert {j.state for j in done} == {"done"}, [(j.state, j.log) for j in done]
            rows = s.execute(select(Draft, Study.study_instance_uid).join(Study, Draft.study_id == Study.id)).all()
            assert len(rows) == len(studies)
            for d, _uid in rows:
                gate = json.loads(d.token_info)["input_check"]
                assert gate["outcome"] == "withheld", gate
                assert gate["reason"].startswith("no view can be read by the model: unlike the images")
                assert d.findings == "" and d.impression == ""
                path = Path(config.node.storage_dir) / d.path
                v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
                assert not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")], v.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
