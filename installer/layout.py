"""Where an installation lives and the files that record it.

Layout (``--prefix P``; without a prefix the system paths on the right)::

    program   P/lib/cxrnode/versions/<version>-<build>/venv     /opt/cxrnode/versions/...
              P/lib/cxrnode/current -> versions/<...>            /opt/cxrnode/current
              P/lib/cxrnode/install.json (what was installed)    /opt/cxrnode/install.json
    command   P/bin/cxrnode -> current/venv/bin/cxrnode          /usr/local/bin/cxrnode
    config    P/etc/cxrnode/cxrnode.toml (0640)                  /etc/cxrnode/cxrnode.toml
    data      P/var/lib/cxrnode (or --storage-dir)               /var/lib/cxrnode
    unit      /etc/systemd/system/cxrnode.service (or P/lib/cxrnode/cxrnode.service with --no-systemd)
    launcher  P/share/applications/cxrnode-review.desktop        /usr/share/applications/...

Standard library only: it runs from the project's wheel before any dependency exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

SYSTEM_ROOT = Path("/opt/cxrnode")


DEFAULT_USER = "cxrnode"


class InstallError(RuntimeError):
    """The installation cannot proceed; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where things go for a prefix: versions, the current link, configuration, storage, unit.

    Attributes
    ----------
    prefix:
        The installation's root (``None``: the system paths).
    """

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


def detect_layout(prefix: str | None) -> Layout:
    """The layout for ``--prefix``, or the one this program runs from, or the system one.

    Parameters
    ----------
    prefix:
        The ``--prefix`` argument (``None``: not given).

    Returns
    -------
    Layout
        The layout.

    Raises
    ------
    InstallError
        ``prefix`` is not an existing folder.
    """
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


def switch_link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (rename over the old link)."""
    tmp = link.with_name(link.name + ".new")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    os.replace(tmp, link)


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
