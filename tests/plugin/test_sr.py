"""Draft and signed SRs: TID 2000 content, flags, references, deterministic UIDs, validators."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom import dcmread
from support.sr_checks import check_sr_file, write
from support.synth import image

from plugin.drafting import sr

FINDINGS = "The heart is normal in size. No pleural effusion or pneumothorax. Lungs are clear."
IMPRESSION = "No acute cardiopulmonary abnormality."
SIGNED_AT = dt.datetime(2026, 11, 25, 14, 30, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def two_views() -> list:
    a = image(view_position="PA", InstitutionName="General Hospital")
    b = image(view_position="LL")
    b.SeriesInstanceUID = a.SeriesInstanceUID
    b.InstanceNumber = 2
    return [a, b]


def content(**kw: object) -> sr.DraftContent:
    base = dict(findings=FINDINGS, impression=IMPRESSION, indication="Positive TB test",
                model_name="cxr-report", model_version="1.2.0",
                observations=sr.coded_observations(f"{FINDINGS} {IMPRESSION}"))
    base.update(kw)
    return sr.DraftContent(**base)  # type: ignore[arg-type]


def test_draft_sr_is_valid_tid2000_with_flags_and_references(tmp_path: Path) -> None:
    sources = two_views()
    draft = sr.build_draft_sr(sources, content())
    hd_sr = check_sr_file(write(draft, tmp_path / "draft.dcm"))
    ds = dcmread(tmp_path / "draft.dcm")
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("PARTIAL", "UNVERIFIED", "PRELIMINARY")
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.PatientID == sources[0].PatientID and ds.PatientName == sources[0].PatientName
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert ds.Modality == "SR" and "UNVERIFIED" in ds.SeriesDescription
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    evidence = {e[2] for e in hd_sr.get_evidence(current_procedure_only=True)}
    assert evidence == {s.SOPInstanceUID for s in sources}
    rep = sr.read_report(ds)
    assert rep.findings == FINDINGS and rep.impression == IMPRESSION and rep.indication == "Positive TB test"
    assert any("AI-GENERATED DRAFT" in c and "UNVERIFIED" in c for c in rep.comments)
    assert set(rep.source_images) == {s.SOPInstanceUID for s in sources}
    assert rep.device_model == "cxr-report 1.2.0"
    presence = {o.code: o.presence for o in rep.observations}
    assert presence["60046008"] == "absent"  # pleural effusion
    assert presence["36118008"] == "absent"  # pneumothorax
    assert ds.SpecificCharacterSet == "ISO_IR 192"


def test_draft_uids_are_deterministic_and_depend_on_inputs() -> None:
    sources = two_views()
    a = sr.build_draft_sr(sources, content())
    b = sr.build_draft_sr(list(reversed(sources)), content(created_at=dt.datetime(2020, 1, 1)))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID.startswith("2.25.")
    other_model = sr.build_draft_sr(sources, content(model_version="1.3.0"))
    assert other_model.SOPInstanceUID != a.SOPInstanceUID
    one_view = sr.build_draft_sr(sources[:1], content())
    assert one_view.SOPInstanceUID != a.SOPInstanceUID


def test_signed_sr_verified_with_predecessor_and_edited_text(tmp_path: Path) -> None:
    sources = two_views()
    draft = sr.build_draft_sr(sources, content())
    write(draft, tmp_path / "draft.dcm")
    draft_read = dcmread(tmp_path / "draft.dcm")
    edited = "Heart size normal. Small left pleural effusion."
    signed = sr.build_signed_sr(draft_read, edited, "Small left effusion.", "Doe^Jane", "General Hospital", SIGNED_AT)
    check_sr_file(write(signed, tmp_path / "signed.dcm"))
    ds = dcmread(tmp_path / "signed.dcm")
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "VERIFIED", "FINAL")
    obs = ds.VerifyingObserverSequence[0]
    assert obs.VerifyingObserverName == "Doe^Jane" and obs.VerifyingOrganization == "General Hospital"
    assert obs.VerificationDateTime == "20261125143005+0100"
    rep = sr.read_report(ds)
    assert rep.predecessors == (draft.SOPInstanceUID,)
    assert rep.findings == edited and rep.impression == "Small left effusion."
    assert rep.indication == "Positive TB test"
    assert not any("UNVERIFIED" in c for c in rep.comments)
    assert {o.code: o.presence for o in rep.observations}["60046008"] == "present"
    assert set(rep.source_images) == {s.SOPInstanceUID for s in sources}
    assert ds.StudyInstanceUID == draft.StudyInstanceUID and ds.PatientID == draft.PatientID
    assert ds.SeriesInstanceUID != draft.SeriesInstanceUID
    again = sr.build_signed_sr(draft_read, edited, "Small left effusion.", "Doe^Jane", "General Hospital", SIGNED_AT)
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    changed = sr.build_signed_sr(draft_read, edited + " ", "Other.", "Doe^Jane", "General Hospital", SIGNED_AT)
    assert changed.SOPInstanceUID != ds.SOPInstanceUID


def test_non_ascii_text_round_trips(tmp_path: Path) -> None:
    draft = sr.build_draft_sr(two_views(), content(indication="Dyspnée, fièvre 38,5 °C"))
    check_sr_file(write(draft, tmp_path / "d.dcm"))
    assert sr.read_report(dcmread(tmp_path / "d.dcm")).indication == "Dyspnée, fièvre 38,5 °C"


def test_no_indication_no_section() -> None:
    draft = sr.build_draft_sr(two_views(), content(indication=""))
    rep = sr.read_report(draft)
    assert rep.indication == ""
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in draft.ContentSequence]
    assert "121109" not in names and "121070" in names and "121072" in names


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(sr.SRError, match="at least one source"):
        sr.build_draft_sr([], content())
    a, b = two_views()
    b.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(sr.SRError, match="2 studies"):
        sr.build_draft_sr([a, b], content())
    with pytest.raises(sr.SRError, match="empty"):
        sr.build_draft_sr(two_views(), content(findings=" ", impression=""))
    with pytest.raises(sr.SRError, match="presence"):
        sr.CodedObservation("x", "1", "x", "maybe")
    draft = sr.build_draft_sr(two_views(), content())
    with pytest.raises(sr.SRError, match="name"):
        sr.build_signed_sr(draft, "a", "b", " ", "Org", SIGNED_AT)
    with pytest.raises(sr.SRError, match="organisation"):
        sr.build_signed_sr(draft, "a", "b", "Doe^Jane", "", SIGNED_AT)
    with pytest.raises(sr.SRError, match="not a Comprehensive SR"):
        sr.build_signed_sr(image(), "a", "b", "Doe^Jane", "Org", SIGNED_AT)


def test_invalid_source_values_do_not_make_the_sr_invalid(tmp_path: Path) -> None:
    """Real archives send e.g. PatientAge "62" or a dashed date: optional ones are left out,
    Type 2 ones sent empty, so the SR still passes dciodvfy."""
    a, b = two_views()
    a.PatientAge = "62"
    a.StudyDate = "2011-03-24"
    a.PatientWeight = "70.5"
    draft = sr.build_draft_sr([a, b], content())
    check_sr_file(write(draft, tmp_path / "d.dcm"))
    ds = dcmread(tmp_path / "d.dcm")
    assert "PatientAge" not in ds and ds.StudyDate == "" and float(ds.PatientWeight) == 70.5
