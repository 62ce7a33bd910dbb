"""View selection and view resolution: pure functions, no network, database or Qt."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from support.synth import CR, DX, SC, image, non_image

from plugin.drafting.views import (
    InstanceHeader,
    TagView,
    resolve_view,
    select_images,
    skip_reason,
    view_from_tags,
)


def header(ds: Dataset, generated: bool = False) -> InstanceHeader:
    return InstanceHeader.from_dataset(ds, generated=generated)


def test_selects_cr_dx_and_chest_sc_and_explains_every_skip() -> None:
    keep = [
        image(sop_class=CR, modality="CR"),
        image(sop_class=DX, modality="DX", body_part=None),
        image(sop_class=SC, modality="DX", body_part=None, view_position=None),
    ]
    skip = {
        "sr": non_image("1.2.840.10008.5.1.4.1.1.88.33", "SR"),
        "pr": non_image("1.2.840.10008.5.1.4.1.1.11.1", "PR"),
        "dose": non_image("1.2.840.10008.5.1.4.1.1.88.67", "SR"),
        "ko": non_image("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
        "knee": image(body_part="KNEE"),
        "sc_ot": image(sop_class=SC, modality="OT"),
        "ct": image(sop_class="1.2.840.10008.5.1.4.1.1.2", modality="CT"),
        "processing": image(sop_class="1.2.840.10008.5.1.4.1.1.1.1.1", modality="DX"),
    }
    sel = select_images([header(d) for d in [*keep, *skip.values()]])
    assert {h.sop_instance_uid for h in sel.images} == {d.SOPInstanceUID for d in keep}
    reasons = {s.sop_instance_uid: s.reason for s in sel.skipped}
    assert set(reasons) == {d.SOPInstanceUID for d in skip.values()}
    assert "Structured Report" in reasons[skip["sr"].SOPInstanceUID]
    assert "Presentation State" in reasons[skip["pr"].SOPInstanceUID]
    assert "dose report" in reasons[skip["dose"].SOPInstanceUID]
    assert "Key Object" in reasons[skip["ko"].SOPInstanceUID]
    assert "KNEE" in reasons[skip["knee"].SOPInstanceUID]
    assert "Modality OT" in reasons[skip["sc_ot"].SOPInstanceUID]
    assert "For Processing" in reasons[skip["processing"].SOPInstanceUID]
    assert any("skipped" in line and "KNEE" in line for line in sel.log_lines())


def test_own_srs_and_duplicates_are_skipped() -> None:
    ds = image()
    sel = select_images([header(ds), header(ds), header(image(), generated=True)])
    assert len(sel.images) == 1
    assert sorted(s.reason for s in sel.skipped) == ["an SR written by this node", "duplicate SOP Instance UID"]


def test_body_part_variants_count_as_chest() -> None:
    for part in ("CHEST", "THORAX", "PORT CHEST", "CHEST_LAT"):
        assert skip_reason(header(image(body_part=part))) == ""


@pytest.mark.parametrize(
    ("attrs", "view", "source"),
    [
        ({"view_position": "PA"}, "PA", "ViewPosition"),
        ({"view_position": "AP"}, "AP", "ViewPosition"),
        ({"view_position": "LL"}, "LL", "ViewPosition"),
        ({"view_position": "LATERAL"}, "LATERAL", "ViewPosition"),
        ({"view_position": None}, "UNKNOWN", ""),
    ],
)
def test_view_from_view_position(attrs: dict, view: str, source: str) -> None:
    tv = view_from_tags(header(image(**attrs)))
    assert (tv.view, tv.source) == (view, source)


def _code(value: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "SCT", meaning
    return c


def test_view_from_view_code_sequence_and_orientation() -> None:
    ds = image(view_position=None)
    ds.ViewCodeSequence = [_code("399348003", "antero-posterior")]
    assert view_from_tags(header(ds)) == TagView("AP", "ViewCodeSequence")
    ds.ViewCodeSequence = [_code("999", "left lateral")]  # unknown code value, meaning decides
    assert view_from_tags(header(ds)).view == "LL"
    lat = image(view_position=None, PatientOrientation=["A", "F"])
    assert view_from_tags(header(lat)).view == "LATERAL"
    front = image(view_position=None, PatientOrientation=["L", "F"])
    tv = view_from_tags(header(front))
    assert tv.view == "UNKNOWN" and "frontal" in tv.source


def test_conflicting_tags_are_reported() -> None:
    ds = image(view_position="PA", PatientOrientation=["P", "F"])  # a lateral tagged PA
    tv = view_from_tags(header(ds))
    assert tv.view == "PA"
    assert "PatientOrientation says LATERAL" in tv.conflict


def test_classifier_decides_when_tags_disagree_or_are_missing() -> None:
    agree = resolve_view("1.2", TagView("AP", "ViewPosition"), ("FRONTAL", 0.97))
    assert (agree.view, agree.source) == ("AP", "tags")
    overruled = resolve_view("1.2", TagView("PA", "ViewPosition"), ("LATERAL", 0.91))
    assert (overruled.view, overruled.source) == ("LATERAL", "classifier")
    assert "says PA but the classifier says LATERAL" in overruled.note
    missing = resolve_view("1.2", TagView("UNKNOWN", ""), ("FRONTAL", 0.8))
    assert (missing.view, missing.source) == ("PA", "classifier")
    lateral_tag_frontal_image = resolve_view("1.2", TagView("LL", "ViewPosition"), ("FRONTAL", 0.88))
    assert lateral_tag_frontal_image.view == "PA"
    assert missing.as_json()["classifier"] == "FRONTAL"
    with pytest.raises(ValueError, match="FRONTAL or LATERAL"):
        resolve_view("1.2", TagView("PA", "ViewPosition"), ("OBLIQUE", 0.5))
