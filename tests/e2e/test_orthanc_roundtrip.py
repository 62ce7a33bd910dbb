"""End to end with a real PACS: Orthanc sends studies to the node, the draft appears, a
radiologist signs through the review service, and the verified SR lands back in Orthanc, also
when Orthanc was down at signing time (the outbound retry queue delivers it later).

Everything is real and on loopback: Orthanc (Debian package) with its own config and ports,
the node (SCP, promoter, worker with the shipped model, outbound sender) on an ephemeral port,
DICOM both ways, Orthanc's REST API to drive it and to read the SRs back.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.nodeenv import bundle_for_tests  # noqa: E402
from support.orthanc import AE_TITLE, OrthancServer, available  # noqa: E402
from support.polling import wait_for  # noqa: E402
from support.sr_checks import check_sr_file  # noqa: E402

from dicom_node.config import load_config  # noqa: E402
from dicom_node.db import Draft, Study, Transfer  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from plugin.drafting import pipeline, samples, sr  # noqa: E402

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

NODE_AE = "CXRNODE"
REVIEWER = ("jdoe", "Doe^Jane", "General Hospital Radiology")




@pytest.fixture
def system(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Node, OrthancServer]]:
    send = getattr(request, "param", "signed")
    if not available():
        pytest.skip("Orthanc is not installed")
    # Orthanc's ports first (the node's destination), then the node (its port goes into Orthanc)
    pacs = OrthancServer(tmp_path / "orthanc", modalities={})
    toml = f"""
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = 0
storage_dir = {json.dumps(str(tmp_path / "node"))}
min_free_space_mb = 0
[study]
quiet_period_s = 1.0
[jobs]
poll_interval_s = 0.1
[model]
bundle = {json.dumps(bundle_for_tests())}
[outbound]
backoff_s = 0.5
max_attempts = 20
[[destinations]]
name = "pacs"
ae_title = "{AE_TITLE}"
host = "127.0.0.1"
port = {pacs.dicom_port}
send = "{send}"
[[reviewers]]
username = "{REVIEWER[0]}"
display_name = "{REVIEWER[1]}"
organisation = "{REVIEWER[2]}"
"""
    (tmp_path / "cxrnode.toml").write_text(toml)
    config = load_config(tmp_path / "cxrnode.toml", env={})
    node = Node(config, job_handler=pipeline.handle_job).start()
    pacs.modalities = {"cxrnode": (NODE_AE, "127.0.0.1", node.port)}
    try:
        pacs.start()
        yield node, pacs
    finally:
        pacs.stop()
        node.stop(grace_s=10)


def send_study_from_pacs(pacs: OrthancServer, datasets: list) -> None:
    study_ids = set()
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        r = pacs.upload_bytes(buf.getvalue())
        study_ids.add(r["ParentStudy"])
    for sid in study_ids:
        pacs.send_to_modality("cxrnode", [sid])


def draft_of(node: Node, study_uid: str, images: list | None = None) -> Draft | None:
    """The study's open draft; with ``images``, only one drafted from all of them (the PACS
    sends instance by instance: a draft of the first image alone is superseded when the
    second arrives after the quiet period)."""
    assert node.sessions is not None
    with node.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None:
            return None
        d = s.scalars(select(Draft).where(Draft.study_id == study.id, Draft.state == "new")).first()
        if d is None:
            return None
        if images is not None and {v["sop_instance_uid"] for v in json.loads(d.views or "[]")} != {
                str(ds.SOPInstanceUID) for ds in images}:
            return None
        s.expunge(d)
        return d


def transfer_of(node: Node, sop_uid: str) -> Transfer | None:
    assert node.sessions is not None
    with node.sessions() as s:
        t = s.scalars(select(Transfer).where(Transfer.sop_instance_uid == sop_uid)).first()
        if t is not None:
            s.expunge(t)
        return t


def sr_in_pacs(pacs: OrthancServer, sop_uid: str) -> Any:
    ids = pacs.find("Instance", {"SOPInstanceUID": sop_uid})
    return dcmread(io.BytesIO(pacs.instance_file(ids[0]))) if ids else None


def check_signed(pacs_sr: Any, draft: Draft, study: list, findings: str, impression: str, tmp: Path) -> None:
    path = tmp / f"{pacs_sr.SOPInstanceUID}.dcm"
    pacs_sr.save_as(path, enforce_file_format=True)
    check_sr_file(path)  # dciodvfy, dsrdump, highdicom on what the PACS holds
    rep = sr.read_report(pacs_sr)
    assert (rep.completion_flag, rep.verification_flag, rep.preliminary_flag) == ("COMPLETE", "VERIFIED", "FINAL")
    assert rep.verifying_observer == REVIEWER[1]
    assert pacs_sr.VerifyingObserverSequence[0].VerifyingOrganization == REVIEWER[2]
    assert rep.findings == findings and rep.impression == impression
    assert rep.indication == draft.indication and rep.indication
    assert rep.predecessors == (draft.sop_instance_uid,)
    assert set(rep.source_images) == {ds.SOPInstanceUID for ds in study}
    crpe = {e[2] for e in hd.sr.ComprehensiveSR.from_dataset(pacs_sr).get_evidence(current_procedure_only=True)}
    assert crpe == {ds.SOPInstanceUID for ds in study}
    assert pacs_sr.StudyInstanceUID == study[0].StudyInstanceUID and pacs_sr.PatientID == study[0].PatientID


def test_pacs_to_node_to_radiologist_and_back(system: tuple[Node, OrthancServer], tmp_path: Path) -> None:
    from plugin.review.service import ReviewService

    node, pacs = system
    study1 = samples.make_study(1, prefix="e2e")
    study2 = samples.make_study(2, prefix="e2e", indication="Cough and fever for one week")
    send_study_from_pacs(pacs, study1)
    send_study_from_pacs(pacs, study2)

    d1 = wait_for("the first draft", lambda: draft_of(node, study1[0].StudyInstanceUID, study1))
    d2 = wait_for("the second draft", lambda: draft_of(node, study2[0].StudyInstanceUID, study2))
    assert d1.indication == "History of testicular cancer, evaluate for metastatic disease"
    assert d2.indication == "Cough and fever for one week"
    assert transfer_of(node, d1.sop_instance_uid) is None  # drafts are not sent (send = "signed")

    svc = ReviewService(node.config, node.sessions, node.store)
    findings1 = (d1.findings + " Edited by the radiologist.").strip()
    impression1 = "No acute cardiopulmonary abnormality."
    signed1 = svc.sign(d1.id, REVIEWER[0], findings1, impression1)
    t1 = wait_for("the first verified SR to be sent", lambda: (
        (t := transfer_of(node, signed1.signed_sop_instance_uid)) is not None and t.state == "done" and t))
    assert t1.destination == "pacs"
    pacs_sr1 = wait_for("the first SR in Orthanc", lambda: sr_in_pacs(pacs, signed1.signed_sop_instance_uid))
    check_signed(pacs_sr1, d1, study1, findings1, impression1, tmp_path)

    # the PACS goes down; the radiologist signs the second study anyway
    pacs.stop()
    signed2 = svc.sign(d2.id, REVIEWER[0], d2.findings or "No findings.", "Edited impression for study two.")
    failed_once = wait_for("a failed delivery attempt while Orthanc is down", lambda: (
        (t := transfer_of(node, signed2.signed_sop_instance_uid)) is not None and t.attempts >= 1
        and t.state == "pending" and t.last_error and t))
    assert failed_once.last_error

    pacs.start()  # same folder and ports: the archive and the first SR are still there
    assert sr_in_pacs(pacs, signed1.signed_sop_instance_uid) is not None
    t2 = wait_for("the second SR to arrive by itself", lambda: (
        (t := transfer_of(node, signed2.signed_sop_instance_uid)) is not None and t.state == "done" and t))
    assert t2.attempts >= 2
    pacs_sr2 = wait_for("the second SR in Orthanc", lambda: sr_in_pacs(pacs, signed2.signed_sop_instance_uid))
    check_signed(pacs_sr2, d2, study2, d2.findings or "No findings.", "Edited impression for study two.", tmp_path)


@pytest.mark.parametrize("system", ["drafts_and_signed"], indirect=True)
def test_drafts_go_to_a_pacs_that_wants_them(system: tuple[Node, OrthancServer], tmp_path: Path) -> None:
    node, pacs = system
    study = samples.make_study(3, prefix="e2e")
    send_study_from_pacs(pacs, study)
    d = wait_for("the draft", lambda: draft_of(node, study[0].StudyInstanceUID, study))
    wait_for("the draft to be sent", lambda: (
        (t := transfer_of(node, d.sop_instance_uid)) is not None and t.state == "done" and t))
    pacs_sr = wait_for("the draft in Orthanc", lambda: sr_in_pacs(pacs, d.sop_instance_uid))
    path = tmp_path / "draft.dcm"
    pacs_sr.save_as(path, enforce_file_format=True)
    check_sr_file(path)
    rep = sr.read_report(pacs_sr)
    assert (rep.completion_flag, rep.verification_flag, rep.preliminary_flag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert any("AI-GENERATED DRAFT" in c for c in rep.comments)
    assert set(rep.source_images) == {ds.SOPInstanceUID for ds in study}
