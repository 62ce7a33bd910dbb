"""Issue 13, items 7 and 8 (installer side), each performing the attack:

* ``cd evil && sh ../bundle/install.sh`` must not run ``evil/installer/install.py`` (or
  ``evil/venv.py``) as root: the installer runs ``python -P -s -m`` from the bundle's own wheel,
  the interpreter probe and ``python -m venv`` run with ``-I``;
* ``verify_folder`` refuses files not in SHA256SUMS (an extra wheel pip would pick up), symlinks
  and listed paths leaving the folder; a bundle folder other accounts can change is copied
  before it is verified and used;
* ``chown`` never follows a symlink planted in the data folder (``cxrnode.db-x -> a root file``);
* ``install.json`` is written 0600 whatever the umask and without the database password; the
  configuration 0640, never through a planted symlink.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from installer_helpers import REPO

from installer import accounts, site_config, venv
from installer import install as inst
from installer import layout as lay
from installer.bundle import BundleError, open_bundle, verify_folder, write_sha256sums

NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changes file ownership: needs root (as in CI)")


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


# -- install.sh and the working directory -----------------------------------------------------

MARK = "import pathlib, sys; pathlib.Path({path!r}).write_text({what!r})"


def _fake_bundle(root: Path, marker: Path) -> Path:
    """A bundle folder with the real install.sh and a stand-in cxrnode wheel whose
    installer.install only records that it ran (and with which sys.path)."""
    bundle = root / "bundle"
    (bundle / "wheelhouse").mkdir(parents=True)
    shutil.copy(REPO / "installer" / "templates" / "install.sh", bundle / "install.sh")
    with zipfile.ZipFile(bundle / "wheelhouse" / "cxrnode-0.0.0-py3-none-any.whl", "w") as z:
        z.writestr("installer/__init__.py", "")
        z.writestr("installer/install.py",
                   "import json, pathlib, sys\n"
                   f"pathlib.Path({str(marker)!r}).write_text(json.dumps({{'argv': sys.argv[1:], 'path': sys.path}}))\n")
    return bundle


def _evil_folder(root: Path, marker: Path) -> Path:
    evil = root / "evil"
    (evil / "installer").mkdir(parents=True)
    (evil / "installer" / "__init__.py").write_text("")
    (evil / "installer" / "install.py").write_text(MARK.format(path=str(marker) + ".installer", what="pwned"))
    (evil / "venv.py").write_text(MARK.format(path=str(marker) + ".venv", what="pwned"))
    return evil


def test_install_sh_runs_the_bundles_installer_not_the_working_directorys(tmp_path: Path) -> None:
    ran = tmp_path / "ran.json"
    pwned = tmp_path / "pwned"
    bundle = _fake_bundle(tmp_path, ran)
    evil = _evil_folder(tmp_path, pwned)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "venv.py")}
    proc = subprocess.run(["sh", "../bundle/install.sh", "--no-systemd", "--prefix", "x"], cwd=evil, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not Path(f"{pwned}.installer").exists(), "evil/installer/install.py ran"
    assert not Path(f"{pwned}.venv").exists(), "evil/venv.py ran (the interpreter probe)"
    seen = json.loads(ran.read_text())
    assert seen["argv"] == ["--bundle", str(bundle.resolve()), "--no-systemd", "--prefix", "x"]
    assert str(evil) not in seen["path"] and "" not in seen["path"] and "." not in seen["path"]
    assert seen["path"][0].endswith(".whl"), seen["path"][:3]


def test_install_sh_through_a_symlinked_path(tmp_path: Path) -> None:
    ran = tmp_path / "ran.json"
    bundle = _fake_bundle(tmp_path, ran)
    (tmp_path / "link").symlink_to(bundle)
    proc = subprocess.run(["sh", str(tmp_path / "link" / "install.sh")], cwd="/", capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "CDPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(ran.read_text())["argv"] == ["--bundle", str(bundle.resolve())]


def test_create_venv_does_not_import_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pwned = tmp_path / "pwned"
    evil = _evil_folder(tmp_path, pwned)
    wheelhouse = tmp_path / "b" / "wheelhouse"
    wheelhouse.mkdir(parents=True)
    for name in ("pip-0-py3-none-any.whl", "cxrnode-0-py3-none-any.whl"):
        (wheelhouse / name).write_bytes(b"not a wheel")
    (wheelhouse / "requirements.txt").write_text("")
    monkeypatch.chdir(evil)
    with pytest.raises(lay.InstallError, match="pip install failed"):  # the stand-in pip wheel is junk
        venv.create_venv(tmp_path / "b", {"python": "cp311"}, tmp_path / "venv")
    assert not Path(f"{pwned}.venv").exists(), "python -m venv imported evil/venv.py"
    assert (tmp_path / "venv" / "bin" / "python").exists()


# -- the bundle's checksum list --------------------------------------------------------------


def _bundle_folder(root: Path) -> Path:
    folder = root / "b"
    (folder / "wheelhouse").mkdir(parents=True)
    (folder / "wheelhouse" / "cxrnode-1.0-py3-none-any.whl").write_bytes(b"ours")
    (folder / "wheelhouse" / "requirements.txt").write_text("numpy==1\n")
    (folder / "BUNDLE.json").write_text('{"format": 1, "name": "cxrnode"}')
    write_sha256sums(folder)
    return folder


def test_verify_folder_refuses_a_wheel_not_in_the_checksum_list(tmp_path: Path) -> None:
    folder = _bundle_folder(tmp_path)
    assert verify_folder(folder)["name"] == "cxrnode"
    planted = folder / "wheelhouse" / "cxrnode-9.9-py3-none-any.whl"  # create_venv would take the newest
    planted.write_bytes(b"theirs")
    with pytest.raises(BundleError, match="wheelhouse/cxrnode-9.9-py3-none-any.whl is not in SHA256SUMS"):
        verify_folder(folder)
    planted.unlink()
    (folder / "wheelhouse" / "sub").mkdir()
    (folder / "wheelhouse" / "sub" / "numpy-2-py3-none-any.whl").write_bytes(b"theirs")
    with pytest.raises(BundleError, match="sub/numpy-2-py3-none-any.whl is not in SHA256SUMS"):
        verify_folder(folder)


def test_verify_folder_refuses_symlinks_and_paths_out_of_the_folder(tmp_path: Path) -> None:
    folder = _bundle_folder(tmp_path)
    outside = tmp_path / "outside.whl"
    outside.write_bytes(b"x")
    link = folder / "wheelhouse" / "link.whl"
    link.symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        verify_folder(folder)
    link.unlink()
    sums = folder / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  ../outside.whl\n")
    with pytest.raises(BundleError, match="malformed"):
        verify_folder(folder)


@root_only
def test_a_bundle_folder_others_can_change_is_installed_from_a_private_copy(tmp_path: Path) -> None:
    folder = _bundle_folder(tmp_path)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    used, _ = open_bundle(folder, work, progress=lambda _m: None)
    assert used == folder.resolve()  # root's own folder is used in place
    os.chown(folder / "wheelhouse", NOBODY, NOBODY)  # another account could swap a wheel after the check
    notes: list[str] = []
    used, _ = open_bundle(folder, work, progress=notes.append)
    assert used.parent == work and "private copy" in notes[0] and "uid 65534" in notes[0]
    assert (used / "wheelhouse" / "cxrnode-1.0-py3-none-any.whl").read_bytes() == b"ours"


# -- chown and symlinks -----------------------------------------------------------------------


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder where the service user planted cxrnode.db-x -> a root-owned file."""
    secret = tmp_path / "root-only"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    storage = tmp_path / "data"
    (storage / "instances").mkdir(parents=True)
    (storage / "cxrnode.db").write_bytes(b"")
    (storage / "cxrnode.db-x").symlink_to(secret)
    (storage / "instances" / "dir-link").symlink_to(tmp_path)
    return storage, secret


