"""The input gate in the draft job: withheld, partial, warned and unchecked drafts, on a real
store, index and job queue with the shipped bundle; every SR checked by dciodvfy and dsrdump."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from support.gate_images import REAL_DICOM, hand_radiograph, real_films
from support.nodeenv import NodeEnv, make_env
from support.sr_checks import check_sr_file
from support.synth import image

from dicom_node.db import AuditEvent, Draft, Study
from plugin.drafting import input_check, pipeline, samples, sr


def drafts(env: NodeEnv, study_uid: str) -> list[Draft]:
    with env.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        rows = list(s.scalars(select(Draft).where(Draft.study_id == study.id).order_by(Draft.id)))
        for r in rows:
            s.expunge(r)
        return rows


def as_cr(pixels: np.ndarray, study_uid: str, view: str = "PA") -> pydicom.Dataset:
    """A 12-bit MONOCHROME1 CR image of ``pixels`` (MONOCHROME2 in [0, 1]) in ``study_uid``."""
    values = np.round((1.0 - pixels) * 4095).astype(np.int64)
    return image(values, bits=12, photometric="MONOCHROME1", view_position=view, study_uid=study_uid)


def real_study(name: str) -> list[pydicom.Dataset]:
    """A real film as a one-image study of its own (the PNG/JPEG ones wrapped as CR)."""
    study_uid = generate_uid()
    dicom = {p.name: p for p in REAL_DICOM}
    if name in dicom:
        ds = dcmread(dicom[name])
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return [ds]
    return [as_cr(real_films()[name], study_uid)]


def withheld_check(env: NodeEnv, study: list[pydicom.Dataset]) -> tuple[Draft, dict]:
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert "input check (enforce): withheld" in job.log, job.log
    [d] = drafts(env, str(study[0].StudyInstanceUID))
    assert d.state == "new" and d.findings == "" and d.impression == ""
    info = json.loads(d.token_info)
    gate = info["input_check"]
    assert gate["outcome"] == "withheld" and gate["mode"] == "enforce"
    assert "no view can be read by the model" in gate["reason"]
    assert info["tokens"] == [] and all(not v["passed"] for v in gate["views"])
    return d, gate


@pytest.mark.parametrize("name", [p.name for p in REAL_DICOM] + ["h0001.png", "tb0007.png", "16747_3_1.jpg",
                                                                  "00000001_000.png"])
def test_a_real_film_gets_a_withheld_draft(tmp_path: Path, name: str) -> None:
    env = make_env(tmp_path / "node")
    study = real_study(name)
    env.store_instances(study)
    d, gate = withheld_check(env, study)
    assert "unlike the images the model was trained on" in gate["reason"]
    path = env.store.abspath(d.path)
    check_sr_file(path)  # dciodvfy 0 errors, dsrdump, highdicom
    ds = dcmread(path)
    assert (ds.VerificationFlag, ds.CompletionFlag) == ("UNVERIFIED", "PARTIAL")
    rep = sr.read_report(ds)
    assert rep.findings == "" and rep.impression == "" and rep.observations == ()
    assert any(c.startswith("AI draft withheld: no view can be read by the model") for c in rep.comments)
    coded = [item for item in ds.ContentSequence if item.get("ValueType") == "CONTAINER"
             and item.ConceptNameCodeSequence[0].CodeValue == "121070"][0]
    values = [it.ConceptCodeSequence[0].CodeValue for it in coded.ContentSequence if it.ValueType == "CODE"]
    assert sr.DRAFT_WITHHELD.value in values


def test_a_mislabelled_hand_radiograph_is_withheld(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node")
    study = [as_cr(hand_radiograph(), generate_uid())]
    env.store_instances(study)
    withheld_check(env, study)


def test_partial_study_is_drafted_from_the_good_view_and_says_which_was_not_used(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node")
    study = samples.make_study(1, prefix="gate-partial")
    pa = study[0]
    bad = copy.deepcopy(study[1])  # the lateral replaced by a real frontal film
    film = real_films()["h0001.png"]
    values = np.round((1.0 - film) * 4095).astype(np.uint16)
    bad.Rows, bad.Columns = values.shape
    bad.BitsAllocated, bad.BitsStored, bad.HighBit = 16, 12, 11
    bad.PhotometricInterpretation = "MONOCHROME1"
    for kw in ("WindowCenter", "WindowWidth", "VOILUTSequence", "ImagerPixelSpacing", "PixelSpacing"):
        if kw in bad:
            delattr(bad, kw)
    bad.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    bad.PixelData = values.tobytes()
    env.store_instances([pa, bad])
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    [d] = drafts(env, str(pa.StudyInstanceUID))
    gate = json.loads(d.token_info)["input_check"]
    assert gate["outcome"] == "partial", gate
    assert [v["passed"] for v in gate["views"] if v["sop_instance_uid"] == bad.SOPInstanceUID] == [False]
    assert d.findings or d.impression
    used = {v["sop_instance_uid"] for v in json.loads(d.views)}
    assert pa.SOPInstanceUID in used
    path = env.store.abspath(d.path)
    check_sr_file(path)
    rep = sr.read_report(dcmread(path))
    assert any(bad.SOPInstanceUID in c and "not used" in c for c in rep.comments), rep.comments
    assert rep.source_images == (pa.SOPInstanceUID,)


def test_warn_mode_drafts_anyway_and_marks_the_draft(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node", extra="[pipeline]\ninput_check = \"warn\"")
    study = real_study("h0001.png")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    [d] = drafts(env, str(study[0].StudyInstanceUID))
    gate = json.loads(d.token_info)["input_check"]
    assert gate["outcome"] == "warned" and "drafted from every view anyway" in gate["reason"]
    assert d.findings or d.impression
    rep = sr.read_report(dcmread(env.store.abspath(d.path)))
    assert any("read despite failing the input check" in c for c in rep.comments)
    with env.sessions() as s:
        [ev] = s.scalars(select(AuditEvent).where(AuditEvent.action == "drafted")).all()
        assert json.loads(ev.detail)["input_check"] == "warned"


def test_off_mode_skips_the_check(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node", extra="[pipeline]\ninput_check = \"off\"")
    study = real_study("tb0005.png")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    [d] = drafts(env, str(study[0].StudyInstanceUID))
    gate = json.loads(d.token_info)["input_check"]
    assert gate["outcome"] == "off" and gate["views"] == [] and (d.findings or d.impression)


def test_the_shipped_sample_study_is_drafted_as_before(tmp_path: Path) -> None:
    env = make_env(tmp_path / "node")
    study = samples.make_study(2, prefix="gate-ok")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    [d] = drafts(env, str(study[0].StudyInstanceUID))
    gate = json.loads(d.token_info)["input_check"]
    assert gate["outcome"] == "passed" and all(v["passed"] for v in gate["views"])
    assert all(v["ood_score"] < v["ood_limit"] for v in gate["views"])
    assert (d.findings or d.impression) and "input check (enforce): passed" in job.log


def test_decide_rules() -> None:
    from onnx_models.input_gate import ViewCheck

    ok = ViewCheck("PA", True, (), {"score": 1.0}, {"score": 5.0})
    bad = ViewCheck("LATERAL", False, ("looks inverted",), {"score": 9.0}, {"score": 5.0})
    d = input_check.decide("enforce", ["1", "2"], ["PA", "LATERAL"], [ok, bad], [[], []])
    assert (d.outcome, d.use) == ("partial", (0,)) and d.study == ("frontal-only study (no lateral view)",)
    d = input_check.decide("enforce", ["1", "2"], ["PA", "LATERAL"], [ok, ok], [[], ["field of view 90 mm"]])
    assert d.outcome == "partial" and d.views[1]["reasons"] == ["field of view 90 mm"]
    d = input_check.decide("enforce", ["2"], ["LATERAL"], [bad], [[]])
    assert d.withheld and d.use == () and "looks inverted" in d.reason
    d = input_check.decide("warn", ["2"], ["LATERAL"], [bad], [[]])
    assert d.outcome == "warned" and d.use == (0,)
    assert input_check.decide("enforce", ["1"], ["PA"], None, [[]]).outcome == "off"
    with pytest.raises(ValueError):
        input_check.decide("strict", ["1"], ["PA"], [ok], [[]])


def test_field_of_view_of_the_header() -> None:
    ds = pydicom.Dataset()
    ds.Rows, ds.Columns = 2000, 2000
    ds.ImagerPixelSpacing = [0.2, 0.2]  # 400 mm: a chest film
    assert input_check.field_of_view_problem(ds) is None
    ds.ImagerPixelSpacing = [0.05, 0.05]  # 100 mm: a finger, a dental film
    assert "field of view 100 mm" in (input_check.field_of_view_problem(ds) or "")
    del ds.ImagerPixelSpacing
    assert input_check.field_of_view_problem(ds) is None  # not stated: not judged
