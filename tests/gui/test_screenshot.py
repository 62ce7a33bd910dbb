"""The real window under Xvfb (started here): screenshots of a drafted study and of a withheld one
(real radiographs the input gate rejects), written to ``docs/reviewer.png`` and
``docs/reviewer-withheld.png``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "reviewer.png"
OUT_WITHHELD = REPO / "docs" / "reviewer-withheld.png"
SAMPLES = REPO.parent / "shared" / "data" / "dicom_samples"


@pytest.fixture
def xvfb_display() -> Iterator[str]:
    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.skip("Xvfb is not installed")
    for n in range(97, 140):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            break
    else:  # pragma: no cover
        pytest.skip("no free X display number")
    proc = subprocess.Popen([binary, f":{n}", "-screen", "0", "1600x900x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if Path(f"/tmp/.X11-unix/X{n}").exists():
                break
            if proc.poll() is not None:
                pytest.skip(f"Xvfb exited with {proc.returncode}")
            time.sleep(0.1)
        else:
            pytest.skip("Xvfb did not start")
        yield f":{n}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


@pytest.mark.slow
def test_screenshot_of_the_real_window(xvfb_display: str, tmp_path: Path) -> None:
    if not (SAMPLES / "siim_chestxray14_pa_jpeg_baseline.dcm").exists():
        pytest.skip("the real radiographs of shared/data/dicom_samples are needed for the withheld study")
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    shot, withheld = tmp_path / "reviewer.png", tmp_path / "reviewer-withheld.png"
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("screenshot_app.py")), str(tmp_path), str(shot),
                          str(withheld)], env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image

    for path in (shot, withheld):
        with Image.open(path) as im:
            assert im.size == (1600, 900)
            gray = im.convert("L")
            lo, hi = gray.getextrema()
            assert hi - lo > 200  # not a blank screen: black image area and white editor are both there
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 500  # radiographs, text, banners
    with Image.open(withheld) as im:  # the withheld banner's purple border is on screen
        rgb = im.convert("RGB")
        assert any(c == (130, 80, 223) for _, c in rgb.getcolors(maxcolors=1 << 20) or [])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, OUT)
    shutil.copyfile(withheld, OUT_WITHHELD)
