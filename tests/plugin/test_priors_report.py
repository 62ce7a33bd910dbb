"""The prior in the SR (TID 2000 "Prior Procedure Descriptions") and the prior's report text,
without a network: dciodvfy 0 errors, dsrdump, highdicom read-back, carried into the signed SR;
report text from a verified SR, a Basic Text SR and an Encapsulated PDF."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from pydicom.dataset import Dataset
from support.priors import PRIOR_FINDINGS, PRIOR_IMPRESSION, patient_history
from support.sr_checks import check_sr_file, write

from plugin.drafting import priors, sr


def _draft(prior: sr.PriorComparison | None) -> Dataset:
    h = patient_history("sr")
    return sr.build_draft_sr(h.current, sr.DraftContent(
        findings="Lungs are clear.", impression="No acute disease.", model_name="m", model_version="1",
        prior=prior))


def test_prior_comparison_section_in_draft_and_signed_sr(tmp_path: Path) -> None:
    h = patient_history("sr")
    comparison = sr.PriorComparison(study_instance_uid=h.prior_study_uid, study_date="20100115",
                                    accession_number="D0000001",
                                    description=f"Compared with the prior chest radiograph of 2010-01-15. "
                                                f"{priors.NOT_USED_BY_MODEL}")
    draft = _draft(comparison)
    check_sr_file(write(draft, tmp_path / "draft.dcm"))  # dciodvfy 0 errors, dsrdump, highdicom
    dump = subprocess.run(["dsrdump", str(tmp_path / "draft.dcm")], capture_output=True, text=True, check=True).stdout
    assert "Prior Procedure Descriptions" in dump and h.prior_study_uid in dump
    rep = sr.read_report(draft)
    assert rep.prior is not None and rep.prior.study_instance_uid == h.prior_study_uid
    assert rep.prior.accession_number == "D0000001" and "does not use prior" in rep.prior.description
    assert rep.findings == "Lungs are clear."  # the comparison is not report text
    # the section's observation context is TID 1005: UIDREF 121018 under HAS OBS CONTEXT
    section = next(i for i in draft.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121066")
    uidref = section.ContentSequence[0]
    assert (uidref.RelationshipType, uidref.ValueType, uidref.ConceptNameCodeSequence[0].CodeValue) == (
        "HAS OBS CONTEXT", "UIDREF", "121018")
    signed = sr.build_signed_sr(draft, "Lungs are clear.", "No change.", "Doe^Jane", "GH",
                                dt.datetime(2011, 3, 25, 9, 0, tzinfo=dt.UTC))
    check_sr_file(write(signed, tmp_path / "signed.dcm"))
    assert sr.read_report(signed).prior == rep.prior
    # a different prior makes a different draft (deterministic UIDs of their inputs)
    assert _draft(None).SOPInstanceUID != draft.SOPInstanceUID


def test_prior_none_found_section_has_no_reference(tmp_path: Path) -> None:
    draft = _draft(sr.PriorComparison(description="No prior chest radiograph of this patient was found in the PACS."))
    check_sr_file(write(draft, tmp_path / "none.dcm"))
    rep = sr.read_report(draft)
    assert rep.prior is not None and rep.prior.study_instance_uid == "" and "No prior" in rep.prior.description


def test_prior_report_text_from_sr_pdf_and_basic_text_sr() -> None:
    h = patient_history("text")
    kind, uid, text = priors.report_text([h.prior_pdf, h.prior_sr])
    assert (kind, uid) == ("sr", str(h.prior_sr.SOPInstanceUID))  # a verified SR before a PDF
    assert f"FINDINGS: {PRIOR_FINDINGS}" in text and f"IMPRESSIONS: {PRIOR_IMPRESSION}" in text
    assert "Drafted by" not in text  # comments are not report text
    kind, uid, text = priors.report_text([h.prior_pdf])
    assert kind == "pdf" and (text == priors.PDF_NO_EXTRACTOR or PRIOR_IMPRESSION in text)
    basic = Dataset()
    basic.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    basic.SOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "Heart normal."
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = [code]
    basic.ContentSequence = [item]
    assert priors.report_text([basic]) == ("text", "1.2.3.4", "FINDING: Heart normal.")
    assert priors.report_text([]) == ("", "", "")
