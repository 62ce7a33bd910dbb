"""ONNX Runtime I/O binding of the decoder's KV cache (``ReportGenerator._run_decoder``).

There is no GPU here: the CUDA path is tested up to the provider choice. With
``CUDAExecutionProvider`` requested (and made to look available), the generator binds the
presents to device ``cuda``, the logits to ``cpu`` and uploads host inputs to ``cuda``; the
calls are recorded by a binding double that runs the real graph on CPU, so the drafted text
is checked too. On CPU binding is off by default (slower there); turned on, the real
ONNX Runtime binding API must not change a single token of the shipped bundle."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from onnx_models import runtime
from onnx_models.runtime import ReportGenerator, StudyInput, binding_device

_FROM_NUMPY = ort.OrtValue.ortvalue_from_numpy  # the real one (the CUDA test replaces it)


def _studies() -> list[StudyInput]:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    base = (0.4 + 0.3 * np.sin(5 * xx) * np.cos(3 * yy)).astype(np.float32)
    return [StudyInput(views=[(np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32), "PA"),
                              (np.clip(base.T + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32),
                               "LATERAL")], indication="Cough."),
            StudyInput(views=[(np.clip(1.0 - base, 0, 1).astype(np.float32), "PA")])]


def test_binding_device_follows_the_first_provider() -> None:
    assert binding_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert binding_device(["CPUExecutionProvider"]) == "cpu"
    assert binding_device([]) == "cpu"
    # CUDA present but not first (a caller's explicit order): the cache stays on the host
    assert binding_device(["CPUExecutionProvider", "CUDAExecutionProvider"]) == "cpu"


@pytest.mark.parametrize("beam", [1, 3])
def test_cpu_binding_changes_no_token_of_the_shipped_bundle(beam: int) -> None:
    gen = ReportGenerator("default", threads=1, beam_size=beam)
    assert gen.kv_device == "cpu" and not gen.io_binding  # plain run calls on CPU (faster there)
    studies = _studies()
    plain = gen.generate(studies)
    gen.io_binding = True
    bound = gen.generate(studies)
    assert [(r.findings, r.impression) for r in bound] == [(r.findings, r.impression) for r in plain]
    assert [r.tokens for r in bound] == [r.tokens for r in plain]
    assert all(r.findings for r in bound)


class _Recorder:
    """What the generator bound, by name: (kind, device)."""

    def __init__(self) -> None:
        self.inputs: list[tuple[str, str]] = []
        self.outputs: list[tuple[str, str]] = []
        self.uploads: list[str] = []


class _FakeBinding:
    """An IOBinding double: records the devices asked for and runs the real CPU session."""

    def __init__(self, sess: ort.InferenceSession, rec: _Recorder) -> None:
        self.sess, self.rec = sess, rec
        self.feed: dict[str, np.ndarray] = {}
        self.names: list[str] = []
        self.values: list[ort.OrtValue] = []

    def bind_ortvalue_input(self, name: str, value: ort.OrtValue) -> None:
        self.rec.inputs.append((name, "ortvalue"))
        self.feed[name] = value.numpy()

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:  # pragma: no cover - must not happen on cuda
        self.rec.inputs.append((name, "cpu"))
        self.feed[name] = value

    def bind_output(self, name: str, device_type: str = "cpu", *_: Any) -> None:
        self.rec.outputs.append((name, device_type))
        self.names.append(name)

    def run(self) -> None:
        self.values = [_FROM_NUMPY(np.ascontiguousarray(v))
                       for v in self.sess.run(self.names, self.feed)]

    def get_outputs(self) -> list[ort.OrtValue]:
        return self.values


def test_cuda_requested_binds_the_cache_to_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    real_session = ort.InferenceSession
    rec = _Recorder()
    asked: list[list[str]] = []

    class CudaLooking:
        """An InferenceSession asked for CUDA first: runs on CPU, reports CUDA as its provider."""

        def __init__(self, path: str, sess_options: Any = None, providers: list[str] | None = None) -> None:
            asked.append(list(providers or []))
            self._s = real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self) -> list[str]:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def io_binding(self) -> _FakeBinding:
            return _FakeBinding(self._s, rec)

        def run_with_iobinding(self, io: _FakeBinding) -> None:
            io.run()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._s, name)

    def upload(arr: np.ndarray, device_type: str = "cpu", device_id: int = 0) -> ort.OrtValue:
        rec.uploads.append(device_type)
        return _FROM_NUMPY(arr)

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_gpu_present", lambda: True)
    monkeypatch.setattr(ort, "InferenceSession", CudaLooking)
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(upload))

    gen = ReportGenerator("default", threads=1, beam_size=1)  # no providers given: CUDA chosen
    assert asked and all(p[0] == "CUDAExecutionProvider" for p in asked)
    assert gen.providers[0] == "CUDAExecutionProvider" and gen.kv_device == "cuda" and gen.io_binding
    studies = _studies()[:1]
    text = gen.generate(studies)[0]
    steps = len(text.tokens)
    assert set(rec.outputs) == {("logits", "cpu"), ("present_k", "cuda"), ("present_v", "cuda")}
    assert rec.uploads and set(rec.uploads) == {"cuda"}
    assert all(kind == "ortvalue" for _, kind in rec.inputs)  # never bound from host memory
    assert rec.outputs.count(("present_k", "cuda")) >= steps
    # per step only the new token ids go up; cross_k/v, memory_mask (and cond) once per study
    assert len(rec.uploads) <= rec.outputs.count(("logits", "cpu")) + 6
    monkeypatch.undo()
    ref = ReportGenerator("default", threads=1, beam_size=1).generate(studies)[0]
    assert (text.findings, text.impression, text.tokens) == (ref.findings, ref.impression, ref.tokens)


def test_past_passed_on_as_the_ortvalue_the_decoder_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """With binding on, the presents come back as OrtValues and go into the next step unchanged."""
    gen = ReportGenerator("default", threads=1, beam_size=1)
    gen.io_binding = True
    seen: list[tuple[type, type]] = []
    real = gen._run_decoder

    def spy(feed: dict[str, Any]) -> Any:
        seen.append((type(feed["past_k"]), type(feed["past_v"])))
        return real(feed)

    monkeypatch.setattr(gen, "_run_decoder", spy)
    gen.generate(_studies()[:1], max_tokens=5)
    assert seen[0] == (np.ndarray, np.ndarray) and len(seen) >= 2
    assert all(s == (ort.OrtValue, ort.OrtValue) for s in seen[1:])
