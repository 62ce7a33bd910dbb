"""After signing and safety records (issue 17), on the review service (no Qt, no network):
addenda (``-k addendum``), the critical-result flag at signing (``-k critical``), studies with no
usable draft (failed, skipped, rejected: report from scratch, retry drafting), typed results.

Every SR written here passes dciodvfy with zero errors, dsrdump and highdicom
(``support.sr_checks.check_sr_file``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support import synthetic
from support.sr_checks import check_sr_file

from dicom_node import index
from dicom_node.db import AuditEvent, Draft, DraftState, Instance, Job, Study, StudyState, Transfer
from dicom_node.jobs import JobResult
from dicom_node.review_records import CriticalResult, ReportAddendum
from plugin.drafting import sr
from plugin.review import addenda, scratch
from plugin.review.results import AddendumResult, CriticalNotice, RejectResult, SignResult
from plugin.review.service import (
    NotReviewableError,
    PlaceholderError,
    ReviewError,
    ReviewService,
    UnknownReviewerError,
)

NO_UNDO = "[review]\nundo_window_s = 0\n"


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden-after")
    built = synthetic.build_node(root, synthetic.sample_studies(2, size=256, prefix="after"), extra_toml=NO_UNDO)
    built.engine.dispose()
    return root


@pytest.fixture
def node(golden: Path, tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    n = synthetic.open_node(synthetic.copy_node(golden, tmp_path / "node"))
    yield n
    n.engine.dispose()


@pytest.fixture
def svc(node: synthetic.NodeFixture) -> ReviewService:
    return ReviewService(node.config, node.sessions, node.store)


def audits(node: synthetic.NodeFixture, action: str) -> list[AuditEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def transfers_of(node: synthetic.NodeFixture, sop: str) -> list[Transfer]:
    with node.sessions() as s:
        return list(s.scalars(select(Transfer).where(Transfer.sop_instance_uid == sop)))


def first_draft(svc: ReviewService) -> int:
    return min(r.draft_id or 0 for r in svc.worklist())


def told(minutes_ago: int = 5) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes_ago)


# -- the critical-result flag at signing ---------------------------------------------------------


def test_critical_result_recorded_audited_and_coded_in_the_signed_sr(svc: ReviewService, node: synthetic.NodeFixture,
                                                                      tmp_path: Path) -> None:
    draft_id = first_draft(svc)
    when = told(7)
    notice = CriticalNotice("Dr Ann Lee", "ED attending", "telephone", when)
    result = svc.sign(draft_id, "alice", "Large right pneumothorax.", "Right tension pneumothorax.", critical=notice)
    assert isinstance(result, SignResult) and result.state == "signed"
    assert result.critical is not None and result.critical.recipient == "Dr Ann Lee"
    assert result.critical.recorded_by == "alice" and result.critical.method_label == "Telephone"
    # stored
    with node.sessions() as s:
        row = s.scalars(select(CriticalResult)).one()
        assert (row.draft_id, row.sop_instance_uid, row.method) == (draft_id, result.signed_sop_instance_uid, "telephone")
        assert (row.recipient_name, row.recipient_role, row.recorded_by) == ("Dr Ann Lee", "ED attending", "alice")
        assert abs((row.communicated_at - when.replace(tzinfo=None)).total_seconds()) < 1
    # audited (who was told, how, when)
    [ev] = audits(node, "critical_result")
    detail = json.loads(ev.detail)
    assert ev.actor == "alice" and ev.object_uid == result.signed_sop_instance_uid
    assert detail["method"] == "telephone" and detail["recipient"] == "Dr Ann Lee" and detail["role"] == "ED attending"
    # in the verified SR: section LN 73568-8 with the coded item DCM 121291 = how
    path = node.store.abspath(result.signed_path)
    check_sr_file(path)
    ds = pydicom.dcmread(path)
    report = sr.read_report(ds)
    assert report.critical is not None
    assert (report.critical.recipient, report.critical.role, report.critical.method) == (
        "Dr Ann Lee", "ED attending", "telephone")
    assert abs((report.critical.communicated_at - when).total_seconds()) < 1
    section = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "73568-8")
    assert section.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    coded = next(i for i in section.ContentSequence if i.ValueType == "CODE")
    assert (coded.ConceptNameCodeSequence[0].CodeValue, coded.ConceptNameCodeSequence[0].CodingSchemeDesignator) == (
        "121291", "DCM")
    assert coded.ConceptCodeSequence[0].CodeValue == "CXRN-COMM-PHONE"
    text = next(i for i in section.ContentSequence if i.ValueType == "TEXT")
    assert "discussed by telephone with Dr Ann Lee (ED attending)" in text.TextValue
    assert "Dr Alice Moreau" in text.TextValue  # who told them: the signing radiologist
    assert report.verification_flag == "VERIFIED"


def test_critical_result_refuses_missing_fields_and_signs_nothing(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = first_draft(svc)
    for bad, match in ((CriticalNotice("", "ED attending", "telephone", told()), "name"),
                       (CriticalNotice("Dr Lee", " ", "telephone", told()), "role"),
                       (CriticalNotice("Dr Lee", "ED", "pigeon", told()), "method"),
                       (CriticalNotice("Dr Lee", "ED", "in_person", told(-60)), "future")):
        with pytest.raises(ReviewError, match=match):
            svc.sign(draft_id, "alice", "Pneumothorax.", "Pneumothorax.", critical=bad)
    with node.sessions() as s:
        assert s.get(Draft, draft_id).state != DraftState.SIGNED  # type: ignore[union-attr]
        assert s.scalars(select(CriticalResult)).all() == []
    assert audits(node, "critical_result") == []


def test_critical_result_goes_with_an_undone_signature(node: synthetic.NodeFixture) -> None:
    config = dataclasses.replace(node.config, review=dataclasses.replace(node.config.review, undo_window_s=30))
    svc = ReviewService(config, node.sessions, node.store)
    draft_id = first_draft(svc)
    signed = svc.sign(draft_id, "alice", "Pneumothorax.", "Pneumothorax.",
                      critical=CriticalNotice("Dr Lee", "ED", "secure_message", told()))
    svc.undo_sign(draft_id, "alice")
    with node.sessions() as s:
        assert s.scalars(select(CriticalResult)).all() == []
    assert not node.store.abspath(signed.signed_path).exists()
    assert len(audits(node, "critical_result")) == 1  # the audit trail keeps that it was recorded


# -- addenda -------------------------------------------------------------------------------------


def test_addendum_is_a_new_verified_sr_chained_by_predecessor_both_kept_and_sent(
        svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = first_draft(svc)
    signed = svc.sign(draft_id, "alice", "Heart size normal. Lungs clear.", "No acute disease.",
                      critical=CriticalNotice("Dr Lee", "Ward nurse", "in_person", told()))
    signed_file = node.store.abspath(signed.signed_path)
    signed_bytes = signed_file.read_bytes()
    first = addenda.add_addendum(svc, draft_id, "bob", "Subtle left apical pneumothorax on review; discussed.")
    assert isinstance(first, AddendumResult)
    assert first.predecessor_sop_instance_uid == signed.signed_sop_instance_uid
    assert first.author == "bob" and first.author_name == "Okafor^Bob^^Dr" and first.transfers == 1
    second = addenda.add_addendum(svc, draft_id, "alice", "Follow-up radiograph recommended.")
    assert second.predecessor_sop_instance_uid == first.sop_instance_uid  # one chain
    # the signed SR is unchanged and still indexed; every SR is in the store and the index
    assert signed_file.read_bytes() == signed_bytes
    with node.sessions() as s:
        uids = {i.sop_instance_uid: i.generated for i in s.scalars(select(Instance))}
        assert d_state(s, draft_id) == DraftState.SIGNED
    for uid in (signed.signed_sop_instance_uid, first.sop_instance_uid, second.sop_instance_uid):
        assert uids[uid] == 1
    # each addendum is a complete, verified TID 2000 report naming its predecessor
    for result, author, n in ((first, "Okafor^Bob^^Dr", 1), (second, "Moreau^Alice^^Dr", 2)):
        path = node.store.abspath(result.path)
        check_sr_file(path)
        ds = pydicom.dcmread(path)
        report = sr.read_report(ds)
        assert (ds.CompletionFlag, ds.VerificationFlag) == ("COMPLETE", "VERIFIED")
        assert report.predecessors == (result.predecessor_sop_instance_uid,)
        assert report.verifying_observer == author
        assert report.findings == "Heart size normal. Lungs clear." and report.impression == "No acute disease."
        assert len(report.addenda) == n and report.addenda[-1].text == result.text
        assert report.critical is not None and report.critical.method == "in_person"  # carried forward
        assert ds.StudyInstanceUID == pydicom.dcmread(signed_file).StudyInstanceUID
        section = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Addendum"]
        assert len(section) == n and section[0].ConceptNameCodeSequence[0].CodeValue == "55107-7"
    # both queued to the PACS through the outbound path, like the signed SR
    for uid in (signed.signed_sop_instance_uid, first.sop_instance_uid, second.sop_instance_uid):
        assert [t.destination for t in transfers_of(node, uid)] == ["pacs"]
    # audited
    evs = audits(node, "addendum")
    assert [(e.actor, e.object_uid) for e in evs] == [("bob", first.sop_instance_uid), ("alice", second.sop_instance_uid)]
    assert json.loads(evs[0].detail)["amends"] == signed.signed_sop_instance_uid
    rec = addenda.report_record(svc, draft_id)
    assert [a.sop_instance_uid for a in rec.addenda] == [first.sop_instance_uid, second.sop_instance_uid]
    assert rec.latest_sop_instance_uid == second.sop_instance_uid and rec.critical is not None


def d_state(s: object, draft_id: int) -> str:
    d = s.get(Draft, draft_id)  # type: ignore[attr-defined]
    return str(d.state)


def test_addendum_refusals(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = first_draft(svc)
    with pytest.raises(NotReviewableError, match="not signed"):
        addenda.add_addendum(svc, draft_id, "alice", "Too early.")
    svc.sign(draft_id, "alice", "Lungs clear.", "Normal.")
    with pytest.raises(UnknownReviewerError):
        addenda.add_addendum(svc, draft_id, "mallory", "Forged addendum.")
    with pytest.raises(ReviewError, match="empty"):
        addenda.add_addendum(svc, draft_id, "alice", "   ")
    with pytest.raises(PlaceholderError):
        addenda.add_addendum(svc, draft_id, "alice", "The xxxx is fine.")
    # within the undo window the signature is still the reviewer's to change
    config = dataclasses.replace(node.config, review=dataclasses.replace(node.config.review, undo_window_s=60))
    other = ReviewService(config, node.sessions, node.store)
    second = max(r.draft_id or 0 for r in other.worklist())
    other.sign(second, "alice", "Lungs clear.", "Normal.")
    with pytest.raises(ReviewError, match="undone"):
        addenda.add_addendum(other, second, "alice", "Addendum.")
    with node.sessions() as s:
        assert s.scalars(select(ReportAddendum)).all() == []
    assert audits(node, "addendum") == []
    # Send now ends the undo window: the report is out, an addendum may follow
    assert other.send_signed_now(second, "alice") == 1
    added = addenda.add_addendum(other, second, "alice", "Addendum after Send now.")
    with pytest.raises(ReviewError, match="undone|only your own"):
        other.undo_sign(second, "alice")  # and the signature under it cannot be withdrawn any more
    assert addenda.report_record(other, second).addenda[0].sop_instance_uid == added.sop_instance_uid


def test_addendum_cannot_be_overwritten_by_a_peer(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    """Issue 13 holds for addenda: the node's own SRs are never replaced by something received."""
    draft_id = first_draft(svc)
    signed = svc.sign(draft_id, "alice", "Lungs clear.", "Normal.")
    added = addenda.add_addendum(svc, draft_id, "alice", "Addendum text.")
    forged = pydicom.dcmread(node.store.abspath(added.path))
    forged.ContentSequence[-1].ContentSequence[0].TextValue = "Forged by a peer."
    for sop, rel in ((added.sop_instance_uid, added.path), (signed.signed_sop_instance_uid, signed.signed_path)):
        forged.SOPInstanceUID = sop
        with node.sessions() as s, pytest.raises(index.InstanceConflict) as info:
            index.check_received(s, sop, rel, "0" * 64)
        assert info.value.node_object
        with node.sessions() as s, s.begin(), pytest.raises(index.InstanceConflict):
            index.register_instance(s, forged, rel, 1, "0" * 64, "EVIL", generated=False)
    assert "Forged" not in sr.read_report(pydicom.dcmread(node.store.abspath(added.path))).addenda[0].text


