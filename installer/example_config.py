"""The documented example configuration, generated from :mod:`dicom_node.config`'s field
metadata so that it covers every key with its default and cannot drift from the code.

Regenerate the shipped template after changing the configuration::

    python -m installer.example_config > installer/templates/cxrnode.example.toml
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from typing import Any

from dicom_node.config import SECTIONS, TABLE_ARRAYS

HEADER = """\
# cxrnode configuration: a documented example covering every key.
#
# `cxrnode install` writes /etc/cxrnode/cxrnode.toml (or PREFIX/etc/cxrnode/cxrnode.toml) from
# this file with the site's answers (--ae-title, --port, --storage-dir, --destination, ...).
# Every value shown below is the default; delete a line to keep the default.
# Precedence at start: --set section.key=value > CXRNODE_<SECTION>_<KEY> > this file > defaults.
# A wrong value stops the node at start with the key's name and what was expected.
# Check a file with: cxrnode doctor --config /etc/cxrnode/cxrnode.toml
"""

TABLE_INTRO = {
    "destinations": [
        "Where signed (and optionally draft) SRs are sent: one [[destinations]] table per PACS.",
        '`cxrnode doctor` sends a C-ECHO to each. None by default. Example (remove the leading "# "):',
    ],
    "reviewers": [
        "Radiologists who sign reports: one [[reviewers]] table each. None by default. Example:",
    ],
}
TABLE_EXAMPLE: dict[str, dict[str, Any]] = {
    "destinations": {"name": "pacs", "ae_title": "PACS", "host": "10.1.2.3", "port": 104, "send": "signed",
                     "tls": False},
    "reviewers": {"username": "jdoe", "display_name": "Doe^Jane", "organisation": "General Hospital"},
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        items = [toml_value(v) for v in value]
        one_line = "[" + ", ".join(items) + "]"
        if len(one_line) <= 80:
            return one_line
        return "[\n" + "".join(f"    {i},\n" for i in items) + "]"
    return repr(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc,operator]


def render() -> str:
    out = [HEADER]
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            out += [f"# {line}" for line in textwrap.wrap(f.metadata.get("doc", ""), 94)]
            out.append(f"{f.name} = {toml_value(_default(f))}")
        out.append("")
    for section, cls in TABLE_ARRAYS.items():
        out += [f"# {line}" for line in TABLE_INTRO.get(section, [f"One [[{section}]] table each; none by default."])]
        out.append(f"# [[{section}]]")
        example = TABLE_EXAMPLE.get(section, {})
        for f in dataclasses.fields(cls):
            default = _default(f)
            value = example.get(f.name, default)
            note = f.metadata.get("doc", "") + (f" Default {toml_value(default)}." if default not in ("",) else "")
            out.append(f"# {f.name} = {toml_value(value)}".ljust(36) + f"# {note}")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(render())
