"""Install, upgrade, roll back and uninstall cxrnode from an offline bundle.

Layout (``--prefix P``; without a prefix the system paths on the right)::

    program   P/lib/cxrnode/versions/<version>-<build>/venv     /opt/cxrnode/versions/...
              P/lib/cxrnode/current -> versions/<...>            /opt/cxrnode/current
              P/lib/cxrnode/install.json (what was installed)    /opt/cxrnode/install.json
    command   P/bin/cxrnode -> current/venv/bin/cxrnode          /usr/local/bin/cxrnode
    config    P/etc/cxrnode/cxrnode.toml (0640)                  /etc/cxrnode/cxrnode.toml
    data      P/var/lib/cxrnode (or --storage-dir)               /var/lib/cxrnode
    unit      /etc/systemd/system/cxrnode.service (or P/lib/cxrnode/cxrnode.service with --no-systemd)
    launcher  P/share/applications/cxrnode-review.desktop        /usr/share/applications/...

Each version gets its own virtual environment, created from the bundle's wheelhouse only
(``pip --no-index``, no pip configuration read), so an upgrade installs beside the running
version, migrates the database, then switches the ``current`` symlink atomically; ``--rollback``
switches back. Configuration and data are never touched by an upgrade or a plain uninstall.

Runs from the project's wheel before any dependency exists (``install.sh``), so it imports
only the standard library and :mod:`dicom_node.config` (standard library only too).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import getpass
import json
import os
import re
import shutil
import sqlite3
import string
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from dicom_node.config import AE_TITLE_RE, ConfigError, load_config
from installer.bundle import BundleError, open_bundle, say, template_text

SYSTEM_ROOT = Path("/opt/cxrnode")
DEFAULT_USER = "cxrnode"


class InstallError(RuntimeError):
    """The installation cannot proceed; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things go for a prefix (None = the system paths)."""

    prefix: Path | None

    @property
    def root(self) -> Path:
        return self.prefix / "lib" / "cxrnode" if self.prefix else SYSTEM_ROOT

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def previous(self) -> Path:
        return self.root / "previous"

    @property
    def manifest(self) -> Path:
        return self.root / "install.json"

    @property
    def bin(self) -> Path:
        return self.prefix / "bin" / "cxrnode" if self.prefix else Path("/usr/local/bin/cxrnode")

    @property
    def config_dir(self) -> Path:
        return self.prefix / "etc" / "cxrnode" if self.prefix else Path("/etc/cxrnode")

    @property
    def config(self) -> Path:
        return self.config_dir / "cxrnode.toml"

    @property
    def storage(self) -> Path:
        return self.prefix / "var" / "lib" / "cxrnode" if self.prefix else Path("/var/lib/cxrnode")

    @property
    def desktop(self) -> Path:
        base = self.prefix / "share" if self.prefix else Path("/usr/share")
        return base / "applications" / "cxrnode-review.desktop"

    def unit(self, systemd: bool) -> Path:
        return Path("/etc/systemd/system/cxrnode.service") if systemd else self.root / "cxrnode.service"


def is_root() -> bool:
    return os.geteuid() == 0


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string: UTF-8 as is (also outside the BMP: "Radiology 🩻"), quotes, backslashes
    and control characters escaped (json.dumps would write a surrogate pair, which TOML rejects)."""
    return '"' + "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in value) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise InstallError(f"cannot write {value!r} to TOML")


