"""The model bundle: a folder with ``manifest.json``, ONNX graphs, ``tokenizer.json`` and
``MODEL_CARD.md``. See ``onnx_models/README.md`` for the format.

``load_bundle`` checks the manifest (format name and version, architecture, required graphs)
and the sha256 of every listed file before anything is run, and raises :class:`BundleError`
with the bundle path and the first problem found. No torch here (import-linter contract).

Graphs over the 2 GB protobuf limit keep their weights in ONNX external data: one side file
``<graph file>.data`` next to the graph (e.g. ``decoder.onnx.data``), named in the manifest as
the graph's ``external_data`` and checksummed in ``files`` like the graph itself; ONNX Runtime
reads it from the bundle folder when it opens the graph by path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_NAME = "cxrnode-model-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the side file of a graph whose weights are stored as ONNX external data: ``<graph file>.data``
EXTERNAL_DATA_SUFFIX = ".data"
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"

#: graphs each architecture must provide (roles), see README.md ("encoder-decoder graphs",
#: "decoder-only (LLaVA-style) graphs"); the runtime executes both
REQUIRED_GRAPHS: dict[str, tuple[str, ...]] = {
    "encoder-decoder": ("encoder", "bridge", "decoder"),
    "decoder-only": ("encoder", "embed", "decoder"),
}


class BundleError(Exception):
    """A model bundle is missing, broken, foreign, or of an unsupported version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An opened model bundle: its folder and its manifest (``manifest.json``).

    Attributes
    ----------
    path:
        The bundle's folder.
    manifest:
        The parsed manifest (``name``, ``version``, ``architecture``, ``graphs``, ...).
    """
    path: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def architecture(self) -> str:
        return str(self.manifest["architecture"])

    def file(self, relpath: str) -> Path:
        return self.path / relpath

    def graph(self, role: str) -> Path:
        try:
            return self.path / self.manifest["graphs"][role]["file"]
        except KeyError as exc:
            raise BundleError(f"{self.path}: manifest has no graph with role {role!r}") from exc


def resolve(name_or_path: str | Path) -> Path:
    """A bundle name (a folder in ``onnx_models/bundles/``) or a path to a bundle folder."""
    p = Path(name_or_path)
    if p.is_dir():
        return p.resolve()
    if isinstance(name_or_path, str) and "/" not in name_or_path and (BUNDLES_DIR / name_or_path).is_dir():
        return (BUNDLES_DIR / name_or_path).resolve()
    have = ", ".join(available_bundles()) or "none"
    raise BundleError(f"model bundle {str(name_or_path)!r} not found (neither a folder nor a name in {BUNDLES_DIR}; "
                      f"available: {have})")


def available_bundles() -> list[str]:
    """The names of the bundles installed in ``BUNDLES_DIR`` (folders with a manifest).

    Returns
    -------
    list[str]
        Folder names, sorted; each is a valid ``name_or_path`` for :func:`load_bundle`.
    """
    try:
        return sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / MANIFEST).is_file())
    except OSError:
        return []


def _require(cond: bool, path: Path, message: str) -> None:
    if not cond:
        raise BundleError(f"{path}: {message}")


def load_bundle(name_or_path: str | Path = "default", verify: bool = True) -> Bundle:
    """Open and validate a bundle (format name and version, required graphs for its architecture).

    Parameters
    ----------
    name_or_path:
        A bundle name in ``BUNDLES_DIR`` (``"default"`` = ``onnx_models/bundles/default/``) or a
        folder.
    verify:
        Check the SHA-256 of every file listed in the manifest.

    Returns
    -------
    Bundle
        The opened bundle.

    Raises
    ------
    BundleError
        The folder is not a bundle, its manifest is not valid, its format version is not this
        code's, a file is missing or its checksum differs (the message says which).
    """
    path = resolve(name_or_path)
    mpath = path / MANIFEST
    _require(mpath.is_file(), path, f"no {MANIFEST}: not a cxrnode model bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: unreadable manifest ({exc})") from exc
    _require(isinstance(manifest, dict), path, "manifest is not a JSON object")
    _require(
        manifest.get("format") == FORMAT_NAME,
        path,
        f"foreign bundle: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}",
    )
    fv = manifest.get("format_version")
    _require(
        isinstance(fv, int) and fv <= FORMAT_VERSION,
        path,
        f"format_version {fv!r} is not supported by this cxrnode (supports <= {FORMAT_VERSION})",
    )
    for key in ("name", "version", "task", "architecture", "graphs", "tokenizer", "input", "generation", "files"):
        _require(key in manifest, path, f"manifest lacks the required key {key!r}")
    arch = manifest["architecture"]
    _require(
        arch in REQUIRED_GRAPHS,
        path,
        f"architecture {arch!r} unknown (known: {', '.join(REQUIRED_GRAPHS)})",
    )
    graphs = manifest["graphs"]
    for role in REQUIRED_GRAPHS[arch]:
        _require(role in graphs and "file" in graphs[role], path, f"{arch} bundle lacks the {role!r} graph")
    files: dict[str, str] = manifest["files"]
    referenced = [g["file"] for g in graphs.values()] + [manifest["tokenizer"]["file"]]
    for rel in referenced:
        _require(rel in files, path, f"{rel} is used but has no sha256 in the manifest")
    data_of: dict[str, str] = {}  # external data file -> the role of the graph it belongs to
    for role, g in graphs.items():
        data = g.get("external_data")
        side = g["file"] + EXTERNAL_DATA_SUFFIX
        _require(data in (None, side), path, f"graph {role!r}: external_data must be {side!r}, not {data!r}")
        if data is None:
            _require(not (path / side).exists(), path, f"{side} lies next to graph {role!r} but the manifest does "
                     "not name it as the graph's external_data (re-run write_manifest)")
            continue
        _require(data in files, path, f"{data} (external data of graph {role!r}) has no sha256 in the manifest")
        data_of[data] = role
    for rel, digest in files.items():
        fp = path / rel
        what = f" (the external weights of graph {data_of[rel]!r})" if rel in data_of else ""
        _require(fp.is_file(), path, f"missing file {rel}{what}")
        if verify:
            actual = sha256_file(fp)
            _require(actual == digest, path, f"checksum mismatch for {rel}{what} (file changed or corrupt)")
    return Bundle(path=path, manifest=manifest)


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in ``files`` (sha256 of every file of the folder but the manifest) and each graph's
    ``external_data`` (its ``<graph file>.data`` side file when there is one), and write it."""
    for g in manifest.get("graphs", {}).values():
        side = g["file"] + EXTERNAL_DATA_SUFFIX
        if (path / side).is_file():
            g["external_data"] = side
        else:
            g.pop("external_data", None)
    manifest = dict(manifest)
    manifest["files"] = {
        str(p.relative_to(path)): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
