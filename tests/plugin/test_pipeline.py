"""plugin.drafting.pipeline.handle_job on a real store, index and job queue with the shipped model bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from support.nodeenv import NodeEnv, bundle_for_tests, make_env
from support.sr_checks import check_sr_file
from support.synth import image, non_image

from dicom_node.db import AuditEvent, Draft, Instance, Study, Transfer
from plugin.drafting import pipeline, samples, sr

INDICATION = "History of testicular cancer, evaluate for metastatic disease"


@pytest.fixture
def env(tmp_path: Path) -> NodeEnv:
    return make_env(tmp_path / "node")


def drafts(env: NodeEnv, study_uid: str) -> list[Draft]:
    with env.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        rows = list(s.scalars(select(Draft).where(Draft.study_id == study.id).order_by(Draft.id)))
        for r in rows:
            s.expunge(r)
        return rows


def test_two_view_study_gets_a_valid_draft(env: NodeEnv) -> None:
    study = samples.make_study(1, prefix="pipe")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    gen = pipeline.generator_for(env.config)
    assert (job.model_name, job.model_version) == (gen.name, gen.version)
    for needle in ("selected 2 image(s)", "pixels ", "inverted (MONOCHROME1)", "view ",
                   "indication from RequestAttributesSequence/ReasonForTheRequestedProcedure",
                   f"model {gen.name} {gen.version}", "draft SR "):
        assert needle in job.log, (needle, job.log)
    [d] = drafts(env, study[0].StudyInstanceUID)
    assert d.state == "new" and d.job_id == job.id and d.indication == INDICATION
    assert d.findings or d.impression
    views = json.loads(d.views)
    assert {v["sop_instance_uid"] for v in views} == {ds.SOPInstanceUID for ds in study}
    assert all(v["view"] in ("PA", "AP", "LATERAL", "LL") for v in views)
    info = json.loads(d.token_info)
    tokens = info["tokens"]
    assert tokens and all(0.0 <= p <= 1.0 for _, p in tokens)
    # what the grounding step added is recorded (and is in the findings) for the reviewer
    assert isinstance(info["grounded"], list) and all(s in d.findings for s, _ in info["grounded"])
    path = env.store.abspath(d.path)
    check_sr_file(path)
    rep = sr.read_report(dcmread(path))
    assert rep.sop_instance_uid == d.sop_instance_uid
    assert rep.findings == d.findings and rep.impression == d.impression and rep.indication == INDICATION
    assert set(rep.source_images) == {ds.SOPInstanceUID for ds in study}
    assert rep.verification_flag == "UNVERIFIED" and rep.device_model == f"{gen.name} {gen.version}"
    with env.sessions() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == d.sop_instance_uid)).one()
        assert inst.generated == 1
        st = s.scalars(select(Study).where(Study.study_instance_uid == study[0].StudyInstanceUID)).one()
        assert st.state == "drafted" and st.generation == 2  # our SR did not bump the generation
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "drafted")).one().object_uid == d.sop_instance_uid
        assert not list(s.scalars(select(Transfer)))  # no destination wants drafts


def test_nothing_to_read_is_skipped_with_reasons(env: NodeEnv) -> None:
    sr_doc = non_image("1.2.840.10008.5.1.4.1.1.88.67", "SR")
    knee = image(body_part="KNEE", study_uid=sr_doc.StudyInstanceUID)
    for ds in (sr_doc,):
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.PatientID = "P1"
        ds.file_meta = knee.file_meta.__class__()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = knee.file_meta.TransferSyntaxUID
    env.store_instances([sr_doc, knee])
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "skipped"
    assert "no chest radiograph" in (job.last_error or "")
    assert "dose report" in job.log and "KNEE" in job.log
    with env.sessions() as s:
        assert s.scalars(select(Study)).one().state == "skipped"
        assert not list(s.scalars(select(Draft)))


def test_new_images_supersede_the_unsigned_draft_and_reruns_are_idempotent(env: NodeEnv) -> None:
    study = samples.make_study(2, prefix="pipe")
    env.store_instances(study)
    [first] = env.run_jobs(pipeline.handle_job)
    assert first.state == "done"
    [old] = drafts(env, study[0].StudyInstanceUID)
    # the same job run again (a retry after a crash) writes the same SR and no second row
    from dicom_node.jobs import JobContext

    lines: list[str] = []
    ctx = JobContext(env.config, env.sessions, env.store, first.id, study[0].StudyInstanceUID,
                     first.study_generation, lines.append)
    assert pipeline.handle_job(ctx).state == "done"
    assert [d.sop_instance_uid for d in drafts(env, study[0].StudyInstanceUID)] == [old.sop_instance_uid]
    # a third image arrives: a new job, a new draft; the old unsigned one is superseded
    extra = samples.make_study(2, prefix="pipe")[0]
    extra.SOPInstanceUID = extra.SOPInstanceUID + ".9"
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.InstanceNumber = 2
    env.store_instances([extra])
    [second] = env.run_jobs(pipeline.handle_job)
    assert second.state == "done", second.log
    rows = drafts(env, study[0].StudyInstanceUID)
    assert [r.state for r in rows] == ["superseded", "new"]
    assert rows[1].sop_instance_uid != old.sop_instance_uid
    assert "superseded 1 older unsigned draft(s)" in second.log
    assert len(json.loads(rows[1].views)) == 3


def test_destination_that_wants_drafts_gets_a_transfer(tmp_path: Path) -> None:
    env = make_env(tmp_path / "n", destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "send": "drafts_and_signed"},
        {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 11113, "send": "signed"},
    ])
    study = samples.make_study(3, prefix="pipe")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    [d] = drafts(env, study[0].StudyInstanceUID)
    with env.sessions() as s:
        transfers = list(s.scalars(select(Transfer)))
    assert [(t.destination, t.sop_instance_uid, t.path) for t in transfers] == [("pacs", d.sop_instance_uid, d.path)]
    assert "queued the draft to 1 destination(s)" in job.log


def test_mislabelled_lateral_goes_through_the_classifier(env: NodeEnv) -> None:
    study = samples.make_study(4, prefix="pipe")
    lateral = next(ds for ds in study if ds.ViewPosition == "LL")
    lateral.ViewPosition = "PA"  # as 1,367 of 3,631 IU laterals are tagged
    del lateral.PatientOrientation
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done"
    line = next(ln for ln in job.log.splitlines() if f"view {lateral.SOPInstanceUID}:" in ln)
    assert "ViewPosition" in line and "classifier" in line
    [d] = drafts(env, study[0].StudyInstanceUID)
    view = next(v for v in json.loads(d.views) if v["sop_instance_uid"] == lateral.SOPInstanceUID)
    assert view["tag_view"] == "PA"
    if view["classifier"] == "LATERAL":
        assert view["view"] == "LATERAL" and view["source"] == "classifier"
        assert "says PA but the classifier says LATERAL" in line


def test_an_undecodable_image_is_skipped_not_fatal(env: NodeEnv) -> None:
    study = samples.make_study(5, prefix="pipe")
    study[1].PixelData = study[1].PixelData[:1000]  # truncated
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert f"skipped {study[1].SOPInstanceUID}:" in job.log
    [d] = drafts(env, study[0].StudyInstanceUID)
    assert [v["sop_instance_uid"] for v in json.loads(d.views)] == [study[0].SOPInstanceUID]


@pytest.mark.parametrize(("kind", "sop_class"), [("pdf", "1.2.840.10008.5.1.4.1.1.104.1"),
                                                 ("sc", "1.2.840.10008.5.1.4.1.1.7")])
def test_rendering_for_viewers_without_sr(tmp_path: Path, kind: str, sop_class: str) -> None:
    env = make_env(tmp_path / "n", destinations=[
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112, "send": "drafts_and_signed"},
    ], extra=f'[pipeline]\nrender_report = "{kind}"')
    study = samples.make_study(6, prefix="pipe")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert f"rendered the draft as {kind.upper()}" in job.log
    with env.sessions() as s:
        sent = {t.sop_instance_uid: t.path for t in s.scalars(select(Transfer))}
        rendered = s.scalars(select(Instance).where(Instance.sop_class_uid == sop_class)).one()
        assert rendered.generated == 1
    assert rendered.sop_instance_uid in sent and len(sent) == 2  # the SR and its rendering
    ds = dcmread(env.store.abspath(rendered.path))
    assert ds.StudyInstanceUID == study[0].StudyInstanceUID


def test_resent_images_do_not_replace_a_signed_report(env: NodeEnv) -> None:
    from sqlalchemy import update

    study = samples.make_study(7, prefix="pipe")
    env.store_instances(study)
    env.run_jobs(pipeline.handle_job)
    [d] = drafts(env, study[0].StudyInstanceUID)
    with env.sessions() as s, s.begin():
        s.execute(update(Draft).where(Draft.id == d.id).values(state="signed"))
    study[0].InstitutionName = "resent by the PACS"  # same UIDs, different bytes: a new generation
    env.store_instances([study[0]])
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done" and "already exists (signed)" in (job.last_error or "")
    assert [(r.sop_instance_uid, r.state) for r in drafts(env, study[0].StudyInstanceUID)] == [
        (d.sop_instance_uid, "signed")]


def test_real_sample_files_without_view_tags(env: NodeEnv) -> None:
    """The two real radiographs (JPEG Baseline SC with ViewPosition PA; implicit VR DX with no
    ViewPosition or BodyPartExamined) put in one study: both read, the classifier decides."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom_samples"
    files = [shared / "siim_chestxray14_pa_jpeg_baseline.dcm", shared / "nih_chestxray_dx_implicit_le.dcm"]
    if not all(f.exists() for f in files):
        pytest.skip("shared DICOM samples not available")
    dss = [dcmread(f) for f in files]
    for ds in dss[1:]:
        ds.StudyInstanceUID = dss[0].StudyInstanceUID
        ds.PatientID = dss[0].PatientID
    env.store_instances(dss)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert "selected 2 image(s)" in job.log
    no_tags = next(ln for ln in job.log.splitlines() if f"view {dss[1].SOPInstanceUID}:" in ln)
    assert "no view in the tags; classifier says" in no_tags
    [d] = drafts(env, dss[0].StudyInstanceUID)
    assert d.indication == ""  # none in these files: allowed
    check_sr_file(env.store.abspath(d.path))


