"""ReviewService: worklist, the exclusive claim, sign, reject, audit; no Qt, no network.

Fixtures are real: synthetic DX studies written through the node's Store and index, drafted
by the real plugin pipeline (see ``support.synthetic.build_node``), copied fresh for every test.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support import synthetic
from support.postgres import private_database

from dicom_node.db import AuditEvent, Draft, DraftState, Instance, Study, StudyState, Transfer
from plugin.drafting import sr
from plugin.review import service as review
from plugin.review.service import (
    ClaimConflictError,
    NotReviewableError,
    ReviewError,
    ReviewService,
    SignResult,
    UnknownReviewerError,
)


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    built = synthetic.build_node(root, synthetic.sample_studies(3, size=256))
    built.engine.dispose()  # checkpoint and close SQLite before the copies are taken
    return root


@pytest.fixture
def node(golden: Path, tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    n = synthetic.open_node(synthetic.copy_node(golden, tmp_path / "node"))
    yield n
    n.engine.dispose()


@pytest.fixture
def svc(node: synthetic.NodeFixture) -> ReviewService:
    return ReviewService(node.config, node.sessions, node.store)


class FakeClock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 11, 25, 9, 0, 0)

    def __call__(self) -> dt.datetime:
        return self.now


def audits(node: synthetic.NodeFixture, action: str) -> list[AuditEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def draft_row(node: synthetic.NodeFixture, draft_id: int) -> Draft:
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None
        s.expunge(d)
        return d


# -- worklist -------------------------------------------------------------------------------


def test_worklist_lists_drafts_with_patient_study_and_views(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    rows = svc.worklist()
    assert len(rows) == 3
    assert {r.state for r in rows} == {"new"}
    names = {r.patient_name for r in rows}
    assert "Moreau^Claire" in names
    row = next(r for r in rows if r.patient_name == "Moreau^Claire")
    assert row.patient_id == "CXR-10001"
    assert row.accession_number == "ACC10001"
    assert row.study_date == "20261124"
    assert sorted(row.views) == ["LL", "PA"]  # as the pipeline resolved them (ViewPosition LL)
    assert row.draft_id is not None and row.age_s >= 0
    assert row.model_name  # the model that wrote the draft is on the row


def test_worklist_search_sort_and_state_filter(svc: ReviewService) -> None:
    assert [r.patient_id for r in svc.worklist(search="claire")] == ["CXR-10001"]
    assert [r.patient_id for r in svc.worklist(search="acc10002")] == ["CXR-10002"]
    assert svc.worklist(search="nobody-has-this") == []
    by_name = [r.patient_name for r in svc.worklist(sort="patient_name", descending=False)]
    assert by_name == sorted(by_name, key=str.lower)
    assert [r.patient_name for r in svc.worklist(sort="patient_name", descending=True)] == by_name[::-1]
    assert svc.worklist(states=["signed"]) == []
    with pytest.raises(ValueError, match="sort"):
        svc.worklist(sort="colour")
    with pytest.raises(ValueError, match="states"):
        svc.worklist(states=["pending"])


def test_worklist_oldest_first_by_default(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    ids = [r.draft_id for r in svc.worklist()]
    with node.sessions() as s:
        d = s.get(Draft, ids[-1])
        assert d is not None
        d.created_at = dt.datetime(2020, 1, 1)
        s.commit()
    assert svc.worklist()[0].draft_id == ids[-1]


def test_worklist_shows_failed_studies(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    spec = synthetic.SyntheticStudy(key="failed-one", patient_name="Failing^Fred", patient_id="F1", size=64)
    synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec))
    with node.sessions() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == spec.study_instance_uid)).one()
        st.state = StudyState.FAILED
        s.commit()
    rows = svc.worklist()
    failed = [r for r in rows if r.state == "failed"]
    assert [r.patient_name for r in failed] == ["Failing^Fred"]
    assert failed[0].draft_id is None
    assert all(r.state != "failed" for r in svc.worklist(states=["new"]))


# -- claim ----------------------------------------------------------------------------------


def test_claim_is_exclusive_and_shown_to_others(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    detail = svc.claim(draft_id, "alice")
    assert detail.claimed_by == "alice" and detail.state == DraftState.IN_REVIEW
    with pytest.raises(ClaimConflictError, match="in review by alice") as exc:
        svc.claim(draft_id, "bob")
    assert exc.value.holder == "alice"
    row = next(r for r in svc.worklist() if r.draft_id == draft_id)
    assert row.state == "in_review" and row.state_label == "in review by alice"
    svc.claim(draft_id, "alice")  # renewing one's own claim is fine
    assert len(audits(node, "claimed")) == 1  # a renewal is not a new claim


def test_stale_claim_expires(node: synthetic.NodeFixture) -> None:
    clock = FakeClock()
    svc = ReviewService(node.config, node.sessions, node.store, claim_timeout_s=600, clock=clock)
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    svc.claim(draft_id, "alice")
    clock.now += dt.timedelta(seconds=599)
    with pytest.raises(ClaimConflictError):
        svc.claim(draft_id, "bob")
    clock.now += dt.timedelta(seconds=2)
    row = next(r for r in svc.worklist() if r.draft_id == draft_id)
    assert row.state == "new"  # an expired claim reads as open
    assert svc.claim(draft_id, "bob").claimed_by == "bob"
    took = audits(node, "claimed")[-1]
    assert took.actor == "bob" and "alice" in took.detail
    # alice's late sign must not go through: bob holds the draft now
    with pytest.raises(ClaimConflictError):
        svc.sign(draft_id, "alice", "Findings.", "Impression.")


def test_release_gives_the_draft_back(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    svc.claim(draft_id, "alice")
    assert svc.release(draft_id, "bob") is False  # not bob's to release
    assert svc.release(draft_id, "alice") is True
    assert draft_row(node, draft_id).state == DraftState.NEW
    assert svc.claim(draft_id, "bob").claimed_by == "bob"
    assert [e.actor for e in audits(node, "released")] == ["alice"]


def test_unknown_account_cannot_claim_sign_or_reject(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    for action in (
        lambda: svc.claim(draft_id, "mallory"),
        lambda: svc.sign(draft_id, "mallory", "F", "I"),
        lambda: svc.reject(draft_id, "mallory", "bad"),
    ):
        with pytest.raises(UnknownReviewerError, match="'mallory' is not a configured reviewer"):
            action()
    assert draft_row(node, draft_id).state == DraftState.NEW
    assert svc.is_reviewer("alice") and not svc.is_reviewer("mallory")


# -- sign -----------------------------------------------------------------------------------


def test_sign_writes_stores_indexes_audits_and_enqueues_the_verified_sr(
    svc: ReviewService, node: synthetic.NodeFixture
) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    before = svc.claim(draft_id, "alice")
    assert not before.is_final
    findings = before.findings + " Edited by the radiologist: small left pleural effusion."
    impression = "Small left pleural effusion."
    signed = svc.sign(draft_id, "alice", findings, impression)

    assert signed.state == DraftState.SIGNED
    assert signed.signed_by == "alice" and signed.signed_at is not None
    assert signed.signed_findings == findings.strip() and signed.signed_impression == impression
    assert signed.signed_sop_instance_uid and signed.signed_path
    path = node.store.abspath(signed.signed_path)
    ds = pydicom.dcmread(path)
    assert ds.VerificationFlag == "VERIFIED"
    assert ds.CompletionFlag == "COMPLETE"
    assert str(ds.VerifyingObserverSequence[0].VerifyingObserverName) == "Moreau^Alice^^Dr"
    assert ds.VerifyingObserverSequence[0].VerifyingOrganization == "Hôpital Saint-Louis, Radiology"
    report = sr.read_report(ds)
    assert report.findings == findings.strip() and report.impression == impression
    assert report.verification_flag == "VERIFIED" and report.predecessors == (before.sop_instance_uid,)
    assert ds.SOPInstanceUID == signed.signed_sop_instance_uid

    with node.sessions() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
        assert inst.generated == 1 and inst.path == signed.signed_path
        transfers = list(s.scalars(select(Transfer).where(Transfer.sop_instance_uid == ds.SOPInstanceUID)))
        assert [t.destination for t in transfers] == ["pacs"]
        study = s.scalars(select(Study).where(Study.study_instance_uid == ds.StudyInstanceUID)).one()
        assert study.state == StudyState.SIGNED
    ev = audits(node, "signed")
    assert len(ev) == 1 and ev[0].actor == "alice" and ev[0].object_uid == ds.SOPInstanceUID
    assert json.loads(ev[0].detail)["verifier"] == "Moreau^Alice^^Dr"
    edited = audits(node, "edited")
    assert len(edited) == 1
    changed = json.loads(edited[0].detail)["changed"]
    assert set(changed) == {"findings", "impression"}
    assert changed["findings"]["added"] == 8 and changed["findings"]["removed"] == 0
    assert "effusion" not in edited[0].detail  # counts only: no report text in the audit table

    detail = svc.detail(draft_id)
    assert detail.is_final and not detail.is_open
    assert [r.state for r in svc.worklist(states=["signed"])] == ["signed"]


def test_signed_draft_is_read_only(svc: ReviewService) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    d = svc.detail(draft_id)
    svc.sign(draft_id, "alice", d.findings, d.impression)
    with pytest.raises(NotReviewableError, match="already signed"):
        svc.sign(draft_id, "alice", "Other text.", "Other.")
    with pytest.raises(NotReviewableError, match="already signed"):
        svc.claim(draft_id, "bob")
    with pytest.raises(NotReviewableError, match="already signed"):
        svc.reject(draft_id, "bob", "too late")


def test_unchanged_text_signs_without_an_edit_event(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    d = svc.detail(draft_id)
    svc.sign(draft_id, "bob", d.findings, d.impression)
    assert audits(node, "edited") == []
    assert len(audits(node, "signed")) == 1


def test_superseded_draft_cannot_be_signed(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    svc.claim(draft_id, "alice")
    with node.sessions() as s:  # the study gained an image; the pipeline replaced the draft
        d = s.get(Draft, draft_id)
        assert d is not None
        d.state = DraftState.SUPERSEDED
        s.commit()
    files_before = sorted(p.name for p in node.store.root.rglob("*.dcm"))
    with pytest.raises(NotReviewableError, match="superseded"):
        svc.sign(draft_id, "alice", "F.", "I.")
    assert sorted(p.name for p in node.store.root.rglob("*.dcm")) == files_before
    assert audits(node, "signed") == []
    assert all(r.draft_id != draft_id for r in svc.worklist(states=None))


def test_empty_report_cannot_be_signed(svc: ReviewService) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    with pytest.raises(ReviewError, match="empty"):
        svc.sign(draft_id, "alice", "  ", "\n")


def test_placeholders_cannot_be_signed_by_any_client(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    """"xxxx" from the de-identified training reports is never signed, whatever the client."""
    from plugin.review.service import PlaceholderError, placeholders

    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    with pytest.raises(PlaceholderError, match="1 de-identification placeholder"):
        svc.sign(draft_id, "alice", "The xxxx are intact.", "No acute disease.")
    assert draft_row(node, draft_id).state != "signed" and not audits(node, "signed")
    assert placeholders("XXXX-year-old; boxxxer; xx") == 1  # whole words of three or more x only
    signed = svc.sign(draft_id, "alice", "The bones are intact.", "No acute disease.")
    assert signed.state == "signed"


# -- reject ---------------------------------------------------------------------------------


def test_reject_needs_a_reason_and_is_audited(svc: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    with pytest.raises(ReviewError, match="reason"):
        svc.reject(draft_id, "alice", "  ")
    svc.claim(draft_id, "bob")
    with pytest.raises(ClaimConflictError):
        svc.reject(draft_id, "alice", "wrong patient")
    d = svc.reject(draft_id, "bob", "Lateral view is of another patient.")
    assert d.state == DraftState.REJECTED and d.reject_reason == "Lateral view is of another patient."
    ev = audits(node, "rejected")
    assert [(e.actor, e.detail) for e in ev] == [("bob", "Lateral view is of another patient.")]
    with pytest.raises(NotReviewableError, match="rejected"):
        svc.sign(draft_id, "bob", "F.", "I.")
    row = svc.worklist(states=["rejected"])[0]
    assert row.detail == "Lateral view is of another patient."
    with node.sessions() as s:
        assert list(s.scalars(select(Transfer))) == []  # nothing was sent


# -- the two-reviewers race ------------------------------------------------------------------


def _race(node: synthetic.NodeFixture, draft_id: int, rounds_barrier: threading.Barrier) -> list[object]:
    """Two reviewers (two services, two sessions, two threads) press Sign at the same time."""
    results: list[object] = [None, None]

    def run(i: int, user: str) -> None:
        svc = ReviewService(node.config, node.sessions, node.store)
        rounds_barrier.wait()
        try:
            results[i] = svc.sign(draft_id, user, f"Findings by {user}.", f"Impression by {user}.")
        except ReviewError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, u)) for i, u in enumerate(("alice", "bob"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_two_reviewers_never_both_sign(node: synthetic.NodeFixture) -> None:
    for row in ReviewService(node.config, node.sessions, node.store).worklist():
        assert row.draft_id is not None
        results = _race(node, row.draft_id, threading.Barrier(2))
        winners = [r for r in results if isinstance(r, SignResult)]
        losers = [r for r in results if isinstance(r, ReviewError)]
        assert len(winners) == 1 and len(losers) == 1, results
        winner = winners[0]
        assert isinstance(winner, SignResult)
        d = draft_row(node, row.draft_id)
        assert d.state == DraftState.SIGNED and d.signed_by == winner.signed_by
        assert d.signed_findings == f"Findings by {d.signed_by}."
    signed = audits(node, "signed")
    assert len(signed) == 3
    # exactly one verified SR per draft in the store and the index
    with node.sessions() as s:
        generated = list(s.scalars(select(Instance).where(Instance.generated == 1)))
    verified = [i for i in generated if pydicom.dcmread(node.store.abspath(i.path)).VerificationFlag == "VERIFIED"]
    assert len(verified) == 3
    on_disk = [p for p in node.store.root.rglob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).get("VerificationFlag") == "VERIFIED"]
    assert len(on_disk) == 3


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards)."""
    with private_database("review") as url:
        yield url


