"""The installer's TOML writer (issue 14): values outside the BMP ("Radiology 🩻"), quotes,
backslashes and control characters give TOML that tomllib reads back unchanged, and a config
the installer renders with them loads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from installer_helpers import REPO

from dicom_node.config import load_config
from installer.site_config import parse_reviewer, render_config, toml_string, toml_value

TRICKY = ["Radiology 🩻", "Ünïcödé Hôpital", 'say "hi"', "C:\\dicom\\in", "two\nlines\tand tab", "\x01\x1f\x7f", "",
          "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP 🫁"]


@pytest.mark.parametrize("value", TRICKY)
def test_strings_round_trip_through_tomllib(value: str) -> None:
    assert tomllib.loads(f"k = {toml_string(value)}\n")["k"] == value
    assert tomllib.loads(f"k = {toml_value([value, value])}\n")["k"] == [value, value]


def test_a_rendered_config_with_non_bmp_values_loads(tmp_path: Path) -> None:
    example = (REPO / "installer" / "templates" / "cxrnode.example.toml").read_text(encoding="utf-8")
    reviewer = parse_reviewer("jdoe:Doe^Jane:Radiology 🩻")
    text = render_config(example, {"node": {"storage_dir": str(tmp_path / "data 🩻")}}, {"reviewers": [reviewer],
                         "destinations": []})
    path = tmp_path / "cxrnode.toml"
    path.write_text(text, encoding="utf-8")
    assert tomllib.loads(text)["reviewers"][0]["organisation"] == "Radiology 🩻"
    config = load_config(path, env={})
    assert config.reviewers[0].organisation == "Radiology 🩻"
    assert config.node.storage_dir.endswith("data 🩻")
