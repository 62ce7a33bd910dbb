"""The GPU bundle's CUDA/cuDNN wheels are loaded before a CUDA session (issue 16); no GPU here, so
ONNX Runtime's loader is replaced by a recorder: what is tested is when it is called."""

from __future__ import annotations

import logging

import pytest

from onnx_models import runtime


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda *a, **k: seen.append("preload"), raising=False)
    monkeypatch.setattr(runtime, "_LOGGED", set())
    return seen


def test_cuda_libraries_preloaded_once_when_cuda_is_chosen(calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    assert runtime.choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.choose_providers(["CUDAExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert calls == ["preload"]


def test_no_preload_on_a_cpu_host(calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: False)
    assert runtime.choose_providers() == ["CPUExecutionProvider"]
    assert runtime.choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert calls == []


def test_a_failing_preload_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(runtime.ort, "preload_dlls", boom, raising=False)
    monkeypatch.setattr(runtime, "_LOGGED", set())
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    with caplog.at_level(logging.INFO, logger=runtime.log.name):
        assert runtime.choose_providers()[0] == "CUDAExecutionProvider"
    assert "libcudnn.so.9" in caplog.text
