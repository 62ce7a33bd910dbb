"""Checks every SR the project writes must pass: dciodvfy (zero errors), dsrdump, highdicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def check_sr_file(path: Path) -> hd.sr.ComprehensiveSR:
    """dciodvfy: no line starting with 'Error'; dsrdump: exit 0 and a document tree; highdicom read."""
    for tool in ("dciodvfy", "dsrdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (dicom3tools / dcmtk)")
    v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = v.stdout + v.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy errors for {path}:\n{out}"
    assert "ComprehensiveSR" in out, out
    d = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stderr
    assert "Diagnostic Imaging Report" in d.stdout, d.stdout
    ds = dcmread(path)
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    return sr
