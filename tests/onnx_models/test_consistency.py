"""The consistency checker and rules (issue 11 §3): pure functions, no ONNX Runtime."""

from __future__ import annotations

import pytest

from onnx_models import consistency as c
from onnx_models.tokenizer import detokenize

THR = dict.fromkeys(("Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis", "Edema",
                     "Pneumonia", "Consolidation", "Pneumothorax"), 0.4)


def fix(findings: str, impression: str = "", **probs: float) -> tuple[str, str]:
    p = {k.replace("_", " "): v for k, v in probs.items()}
    f, i, _ = c.make_consistent(c.text_tokens(findings), c.text_tokens(impression), p, THR)
    out = detokenize([w for w, _ in f]), detokenize([w for w, _ in i])
    assert c.check(*out) == [], out  # what the rules write passes the checker
    return out


def kinds(findings: str, impression: str = "") -> list[str]:
    return sorted(i.kind for i in c.check(findings, impression))


# --- the drafts quoted in issue 11 ----------------------------------------------------------------
def test_normal_heart_phrasing_and_enlarged_heart_contradict() -> None:
    f = "Heart size and mediastinal contours appear within normal limits. The lungs are clear. The heart is enlarged."
    assert kinds(f) == ["contradiction"]
    assert fix(f, Cardiomegaly=0.8) == ("The lungs are clear. The heart is enlarged.", "")
    assert fix(f, Cardiomegaly=0.1) == (
        "Heart size and mediastinal contours appear within normal limits. The lungs are clear.", "")


def test_effusion_said_three_ways_is_said_once_most_specifically() -> None:
    f = ("There is a small bilateral pleural effusion. The heart is normal in size. There is a large pleural "
         "effusion. There is a small right pleural effusion.")
    issues = c.check(f)
    assert [(i.kind, i.observation) for i in issues] == [("duplicate", "Pleural Effusion")]
    out, _ = fix(f, Pleural_Effusion=0.7)
    assert out.count("effusion") == 1 and "small" in out and "large" not in out


def test_most_specific_sentence_wins() -> None:
    out, _ = fix("There is a pleural effusion. There is a small right pleural effusion.", Pleural_Effusion=0.7)
    assert out == "There is a small right pleural effusion."


def test_no_acute_abnormality_under_acute_findings_becomes_a_summary() -> None:
    f = "The heart is enlarged. There is patchy airspace opacity. There is a small right pleural effusion."
    i = "No acute cardiopulmonary abnormality."
    assert kinds(f, i) == ["contradiction", "contradiction"]
    out_f, out_i = fix(f, i, Cardiomegaly=0.9, Lung_Opacity=0.6, Pleural_Effusion=0.7)
    assert out_f == f
    assert out_i == "The heart is enlarged. Patchy airspace opacity. Small right pleural effusion."


def test_unsupported_findings_give_way_to_the_normal_impression() -> None:
    f = "The lungs are clear. There is a small right pleural effusion."
    assert fix(f, "No acute cardiopulmonary abnormality.", Pleural_Effusion=0.1) == (
        "The lungs are clear.", "No acute cardiopulmonary abnormality.")


def test_empty_list_numbers_are_fragments() -> None:
    assert kinds("The lungs are clear.", "1. 2.") == ["fragment", "fragment"]
    assert fix("The lungs are clear.", "1. 2.") == ("The lungs are clear.", "")


def test_article_agrees_with_plural_noun() -> None:
    assert kinds("There is a small bilateral pleural effusions.") == ["fragment"]
    assert fix("There is a small bilateral pleural effusions.", Pleural_Effusion=0.9) == (
        "There are small bilateral pleural effusions.", "")
    assert kinds("There is a small bilateral pleural effusion. There are a few nodules.") == []
    assert fix("There are small right pleural effusion. There are no focal airspace consolidation.",
               Pleural_Effusion=0.9) == (
        "There is small right pleural effusion. There is no focal airspace consolidation.", "")
    assert kinds("There are mild degenerative changes of the spine. There are no nodules or masses.") == []


def test_repeated_atelectasis_sentence() -> None:
    f = "Minimal right middle lobe atelectasis left base. Right middle lobe atelectasis left base."
    assert [i.detail for i in c.check(f)] == ["stated twice"] + ["right and left for one finding in one sentence"] * 2
    # one sentence stays, and its side is the one it names first
    assert fix(f, Atelectasis=0.6) == ("Minimal right middle lobe atelectasis.", "")
    assert kinds("Right and left basilar atelectasis. Patchy opacities right greater than left.") == []
    assert kinds("Left venous catheter with tip in the right atrium.") == []


# --- more rules -----------------------------------------------------------------------------------
def test_list_numbers_renumbered_and_kept_only_in_the_impression() -> None:
    _, i = fix("", "1. Cardiomegaly with mild cardiomegaly. 2. Cardiomegaly.", Cardiomegaly=0.9)
    assert i == "1. Cardiomegaly."
    assert kinds("", "1. No acute disease. 2. Stable cardiomegaly.") == []
    assert kinds("1. The lungs are clear.") == ["fragment"]
    assert kinds("", "2. Stable cardiomegaly.") == ["fragment"]


@pytest.mark.parametrize("text", ["There is a.", "There is a left.", "There is a left greater than left.", ".",
                                  "Findings may represent."])
