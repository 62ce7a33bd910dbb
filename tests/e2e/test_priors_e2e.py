"""Priors end to end (issue 17), everything real on loopback: Orthanc is the PACS and holds a
prior chest radiograph study of a patient with its verified SR and a PDF report; it sends the
current study of the same patient to a running node (SCP, promoter, worker with the shipped
model, prior pruner) whose ``[priors]`` destination is that Orthanc. The node fetches the prior
by C-FIND + C-GET while it drafts; the draft SR's comparison section names the prior (dciodvfy 0
errors); the reviewer window (pytest-qt) shows the prior's views and its report text; a study of
a patient with no prior says so; a dead Q/R destination does not block the draft; retention
prunes the prior once no open draft compares with it. Run with ``-k prior``.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from pydicom import dcmread  # noqa: E402
from sqlalchemy import select  # noqa: E402
from support.nodeenv import bundle_for_tests  # noqa: E402
from support.orthanc import AE_TITLE, OrthancServer, available  # noqa: E402
from support.polling import wait_for  # noqa: E402
from support.priors import PRIOR_IMPRESSION, patient_history  # noqa: E402
from support.sr_checks import check_sr_file  # noqa: E402

from dicom_node.config import load_config  # noqa: E402
from dicom_node.db import Draft, Job, PriorStudy, Study  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from plugin.drafting import pipeline, sr  # noqa: E402
from plugin.review.service import ReviewService  # noqa: E402

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

NODE_AE = "CXRNODE"
REVIEWER = ("jdoe", "Doe^Jane", "General Hospital Radiology")




def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def system(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Node, OrthancServer]]:
    """A running node whose priors come from Orthanc (param "live") or from a dead port ("dead")."""
    mode = getattr(request, "param", "live")
    if not available():
        pytest.skip("Orthanc is not installed")
    pacs = OrthancServer(tmp_path / "orthanc", modalities={})
    qr_port = pacs.dicom_port if mode == "live" else _dead_port()
    toml = f"""
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = 0
storage_dir = {json.dumps(str(tmp_path / "node"))}
min_free_space_mb = 0
fsync = false
[study]
quiet_period_s = 1.0
[jobs]
poll_interval_s = 0.1
[model]
bundle = {json.dumps(bundle_for_tests())}
[priors]
enabled = true
destination = "{AE_TITLE}@127.0.0.1:{qr_port}"
timeout_s = 5.0
retention_days = 0.0
prune_interval_s = 1.0
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


def upload(pacs: OrthancServer, datasets: list) -> set[str]:
    ids = set()
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ids.add(pacs.upload_bytes(buf.getvalue())["ParentStudy"])
    return ids


def send_current(pacs: OrthancServer, current: list) -> None:
    for sid in upload(pacs, current):
        pacs.send_to_modality("cxrnode", [sid])


def draft_of(node: Node, study_uid: str, n_images: int) -> Draft | None:
    assert node.sessions is not None
    with node.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one_or_none()
        if study is None:
            return None
        d = s.scalars(select(Draft).where(Draft.study_id == study.id, Draft.state == "new")).first()
        if d is None or len(json.loads(d.views or "[]")) != n_images:
            return None
        s.expunge(d)
        return d


def job_log(node: Node, study_uid: str) -> str:
    """The study's job logs once a job has logged its priors line (a job's log reaches the
    database after its draft: read it only when it is there)."""
    assert node.sessions is not None

    def logged() -> str:
        with node.sessions() as s:
            text = "\n".join(j.log or "" for j in s.scalars(
                select(Job).join(Study).where(Study.study_instance_uid == study_uid)))
        return text if "priors: " in text else ""

    return str(wait_for("the job's priors line", logged, timeout=60.0))


