"""``cxrnode demo`` as a user runs it: a fresh process, the shipped sample and model, real DICOM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from support.sr_checks import check_sr_file

from plugin.drafting import samples, sr

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_demo_drafts_the_sample_study(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    env["PYTHONPATH"] = str(ROOT)
    bundle = os.environ.get("CXRNODE_TEST_BUNDLE", "") or "default"
    proc = subprocess.run(
        [sys.executable, "-m", "installer.cli", "demo", "--workdir", str(tmp_path / "demo"), "--json",
         "--bundle", bundle],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "sent 2/2" in proc.stderr and "job done" in proc.stderr  # progress on stderr
    sr_path = Path(result["sr_path"])
    assert sr_path.is_file() and sr_path.is_relative_to(tmp_path / "demo")
    check_sr_file(sr_path)
    rep = sr.read_report(dcmread(sr_path))
    assert rep.indication == samples.reference_report()["indication"] == result["indication"]
    assert rep.findings == result["findings"] and rep.impression == result["impression"]
    assert {v["sop_instance_uid"] for v in result["views"]} == {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in samples.sample_files()}
    assert rep.verification_flag == "UNVERIFIED"


def test_demo_text_output_names_the_sr_and_says_draft(tmp_path: Path) -> None:
    from installer.cli import main

    bundle = os.environ.get("CXRNODE_TEST_BUNDLE", "") or "default"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--workdir", str(tmp_path / "d"), "--quiet", "--bundle", bundle])
    text = out.getvalue()
    assert code == 0, text
    assert "AI-GENERATED DRAFT - UNVERIFIED" in text and "draft SR   : " in text
    path = Path(text.split("draft SR   : ")[1].splitlines()[0].strip())
    assert path.is_file()


def test_demo_with_a_missing_bundle_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from installer.cli import main

    code = main(["demo", "--workdir", str(tmp_path / "d"), "--quiet", "--bundle", str(tmp_path / "nope")])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot load the model bundle" in err and "nope" in err


def test_demo_on_a_real_film_shows_the_withheld_draft(tmp_path: Path) -> None:
    import contextlib
    import io

    from support.gate_images import REAL_DICOM

    from installer.cli import main

    film = [p for p in REAL_DICOM if p.name.startswith("nih_")][0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", str(film), "--workdir", str(tmp_path / "d"), "--quiet"])
    text = out.getvalue()
    assert code == 0, text
    assert "AI DRAFT WITHHELD - NOT DRAFTED" in text and "AI-GENERATED DRAFT" not in text
    assert "WITHHELD   : no view can be read by the model: unlike the images the model was trained on" in text
    assert "FINDINGS" not in text
    path = Path(text.split("draft SR   : ")[1].splitlines()[0].strip())
    check_sr_file(path)
    assert sr.read_report(dcmread(path)).findings == ""


def test_demo_refuses_files_of_two_studies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from support.gate_images import REAL_DICOM

    from installer.cli import main

    code = main(["demo", *map(str, REAL_DICOM[:2]), "--workdir", str(tmp_path / "d"), "--quiet"])
    assert code == 2 and "belong to 2 studies" in capsys.readouterr().err
    (tmp_path / "x.dcm").write_text("not dicom")
    code = main(["demo", str(tmp_path / "x.dcm"), "--workdir", str(tmp_path / "d"), "--quiet"])
    assert code == 2 and "not a readable DICOM file" in capsys.readouterr().err