def render_config(example: str, values: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]) -> str:
    """The example configuration with ``values`` set (section -> key -> value) and
    ``tables`` (destinations/reviewers) appended. Comments are kept."""
    lines = example.splitlines()
    for section, kv in values.items():
        try:
            start = lines.index(f"[{section}]")
        except ValueError:
            lines += ["", f"[{section}]"]
            start = len(lines) - 1
        for key, value in kv.items():
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
            pat = re.compile(rf"^{re.escape(key)}\s*=")
            idx = next((i for i in range(start + 1, end) if pat.match(lines[i])), None)
            new = f"{key} = {toml_value(value)}"
            if idx is None:
                lines.insert(start + 1, new)
                continue
            stop = idx + 1
            if lines[idx].rstrip().endswith("["):  # a multi-line array: drop its continuation lines
                while stop < end and lines[stop].strip() != "]":
                    stop += 1
                stop += 1
            lines[idx:stop] = [new]
    for name, items in tables.items():
        for item in items:
            lines += ["", f"[[{name}]]"] + [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def parse_destination(text: str) -> dict[str, Any]:
    """``NAME=AE@HOST:PORT[,send=drafts_and_signed][,tls]`` -> a [[destinations]] table."""
    m = re.fullmatch(r"([^=]+)=([^@]+)@(.+):(\d+)((?:,[a-z_]+(?:=[a-z_]+)?)*)", text.strip())
    if not m:
        raise InstallError(f"--destination {text!r}: expected NAME=AE_TITLE@HOST:PORT[,send=drafts_and_signed][,tls]")
    item: dict[str, Any] = {"name": m[1], "ae_title": m[2], "host": m[3], "port": int(m[4])}
    for opt in filter(None, m[5].split(",")):
        k, _, v = opt.partition("=")
        if k == "send" and v:
            item["send"] = v
        elif k == "tls" and not v:
            item["tls"] = True
        else:
            raise InstallError(f"--destination {text!r}: unknown option {opt!r} (send=..., tls)")
    return item


def parse_reviewer(text: str) -> dict[str, Any]:
    """``USERNAME:Family^Given[:Organisation]`` -> a [[reviewers]] table."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise InstallError(f"--reviewer {text!r}: expected USERNAME:Family^Given[:Organisation]")
    item = {"username": parts[0], "display_name": parts[1]}
    if len(parts) == 3:
        item["organisation"] = parts[2]
    return item


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        dotted, sep, raw = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise InstallError(f"--set {item!r}: expected section.key=value (value in TOML syntax)")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(section, {})[key] = value
    return out


def site_answers(args: argparse.Namespace, layout: Layout) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    values: dict[str, dict[str, Any]] = {"node": {}}
    node = values["node"]
    flags = {"ae_title": args.ae_title, "host": args.host, "port": args.port, "database_url": args.database_url,
             "min_free_space_mb": args.min_free_space_mb}
    node.update({k: v for k, v in flags.items() if v is not None})
    node["storage_dir"] = str(Path(args.storage_dir).resolve()) if args.storage_dir else str(layout.storage)
    model: dict[str, Any] = {}
    if args.model_bundle:
        model["bundle"] = args.model_bundle
    if args.providers is not None:
        model["providers"] = [p for p in args.providers.split(",") if p]
    if model:
        values["model"] = model
    security: dict[str, Any] = {}
    if args.allowed_ae:
        security["allowed_calling_ae_titles"] = args.allowed_ae
    if args.allowed_network:
        security["allowed_networks"] = args.allowed_network
    for k in ("tls_certificate", "tls_private_key", "tls_ca"):
        if getattr(args, k):
            security[k] = str(Path(getattr(args, k)).resolve())
    if security:
        values["security"] = security
    for section, kv in _parse_set(args.set or []).items():
        values.setdefault(section, {}).update(kv)
    tables = {
        "destinations": [parse_destination(d) for d in args.destination or []],
        "reviewers": [parse_reviewer(r) for r in args.reviewer or []],
    }
    return values, tables


def prompt_answers(values: dict[str, dict[str, Any]]) -> None:
    """Ask for the site's answers not given as flags (only on a terminal)."""
    node = values["node"]
    questions = [("ae_title", "AE title of this node", "CXRNODE", str),
                 ("port", "TCP port of the Storage SCP", 11112, int),
                 ("storage_dir", "Storage folder", node.get("storage_dir"), str)]
    for key, text, default, conv in questions:
        if key in node and key != "storage_dir":
            continue
        while True:
            raw = input(f"{text} [{node.get(key, default)}]: ").strip()
            if not raw:
                node.setdefault(key, default)
                break
            try:
                node[key] = conv(raw)
                break
            except ValueError:
                print(f"  expected {conv.__name__}")


def write_private(path: Path, text: str, mode: int, group: str | None = None) -> None:
    """Write ``path`` atomically with exactly ``mode`` (whatever the umask), owned by root and
    ``group`` when running as root. The temporary file is created fresh (``O_EXCL``, never
    through a symlink) and its mode and owner are set on the descriptor before any content."""
    tmp = path.with_name(path.name + ".new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if group and is_root():
            import grp

            os.fchown(fd, 0, grp.getgrnam(group).gr_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_config(layout: Layout, text: str, group: str | None) -> Path:
    """The configuration, 0640 root:``group``: the installed configuration, the only one whose
    ``[[reviewers]]`` may sign (plugin.review.read_installed_config)."""
    path = layout.config
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text, 0o640, group)
    return path


def validate_config_text(text: str) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        return load_config(f.name, env={})
    finally:
        os.unlink(f.name)


# --- users -----------------------------------------------------------------------------------

def ensure_user(user: str, home: Path) -> bool:
    """Create the system user (and its group); True when we created it."""
    import pwd

    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(home), "--no-create-home",
                    "--shell", "/usr/sbin/nologin", "--comment", "cxrnode DICOM node", user], check=True)
    return True


