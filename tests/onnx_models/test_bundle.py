"""Bundle loading: the shipped default bundle verifies; broken and foreign bundles fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onnx_models.bundle import FORMAT_NAME, BundleError, load_bundle, write_manifest

DEFAULT = Path(__file__).resolve().parents[2] / "onnx_models" / "bundles" / "default"


def test_default_bundle_loads_and_is_small() -> None:
    b = load_bundle("default")
    assert b.path == DEFAULT.resolve()
    m = b.manifest
    assert m["format"] == FORMAT_NAME and m["architecture"] == "encoder-decoder"
    assert m["input"]["views"] == ["PA", "AP", "LATERAL", "LL", "UNKNOWN"]
    assert m["input"]["photometric"] == "MONOCHROME2"
    assert set(m["graphs"]) >= {"encoder", "bridge", "decoder", "view_classifier"}
    assert len(m["observations"]["names"]) == 13
    total = sum(p.stat().st_size for p in DEFAULT.rglob("*") if p.is_file())
    assert total < 50 * 1024 * 1024
    # every file but the manifest is checksummed
    files = {str(p.relative_to(DEFAULT)) for p in DEFAULT.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == files
    assert "MODEL_CARD.md" in files and "tokenizer.json" in files


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(DEFAULT, dst)
    return dst


def test_corrupt_file_is_rejected(copy: Path) -> None:
    with open(copy / "decoder.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="checksum mismatch for decoder.onnx"):
        load_bundle(copy)


def test_missing_file_is_rejected(copy: Path) -> None:
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing file tokenizer.json"):
        load_bundle(copy)


def test_foreign_and_future_bundles_are_rejected(copy: Path, tmp_path: Path) -> None:
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "format": "someone-elses-format"}))
    with pytest.raises(BundleError, match="foreign bundle"):
        load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match="not a cxrnode model bundle"):
        load_bundle(empty)
    with pytest.raises(BundleError, match="not found"):
        load_bundle("no-such-bundle")


def test_decoder_only_needs_embed_and_unknown_architecture_is_refused(copy: Path) -> None:
    """A decoder-only bundle needs encoder, embed and decoder graphs (runnable bundles:
    test_decoder_only.py); an unknown architecture is refused."""
    m = json.loads((copy / "manifest.json").read_text())
    m["architecture"] = "decoder-only"
    del m["graphs"]["bridge"]
    (copy / "bridge.onnx").unlink()
    write_manifest(copy, m)
    with pytest.raises(BundleError, match="decoder-only bundle lacks the 'embed' graph"):
        load_bundle(copy)
    m["graphs"]["embed"] = {"file": "embed.onnx"}
    (copy / "embed.onnx").write_bytes(b"")
    write_manifest(copy, m)
    assert load_bundle(copy).architecture == "decoder-only"
    m["architecture"] = "diffusion"
    write_manifest(copy, m)
    with pytest.raises(BundleError, match="architecture 'diffusion' unknown"):
        load_bundle(copy)