def test_a_failing_job_keeps_its_log_and_says_why(tmp_path: Path) -> None:
    """A broken model file: the job fails with the reason, after logging what it had done."""
    import dataclasses
    import shutil

    from onnx_models.bundle import load_bundle

    env = make_env(tmp_path / "n")
    broken = tmp_path / "broken-bundle"
    shutil.copytree(load_bundle(bundle_for_tests()).path, broken)
    decoder = broken / "decoder.onnx"
    decoder.write_bytes(decoder.read_bytes()[:-100] + bytes(100))  # same size, corrupted tail
    env.config = dataclasses.replace(env.config, model=dataclasses.replace(env.config.model, bundle=str(broken)))
    study = samples.make_study(8, prefix="pipe")
    env.store_instances(study)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "failed"
    assert "checksum mismatch for decoder.onnx" in (job.last_error or "")
    assert "selected 2 image(s)" in job.log  # the progress before the error was logged
    assert drafts(env, study[0].StudyInstanceUID) == []
    files = [p for p in env.store.root.rglob("*.dcm") if "instances" in p.parts]
    assert len(files) == 2  # the received images are all still there; no stray SR


def test_more_views_than_the_model_reads(env: NodeEnv) -> None:
    max_views = pipeline._max_views(pipeline.generator_for(env.config))
    base = samples.make_study(9, prefix="pipe")
    extra = []
    for k in range(max_views):  # max_views + 2 images in all
        ds = samples.make_study(9, prefix="pipe")[k % 2]
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        extra.append(ds)
    env.store_instances(base + extra)
    [job] = env.run_jobs(pipeline.handle_job)
    assert job.state == "done", job.log
    assert job.log.count(f"the model reads at most {max_views} views") == 2
    [d] = drafts(env, base[0].StudyInstanceUID)
    views = json.loads(d.views)
    assert len(views) == max_views
    assert set(sr.read_report(dcmread(env.store.abspath(d.path))).source_images) == {v["sop_instance_uid"] for v in views}