def _add_to_group(account: str, group: str) -> None:
    """Let a reviewer's OS account read the config and the store (the desktop reviewer)."""
    import pwd

    try:
        pwd.getpwnam(account)
    except KeyError:
        say(f"  reviewer {account!r} has no account on this machine: add it later with usermod -aG {group} {account}")
        return
    subprocess.run([shutil.which("usermod") or "/usr/sbin/usermod", "-aG", group, account], check=True)
    say(f"  added reviewer {account!r} to group {group!r} (config and studies readable, signing allowed)")


def check_interpreter_for_services() -> None:
    """The service user must be able to run the Python the virtual environment is built on;
    one under a private home (``/root/.pyenv``...) cannot. Checked as ``nobody``."""
    import pwd

    runuser = shutil.which("runuser")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return
    if not runuser:
        return
    py = _base_python()
    proc = subprocess.run([runuser, "-u", "nobody", "--", py, "-I", "-c", "pass"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(
            f"an unprivileged service user cannot run {py} ({(proc.stderr or '').strip() or 'permission denied'}); "
            "use a system-wide Python 3.11, e.g. PYTHON=/usr/bin/python3.11 ./install.sh ..., "
            "or --no-user to run the node as the installing user")


def chown_nofollow(path: Path, user: str, group: str | None = None) -> None:
    """chown that never follows a symlink: a link planted in a folder the service user can write
    (``cxrnode.db-x -> /etc/shadow``) gets the new owner itself, its target stays root's."""
    import grp
    import pwd

    os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group or user).gr_gid, follow_symlinks=False)


def chown_tree(path: Path, user: str, group: str | None = None) -> None:
    """Give ``path`` and everything below it to ``user`` (and ``group``, default the user's own
    group); symlinks are neither followed nor descended into."""
    chown_nofollow(path, user, group)
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        for name in dirnames + filenames:
            chown_nofollow(Path(dirpath) / name, user, group)


# --- the program: one virtual environment per version ----------------------------------------

def _clean_pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no site pip.conf: it could point at an index
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def create_venv(bundle: Path, info: dict[str, Any], target: Path) -> Path:
    """A virtual environment at ``target`` with cxrnode and its pinned dependencies, offline."""
    wheelhouse = bundle / "wheelhouse"
    pip_wheels = sorted(wheelhouse.glob("pip-*.whl"))
    own = sorted(wheelhouse.glob("cxrnode-*.whl"))
    if not pip_wheels or not own:
        raise InstallError(f"{wheelhouse}: no pip or cxrnode wheel; the bundle is incomplete")
    if (sys.version_info.major, sys.version_info.minor) != (3, 11) and info.get("python") == "cp311":
        say(f"note: the bundle's wheels are for CPython 3.11; this is {sys.version.split()[0]}")
    env = _clean_pip_env()
    # -I: the working directory (wherever root ran install.sh from) is not on sys.path
    subprocess.run([_base_python(), "-I", "-m", "venv", "--without-pip", str(target)], check=True, env=env)
    py = target / "bin" / "python"
    pip = [str(py), str(pip_wheels[-1] / "pip"), "install", "--isolated", "--no-index",
           "--find-links", str(wheelhouse), "--no-cache-dir", "--progress-bar", "off", "-q"]
    say("  installing the runtime dependencies from the wheelhouse (no network)")
    _check_call([*pip, "-r", str(wheelhouse / "requirements.txt"), str(pip_wheels[-1])], env, "pip install")
    say("  installing cxrnode")
    _check_call([*pip, "--no-deps", str(own[-1])], env, "pip install cxrnode")
    return py


def _check_call(cmd: list[str], env: dict[str, str], what: str) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


MIGRATE = """
import json, sys
from dicom_node.config import load_config
from dicom_node.db import current_revision, migrate
c = load_config(sys.argv[1], env={})
url = c.node.resolved_database_url()
migrate(url, sys.argv[2]) if sys.argv[2] != "head" else migrate(url)
print(json.dumps(dict(zip(("revision", "head"), current_revision(url)))))
"""

DOWNGRADE = """
import sys
from pathlib import Path
import dicom_node.db as db
from alembic import command
from alembic.config import Config
from dicom_node.config import load_config
c = load_config(sys.argv[1], env={})
cfg = Config()
cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
cfg.set_main_option("sqlalchemy.url", c.node.resolved_database_url().replace("%", "%%"))
cfg.attributes["configure_logger"] = False
command.downgrade(cfg, sys.argv[2])
"""