@root_only
def test_chown_tree_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    storage, secret = _planted(tmp_path)
    accounts.chown_tree(storage, "nobody", "nogroup")
    assert secret.stat().st_uid == 0 and secret.stat().st_gid == 0, "the symlink handed a root file over"
    assert tmp_path.stat().st_uid == 0, "chown descended through a directory symlink"
    assert (storage / "cxrnode.db").stat().st_uid == NOBODY and storage.stat().st_uid == NOBODY
    assert os.lstat(storage / "cxrnode.db-x").st_uid == NOBODY  # the link itself


@root_only
def test_chown_database_after_a_migration_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    storage, secret = _planted(tmp_path)
    inst._chown_database({"created_user": True, "storage_dir": str(storage), "user": "nobody"}, group="nogroup")
    assert secret.stat().st_uid == 0
    assert (storage / "cxrnode.db").stat().st_uid == NOBODY


# -- install.json and the configuration -------------------------------------------------------


def test_install_json_is_0600_and_keeps_no_password(tmp_path: Path, umask0: None) -> None:
    layout = lay.Layout(tmp_path)
    layout.root.mkdir(parents=True)
    url = "postgresql+psycopg://cxrnode:s3cr%40t@db.example:5432/cxrnode"
    lay.write_manifest(layout, {"database_url": url, "config": "c"})
    st = layout.manifest.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    text = layout.manifest.read_text()
    assert "s3cr" not in text and json.loads(text)["database_url"] == "postgresql+psycopg://cxrnode:***@db.example:5432/cxrnode"
    # the copy a plain uninstall leaves beside the configuration, too
    kept = tmp_path / "kept.json"
    lay.write_manifest(layout, {"database_url": url}, kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and "s3cr" not in kept.read_text()


@pytest.mark.parametrize("url,shown", [
    ("sqlite:////var/lib/cxrnode/cxrnode.db", "sqlite:////var/lib/cxrnode/cxrnode.db"),
    ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql+psycopg://u:p:q@h:1/db?sslmode=require", "postgresql+psycopg://u:***@h:1/db?sslmode=require"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert lay.redact_url(url) == shown


def test_config_is_0640_whatever_the_umask_and_never_written_through_a_symlink(tmp_path: Path, umask0: None) -> None:
    layout = lay.Layout(tmp_path)
    layout.config_dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (layout.config_dir / "cxrnode.toml.new").symlink_to(victim)
    site_config.write_config(layout, "[node]\n", None)
    assert victim.read_text() == "untouched\n"
    assert stat.S_IMODE(layout.config.stat().st_mode) == 0o640 and not layout.config.is_symlink()
    assert layout.config.read_text() == "[node]\n"
