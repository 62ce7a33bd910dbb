"""``cxrnode review`` / ``cxrnode worklist``: parsing, headless use, the signer is the OS account."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import synthetic

from gui import cli
from installer.cli import build_parser as cxrnode_parser

REPO = Path(__file__).resolve().parents[2]


def test_subcommands_are_in_cxrnode() -> None:
    args = cxrnode_parser().parse_args(["review", "--config", "x.toml", "--study-uid", "1.2.3", "--claim-timeout", "5"])
    assert args.func is cli.run_review and args.study_uid == "1.2.3" and args.claim_timeout == 5.0
    args = cxrnode_parser().parse_args(["worklist", "--config", "x.toml", "--json", "--state", "signed"])
    assert args.func is cli.run_worklist and args.state == ["signed"]
    with pytest.raises(SystemExit):  # there is no way to sign as someone else
        cxrnode_parser().parse_args(["review", "--config", "x.toml", "--user", "bob"])


def test_worklist_runs_without_a_screen_or_qt(node: synthetic.NodeFixture) -> None:
    code = (
        "import sys, gui.cli as c\n"
        "rc = c.main(['worklist', '--config', sys.argv[1], '--json'])\n"
        "assert 'PyQt6' not in sys.modules, 'worklist imported Qt'\n"
        "sys.exit(rc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "QT_QPA_PLATFORM", "WAYLAND_DISPLAY")}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", code, str(node.root / "cxrnode.toml")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["patient_id"] for r in rows] == ["CXR-10001", "CXR-10002", "CXR-10003"]
    assert all(r["state"] == "new" and r["views"] for r in rows)
    assert all(r["input_check"] == "passed" and r["ai_draft"] == "drafted" for r in rows)  # the pipeline's gate


def test_worklist_says_not_drafted(node: synthetic.NodeFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from plugin.review.service import ReviewService

    rows = ReviewService(node.config, node.sessions, node.store).worklist()
    synthetic.set_input_check(node, rows[1].draft_id or 0, "withheld", "every view is unlike the training images",
                              failed={"PA": ["blank image"], "LL": ["blank image"]})
    cfg = str(node.root / "cxrnode.toml")
    assert cli.main(["worklist", "--config", cfg, "--search", "lindq"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-2:] == ["AI", "draft"] and out[2].endswith("not drafted: every view is unlike the training images")
    assert cli.main(["worklist", "--config", cfg, "--json", "--search", "lindq"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["input_check"], row["views_not_used"]) == ("withheld", ["PA", "LL"])


def test_worklist_table_text(node: synthetic.NodeFixture, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worklist", "--config", str(node.root / "cxrnode.toml"), "--search", "nakamura"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["Priority", "Patient", "Patient"] and "NAKAMURA, Yui" in out[2]
    assert len(out) == 3
    assert cli.main(["worklist", "--config", str(node.root / "cxrnode.toml"), "--state", "signed"]) == 0
    assert capsys.readouterr().out.strip() == "No drafts."


def test_review_signs_as_the_os_account(node: synthetic.NodeFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import gui.app

    seen: dict[str, object] = {}

    def fake_run(service: object, user: str, study_uid: str = "", refresh_interval_s: float = 15.0) -> int:
        seen.update(service=service, user=user, study_uid=study_uid, refresh=refresh_interval_s)
        return 0

    monkeypatch.setattr(gui.app, "run", fake_run)
    monkeypatch.setattr(cli, "current_user", lambda: "alice")
    args = argparse.Namespace(config=str(node.root / "cxrnode.toml"), overrides=[], claim_timeout=120.0,
                              study_uid="1.2.3", refresh=5.0)
    assert cli.run_review(args) == 0
    assert seen["user"] == "alice" and seen["study_uid"] == "1.2.3" and seen["refresh"] == 5.0
    assert seen["service"].claim_timeout_s == 120.0  # type: ignore[attr-defined]


def test_worklist_state_filters(node: synthetic.NodeFixture, capsys: pytest.CaptureFixture[str]) -> None:
    from plugin.review.service import ReviewService

    svc = ReviewService(node.config, node.sessions, node.store)
    first = svc.worklist()[0]
    d = svc.detail(first.draft_id or 0)
    svc.sign(d.draft_id, "alice", d.findings, d.impression or "Normal.")
    cfg = str(node.root / "cxrnode.toml")
    for extra, expected in ((["--all"], 3), (["--state", "signed"], 1), ([], 2), (["--state", "new", "--state", "signed"], 3)):
        assert cli.main(["worklist", "--config", cfg, "--json", *extra]) == 0
        assert len(json.loads(capsys.readouterr().out)) == expected, extra
