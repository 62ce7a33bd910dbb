"""plugin.token_info.TokenInfo: one typed record for ``Draft.token_info``, written one way, and
every row the node wrote before still read (issue 15)."""

from __future__ import annotations

import json

from plugin.review import draft_info
from plugin.review.critical import critical_markers
from plugin.token_info import InputCheck, TokenInfo, ViewCheck

GATE = {"mode": "enforce", "outcome": "partial", "reason": "1 of 2 view(s) not used: LATERAL: blank image",
        "views": [{"sop_instance_uid": "1.2.3", "view": "PA", "passed": True, "reasons": [], "ood_score": 2.1,
                   "ood_limit": 5.0},
                  {"sop_instance_uid": "1.2.4", "view": "LATERAL", "passed": False, "reasons": ["blank image"],
                   "ood_score": None, "ood_limit": None}],
        "study": ["frontal-only study (no lateral view)"]}


def _old_pipeline_json(tokens, observations, thresholds, grounded, gen_ms, gate, prior=None) -> str:  # type: ignore[no-untyped-def]
    """What plugin.drafting.pipeline wrote before TokenInfo (the dict it built, json.dumps'd)."""
    info = {
        "tokens": [[w, round(float(p), 4)] for w, p in tokens],
        "observations": {k: round(float(v), 4) for k, v in observations.items()},
        "thresholds": thresholds,
        "grounded": [[t, round(float(p), 4)] for t, p in grounded],
        "duration_ms": round(gen_ms, 1),
        "input_check": gate,
    }
    if prior is not None:
        info["prior"] = prior
    return json.dumps(info)


def test_the_pipeline_writes_what_it_wrote_before_byte_for_byte() -> None:
    tokens = [("Heart", 0.912345), ("size", 0.5)]
    obs = {"Cardiomegaly": 0.123456, "Edema": 0.9}
    thr = {"Cardiomegaly": 0.4, "Edema": 0.55}
    grounded = [("Mild edema.", 0.77777)]
    prior = {"outcome": "found", "study_instance_uid": "1.9", "study_date": "20250101", "reason": ""}
    info = TokenInfo(tokens=tuple(tokens), observations=obs, grounded=tuple(grounded), duration_ms=1234.56,
                     thresholds=thr, input_check=InputCheck.from_json(GATE), prior=prior)
    assert info.to_json() == _old_pipeline_json(tokens, obs, thr, grounded, 1234.56, GATE, prior)
    # a withheld draft: no words, no thresholds
    withheld = dict(GATE, outcome="withheld")
    old = json.dumps({"tokens": [], "observations": {}, "grounded": [], "duration_ms": 0.0, "input_check": withheld})
    assert TokenInfo(input_check=InputCheck.from_json(withheld)).to_json() == old


def test_round_trip() -> None:
    info = TokenInfo(tokens=(("Heart", 0.9123),), observations={"Edema": 0.25}, grounded=(("Edema.", 0.25),),
                     duration_ms=12.5, thresholds={"Edema": 0.5}, input_check=InputCheck.from_json(GATE),
                     prior={"outcome": "none", "reason": "no prior"})
    assert TokenInfo.parse(info.to_json()) == info
    scratch = TokenInfo(no_ai_draft="drafting failed")
    assert TokenInfo.parse(scratch.to_json()) == scratch and scratch.no_ai_draft_reason == "drafting failed"
    assert TokenInfo.parse(TokenInfo().to_json()) == TokenInfo()
    gate = TokenInfo.parse(info.to_json()).input_check
    assert gate is not None and gate.to_json() == GATE and gate.views[1] == ViewCheck(
        "1.2.4", "LATERAL", False, ("blank image",), None, None)


def test_rows_written_before_are_still_read() -> None:
    # the first pipeline (279e90f): tokens, observations, duration_ms; no gate, grounding, thresholds, prior
    first = json.dumps({"tokens": [["Ġheart", 0.9], ["size", 0.4]], "observations": {"Edema": 0.3},
                        "duration_ms": 812.4})
    info = TokenInfo.parse(first)
    assert info.tokens == (("heart", 0.9), ("size", 0.4)) and info.observations == {"Edema": 0.3}
    assert info.duration_ms == 812.4 and info.grounded == () and info.thresholds is None
    assert info.input_check is None and info.prior is None and info.no_ai_draft_reason == ""
    assert draft_info.parse_input_check(first) is None  # "not checked"
    assert draft_info.parse_thresholds(first) == {}
    # a report from scratch as scratch.py wrote it before: only the no_ai_draft key
    old_scratch = json.dumps({"no_ai_draft": {"reason": "drafting failed: boom"}})
    assert TokenInfo.parse(old_scratch).no_ai_draft_reason == "drafting failed: boom"
    assert draft_info.parse_no_ai_draft(old_scratch) == "drafting failed: boom"
    assert draft_info.parse_no_ai_draft(json.dumps({"no_ai_draft": {}})) == "no AI draft"
    # an empty column (the schema's default), NULL, broken JSON, a non-object: empty
    for raw in ("", None, "{broken", "[1, 2]", "3"):
        assert TokenInfo.parse(raw) == TokenInfo()
    # wrong types inside are left out, the rest is read
    mixed = json.dumps({"tokens": [["ok", 1], ["bad", "x"]], "observations": {"A": 0.5, "B": True},
                        "grounded": "nope", "duration_ms": "slow", "thresholds": [0.5],
                        "input_check": {"outcome": "maybe"}, "prior": "found"})
    info = TokenInfo.parse(mixed)
    assert info.tokens == (("ok", 1.0),) and info.observations == {"A": 0.5} and info.grounded == ()
    assert info.duration_ms == 0.0 and info.thresholds is None and info.input_check is None and info.prior is None


def test_one_parse_behind_every_reader() -> None:
    raw = TokenInfo(observations={"Pneumothorax": 0.9}, input_check=InputCheck.from_json(GATE)).to_json()
    assert critical_markers(raw, "", "") == ("pneumothorax: model probability 0.90 ≥ 0.50",)
    assert draft_info.parse_observations(raw) == {"Pneumothorax": 0.9}
    assert draft_info.parse_input_check(raw) == TokenInfo.parse(raw).input_check
