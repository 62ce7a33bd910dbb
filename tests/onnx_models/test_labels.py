"""The rule-based CheXpert-style labeller: mentions, negation, uncertainty, derived No Finding."""

from __future__ import annotations

import re

import pytest

from onnx_models.labels import (
    ABNORMAL_OBSERVATIONS,
    OBSERVATIONS,
    PATHOLOGIES,
    SNOMED,
    Presence,
    binary_vector,
    label,
)

P, A, U = Presence.PRESENT, Presence.ABSENT, Presence.UNCERTAIN


def test_vocabularies() -> None:
    assert len(OBSERVATIONS) == 14 and OBSERVATIONS[0] == "No Finding"
    assert len(ABNORMAL_OBSERVATIONS) == 13 and "No Finding" not in ABNORMAL_OBSERVATIONS
    assert "Support Devices" not in PATHOLOGIES and len(PATHOLOGIES) == 12
    assert set(SNOMED) == set(OBSERVATIONS)
    for code, meaning in SNOMED.values():
        assert re.fullmatch(r"\d{6,18}", code) and meaning
    assert len({c for c, _ in SNOMED.values()}) == 14  # one concept per observation
    assert SNOMED["Cardiomegaly"] == ("8186001", "Cardiomegaly")
    assert SNOMED["Pleural Effusion"][0] == "60046008"
    assert SNOMED["Pneumothorax"][0] == "36118008"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mild cardiomegaly.", {"Cardiomegaly": P, "No Finding": A}),
        ("The heart is enlarged.", {"Cardiomegaly": P}),
        ("Heart size is normal.", {"Cardiomegaly": A, "No Finding": P}),
        ("No pneumothorax or pleural effusion.", {"Pneumothorax": A, "Pleural Effusion": A, "No Finding": P}),
        ("Lungs are clear without focal consolidation, effusion, or pneumothorax.",
         {"Consolidation": A, "Pleural Effusion": A, "Pneumothorax": A}),
        ("Pneumothorax is not seen.", {"Pneumothorax": A}),
        ("There may be a small left effusion.", {"Pleural Effusion": U, "No Finding": A}),
        ("Atelectasis versus pneumonia in the left lower lobe.", {"Atelectasis": U, "Pneumonia": U}),
        ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
        ("No focal airspace disease to suggest pneumonia.", {"Pneumonia": A, "Lung Opacity": A}),
        ("No change in cardiomegaly.", {"Cardiomegaly": P}),
        ("No pneumothorax, but there is a small right pleural effusion.",
         {"Pneumothorax": A, "Pleural Effusion": P}),
        ("Right lower lobe opacity, which may represent pneumonia.", {"Lung Opacity": P, "Pneumonia": U}),
        ("Left chest pacemaker with leads in the right ventricle.", {"Support Devices": P, "No Finding": P}),
        ("Acute fracture of the left 6th rib.", {"Fracture": P}),
        ("Pulmonary vascular congestion and interstitial edema.", {"Edema": P}),
        ("1. Cardiomegaly. 2. No effusion.", {"Cardiomegaly": P, "Pleural Effusion": A}),
        ("A 1 cm nodule in the right upper lobe.", {"Lung Lesion": P}),
        ("Normal chest x-XXXX.", {"No Finding": P}),
        ("Pericardial effusion.", {"No Finding": P}),
    ],
)
def test_label(text: str, expected: dict[str, Presence]) -> None:
    got = label(text)
    for obs, state in expected.items():
        assert got.get(obs) == state, (text, obs, got)


def test_aggregation_and_empty() -> None:
    assert label("") == {} and label("   ") == {}
    # PRESENT beats ABSENT across sentences
    got = label("No effusion on the right. Small left pleural effusion.")
    assert got["Pleural Effusion"] is P
    # unmentioned observations are left out; keys follow the CheXpert order
    got = label("Cardiomegaly. No pneumothorax.")
    assert list(got) == ["No Finding", "Cardiomegaly", "Pneumothorax"]


def test_binary_vector_u_ones() -> None:
    got = label("Possible right lower lobe pneumonia. No effusion.")
    vec = binary_vector(got)
    assert len(vec) == 14
    assert vec[OBSERVATIONS.index("Pneumonia")] == 1  # uncertain counts as positive
    assert vec[OBSERVATIONS.index("Pleural Effusion")] == 0
    assert vec[OBSERVATIONS.index("No Finding")] == 0
    assert binary_vector(got, ABNORMAL_OBSERVATIONS) == vec[1:]


def test_negated_list_with_suspicious_is_absent() -> None:
    # "suspicious" qualifies an item of a negated list; it does not make the list uncertain
    out = label("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.")
    assert out["Lung Opacity"] is A and out["Pleural Effusion"] is A and out["Pneumothorax"] is A
    assert label("Suspicious pulmonary nodule.")["Lung Lesion"] is U


def test_mentions_give_positions_and_normal_phrasings() -> None:
    from onnx_models.labels import mentions, sentences

    [s] = sentences("Heart size is normal, there is a small right pleural effusion.")
    found = {(m.observation, m.presence, m.normal) for m in mentions(s)}
    assert ("Cardiomegaly", A, True) in found and ("Pleural Effusion", P, False) in found
    m = next(m for m in mentions(s) if m.observation == "Pleural Effusion")
    assert s[m.start : m.end] == m.text == "effusion"
