"""The shipped default bundle's drafts pass the consistency checker (issue 11 §3).

Runs ONNX Runtime on val studies of the IU X-ray folder whose drafts, without the rules,
contradicted themselves, repeated a finding or ended in fragments.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_models import consistency
from onnx_models.data import load_studies
from onnx_models.evaluate import _inputs
from onnx_models.runtime import ReportGenerator

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "iu_xray"
# val studies whose drafts broke the rules before they existed (bundle 0.3.x): contradictions,
# duplicates, fragments ("1. 2.", "There is a.")
STUDIES = ("104", "139", "524", "601", "647", "702", "828", "830")

pytestmark = pytest.mark.skipif(not (DATA / "studies.jsonl").exists(), reason=f"{DATA} not present")


def test_default_bundle_drafts_pass_the_checker() -> None:
    studies = [s for s in load_studies(str(DATA), ["val"]) if s.study_id in STUDIES]
    assert len(studies) == len(STUDIES)
    gen = ReportGenerator("default", threads=1)
    inputs, _ = _inputs(gen, studies)
    gen.consistency = False
    raw = gen.generate(inputs)
    gen.consistency = True
    drafts = gen.generate(inputs)
    before = [consistency.check(r.findings, r.impression) for r in raw]
    assert sum(map(len, before)) >= len(STUDIES)  # the rules have work to do on these studies
    for study, r, plain in zip(studies, drafts, raw, strict=True):
        assert consistency.check(r.findings, r.impression) == [], (study.study_id, r.findings, r.impression)
        # every word comes from the decoder or the grounding step, with its probability
        assert r.tokens and all(0.0 <= p <= 1.0 for _, p in r.tokens)
        assert {w for w, _ in r.tokens} <= {w for w, _ in plain.tokens} | {".", "are"}
        # a grounded sentence is reported only when it is still in the draft
        text = f"{r.findings} {r.impression}".lower()
        assert all(s.lower() in text for s, _ in r.grounded)
