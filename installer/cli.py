"""The ``cxrnode`` command: one entry point, subcommands contributed by each package.

Each package's ``cli`` module has ``add_subcommands(subparsers)``; every subcommand sets
``func(args) -> int``. Only ``review`` needs a screen; its module imports PyQt6 lazily.
"""

from __future__ import annotations

import argparse
import sys

from dicom_node.config import ConfigError

EPILOG = """\
Typical use:
  cxrnode demo                       run the node on a sample study and print the draft
  cxrnode serve --config cxrnode.toml  run the node (Storage SCP + report drafting)
  cxrnode status --config cxrnode.toml --json
  cxrnode jobs --state failed        follow jobs; `jobs show ID`, `jobs retry ID|--failed`
  cxrnode doctor --config cxrnode.toml
  cxrnode review --config cxrnode.toml  open the reviewer (needs a screen)

Configuration: --config PATH, else CXRNODE_CONFIG, else the installation's config
(/etc/cxrnode/cxrnode.toml or PREFIX/etc/cxrnode/cxrnode.toml); CXRNODE_<SECTION>_<KEY> environment
variables and --set section.key=value override the file. See README.md.
Research use only: drafts are unverified until a radiologist signs them.
"""


# without --config or CXRNODE_CONFIG these find the installation's own config (see default_config)
USES_INSTALLED_CONFIG = {"serve", "status", "jobs", "review", "worklist", "doctor", "templates"}


def _contributors() -> list:
    mods = []
    for name in ("dicom_node.cli", "onnx_models.cli", "gui.cli", "installer.admin_cli", "installer.demo"):
        try:
            mods.append(__import__(name, fromlist=["add_subcommands"]))
        except ModuleNotFoundError as exc:  # a package not built yet; never hide real import errors
            if exc.name != name:
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The ``cxrnode`` parser: every package's ``add_subcommands`` composed (the CLI composition
    root), with ``--version``.

    Returns
    -------
    argparse.ArgumentParser
        The parser; each subcommand sets ``func(args) -> int``.
    """
    parser = argparse.ArgumentParser(
        prog="cxrnode",
        description="cxrnode: a DICOM node that drafts chest X-ray reports as DICOM SR for radiologist review.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("cxrnode")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ver = "unknown"
    parser.add_argument("--version", action="version", version=f"cxrnode {ver}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _contributors():
        mod.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``cxrnode`` command.

    Parameters
    ----------
    argv:
        The arguments (``None``: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: the command's, 2 for no command or a configuration error (one line on
        stderr, no traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in USES_INSTALLED_CONFIG and not getattr(args, "config", None):
        from installer.admin_cli import default_config

        args.config = default_config()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"cxrnode: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