def test_fragments(text: str) -> None:
    assert kinds(f"The lungs are clear. {text}") == ["fragment"]
    assert fix(f"The lungs are clear. {text}") == ("The lungs are clear.", "")


def test_double_full_stop_is_removed_and_words_keep_their_probabilities() -> None:
    toks = [("no", 0.9), ("pneumothorax", 0.8), ("..", 0.7), ("the", 0.6), ("heart", 0.5), ("is", 0.4),
            ("enlarged", 0.3), (".", 0.2)]
    f, i, edits = c.make_consistent(toks, [], {"Cardiomegaly": 0.9}, THR)
    assert f == [("no", 0.9), ("pneumothorax", 0.8), (".", 0.7), ("the", 0.6), ("heart", 0.5), ("is", 0.4),
                 ("enlarged", 0.3), (".", 0.2)]
    assert i == [] and [e.action for e in edits] == ["drop"]


def test_two_findings_of_one_kind_on_opposite_sides_are_not_duplicates() -> None:
    assert kinds("Right upper lobe opacity. Left basilar opacity.") == []
    assert kinds("Surgical clips are present. Sternotomy wires are intact.") == []


def test_impression_side_or_size_must_match_the_findings() -> None:
    f = "There is a small right pleural effusion."
    assert kinds(f, "Small right pleural effusion.") == []
    assert kinds(f, "Large left pleural effusion.") == ["duplicate"]
    assert fix(f, "Large left pleural effusion.", Pleural_Effusion=0.9) == (f, "")


def test_chronic_findings_do_not_contradict_no_acute_disease() -> None:
    assert kinds("Stable left apical scarring. Healed left rib fracture.", "No acute cardiopulmonary disease.") == []
    assert kinds("Cardiomegaly.", "No acute cardiopulmonary abnormality.") == []
    assert kinds("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.",
                 "No acute cardiopulmonary abnormalities.") == []


def test_sentence_affirming_and_negating_other_things_is_consistent() -> None:
    assert kinds("Cardiomegaly, no acute pulmonary findings.") == []
    assert kinds("The lungs are clear except for basilar atelectasis.") == []


def test_rates_per_100_reports() -> None:
    r = c.rates([("The lungs are clear.", "No acute disease."),
                 ("The heart is normal in size. The heart is enlarged.", "1. 2.")])
    assert r["contradiction_per_100"] == 50.0
    assert r["fragment_per_100"] == 100.0  # two fragments in one of two reports
    assert r["fragment_reports_per_100"] == 50.0
    assert r["duplicate_per_100"] == 0.0
    assert c.rates([]) == {k: 0.0 for k in r}


def test_a_consistent_report_is_left_alone() -> None:
    f = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
    toks = c.text_tokens(f, 0.5)
    out_f, out_i, edits = c.make_consistent(toks, c.text_tokens("No acute disease.", 0.5), {}, {})
    assert out_f == toks and edits == []


def test_only_the_clause_that_contradicts_is_removed() -> None:
    f = "Right upper lobe airspace opacity, there is no pneumothorax or large pleural effusion. Small left pleural effusion."
    assert fix(f, Pleural_Effusion=0.7, Lung_Opacity=0.6) == (
        "Right upper lobe airspace opacity, there is no pneumothorax. Small left pleural effusion.", "")
    f = "Right upper lobe airspace opacity, no pleural effusion. Small left pleural effusion."
    assert fix(f, Pleural_Effusion=0.7, Lung_Opacity=0.6) == (
        "Right upper lobe airspace opacity. Small left pleural effusion.", "")
    # a clause that says nothing by itself is not left behind: the whole sentence goes
    assert fix("Stable cardiomegaly, mediastinal contours. The heart is normal in size.", Cardiomegaly=0.1) == (
        "The heart is normal in size.", "")


def test_a_sentence_that_repeats_itself_is_cut_where_the_repeat_starts() -> None:
    i = ("Left lower lobe airspace disease with left lower lobe airspace disease with left lower lobe "
         "airspace disease with left lower lobe pneumonia.")
    assert kinds("", i) == ["duplicate"]
    assert fix("", i, Lung_Opacity=0.6) == ("", "Left lower lobe airspace disease.")


@pytest.mark.parametrize(("sentence", "kept"), [
    ("No pneumothorax or pleural effusion.", "No pneumothorax."),
    ("No pleural effusion or pneumothorax.", "No pneumothorax."),
    ("No focal consolidation, pneumothorax, or pleural effusion.", "No focal consolidation or pneumothorax."),
    ("The lungs are normally inflated without evidence of focal consolidation, pleural effusion, or pneumothorax.",
     "The lungs are normally inflated without evidence of focal consolidation or pneumothorax."),
    ("There is no pleural effusion.", ""),
])
def test_only_the_contradicted_item_of_a_negated_list_goes(sentence: str, kept: str) -> None:
    out, _ = fix(f"{sentence} There is a small right pleural effusion.", Pleural_Effusion=0.7)
    assert out == f"{kept} There is a small right pleural effusion.".strip()


def test_statements_of_one_side_are_one_finding() -> None:
    f = ("There is a small left pleural effusion. There is a large right pleural effusion. "
         "There is a small right pleural effusion. There is right pleural effusion.")
    assert [i.detail for i in c.check(f)] == ["stated twice"]
    out, _ = fix(f, Pleural_Effusion=0.8)
    assert out == "There is a small left pleural effusion. There is a large right pleural effusion."
