"""The shipped templates and the installer's pure parts: example config, config rendering,
the systemd unit (checked by systemd-analyze), the desktop launcher, install.sh, argument errors."""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from installer_helpers import REPO, example_config_text

from dicom_node.config import SECTIONS, TABLE_ARRAYS, Config, ConfigError, load_config
from installer import accounts, site_config
from installer import layout as lay
from installer import unit as svc_unit
from installer.bundle import (
    BundleError,
    runtime_requirements,
    template_text,
    verify_folder,
    write_sha256sums,
)


def test_example_config_documents_every_key_with_its_default(tmp_path: Path) -> None:
    p = tmp_path / "example.toml"
    p.write_text(example_config_text())
    loaded = load_config(p, env={})
    assert dataclasses.replace(loaded, source="") == Config(), "example values must be the defaults"
    data = tomllib.loads(example_config_text())
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name in data[section], f"[{section}] {f.name} missing from the example"
    for section, cls in TABLE_ARRAYS.items():
        block = example_config_text().split(f"# [[{section}]]\n", 1)[1]
        for f in dataclasses.fields(cls):
            assert re.search(rf"^# {f.name} = ", block, re.M), f"[[{section}]] {f.name} not documented"


def test_example_config_is_generated_from_the_config_code() -> None:
    from installer.example_config import render

    assert example_config_text() == render(), (
        "installer/templates/cxrnode.example.toml is out of date with dicom_node/config.py; regenerate it: "
        "python -m installer.example_config > installer/templates/cxrnode.example.toml")


def test_render_config_applies_site_answers_and_keeps_comments(tmp_path: Path) -> None:
    values = {
        "node": {"ae_title": "SITE_CXR", "port": 11200, "storage_dir": str(tmp_path / "data")},
        "pipeline": {"indication_sources": ["ReasonForStudy"]},  # replaces a multi-line array
        "model": {"providers": ["CPUExecutionProvider"]},
    }
    tables = {"destinations": [site_config.parse_destination("pacs=PACS@10.0.0.5:104,send=drafts_and_signed")],
              "reviewers": [site_config.parse_reviewer("jdoe:Doe^Jane:General Hospital")]}
    text = site_config.render_config(example_config_text(), values, tables)
    c = site_config.validate_config_text(text)
    assert (c.node.ae_title, c.node.port, c.node.storage_dir) == ("SITE_CXR", 11200, str(tmp_path / "data"))
    assert c.pipeline.indication_sources == ("ReasonForStudy",)
    assert c.model.providers == ("CPUExecutionProvider",)
    assert c.destinations[0].send == "drafts_and_signed" and c.destinations[0].port == 104
    assert c.reviewers[0].organisation == "General Hospital"
    assert "# Our AE title" in text  # documentation kept


def test_render_config_rejects_a_bad_answer_naming_the_key() -> None:
    text = site_config.render_config(example_config_text(), {"node": {"port": 70000}}, {})
    with pytest.raises(ConfigError, match="node.port"):
        site_config.validate_config_text(text)


@pytest.mark.parametrize("bad", ["pacs", "pacs=PACS@host", "pacs=PACS@host:104,bogus", "=PACS@h:1"])
def test_destination_flag_errors_are_clear(bad: str) -> None:
    with pytest.raises(lay.InstallError, match="--destination"):
        site_config.parse_destination(bad)


def test_reviewer_flag_errors_are_clear() -> None:
    with pytest.raises(lay.InstallError, match="--reviewer"):
        site_config.parse_reviewer("onlyuser")


def _unit(tmp_path: Path, port: int = 11112) -> str:
    exe = tmp_path / "bin" / "cxrnode"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return svc_unit.render_unit(exe, tmp_path / "etc" / "cxrnode.toml", tmp_path / "data", "root", port)


