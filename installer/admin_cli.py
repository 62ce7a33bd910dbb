"""Site-IT subcommands of ``cxrnode``: ``bundle``, ``install``, ``upgrade``, ``uninstall``, ``doctor``.

Composed into the ``cxrnode`` command by :mod:`installer.cli`. Heavy imports (the model, the
database) happen inside the commands, never at import time; nothing here imports Qt.
"""

from __future__ import annotations

import argparse
import os
import sys

from installer import install as inst
from installer import layout as lay
from installer.bundle import BundleError


def _bundle(args: argparse.Namespace) -> int:
    from installer.bundle import build_bundle

    try:
        build_bundle(args.out, flavour=args.flavour + ("-headless" if args.headless else ""), source=args.source, models=args.model or (),
                     pack=not args.no_pack, force=args.force)
    except BundleError as exc:
        print(f"cxrnode bundle: {exc}", file=sys.stderr)
        return 2
    return 0


def default_config() -> str | None:
    """Without --config or CXRNODE_CONFIG: the configuration of the installation this program
    belongs to, else /etc/cxrnode/cxrnode.toml when it exists."""
    if os.environ.get("CXRNODE_CONFIG"):
        return None
    try:
        layout = lay.detect_layout(None)
        if layout.manifest.is_file():
            return str(lay.read_manifest(layout)["config"])
    except (lay.InstallError, OSError, ValueError, KeyError):
        pass
    system = lay.Layout(None).config
    return str(system) if system.is_file() else None


def _doctor(args: argparse.Namespace) -> int:
    from installer.doctor import main_doctor

    config = args.config or default_config()
    return main_doctor(config, args.set or [], as_json_output=args.json,
                       echo_timeout_s=args.timeout, inference=not args.no_inference, role=args.role)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle", help="build the offline installation bundle (wheelhouse, models, install.sh)",
                       description="Build an offline bundle for Linux x86_64 CPython 3.11: a folder and a .tar.gz "
                                   "with its .sha256. Needs access to a package index; installing from it does not.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the bundle into")
    flav = p.add_mutually_exclusive_group()
    flav.add_argument("--gpu", dest="flavour", action="store_const", const="gpu",
                      help="ship onnxruntime-gpu (CUDA when present, else CPU; the default)")
    flav.add_argument("--cpu", dest="flavour", action="store_const", const="cpu", help="ship the CPU onnxruntime only")
    p.set_defaults(flavour="gpu")
    p.add_argument("--headless", action="store_true",
                   help="a node without the desktop reviewer: no PyQt6 (about 250 MB less installed)")
    p.add_argument("--source", metavar="DIR", help="cxrnode source tree (default: the checkout this command runs from)")
    p.add_argument("--model", action="append", metavar="DIR", help="an extra model bundle folder to ship (repeatable)")
    p.add_argument("--no-pack", action="store_true", help="build the folder only, no .tar.gz")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder of the same name")
    p.set_defaults(func=_bundle)

    p = sub.add_parser("install", help="install from an offline bundle (what install.sh runs)",
                       description="Install cxrnode from an offline bundle; nothing is downloaded.")
    inst.add_install_arguments(p, bundle_required=True)
    p.set_defaults(func=lambda a: inst.run(inst.install, a))

    p = sub.add_parser("upgrade", help="install a newer bundle beside the current one, migrate, switch (or --rollback)",
                       description="Install a newer bundle beside the running version, back up and migrate the "
                                   "database, switch over; --rollback switches back. Config and data are kept.")
    p.add_argument("--bundle", metavar="PATH", help="the new bundle (folder or .tar.gz)")
    p.add_argument("--rollback", action="store_true", help="switch back to the previous version")
    p.add_argument("--prefix", metavar="P", help="the installation's prefix (default: the one this program runs from)")
    p.set_defaults(func=lambda a: inst.run(inst.upgrade, a))

    p = sub.add_parser("uninstall", help="remove the program and the service unit (data kept unless --purge)",
                       description="Stop and remove the service unit, the program, the command and the reviewer "
                                   "launcher. The configuration, the studies, the SRs and the database are kept (a "
                                   "copy of the install record stays beside the config) unless --purge, which also "
                                   "deletes them (a PostgreSQL database itself is not dropped) and the system user "
                                   "the installer created. Run as root for a system installation.")
    p.add_argument("--prefix", metavar="P", help="the installation's prefix (default: the one this program runs from)")
    p.add_argument("--purge", action="store_true", help="also delete the configuration, the data and the system user")
    p.set_defaults(func=lambda a: inst.run(inst.uninstall, a))

    p = sub.add_parser("doctor", help="check the installation: config, storage, database, model, network, TLS, queue",
                       description="One table of checks, each OK/WARN/FAIL with a stable code and a hint. "
                                   "Every check and its levels: `pydoc installer.doctor` and README.md, Operations.",
                       epilog="exit status: 0 no FAIL (WARNs allowed), 1 at least one FAIL, 2 usage error. "
                              "--json schema: cxrnode.doctor/1.")
    from dicom_node.cli import CONFIG_HELP, SET_HELP

    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help=SET_HELP)
    p.add_argument("--json", action="store_true", help="print the results as JSON (schema cxrnode.doctor/1)")
    p.add_argument("--role", choices=("node", "reviewer", "both"), default="node",
                   help="what this machine is: node (the service runs here; it is checked), reviewer (a reviewer "
                        "workstation: the display is checked, no reviewers is a FAIL), both (default: node)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each C-ECHO (default %(default)s)")
    p.add_argument("--no-inference", action="store_true", help="skip the inference on the sample study")
    p.set_defaults(func=_doctor)
