"""Speed variants of an imported bundle (``cxrnode import-hf --int8 | --fp16``), in place.

- ``--int8`` (CPU): ONNX Runtime dynamic quantisation of the encoder, bridge and decoder:
  the weights of ``MatMul``/``Gemm`` (the linear layers) become int8 per output channel,
  activations are quantised on the fly; inputs and outputs stay float32, so the runtime is
  unchanged. The view classifier is left as it is.
- ``--fp16`` (CUDA): every float32 weight and activation becomes float16, with casts at the
  graph inputs and outputs (``keep_io_types``), so the runtime's float32 feeds and KV cache are
  unchanged. Meant for ``CUDAExecutionProvider`` (chosen by ``runtime.choose_providers`` when
  onnxruntime-gpu finds a GPU); on CPU ONNX Runtime lacks fast float16 kernels.

The manifest records the precision (``import.precision``) and the providers the variant is
for (``import.providers``). Offline tooling: onnx + onnxruntime's quantisation tools.

External data: a graph stored with its weights in ``<graph file>.data`` (the bundle format's
external data, :data:`onnx_models.bundle.EXTERNAL_DATA_SUFFIX`) is read with them and its
converted version is written the same way (:func:`save_graph`), so a graph over 2 GB survives
both variants.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .bundle import EXTERNAL_DATA_SUFFIX

#: an import writes a graph with external data when its weights exceed this (below the 2 GB
#: protobuf limit with room for the graph itself), or always when asked (the decoder-only families)
EXTERNAL_DATA_MIN_BYTES = 1 << 30
QUANTISED_ROLES = ("encoder", "bridge", "decoder")
#: decoder-only (LLaVA) bundles: the token embedding stays float32 (a gather, nothing to gain)
DECODER_ONLY_ROLES = ("encoder", "decoder")


def uses_external_data(path: Path) -> bool:
    """Whether the graph at ``path`` keeps any tensor in an external data file."""
    import onnx
    from onnx.external_data_helper import uses_external_data as _uses

    model = onnx.load(str(path), load_external_data=False)
    return any(_uses(t) for t in model.graph.initializer)


def save_graph(model: Any, path: Path, external: bool | None = None) -> bool:
    """Write the ``onnx.ModelProto`` ``model`` (all its tensors in memory) to ``path``; with
    ``external`` (``None``: when its initializers exceed :data:`EXTERNAL_DATA_MIN_BYTES`) its
    tensors of 1 KiB or more go to the side file ``<path name>.data``, which is replaced.
    Returns whether external data was written."""
    import onnx

    if external is None:
        external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_MIN_BYTES
    side = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    side.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=side.name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save_model(model, str(path))
    return bool(external)


def resave(src: Path, dest: Path, external: bool | None) -> None:
    """Load the graph at ``src`` (with its external data, wherever it lies) and write it to
    ``dest`` by :func:`save_graph`."""
    import onnx

    save_graph(onnx.load(str(src), load_external_data=True), dest, external)


def lm_head_nodes(path: Path) -> list[str]:
    """The MatMul/Gemm node(s) that produce the decoder's ``logits`` (through a bias Add)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type not in ("MatMul", "Gemm"):
        node = next((producer[i] for i in node.input if i in producer), None)
    return [node.name] if node is not None else []


def to_int8(bundle: Path, manifest: dict[str, Any], keep_lm_head: bool = False,
            roles: tuple[str, ...] = QUANTISED_ROLES, per_channel: bool = True, weight_type: str = "qint8",
            reduce_range: bool = False) -> None:
    """Replace the graphs of ``roles`` by their dynamically quantised versions
    (``keep_lm_head``: the decoder's output projection stays float32; ``per_channel``: one
    scale per output channel, else per tensor; ``weight_type``: ``qint8`` or ``quint8``;
    ``reduce_range``: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate).
    The defaults are what ``--int8`` writes (benchmarks/import_hf.py measured the others)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wtype = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}[weight_type]
    for role in roles:
        path = bundle / manifest["graphs"][role]["file"]
        external = uses_external_data(path)
        scratch = path.with_name(path.name + ".int8")  # a folder: the quantiser names its own data file
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            tmp = scratch / path.name
            exclude = lm_head_nodes(path) if role == "decoder" and keep_lm_head else []
            quantize_dynamic(str(path), str(tmp), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=wtype, per_channel=per_channel, reduce_range=reduce_range,
                             nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True},
                             use_external_data_format=external)
            if external:  # the bundle's layout: <graph>.data next to the graph
                resave(tmp, path, external=True)
            else:
                tmp.replace(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        manifest["graphs"][role]["precision"] = "int8 weights (dynamic quantisation), float32 I/O"
    options = [o for o, on in (("LM head kept float32", keep_lm_head), ("per-tensor scales", not per_channel),
                               ("uint8 weights", weight_type == "quint8"), ("reduced range", reduce_range)) if on]
    manifest["import"]["precision"] = "int8 (ONNX Runtime dynamic quantisation of the linear layers" + (
        f", {', '.join(options)}" if options else "") + (
        f"; {', '.join(roles)} only)" if tuple(roles) != QUANTISED_ROLES else ")")
    manifest["import"]["providers"] = ["CPUExecutionProvider"]


def to_fp16(bundle: Path, manifest: dict[str, Any], roles: tuple[str, ...] = QUANTISED_ROLES) -> None:
    """Convert the graphs of ``roles`` to float16 with float32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for role in roles:
        path = bundle / manifest["graphs"][role]["file"]
        external = uses_external_data(path)
        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        save_graph(model, path, external)
        manifest["graphs"][role]["precision"] = "float16 weights and activations, float32 I/O"
    manifest["import"]["precision"] = "fp16 (for CUDA)"
    manifest["import"]["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