# -- typed results -------------------------------------------------------------------------------


def test_sign_and_reject_return_typed_results(svc: ReviewService) -> None:
    ids = sorted(r.draft_id or 0 for r in svc.worklist())
    rejected = svc.reject(ids[0], "alice", "wrong side marker")
    assert isinstance(rejected, RejectResult) and (rejected.state, rejected.reject_reason) == ("rejected", "wrong side marker")
    signed = svc.sign(ids[1], "alice", "Lungs clear.", "Normal.")
    assert isinstance(signed, SignResult) and signed.critical is None and signed.signed_by == "alice"


# -- failed, skipped and rejected studies stay reachable -----------------------------------------


def _undrafted(node: synthetic.NodeFixture, key: str, handler: object) -> str:
    spec = synthetic.SyntheticStudy(key=key, patient_name="Nodraft^Nina", patient_id=f"ND-{key}", size=64)
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec))
    with pytest.raises(RuntimeError, match="no draft"):
        synthetic.run_draft_job(node, spec.study_instance_uid, handler=handler)
    return spec.study_instance_uid


def _fail(ctx: object) -> JobResult:
    raise RuntimeError("model bundle missing")


def _skip(ctx: object) -> JobResult:
    return JobResult("skipped", "no chest radiograph in the study (modality CT)")


