"""Evaluation: metric helpers and the eval command on a tiny bundle and dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onnx_models.evaluate import clinical_metrics, nlg_metrics


def test_clinical_metrics() -> None:
    refs = ["Cardiomegaly. No effusion.", "Normal chest.", "Right pleural effusion."]
    perfect = clinical_metrics(refs, refs)
    assert perfect["CE14_micro_F1"] == 1.0 and perfect["CE13_micro_F1"] == 1.0
    normal = clinical_metrics(refs, ["Normal chest."] * 3)
    assert normal["CE13_micro_F1"] == 0.0  # a constant normal report finds nothing
    assert 0.0 < normal["CE14_micro_F1"] < 1.0  # ... but gets No Finding right once
    half = clinical_metrics(refs, ["Cardiomegaly.", "Normal chest.", "Normal chest."])
    assert half["CE13_micro_P"] == 1.0 and half["CE13_micro_R"] == 0.5
    assert half["per_observation"]["Cardiomegaly"]["f1"] == 1.0


def test_nlg_metrics() -> None:
    refs = ["the heart is normal . the lungs are clear .", "no pneumothorax ."]
    same = nlg_metrics(refs, refs, meteor=False)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    other = nlg_metrics(refs, ["cardiomegaly .", "large effusion ."], meteor=False)
    assert other["BLEU-1"] < 0.5 and other["CIDEr"] < same["CIDEr"]
    assert other["METEOR"] is None


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_runs() -> None:
    m = nlg_metrics(["the lungs are clear ."], ["the lungs are clear ."], meteor=True)
    assert m["METEOR"] is not None and m["METEOR"] > 0.9


def test_eval_command(tiny_bundle: Path, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from onnx_models.cli import main

    preds = tmp_path / "p.jsonl"
    rc = main(["eval", "--bundle", str(tiny_bundle), "--data", str(tiny_data), "--split", "val", "--json",
               "--predictions", str(preds), "--no-meteor", "--beam-size", "1", "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_studies"] == 6 and res["split"] == "val"
    assert set(res["systems"]) == {"model", "nearest_train_report", "most_common_train_report"}
    for m in res["systems"].values():
        for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "CE14_micro_F1", "CE13_micro_F1", "CE13_macro_F1"):
            assert 0.0 <= m[k] <= 10.0
    # consistency rates beside the metrics, the reference reports as the baseline; the rules leave
    # no contradiction or fragment in the drafts
    assert set(res["consistency"]) == {"reference_reports", *res["systems"]}
    for k in ("contradiction_per_100", "duplicate_per_100", "fragment_per_100"):
        assert res["systems"]["model"][k] == res["consistency"]["model"][k]
        assert 0.0 <= res["consistency"]["reference_reports"][k]
    assert res["consistency"]["model"]["contradiction_per_100"] == 0.0
    assert res["consistency"]["model"]["fragment_per_100"] == 0.0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert {"study_id", "indication", "views", "findings", "impression", "reference"} <= set(row)
        assert all(v in ("PA", "AP", "LATERAL", "LL") for v in row["views"])


def test_eval_applies_the_node_input_gate(tmp_path: Path) -> None:
    """A study the node would withhold scores as an empty draft; the others are drafted."""
    import numpy as np
    from PIL import Image
    from support.gate_images import SHARED, real_films

    from onnx_models.evaluate import evaluate

    iu = SHARED / "iu_xray"
    rows = [json.loads(line) for line in (iu / "studies.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if r["split"] == "val"][1:3]
    (tmp_path / "images").mkdir()
    for r in val:
        for im in r["images"]:
            shutil.copy(iu / im["file"], tmp_path / im["file"])
    film = real_films()["h0001.png"]
    Image.fromarray(np.round(film * 255).astype(np.uint8)).resize((256, 256)).save(tmp_path / "images" / "real.jpg")
    real = dict(val[0], study_id="real-film", images=[{"image_id": "real", "file": "images/real.jpg",
                                                        "view_position": "PA", "projection": "Frontal"}])
    (tmp_path / "studies.jsonl").write_text("\n".join(json.dumps(r) for r in [*val, real]) + "\n")
    preds = tmp_path / "p.jsonl"
    res = evaluate("default", str(tmp_path), "val", predictions=str(preds), baselines=False, meteor=False, threads=1)
    assert res["input_check"] == {"mode": "enforce", "outcomes": {"passed": 2, "withheld": 1}}
    out = {r["study_id"]: r for r in map(json.loads, preds.read_text().splitlines())}
    assert out["real-film"]["input_check"] == "withheld" and out["real-film"]["findings"] == ""
    assert out["real-film"]["impression"] == "" and out["real-film"]["views"] == []
    assert all(out[r["study_id"]]["findings"] or out[r["study_id"]]["impression"] for r in val)
    res = evaluate("default", str(tmp_path), "val", baselines=False, meteor=False, threads=1, input_check="off")
    assert res["input_check"]["outcomes"] == {"off": 3}