def test_unit_is_hardened(tmp_path: Path) -> None:
    unit = _unit(tmp_path)
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(unit)
    svc = cp["Service"]
    assert svc["User"] == "root" and svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["PrivateTmp"] == "yes"
    assert svc["ReadWritePaths"] == str(tmp_path / "data"), "only the storage folder is writable"
    assert svc["Restart"] == "on-failure"
    # startup errors a restart cannot fix stop the restart loop (dicom_node.startup exit codes)
    from dicom_node.startup import EXIT_CONFIG, EXIT_NETWORK_FS

    assert set(svc["RestartPreventExitStatus"].split()) == {str(EXIT_CONFIG), str(EXIT_NETWORK_FS)}
    assert svc["ExecStart"].endswith(f"serve --config {tmp_path / 'etc' / 'cxrnode.toml'}")
    assert svc["CapabilityBoundingSet"] == "" and svc["AmbientCapabilities"] == ""
    # issue 13: system calls, /proc and resources bounded
    assert svc["SystemCallFilter"] == "@system-service" and svc["SystemCallErrorNumber"] == "EPERM"
    assert svc["ProtectProc"] == "invisible"
    assert svc["MemoryMax"] == svc_unit.UNIT_MEMORY_MAX and svc["MemoryHigh"] == svc_unit.UNIT_MEMORY_HIGH
    assert int(svc["TasksMax"]) == svc_unit.UNIT_TASKS_MAX
    assert svc["UMask"] == "0007"
    # caches (ONNX Runtime's SQLite file) are per host, never in the shared storage folder (home)
    assert svc["CacheDirectory"] == "cxrnode" and "XDG_CACHE_HOME=%C/cxrnode" in unit
    low = _unit(tmp_path, port=104)
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in low, "port 104 needs the bind capability"
    assert svc["PrivateDevices"] == "yes" and "DeviceAllow" not in svc, "the CPU flavour sees no devices"


@pytest.mark.parametrize("flavour", ["gpu", "gpu-headless"])
def test_gpu_unit_lets_the_service_open_the_nvidia_devices(tmp_path: Path, flavour: str) -> None:
    """Issue 16: PrivateDevices=yes hid /dev/nvidia* from the GPU flavour under systemd (it ran on
    the CPU while doctor, outside the unit, saw a GPU). Devices closed except NVIDIA's."""
    exe = tmp_path / "bin" / "cxrnode"
    text = svc_unit.render_unit(exe, tmp_path / "c.toml", tmp_path / "data", "root", 11112, flavour)
    lines = [ln.strip() for ln in text.splitlines()]
    assert "PrivateDevices=yes" not in lines and "PrivateDevices=no" in lines
    assert "DevicePolicy=closed" in lines
    allowed = {ln.split("=", 1)[1] for ln in lines if ln.startswith("DeviceAllow=")}
    assert allowed == {"char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"}
    assert "ProtectSystem=strict" in lines and "NoNewPrivileges=yes" in lines, "the rest of the hardening stays"
    cpu = svc_unit.render_unit(exe, tmp_path / "c.toml", tmp_path / "data", "root", 11112, "cpu-headless")
    assert "PrivateDevices=yes" in cpu.splitlines() and "DeviceAllow" not in cpu


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed (apt package systemd)")
@pytest.mark.parametrize("port", [11112, 104])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, port: int) -> None:
    unit = tmp_path / "cxrnode.service"
    unit.write_text(_unit(tmp_path, port))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cxrnode.service" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace(f"ExecStart={tmp_path}", "ExecStart=relative"))
    assert subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True).returncode != 0


def test_desktop_launcher(tmp_path: Path) -> None:
    text = svc_unit.render_template("cxrnode-review.desktop", bin="/opt/x/bin/cxrnode", config="/etc/cxrnode/cxrnode.toml")
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(text)
    entry = cp["Desktop Entry"]
    assert entry["Type"] == "Application"
    assert entry["Exec"] == "/opt/x/bin/cxrnode review --config /etc/cxrnode/cxrnode.toml"
    assert entry["Terminal"] == "false"
    validator = shutil.which("desktop-file-validate")
    if validator:
        p = tmp_path / "cxrnode-review.desktop"
        p.write_text(text)
        proc = subprocess.run([validator, str(p)], capture_output=True, text=True)
        assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout


