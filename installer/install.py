"""Install, upgrade, roll back and uninstall cxrnode from an offline bundle: the four commands.

Each version gets its own virtual environment, created from the bundle's wheelhouse only
(``pip --no-index``, no pip configuration read), so an upgrade installs beside the running
version, migrates the database, then switches the ``current`` symlink atomically; ``--rollback``
switches back. Configuration and data are never touched by an upgrade or a plain uninstall.

The parts, each in a module named for it: :mod:`installer.layout` (where things go, install.json),
:mod:`installer.site_config` (the configuration from the site's answers), :mod:`installer.accounts`
(system user, group, ownership), :mod:`installer.venv` (virtual environments and the commands run
with an installed version's interpreter, :mod:`installer.in_venv`), :mod:`installer.unit` (the
systemd unit and the launcher).

Runs from the project's wheel before any dependency exists (``install.sh``), so it imports
only the standard library and :mod:`dicom_node.config` (standard library only too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dicom_node.config import AE_TITLE_RE, ConfigError, load_config
from installer.accounts import (
    add_to_group,
    check_interpreter_for_services,
    chown_nofollow,
    chown_tree,
    ensure_user,
)
from installer.bundle import BundleError, open_bundle, say, template_text
from installer.layout import (
    DEFAULT_USER,
    InstallError,
    Layout,
    detect_layout,
    is_root,
    read_manifest,
    switch_link,
    systemd_running,
    write_manifest,
)
from installer.site_config import (
    prompt_answers,
    render_config,
    site_answers,
    validate_config_text,
    write_config,
)
from installer.unit import render_template, render_unit, systemctl
from installer.venv import (
    backup_sqlite,
    create_venv,
    downgrade_with,
    migrate_with,
    run_in,
    schema_head,
)


def _undo_program(layout: Layout, vdir: Path, systemd: bool) -> None:
    """A failed installation leaves no half program behind (configuration and data stay)."""
    say(f"installation failed: removing the program files it wrote ({layout.root}); configuration and data are kept")
    for p in (layout.bin, layout.current, layout.desktop, layout.unit(systemd)):
        if p.is_symlink() or p.is_file():
            p.unlink()
    shutil.rmtree(vdir, ignore_errors=True)


def _version_record(info: dict[str, Any], head: str, **extra: str) -> dict[str, Any]:
    """What install.json keeps of an installed version (rollback reads ``head`` and ``flavour``)."""
    return {"version": info["version"], "flavour": info["flavour"], "head": head,
            "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **extra}


def _new_version(layout: Layout, bundle: Path, info: dict[str, Any], copy_models: bool) -> tuple[Path, Path, str]:
    """The version folder with its virtual environment (removed again if that fails): (folder,
    its python, the schema head it knows). ``copy_models``: the bundle's models go to the
    installation's models folder (a first installation)."""
    layout.versions.mkdir(parents=True, exist_ok=True)
    vdir = layout.versions / f"{info['version']}-{info['flavour']}-{info['build_id']}"
    if vdir.exists():
        raise InstallError(f"{vdir} exists: this bundle is already installed")
    vdir.mkdir()
    try:
        py = create_venv(bundle, info, vdir / "venv")
        head = schema_head(py)
        models = sorted((bundle / "models").glob("*")) if copy_models and (bundle / "models").is_dir() else []
        for m in models:
            shutil.copytree(m, layout.root / "models" / m.name, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(vdir, ignore_errors=True)
        raise
    return vdir, py, head


def _site_configuration(args: argparse.Namespace, layout: Layout) -> tuple[str | None, Any, dict[str, list[dict[str, Any]]]]:
    """(text of the new configuration or None when an existing one is kept, the validated
    configuration, the [[destinations]]/[[reviewers]] tables given as flags)."""
    values, tables = site_answers(args, layout)
    if layout.config.exists():
        say(f"keeping the existing configuration {layout.config}")
        if any(values[s] for s in values if s != "node") or len(values["node"]) > 1 or any(tables.values()):
            say("  note: the site answers given as flags are not applied to an existing file; edit it instead")
        return None, load_config(layout.config, env={}), tables
    if args.prompt or (sys.stdin.isatty() and not args.yes):
        prompt_answers(values)
    config_text = render_config(template_text("cxrnode.example.toml"), values, tables)
    return config_text, validate_config_text(config_text), tables


def _write_unit(layout: Layout, unit: Path, text: str, systemd: bool) -> bool:
    """Write the unit; with systemd running, enable and start it. True when registered."""
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(text, encoding="utf-8")
    say(f"  wrote {unit}")
    if not systemd:
        say(f"  --no-systemd: not registered; start the node with `{layout.bin} serve --config {layout.config}`")
        return False
    if not systemd_running():
        say("  systemd is not running on this machine: the unit is written but not enabled; "
            "later: systemctl daemon-reload && systemctl enable --now cxrnode")
        return False
    systemctl("daemon-reload")
    systemctl("enable", "--now", "cxrnode.service")
    say("  enabled and started cxrnode.service")
    return True


# --- commands --------------------------------------------------------------------------------

def install(args: argparse.Namespace) -> int:
    layout = Layout(Path(args.prefix).resolve() if args.prefix else None)
    systemd = not args.no_systemd
    if layout.manifest.exists():
        raise InstallError(f"cxrnode is already installed here ({layout.manifest}); use `cxrnode upgrade --bundle ...`")
    if systemd and not is_root():
        raise InstallError("installing the systemd unit needs root; run as root or pass --no-systemd")
    if args.ae_title is not None and not AE_TITLE_RE.match(args.ae_title):
        raise InstallError(f"--ae-title {args.ae_title!r}: expected 1-16 characters without backslash")
    create_user = not args.no_user and is_root()
    user = args.user if create_user else getpass.getuser()
    if create_user:
        check_interpreter_for_services()

    # 1. the configuration first: a wrong answer stops before anything is written
    config_text, config_obj, tables = _site_configuration(args, layout)
    storage = Path(config_obj.node.storage_dir)

    with tempfile.TemporaryDirectory(prefix="cxrnode-bundle-") as work:
        bundle, info = open_bundle(args.bundle, Path(work))
        say(f"installing cxrnode {info['version']} ({info['flavour']}, build {info['build_id']}) "
            f"into {layout.root}")
        steps = 8
        say(f"[1/{steps}] system user")
        created_user = False
        if create_user:
            created_user = ensure_user(user, storage)
            say(f"  {'created' if created_user else 'using existing'} system user {user!r}")
        else:
            why = "--no-user given" if args.no_user else "not running as root"
            say(f"  skipped ({why}); the node will run as {user!r}")
        say(f"[2/{steps}] virtual environment (offline, from the bundle's wheelhouse)")
        vdir, py, head = _new_version(layout, bundle, info, copy_models=True)
        try:
            switch_link(layout.current, vdir)
            layout.bin.parent.mkdir(parents=True, exist_ok=True)
            switch_link(layout.bin, layout.current / "venv" / "bin" / "cxrnode")
            say(f"  {layout.bin} -> {layout.current / 'venv/bin/cxrnode'}")

            say(f"[3/{steps}] configuration")
            if config_text is not None:
                write_config(layout, config_text, user if create_user else None)
                say(f"  wrote {layout.config} (mode 0640)")
            say(f"[4/{steps}] storage folder {storage}")
            storage.mkdir(parents=True, exist_ok=True)
            # group = the people allowed to see the studies: the service and the reviewers on this
            # machine (setgid keeps new folders in the group; the unit's UMask=0007 keeps files so)
            os.chmod(storage, 0o2770)
            say(f"[5/{steps}] database")
            rev = migrate_with(py, layout.config)
            say(f"  {config_obj.node.resolved_database_url().split('@')[-1]} at revision {rev['revision']} (head {rev['head']})")
            if create_user:
                chown_tree(storage, user)
                for account in [r["username"] for r in tables["reviewers"]]:
                    add_to_group(account, user)

            say(f"[6/{steps}] service unit")
            unit = layout.unit(systemd)
            unit_text = render_unit(layout.bin, layout.config, storage, user, config_obj.node.port, str(info["flavour"]))
            registered = _write_unit(layout, unit, unit_text, systemd)
            say(f"[7/{steps}] reviewer launcher")
            layout.desktop.parent.mkdir(parents=True, exist_ok=True)
            layout.desktop.write_text(render_template("cxrnode-review.desktop", bin=str(layout.bin), config=str(layout.config)),
                                      encoding="utf-8")
            say(f"  wrote {layout.desktop}")
            say(f"[8/{steps}] recording the installation in {layout.manifest}")
            write_manifest(layout, {
                "prefix": str(layout.prefix) if layout.prefix else "",
                "user": user, "created_user": created_user,
                "config": str(layout.config), "storage_dir": str(storage),
                "database_url": config_obj.node.resolved_database_url(),
                "unit": str(unit), "systemd": registered, "desktop": str(layout.desktop), "bin": str(layout.bin),
                "current": vdir.name, "previous": "",
                "versions": {vdir.name: _version_record(info, head)},
            })
        except BaseException:
            _undo_program(layout, vdir, systemd)
            raise
    say(f"cxrnode {info['version']} installed. Check it with:\n  {layout.bin} doctor --config {layout.config}")
    return 0


def upgrade(args: argparse.Namespace) -> int:
    layout = detect_layout(args.prefix)
    manifest = read_manifest(layout)
    if args.rollback:
        return rollback(layout, manifest)
    if not args.bundle:
        raise InstallError("upgrade: give --bundle PATH (a bundle folder or .tar.gz) or --rollback")
    config = Path(manifest["config"])
    with tempfile.TemporaryDirectory(prefix="cxrnode-bundle-") as work:
        bundle, info = open_bundle(args.bundle, Path(work))
        old = manifest["current"]
        say(f"upgrading {old} -> cxrnode {info['version']} ({info['flavour']}, build {info['build_id']})")
        say("[1/4] new virtual environment beside the current one (offline)")
        vdir, py, head = _new_version(layout, bundle, info, copy_models=False)
        say("[2/4] backing up and migrating the database")
        backup = backup_sqlite(manifest["database_url"], Path(manifest["storage_dir"]) / "backups", f"before-{vdir.name}")
        if backup:
            say(f"  backup {backup}")
        rev = migrate_with(py, config)
        say(f"  at revision {rev['revision']} (head {rev['head']})")
        _chown_database(manifest)
        say("[3/4] switching over")
        switch_link(layout.previous, layout.versions / old)
        switch_link(layout.current, vdir)
        say(f"  {layout.current} -> {vdir.name} (previous: {old})")
        rerender_unit(layout.current / "venv" / "bin" / "python", manifest, str(info["flavour"]))
        manifest["versions"][vdir.name] = _version_record(info, head, backup=str(backup or ""))
        manifest["previous"], manifest["current"] = old, vdir.name
        write_manifest(layout, manifest)
        say("[4/4] restarting the service")
        _restart(manifest)
    say(f"upgraded to cxrnode {info['version']}; undo with `{layout.bin} upgrade --rollback`")
    return 0


def rerender_unit(py: Path, manifest: dict[str, Any], flavour: str) -> None:
    """The unit from the version now current (its template may carry new hardening); a version
    installed before :mod:`installer.in_venv` existed cannot render it: the unit is kept."""
    unit = Path(manifest["unit"])
    if not unit.is_file():
        return
    try:
        text = run_in(py, "render-unit", manifest["bin"], manifest["config"], manifest["user"], flavour) + "\n"
    except InstallError as exc:
        if "No module named installer.in_venv" not in str(exc):
            raise
        say(f"  kept {unit} (that version cannot render its unit)")
        return
    if text != unit.read_text(encoding="utf-8"):
        unit.write_text(text, encoding="utf-8")
        say(f"  updated {unit}")
        if manifest.get("systemd") and systemd_running():
            systemctl("daemon-reload")


def _chown_database(manifest: dict[str, Any], group: str | None = None) -> None:
    """Files a root-run migration created in storage belong to the service user (a symlink the
    service user planted there is changed itself, never its target)."""
    if is_root() and manifest.get("created_user"):
        for p in Path(manifest["storage_dir"]).glob("cxrnode.db*"):
            chown_nofollow(p, manifest["user"], group)


def _restart(manifest: dict[str, Any]) -> None:
    if manifest.get("systemd") and systemd_running():
        systemctl("try-restart", "cxrnode.service")
        say("  restarted cxrnode.service")
    else:
        say("  not managed by systemd here: restart `cxrnode serve` yourself to run the new version")


def rollback(layout: Layout, manifest: dict[str, Any]) -> int:
    prev, cur = manifest.get("previous"), manifest["current"]
    if not prev or not (layout.versions / prev).is_dir():
        raise InstallError("nothing to roll back to: no previous version is kept")
    want = manifest["versions"][prev]["head"]
    have = manifest["versions"][cur]["head"]
    if want != have:
        say(f"downgrading the database {have} -> {want} with {cur}'s migrations")
        downgrade_with(layout.versions / cur / "venv" / "bin" / "python", manifest["config"], want)
        _chown_database(manifest)
    switch_link(layout.current, layout.versions / prev)
    switch_link(layout.previous, layout.versions / cur)
    rerender_unit(layout.current / "venv" / "bin" / "python", manifest,
                  str(manifest["versions"][prev].get("flavour", "cpu")))
    manifest["current"], manifest["previous"] = prev, cur
    write_manifest(layout, manifest)
    _restart(manifest)
    say(f"rolled back to {prev} (the other version stays in {layout.versions / cur})")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    layout = detect_layout(args.prefix)
    manifest = read_manifest(layout, allow_removed=args.purge)
    config, storage = Path(manifest["config"]), Path(manifest["storage_dir"])
    if not manifest.get("removed"):
        if manifest.get("systemd") and systemd_running():
            subprocess.run(["systemctl", "disable", "--now", "cxrnode.service"], check=False)
        for key in ("unit", "desktop", "bin"):
            p = Path(manifest[key])
            if p.is_symlink() or p.exists():
                p.unlink()
                say(f"removed {p}")
        if manifest.get("systemd") and systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], check=False)
        shutil.rmtree(layout.root)
        say(f"removed {layout.root}")
    if args.purge:
        for p in (storage, config.parent):
            if p.exists():
                shutil.rmtree(p)
                say(f"purged {p}")
        if not manifest["database_url"].startswith("sqlite"):
            say("note: the PostgreSQL database itself was not dropped")
        if manifest.get("created_user") and is_root():
            subprocess.run([shutil.which("userdel") or "/usr/sbin/userdel", manifest["user"]], check=False)
            say(f"removed system user {manifest['user']!r}")
    else:
        if config.parent.is_dir():  # remember what to purge later (`cxrnode uninstall --purge`)
            write_manifest(layout, manifest, config.parent / "install.json")
        say(f"kept the configuration {config} and the data in {storage}; "
            f"remove them with `cxrnode uninstall --purge{' --prefix ' + str(layout.prefix) if layout.prefix else ''}`")
    return 0


