"""plugin.review.draft_info: what the reviewer reads from Draft.token_info (the gate, probabilities, thresholds)."""

from __future__ import annotations

import json

from plugin.review import draft_info as di


def test_input_check_parsing_is_strict_about_outcome_and_lenient_about_the_rest() -> None:
    raw = json.dumps({"tokens": [], "input_check": {
        "mode": "enforce", "outcome": "Partial", "reason": "the lateral view is unlike the training images",
        "views": [{"sop_instance_uid": "1.2.3", "view": "PA", "passed": True, "reasons": [], "ood_score": 2.1,
                   "ood_limit": 5.0},
                  {"sop_instance_uid": "1.2.4", "view": "", "passed": False, "reasons": "blank image",
                   "ood_score": None, "ood_limit": "5"},
                  "not a view"],
        "study": ["frontal-only study"]}})
    g = di.parse_input_check(raw)
    assert g is not None and g.outcome == "partial" and not g.withheld
    assert [(v.view, v.passed, v.reasons, v.ood_score, v.ood_limit) for v in g.views] == [
        ("PA", True, (), 2.1, 5.0), ("UNKNOWN", False, ("blank image",), None, None)]
    assert g.failed_views == (g.views[1],) and g.for_view("1.2.4") is g.views[1] and g.for_view("9") is None
    assert g.study == ("frontal-only study",)
    assert g.views[1].summary() == "not used: blank image" and g.views[0].summary() == "passed the input check"
    # a draft made before the gate, an unknown outcome, broken JSON: not checked
    for bad in (json.dumps({"tokens": []}), json.dumps({"input_check": {"outcome": "maybe"}}),
                json.dumps({"input_check": []}), "{not json", "", None, "[1, 2]"):
        assert di.parse_input_check(bad) is None


def test_observations_thresholds_and_decision_thresholds() -> None:
    raw = json.dumps({"observations": {"Edema": 0.2, "Cardiomegaly": 0.9, "Bad": "x", "Flag": True},
                      "thresholds": {"Edema": 0.4, "Cardiomegaly": 0.4}})
    assert di.parse_observations(raw) == {"Edema": 0.2, "Cardiomegaly": 0.9}
    assert di.parse_thresholds(raw) == {"Edema": 0.4, "Cardiomegaly": 0.4}
    calls = di.observation_calls(di.parse_observations(raw), {"Edema": 0.4})
    assert [(c.name, c.called) for c in calls] == [("Cardiomegaly", None), ("Edema", False)]
    assert calls[1].log_odds_from_threshold() is not None and calls[0].log_odds_from_threshold() is None
    manifest = {"observations": {"names": ["A", "B"], "thresholds": [0.1, 0.2]},
                "generation": {"grounding": {"enabled": True, "thresholds": [0.4, 0.5]}}}
    assert di.decision_thresholds(manifest) == {"A": 0.4, "B": 0.5}  # grounding decides what is stated
    manifest["generation"]["grounding"]["enabled"] = False  # type: ignore[index]
    assert di.decision_thresholds(manifest) == {"A": 0.1, "B": 0.2}
    assert di.decision_thresholds({"observations": {"names": ["A"], "thresholds": [0.1, 0.2]}}) == {}


def test_thresholds_of_the_installed_bundle_only_for_its_own_drafts() -> None:
    from onnx_models.bundle import load_bundle

    b = load_bundle("default", verify=False)
    thr = di.bundle_thresholds("default", b.name, b.version)
    assert thr and set(thr) == set(b.manifest["observations"]["names"])
    assert di.bundle_thresholds("default", b.name, "0.0.0-other") == {}
    assert di.bundle_thresholds("/nonexistent/bundle", b.name, b.version) == {}
