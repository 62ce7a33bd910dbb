"""Indication extraction: sources in configured order, nested request attributes, cleaning."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from plugin.drafting.indication import DEFAULT_SOURCES, IndicationError, clean, extract, limit


def ds_with(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_top_level_reason_wins_by_configured_order() -> None:
    ds = ds_with(ReasonForStudy="cough", AdditionalPatientHistory="long history of smoking",
                 RequestedProcedureDescription="XR CHEST 2V")
    ind = extract([ds])
    assert (ind.text, ind.source) == ("cough", "ReasonForStudy")
    ind2 = extract([ds], sources=("AdditionalPatientHistory", "ReasonForStudy"))
    assert (ind2.text, ind2.source) == ("long history of smoking", "AdditionalPatientHistory")


def test_inside_request_attributes_sequence_and_code_meanings() -> None:
    item = Dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R05", "I10", "Cough"
    item.ReasonForRequestedProcedureCodeSequence = [code]
    item.ReasonForTheRequestedProcedure = "Shortness of breath"
    ds = ds_with(RequestAttributesSequence=[item])
    ind = extract([ds])
    assert ind.text == "Shortness of breath"
    assert ind.source == "RequestAttributesSequence/ReasonForTheRequestedProcedure"
    ind2 = extract([ds], sources=("ReasonForRequestedProcedureCodeSequence",))
    assert ind2.text == "Cough"


def test_deidentification_marks_are_removed_and_empty_is_absent() -> None:
    ds = ds_with(ReasonForTheRequestedProcedure="XXXX", ReasonForStudy="XXXX-year-old with XXXX, chest pain")
    ind = extract([ds])
    assert ind.text == "with, chest pain"
    assert ind.source == "ReasonForStudy"
    none = extract([ds_with(ReasonForTheRequestedProcedure="XXXX XXXX")])
    assert not none and none.text == "" and none.source == ""
    assert clean("[REDACTED] fever *** \x07 cough") == "fever cough"


def test_length_limit_on_word_boundary() -> None:
    ds = ds_with(AdditionalPatientHistory="word " * 200)
    ind = extract([ds], max_chars=40)
    assert ind.truncated and len(ind.text) <= 40 and ind.text.endswith("\u2026")
    assert limit("short", 10) == ("short", False)


def test_different_texts_across_instances_are_joined_once() -> None:
    a = ds_with(ReasonForTheRequestedProcedure="cough")
    b = ds_with(ReasonForTheRequestedProcedure="COUGH")
    c = ds_with(ReasonForTheRequestedProcedure="fever")
    assert extract([a, b, c]).text == "cough; fever"


def test_unknown_source_keyword_fails_clearly() -> None:
    with pytest.raises(IndicationError, match="NotAKeyword"):
        extract([Dataset()], sources=("NotAKeyword",))
    assert extract([Dataset()], sources=DEFAULT_SOURCES).text == ""


def test_the_model_reads_the_text_as_trained_people_read_it_cleaned() -> None:
    ds = Dataset()
    ds.ReasonForTheRequestedProcedure = "XXXX-year-old male with\tcough, XXXX"
    ind = extract([ds])
    assert ind.text == "male with cough"
    assert ind.model_text == "XXXX-year-old male with cough, XXXX"  # marks kept, as in training
    empty = Dataset()
    empty.ReasonForTheRequestedProcedure = "XXXX"
    only_marks = extract([empty])  # training read such a field as it was: so does the model
    assert only_marks.model_text == "XXXX" and only_marks.text == "" and not only_marks
