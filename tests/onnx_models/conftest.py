"""Fixtures for the model tests: a tiny synthetic dataset in the cxrnode layout, a model
trained on it for two steps, and that model exported to a bundle (session-scoped: built once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx_synth import make_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("iu_tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from onnx_models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    return train(TrainConfig(data=str(tiny_data), out=str(out), epochs=1, batch_size=4, max_steps=2,
                             warmup_steps=1, threads=1, head_epochs=1))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnx_models.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", name="tiny",
                         version="0.0.1")
