"""One truth in the help texts (issue 14): every command that reads the configuration says the
same about which file it uses; --claim-timeout is in seconds like [review] claim_timeout_s;
uninstall has a description."""

from __future__ import annotations

import argparse

from dicom_node.cli import CONFIG_HELP
from installer.cli import build_parser


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _help(p: argparse.ArgumentParser, option: str) -> str:
    return next(a.help for a in p._actions if option in a.option_strings) or ""


def test_every_config_reading_command_says_the_same() -> None:
    assert "else this installation's config" in CONFIG_HELP and "else built-in defaults" in CONFIG_HELP
    for name in ("serve", "status", "jobs", "review", "worklist", "doctor"):
        assert _help(_sub(name), "--config") == CONFIG_HELP, name


def test_claim_timeout_is_in_seconds_like_the_config_key() -> None:
    for name in ("review", "worklist"):
        h = _help(_sub(name), "--claim-timeout")
        assert "seconds" in h and "claim_timeout_s" in h and "minute" not in h


def test_uninstall_and_jobs_are_described() -> None:
    assert "--purge" in (_sub("uninstall").description or "")
    assert "retry" in (_sub("jobs").description or "")
    assert "exit status" in (_sub("serve").epilog or "")
