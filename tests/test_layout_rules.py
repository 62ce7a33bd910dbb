"""Rules of the layout that a grep can check (issue 15): no program embedded in a string, no test
fixture in a product package, no exception to the import contracts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("dicom_node", "onnx_models", "plugin", "gui", "installer", "cxrnode")


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (REPO / pkg).rglob("*.py"))


def test_no_product_module_runs_a_program_from_a_string() -> None:
    """Programs run in a subprocess are modules run with -m (ruff and mypy see them)."""
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in product_files()
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"""["']-c["']""", line)]
    assert offenders == []


def test_no_test_fixture_ships_in_a_product_package() -> None:
    offenders = [str(p.relative_to(REPO)) for p in product_files()
                 if re.search(r"^\s*(import pytest|from pytest|import pytestqt)", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


def test_import_contracts_have_no_exceptions() -> None:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 8
    assert [c["name"] for c in contracts if c.get("ignore_imports")] == []
