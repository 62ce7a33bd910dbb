"""The critical-result flag and an addendum in the real window under Xvfb:
``docs/reviewer-critical.png`` and ``docs/reviewer-addendum.png`` (the scene is
``screenshot_app.py --after-signing``). Run with ``-k critical`` or ``-k addendum``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_screenshot import xvfb_display  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


@pytest.mark.slow
def test_critical_and_addendum_screenshots_of_the_real_window(xvfb_display: str, tmp_path: Path) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k not in ("QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env.update(DISPLAY=xvfb_display, QT_QPA_PLATFORM="xcb", PYTHONPATH=str(REPO))
    critical, addendum = tmp_path / "reviewer-critical.png", tmp_path / "reviewer-addendum.png"
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("screenshot_app.py")), "--after-signing",
                          str(tmp_path), str(critical), str(addendum)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    from PIL import Image

    for path in (critical, addendum):
        with Image.open(path) as im:
            assert im.size == (1600, 900)
            colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 500  # radiographs, text, banners
    with Image.open(critical) as im:  # the critical-result box's red border is on screen
        assert any(c == (0xff, 0x81, 0x82) for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    with Image.open(addendum) as im:  # the signed banner's green
        assert any(c == (0xda, 0xfb, 0xe1) for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(critical, DOCS / "reviewer-critical.png")
    shutil.copyfile(addendum, DOCS / "reviewer-addendum.png")
