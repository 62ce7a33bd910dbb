"""The Query/Retrieve SCU (dicom_node.qr) and the prior store (dicom_node.priors) against a real
Orthanc acting as the PACS: C-FIND study + series level, C-GET on the same association into
``storage_dir/priors/``, read-only files, rows apart from the node's studies, a dead PACS, the
wrong patient refused, retention."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from support.orthanc import OrthancServer, available
from support.postgres import private_database
from support.priors import ISSUER, patient_history

from dicom_node.config import Config, load_config
from dicom_node.db import (
    Draft,
    DraftPrior,
    Instance,
    Job,
    PriorInstance,
    PriorStudy,
    Study,
    make_engine,
    migrate,
    session_factory,
)
from dicom_node.priors import fetch_priors, prune
from dicom_node.qr import QRError, QRSession
from dicom_node.store import Store

pytestmark = [pytest.mark.orthanc]
NODE_AE = "CXRNODE"


def _upload(pacs: OrthancServer, datasets: list) -> None:
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        pacs.upload_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not available():
        pytest.skip("Orthanc is not installed")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), modalities={"cxrnode": (NODE_AE, "127.0.0.1", 1)})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(tmp_path: Path, destination: str, **priors: object) -> Config:
    values: dict[str, object] = {"enabled": True, "destination": destination, "timeout_s": 5.0, **priors}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    toml = f"""
[node]
ae_title = "{NODE_AE}"
storage_dir = {json.dumps(str(tmp_path / "node"))}
fsync = false
min_free_space_mb = 0
[priors]
""" + "\n".join(lines) + "\n"
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cxrnode.toml").write_text(toml)
    return load_config(tmp_path / "cxrnode.toml", env={})


@pytest.fixture
def node_parts(tmp_path: Path, pacs: OrthancServer, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Config, sessions and store of a node whose index is SQLite, or PostgreSQL (param "postgres")."""
    config = _config(tmp_path, f"ORTHANC@127.0.0.1:{pacs.dicom_port}")
    with contextlib.ExitStack() as stack:
        if getattr(request, "param", "sqlite") == "postgres":
            url = stack.enter_context(private_database("priors"))
            config = dataclasses.replace(config, node=dataclasses.replace(config.node, database_url=url))
        url = config.node.resolved_database_url()
        migrate(url)
        engine = make_engine(url)
        yield config, session_factory(engine), Store(config.node.storage_dir, fsync=False)
        engine.dispose()


