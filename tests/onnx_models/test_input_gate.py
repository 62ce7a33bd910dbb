"""The input gate of the shipped bundle (onnx_models.input_gate) and its calibration."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.gate_images import SHARED, non_chest_images, real_films

from onnx_models import input_gate
from onnx_models.bundle import load_bundle, write_manifest
from onnx_models.data import load_studies
from onnx_models.gate_calibration import study_views
from onnx_models.runtime import ReportGenerator

IU = SHARED / "iu_xray"


@pytest.fixture(scope="module")
def gen() -> ReportGenerator:
    return ReportGenerator("default", threads=2)


def _val_views(gen: ReportGenerator, limit: int = 0) -> list[tuple[np.ndarray, str]]:
    """Val views with the view positions the node resolves (classifier + tag)."""
    studies = load_studies(IU, ["val"])
    return study_views(gen, studies[: limit or len(studies)])


def test_shipped_bundle_has_an_input_check_section(gen: ReportGenerator) -> None:
    section = gen.bundle.manifest["input_check"]
    assert section["method"] == "mahalanobis"
    assert section["statistics"] in gen.bundle.manifest["files"]  # checksummed with the graphs
    assert 0 < section["limit"] and section["val_rejected_share"] <= 0.02
    assert gen.input_gate is not None


def test_at_most_two_percent_of_val_views_rejected_as_the_manifest_says(gen: ReportGenerator) -> None:
    views = _val_views(gen)
    checks = gen.check_inputs([im for im, _ in views], [v for _, v in views])
    assert checks is not None
    share = float(np.mean([not c.passed for c in checks]))
    assert share <= 0.02
    assert share == pytest.approx(gen.bundle.manifest["input_check"]["val_rejected_share"], abs=0.002)


def test_every_real_film_is_rejected(gen: ReportGenerator) -> None:
    films = real_films()
    assert len(films) == 9
    for name, check in zip(films, gen.check_inputs(list(films.values()), ["PA"] * len(films)) or [], strict=True):
        assert not check.passed, (name, check)
        assert "unlike the images the model was trained on" in check.reasons[0], (name, check.reasons)
        assert check.scores["score"] > check.limits["score"]


def test_non_chest_images_are_rejected(gen: ReportGenerator) -> None:
    images = non_chest_images()
    for name, check in zip(images, gen.check_inputs(list(images.values()), ["PA"] * len(images)) or [], strict=True):
        assert not check.passed, (name, check)


def test_inverted_and_rotated_views_are_named(gen: ReportGenerator) -> None:
    views = _val_views(gen, 3)
    ok = gen.check_inputs([im for im, _ in views], [v for _, v in views]) or []
    assert all(c.passed for c in ok)
    for transform, words in ((lambda a: 1.0 - a, "inverted"), (lambda a: np.rot90(a, 1), "rotated by 90"),
                             (lambda a: np.rot90(a, 2), "rotated by 180")):
        bad = gen.check_inputs([np.ascontiguousarray(transform(im)) for im, _ in views], [v for _, v in views]) or []
        for c in bad:
            assert not c.passed and words in c.reasons[0], c


def test_blank_images_fail_without_the_model() -> None:
    assert input_gate.physical_problems(np.full((64, 64), 0.3, dtype=np.float32))
    assert input_gate.physical_problems(np.zeros((0,), dtype=np.float32)) == ["empty image"]
    rng = np.random.default_rng(0)
    assert input_gate.physical_problems(rng.random((64, 64)).astype(np.float32)) == []


def test_statistics_file_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    g = input_gate.fit_gaussian(rng.normal(size=(200, 5)), ["PA"] * 100 + ["LATERAL"] * 100)
    a = input_gate.fit_gaussian(rng.normal(size=(200, 3)))
    stats = input_gate.GateStatistics(embedding=g, appearance=a)
    blob = stats.to_bytes()
    assert blob == stats.to_bytes()
    (tmp_path / "s.npz").write_bytes(blob)
    back = input_gate.GateStatistics.load(tmp_path / "s.npz")
    x = rng.normal(size=(4, 5))
    assert np.allclose(back.embedding.distance(x), g.distance(x))
    assert set(back.embedding.means) == {"PA", "LATERAL"}


def test_mahalanobis_distance_grows_away_from_the_training_data() -> None:
    rng = np.random.default_rng(2)
    g = input_gate.fit_gaussian(rng.normal(size=(500, 4)))
    near, far = g.distance(np.zeros((1, 4)))[0], g.distance(np.full((1, 4), 5.0))[0]
    assert near < 1.0 < 5.0 < far


def test_calibrate_sets_a_limit_from_the_hold_out_and_measures_val() -> None:
    rng = np.random.default_rng(3)

    def embed(images: list[np.ndarray], views: list[str]) -> np.ndarray:
        return np.stack([[im.mean(), im.std(), im[:8].mean(), im[:, :8].mean()] for im in images])

    def views(n: int, scale: float) -> list[tuple[np.ndarray, str]]:
        return [((rng.random((32, 32)) * scale).astype(np.float32), "PA") for _ in range(n)]

    stats, section = input_gate.calibrate(embed, views(150, 1.0), views(40, 1.0), views(30, 1.0), quantile=0.9)
    assert section["method"] == "mahalanobis" and section["limit"] > 0
    assert section["fitted_on_views"] == 150 and section["limit_from_views"] == 40
    assert 0.0 <= section["val_rejected_share"] <= 0.4
    gate = input_gate.InputGate(section, stats)
    odd = gate.check([np.full((32, 32), 0.9, dtype=np.float32) + rng.random((32, 32)).astype(np.float32) * 0.1],
                     ["PA"], embed)
    assert not odd[0].passed
    with pytest.raises(ValueError, match="calibration needs"):
        input_gate.calibrate(embed, views(10, 1.0), views(40, 1.0))


def test_a_bundle_without_input_check_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dst = tmp_path / "nogate"
    shutil.copytree(load_bundle("default").path, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    del manifest["input_check"]
    (dst / "input_check.npz").unlink()
    manifest["version"] = "0.0.0-nogate-test"  # a distinct name: the warning is logged once per bundle
    write_manifest(dst, manifest)
    with caplog.at_level(logging.WARNING, logger="onnx_models.runtime"):
        g = ReportGenerator(dst)
    assert g.input_gate is None and g.check_inputs([np.zeros((8, 8), np.float32)], ["PA"]) is None
    assert "the input gate is off" in caplog.text


def test_a_broken_statistics_file_is_a_bundle_error(tmp_path: Path) -> None:
    from onnx_models.bundle import BundleError

    dst = tmp_path / "broken"
    shutil.copytree(load_bundle("default").path, dst)
    (dst / "input_check.npz").write_bytes(b"not a zip")
    manifest = json.loads((dst / "manifest.json").read_text())
    write_manifest(dst, manifest)  # checksums match the broken file: the loader must still refuse it
    with pytest.raises(BundleError, match="input_check is unusable"):
        ReportGenerator(dst)
