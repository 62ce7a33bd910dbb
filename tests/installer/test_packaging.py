"""Packaging as the Python ecosystem expects (issue 14): SPDX licence with its file, classifiers,
py.typed in every package, ``python -m cxrnode``, a changelog and a written release process."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from installer_helpers import REPO

PACKAGES = ("dicom_node", "onnx_models", "plugin", "gui", "installer")


def test_pyproject_metadata() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]
    assert "Typing :: Typed" in project["classifiers"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639: the expression only
    for pkg in PACKAGES:
        assert (REPO / pkg / "py.typed").is_file(), pkg


def test_python_dash_m_cxrnode() -> None:
    proc = subprocess.run([sys.executable, "-m", "cxrnode", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("cxrnode "), proc.stderr


def test_changelog_and_release_process() -> None:
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert "## [Unreleased]" in changelog and f"## [{version}]" in changelog
    contributing = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert "## Releasing" in contributing and "CHANGELOG.md" in contributing


def test_extras_pick_one_onnx_runtime_and_the_reviewer() -> None:
    """A CPU host, a GPU host and a reviewer desktop each install what they need, nothing that fights."""
    from installer.bundle import runtime_requirements

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = " ".join(project["dependencies"]).lower()
    assert "onnxruntime" not in base and "pyqt6" not in base and "psutil" not in base
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
    assert extras["reviewer"] == ["PyQt6>=6.6"]

    def names(flavour: str) -> set[str]:
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in runtime_requirements(REPO, flavour)[1]}

    assert {"onnxruntime", "pyqt6"} <= names("cpu") and "onnxruntime-gpu" not in names("cpu")
    assert {"onnxruntime-gpu", "pyqt6"} <= names("gpu") and "onnxruntime" not in names("gpu")
    assert "pyqt6" not in names("cpu-headless") and "onnxruntime" in names("cpu-headless")
    assert "pyqt6" not in names("gpu-headless") and "onnxruntime-gpu" in names("gpu-headless")
    # issue 16: the GPU bundle carries the CUDA/cuDNN wheels onnxruntime-gpu needs (its extras)
    for flavour in ("gpu", "gpu-headless"):
        assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]>=") for r in runtime_requirements(REPO, flavour)[1])
    assert not any("[cuda" in r for r in runtime_requirements(REPO, "cpu")[1])
