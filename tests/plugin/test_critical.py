"""Critical drafts float up: the one rule of ``plugin.review.critical`` (observation probabilities
and the draft's own words), and the worklist's priority sort (priority first, critical drafts
first within it, then the oldest) on drafts made by the real pipeline, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from support import synthetic
from support.postgres import private_database

from dicom_node.db import Draft, Study
from plugin.review.critical import CRITICAL_RULES, critical_findings, critical_markers
from plugin.review.service import ReviewService, sort_rows


def markers(observations: dict[str, float] | None = None, findings: str = "", impression: str = "") -> list[str]:
    return [f.marker for f in critical_findings(observations or {}, findings, impression)]


def test_critical_rule_is_one_table_with_documented_thresholds() -> None:
    assert [(r.marker, r.observation, r.min_probability) for r in CRITICAL_RULES] == [
        ("pneumothorax", "Pneumothorax", 0.50),
        ("large pleural effusion", "Pleural Effusion", 0.80),
        ("new consolidation", "Consolidation", 0.70),
        ("device malposition", "", None),
    ]
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for r in CRITICAL_RULES:
        assert r.marker in readme


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        ({"Pneumothorax": 0.50}, ["pneumothorax"]),
        ({"Pneumothorax": 0.49}, []),
        ({"Pleural Effusion": 0.79}, []),
        ({"Pleural Effusion": 0.80, "Consolidation": 0.71}, ["large pleural effusion", "new consolidation"]),
        ({"Support Devices": 0.99}, []),  # a device present is not a device misplaced
        ({}, []),
    ],
)
def test_critical_by_observation_probability(observations: dict[str, float], expected: list[str]) -> None:
    assert markers(observations) == expected


@pytest.mark.parametrize(
    ("findings", "impression", "expected"),
    [
        ("There is a small left apical pneumothorax.", "", ["pneumothorax"]),
        ("No pneumothorax.", "No acute cardiopulmonary abnormality.", []),
        ("Large right pleural effusion.", "", ["large pleural effusion"]),
        ("Small right pleural effusion.", "", []),  # small is not critical
        ("No large pleural effusion.", "", []),  # negated
        ("", "New right lower lobe consolidation.", ["new consolidation"]),
        ("Right lower lobe consolidation.", "", []),  # not said to be new
        ("The endotracheal tube tip is in the right mainstem bronchus.", "", ["device malposition"]),
        ("The nasogastric tube is coiled in the oesophagus.", "", ["device malposition"]),
        ("Malpositioned central venous catheter.", "", ["device malposition"]),
        ("No malpositioned lines or tubes.", "", []),
        ("The endotracheal tube terminates 4 cm above the carina.", "", []),
    ],
)
def test_critical_by_the_drafts_words(findings: str, impression: str, expected: list[str]) -> None:
    assert markers(findings=findings, impression=impression) == expected


def test_critical_description_says_what_crossed() -> None:
    (f,) = critical_findings({"Pneumothorax": 0.62}, "There is a pneumothorax.")
    assert f.describe() == "pneumothorax: model probability 0.62 ≥ 0.50"  # the probability wins over the text
    (g,) = critical_findings({}, "Large left pleural effusion.")
    assert g.describe() == "large pleural effusion: the draft says \u201clarge left pleural effusion\u201d"
    token_info = json.dumps({"observations": {"Pneumothorax": 0.9}})
    assert critical_markers(token_info, "", "") == ("pneumothorax: model probability 0.90 ≥ 0.50",)
    assert critical_markers("not json", "", "") == ()


# -- the worklist -----------------------------------------------------------------------------

def _build(root: Path, url: str = "") -> synthetic.NodeFixture:
    """Four drafted studies: A outpatient, B outpatient and critical, C from the ED, D with no
    stated priority and critical (made critical by its stored observation probabilities)."""
    specs = synthetic.sample_studies(4, size=128, prefix="crit")
    specs[0].extra["CurrentPatientLocation"] = "Outpatient clinic"
    specs[1].extra["RequestingService"] = "GP"
    specs[2].extra["CurrentPatientLocation"] = "ED"
    node = synthetic.build_node(root, specs, database_url=url)
    with node.sessions() as s, s.begin():
        for i in (1, 3):
            study = s.scalars(select(Study).where(Study.study_instance_uid == specs[i].study_instance_uid)).one()
            d = s.scalars(select(Draft).where(Draft.study_id == study.id)).one()
            info = json.loads(d.token_info or "{}")
            info.setdefault("observations", {})["Pneumothorax"] = 0.93
            s.execute(update(Draft).where(Draft.id == d.id).values(token_info=json.dumps(info)))
    return node


def _check_order(node: synthetic.NodeFixture) -> None:
    svc = ReviewService(node.config, node.sessions, node.store)
    rows = svc.worklist(sort="priority", descending=False)
    ids = [r.patient_id for r in rows]
    # ED first; then outpatient with the critical draft (B) above the older non-critical one (A);
    # the critical draft with no stated priority (D) stays below the stated priorities
    assert ids == ["CXR-10003", "CXR-10002", "CXR-10001", "CXR-10004"], ids
    by = {r.patient_id: r for r in rows}
    assert (by["CXR-10003"].priority, by["CXR-10001"].priority, by["CXR-10004"].priority) == ("ED", "outpatient", "")
    assert by["CXR-10002"].critical == ("pneumothorax: model probability 0.93 ≥ 0.50",)
    assert not by["CXR-10001"].critical
    assert [r.patient_id for r in svc.worklist(sort="priority", descending=True)] == ids[::-1]
    assert [r.patient_id for r in sort_rows(rows, "age", True)] == ["CXR-10001", "CXR-10002", "CXR-10003", "CXR-10004"]


@pytest.fixture
def crit_node(tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    node = _build(tmp_path / "node")
    yield node
    node.engine.dispose()


def test_critical_drafts_float_up_within_priority_sqlite(crit_node: synthetic.NodeFixture) -> None:
    _check_order(crit_node)


@pytest.mark.postgres
def test_critical_drafts_float_up_within_priority_postgres(tmp_path: Path) -> None:
    with private_database("critical") as url:
        node = _build(tmp_path / "node", url)
        try:
            _check_order(node)
        finally:
            node.engine.dispose()


def test_priority_sort_key_is_accepted_by_the_worklist(crit_node: synthetic.NodeFixture) -> None:
    svc = ReviewService(crit_node.config, crit_node.sessions, crit_node.store)
    with pytest.raises(ValueError, match="priority"):
        svc.worklist(sort="urgency")


def test_priority_and_critical_in_cxrnode_worklist(crit_node: synthetic.NodeFixture,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from installer.cli import main

    cfg = str(crit_node.root / "cxrnode.toml")
    assert main(["worklist", "--config", cfg, "--sort", "priority", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["patient_id"] for r in rows] == ["CXR-10003", "CXR-10002", "CXR-10001", "CXR-10004"]
    assert [r["priority"] for r in rows] == ["ED", "outpatient", "outpatient", None]
    assert rows[1]["critical"] == ["pneumothorax: model probability 0.93 ≥ 0.50"] and rows[2]["critical"] == []
    assert main(["worklist", "--config", cfg, "--sort", "priority"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "Priority"
    assert [ln.split()[0] for ln in lines[2:]] == ["ED", "⚠", "outpatient", "⚠"]