def test_install_sh_is_valid_posix_shell() -> None:
    script = REPO / "installer" / "templates" / "install.sh"
    assert os.stat(script).st_mode & stat.S_IXUSR
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert template_text("install.sh").startswith("#!/bin/sh")


def test_install_sh_without_a_wheelhouse_says_so(tmp_path: Path) -> None:
    shutil.copy(REPO / "installer" / "templates" / "install.sh", tmp_path / "install.sh")
    proc = subprocess.run(["sh", str(tmp_path / "install.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no cxrnode wheel" in proc.stderr


@pytest.mark.parametrize("flavour,want,unwanted", [("cpu", "onnxruntime>=", "onnxruntime-gpu"),
                                                   ("gpu", "onnxruntime-gpu[cuda,cudnn]>=", None)])
def test_flavour_picks_onnxruntime(flavour: str, want: str, unwanted: str | None) -> None:
    version, reqs = runtime_requirements(REPO, flavour)
    assert version
    assert any(r.startswith(want) for r in reqs)
    if unwanted:
        assert not any(r.startswith(unwanted) for r in reqs)
    with pytest.raises(BundleError, match="flavour"):
        runtime_requirements(REPO, "tpu")


def test_bundle_verification_catches_a_changed_file(tmp_path: Path) -> None:
    folder = tmp_path / "b"
    (folder / "wheelhouse").mkdir(parents=True)
    (folder / "wheelhouse" / "x.whl").write_bytes(b"wheel")
    (folder / "BUNDLE.json").write_text('{"format": 1, "name": "cxrnode"}')
    write_sha256sums(folder)
    assert verify_folder(folder)["name"] == "cxrnode"
    (folder / "wheelhouse" / "x.whl").write_bytes(b"wheeL")
    with pytest.raises(BundleError, match="x.whl does not match"):
        verify_folder(folder)
    (folder / "wheelhouse" / "x.whl").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_folder(folder)


def test_bundle_cli_rejects_a_foreign_source(tmp_path: Path) -> None:
    from installer.cli import main

    assert main(["bundle", "--out", str(tmp_path / "o"), "--source", str(tmp_path)]) == 2


def test_uninstall_of_nothing_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from installer.cli import main

    assert main(["uninstall", "--prefix", str(tmp_path)]) == 2
    assert "not installed" in capsys.readouterr().err


def test_prompts_fill_only_missing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["MY_AE", "notaport", "11300", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(answers))
    values: dict[str, dict[str, object]] = {"node": {"storage_dir": "/srv/cxr"}}
    site_config.prompt_answers(values)
    assert values["node"] == {"ae_title": "MY_AE", "port": 11300, "storage_dir": "/srv/cxr"}


def test_installer_commands_do_not_load_qt(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\nstorage_dir = "{tmp_path / "data"}"\nport = 0\n')
    code = ("import sys; from installer.cli import main; rc = main(['doctor', '--config', sys.argv[1], "
            "'--no-inference']); print('QT' if 'PyQt6' in sys.modules else 'NOQT', rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip().splitlines()[-1].startswith("NOQT"), proc.stdout + proc.stderr


def test_a_python_the_service_user_cannot_run_is_refused() -> None:
    base = getattr(sys, "_base_executable", sys.executable)
    if os.geteuid() != 0 or not shutil.which("runuser"):
        pytest.skip("needs root and runuser")
    can = subprocess.run(["runuser", "-u", "nobody", "--", base, "-I", "-c", "pass"], capture_output=True).returncode == 0
    if can:
        accounts.check_interpreter_for_services()  # a system-wide Python passes
    else:
        with pytest.raises(lay.InstallError, match="PYTHON=/usr/bin/python3.11"):
            accounts.check_interpreter_for_services()


def test_safe_extract_refuses_escaping_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    from installer.bundle import safe_extract

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # the path taken on Python < 3.11.4
    (tmp_path / "dest").mkdir()
    with pytest.raises(BundleError, match="refusing"):
        safe_extract(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()
