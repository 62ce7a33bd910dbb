"""gui.viewmodels without Qt: formatting, worklist model, uncertain-word spans, review states."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select
from support import synthetic

from dicom_node.db import AuditEvent, DraftState
from gui import viewmodels
from gui.viewmodels import ReviewModel, WorklistModel, open_review
from plugin.review.draft_info import InputCheck, ObservationCall, ViewCheck
from plugin.review.service import DraftDetail, ReviewError, ReviewService, WorklistRow


def test_formatting() -> None:
    assert viewmodels.format_person_name("Moreau^Claire") == "MOREAU, Claire"
    assert viewmodels.format_person_name("Doe^John^Q^Mr") == "DOE, Mr John Q"
    assert viewmodels.format_person_name("") == ""
    assert viewmodels.person_display("Moreau^Alice^^Dr") == "Dr Alice Moreau"
    assert [viewmodels.view_label(v) for v in ("PA", "AP", "LATERAL", "LL", "")] == [
        "PA", "AP", "LATERAL", "LATERAL (LL)", "VIEW ?"]
    assert viewmodels.format_da("20261124") == "2026-11-24"
    assert viewmodels.format_da("") == ""
    assert [viewmodels.format_age(s) for s in (5, 125, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "5 s", "2 min", "3 h 05", "2 d 4 h"]
    assert viewmodels.patient_age("19580302", "20261124") == "68 y"
    assert viewmodels.patient_age("19580302", "") == ""


def row(i: int, state: str = "new", **kw: object) -> WorklistRow:
    base: dict[str, object] = dict(
        draft_id=i, study_instance_uid=f"1.2.{i}", patient_name=f"P^{i}", patient_id=f"ID{i}", study_date="20261124",
        accession_number=f"A{i}", views=("PA", "LATERAL"), created_at=dt.datetime(2026, 11, 25), age_s=60.0 * i,
        state=state,
    )
    base.update(kw)
    return WorklistRow(**base)  # type: ignore[arg-type]


def test_cells_and_next_open_row() -> None:
    r = row(1, "in_review", claimed_by="bob")
    texts = [viewmodels.cell_text(r, c) for c in range(len(viewmodels.COLUMNS))]
    age = viewmodels.format_study_age("20261124")
    assert texts == ["—", "P, 1", "ID1", "2026-11-24", "A1", "PA + LATERAL", age, "1 min", "in review by bob",
                     "drafted (input not checked)"]
    state = viewmodels.column_index("State")
    assert viewmodels.cell_text(r, state, user="bob") == "in review by you"
    assert viewmodels.cell_text(r, state, user="alice") == "in review by bob"
    assert "Reason: too dark" in viewmodels.row_tooltip(row(2, "rejected", detail="too dark"))
    assert "Failed: model missing" in viewmodels.row_tooltip(row(3, "failed", detail="model missing"))
    vm = WorklistModel(service=None)  # type: ignore[arg-type]
    vm.set_rows([row(1), row(2, "in_review", claimed_by="bob"), row(3, "signed"), row(4)])
    assert vm.index_of(3) == 2 and vm.index_of(99) == -1
    nxt = vm.next_open_after(1)
    assert nxt is not None and nxt.draft_id == 4  # skips in-review and signed rows
    nxt = vm.next_open_after(4)
    assert nxt is not None and nxt.draft_id == 1  # wraps around
    assert vm.sort_by(viewmodels.column_index("Views"), False) is False  # Views cannot be sorted
    assert vm.sort_by(0, True) is True and vm.sort_column == 0 and vm.descending


def detail(**kw: object) -> DraftDetail:
    base: dict[str, object] = dict(
        draft_id=1, study_instance_uid="1.2.3", sop_instance_uid="1.2.3.4", path=None, patient_name="Moreau^Claire",
        patient_id="CXR-1", patient_birth_date="19580302", patient_sex="F", study_date="20261124",
        study_description="XR CHEST", accession_number="ACC1", indication="Cough.",
        findings="Heart size normal.\nNo effusion.", impression="Normal chest.",
        tokens=(("Heart", 0.9), ("size", 0.3), ("normal", 0.9), ("No", 0.9), ("effusion", 0.9), ("Normal", 0.2)),
        views=(), model_name="cxr-tiny", model_version="1.0", created_at=dt.datetime(2026, 11, 25, 8, 0),
        state=DraftState.IN_REVIEW, claimed_by="alice", claimed_at=dt.datetime(2026, 11, 25, 8, 1),
    )
    base.update(kw)
    return DraftDetail(**base)  # type: ignore[arg-type]


def test_grounded_sentences_are_marked_whatever_their_probability() -> None:
    d = detail(findings="Heart size normal. Small pleural effusion.",
               tokens=(("Heart", 0.9), ("size", 0.9), ("normal", 0.9), ("Small", 0.8), ("pleural", 0.8),
                       ("effusion", 0.8)),
               grounded=(("Small pleural effusion.", 0.8),))
    vm = ReviewModel(service=None, user="alice", detail=d, holds_claim=True)  # type: ignore[arg-type]
    spans = vm.highlights("findings")
    assert [vm.findings[s.start:s.end] for s in spans] == ["Small pleural effusion."]
    assert spans[0].probability == 0.8 and spans[0].kind == "grounded"
    vm.set_text("Heart size normal. Moderate pleural effusion.", "Normal chest.")  # edited: no longer marked
    assert vm.highlights("findings") == []
    assert [(s.start, s.end) for s in viewmodels.grounded_spans("a. b. A.", (("a.", 0.5),))] == [(0, 2), (6, 8)]


def test_review_model_states_and_banner(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    import types

    from dicom_node.config import Reviewer

    monkeypatch.setenv("TZ", "Europe/Oslo")  # the banner says the reviewer's local time
    time.tzset()
    vm = ReviewModel(service=None, user="alice", detail=detail(), holds_claim=True)  # type: ignore[arg-type]
    kind, text = vm.banner()
    assert kind == "draft" and "AI DRAFT — UNVERIFIED" in text and "cxr-tiny 1.0" in text
    assert vm.can_sign and not vm.read_only and not vm.edited and vm.needs_confirmation()
    assert "MOREAU, Claire" in vm.patient_line() and "68 y F" in vm.patient_line()
    vm.set_text("Heart size normal.\nSmall left effusion.", "Small effusion.")
    assert vm.edited and not vm.needs_confirmation()
    assert "-No effusion." in vm.diff() and "+Small left effusion." in vm.diff()
    assert ("-", "No") in vm.word_diff("findings") and ("+", "Small left") in vm.word_diff("findings")
    assert vm.highlights("findings") == []  # no observation, no word below the cut-off ('size' 0.3, 'Normal' is gone)
    vm.set_text("", "")
    assert not vm.can_sign  # an empty report cannot be signed

    other = ReviewModel(service=None, user="bob", detail=detail(), holds_claim=False, notice="read-only: in review by alice")  # type: ignore[arg-type]
    assert other.read_only and not other.can_sign and not other.can_reject
    assert other.banner()[0] == "blocked" and "in review by alice" in other.banner()[1]
    with pytest.raises(ReviewError):
        other.set_text("x", "y")

    reviewers = {"alice": Reviewer(username="alice", display_name="Moreau^Alice^^Dr", organisation="Hospital")}
    svc = types.SimpleNamespace(find_reviewer=reviewers.get)
    signed = ReviewModel(service=svc, user="bob", holds_claim=False, detail=detail(  # type: ignore[arg-type]
        state=DraftState.SIGNED, signed_by="alice", signed_at=dt.datetime(2026, 11, 25, 9, 30),
        signed_findings="Signed findings.", signed_impression="Signed impression."))
    assert signed.is_final and signed.read_only
    assert signed.findings == "Signed findings."  # a signed report shows what was signed
    kind, text = signed.banner()
    # the reviewer's configured name and local time (09:30 UTC is 10:30 in Oslo in November), not the account and UTC
    assert kind == "final" and "SIGNED — VERIFIED by Dr Alice Moreau on 2026-11-25 10:30 CET" in text
    assert "alice" not in text and "UTC" not in text
    reviewers.clear()  # no longer a configured reviewer: the account is all there is to say
    assert "VERIFIED by alice on" in signed.banner()[1]
    monkeypatch.delenv("TZ")
    time.tzset()
    assert "UNVERIFIED" not in text

    for state, word in ((DraftState.REJECTED, "REJECTED"), (DraftState.SUPERSEDED, "SUPERSEDED")):
        m = ReviewModel(service=None, user="alice", detail=detail(state=state, reject_reason="bad"), holds_claim=False)  # type: ignore[arg-type]
        assert m.read_only and m.banner()[0] == "blocked" and word in m.banner()[1]
        assert "UNVERIFIED" in m.banner()[1]  # never presented as a report


def test_open_review_claims_loads_views_and_reports_progress(service: ReviewService, node: synthetic.NodeFixture) -> None:
    draft_id = service.worklist()[0].draft_id
    assert draft_id is not None
    seen: list[tuple[int, int, str]] = []
    vm = open_review(service, "alice", draft_id, progress=lambda d, t, w: seen.append((d, t, w)))
    assert vm.holds_claim and not vm.read_only
    assert sorted(p.view for p in vm.pictures) == ["LATERAL (LL)", "PA"]
    assert seen[-1][:2] == (2, 2) and seen[0][0] == 0
    assert (vm.findings, vm.impression) == (vm.detail.findings, vm.detail.impression)
    assert vm.findings or vm.impression
    with node.sessions() as s:
        assert s.scalars(select(AuditEvent.actor).where(AuditEvent.action == "claimed")).all() == ["alice"]


def test_open_review_read_only_for_a_held_draft_and_an_unknown_account(service: ReviewService) -> None:
    draft_id = service.worklist()[0].draft_id
    assert draft_id is not None
    open_review(service, "alice", draft_id, load_views=False)
    bob = open_review(service, "bob", draft_id, load_views=False)
    assert not bob.holds_claim and bob.read_only and "in review by alice" in bob.banner()[1]
    stranger = open_review(service, "mallory", service.worklist()[1].draft_id or 0, load_views=False)
    assert stranger.read_only and "not a configured reviewer" in stranger.banner()[1]
    with pytest.raises(ReviewError):
        stranger.sign()


def test_review_model_sign_and_release(service: ReviewService) -> None:
    rows = service.worklist()
    vm = open_review(service, "alice", rows[0].draft_id or 0, load_views=False)
    vm.set_text(vm.findings, "Edited impression.")
    signed = vm.sign()
    assert signed.state == DraftState.SIGNED and vm.is_final and vm.read_only
    assert vm.release() is False  # nothing to release after signing
    other = open_review(service, "alice", rows[1].draft_id or 0, load_views=False)
    assert other.release() is True
    assert service.detail(rows[1].draft_id or 0).state == DraftState.NEW


def test_a_broken_view_does_not_stop_the_review(service: ReviewService) -> None:
    draft_id = service.worklist()[0].draft_id or 0
    views = service.detail(draft_id).views
    broken = next(v for v in views if v.view == "PA")
    assert broken.path is not None
    broken.path.write_bytes(b"not a DICOM file")
    vm = open_review(service, "alice", draft_id)
    assert [p.view for p in vm.pictures] == ["LATERAL (LL)"]
    assert len(vm.view_errors) == 1 and vm.view_errors[0].startswith("PA: cannot display")
    assert vm.holds_claim and vm.can_sign  # the text can still be reviewed


def test_after_signing_the_model_shows_what_was_signed(service: ReviewService) -> None:
    vm = open_review(service, "alice", service.worklist()[0].draft_id or 0, load_views=False)
    vm.set_text("  Findings with spaces.  ", "Impression.\n")
    vm.sign()
    assert (vm.findings, vm.impression) == ("Findings with spaces.", "Impression.")
    assert vm.banner()[0] == "final"


# -- the input gate, the probabilities, the calibrated marks (issue 11) --------------------------

WITHHELD_REASON = "every view is unlike the images the model was trained on"


def test_worklist_says_what_the_gate_let_the_model_do() -> None:
    status = viewmodels.draft_status
    assert status(row(1, input_outcome="withheld", input_reason=WITHHELD_REASON)) == f"not drafted: {WITHHELD_REASON}"
    assert status(row(1, input_outcome="withheld")) == "not drafted: the input check withheld the draft"
    assert status(row(2, input_outcome="partial", input_reason="the lateral view is unlike the training images",
                      views_not_used=("LL",))) == "drafted without LL: the lateral view is unlike the training images"
    assert status(row(3, input_outcome="warned", input_reason="blank image")) == "drafted despite the input check: blank image"
    assert status(row(4, input_outcome="passed")) == "drafted"
    assert status(row(5, input_outcome="off")) == "drafted (input check off)"
    assert status(row(6)) == "drafted (input not checked)"  # a draft made before the gate
    assert status(row(7, draft_id=None, state="failed")) == ""
    last = len(viewmodels.COLUMNS) - 1
    assert viewmodels.cell_text(row(1, input_outcome="withheld", input_reason="x"), last) == "not drafted: x"
    assert "AI draft: not drafted: x" in viewmodels.row_tooltip(row(1, input_outcome="withheld", input_reason="x"))


def gate(outcome: str, reason: str = "", failed: tuple[str, ...] = (), study: tuple[str, ...] = ()) -> InputCheck:
    views = tuple(ViewCheck(f"1.2.{v}", v, v not in failed,
                            ("out of distribution (score 41.2 > limit 18.0)",) if v in failed else (), 41.2, 18.0)
                  for v in ("PA", "LL"))
    return InputCheck("enforce", outcome, reason, views, study)


def test_withheld_draft_opens_empty_with_a_banner_and_can_be_signed_once_written() -> None:
    d = detail(findings="", impression="", tokens=(), input_check=gate("withheld", WITHHELD_REASON, ("PA", "LL")),
               observations=(ObservationCall("Cardiomegaly", 0.9, 0.4),))
    assert d.withheld
    vm = ReviewModel(service=None, user="alice", detail=d, holds_claim=True)  # type: ignore[arg-type]
    assert (vm.findings, vm.impression) == ("", "")
    kind, text = vm.banner()
    assert kind == "withheld" and text.startswith("NOT DRAFTED — the AI draft was withheld: " + WITHHELD_REASON)
    assert "sign as usual" in text and "UNVERIFIED" not in text
    assert vm.gate_lines() == [f"Input check (mode enforce): withheld — {WITHHELD_REASON}.",
                               "PA not used: out of distribution (score 41.2 > limit 18.0).",
                               "LATERAL (LL) not used: out of distribution (score 41.2 > limit 18.0)."]
    assert vm.observation_rows() == []  # the model's output on unreadable images is not shown
    assert not vm.can_sign and vm.highlights("findings") == []
    vm.set_text("Heart size normal. Lungs clear.", "Normal chest.")
    assert vm.can_sign and vm.edited and not vm.needs_confirmation()
    assert vm.highlights("findings") == [] and vm.highlights("impression") == []  # typed text is never marked
    held = ReviewModel(service=None, user="bob", detail=d, holds_claim=False, notice="read-only: in review by alice")  # type: ignore[arg-type]
    assert held.banner()[0] == "blocked" and "NOT DRAFTED" in held.banner()[1] and "in review by alice" in held.banner()[1]


def test_partial_and_warned_drafts_say_which_views_were_not_used_and_why() -> None:
    vm = ReviewModel(service=None, user="alice", holds_claim=True,  # type: ignore[arg-type]
                     detail=detail(input_check=gate("partial", "the lateral view is unlike the training images", ("LL",),
                                                    ("frontal-only study",))))
    assert vm.gate_lines() == [
        "Input check (mode enforce): partial — drafted without LATERAL (LL): the lateral view is unlike the training images.",
        "LATERAL (LL) not used: out of distribution (score 41.2 > limit 18.0).",
        "Study: frontal-only study."]
    assert vm.banner() == ("draft", "AI DRAFT — UNVERIFIED — drafted by cxr-tiny 1.0 without LATERAL (LL); edit, then "
                                    "sign to make it a report.")
    assert vm.view_gate("1.2.PA") == ("input check passed", True)
    assert vm.view_gate("1.2.LL") == ("NOT USED — out of distribution (score 41.2 > limit 18.0)", False)
    assert vm.view_gate("9.9") == ("input not checked", None)
    warned = ReviewModel(service=None, user="alice", holds_claim=True,  # type: ignore[arg-type]
                         detail=detail(input_check=InputCheck("warn", "warned", "blank image",
                                                              (ViewCheck("1.2.PA", "PA", False, ("blank image",)),))))
    assert "although the input check failed (blank image)" in warned.banner()[1]
    assert warned.gate_lines()[1] == "PA read anyway: blank image."
    old = ReviewModel(service=None, user="alice", holds_claim=True, detail=detail())  # type: ignore[arg-type]
    assert old.gate_lines() == ["Input check: not checked (drafted before the input gate existed)."]
    assert old.view_gate("1.2.PA") == ("input not checked", None)


def test_probabilities_panel_rows() -> None:
    calls = (ObservationCall("Cardiomegaly", 0.93, 0.4), ObservationCall("Pleural Effusion", 0.43, 0.4),
             ObservationCall("Edema", 0.02, 0.4), ObservationCall("Fracture", 0.3, None))
    vm = ReviewModel(service=None, user="alice", holds_claim=True, detail=detail(observations=calls))  # type: ignore[arg-type]
    rows = vm.observation_rows()
    assert [(r.text(), r.called, r.uncertain) for r in rows] == [
        (("Cardiomegaly", "0.93", "0.40"), True, False),
        (("Pleural Effusion", "0.43", "0.40"), True, True),
        (("Edema", "0.02", "0.40"), False, False),
        (("Fracture", "0.30", "—"), None, False)]
    assert "close to its threshold" in rows[1].tooltip() and "no threshold" in rows[3].tooltip()


def test_review_model_marks_with_the_shared_policy() -> None:
    d = detail(findings="The heart is enlarged. Mild degenerative changes.", impression="Cardiomegaly.",
               tokens=(("the", 0.9), ("heart", 0.9), ("is", 0.9), ("enlarged", 0.9), (".", 0.9), ("mild", 0.05),
                       ("degenerative", 0.9), ("changes", 0.9), (".", 0.9), ("cardiomegaly", 0.9), (".", 0.9)),
               observations=(ObservationCall("Cardiomegaly", 0.41, 0.4),))
    vm = ReviewModel(service=None, user="alice", detail=d, holds_claim=True)  # type: ignore[arg-type]
    f = vm.highlights("findings")
    assert [(vm.findings[s.start:s.end], s.kind) for s in f] == [("The heart is enlarged.", "call"), ("Mild", "word")]
    i = vm.highlights("impression")
    assert [(vm.impression[s.start:s.end], s.kind) for s in i] == [("Cardiomegaly.", "call")]
    vm.set_text("The heart is mildly enlarged. Mild degenerative changes.", "Cardiomegaly.")
    assert [s.kind for s in vm.highlights("findings")] == ["word"]  # edited: no longer the model's call


def test_service_detail_reads_the_gate_and_the_thresholds(service: ReviewService, node: synthetic.NodeFixture) -> None:
    import json

    from dicom_node.db import Draft

    rows = service.worklist()
    plain = service.detail(rows[0].draft_id or 0)
    assert plain.input_check is not None and plain.input_check.outcome == "passed"  # the real gate
    assert all(v.check is not None and v.check.passed for v in plain.views)
    with node.sessions() as s, s.begin():  # a draft made before the gate has no input_check
        d0 = s.get(Draft, rows[0].draft_id)
        assert d0 is not None
        d0.token_info = json.dumps({k: v for k, v in json.loads(d0.token_info or "{}").items() if k != "input_check"})
    plain = service.detail(rows[0].draft_id or 0)
    assert plain.input_check is None and not plain.withheld and all(v.check is None for v in plain.views)
    assert viewmodels.draft_status(next(r for r in service.worklist() if r.draft_id == plain.draft_id)) == (
        "drafted (input not checked)")
    assert plain.observations and all(c.threshold is not None for c in plain.observations)
    assert [c.probability for c in plain.observations] == sorted((c.probability for c in plain.observations), reverse=True)
    draft_id = rows[1].draft_id or 0
    synthetic.set_input_check(node, draft_id, "partial", "the lateral view is unlike the training images",
                              failed={"LL": ["out of distribution (score 41.2 > limit 18.0)"]})
    d = service.detail(draft_id)
    assert d.input_check is not None and d.input_check.outcome == "partial"
    checks = {v.view: v.check for v in d.views}
    assert checks["PA"] is not None and checks["PA"].passed
    assert checks["LL"] is not None and not checks["LL"].passed and checks["LL"].ood_score == 41.2
    row = next(r for r in service.worklist() if r.draft_id == draft_id)
    assert (row.input_outcome, row.views_not_used) == ("partial", ("LL",))
    # the pipeline records only the views it used in Draft.views: the left-out one still shows
    with node.sessions() as s, s.begin():
        dd = s.get(Draft, draft_id)
        assert dd is not None
        dd.views = json.dumps([v for v in json.loads(dd.views or "[]") if v.get("view") == "PA"])
    d = service.detail(draft_id)
    assert [(v.view, v.check is not None and v.check.passed, v.path is not None) for v in d.views] == [
        ("PA", True, True), ("LL", False, True)]
    assert d.views[1].source == "input check"


def test_signing_a_withheld_study_written_from_scratch(service: ReviewService, node: synthetic.NodeFixture) -> None:
    import pydicom

    from plugin.drafting import sr

    draft_id = service.worklist()[2].draft_id or 0
    synthetic.set_input_check(node, draft_id, "withheld", WITHHELD_REASON,
                              failed={"PA": ["out of distribution (score 41.2 > limit 18.0)"],
                                      "LL": ["out of distribution (score 39.0 > limit 18.0)"]})
    row = next(r for r in service.worklist() if r.draft_id == draft_id)
    assert viewmodels.draft_status(row) == f"not drafted: {WITHHELD_REASON}"
    vm = open_review(service, "alice", draft_id, load_views=False)
    assert vm.detail.withheld and (vm.findings, vm.impression) == ("", "") and not vm.can_sign
    with pytest.raises(ReviewError, match="empty"):
        service.sign(draft_id, "alice", "  ", "")
    vm.set_text("Heart size normal. No pleural effusion.", "No acute cardiopulmonary abnormality.")
    signed = vm.sign()
    assert signed.state == DraftState.SIGNED and signed.signed_findings == "Heart size normal. No pleural effusion."
    report = sr.read_report(pydicom.dcmread(node.store.abspath(signed.signed_path or "")))
    assert report.verification_flag == "VERIFIED"
    assert (report.findings, report.impression) == ("Heart size normal. No pleural effusion.",
                                                    "No acute cardiopulmonary abnormality.")


def test_long_gate_reasons_are_shortened_where_space_is_short() -> None:
    long = ("no view can be read by the model (PA: unlike the images the model was trained on (score 7.63 > limit "
            "5.06; embedding distance 32.4, appearance distance 39.3))")
    assert viewmodels.short_reason(long) == "no view can be read by the model"
    assert viewmodels.short_reason("blank image (std 0.001)") == "blank image (std 0.001)"  # short: kept whole
    r = row(1, input_outcome="withheld", input_reason=long)
    assert viewmodels.draft_status(r) == "not drafted: no view can be read by the model"
    assert long in viewmodels.row_tooltip(r)  # the whole reason on hover
    vm = ReviewModel(service=None, user="alice", holds_claim=True,  # type: ignore[arg-type]
                     detail=detail(findings="", impression="", input_check=gate("withheld", long, ("PA", "LL"))))
    assert vm.banner()[1].startswith("NOT DRAFTED — the AI draft was withheld: no view can be read by the model. Write")