def test_skipped_studies_listed_under_all_with_their_reason(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    uid = _undrafted(node, "skip-1", _skip)
    rows = {r.study_instance_uid: r for r in svc.worklist(states=None)}
    assert rows[uid].state == "skipped" and rows[uid].draft_id is None
    assert "no chest radiograph" in rows[uid].detail
    assert uid not in {r.study_instance_uid for r in svc.worklist()}  # not waiting to be read
    detail = scratch.study_detail(svc, uid)
    assert detail.draft_id == 0 and detail.state == "skipped" and "no chest radiograph" in detail.no_ai_draft_reason
    assert len(detail.views) == 2 and all(v.path is not None and v.path.exists() for v in detail.views)


def test_report_from_scratch_signs_a_verified_sr_with_no_ai_text(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    uid = _undrafted(node, "fail-1", _fail)
    detail = scratch.study_detail(svc, uid)
    assert detail.state == "failed" and "model bundle missing" in detail.no_ai_draft_reason
    draft_id = scratch.report_from_scratch(svc, uid, "alice")
    d = svc.detail(draft_id)
    assert (d.findings, d.impression, d.tokens, d.model_name) == ("", "", (), "")
    assert d.state == "in_review" and d.claimed_by == "alice" and "drafting failed" in d.no_ai_draft_reason
    row = next(r for r in svc.worklist(states=None) if r.draft_id == draft_id)
    assert "model bundle missing" in row.no_ai_draft_reason and not row.model_name
    assert [v.view for v in d.views] == ["PA", "LL"] or len(d.views) == 2
    with pytest.raises(ReviewError, match="open draft"):
        scratch.report_from_scratch(svc, uid, "bob")
    signed = svc.sign(draft_id, "alice", "Heart size normal. Lungs clear.", "No acute cardiopulmonary disease.")
    path = node.store.abspath(signed.signed_path)
    check_sr_file(path)
    report = sr.read_report(pydicom.dcmread(path))
    assert report.verification_flag == "VERIFIED" and report.no_ai_draft and report.device_model == ""
    assert report.findings == "Heart size normal. Lungs clear."
    assert not any("AI-GENERATED" in c or "Drafted by" in c for c in report.comments)
    assert report.predecessors == (d.sop_instance_uid,)
    assert [t.destination for t in transfers_of(node, signed.signed_sop_instance_uid)] == ["pacs"]
    assert transfers_of(node, d.sop_instance_uid) == []  # the placeholder is never sent
    [ev] = audits(node, "report_from_scratch")
    assert ev.actor == "alice" and ev.study_instance_uid == uid
    with pytest.raises(ReviewError, match="addendum"):
        scratch.report_from_scratch(svc, uid, "alice")


def test_report_from_scratch_after_a_rejected_draft(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = first_draft(svc)
    study_uid = svc.detail(draft_id).study_instance_uid
    with pytest.raises(ReviewError, match="open draft"):
        scratch.report_from_scratch(svc, study_uid, "alice")
    svc.reject(draft_id, "alice", "hallucinated pacemaker")
    new_id = scratch.report_from_scratch(svc, study_uid, "alice")
    assert "rejected: hallucinated pacemaker" in svc.detail(new_id).no_ai_draft_reason
    signed = svc.sign(new_id, "alice", "No device.", "Normal chest.")
    check_sr_file(node.store.abspath(signed.signed_path))
    with pytest.raises(ReviewError, match="failed or was skipped"):
        scratch.retry_drafting(svc, study_uid, "alice")


def test_report_from_scratch_stops_when_images_arrive(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    """A report from scratch is a draft like any other: images arriving while it is open stop it."""
    uid = _undrafted(node, "fail-2", _fail)
    draft_id = scratch.report_from_scratch(svc, uid, "alice")
    spec = synthetic.SyntheticStudy(key="fail-2", patient_name="Nodraft^Nina", patient_id="ND-fail-2", size=64,
                                    views=("PA", "LATERAL", "AP"))
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec)[2:])
    from plugin.review.service import StudyChangedError

    with pytest.raises(StudyChangedError):
        svc.sign(draft_id, "alice", "Findings.", "Impression.")


def test_retry_drafting_enqueues_a_job_audited(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    uid = _undrafted(node, "fail-3", _fail)
    result = scratch.retry_drafting(svc, uid, "bob")
    with node.sessions() as s:
        job = s.get(Job, result.job_id)
        assert job is not None and (job.kind, job.state) == ("draft", "pending")
        st = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        assert st.state == StudyState.QUEUED and job.study_generation == st.generation
    [ev] = audits(node, "drafting_retried")
    assert ev.actor == "bob" and json.loads(ev.detail)["job"] == result.job_id
    with pytest.raises(ReviewError, match="failed or was skipped|running"):
        scratch.retry_drafting(svc, uid, "bob")
    with pytest.raises(UnknownReviewerError):
        scratch.retry_drafting(svc, uid, "mallory")
    # the worker drafts it: the study's draft is in the worklist, no longer a failed row
    draft_id = synthetic.run_draft_job(node, uid)
    rows = [r for r in svc.worklist() if r.study_instance_uid == uid]
    assert [(r.draft_id, r.state) for r in rows] == [(draft_id, "new")]


# -- the same on PostgreSQL (row locks, the append-only audit table, migration 0004) --------------


@pytest.fixture
def postgres_url() -> Iterator[str]:
    from support.postgres import private_database

    with private_database("after") as url:
        yield url


@pytest.mark.postgres
def test_critical_addendum_and_scratch_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    node = synthetic.build_node(tmp_path / "pg", synthetic.sample_studies(1, size=128, prefix="pg-after"),
                                database_url=postgres_url, extra_toml=NO_UNDO)
    try:
        svc = ReviewService(node.config, node.sessions, node.store)
        draft_id = first_draft(svc)
        signed = svc.sign(draft_id, "alice", "Pneumothorax.", "Right pneumothorax.",
                          critical=CriticalNotice("Dr Lee", "ED physician", "in_person", told()))
        first = addenda.add_addendum(svc, draft_id, "bob", "First addendum.")
        second = addenda.add_addendum(svc, draft_id, "alice", "Second addendum.")
        assert second.predecessor_sop_instance_uid == first.sop_instance_uid
        assert first.predecessor_sop_instance_uid == signed.signed_sop_instance_uid
        rec = addenda.report_record(svc, draft_id)
        assert rec.critical is not None and rec.critical.method == "in_person" and len(rec.addenda) == 2
        assert [e.action for e in audits(node, "addendum")] == ["addendum", "addendum"]
        uid = _undrafted(node, "pg-fail", _fail)
        new_id = scratch.report_from_scratch(svc, uid, "alice")
        done = svc.sign(new_id, "alice", "Lungs clear.", "Normal.")
        check_sr_file(node.store.abspath(done.signed_path))
        assert scratch.retry_drafting(svc, _undrafted(node, "pg-skip", _skip), "bob").job_id > 0
    finally:
        node.engine.dispose()


@pytest.mark.postgres
def test_held_transfers_follow_the_database_clock_not_the_reviewers(tmp_path: Path, postgres_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The undo window's held transfers are compared with the database's clock, like the sender
    does: a reviewer desktop whose clock runs a day fast still releases (Send now) and still
    refuses an addendum while the signature can be undone."""
    from plugin.review import service as service_mod

    node = synthetic.build_node(tmp_path / "pg", synthetic.sample_studies(1, size=256, prefix="clk"),
                                database_url=postgres_url)
    try:
        svc = ReviewService(node.config, node.sessions, node.store)
        draft_id = svc.worklist()[0].draft_id
        assert draft_id is not None
        svc.claim(draft_id, "alice")
        svc.sign(draft_id, "alice", "Heart normal.", "No acute abnormality.")
        fast = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=1)
        monkeypatch.setattr(service_mod, "utcnow", lambda: fast)
        monkeypatch.setattr(addenda, "utcnow", lambda: fast, raising=False)
        with pytest.raises(ReviewError, match="can still be undone"):
            addenda.add_addendum(svc, draft_id, "alice", "Addendum text.")
        assert svc.send_signed_now(draft_id, "alice") == 1
    finally:
        node.engine.dispose()