HEAD = """
from pathlib import Path
import dicom_node.db as db
from alembic.config import Config
from alembic.script import ScriptDirectory
cfg = Config()
cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
print(ScriptDirectory.from_config(cfg).get_current_head() or "")
"""


def run_in(py: Path, script: str, *args: str) -> str:
    env = _clean_pip_env()
    env.pop("CXRNODE_CONFIG", None)
    # -I: isolated, so neither the working directory (a source checkout?) nor PYTHON* variables
    # can shadow the installed packages
    return _check_call([str(py), "-I", "-c", script, *args], env, "running the installed cxrnode").strip()


def migrate_with(py: Path, config: Path, revision: str = "head") -> dict[str, str]:
    out = run_in(py, MIGRATE, str(config), revision)
    return dict(json.loads(out.splitlines()[-1]))


def backup_sqlite(url: str, dest_dir: Path, label: str) -> Path | None:
    """A consistent copy of the SQLite index (taken while the node may be running)."""
    if not url.startswith("sqlite:///"):
        return None
    src = Path(url.removeprefix("sqlite:///"))
    if not src.is_file():
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"cxrnode-{label}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.db"
    with sqlite3.connect(src) as s, sqlite3.connect(dest) as d:
        s.backup(d)
    return dest


def switch_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


def render_template(name: str, **values: str) -> str:
    return string.Template(template_text(name)).substitute(values)


#: resource ceilings of the unit (MemoryHigh throttles, MemoryMax kills; TasksMax counts threads).
#: The node measures ~150-300 MB RSS (README); a study's pixels and the model add a few hundred MB.
UNIT_MEMORY_HIGH = "3G"
UNIT_MEMORY_MAX = "4G"
UNIT_TASKS_MAX = 512


def render_unit(bin_path: Path, config: Path, storage: Path, user: str, port: int) -> str:
    caps = "CAP_NET_BIND_SERVICE" if port and port < 1024 else ""
    return render_template("cxrnode.service", bin=str(bin_path), config=str(config), storage_dir=str(storage),
                           user=user, group=user, capabilities=caps, memory_high=UNIT_MEMORY_HIGH,
                           memory_max=UNIT_MEMORY_MAX, tasks_max=str(UNIT_TASKS_MAX))


def systemctl(*args: str) -> None:
    subprocess.run(["systemctl", *args], check=True)


def read_manifest(layout: Layout, allow_removed: bool = False) -> dict[str, Any]:
    """install.json; with ``allow_removed`` also the copy a plain uninstall leaves beside the config."""
    kept = layout.config_dir / "install.json"
    if allow_removed and not layout.manifest.is_file() and kept.is_file():
        return {**json.loads(kept.read_text(encoding="utf-8")), "removed": True}
    if not layout.manifest.is_file():
        where = f"--prefix {layout.prefix}" if layout.prefix else f"{SYSTEM_ROOT}"
        raise InstallError(f"cxrnode is not installed at {where} (no {layout.manifest}); install it first")
    return dict(json.loads(layout.manifest.read_text(encoding="utf-8")))


