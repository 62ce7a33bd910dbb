"""The separate findings classifier: training on train minus the tune hold-out, resume,
export into a bundle, ORT-vs-torch parity, and the runtime using it for the observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnx_models.bundle import load_bundle  # noqa: E402
from onnx_models.data import is_tune, load_studies, read_image  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput  # noqa: E402
from onnx_models.train_findings import FindingsConfig, train_findings  # noqa: E402


def _fc(data: Path, out: Path, **kw: object) -> FindingsConfig:
    base: dict = dict(data=str(data), out=str(out), epochs=1, batch_size=4, image_size=64, threads=1, max_steps=2)
    base.update(kw)
    return FindingsConfig(**base)


@pytest.fixture(scope="module")
def findings_ckpt(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_findings(_fc(tiny_data, tmp_path_factory.mktemp("findings")))


@pytest.fixture(scope="module")
def findings_bundle(tiny_checkpoint: Path, findings_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnx_models.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("fb") / "tinyf", name="tinyf",
                         findings=findings_ckpt)


def test_tune_split_is_part_of_train_only(tiny_data: Path) -> None:
    tune = load_studies(tiny_data, ["tune"])
    train = load_studies(tiny_data, ["train"])
    assert tune and {s.study_id for s in tune} < {s.study_id for s in train}
    assert all(is_tune(s.study_id) for s in tune)
    assert not any(s.split == "val" for s in tune)


def test_checkpoint_and_resume(findings_ckpt: Path, tiny_data: Path, tmp_path: Path) -> None:
    ck = torch.load(findings_ckpt, map_location="cpu", weights_only=False)
    assert len(ck["thresholds"]) == 13 and ck["std"] > 0
    assert ck["command"].startswith("cxrnode train-findings") and ck["epoch"] == 1
    out = tmp_path / "again"
    train_findings(_fc(tiny_data, out))
    again = torch.load(out / "findings_best.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(ck["model"][k], again[k]) for k in again)  # seeded: same weights
    train_findings(_fc(tiny_data, out, epochs=2, max_steps=3))  # resumes at epoch 2
    last = torch.load(out / "findings_last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["step"] == 3 and [h["epoch"] for h in last["history"]] == [1, 2]


def test_export_parity_and_runtime_uses_the_classifier(findings_bundle: Path, findings_ckpt: Path,
                                                        tiny_data: Path) -> None:
    from onnx_models.torch_model import FindingsClassifier

    b = load_bundle(findings_bundle)  # checksums cover findings.onnx
    assert "findings.onnx" in b.manifest["files"]
    clf_spec = b.manifest["observations"]["classifier"]
    assert clf_spec["graph"] == "findings" and clf_spec["image_size"] == 64
    ck = torch.load(findings_ckpt, map_location="cpu", weights_only=False)
    assert b.manifest["observations"]["thresholds"] == pytest.approx(ck["thresholds"])
    assert b.manifest["generation"]["grounding"]["thresholds"] == pytest.approx(ck["thresholds"])
    clf = FindingsClassifier()
    clf.load_state_dict(ck["model"])
    clf.eval()
    gen = ReportGenerator(findings_bundle, threads=1)
    studies = load_studies(tiny_data, ["val"])
    inputs = [StudyInput(views=[(read_image(im.path), im.view) for im in s.images], indication=s.indication)
              for s in studies]
    images, view_ids, view_mask = gen._pixels(inputs, 64, ck["mean"], ck["std"])
    with torch.no_grad():
        t = torch.sigmoid(clf(*(torch.from_numpy(x) for x in (images, view_ids, view_mask)))).numpy()
    probs = gen._encode(inputs)[0]
    assert np.allclose(probs, t, atol=1e-4)
    # and not the report model's own head
    enc_images, _, _ = gen._pixels(inputs)
    _, head = gen._sessions["encoder"].run(None, {"images": enc_images, "view_ids": view_ids, "view_mask": view_mask})
    assert not np.allclose(probs, 1 / (1 + np.exp(-head)), atol=1e-3)
    reports = gen.generate(inputs, beam_size=1, max_tokens=8)
    assert [set(r.observations.values()) for r in reports] == [set(map(float, p)) for p in probs]


def test_mean_combination_and_export_options(tiny_checkpoint: Path, findings_ckpt: Path, tiny_data: Path,
                                             tmp_path: Path) -> None:
    from onnx_models.export import export_bundle

    out = export_bundle(tiny_checkpoint, tmp_path / "mean", findings=findings_ckpt, combine="mean",
                        prompt_scale=0.5, grounding_threshold=0.4, replace_negated=True, drop_below=0.3,
                        eos_penalty=1.5)
    m = load_bundle(out).manifest
    ck = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert m["observations"]["classifier"]["combine"] == "mean"
    assert m["observations"]["thresholds"] == pytest.approx([0.5 * t for t in ck["thresholds"]], abs=1e-4)
    g = m["generation"]["grounding"]
    assert g["thresholds"] == [0.4] * 13 and g["replace_negated"] is True and g["drop_below"] == 0.3
    assert m["generation"]["eos_penalty"] == 1.5
    gen = ReportGenerator(out, threads=1)
    assert gen.grounding is not None and gen.grounding.replace_negated and gen.grounding.drop_below == 0.3
    assert gen.eos_penalty == 1.5
    studies = load_studies(tiny_data, ["val"])
    inputs = [StudyInput(views=[(read_image(im.path), im.view) for im in s.images], indication=s.indication)
              for s in studies]
    images, view_ids, view_mask = gen._pixels(inputs)
    _, head = gen._sessions["encoder"].run(None, {"images": images, "view_ids": view_ids, "view_mask": view_mask})
    big, _, _ = gen._pixels(inputs, 64, *(m["observations"]["classifier"]["normalisation"][k] for k in ("mean", "std")))
    (clf,) = gen._sessions["findings"].run(None, {"images": big, "view_ids": view_ids, "view_mask": view_mask})
    expected = (1 / (1 + np.exp(-head)) + 1 / (1 + np.exp(-clf))) / 2
    assert np.allclose(gen._encode(inputs)[0], expected, atol=1e-6)
