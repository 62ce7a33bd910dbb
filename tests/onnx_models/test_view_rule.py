"""The one view rule (onnx_models.views): the node, eval and doctor resolve views with it."""

from __future__ import annotations

import pytest

from onnx_models.data import ImageRef
from onnx_models.views import order, resolve, view_from_position


def test_view_position_vocabulary() -> None:
    assert view_from_position("PA") == "PA"
    assert view_from_position(" rl ") == "LATERAL"
    assert view_from_position("LARGE  LATERAL") == "LATERAL"
    assert view_from_position("LL") == "LL"
    assert view_from_position("") == "" and view_from_position("XYZ") == ""


@pytest.mark.parametrize(("tag", "label", "view", "source"), [
    ("", "FRONTAL", "PA", "classifier"),
    ("", "LATERAL", "LATERAL", "classifier"),
    ("AP", "FRONTAL", "AP", "tags"),
    ("LL", "LATERAL", "LL", "tags"),
    ("PA", "LATERAL", "LATERAL", "classifier"),  # the lying tag of many archives
    ("LL", "FRONTAL", "PA", "classifier"),
    ("UNKNOWN", "FRONTAL", "PA", "classifier"),
])
def test_resolve(tag: str, label: str, view: str, source: str) -> None:
    d = resolve(tag, (label, 0.9))
    assert (d.view, d.source) == (view, source)
    assert f"{label} (0.90)" in d.note or f"{label} 0.90" in d.note


def test_resolve_rejects_unknown_labels_and_reports_tag_conflicts() -> None:
    with pytest.raises(ValueError, match="FRONTAL or LATERAL"):
        resolve("PA", ("OBLIQUE", 0.5))
    assert "tags disagree: x" in resolve("PA", ("FRONTAL", 0.9), conflict="x").note


def test_order_is_stable_frontal_first() -> None:
    views = ["LATERAL", "PA", "UNKNOWN", "LL", "PA", "AP"]
    assert [views[i] for i in order(views)] == ["PA", "PA", "AP", "LATERAL", "LL", "UNKNOWN"]
    assert order(views)[:2] == [1, 4]


def test_training_views_use_the_same_vocabulary() -> None:
    from pathlib import Path

    assert ImageRef("a", Path("x"), "RL", "Lateral").view == "LATERAL"
    assert ImageRef("a", Path("x"), "LARGE LATERAL", "").view == "LATERAL"
    assert ImageRef("a", Path("x"), "PA", "Lateral").view == "LATERAL"
