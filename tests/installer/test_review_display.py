"""``cxrnode review`` without a display or without Qt's xcb libraries: one line saying what is
missing (DISPLAY / WAYLAND_DISPLAY, the libraries by name, Debian and RHEL packages), exit 2,
before Qt is imported (issue 14)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from installer_helpers import REPO

from gui import cli as gui_cli
from gui.cli import display_problem

NO_SCREEN = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")


def test_review_without_a_display_says_so_and_exits_2_before_importing_qt(tmp_path: Path) -> None:
    code = ("import sys, gui.cli as c\n"
            "rc = c.main(['review', '--config', sys.argv[1]])\n"
            "assert 'PyQt6' not in sys.modules, 'review imported Qt before checking the display'\n"
            "sys.exit(rc)\n")
    cfg = tmp_path / "cxrnode.toml"
    cfg.write_text(f'[node]\nstorage_dir = "{tmp_path / "store"}"\n')
    env = {k: v for k, v in os.environ.items() if k not in NO_SCREEN}
    res = subprocess.run([sys.executable, "-c", code, str(cfg)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == ("cxrnode review: no display: neither DISPLAY nor WAYLAND_DISPLAY is set; run "
                                  "`cxrnode review` in the reviewer's desktop session (or over ssh -X)")


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to build a library with a missing dependency")
def test_libraries_the_loader_cannot_find_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real ELF stand-in for the plugin that needs two libraries which are gone (names no system has)."""
    src = tmp_path / "stub.c"
    src.write_text("int stub(void) { return 0; }\n")
    gone = ("libcxrnode-gone-a.so.0", "libcxrnode-gone-b.so.1")
    for soname in gone:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / soname), f"-Wl,-soname,{soname}", str(src)],
                       check=True)
    plugin = tmp_path / "libqxcb.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(plugin), str(src), "-Wl,--no-as-needed",
                    *(str(tmp_path / s) for s in gone)], check=True)
    for soname in gone:
        (tmp_path / soname).unlink()
    assert display_problem({"DISPLAY": ":0"}, plugin=plugin) == (
        "Qt's xcb platform plugin cannot load: missing libcxrnode-gone-a.so.0, libcxrnode-gone-b.so.1")
    # the xcb libraries desktops lack are named with their Debian and RHEL packages
    monkeypatch.setattr(gui_cli, "missing_libraries", lambda _p: ["libxcb-cursor.so.0", "libxkbcommon-x11.so.0"])
    assert display_problem({"DISPLAY": ":0"}, plugin=plugin) == (
        "Qt's xcb platform plugin cannot load: missing libxcb-cursor.so.0, libxkbcommon-x11.so.0; "
        "install them: Debian/Ubuntu: apt install libxcb-cursor0 libxkbcommon-x11-0; "
        "RHEL/Fedora: dnf install xcb-util-cursor libxkbcommon-x11")


def test_platforms_that_need_no_display_and_the_installed_plugin() -> None:
    assert display_problem({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert display_problem({"QT_QPA_PLATFORM": "xcb"}) == "QT_QPA_PLATFORM=xcb but DISPLAY is not set"
    assert display_problem({"WAYLAND_DISPLAY": "wayland-0"}) is None
    assert display_problem({"DISPLAY": ":0"}) is None  # this machine has every xcb library (the GUI tests use it)


def test_a_headless_installation_says_pyqt6_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PyQt6" else real(name, *a))
    problem = display_problem({"QT_QPA_PLATFORM": "offscreen"})
    assert problem is not None and problem.startswith("PyQt6 is not installed (a headless installation)")
    assert "cxrnode[reviewer]" in problem
