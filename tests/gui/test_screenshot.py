"""The real window under Xvfb (started here), screenshot written to ``docs/reviewer.png``."""

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
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    shot = tmp_path / "reviewer.png"
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("screenshot_app.py")), str(tmp_path), str(shot)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1600, 900)
        gray = im.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 200  # not a blank screen: black image area and white editor are both there
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 500  # radiographs, text, banners
    OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, OUT)