@pytest.mark.postgres
def test_two_reviewers_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    node = synthetic.build_node(tmp_path / "pg", synthetic.sample_studies(2, size=128), database_url=postgres_url)
    try:
        for row in ReviewService(node.config, node.sessions, node.store).worklist():
            assert row.draft_id is not None
            results = _race(node, row.draft_id, threading.Barrier(2))
            assert sum(isinstance(r, SignResult) for r in results) == 1, results
            assert sum(isinstance(r, ReviewError) for r in results) == 1, results
        assert len(audits(node, "signed")) == 2
    finally:
        node.engine.dispose()


# -- pure helpers -----------------------------------------------------------------------------


def test_parse_grounded() -> None:
    raw = json.dumps({"tokens": [["Cardiomegaly", 0.7], [".", 0.7]], "grounded": [["Cardiomegaly.", 0.7]]})
    assert review.parse_grounded(raw) == (("Cardiomegaly.", 0.7),)
    assert review.parse_token_info(raw) == (("Cardiomegaly", 0.7), (".", 0.7))  # not mixed into the tokens
    assert review.parse_grounded(json.dumps([["x", 0.1]])) == () and review.parse_grounded("bad") == ()
    assert review.parse_grounded(json.dumps({"grounded": [["x", True], [1, 0.2], ["ok", 1]]})) == (("ok", 1.0),)