# --- command line ----------------------------------------------------------------------------

def add_install_arguments(p: argparse.ArgumentParser, bundle_required: bool) -> None:
    p.add_argument("--bundle", required=bundle_required, metavar="PATH",
                   help="unpacked bundle folder or .tar.gz (install.sh passes its own folder)")
    p.add_argument("--prefix", metavar="P", help="install under P (P/bin/cxrnode, P/etc/cxrnode, P/var/lib/cxrnode) "
                   "instead of /opt/cxrnode, /etc/cxrnode, /var/lib/cxrnode")
    p.add_argument("--no-systemd", action="store_true", help="do not install or enable the systemd unit")
    p.add_argument("--no-user", action="store_true", help="do not create a system user (run as the installing user)")
    p.add_argument("--user", default=DEFAULT_USER, help="system user of the service (default %(default)s)")
    g = p.add_argument_group("site answers (written into the new configuration file; an existing one is kept)")
    g.add_argument("--ae-title", help="our AE title (default CXRNODE)")
    g.add_argument("--host", help="listening address (default 0.0.0.0)")
    g.add_argument("--port", type=int, help="Storage SCP port (default 11112)")
    g.add_argument("--storage-dir", help="data folder (default /var/lib/cxrnode or P/var/lib/cxrnode)")
    g.add_argument("--database-url", help="SQLAlchemy URL (default: SQLite in the storage folder)")
    g.add_argument("--min-free-space-mb", type=int, help="free-space floor of the storage folder (default 500)")
    g.add_argument("--model-bundle", help="model bundle name or folder (default: default)")
    g.add_argument("--providers", help="ONNX Runtime providers, comma-separated (default: CUDA if available, else CPU)")
    g.add_argument("--destination", action="append", metavar="NAME=AE@HOST:PORT[,send=drafts_and_signed][,tls]",
                   help="a PACS to send reports to (repeatable)")
    g.add_argument("--reviewer", action="append", metavar="USER:Family^Given[:Org]", help="a signing radiologist (repeatable)")
    g.add_argument("--allowed-ae", action="append", metavar="AE", help="calling AE title allowed to send (repeatable)")
    g.add_argument("--allowed-network", action="append", metavar="CIDR", help="peer network allowed (repeatable)")
    g.add_argument("--tls-certificate", help="PEM certificate for DICOM TLS")
    g.add_argument("--tls-private-key", help="PEM private key of the certificate")
    g.add_argument("--tls-ca", help="PEM CA bundle (mutual TLS)")
    g.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any other key (TOML value; repeatable)")
    g.add_argument("--prompt", action="store_true", help="ask for AE title, port and storage folder")
    g.add_argument("-y", "--yes", action="store_true", help="never prompt (the default when not on a terminal)")


def run(func: Any, args: argparse.Namespace) -> int:
    try:
        return int(func(args))
    except (InstallError, BundleError, ConfigError) as exc:
        print(f"cxrnode {args.command}: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"cxrnode {args.command}: {' '.join(map(str, exc.cmd))} failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"cxrnode {args.command}: permission denied: {exc.filename}; run as root, or give --prefix "
              "a folder you own (with --no-systemd)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cxrnode {args.command}: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """``python -m installer.install``: what install.sh runs (install only)."""
    parser = argparse.ArgumentParser(prog="install.sh", description="Install cxrnode from this offline bundle.")
    add_install_arguments(parser, bundle_required=True)
    parser.set_defaults(command="install")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(install, args)


if __name__ == "__main__":
    sys.exit(main())
