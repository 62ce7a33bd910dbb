"""The whole life of an installation, as site IT lives it, on this machine:

build a CPU bundle -> unpack it -> ``install.sh`` into a temporary prefix inside a network
namespace with no network at all (pip --no-index) -> start the installed node as a process (as the service user the installer created, when root) ->
``doctor`` passes (a DCMTK storescp stands in for the PACS) -> a study sent with DCMTK
``storescu`` is drafted -> upgrade to a rebuilt bundle (version bumped) keeps config and data ->
roll back -> uninstall keeps data -> uninstall --purge removes it.

The tests run in file order and share one installation (module fixtures).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from installer_helpers import REPO, dcmtk, free_port, offline_prefix

from installer.bundle import sha256_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64"
                       or sys.version_info[:2] != (3, 11),
                       reason="the bundle targets Linux x86_64 CPython 3.11"),
]
WAIT_S = 240.0  # upper bound for waits on background work; never asserted as a duration


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([str(c) for c in cmd], **kw)


def build(out: Path, source: Path | None = None) -> Path:
    cmd = [sys.executable, "-m", "installer", "bundle", "--out", out, "--cpu"]
    if source:
        cmd += ["--source", source]
    proc = run(cmd, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[2/6] downloading" in proc.stdout and "bundle ready" in proc.stdout  # progress shown
    (archive,) = out.glob("*.tar.gz")
    return archive


def unpack(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (folder,) = dest.iterdir()
    return folder


def bump_version(src: Path, version: str) -> None:
    pp = src / "pyproject.toml"
    text = pp.read_text()
    assert 'version = "' in text
    pp.write_text(text.replace(text.split('version = "', 1)[1].split('"', 1)[0], version, 1))


def drafts(storage: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(storage / "cxrnode.db") as db:
        return [(r[0], r[1]) for r in db.execute("select sop_instance_uid, path from drafts order by id")]


def wait_for(pred: Any, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}" + (f"; log:\n{log.read_text()[-3000:]}" if log else ""))


SYSTEM_PYTHON = "/usr/bin/python3.11"


def service_python() -> str | None:
    """A Python 3.11 an unprivileged service user can run (not one under /root, like pyenv's)."""
    runuser = shutil.which("runuser")
    if os.geteuid() != 0 or not runuser or not shutil.which("useradd") or not Path(SYSTEM_PYTHON).is_file():
        return None
    ok = subprocess.run([runuser, "-u", "nobody", "--", SYSTEM_PYTHON, "-I", "-c", "import venv"], capture_output=True)
    return SYSTEM_PYTHON if ok.returncode == 0 else None


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    # not under pytest's basetemp (0700 for root): the service user must reach the prefix
    path = Path(tempfile.mkdtemp(prefix="cxrnode-offline-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # two bundles and two installs: about 2 GB


@pytest.fixture(scope="module")
def bundle1(work: Path) -> Path:
    return build(work / "b1")


@pytest.fixture(scope="module")
def pacs(work: Path) -> Iterator[dict[str, Any]]:
    """DCMTK storescp standing in for the PACS."""
    storescp = dcmtk("storescp")
    if not storescp:
        pytest.skip("DCMTK storescp not installed (apt package dcmtk)")
    port = free_port()
    out = work / "pacs"
    out.mkdir()
    proc = subprocess.Popen([storescp, "--aetitle", "PACS", "--output-directory", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield {"port": port, "dir": out}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def installed(work: Path, bundle1: Path, pacs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    folder = unpack(bundle1, work / "unpacked1")
    prefix = work / "prefix"
    port = free_port()
    # as root the installer creates a system user (a unique one, removed by --purge or below) and
    # the node runs as that user; that needs a Python it can run, e.g. Debian's python3.11
    python = service_python()
    user = f"cxrt{os.getpid()}" if python else None
    user_args = ["--user", user] if user else ["--no-user"]
    cmd = [*offline_prefix(), folder / "install.sh", "--prefix", prefix, "--no-systemd", *user_args,
           "--host", "127.0.0.1", "--port", str(port), "--ae-title", "CXRNODE_T",
           "--destination", f"pacs=PACS@127.0.0.1:{pacs['port']}", "--reviewer", "cxrnoacct:Doe^Jane:Test Hospital",
           "--set", "study.quiet_period_s=1", "--set", "jobs.backoff_s=1", "--set", "model.beam_size=1"]
    proc = run(cmd, env={**os.environ, "PYTHON": python or sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield {"prefix": prefix, "port": port, "bin": prefix / "bin" / "cxrnode", "user": user, "folder": folder,
           "config": prefix / "etc" / "cxrnode" / "cxrnode.toml", "storage": prefix / "var" / "lib" / "cxrnode",
           "install_output": proc.stdout, "offline": bool(offline_prefix())}
    if user and _user_exists(user):  # the purge test failed before removing it
        subprocess.run(["userdel", user], check=False)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class NodeProcess:
    def __init__(self, site: dict[str, Any], log: Path):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        as_user: dict[str, Any] = {"user": site["user"], "group": site["user"], "extra_groups": []} if site["user"] else {}
        self.proc = subprocess.Popen([str(site["bin"]), "serve", "--config", str(site["config"])], **as_user,
                                     stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=str(site["storage"]))
        wait_for(lambda: "listening on" in log.read_text() or self.proc.poll() is not None, "the node to listen", log)
        assert self.proc.poll() is None, log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def doctor(site: dict[str, Any], *extra: str) -> dict[str, Any]:
    proc = run([site["bin"], "doctor", "--config", site["config"], "--json", *extra])
    out = json.loads(proc.stdout)
    out["returncode"] = proc.returncode
    out["by_name"] = {c["name"]: c for c in out["checks"]}
    return out


def test_bundle_is_complete_and_checksummed(bundle1: Path) -> None:
    side = Path(f"{bundle1}.sha256").read_text().split()
    assert side == [sha256_file(bundle1), bundle1.name]
    with tarfile.open(bundle1) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if "/" in n}
        info = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("BUNDLE.json"))).read())
        sh = next(m for m in tar.getmembers() if m.name.endswith("/install.sh"))
        assert sh.mode & 0o111, "install.sh must be executable"
    assert {"install.sh", "INSTALL.md", "cxrnode.example.toml", "SHA256SUMS", "BUNDLE.json", "wheelhouse/requirements.txt"} <= names
    wheels = [n for n in names if n.startswith("wheelhouse/") and n.endswith(".whl")]
    assert any(n.startswith("wheelhouse/onnxruntime-") for n in wheels)
    assert not any(n.startswith("wheelhouse/onnxruntime_gpu") for n in wheels), "CPU flavour must not ship the GPU build"
    assert any(n.startswith("wheelhouse/pip-") for n in wheels) and any(n.startswith("wheelhouse/cxrnode-") for n in wheels)
    assert all(("manylinux" in n or "-none-any" in n) for n in wheels), "only portable wheels"
    assert info["flavour"] == "cpu" and info["python"] == "cp311"
    assert len(info["source"]["commit"]) == 40 and isinstance(info["source"]["dirty"], bool)
    assert any(m["name"] == "default" for m in info["models_in_wheel"]), "the default model bundle ships in the wheel"


def test_install_layout(installed: dict[str, Any]) -> None:
    p: Path = installed["prefix"]
    out = installed["install_output"]
    assert "[8/8]" in out
    user = installed["user"]
    if user:
        import grp
        import pwd

        assert f"created system user {user!r}" in out
        assert pwd.getpwnam(user).pw_shell.endswith("nologin")
        assert grp.getgrgid(installed["config"].stat().st_gid).gr_name == user, "config readable by the service group"
        assert pwd.getpwuid(installed["storage"].stat().st_uid).pw_name == user, "storage owned by the service user"
        assert pwd.getpwuid((installed["storage"] / "cxrnode.db").stat().st_uid).pw_name == user
        assert "reviewer 'cxrnoacct' has no account on this machine" in out
    else:
        assert "skipped (--no-user given)" in out
    assert installed["bin"].is_symlink() and os.access(installed["bin"], os.X_OK)
    assert run([installed["bin"], "--version"]).stdout.strip() == "cxrnode 0.1.0"
    cfg = installed["config"]
    assert cfg.stat().st_mode & 0o777 == 0o640
    from dicom_node.config import load_config

    c = load_config(cfg, env={})
    assert (c.node.ae_title, c.node.port, c.node.storage_dir) == ("CXRNODE_T", installed["port"], str(installed["storage"]))
    assert c.destinations[0].name == "pacs" and c.study.quiet_period_s == 1.0
    assert c.reviewers[0].display_name == "Doe^Jane"
    assert installed["storage"].stat().st_mode & 0o7777 == 0o2770, "storage: service group only, setgid"
    from dicom_node.db import current_revision

    rev, head = current_revision(c.node.resolved_database_url())
    assert rev == head and rev, "database migrated to head"
    unit = p / "lib" / "cxrnode" / "cxrnode.service"
    text = unit.read_text()
    if installed["user"]:
        assert f"User={installed['user']}" in text.splitlines()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths={installed['storage']}",
                 "PrivateTmp=yes", "Restart=on-failure", f"ExecStart={installed['bin']} serve --config {cfg}"):
        assert line in text.splitlines(), line
    if shutil.which("systemd-analyze"):
        proc = run(["systemd-analyze", "verify", unit])
        assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    desktop = (p / "share" / "applications" / "cxrnode-review.desktop").read_text()
    assert f"Exec={installed['bin']} review --config {cfg}" in desktop
    manifest = json.loads((p / "lib" / "cxrnode" / "install.json").read_text())
    assert (p / "lib" / "cxrnode" / "current").resolve() == p / "lib" / "cxrnode" / "versions" / manifest["current"]
    again = run([installed["bin"], "install", "--bundle", p, "--prefix", p, "--no-systemd"])
    assert again.returncode == 2 and "already installed" in again.stderr


def test_a_failed_install_leaves_no_program_behind(installed: dict[str, Any], work: Path) -> None:
    help_text = run([installed["folder"] / "install.sh", "--help"], env={**os.environ, "PYTHON": sys.executable})
    assert help_text.returncode == 0 and "--prefix" in help_text.stdout and "--destination" in help_text.stdout
    prefix = work / "failing"
    dead_db = f"postgresql+psycopg://cxrnode@127.0.0.1:{free_port()}/cxrnode"  # nothing listens there
    proc = run([*offline_prefix(), installed["folder"] / "install.sh", "--prefix", prefix, "--no-systemd", "--no-user",
                "--database-url", dead_db], env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode != 0
    assert "installation failed: removing the program files" in proc.stdout, proc.stdout + proc.stderr
    assert not (prefix / "bin" / "cxrnode").exists() and not (prefix / "lib" / "cxrnode" / "current").is_symlink()
    assert not list((prefix / "lib" / "cxrnode" / "versions").iterdir())
    assert (prefix / "etc" / "cxrnode" / "cxrnode.toml").is_file(), "the configuration is kept for the next try"


def test_installed_node_passes_doctor_and_drafts_a_study(installed: dict[str, Any], work: Path) -> None:
    storescu = dcmtk("storescu")
    if not storescu:
        pytest.skip("DCMTK storescu not installed (apt package dcmtk)")
    py = installed["prefix"] / "lib" / "cxrnode" / "current" / "venv" / "bin" / "python"
    samples = Path(run([py, "-c", "import plugin.drafting.samples as s, pathlib; print(pathlib.Path(s.__file__).parent)"]).stdout.strip())
    files = sorted(samples.rglob("*.dcm"))
    assert files, f"no sample study shipped in {samples}"
    node = NodeProcess(installed, work / "node1.log")
    try:
        report = doctor(installed)
        failing = {n: c for n, c in report["by_name"].items() if c["status"] == "FAIL"}
        assert report["returncode"] == 0 and not failing, json.dumps(failing, indent=1)
        assert report["by_name"]["listening port"]["data"]["running"] is True
        assert report["by_name"]["destination pacs"]["status"] == "OK"
        assert report["by_name"]["inference"]["status"] == "OK"
        assert report["by_name"]["model bundle"]["status"] == "OK"
        proc = run([storescu, "-aet", "MODALITY", "-aec", "CXRNODE_T", "127.0.0.1", str(installed["port"]), *files])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_for(lambda: len(drafts(installed["storage"])) >= 1, "the study to be drafted", node.log)
        sop, rel = drafts(installed["storage"])[0]
        assert (installed["storage"] / rel).is_file()
        status = run([installed["bin"], "status", "--config", installed["config"], "--json"])
        assert status.returncode == 0 and sop in status.stdout
        env = {k: v for k, v in os.environ.items() if k != "CXRNODE_CONFIG"}
        implicit = subprocess.run([installed["bin"], "status", "--json"], env=env, capture_output=True, text=True,
                                  timeout=120)
        assert implicit.returncode == 0 and sop in implicit.stdout, "status finds the installation's config by itself"
    finally:
        node.stop()
    assert node.proc.returncode == 0, node.log.read_text()[-2000:]


def test_upgrade_to_rebuilt_bundle_keeps_data_and_rolls_back(installed: dict[str, Any], work: Path) -> None:
    before = drafts(installed["storage"])
    config_before = installed["config"].read_bytes()
    src = work / "src2"
    files = run(["git", "-C", REPO, "ls-files", "--cached", "--others", "--exclude-standard"]).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    bump_version(src, "0.1.1")
    unit_template = src / "installer" / "templates" / "cxrnode.service"
    unit_template.write_text(unit_template.read_text().replace("[Service]", "[Service]\n# hardened further in 0.1.1"))
    archive2 = build(work / "b2", source=src)
    unit = installed["prefix"] / "lib" / "cxrnode" / "cxrnode.service"
    assert "0.1.1" not in unit.read_text()
    proc = run([*offline_prefix(), installed["bin"], "upgrade", "--bundle", archive2])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run([installed["bin"], "--version"]).stdout.strip() == "cxrnode 0.1.1"
    assert "# hardened further in 0.1.1" in unit.read_text(), "the unit comes from the version now current"
    assert installed["config"].read_bytes() == config_before, "upgrade must not touch the configuration"
    assert drafts(installed["storage"]) == before and before, "upgrade must keep the data"
    assert list((installed["storage"] / "backups").glob("cxrnode-before-*.db")), "database backed up before migrating"
    node = NodeProcess(installed, work / "node2.log")  # the new version serves the old data
    try:
        report = doctor(installed, "--no-inference")
        assert report["returncode"] == 0, json.dumps(report["checks"], indent=1)
        assert report["by_name"]["database"]["status"] == "OK"
    finally:
        node.stop()
    proc = run([installed["bin"], "upgrade", "--rollback"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run([installed["bin"], "--version"]).stdout.strip() == "cxrnode 0.1.0"
    assert drafts(installed["storage"]) == before
    assert "0.1.1" not in unit.read_text()


def test_uninstall_keeps_data_and_purge_removes_it(installed: dict[str, Any]) -> None:
    p: Path = installed["prefix"]
    proc = run([installed["bin"], "uninstall"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not installed["bin"].exists() and not installed["bin"].is_symlink()
    assert not (p / "lib" / "cxrnode").exists()
    assert not (p / "share" / "applications" / "cxrnode-review.desktop").exists()
    assert installed["config"].is_file() and (installed["storage"] / "cxrnode.db").is_file()
    assert drafts(installed["storage"]), "plain uninstall keeps the data"
    proc = run([sys.executable, "-m", "installer", "uninstall", "--prefix", p, "--purge"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not installed["storage"].exists() and not installed["config"].parent.exists()
    if installed["user"]:
        assert not _user_exists(installed["user"]), "purge removes the system user the installer created"