def test_parse_token_info_reads_the_one_shape_the_pipeline_writes() -> None:
    # the pipeline has written {"tokens": [[word, p], ...], ...} since its first commit (279e90f);
    # other shapes were never written and read as no tokens (issue 15: one shape, plugin.token_info)
    assert review.parse_token_info(json.dumps({"tokens": [["Ġheart", 0.9], ["size", 0.4]]})) == (
        ("heart", 0.9), ("size", 0.4))
    assert review.parse_token_info(json.dumps({"tokens": [["##ed", 0.5], ["▁normal", 1]]})) == (
        ("ed", 0.5), ("normal", 1.0))
    assert review.parse_token_info("not json") == ()
    assert review.parse_token_info("") == ()
    assert review.parse_token_info(json.dumps({"tokens": [["x", "high"], [3, 0.1], ["y", True]]})) == ()
    assert review.parse_token_info(json.dumps([["heart", 0.9]])) == ()  # a bare list: never written


def test_text_diff() -> None:
    assert review.text_diff("a\nb", "a\nb") == ""
    d = review.text_diff("No effusion.", "Small effusion.")
    assert "-No effusion." in d and "+Small effusion." in d


def test_copy_node_is_independent(golden: Path, tmp_path: Path) -> None:
    a = synthetic.open_node(synthetic.copy_node(golden, tmp_path / "a"))
    b = synthetic.open_node(synthetic.copy_node(golden, tmp_path / "b"))
    draft_id = ReviewService(a.config, a.sessions, a.store).worklist()[0].draft_id
    assert draft_id is not None
    ReviewService(a.config, a.sessions, a.store).claim(draft_id, "alice")
    assert draft_row(b, draft_id).state == DraftState.NEW
    shutil.rmtree(tmp_path / "a")
