"""Dataset loading: the cxrnode layout and the public Kaggle/Open-i layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from onnx_models.data import ImageRef, _kaggle_split, load_studies, read_image
from onnx_models.imaging import prepare, resize


def _kaggle_copy(root: Path) -> Path:
    from PIL import Image

    (root / "images_normalized").mkdir(parents=True)
    with open(root / "indiana_reports.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        w.writerow(["1", "normal", "normal", "Xray Chest PA and Lateral", "Positive TB test", "None.",
                    "The cardiac silhouette and mediastinum size are within normal limits.", "Normal chest x-XXXX."])
        w.writerow(["9", "Cardiomegaly/borderline;Pulmonary Artery/enlarged", "Cardiomegaly", "Chest, 2 views",
                    "Preop bariatric surgery.", "None.", "Borderline cardiomegaly.", "No acute pulmonary findings."])
        w.writerow(["3", "normal", "normal", "", "", "", "", ""])  # no report text: dropped
    with open(root / "indiana_projections.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["uid", "filename", "projection"])
        for uid, fn, proj in [("1", "1_IM-0001-4001.dcm.png", "Frontal"), ("1", "1_IM-0001-3001.dcm.png", "Lateral"),
                              ("9", "9_IM-0652-1001.dcm.png", "Frontal"), ("3", "3_IM-1384-1001.dcm.png", "Frontal")]:
            w.writerow([uid, fn, proj])
            Image.fromarray(np.full((40, 50), 128, np.uint8)).save(root / "images_normalized" / fn)
    return root


def test_kaggle_layout(tmp_path: Path) -> None:
    root = _kaggle_copy(tmp_path / "kaggle")
    studies = load_studies(root)
    assert [s.study_id for s in studies] == ["1", "9"]
    s1 = studies[0]
    assert s1.indication == "Positive TB test"
    assert s1.report.startswith("The cardiac silhouette") and s1.report.endswith("Normal chest x-XXXX.")
    assert [im.view for im in s1.images] == ["PA", "LATERAL"]
    assert all(im.path.exists() for im in s1.images)
    assert studies[1].mesh_major == ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged")
    assert [s.split for s in studies] == ["train", "val"]  # stable hash split
    assert _kaggle_split("1") == _kaggle_split("1")
    assert load_studies(root, ["no-such-split"]) == []
    img = read_image(s1.images[0].path)
    assert img.shape == (40, 50) and img.dtype == np.float32 and abs(float(img.mean()) - 128 / 255) < 1e-6


def test_kaggle_layout_trains(tmp_path: Path) -> None:
    """The same train command works on the Kaggle layout (1 step)."""
    pytest.importorskip("torch")
    from onnx_models.train import TrainConfig, train

    root = _kaggle_copy(tmp_path / "kaggle")
    ck = train(TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, batch_size=2, max_steps=1,
                           warmup_steps=1, threads=1, head_epochs=0))
    assert ck.exists()


def test_cxrnode_layout(tiny_data: Path) -> None:
    train = load_studies(tiny_data, ["train"])
    val = load_studies(tiny_data, ["val"])
    assert len(train) == 12 and len(val) == 6
    assert any(len(s.images) == 1 for s in train)


def test_view_truth_beats_tags() -> None:
    assert ImageRef("a", Path("x"), "PA", "Lateral").view == "LATERAL"  # lying tag
    assert ImageRef("a", Path("x"), "LL", "Lateral").view == "LL"
    assert ImageRef("a", Path("x"), "", "Frontal").view == "PA"
    assert ImageRef("a", Path("x"), "AP", "Frontal").view == "AP"
    assert ImageRef("a", Path("x"), "", "").view == "UNKNOWN"


def test_resize_and_prepare() -> None:
    img = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    small = resize(img, 128)
    assert small.shape == (128, 128)
    # 2x downscale of a constant image is exact
    assert np.allclose(resize(np.full((300, 200), 0.25, np.float32), 128), 0.25, atol=1e-6)
    big = resize(np.full((2048, 2000), 0.5, np.float32), 128)
    assert big.shape == (128, 128) and np.allclose(big, 0.5, atol=1e-5)
    p = prepare(np.full((10, 10), 2.0, np.float32), 16, 0.5, 0.25)
    assert np.allclose(p, 2.0)  # clipped to 1 then (1 - 0.5) / 0.25
    with pytest.raises(ValueError):
        resize(np.zeros((2, 2, 2)), 4)
