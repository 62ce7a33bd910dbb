"""The site's answers (flags, ``--set``, prompts) turned into the installed configuration file.

The configuration is the example file (``templates/cxrnode.example.toml``, comments kept) with the
answers set in place and the ``[[destinations]]``/``[[reviewers]]`` tables appended; it is
validated with :func:`dicom_node.config.load_config` before anything is written. Standard library
and :mod:`dicom_node.config` only.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from dicom_node.config import ConfigError, load_config, parse_overrides
from installer.layout import InstallError, Layout, write_private

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """A TOML basic string: UTF-8 as is (also outside the BMP: "Radiology 🩻"), quotes, backslashes
    and control characters escaped (json.dumps would write a surrogate pair, which TOML rejects)."""
    return '"' + "".join(_TOML_ESCAPES.get(ch) or (f"\\u{ord(ch):04X}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in value) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise InstallError(f"cannot write {value!r} to TOML")


def render_config(example: str, values: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]) -> str:
    """The example configuration with the site's answers filled in. Comments are kept.

    Parameters
    ----------
    example:
        The commented example configuration (:func:`installer.example_config.render`).
    values:
        Section -> key -> value to set.
    tables:
        ``destinations``/``reviewers`` tables to append.

    Returns
    -------
    str
        The configuration's TOML text.
    """
    lines = example.splitlines()
    for section, kv in values.items():
        try:
            start = lines.index(f"[{section}]")
        except ValueError:
            lines += ["", f"[{section}]"]
            start = len(lines) - 1
        for key, value in kv.items():
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
            pat = re.compile(rf"^{re.escape(key)}\s*=")
            idx = next((i for i in range(start + 1, end) if pat.match(lines[i])), None)
            new = f"{key} = {toml_value(value)}"
            if idx is None:
                lines.insert(start + 1, new)
                continue
            stop = idx + 1
            if lines[idx].rstrip().endswith("["):  # a multi-line array: drop its continuation lines
                while stop < end and lines[stop].strip() != "]":
                    stop += 1
                stop += 1
            lines[idx:stop] = [new]
    for name, items in tables.items():
        for item in items:
            lines += ["", f"[[{name}]]"] + [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def parse_destination(text: str) -> dict[str, Any]:
    """``NAME=AE@HOST:PORT[,send=drafts_and_signed][,tls]`` -> a [[destinations]] table."""
    m = re.fullmatch(r"([^=]+)=([^@]+)@(.+):(\d+)((?:,[a-z_]+(?:=[a-z_]+)?)*)", text.strip())
    if not m:
        raise InstallError(f"--destination {text!r}: expected NAME=AE_TITLE@HOST:PORT[,send=drafts_and_signed][,tls]")
    item: dict[str, Any] = {"name": m[1], "ae_title": m[2], "host": m[3], "port": int(m[4])}
    for opt in filter(None, m[5].split(",")):
        k, _, v = opt.partition("=")
        if k == "send" and v:
            item["send"] = v
        elif k == "tls" and not v:
            item["tls"] = True
        else:
            raise InstallError(f"--destination {text!r}: unknown option {opt!r} (send=..., tls)")
    return item


def parse_reviewer(text: str) -> dict[str, Any]:
    """``USERNAME:Family^Given[:Organisation]`` -> a [[reviewers]] table."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise InstallError(f"--reviewer {text!r}: expected USERNAME:Family^Given[:Organisation]")
    item = {"username": parts[0], "display_name": parts[1]}
    if len(parts) == 3:
        item["organisation"] = parts[2]
    return item


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set section.key=value`` items, parsed as the node parses them
    (:func:`dicom_node.config.parse_overrides`: the value in TOML syntax, a bare word a string)."""
    try:
        return parse_overrides(items)
    except ConfigError as exc:
        raise InstallError(str(exc)) from exc


def site_answers(args: argparse.Namespace, layout: Layout) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    values: dict[str, dict[str, Any]] = {"node": {}}
    node = values["node"]
    flags = {"ae_title": args.ae_title, "host": args.host, "port": args.port, "database_url": args.database_url,
             "min_free_space_mb": args.min_free_space_mb}
    node.update({k: v for k, v in flags.items() if v is not None})
    node["storage_dir"] = str(Path(args.storage_dir).resolve()) if args.storage_dir else str(layout.storage)
    model: dict[str, Any] = {}
    if args.model_bundle:
        model["bundle"] = args.model_bundle
    if args.providers is not None:
        model["providers"] = [p for p in args.providers.split(",") if p]
    if model:
        values["model"] = model
    security: dict[str, Any] = {}
    if args.allowed_ae:
        security["allowed_calling_ae_titles"] = args.allowed_ae
    if args.allowed_network:
        security["allowed_networks"] = args.allowed_network
    for k in ("tls_certificate", "tls_private_key", "tls_ca"):
        if getattr(args, k):
            security[k] = str(Path(getattr(args, k)).resolve())
    if security:
        values["security"] = security
    for section, kv in parse_set(args.set or []).items():
        values.setdefault(section, {}).update(kv)
    tables = {
        "destinations": [parse_destination(d) for d in args.destination or []],
        "reviewers": [parse_reviewer(r) for r in args.reviewer or []],
    }
    return values, tables


def prompt_answers(values: dict[str, dict[str, Any]]) -> None:
    """Ask for the site's answers not given as flags (only on a terminal)."""
    node = values["node"]
    questions = [("ae_title", "AE title of this node", "CXRNODE", str),
                 ("port", "TCP port of the Storage SCP", 11112, int),
                 ("storage_dir", "Storage folder", node.get("storage_dir"), str)]
    for key, text, default, conv in questions:
        if key in node and key != "storage_dir":
            continue
        while True:
            raw = input(f"{text} [{node.get(key, default)}]: ").strip()
            if not raw:
                node.setdefault(key, default)
                break
            try:
                node[key] = conv(raw)
                break
            except ValueError:
                print(f"  expected {conv.__name__}")


def write_config(layout: Layout, text: str, group: str | None) -> Path:
    """The configuration, 0640 root:``group``: the installed configuration, the only one whose
    ``[[reviewers]]`` may sign (plugin.review.read_installed_config)."""
    path = layout.config
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, text, 0o640, group)
    return path


def validate_config_text(text: str) -> Any:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8") as f:
        f.write(text)
    try:
        return load_config(f.name, env={})
    finally:
        os.unlink(f.name)