def test_prior_qr_find_study_and_series_then_get(pacs: OrthancServer, node_parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, sessions, store = node_parts
    h = patient_history("qr")
    _upload(pacs, [*h.prior_images, h.prior_sr, h.prior_pdf, *h.current])
    with QRSession(config) as qr:
        studies = qr.find_studies(h.patient_id, ISSUER)
        assert [m.study_instance_uid for m in studies] == [str(h.current[0].StudyInstanceUID), h.prior_study_uid]
        assert studies[1].study_date == "20100115"
        assert qr.find_studies(h.patient_id, "ANOTHER-ISSUER") == []  # same ID, another authority
        listed = qr.find_series(h.prior_study_uid)
        assert sorted(x.modality for x in listed) == ["CR", "CR", "DOC", "SR"]  # one series per view
        series = {x.modality: x for x in listed}
        assert series["CR"].body_part_examined == "CHEST"
        got: list[str] = []
        for x in listed:
            if x.modality == "CR":
                out = qr.get_series(h.prior_study_uid, x.series_instance_uid, h.patient_id, ISSUER,
                                    lambda ds: got.append(str(ds.SOPInstanceUID)) or None)
                assert out.completed == 1 and out.failed == 0 and not out.refused
        assert sorted(got) == sorted(str(d.SOPInstanceUID) for d in h.prior_images)
        # a C-GET whose objects are not of the patient asked for is refused object by object
        out = qr.get_series(h.prior_study_uid, series["SR"].series_instance_uid, "SOMEONE-ELSE", ISSUER,
                            lambda ds: None)
        assert out.completed == 0 and len(out.refused) == 1 and "not of the queried patient" in out.refused[0]


def test_prior_fetch_keeps_priors_apart_read_only(pacs: OrthancServer, node_parts, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)  # every logger, pynetdicom's included: no patient data at INFO
    config, sessions, store = node_parts
    h = patient_history("keep")
    _upload(pacs, [*h.prior_images, h.prior_sr, h.prior_pdf, *h.current])
    lines: list[str] = []
    cur = h.current[0]
    out = fetch_priors(config, sessions, store, current_study_uid=str(cur.StudyInstanceUID), patient_id=h.patient_id,
                       issuer_of_patient_id=ISSUER, study_date="20110324", study_time="111950", log_line=lines.append)
    assert out.outcome == "found", out
    with sessions() as s:
        prior = s.get(PriorStudy, out.prior_ids[0])
        assert prior is not None and prior.study_instance_uid == h.prior_study_uid
        assert prior.study_date == "20100115" and prior.issuer_of_patient_id == ISSUER
        kinds = sorted(i.modality for i in prior.instances)
        assert kinds == ["CR", "CR", "DOC", "SR"]
        for inst in prior.instances:
            assert inst.path.startswith("priors/")
            mode = stat.S_IMODE(store.abspath(inst.path).stat().st_mode)
            assert not mode & 0o222, f"prior file is writable: {oct(mode)}"
        # never the node's own studies: not drafted, not in the worklist, not sent
        assert s.scalar(select(func.count()).select_from(Study)) == 0
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    assert not (Path(config.node.storage_dir) / "instances").exists()
    text = "\n".join(lines) + "\n".join(r.getMessage() for r in caplog.records)
    assert h.patient_id not in text and "PRIOR^PATIENT" not in text  # no patient data in job log or logs
    # the same prior again: reused, not fetched twice
    again = fetch_priors(config, sessions, store, current_study_uid=str(cur.StudyInstanceUID),
                         patient_id=h.patient_id, issuer_of_patient_id=ISSUER, study_date="20110324",
                         log_line=lines.append)
    assert again.prior_ids == out.prior_ids and "reused" in lines[-1]


def test_prior_fetch_none_found_and_dead_pacs(pacs: OrthancServer, node_parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, sessions, store = node_parts
    h = patient_history("alone")
    _upload(pacs, h.current)  # only the current study: no prior
    out = fetch_priors(config, sessions, store, current_study_uid=str(h.current[0].StudyInstanceUID),
                       patient_id=h.patient_id, issuer_of_patient_id=ISSUER, study_date="20110324")
    assert out.outcome == "none" and "no prior chest radiograph" in out.reason
    # nothing listening: a clear reason, fast
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    dead = _config(tmp_path / "dead", f"PACS@127.0.0.1:{dead_port}")
    t0 = time.monotonic()
    out = fetch_priors(dead, sessions, store, current_study_uid="1.2.3", patient_id="X")
    assert out.outcome == "unavailable" and "did not answer" in out.reason and f"PACS@127.0.0.1:{dead_port}" in out.reason
    assert time.monotonic() - t0 < 10
    # a peer that accepts TCP but never speaks DICOM: bounded by priors.timeout_s
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        slow = _config(tmp_path / "silent", f"PACS@127.0.0.1:{silent.getsockname()[1]}", timeout_s=1.0)
        t0 = time.monotonic()
        out = fetch_priors(slow, sessions, store, current_study_uid="1.2.3", patient_id="X")
        assert out.outcome == "unavailable" and time.monotonic() - t0 < 8
    finally:
        silent.close()
    with pytest.raises(QRError, match="did not answer"), QRSession(dead):
        pass


@pytest.mark.parametrize("node_parts", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                         indirect=True)
def test_prior_retention_prunes_old_priors_not_in_use(pacs: OrthancServer, node_parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config, sessions, store = node_parts
    h1, h2 = patient_history("old", 1), patient_history("old", 2)
    _upload(pacs, [*h1.prior_images, h1.prior_sr, *h2.prior_images, h2.prior_sr])
    ids = []
    for h in (h1, h2):
        out = fetch_priors(config, sessions, store, current_study_uid=str(h.current[0].StudyInstanceUID),
                           patient_id=h.patient_id, issuer_of_patient_id=ISSUER, study_date="20110324")
        assert out.outcome == "found"
        ids.append(out.prior_ids[0])
    # an open draft compares with the second prior
    with sessions() as s, s.begin():
        study = Study(study_instance_uid=str(h2.current[0].StudyInstanceUID))
        s.add(study)
        s.flush()
        d = Draft(study_id=study.id, sop_instance_uid="2.25.1", path="x", state="new")
        s.add(d)
        s.flush()
        s.add(DraftPrior(draft_id=d.id, prior_id=ids[1]))
    with sessions() as s:
        paths = [i.path for i in s.scalars(select(PriorInstance).where(PriorInstance.prior_id == ids[0]))]
    assert prune(config, sessions, store) == 0  # all fresh
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=config.priors.retention_days + 1)
    # a job that started before the fetch and still runs may yet link the prior to its draft
    with sessions() as s, s.begin():
        job = Job(study_id=study.id, state="running", updated_at=dt.datetime.now(dt.UTC).replace(tzinfo=None)
                  - dt.timedelta(hours=1))
        s.add(job)
    assert prune(config, sessions, store, now=later) == 0
    with sessions() as s, s.begin():
        s.get(Job, job.id).state = "done"  # type: ignore[union-attr]
    assert prune(config, sessions, store, now=later) == 1
    with sessions() as s:
        assert s.get(PriorStudy, ids[0]) is None and s.get(PriorStudy, ids[1]) is not None
        assert s.scalar(select(func.count()).select_from(PriorInstance).where(PriorInstance.prior_id == ids[0])) == 0
    assert paths and not any(store.abspath(p).exists() for p in paths)
    assert not (Path(config.node.storage_dir) / "priors" / h1.prior_study_uid).exists()
    # once the draft is signed the prior may go too
    with sessions() as s, s.begin():
        s.get(Draft, d.id).state = "signed"  # type: ignore[union-attr]
    assert prune(config, sessions, store, now=later) == 1


def test_prior_doctor_echoes_the_qr_destination(pacs: OrthancServer, node_parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from installer.doctor import OK, WARN, Context, check_priors_destination

    config, _sessions, _store = node_parts
    ctx = Context(config_path="", overrides=[], echo_timeout_s=5.0, inference=False, config=config)
    [row] = check_priors_destination(ctx)
    assert row.status == OK and f"127.0.0.1:{pacs.dicom_port}" in row.detail
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx.config = _config(tmp_path / "doctor-dead", f"PACS@127.0.0.1:{port}")
    [row] = check_priors_destination(ctx)
    assert row.status == WARN and "drafts are made without priors" in row.detail
    ctx.config = load_config(env={})  # priors off: no row
    assert check_priors_destination(ctx) == []


def test_prior_most_recent_first_max_priors_and_instance_cap(pacs: OrthancServer, tmp_path: Path) -> None:
    from support.priors import with_patient

    from plugin.drafting import samples

    h = patient_history("many")
    older = with_patient(samples.make_study(9, prefix="older-many"), h.patient_id, "20080620", "101500")
    not_chest = with_patient(samples.make_study(8, prefix="knee-many"), h.patient_id, "20100601", "080000")
    for ds in not_chest:
        ds.BodyPartExamined = "KNEE"
    later = with_patient(samples.make_study(7, prefix="later-many"), h.patient_id, "20120101", "080000")
    _upload(pacs, [*h.prior_images, h.prior_sr, h.prior_pdf, *older, *not_chest, *later, *h.current])
    config = _config(tmp_path, f"ORTHANC@127.0.0.1:{pacs.dicom_port}", max_priors=2, max_instances=3)
    url = config.node.resolved_database_url()
    migrate(url)
    engine = make_engine(url)
    sessions, store = session_factory(engine), Store(config.node.storage_dir, fsync=False)
    lines: list[str] = []
    try:
        out = fetch_priors(config, sessions, store, current_study_uid=str(h.current[0].StudyInstanceUID),
                           patient_id=h.patient_id, issuer_of_patient_id=ISSUER, study_date="20110324",
                           study_time="111950", log_line=lines.append)
        assert out.outcome == "found" and len(out.prior_ids) == 2
        with sessions() as s:
            got = [s.get(PriorStudy, i) for i in out.prior_ids]
            # most recent first; the knee study and the study after the current one are not priors
            assert [p.study_instance_uid for p in got if p] == [h.prior_study_uid, str(older[0].StudyInstanceUID)]
            # priors.max_instances = 3: the fourth object of the first prior was refused, and said so
            assert len(got[0].instances) == 3  # type: ignore[union-attr]
        assert any("more than priors.max_instances (3)" in line for line in lines), lines
    finally:
        engine.dispose()
