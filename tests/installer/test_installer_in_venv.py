"""The programs the installer runs with an installed version's interpreter are a real module
(``python -I -m installer.in_venv``), and doctor's check of the GPU inside the service sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.db import current_revision, head_revision
from installer import doctor


def _in_venv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "installer.in_venv", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cxrnode.toml"
    path.write_text(f'[node]\nstorage_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    return path


def test_in_venv_migrate_head_downgrade(config: Path, tmp_path: Path) -> None:
    head = _in_venv("head")
    assert head.returncode == 0, head.stderr
    assert head.stdout.strip() == head_revision() != ""
    up = _in_venv("migrate", str(config))
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout.splitlines()[-1]) == {"revision": head_revision(), "head": head_revision()}
    url = f"sqlite:///{tmp_path / 'data' / 'cxrnode.db'}"
    assert current_revision(url)[0] == head_revision()
    down = _in_venv("downgrade", str(config), "0001")
    assert down.returncode == 0, down.stderr
    assert current_revision(url)[0] == "0001"


def test_in_venv_render_unit_by_flavour(config: Path) -> None:
    gpu = _in_venv("render-unit", "/opt/cxrnode/bin/cxrnode", str(config), "cxrnode", "gpu")
    cpu = _in_venv("render-unit", "/opt/cxrnode/bin/cxrnode", str(config), "cxrnode", "cpu")
    assert gpu.returncode == 0 and cpu.returncode == 0, gpu.stderr + cpu.stderr
    assert "DeviceAllow=char-nvidia-frontend rw" in gpu.stdout and "PrivateDevices=yes" not in gpu.stdout
    assert "PrivateDevices=yes" in cpu.stdout and "DeviceAllow" not in cpu.stdout


def test_in_venv_unknown_command_fails_clearly() -> None:
    bad = _in_venv("explode")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


GPU_PROPS = {"PrivateDevices": "no", "DevicePolicy": "closed",
             "DeviceAllow": "char-nvidia-frontend rw char-nvidia-uvm rw char-nvidia-caps rw"}
CUDA_LINE = "INFO plugin.drafting.pipeline: loaded model cxr 0.3.1 in 900 ms (providers ['CUDAExecutionProvider', 'CPUExecutionProvider'])"
CPU_LINE = "INFO plugin.drafting.pipeline: loaded model cxr 0.3.1 in 900 ms (providers ['CPUExecutionProvider'])"


@pytest.mark.parametrize(("flavour", "props", "line", "code"), [
    ("gpu", {**GPU_PROPS, "PrivateDevices": "yes", "DeviceAllow": ""}, CPU_LINE, "service.gpu_hidden"),
    ("gpu", GPU_PROPS, CUDA_LINE, "service.gpu_used"),
    ("gpu-headless", GPU_PROPS, CPU_LINE, "service.gpu_not_used"),
    ("gpu", GPU_PROPS, "", "service.gpu_unknown"),
])
def test_doctor_checks_the_gpu_inside_the_service_sandbox(flavour: str, props: dict[str, str], line: str,
                                                           code: str) -> None:
    (check,) = doctor.sandbox_gpu_check("cxrnode.service", flavour, props, line)
    assert check.code == code
    assert check.status == {"service.gpu_used": doctor.OK, "service.gpu_unknown": doctor.WARN}.get(code, doctor.FAIL)


def test_doctor_gpu_sandbox_check_is_silent_for_the_cpu_flavour() -> None:
    assert doctor.sandbox_gpu_check("cxrnode.service", "cpu", {"PrivateDevices": "yes"}, CPU_LINE) == []