def test_prior_fetched_compared_in_sr_shown_in_reviewer_then_pruned(system, tmp_path: Path, qtbot) -> None:  # type: ignore[no-untyped-def]
    node, pacs = system
    h = patient_history("e2e")
    upload(pacs, [*h.prior_images, h.prior_sr, h.prior_pdf])
    send_current(pacs, h.current)
    d = wait_for("the draft of the current study", lambda: draft_of(node, str(h.current[0].StudyInstanceUID), 2))

    # the node fetched the prior by C-FIND + C-GET, apart from its own studies
    assert node.sessions is not None
    with node.sessions() as s:
        prior = s.scalars(select(PriorStudy)).one()
        assert prior.study_instance_uid == h.prior_study_uid and prior.study_date == "20100115"
        assert prior.report_kind == "sr" and PRIOR_IMPRESSION in prior.report_text
        assert sorted(i.modality for i in prior.instances) == ["CR", "CR", "DOC", "SR"]
        assert all(i.path.startswith("priors/") for i in prior.instances)
        assert s.scalars(select(Study).where(Study.study_instance_uid == h.prior_study_uid)).first() is None
    log = job_log(node, str(h.current[0].StudyInstanceUID))
    assert "priors: found" in log and h.patient_id not in log

    # the draft SR names the prior in its comparison section; dciodvfy 0 errors
    ds = dcmread(node.store.abspath(d.path))
    check_sr_file(node.store.abspath(d.path))
    rep = sr.read_report(ds)
    assert rep.prior is not None and rep.prior.study_instance_uid == h.prior_study_uid
    assert "2010-01-15" in rep.prior.description and "does not use prior studies yet" in rep.prior.description
    assert json.loads(d.token_info)["prior"]["outcome"] == "found"

    # the reviewer shows the prior's views and its report text, dated and read-only
    from gui.window import ReviewerWindow

    svc = ReviewService(node.config, node.sessions, node.store)
    w = ReviewerWindow(svc, REVIEWER[0], refresh_interval_s=0)
    w.show_error = lambda title, text: None  # type: ignore[method-assign]
    w.confirm = lambda title, text: True  # type: ignore[method-assign]
    qtbot.addWidget(w)
    w.resize(1400, 850)
    w.show()
    with qtbot.waitSignal(w.review_shown, timeout=60000):
        w.open_draft(d.id)
    assert sorted(w.priors.labels()) == ["PRIOR LL", "PRIOR PA"]  # the prior's two views
    header = w.priors.header_text()
    assert "2010-01-15" in header and "READ-ONLY" in header and "days earlier" in header
    assert PRIOR_IMPRESSION in w.priors.report.toPlainText() and w.priors.report.isReadOnly()
    assert w.priors.isVisible()
    # window/level and zoom are linked: a drag on a current view moves the prior's too
    cur, pri = w.study.views[0], w.priors.views[0]
    before = pri.state.effective_window  # type: ignore[union-attr]
    cur.drag_window(120, -60)
    cur.zoom_by(1.5)
    assert pri.state.effective_window != before  # type: ignore[union-attr]
    assert pri.transform.zoom == pytest.approx(cur.transform.zoom)
    w.toggle_prior()
    assert not w.priors.isVisible()
    w.toggle_prior()
    assert w.priors.isVisible()

    # signed: the verified SR keeps the comparison; with no open draft left, retention prunes
    signed = svc.sign(d.id, REVIEWER[0], d.findings or "No findings.", "No interval change.")
    signed_ds = dcmread(node.store.abspath(signed.signed_path))
    assert sr.read_report(signed_ds).prior == rep.prior
    w.close()
    wait_for("the prior to be pruned (retention_days = 0, draft signed)", lambda: _no_priors(node), timeout=60)
    assert not (Path(node.config.node.storage_dir) / "priors" / h.prior_study_uid).exists()


def _no_priors(node: Node) -> bool:
    assert node.sessions is not None
    with node.sessions() as s:
        return s.scalars(select(PriorStudy)).first() is None


def test_prior_none_found_says_so(system, qtbot) -> None:  # type: ignore[no-untyped-def]
    node, pacs = system
    h = patient_history("lonely")
    send_current(pacs, h.current)  # the PACS has only this study of the patient
    d = wait_for("the draft", lambda: draft_of(node, str(h.current[0].StudyInstanceUID), 2))
    rep = sr.read_report(dcmread(node.store.abspath(d.path)))
    assert rep.prior is not None and not rep.prior.study_instance_uid
    assert "No prior chest radiograph" in rep.prior.description
    svc = ReviewService(node.config, node.sessions, node.store)
    detail = svc.prior(d.id)
    assert detail.outcome == "none" and detail.message.startswith("No prior chest radiographs found")
    from gui.window import ReviewerWindow

    w = ReviewerWindow(svc, REVIEWER[0], refresh_interval_s=0)
    w.show_error = lambda title, text: None  # type: ignore[method-assign]
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.review_shown, timeout=60000):
        w.open_draft(d.id)
    assert w.priors.header_text() == "No prior chest radiographs found"
    assert w.priors.message.isVisible() and w.priors.views == []
    w.close()


@pytest.mark.parametrize("system", ["dead"], indirect=True)
def test_prior_dead_pacs_does_not_block_the_draft(system, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node, pacs = system
    h = patient_history("dead")
    upload(pacs, [*h.prior_images, h.prior_sr])
    send_current(pacs, h.current)
    d = wait_for("the draft, although the Q/R destination is down",
                 lambda: draft_of(node, str(h.current[0].StudyInstanceUID), 2))
    info = json.loads(d.token_info)["prior"]
    assert info["outcome"] == "unavailable" and "did not answer" in info["reason"]
    rep = sr.read_report(dcmread(node.store.abspath(d.path)))
    assert rep.prior is not None and "could not be retrieved" in rep.prior.description
    check_sr_file(node.store.abspath(d.path))
    assert "priors: unavailable" in job_log(node, str(h.current[0].StudyInstanceUID))
