"""The prior comparison in the real window under Xvfb: ``docs/reviewer-prior.png`` (the scene is
``screenshot_app.py --prior``). Run with ``-k prior``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_screenshot import xvfb_display  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "reviewer-prior.png"


@pytest.mark.slow
def test_prior_screenshot_of_the_real_window(xvfb_display: str, tmp_path: Path) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    shot = tmp_path / "reviewer-prior.png"
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("screenshot_app.py")), "--prior", str(tmp_path),
                          str(shot)], env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1600, 900)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 500
        assert any(c == (0x3a, 0x2a, 0x00) for _, c in colours)  # the prior's dated READ-ONLY header
    OUT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, OUT)
