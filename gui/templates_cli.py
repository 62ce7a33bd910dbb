"""``cxrnode templates``: list, show, add, remove, import and export the site's report templates
(no screen needed; nothing here imports Qt).

Reading needs no role. Changing needs the ``templates`` role on the account's ``[[reviewers]]``
entry of the installed configuration (``roles = ["templates"]``), or root; the account is the
effective OS account running the command (:func:`plugin.review.service.current_user`), never a
name given on the command line. Every change is audited.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dicom_node.config import load_config
from plugin.review.service import current_user
from plugin.review.templates import (
    DEFAULT_FILE,
    ROLE,
    Template,
    TemplateError,
    TemplateLibrary,
    dump_templates,
    read_file,
)


def add_subcommands(subparsers: Any) -> None:
    from dicom_node.cli import CONFIG_HELP, SET_HELP

    p = subparsers.add_parser(
        "templates",
        help="the reviewers' report templates (macros): list, add, remove, import, export",
        description="Report templates are text snippets the reviewer inserts by typing .trigger then Tab or "
        "Space, by Ctrl+1..9 (a template's slot), or from the Ctrl+T picker. They are kept in the node's "
        f"database. Changing them needs roles = [\"{ROLE}\"] in your [[reviewers]] entry of the installed "
        "configuration (or root); every change is audited.",
        epilog=f"The shipped chest radiograph set: cxrnode templates import --default ({DEFAULT_FILE.name}). "
        "In the reviewer, a reviewer with the role also saves selected text as a template with Ctrl+Shift+T.",
    )
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP)
    sub = p.add_subparsers(dest="templates_command", metavar="ACTION")

    ls = sub.add_parser("list", help="list the templates (slot, trigger, name)")
    ls.add_argument("--json", action="store_true", help="print JSON, texts included")
    ls.set_defaults(func=run_list)

    show = sub.add_parser("show", help="print one template's text")
    show.add_argument("trigger", help="its trigger word (with or without the leading dot)")
    show.set_defaults(func=run_show)

    add = sub.add_parser("add", help="add a template (or change one with --update)")
    add.add_argument("trigger", help="typed as .TRIGGER in the report (a-z 0-9 _ -, 1-32 characters)")
    add.add_argument("--name", required=True, help="what the Ctrl+T picker shows")
    text = add.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text inserted")
    text.add_argument("--text-file", metavar="FILE", help="read the text from FILE ('-': standard input)")
    add.add_argument("--slot", type=int, choices=range(1, 10), metavar="1-9", help="also insert it with Ctrl+SLOT")
    add.add_argument("--update", action="store_true", help="change the template if the trigger exists")
    add.set_defaults(func=run_add)

    rm = sub.add_parser("remove", help="remove a template")
    rm.add_argument("trigger")
    rm.set_defaults(func=run_remove)

    imp = sub.add_parser("import", help="add the templates of a TOML file (all or nothing)")
    src = imp.add_mutually_exclusive_group(required=True)
    src.add_argument("file", nargs="?", help="a template file ([[templates]] trigger, name, text, slot)")
    src.add_argument("--default", action="store_true", help=f"the shipped chest radiograph set ({DEFAULT_FILE.name})")
    imp.add_argument("--update", action="store_true",
                     help="change templates whose trigger exists with other content (else refused)")
    imp.set_defaults(func=run_import)

    exp = sub.add_parser("export", help="write the templates as a TOML file that import reads back")
    exp.add_argument("file", nargs="?", help="where to write (default: standard output)")
    exp.set_defaults(func=run_export)

    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _library(args: argparse.Namespace) -> TemplateLibrary:
    from dicom_node.startup import StartupError
    from plugin.review.connect import open_sessions

    config = load_config(args.config, overrides=args.overrides)
    try:
        sessions = open_sessions(config)  # as serve: SQLite migrated under the lock; PostgreSQL only by `cxrnode migrate`
    except StartupError as exc:
        print(exc.line("templates"), file=sys.stderr)
        raise SystemExit(exc.code) from exc
    return TemplateLibrary(config, sessions)


def _fail(exc: Exception) -> int:
    print(f"cxrnode templates: {exc}", file=sys.stderr)
    return 1


def run_list(args: argparse.Namespace) -> int:
    templates = _library(args).templates()
    if args.json:
        print(json.dumps([{**t.as_json(), "updated_by": t.updated_by,
                           "updated_at": t.updated_at.isoformat() if t.updated_at else None} for t in templates],
                         indent=2, ensure_ascii=False))
        return 0
    if not templates:
        print("No templates. Import the shipped chest set with: cxrnode templates import --default")
        return 0
    width = max(len(t.trigger) for t in templates) + 1
    for t in templates:
        key = f"Ctrl+{t.slot}" if t.slot else ""
        print(f"{key:7} .{t.trigger:{width}} {t.name}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    trigger = args.trigger.strip().lower().removeprefix(".")
    t = _library(args).by_trigger().get(trigger)
    if t is None:
        return _fail(TemplateError(f"no template .{trigger}"))
    print(t.text)
    return 0


def run_add(args: argparse.Namespace) -> int:
    if args.text_file:
        try:
            text = sys.stdin.read() if args.text_file == "-" else Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(TemplateError(f"--text-file {args.text_file}: cannot read it: {exc}"))
    else:
        text = args.text
    try:
        t = _library(args).add(current_user(), Template(args.trigger, args.name, text, args.slot),
                               update_existing=args.update)
    except TemplateError as exc:
        return _fail(exc)
    print(f"template .{t.trigger} saved" + (f" (Ctrl+{t.slot})" if t.slot else ""))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    try:
        t = _library(args).remove(current_user(), args.trigger)
    except TemplateError as exc:
        return _fail(exc)
    print(f"template .{t.trigger} removed")
    return 0


def run_import(args: argparse.Namespace) -> int:
    try:
        templates = read_file(DEFAULT_FILE if args.default else args.file)
        result = _library(args).import_templates(current_user(), templates, update_existing=args.update)
    except TemplateError as exc:
        return _fail(exc)
    print(f"{len(result.added)} added, {len(result.changed)} changed, {len(result.unchanged)} unchanged")
    return 0


def run_export(args: argparse.Namespace) -> int:
    text = dump_templates(_library(args).templates())
    if args.file:
        Path(args.file).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
