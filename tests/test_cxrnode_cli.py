"""The ``cxrnode`` command: every subcommand helps without a screen."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from installer.cli import build_parser, main

SUBCOMMANDS = ["serve", "status", "train", "export", "eval", "demo", "review", "worklist",
               "bundle", "install", "upgrade", "uninstall", "doctor"]


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # noqa: SLF001
    assert set(SUBCOMMANDS) <= set(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_works_without_a_screen(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"}}
    out = subprocess.run([sys.executable, "-m", "installer", name, "--help"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"usage: cxrnode {name}" in out.stdout


def test_building_the_command_line_does_not_load_qt() -> None:
    code = "import sys; from installer.cli import build_parser; build_parser(); print('PyQt6' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_config_error_is_reported_with_the_key(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nport = 'x'\n")
    assert main(["status", "--config", str(cfg)]) == 2
    assert "node.port" in capsys.readouterr().err
