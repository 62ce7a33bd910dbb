"""Renderings of a report for viewers without SR: Secondary Capture and Encapsulated PDF."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from support.synth import image

from plugin.drafting import render, sr


def _draft() -> object:
    a = image(view_position="PA")
    return sr.build_draft_sr([a], sr.DraftContent(findings="Lungs are clear.", impression="Normal chest.",
                                                  indication="cough", model_name="m", model_version="1"))


@pytest.mark.parametrize(("kind", "iod"), [("sc", "SCImage"), ("pdf", "EncapsulatedPDF")])
def test_rendering_is_valid_and_says_draft(tmp_path: Path, kind: str, iod: str) -> None:
    draft = _draft()
    out = render.render(draft, kind)  # type: ignore[arg-type]
    path = tmp_path / f"{kind}.dcm"
    out.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert back.StudyInstanceUID == draft.StudyInstanceUID  # type: ignore[attr-defined]
    assert back.PatientID == draft.PatientID  # type: ignore[attr-defined]
    assert back.SOPInstanceUID == render.render(draft, kind).SOPInstanceUID  # type: ignore[arg-type]
    if kind == "pdf":
        assert bytes(back.EncapsulatedDocument).startswith(b"%PDF")
        assert "unverified" in back.DocumentTitle
    else:
        assert back.pixel_array.max() == 255 and back.BurnedInAnnotation == "YES"
    assert any("UNVERIFIED" in line for line in render.report_lines(draft))  # type: ignore[arg-type]
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    assert iod in text and not [ln for ln in text.splitlines() if ln.startswith("Error")], text


def test_unknown_kind() -> None:
    with pytest.raises(render.RenderError):
        render.render(_draft(), "png")  # type: ignore[arg-type]
