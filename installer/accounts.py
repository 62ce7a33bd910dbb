"""The service's system user, the reviewers' group membership and ownership of its files.

Every ``chown`` is done without following symlinks: the service user can write in the storage
folder, so a link planted there must never hand root's files to it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from installer.bundle import say
from installer.layout import InstallError
from installer.venv import base_python


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


def add_to_group(account: str, group: str) -> None:
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
    py = base_python()
    proc = subprocess.run([runuser, "-u", "nobody", "--", py, "-I", "-m", "platform"], capture_output=True, text=True)
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
