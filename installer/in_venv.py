"""What the installer runs with an installed version's own interpreter:
``python -I -m installer.in_venv COMMAND ...`` (see :mod:`installer.venv`).

- ``migrate CONFIG REVISION``: upgrade the database to REVISION (``head``: the newest), print
  ``{"revision": ..., "head": ...}`` as JSON;
- ``downgrade CONFIG REVISION``: downgrade the database to REVISION;
- ``head``: print the newest revision this version knows;
- ``render-unit BIN CONFIG USER FLAVOUR``: print this version's systemd unit.

Configuration is read from CONFIG alone (no ``CXRNODE_*`` environment), so the installer migrates
the database the installed configuration names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _migrate(args: argparse.Namespace) -> None:
    from dicom_node.config import load_config
    from dicom_node.db import current_revision, migrate

    url = load_config(args.config, env={}).node.resolved_database_url()
    migrate(url, args.revision)
    print(json.dumps(dict(zip(("revision", "head"), current_revision(url), strict=True))))


def _downgrade(args: argparse.Namespace) -> None:
    from alembic import command

    from dicom_node.config import load_config
    from dicom_node.db import alembic_config

    command.downgrade(alembic_config(load_config(args.config, env={}).node.resolved_database_url()), args.revision)


def _head(args: argparse.Namespace) -> None:
    from dicom_node.db import head_revision

    print(head_revision())


def _render_unit(args: argparse.Namespace) -> None:
    from dicom_node.config import load_config
    from installer.unit import render_unit

    c = load_config(args.config, env={})
    sys.stdout.write(render_unit(Path(args.bin), Path(args.config), Path(c.node.storage_dir), args.user, c.node.port,
                                 args.flavour))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -I -m installer.in_venv",
                                     description="Commands the installer runs with an installed cxrnode's interpreter.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="upgrade the database schema")
    p.add_argument("config")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=_migrate)
    p = sub.add_parser("downgrade", help="downgrade the database schema")
    p.add_argument("config")
    p.add_argument("revision")
    p.set_defaults(func=_downgrade)
    sub.add_parser("head", help="the newest schema revision of this version").set_defaults(func=_head)
    p = sub.add_parser("render-unit", help="this version's systemd unit")
    for name in ("bin", "config", "user"):
        p.add_argument(name)
    p.add_argument("flavour", nargs="?", default="cpu")
    p.set_defaults(func=_render_unit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
