"""Bundle loading: the shipped default bundle verifies; broken and foreign bundles fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
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


def _externalise(bundle: Path, role: str) -> str:
    """Rewrite graph ``role`` with its weights in ``<graph>.data`` (ONNX external data) and the
    manifest's checksums; returns the data file's name."""
    pytest.importorskip("onnx")
    import onnx

    from onnx_models.import_hf_speed import save_graph

    m = json.loads((bundle / "manifest.json").read_text())
    graph = bundle / m["graphs"][role]["file"]
    assert save_graph(onnx.load(str(graph)), graph, external=True)
    write_manifest(bundle, m)
    return graph.name + ".data"


def test_external_data_loads_drafts_the_same_text_and_is_verified(copy: Path) -> None:
    """A graph whose weights live in ``decoder.onnx.data`` loads from the bundle folder, drafts
    the text the self-contained graph drafts, and a changed, missing or unlisted data file is
    refused naming the file and its graph."""
    from onnx_models.runtime import ReportGenerator, StudyInput

    rng = np.random.default_rng(3)
    study = StudyInput(views=[(rng.random((128, 128), dtype=np.float32), "PA"),
                              (rng.random((128, 128), dtype=np.float32), "LATERAL")], indication="Cough.")
    before = ReportGenerator(copy, threads=1).generate([study], beam_size=1)[0]
    size = (copy / "decoder.onnx").stat().st_size
    data = _externalise(copy, "decoder")
    assert data == "decoder.onnx.data" and (copy / "decoder.onnx").stat().st_size < size / 10
    b = load_bundle(copy)
    assert b.manifest["graphs"]["decoder"]["external_data"] == data and data in b.manifest["files"]
    after = ReportGenerator(copy, threads=1).generate([study], beam_size=1)[0]
    assert (after.findings, after.impression, after.tokens) == (before.findings, before.impression, before.tokens)
    assert before.findings or before.impression
    raw = (copy / data).read_bytes()
    with open(copy / data, "r+b") as fh:
        fh.seek(len(raw) // 2)
        fh.write(bytes(b ^ 0xFF for b in raw[len(raw) // 2 : len(raw) // 2 + 4]))
    with pytest.raises(BundleError, match=r"checksum mismatch for decoder\.onnx\.data \(the external weights of "
                                          r"graph 'decoder'\)"):
        load_bundle(copy)
    (copy / data).unlink()
    with pytest.raises(BundleError, match=r"missing file decoder\.onnx\.data \(the external weights of graph "):
        load_bundle(copy, verify=False)
    (copy / data).write_bytes(raw)
    load_bundle(copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["files"][data]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data \(external data of graph 'decoder'\) has no sha256"):
        load_bundle(copy)
    del m["graphs"]["decoder"]["external_data"]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data lies next to graph 'decoder' but the manifest"):
        load_bundle(copy)


def test_graph_in_per_tensor_files_is_rewritten_to_one_data_file(tmp_path: Path) -> None:
    """torch writes a graph over 2 GB as one file per tensor: ``resave`` reads that layout and
    writes the bundle's (``<graph>.data``), which ONNX Runtime runs with the same result."""
    pytest.importorskip("onnx")
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnx_models.import_hf_speed import resave, uses_external_data

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(model, str(scratch / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    assert sorted(p.name for p in scratch.iterdir()) == ["g.onnx", "w1", "w2"]
    out = tmp_path / "bundle"
    out.mkdir()
    resave(scratch / "g.onnx", out / "g.onnx", external=True)
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx", "g.onnx.data"] and uses_external_data(out / "g.onnx")
    x = rng.standard_normal((1, 32)).astype(np.float32)
    [y] = ort.InferenceSession(str(out / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w1 @ w2, rtol=1e-5, atol=1e-5)
    resave(out / "g.onnx", out / "g.onnx", external=False)  # back to one file: the side file goes
    assert sorted(p.name for p in out.iterdir()) == ["g.onnx"] and not uses_external_data(out / "g.onnx")
