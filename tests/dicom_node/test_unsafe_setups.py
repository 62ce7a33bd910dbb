"""Unsafe set-ups are refused at start with one line and an exit code of their own (issue 16):
``cxrnode worker`` against SQLite; an SQLite index whose file lies on a network filesystem
(detected from ``/proc/self/mountinfo``; the detection takes the text, so these tests feed it the
mount table of a host with NFS, SMB, sshfs... mounts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from node_config import node_sections, write_config

import dicom_node.startup as startup
from dicom_node.cli import main
from dicom_node.startup import (
    EXIT_CONFIG,
    EXIT_NETWORK_FS,
    StartupError,
    check_sqlite_location,
    filesystem_of,
    is_network_filesystem,
)


def mountinfo(*mounts: tuple[str, str]) -> str:
    """A mount table (proc(5) format) with ``/`` on ext4 and ``(mount point, type)`` on top."""
    lines = ["27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard"]
    for i, (point, fstype) in enumerate(mounts, start=100):
        escaped = point.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
        source = {"nfs4": "fileserver:/export", "cifs": "//fileserver/share"}.get(fstype, "remote")
        lines.append(f"{i} 27 0:{i} / {escaped} rw,relatime shared:{i} - {fstype} {source} rw,vers=4.2")
    return "\n".join(lines) + "\n"


def test_the_mount_holding_a_path_is_the_longest_and_the_last_one() -> None:
    table = mountinfo(("/srv", "ext4"), ("/srv/nfs", "nfs4"), ("/srv/nfs2", "xfs"), ("/srv/nfs/local", "ext4"),
                      ("/mnt/a share", "cifs"), ("/mnt/over", "nfs"), ("/mnt/over", "tmpfs"))
    assert filesystem_of("/srv/nfs/cxrnode/cxrnode.db", table) == ("/srv/nfs", "nfs4")
    assert filesystem_of("/srv/nfs", table) == ("/srv/nfs", "nfs4")
    assert filesystem_of("/srv/nfs2/cxrnode.db", table) == ("/srv/nfs2", "xfs")  # a prefix, not a parent
    assert filesystem_of("/srv/nfs/local/cxrnode.db", table) == ("/srv/nfs/local", "ext4")
    assert filesystem_of("/mnt/a share/cxrnode.db", table) == ("/mnt/a share", "cifs")  # \040 unescaped
    assert filesystem_of("/mnt/over/cxrnode.db", table) == ("/mnt/over", "tmpfs")  # mounted over the NFS one
    assert filesystem_of("/var/lib/cxrnode/cxrnode.db", table) == ("/", "ext4")
    assert filesystem_of("/x", "garbage\n\n1 2 3 - \n") is None


@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "fuse.sshfs", "9p", "ceph", "glusterfs",
                                    "fuse.glusterfs", "lustre"])
def test_network_filesystems(fstype: str) -> None:
    assert is_network_filesystem(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "fuse.bindfs", "vfat"])
def test_local_filesystems(fstype: str) -> None:
    assert not is_network_filesystem(fstype)


def test_this_machines_real_mount_table_is_read(make_config: Any) -> None:
    """The real /proc/self/mountinfo: the test folder is on a local disk here, so no refusal,
    and the table names a filesystem for it."""
    config = make_config()
    check_sqlite_location(config)  # no exception
    found = filesystem_of(Path(config.node.storage_dir).parent.resolve(), startup.read_mountinfo())
    assert found is not None and not is_network_filesystem(found[1]), found


@pytest.mark.parametrize("fstype", ["nfs4", "cifs", "fuse.sshfs"])
def test_sqlite_on_a_network_filesystem_is_refused(make_config: Any, tmp_path: Path, fstype: str) -> None:
    config = make_config()  # SQLite in storage_dir, not created yet: the folder it will be in counts
    share = str(tmp_path.resolve())
    with pytest.raises(StartupError) as info:
        check_sqlite_location(config, mountinfo(("/srv", "ext4"), (share, fstype)))
    exc = info.value
    assert exc.code == EXIT_NETWORK_FS and exc.key == "node.database_url"
    assert f"({fstype} mounted at {share!r})" in str(exc) and "PostgreSQL" in exc.todo
    # the same storage folder on the share, the SQLite file on a local disk: accepted
    local = make_config(node={"database_url": "sqlite:////var/tmp/cxrnode-test-local.db"})
    check_sqlite_location(local, mountinfo((share, fstype)))
    # PostgreSQL: the storage folder may be on NFS (the shared POSIX store of several hosts)
    pg = make_config(node={"database_url": "postgresql+psycopg://cxrnode@db.example/cxrnode"})
    check_sqlite_location(pg, mountinfo((share, fstype), ("/", "nfs4")))


def test_serve_refuses_sqlite_on_nfs_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path, jobs={"workers": 0}))
    share = str(tmp_path.resolve())
    monkeypatch.setattr(startup, "read_mountinfo", lambda: mountinfo((share, "nfs4")))
    code = main(["serve", "--config", str(cfg)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_NETWORK_FS == 7
    assert len(err) == 1 and err[0].startswith("cxrnode serve: node.database_url: the SQLite index "), err
    assert err[0].endswith("(exit 7)") and "nfs4 mounted at" in err[0]
    assert not (tmp_path / "store" / "cxrnode.db").exists(), "the refused check created the index on the share"


def test_worker_refuses_sqlite_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "cxrnode.toml", node_sections(tmp_path))
    code = main(["worker", "--config", str(cfg)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_CONFIG
    assert len(err) == 1 and err[0].startswith("cxrnode worker: node.database_url: cxrnode worker needs PostgreSQL")
    assert not (tmp_path / "store" / "cxrnode.db").exists()