def redact_url(url: str) -> str:
    """A database URL without its password (``postgresql+psycopg://user:***@host/db``)."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*)@(.*)$", url)
    if not m or ":" not in m[2]:
        return url
    return f"{m[1]}{m[2].split(':', 1)[0]}:***@{m[3]}"


def write_manifest(layout: Layout, manifest: dict[str, Any], path: Path | None = None) -> None:
    """install.json: mode 0600 whatever the umask, and without the database password (the
    configuration file, 0640 root:cxrnode, is the one place it is kept)."""
    manifest = {**manifest, "database_url": redact_url(str(manifest.get("database_url", "")))}
    write_private(path or layout.manifest, json.dumps(manifest, indent=2) + "\n", 0o600)


def detect_layout(prefix: str | None) -> Layout:
    """The layout for ``--prefix``, or the one this program runs from, or the system one."""
    if prefix:
        p = Path(prefix).resolve()
        if not p.is_dir():
            raise InstallError(f"--prefix {p}: no such folder")
        return Layout(p)
    here = Path(sys.prefix).resolve()  # .../versions/<v>/venv
    root = here.parent.parent.parent
    if (root / "install.json").is_file():
        m = json.loads((root / "install.json").read_text(encoding="utf-8"))
        return Layout(Path(m["prefix"]) if m.get("prefix") else None)
    return Layout(None)


def _undo_program(layout: Layout, vdir: Path, systemd: bool) -> None:
    """A failed installation leaves no half program behind (configuration and data stay)."""
    say(f"installation failed: removing the program files it wrote ({layout.root}); configuration and data are kept")
    for p in (layout.bin, layout.current, layout.desktop, layout.unit(systemd)):
        if p.is_symlink() or p.is_file():
            p.unlink()
    shutil.rmtree(vdir, ignore_errors=True)


def _version_dir(layout: Layout, info: dict[str, Any]) -> Path:
    d = layout.versions / f"{info['version']}-{info['flavour']}-{info['build_id']}"
    if d.exists():
        raise InstallError(f"{d} exists: this bundle is already installed")
    return d


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
    values, tables = site_answers(args, layout)
    keep_config = layout.config.exists()
    if keep_config:
        say(f"keeping the existing configuration {layout.config}")
        if any(values[s] for s in values if s != "node") or len(values["node"]) > 1 or any(tables.values()):
            say("  note: the site answers given as flags are not applied to an existing file; edit it instead")
        config_obj = load_config(layout.config, env={})
        config_text = None
    else:
        if args.prompt or (sys.stdin.isatty() and not args.yes):
            prompt_answers(values)
        example = template_text("cxrnode.example.toml")
        config_text = render_config(example, values, tables)
        config_obj = validate_config_text(config_text)
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
        layout.versions.mkdir(parents=True, exist_ok=True)
        vdir = _version_dir(layout, info)
        vdir.mkdir()
        try:
            py = create_venv(bundle, info, vdir / "venv")
            head = run_in(py, HEAD)
            for m in sorted((bundle / "models").glob("*")) if (bundle / "models").is_dir() else []:
                shutil.copytree(m, layout.root / "models" / m.name, dirs_exist_ok=True)
        except BaseException:
            shutil.rmtree(vdir, ignore_errors=True)
            raise
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
                    _add_to_group(account, user)

            say(f"[6/{steps}] service unit")
            unit = layout.unit(systemd)
            unit.parent.mkdir(parents=True, exist_ok=True)
            unit.write_text(render_unit(layout.bin, layout.config, storage, user, config_obj.node.port), encoding="utf-8")
            say(f"  wrote {unit}")
            registered = False
            if systemd:
                if systemd_running():
                    systemctl("daemon-reload")
                    systemctl("enable", "--now", "cxrnode.service")
                    registered = True
                    say("  enabled and started cxrnode.service")
                else:
                    say("  systemd is not running on this machine: the unit is written but not enabled; "
                        "later: systemctl daemon-reload && systemctl enable --now cxrnode")
            else:
                say("  --no-systemd: not registered; start the node with "
                    f"`{layout.bin} serve --config {layout.config}`")
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
                "versions": {vdir.name: {"version": info["version"], "flavour": info["flavour"], "head": head,
                                         "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}},
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
        vdir = _version_dir(layout, info)
        vdir.mkdir(parents=True)
        try:
            py = create_venv(bundle, info, vdir / "venv")
            head = run_in(py, HEAD)
        except BaseException:
            shutil.rmtree(vdir, ignore_errors=True)
            raise
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
        _rerender_unit(layout.current / "venv" / "bin" / "python", manifest)
        manifest["versions"][vdir.name] = {"version": info["version"], "flavour": info["flavour"], "head": head,
                                           "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                           "backup": str(backup or "")}
        manifest["previous"], manifest["current"] = old, vdir.name
        write_manifest(layout, manifest)
        say("[4/4] restarting the service")
        _restart(manifest)
    say(f"upgraded to cxrnode {info['version']}; undo with `{layout.bin} upgrade --rollback`")
    return 0


RENDER_UNIT = """
import sys
from pathlib import Path
from dicom_node.config import load_config
from installer.install import render_unit
bin_path, config, user = sys.argv[1:4]
c = load_config(config, env={})
sys.stdout.write(render_unit(Path(bin_path), Path(config), Path(c.node.storage_dir), user, c.node.port))
"""


def _rerender_unit(py: Path, manifest: dict[str, Any]) -> None:
    """The unit from the version now current (its template may carry new hardening)."""
    unit = Path(manifest["unit"])
    if not unit.is_file():
        return
    text = run_in(py, RENDER_UNIT, manifest["bin"], manifest["config"], manifest["user"]) + "\n"
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
        run_in(layout.versions / cur / "venv" / "bin" / "python", DOWNGRADE, manifest["config"], want)
        _chown_database(manifest)
    switch_link(layout.current, layout.versions / prev)
    switch_link(layout.previous, layout.versions / cur)
    _rerender_unit(layout.current / "venv" / "bin" / "python", manifest)
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
