"""Writing test configurations (importable from any test module; conftest uses it too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a TOML config: ``{"node": {...}, "destinations": [{...}]}``."""
    lines: list[str] = []
    for section, values in sections.items():
        if isinstance(values, list):
            for item in values:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def node_sections(tmp_path: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
    """Config sections for a fast, loopback-only test node under ``tmp_path``."""
    sections: dict[str, Any] = {
        "node": {
            "ae_title": "CXRNODE",
            "host": "127.0.0.1",
            "port": 0,
            "storage_dir": str(tmp_path / "store"),
            "min_free_space_mb": 0,
            "fsync": True,
            "acse_timeout_s": 10.0,
            "dimse_timeout_s": 20.0,
            "network_timeout_s": 20.0,
            "log_level": "INFO",
        },
        "study": {"quiet_period_s": 0.5},
        "jobs": {"workers": 1, "poll_interval_s": 0.05, "lease_s": 30.0, "backoff_s": 0.2, "max_attempts": 3},
        "outbound": {"backoff_s": 0.1, "max_attempts": 3},
    }
    for section, values in overrides.items():
        if isinstance(values, list):
            sections[section] = values
        else:
            sections.setdefault(section, {}).update(values)
    return sections
