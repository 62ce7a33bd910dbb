"""``cxrnode review`` (the reviewer window) and ``cxrnode worklist`` (the same list, as text).

Only ``review`` needs a screen; PyQt6 is imported inside its function, so this module (and
``cxrnode worklist``) works on a headless node.

The reviewer signs as the authenticated OS account running it, mapped through the config's
``[[reviewers]]`` (username -> display name and organisation). There is deliberately no option
to sign as someone else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dicom_node.config import load_config
from plugin.review.service import SORT_KEYS, WORKLIST_STATES, ReviewService, current_user


def _add_common(p: argparse.ArgumentParser) -> None:
    from dicom_node.cli import CONFIG_HELP, SET_HELP

    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    p.add_argument("--claim-timeout", type=float, default=None, metavar="SECONDS",
                   help="a claim on a draft expires after this many seconds without activity, like the config "
                   "key (default: [review] claim_timeout_s, 900)")


def add_subcommands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "review",
        help="open the reviewer window (needs a screen)",
        description="Open the reviewer: worklist, the views of the study, the indication and the "
        "editable AI draft; sign (Ctrl+Enter) or reject. You sign as your OS account, mapped "
        "through [[reviewers]] in the config.",
    )
    _add_common(p)
    p.add_argument("--study-uid", metavar="UID", default="",
                   help="open this study's draft directly (context launch from a PACS viewer)")
    p.add_argument("--refresh", type=float, default=None, metavar="S",
                   help="refresh the worklist every S seconds (default: [review] refresh_s, 15; 0 = only on demand)")
    p.set_defaults(func=run_review)

    w = subparsers.add_parser(
        "worklist",
        help="print the drafts waiting for review (no screen needed)",
        description="Print the reviewer's worklist: drafts with their state and what the input gate let "
        "the model do (drafted, drafted without some views, not drafted: <reason>), oldest first.",
    )
    _add_common(w)
    w.add_argument("--state", action="append", choices=WORKLIST_STATES,
                   help="only these states (repeatable; default: new, in_review, failed)")
    w.add_argument("--all", action="store_true", help="every state")
    w.add_argument("--search", default="", help="match patient name, patient ID, accession or study UID")
    w.add_argument("--sort", choices=SORT_KEYS, default="age",
                   help="age (default: oldest first) or priority (STAT, ED, inpatient, outpatient, not stated; "
                   "critical drafts first within each, then the oldest), or a column")
    w.add_argument("--json", action="store_true", help="print JSON")
    w.set_defaults(func=run_worklist)

    from gui import templates_cli  # `cxrnode templates` (no Qt)

    templates_cli.add_subcommands(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrnode", description="cxrnode reviewer commands")
    add_subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def _service(args: argparse.Namespace) -> ReviewService:
    from plugin.review.connect import open_service

    config = load_config(args.config, overrides=args.overrides)
    return open_service(config, max(1.0, args.claim_timeout) if args.claim_timeout else None)


def _order(args: argparse.Namespace) -> dict[str, Any]:
    """``--sort``: age descending (oldest first); priority ascending (most urgent first)."""
    sort = getattr(args, "sort", "age")
    return {"sort": sort, "descending": sort == "age"}


def run_worklist(args: argparse.Namespace) -> int:
    from dicom_node.startup import StartupError
    from gui import viewmodels

    try:
        svc = _service(args)
    except StartupError as exc:  # the schema is not this version's (or unreachable): one line, as serve says it
        print(exc.line("worklist"), file=sys.stderr)
        return exc.code
    if args.all:
        rows = svc.worklist(states=None, search=args.search, **_order(args))
    elif args.state:
        rows = svc.worklist(states=args.state, search=args.search, **_order(args))
    else:
        rows = svc.worklist(search=args.search, **_order(args))
    if args.json:
        print(json.dumps([
            {
                "draft_id": r.draft_id, "study_instance_uid": r.study_instance_uid, "patient_name": r.patient_name,
                "patient_id": r.patient_id, "study_date": r.study_date, "accession_number": r.accession_number,
                "views": list(r.views), "age_s": round(r.age_s, 1), "state": r.state, "claimed_by": r.claimed_by,
                "model": f"{r.model_name} {r.model_version}".strip(), "detail": r.detail,
                "input_check": r.input_outcome or None, "input_reason": r.input_reason,
                "views_not_used": list(r.views_not_used), "ai_draft": viewmodels.draft_status(r, full=True),
                "priority": r.priority or None, "critical": list(r.critical),
            }
            for r in rows
        ], indent=2))
        return 0
    if not rows:
        print("No drafts.")
        return 0
    titles = [c.title for c in viewmodels.COLUMNS]
    table = [titles] + [[viewmodels.cell_text(r, i) for i in range(len(titles))] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(titles))]
    for k, row in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 0


# libraries Qt's xcb platform plugin needs that desktops often lack: soname -> (Debian, RHEL package)
XCB_PACKAGES = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
}


def missing_libraries(library: Path) -> list[str]:
    """Shared libraries ``library`` needs that the dynamic loader cannot find (``ldd``)."""
    ldd = shutil.which("ldd")
    if not ldd or not library.is_file():
        return []
    out = subprocess.run([ldd, str(library)], capture_output=True, text=True, timeout=30).stdout
    return sorted({ln.split("=>")[0].strip() for ln in out.splitlines() if "not found" in ln})


def display_problem(env: Any = None, plugin: Path | None = None) -> str | None:
    """Why Qt could not open a window here, checked without importing Qt (PyQt6 installed, a
    display named, the xcb plugin's libraries present).

    Parameters
    ----------
    env:
        The environment to read (``None``: :data:`os.environ`).
    plugin:
        The xcb platform plugin to check (``None``: PyQt6's own).

    Returns
    -------
    str or None
        One sentence saying what is missing and how to install it; ``None``: it should work.
    """
    env = os.environ if env is None else env
    spec = importlib.util.find_spec("PyQt6")
    if spec is None or not spec.submodule_search_locations:
        return ("PyQt6 is not installed (a headless installation): install the reviewer with "
                "pip install 'cxrnode[reviewer]', or a bundle built without --headless")
    platform = env.get("QT_QPA_PLATFORM", "").split(":")[0]
    if platform not in ("", "xcb", "wayland"):
        return None  # offscreen, minimal, vnc...: no display needed
    if not platform:
        platform = "xcb" if env.get("DISPLAY") else "wayland" if env.get("WAYLAND_DISPLAY") else ""
    if not platform:
        return ("no display: neither DISPLAY nor WAYLAND_DISPLAY is set; run `cxrnode review` in the "
                "reviewer's desktop session (or over ssh -X)")
    needs = {"xcb": "DISPLAY", "wayland": "WAYLAND_DISPLAY"}[platform]
    if not env.get(needs):
        return f"QT_QPA_PLATFORM={platform} but {needs} is not set"
    if platform == "wayland":
        return None
    if plugin is None:
        plugin = Path(list(spec.submodule_search_locations)[0]) / "Qt6" / "plugins" / "platforms" / "libqxcb.so"
    missing = missing_libraries(plugin)
    if not missing:
        return None
    deb = [XCB_PACKAGES[m][0] for m in missing if m in XCB_PACKAGES]
    rhel = [XCB_PACKAGES[m][1] for m in missing if m in XCB_PACKAGES]
    return (f"Qt's xcb platform plugin cannot load: missing {', '.join(missing)}"
            + (f"; install them: Debian/Ubuntu: apt install {' '.join(deb)}; RHEL/Fedora: dnf install "
               f"{' '.join(rhel)}" if deb else ""))


def run_review(args: argparse.Namespace) -> int:
    """Open the reviewer window (imports PyQt6 here, not at module import), after checking that
    Qt can open a window: exit 2 with one line saying what is missing otherwise."""
    problem = display_problem()
    if problem:
        print(f"cxrnode review: {problem}", file=sys.stderr)
        return 2
    from dicom_node.startup import StartupError

    try:
        svc = _service(args)
    except StartupError as exc:
        print(exc.line("review"), file=sys.stderr)
        return exc.code
    user = current_user()
    from gui.app import run

    refresh = args.refresh if args.refresh is not None else svc.config.review.refresh_s
    return run(svc, user, study_uid=args.study_uid, refresh_interval_s=refresh)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
