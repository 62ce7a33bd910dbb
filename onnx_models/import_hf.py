"""``cxrnode import-hf``: a local Hugging Face ``transformers`` checkpoint -> a cxrnode model bundle.

Offline tooling (torch + transformers, the ``[import]`` extra); the runtime never imports it.
Reads only the checkpoint folder (``HF_HUB_OFFLINE=1``, ``local_files_only=True``, no remote
code) and writes a bundle that :class:`onnx_models.runtime.ReportGenerator` runs unchanged.

Families: ``LlavaForConditionalGeneration`` with a Llama language model and
``Gemma3ForConditionalGeneration`` onto the ``decoder-only`` contract
(:mod:`onnx_models.import_hf_llava`, :mod:`onnx_models.import_hf_gemma3`), and ``VisionEncoderDecoderModel`` (any image encoder ``transformers`` builds,
e.g. ViT or Swin-v2, with a BERT decoder with cross-attention, the shape of the CheXpert Plus
/ RRG24 baselines), mapped onto the ``encoder-decoder`` graph contract (README.md):

- ``encoder``: ``images`` [batch, views, 1, S, S] (the runtime's normalisation undone, the
  grey image copied to 3 channels, the image processor's per-channel mean/std applied) ->
  ``image_tokens`` [batch, views, T, D] (the encoder's ``last_hidden_state`` per view). No
  ``obs_logits``: the model has no observation head.
- ``bridge``: ``image_tokens``, ``view_mask`` -> ``cross_k``, ``cross_v`` (every decoder
  layer's cross-attention keys/values, computed once per study), ``memory_mask``. The
  memory is the tokens of the views read, concatenated (padded views masked).
- ``decoder``: ``input_ids``, ``memory_mask``, ``cross_k``, ``cross_v``, ``past_k``,
  ``past_v`` -> ``logits``, ``present_k``, ``present_v`` (self-attention cache, stacked).

Views: ``views="first-frontal"`` (default) sets ``input.max_views = 1``: the node orders a
study's views PA, AP, LATERAL, LL (``plugin.drafting.pipeline``), so the model reads the first frontal
view, as the published single-image models were trained, and the job log names the views not
used. ``views="all"`` reads up to 4 views, their tokens concatenated as one memory (a model
not trained that way sees an input it never saw: only for models trained on several views).

After export the bundle is checked against the torch model (logits on probe images, greedy
token ids) and the figures go into the manifest (``import.checks``) and ``MODEL_CARD.md``;
an fp32 export whose logits differ by more than 1e-4 is refused.

Graphs over 2 GB: the weights go to ONNX external data, ``<graph file>.data`` beside the graph
(checksummed in the manifest, README "Bundle format"): always for the decoder-only families,
for this family only when a graph's weights exceed 1 GiB (``import_hf(external_data=...)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from .bundle import (  # noqa: E402
    BUNDLES_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    load_bundle,
    sha256_file,
    write_manifest,
)
from .views import VIEWS  # noqa: E402

log = logging.getLogger(__name__)

OPSET = 17
#: the runtime's normalisation in imported bundles: the node's own (so the view classifier
#: copied from the default bundle reads the same pixels); the encoder graph undoes it
NODE_MEAN, NODE_STD = 0.5, 0.25
#: additive attention bias for masked positions: exp() underflows to exactly 0 in fp32 and it
#: stays finite in fp16
NEG = -1e4
FP32_TOLERANCE = 1e-4
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
SUPPORTED_DECODERS = ("bert",)
VIEW_MODES = {"first-frontal": 1, "all": 4}


class ImportHFError(Exception):
    """The checkpoint cannot be imported (missing files, remote code, unsupported family)."""


# --- reading the checkpoint folder -----------------------------------------------------------

def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check the folder holds what an offline import needs and return ``config.json``.
    Raises :class:`ImportHFError` naming every missing file."""
    p = Path(path)
    if not p.is_dir():
        raise ImportHFError(f"{p}: not a folder (import-hf reads a local checkpoint folder, never the network)")
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    weights = [w for w in WEIGHT_FILES if (p / w).is_file()]
    if not weights:
        missing.append("model.safetensors (or pytorch_model.bin)")
    for index in (w for w in weights if w.endswith(".index.json")):
        shards = set(json.loads((p / index).read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += sorted(s for s in shards if not (p / s).is_file())
    if not (p / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (the image processor's settings)")
    if not (p / "tokenizer.json").is_file() and not (p / "vocab.txt").is_file():
        missing.append("tokenizer.json (or vocab.txt)")
    if missing:
        raise ImportHFError(f"{p}: the checkpoint folder lacks {', '.join(missing)} (import-hf reads only this "
                            "folder; copy the complete snapshot, e.g. `hf download REPO --local-dir DIR`, first)")
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    if cfg.get("auto_map") or any(isinstance(c, dict) and c.get("auto_map") for c in cfg.values()):
        raise ImportHFError(f"{p}: the checkpoint needs remote code (config.json has auto_map); import-hf runs "
                            "no remote code: export it by hand into the graph contract (onnx_models/README.md)")
    return cfg


def family(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "vision-encoder-decoder" or "VisionEncoderDecoderModel" in archs:
        return "vision-encoder-decoder"
    if cfg.get("model_type") == "llava" or "LlavaForConditionalGeneration" in archs:
        return "llava"
    if cfg.get("model_type") == "gemma3" or "Gemma3ForConditionalGeneration" in archs:
        return "gemma3"
    raise ImportHFError(f"model_type {cfg.get('model_type')!r} (architectures {archs}) is not supported by import-hf "
                        "(supported: VisionEncoderDecoderModel, LlavaForConditionalGeneration, "
                        "Gemma3ForConditionalGeneration); see onnx_models/README.md for exporting by hand")


def image_spec(path: Path) -> dict[str, Any]:
    """The image processor's settings (``preprocessor_config.json``) as the manifest records
    them: square input size, resample, per-channel mean and std, rescale."""
    pp = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    size = pp.get("crop_size") if pp.get("do_center_crop") else pp.get("size")
    if isinstance(size, int):
        h = w = size
    elif isinstance(size, dict) and "height" in size:
        h, w = int(size["height"]), int(size["width"])
    elif isinstance(size, dict) and "shortest_edge" in size:
        h = w = int(size["shortest_edge"])
    else:
        raise ImportHFError(f"{path}/preprocessor_config.json: image size {size!r} not understood")
    if h != w:
        raise ImportHFError(f"{path}: the image processor resizes to {h} x {w}; the runtime feeds square images only")
    mean = pp.get("image_mean", [0.5, 0.5, 0.5]) if pp.get("do_normalize", True) else [0.0, 0.0, 0.0]
    std = pp.get("image_std", [0.5, 0.5, 0.5]) if pp.get("do_normalize", True) else [1.0, 1.0, 1.0]
    mean, std = ([float(x)] * 3 if isinstance(x, int | float) else [float(v) for v in x] for x in (mean, std))
    scale = float(pp.get("rescale_factor", 1 / 255)) if pp.get("do_rescale", True) else 1.0
    if abs(scale * 255.0 - 1.0) > 1e-6:
        raise ImportHFError(f"{path}: rescale_factor {scale} (do_rescale {pp.get('do_rescale')}) is not 1/255: "
                            "the model would not read pixels in [0, 1]")
    return {"image_size": h, "resample": PIL_RESAMPLE.get(int(pp.get("resample", 2)), str(pp.get("resample"))),
            "image_mean": mean, "image_std": std, "processor": pp.get("image_processor_type", "")}


def special_tokens(path: Path, cfg: dict[str, Any]) -> dict[str, int]:
    """decoder_start (BOS), eos and pad ids: generation_config.json, then config.json, then the
    decoder's config."""
    gen = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    dec = cfg.get("decoder", {})

    def pick(*keys: str) -> int | None:
        for src in (gen, cfg, dec):
            for k in keys:
                v = src.get(k)
                if isinstance(v, list):
                    v = v[0] if v else None
                if v is not None:
                    return int(v)
        return None

    ids = {"bos": pick("decoder_start_token_id", "bos_token_id"), "eos": pick("eos_token_id"),
           "pad": pick("pad_token_id")}
    if ids["bos"] is None or ids["eos"] is None:
        raise ImportHFError(f"{path}: the checkpoint does not say decoder_start_token_id and eos_token_id "
                            "(config.json or generation_config.json)")
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    return {k: int(v) for k, v in ids.items() if v is not None}


def readme_facts(path: Path) -> dict[str, Any]:
    """Licence (front matter ``license``/``license_name``/``license_link``), base model and
    whether the README mentions MIMIC-CXR / PhysioNet."""
    readme = path / "README.md"
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    front: dict[str, str] = {}
    m = re.match(r"\A---\s*\n(.*?)\n---\s*\n", text, re.S)
    if m:
        for line in m.group(1).splitlines():
            kv = re.match(r"^([A-Za-z_]+):\s*(.+?)\s*$", line)
            if kv:
                front[kv.group(1)] = kv.group(2).strip("'\"")
    return {"readme": readme.is_file(), "license": front.get("license", ""),
            "license_name": front.get("license_name", ""), "license_link": front.get("license_link", ""),
            "base_model": front.get("base_model", ""),
            "mimic": bool(re.search(r"mimic|physionet", text, re.I))}


# --- torch wrappers exported to ONNX -----------------------------------------------------------

class _Encoder(nn.Module):
    """Runtime pixels (MONOCHROME2, (x - NODE_MEAN) / NODE_STD) -> the HF encoder's tokens per view."""

    mean: Tensor
    std: Tensor

    def __init__(self, encoder: Any, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        b, v, s = images.shape[0], images.shape[1], images.shape[-1]
        x = images.reshape(b * v, 1, s, s) * NODE_STD + NODE_MEAN
        x = (x.expand(b * v, 3, s, s) - self.mean) / self.std
        h = self.encoder(pixel_values=x).last_hidden_state
        return h.reshape(b, v, h.shape[1], h.shape[2])


class _Bridge(nn.Module):
    """Image tokens of the views read -> every decoder layer's cross-attention K/V, once per study."""

    def __init__(self, lm: Any, proj: Any) -> None:
        super().__init__()
        self.proj = proj
        self.cross = nn.ModuleList(layer.crossattention.self for layer in lm.bert.encoder.layer)
        self.heads = int(lm.config.num_attention_heads)
        self.head_dim = int(lm.config.hidden_size) // self.heads

    def forward(self, image_tokens: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, v, t = image_tokens.shape[0], image_tokens.shape[1], image_tokens.shape[2]
        mem = image_tokens.reshape(b, v * t, image_tokens.shape[3])
        if self.proj is not None:
            mem = self.proj(mem)
        mask = view_mask[:, :, None].expand(b, v, t).reshape(b, v * t)
        ks, vs = [], []
        att: Any
        for att in self.cross:
            ks.append(att.key(mem).view(b, v * t, self.heads, self.head_dim).transpose(1, 2))
            vs.append(att.value(mem).view(b, v * t, self.heads, self.head_dim).transpose(1, 2))
        return torch.stack(ks), torch.stack(vs), mask


class _BertDecoder(nn.Module):
    """``BertLMHeadModel`` (``is_decoder``, ``add_cross_attention``) as one cached decoding step:
    the HF modules' own weights and sub-layers (output projections, layer norms, feed-forward,
    LM head); only the attention is written out so the caches are plain stacked tensors."""

    emb: Any
    layers: Any
    cls: Any

    def __init__(self, lm: Any) -> None:
        super().__init__()
        cfg = lm.config
        if getattr(cfg, "position_embedding_type", "absolute") not in ("absolute", None):
            raise ImportHFError(f"decoder position_embedding_type {cfg.position_embedding_type!r} is not supported")
        self.emb = lm.bert.embeddings
        self.layers = lm.bert.encoder.layer
        self.cls = lm.cls
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        att = torch.softmax(q @ k.transpose(2, 3) / (self.head_dim**0.5) + bias, dim=-1) @ v
        return att.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.head_dim)

    def forward(self, input_ids: Tensor, memory_mask: Tensor, cross_k: Tensor, cross_v: Tensor,
                past_k: Tensor, past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, p = input_ids.shape[1], past_k.shape[3]
        pos = torch.arange(s, device=input_ids.device) + p
        e = self.emb
        h = e.word_embeddings(input_ids) + e.token_type_embeddings(torch.zeros_like(input_ids)) \
            + e.position_embeddings(pos)[None]
        h = e.LayerNorm(h)
        k_pos = torch.arange(s + p, device=input_ids.device)
        zero = torch.zeros((), dtype=h.dtype)
        causal = torch.where(k_pos[None, :] > pos[:, None], zero + NEG, zero)[None, None]
        mem_bias = torch.where(memory_mask > 0.5, zero, zero + NEG)[:, None, None, :]
        pk, pv = [], []
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            k = torch.cat([past_k[i], self._split(sa.key(h))], dim=2)
            v = torch.cat([past_v[i], self._split(sa.value(h))], dim=2)
            pk.append(k)
            pv.append(v)
            a = layer.attention.output(self._attend(self._split(sa.query(h)), k, v, causal), h)
            ca = layer.crossattention
            c = ca.output(self._attend(self._split(ca.self.query(a)), cross_k[i], cross_v[i], mem_bias), a)
            h = layer.output(layer.intermediate(c), c)
        return self.cls(h), torch.stack(pk), torch.stack(pv)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]], external: bool | None = None) -> None:
    """Export ``module`` to ``path``. ``external``: its weights in ``<path name>.data`` (the
    bundle's external data); ``None``: only when they exceed ``EXTERNAL_DATA_MIN_BYTES`` (1 GiB).
    torch writes a graph over 2 GB as one file per tensor, so it exports into a scratch folder
    and the graph is written again in the bundle's layout."""
    from .import_hf_speed import resave

    scratch = path.with_name(path.name + ".export")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(scratch / path.name), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
        resave(scratch / path.name, path, external)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_model(path: Path) -> Any:
    """The checkpoint as a ``VisionEncoderDecoderModel`` (local files only, eager attention, fp32, eval)."""
    from transformers import VisionEncoderDecoderModel

    try:
        model = VisionEncoderDecoderModel.from_pretrained(str(path), local_files_only=True,
                                                          attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ImportHFError(f"{path}: transformers could not load the checkpoint: {exc}") from exc
    return model.eval()


def export_graphs(model: Any, out: Path, spec: dict[str, Any], external: bool | None = None) -> dict[str, Any]:
    """Write encoder.onnx, bridge.onnx, decoder.onnx (``external``: see :func:`_export`); return
    the manifest's ``graphs``."""
    dec_type = model.decoder.config.model_type
    if dec_type not in SUPPORTED_DECODERS:
        raise ImportHFError(f"decoder model_type {dec_type!r} is not supported (supported: {SUPPORTED_DECODERS}); "
                            "export it by hand into the encoder-decoder graph contract (onnx_models/README.md)")
    s = spec["image_size"]
    enc = _Encoder(model.encoder, spec["image_mean"], spec["image_std"]).eval()
    bridge = _Bridge(model.decoder, getattr(model, "enc_to_dec_proj", None)).eval()
    dec = _BertDecoder(model.decoder).eval()
    images = torch.randn(2, 1, 1, s, s)
    views = {0: "batch", 1: "views"}
    _export(enc, (images,), out / "encoder.onnx", ["images"], ["image_tokens"],
            {"images": views, "image_tokens": views}, external=external)
    with torch.no_grad():
        tokens = enc(images)
    tokens2 = torch.cat([tokens, tokens.flip(0)], dim=1)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _export(bridge, (tokens2, mask), out / "bridge.onnx", ["image_tokens", "view_mask"],
            ["cross_k", "cross_v", "memory_mask"],
            {"image_tokens": views, "view_mask": views, "cross_k": {1: "batch", 3: "memory"},
             "cross_v": {1: "batch", 3: "memory"}, "memory_mask": {0: "batch", 1: "memory"}}, external=external)
    with torch.no_grad():
        ck, cv, mm = bridge(tokens2, mask)
    L, H, dh = int(model.decoder.config.num_hidden_layers), dec.heads, dec.head_dim
    past = torch.randn(L, 2, H, 3, dh)
    kv = {1: "batch", 3: "past"}
    _export(dec, (torch.tensor([[1, 2], [3, 4]]), mm, ck, cv, past, torch.randn_like(past)), out / "decoder.onnx",
            ["input_ids", "memory_mask", "cross_k", "cross_v", "past_k", "past_v"],
            ["logits", "present_k", "present_v"],
            {"input_ids": {0: "batch", 1: "seq"}, "memory_mask": {0: "batch", 1: "memory"},
             "cross_k": {1: "batch", 3: "memory"}, "cross_v": {1: "batch", 3: "memory"}, "past_k": kv,
             "past_v": kv, "logits": {0: "batch", 1: "seq"}, "present_k": {1: "batch", 3: "total"},
             "present_v": {1: "batch", 3: "total"}}, external=external)
    d = int(model.encoder.config.hidden_size) if hasattr(model.encoder.config, "hidden_size") else tokens.shape[-1]
    kvs = f"float32 [{L}, batch, {H}, seq, {dh}]"
    vocab = int(model.decoder.config.vocab_size)
    return {
        "encoder": {"file": "encoder.onnx", "opset": OPSET,
                    "inputs": {"images": f"float32 [batch, views, 1, {s}, {s}] normalised (input.normalisation)"},
                    "outputs": {"image_tokens": f"float32 [batch, views, {tokens.shape[2]}, {d}]"}},
        "bridge": {"file": "bridge.onnx", "opset": OPSET,
                   "inputs": {"image_tokens": "encoder output", "view_mask": "float32 [batch, views] 1 = real view"},
                   "outputs": {"cross_k": f"{kvs} (seq = memory = views x tokens)", "cross_v": "as cross_k",
                               "memory_mask": "float32 [batch, memory]"}},
        "decoder": {"file": "decoder.onnx", "opset": OPSET,
                    "inputs": {"input_ids": "int64 [batch, seq]", "memory_mask": "bridge output",
                               "cross_k": "bridge output", "cross_v": "bridge output",
                               "past_k": f"{kvs} (seq = past, may be 0)", "past_v": "as past_k"},
                    "outputs": {"logits": f"float32 [batch, seq, {vocab}]",
                                "present_k": f"{kvs} (seq = past + seq)", "present_v": "as present_k"}},
    }


# --- checks --------------------------------------------------------------------------------------

def probe_images(n: int = 3, size: int = 256) -> list[np.ndarray]:
    """Deterministic grey test images in [0, 1] (smooth shapes + noise), for the parity checks."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        img = 0.3 + 0.3 * np.sin((i + 1) * 3.0 * xx) * np.cos((i + 2) * 2.0 * yy)
        img += 0.4 * (((xx - 0.3 - 0.1 * i) ** 2 + (yy - 0.5) ** 2) < 0.05)
        img += rng.normal(0.0, 0.03, img.shape)
        out.append(np.clip(img, 0.0, 1.0).astype(np.float32))
    return out


def hf_pixels(images: np.ndarray, spec: dict[str, Any]) -> Tensor:
    """The HF model's ``pixel_values`` for runtime-prepared images [n, 1, S, S] (the
    processor's per-channel normalisation of the grey image copied to RGB)."""
    x = torch.from_numpy(images).float() * NODE_STD + NODE_MEAN
    mean = torch.tensor(spec["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["image_std"]).view(1, 3, 1, 1)
    return (x.expand(x.shape[0], 3, x.shape[2], x.shape[3]) - mean) / std


def check_bundle(model: Any, bundle: Path, spec: dict[str, Any], max_tokens: int = 24) -> dict[str, Any]:
    """Compare the bundle (ONNX Runtime) with the torch model on probe images, one view each:
    teacher-forced logits (max absolute difference) and greedy token ids (the runtime's greedy
    with its banned tokens vs ``model.generate`` with the same ``bad_words_ids``)."""
    from .runtime import ReportGenerator, StudyInput, _CrossState

    gen = ReportGenerator(bundle, threads=1, beam_size=1)
    gen.consistency = True
    studies = [StudyInput(views=[(im, "PA")]) for im in probe_images()]
    images, _, view_mask = gen._pixels(studies)
    _, state = gen._encode(studies)
    assert isinstance(state, _CrossState)
    pv = hf_pixels(images[:, 0], spec)
    seqs = [ids for ids, _ in gen._greedy(state, max_tokens, 0)]
    ref_ids = model.generate(pixel_values=pv, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                             bad_words_ids=[[i] for i in gen._banned], eos_token_id=gen._eos,
                             pad_token_id=gen._pad, decoder_start_token_id=gen._bos,
                             no_repeat_ngram_size=0, min_length=0, repetition_penalty=1.0)
    ref = []
    for row in ref_ids.tolist():
        row = row[1:]
        ref.append(row[: row.index(gen._eos)] if gen._eos in row else row)
    # teacher forcing on the longest reference sequence (plus BOS), for every probe
    length = max(2, max(len(r) for r in ref) + 1)
    forced = np.full((len(studies), length), gen._pad, dtype=np.int64)
    for i, r in enumerate(ref):
        row = [gen._bos] + r
        forced[i, : len(row)] = row
    pk, pv0 = gen._empty_past(state)
    logits_o = gen._sessions["decoder"].run(["logits"], {
        "input_ids": forced, "memory_mask": state.memory_mask, "cross_k": state.cross_k,
        "cross_v": state.cross_v, "past_k": pk, "past_v": pv0})[0]
    with torch.no_grad():
        logits_t = model(pixel_values=pv, decoder_input_ids=torch.from_numpy(forced)).logits.numpy()
    diff = float(np.abs(logits_o - logits_t).max())
    same = sum(a == b for a, b in zip(seqs, ref, strict=True))
    return {"probe_images": len(studies), "max_abs_logit_diff": diff, "greedy_identical": same,
            "greedy_compared": len(studies), "max_tokens": max_tokens}


# --- the bundle ------------------------------------------------------------------------------------

def _tokenizer(path: Path, out: Path) -> Any:
    """tokenizer.json from the checkpoint (converted from vocab.txt by transformers when absent)."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        shutil.copy(path / "tokenizer.json", out / "tokenizer.json")
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not getattr(tok, "is_fast", False):
            raise ImportHFError(f"{path}: no tokenizer.json and transformers cannot build a fast tokenizer")
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def generation_defaults(gc: dict[str, Any], max_pos: int, section: str) -> dict[str, Any]:
    """The manifest's decoding defaults from the checkpoint's ``generation_config.json``
    (``num_beams``, ``max_new_tokens``/``max_length``, ``no_repeat_ngram_size``,
    ``length_penalty``); greedy and 128 tokens when it says nothing. The runtime's beam search
    is its own (README.md), so beam outputs may differ from ``model.generate``'s."""
    max_tokens = gc.get("max_new_tokens") or gc.get("max_length") or 128
    return {"beam_size": int(gc.get("num_beams") or 1),
            "max_tokens": max(1, min(int(max_tokens), max_pos - 1)),
            "no_repeat_ngram_size": int(gc.get("no_repeat_ngram_size") or 0),
            "length_penalty": float(gc.get("length_penalty") or 1.0), "eos_penalty": 0.0, "section": section}


def build_manifest(model: Any, graphs: dict[str, Any], spec: dict[str, Any], tok: Any, ids: dict[str, int],
                   name: str, version: str, views: str, section: str, source: dict[str, Any]) -> dict[str, Any]:
    dcfg = model.decoder.config
    unk = "[UNK]" if tok.token_to_id("[UNK]") is not None else None
    max_pos = int(getattr(dcfg, "max_position_embeddings", 512))
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "task": "chest-xray-report-generation",
        "architecture": "encoder-decoder",
        "description": f"Imported Hugging Face VisionEncoderDecoderModel ({model.encoder.config.model_type} + "
                       f"{dcfg.model_type}); research use only, not a medical device",
        "graphs": graphs,
        "tokenizer": {"file": "tokenizer.json", "type": "huggingface-tokenizers", "level": "subword",
                      "bos": tok.id_to_token(ids["bos"]), "eos": tok.id_to_token(ids["eos"]),
                      "pad": tok.id_to_token(ids["pad"]), "unk": unk,
                      "section_separator": None, "empty_indication": None},
        "input": {
            "image_size": spec["image_size"], "channels": 1, "photometric": "MONOCHROME2",
            "value_range": [0.0, 1.0],
            "resize": "antialiased bilinear to image_size x image_size (onnx_models.imaging.resize); the "
                      f"checkpoint's processor resamples with {spec['resample']}",
            "normalisation": {"mean": NODE_MEAN, "std": NODE_STD},
            "image_processor": {"type": spec["processor"], "size": spec["image_size"], "resample": spec["resample"],
                                "image_mean": spec["image_mean"], "image_std": spec["image_std"],
                                "applied": "in the encoder graph (grey copied to 3 channels, the runtime "
                                           "normalisation undone first)"},
            "views": list(VIEWS), "max_views": VIEW_MODES[views], "view_policy": views,
            "max_indication_tokens": 0, "max_report_tokens": min(128, max_pos - 1),
        },
        "observations": {"names": [], "thresholds": [], "labeller": "none (the model has no observation head)"},
        "view_classifier": {"graph": "view_classifier", "image_size": 64, "labels": ["FRONTAL", "LATERAL"],
                            "source": "the node's default bundle (frontal/lateral only, not from the checkpoint)"},
        "decoder": {"layers": int(dcfg.num_hidden_layers), "heads": int(dcfg.num_attention_heads),
                    "head_dim": int(dcfg.hidden_size) // int(dcfg.num_attention_heads),
                    "kv_layout": "stacked [layers, batch, heads, seq, head_dim]", "max_positions": max_pos},
        "generation": generation_defaults(source.get("generation_config", {}), max_pos, section),
        "import": source,
        "files": {},
    }


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def calibrate_from_images(bundle: Path, folder: Path, quantile: float = 0.99,
                          hold_out_share: float = 0.2) -> dict[str, Any]:
    """The input gate (:func:`onnx_models.input_gate.calibrate`) from a folder of 8-bit grey
    images like the ones the model was trained on (PNG/JPEG, MONOCHROME2, searched
    recursively): views from the bundle's frontal/lateral classifier (FRONTAL -> PA), a stable
    hash of each file name puts ``hold_out_share`` of them in the hold-out that sets the limit.
    Writes ``input_check.npz``, the manifest's ``input_check`` and the model card's section."""
    import hashlib

    from .data import read_image
    from .gate_calibration import _update_card
    from .input_gate import calibrate, write_input_check
    from .runtime import ReportGenerator

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise ImportHFError(f"--calibration-images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    gen = ReportGenerator(bundle, threads=2)
    fit: list[tuple[np.ndarray, str]] = []
    hold_out: list[tuple[np.ndarray, str]] = []
    for i in range(0, len(files), 32):
        chunk = files[i : i + 32]
        pixels = [read_image(f) for f in chunk]
        for f, px, (label, _) in zip(chunk, pixels, gen.classify_views(pixels), strict=True):
            view = "PA" if label == "FRONTAL" else "LATERAL"
            h = int(hashlib.sha256(f.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (hold_out if h < hold_out_share else fit).append((px, view))
    try:
        stats, section = calibrate(gen.view_embeddings, fit, hold_out, quantile=quantile)
    except ValueError as exc:
        raise ImportHFError(f"--calibration-images {folder}: {exc} ({len(files)} images found)") from exc
    section["data"] = {"fit": f"{folder.name}: {len(fit)} images", "limits": f"{folder.name}: {len(hold_out)} images "
                       f"(stable hash of the file name, {hold_out_share:.0%})", "measured": "not measured"}
    _update_card(bundle, section)
    write_input_check(bundle, stats, section)
    return section


def model_card(m: dict[str, Any]) -> str:
    src = m["import"]
    facts = src["readme"]
    lic = facts["license"] or "not stated in the checkpoint's README.md front matter"
    if facts.get("license_name"):
        lic += f" ({facts['license_name']}" + (f", {facts['license_link']}" if facts.get("license_link") else "") + ")"
    checks = src.get("checks", {})
    lines = [
        f"# Model card: {m['name']} {m['version']}", "",
        "Research use only. Not a medical device. Drafts must be reviewed and signed by a radiologist.", "",
        "## Where the weights came from", "",
        f"Imported with `cxrnode import-hf` from the local checkpoint folder `{src['checkpoint']}` "
        f"(`{src['family']}`: {src['encoder']} encoder + {src['decoder']} decoder, {src['parameters']:,} parameters"
        f"{', base model ' + facts['base_model'] if facts.get('base_model') else ''}). Weight files and their sha256:", "",
    ]
    lines += [f"- `{f}`: `{h}`" for f, h in src["weights"].items()]
    lines += ["", f"Licence (as stated in the checkpoint's README.md): **{lic}**. This bundle carries the "
              "checkpoint's licence; cxrnode's own licence does not apply to the weights.", ""]
    if facts.get("mimic"):
        lines += ["**Data-use terms:** the checkpoint's README mentions MIMIC-CXR / PhysioNet. Weights trained on "
                  "MIMIC-CXR may be bound by the PhysioNet Credentialed Health Data Use Agreement; check the terms "
                  "before deploying or sharing this bundle.", ""]
    lines += [
        "## What the node runs", "",
        f"- Input: one grey image per view at {m['input']['image_size']} px (runtime resize: antialiased bilinear; "
        f"the checkpoint's processor uses {m['input']['image_processor']['resample']}), copied to 3 channels and "
        f"normalised with mean {m['input']['image_processor']['image_mean']} / std "
        f"{m['input']['image_processor']['image_std']} inside the encoder graph.",
        f"- Views: `{m['input']['view_policy']}` (at most {m['input']['max_views']} view(s) read; the node orders "
        "views PA, AP, LATERAL, LL, so one view = the first frontal view).",
        ("- The indication is not read (the model takes no prompt)." if m["architecture"] == "encoder-decoder" else
         f"- Prompt: `{m.get('prompt', {}).get('template', '')!r}` with the indication and the view names filled in; "
         "each view is one block of image tokens."),
        f"- Text: one section ({m['generation']['section']}), word pieces joined by the tokenizer's decoder; greedy "
        "decoding by default; " + ("start token = the checkpoint's decoder_start_token_id." if m["tokenizer"]["bos"]
                                   else "the answer starts right after the prompt (no start token)."),
        "- No observation head: no observation probabilities, no observation prompts, no grounding step.",
        "- View classifier: the node's own frontal/lateral classifier (from the default bundle).",
        f"- Precision: {src['precision']}.", "",
        "## What was checked", "",
        f"- ONNX Runtime vs transformers on {checks.get('probe_images', 0)} probe images: max |logit difference| "
        f"{checks.get('max_abs_logit_diff', float('nan')):.2e} (teacher-forced), greedy token ids identical on "
        f"{checks.get('greedy_identical', 0)} of {checks.get('greedy_compared', 0)} "
        f"({checks.get('max_tokens', 0)} tokens at most).",
        *([f"- int8 graphs vs transformers: max |logit difference| {src['checks_int8']['max_abs_logit_diff']:.2e}, "
           f"greedy token ids identical on {src['checks_int8']['greedy_identical']} of "
           f"{src['checks_int8']['greedy_compared']}."] if src.get("checks_int8") else []),
        *(["- fp16 graphs: not run here (meant for CUDA); the fp32 figures above are of the graphs before "
           "conversion."] if src["precision"].startswith("fp16") else []),
        "- `load_bundle` checksums and graph contract.",
        "- Not checked: the quality of the drafts on real films (run `cxrnode eval` on data you hold).", "",
        "## Input gate", "",
        "The input gate is **off** (no `--calibration-images`): drafts are written for any image; the node logs "
        "this once at start." if not m.get("input_check") else "The input gate is **on** (see below).", "",
    ]
    return "\n".join(lines)


def import_hf(checkpoint: str | Path, out: str | Path, name: str = "", version: str = "", views: str = "first-frontal",
              section: str = "findings", int8: bool = False, fp16: bool = False, prompt_template: str = "",
              calibration_images: str | Path | None = None, check: bool = True,
              int8_keep_lm_head: bool = False, external_data: bool | None = None) -> Path:
    """Import a local checkpoint folder into a bundle folder ``out`` (replaced). See the module
    docstring. ``external_data``: the graphs' weights in ``<graph>.data`` side files (ONNX
    external data); ``None`` (default) = always for the decoder-only families (LLaVA, Gemma 3:
    the models that reach the 2 GB protobuf limit, one layout whatever their size), for a
    ``VisionEncoderDecoderModel`` only for a graph whose weights exceed 1 GiB."""
    src = Path(checkpoint).resolve()
    cfg = read_checkpoint(src)
    fam = family(cfg)
    if views not in VIEW_MODES:
        raise ImportHFError(f"views must be one of {sorted(VIEW_MODES)}, not {views!r}")
    if section not in ("findings", "impression"):
        raise ImportHFError(f"section must be findings or impression, not {section!r}")
    if fam in ("llava", "gemma3"):
        return _import_llava(src, Path(out), name, version, section, int8, fp16, prompt_template, calibration_images,
                             check, fam, external=True if external_data is None else external_data)
    if prompt_template:
        raise ImportHFError("--prompt-template applies to image-text-to-text models; a VisionEncoderDecoderModel "
                            "takes no prompt")
    if int8 and fp16:
        raise ImportHFError("--int8 and --fp16 exclude each other (int8 is for CPU, fp16 for CUDA)")
    spec = image_spec(src)
    ids = special_tokens(src, cfg)
    model = load_model(src)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        graphs = export_graphs(model, tmp, spec, external=external_data)
        tok = _tokenizer(src, tmp)
        for k, i in ids.items():
            if tok.id_to_token(i) is None:
                raise ImportHFError(f"{src}: {k} token id {i} is not in the tokenizer")
        shutil.copy(BUNDLES_DIR / "default" / "view_classifier.onnx", tmp / "view_classifier.onnx")
        graphs["view_classifier"] = {"file": "view_classifier.onnx", "opset": OPSET,
                                     "inputs": {"images": "float32 [batch, 1, 64, 64] normalised"},
                                     "outputs": {"probs": "float32 [batch, 2] (FRONTAL, LATERAL)"}}
        weights = {w.name: sha256_file(w) for w in sorted(src.iterdir())
                   if w.name in WEIGHT_FILES or re.match(r"(model|pytorch_model)-\d+-of-\d+\.", w.name)}
        source = {"tool": "cxrnode import-hf", "family": fam, "checkpoint": str(src),
                  "encoder": model.encoder.config.model_type, "decoder": model.decoder.config.model_type,
                  "parameters": int(sum(p.numel() for p in model.parameters())), "weights": weights,
                  "readme": readme_facts(src), "transformers": _version("transformers"),
                  "torch": torch.__version__, "precision": "fp32",
                  "generation_config": _json(src / "generation_config.json")}
        manifest = build_manifest(model, graphs, spec, tok, ids, name or src.name, version or "0.0.0", views,
                                  section, source)
        write_manifest(tmp, manifest)
        if check:
            source["checks"] = check_bundle(model, tmp, spec)
            diff = source["checks"]["max_abs_logit_diff"]
            if diff > FP32_TOLERANCE:
                raise ImportHFError(f"{src}: the exported graphs differ from transformers by {diff:.2e} in the logits "
                                    f"(tolerance {FP32_TOLERANCE}); not written")
        if int8 or fp16:
            from .import_hf_speed import to_fp16, to_int8

            if int8:
                to_int8(tmp, manifest, keep_lm_head=int8_keep_lm_head)
            else:
                to_fp16(tmp, manifest)
            if check and int8:  # fp16 graphs are for CUDA: not run here
                write_manifest(tmp, manifest)
                source["checks_int8"] = check_bundle(model, tmp, spec)
        _finish(tmp, manifest, calibration_images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("bundle written to %s", out)
    return out


def _finish(tmp: Path, manifest: dict[str, Any], calibration_images: str | Path | None) -> None:
    """The common end of an import: the gate's state in the manifest, the model card, the
    checksummed manifest, the input gate fitted when calibration images are given, a final
    ``load_bundle`` check."""
    manifest["import"]["input_gate"] = (f"on: fitted on {Path(calibration_images).name}" if calibration_images
                                        else "off: no --calibration-images (the node logs it once at start)")
    (tmp / "MODEL_CARD.md").write_text(model_card(manifest), encoding="utf-8")
    write_manifest(tmp, manifest)
    if calibration_images:
        calibrate_from_images(tmp, Path(calibration_images))
    load_bundle(tmp)


def _import_llava(src: Path, out: Path, name: str, version: str, section: str, int8: bool, fp16: bool,
                  prompt_template: str, calibration_images: str | Path | None, check: bool,
                  fam: str = "llava", external: bool = True) -> Path:
    """The image-text-to-text families (``llava``, ``gemma3``) onto the decoder-only contract."""
    if fam == "gemma3":
        from .import_hf_gemma3 import DEFAULT_TEMPLATE, recheck_int8
        from .import_hf_gemma3 import import_gemma3 as import_llava
    else:
        from .import_hf_llava import DEFAULT_TEMPLATE, import_llava, recheck_int8

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = {w.name: sha256_file(w) for w in sorted(src.iterdir())
                   if w.name in WEIGHT_FILES or re.match(r"(model|pytorch_model)-\d+-of-\d+\.", w.name)}
        source: dict[str, Any] = {"tool": "cxrnode import-hf", "family": fam, "checkpoint": str(src),
                                  "weights": weights, "readme": readme_facts(src),
                                  "transformers": _version("transformers"), "torch": torch.__version__,
                                  "precision": "fp32", "generation_config": _json(src / "generation_config.json")}
        manifest = import_llava(src, tmp, src, name or src.name, version or "0.0.0",
                                prompt_template or DEFAULT_TEMPLATE, section, source, check, external=external)
        if int8 or fp16:
            from .import_hf_speed import DECODER_ONLY_ROLES, to_fp16, to_int8

            if int8:
                to_int8(tmp, manifest, roles=DECODER_ONLY_ROLES)
            else:
                to_fp16(tmp, manifest, roles=DECODER_ONLY_ROLES)
            write_manifest(tmp, manifest)
            if check and int8:
                source["checks_int8"] = recheck_int8(src, tmp)
        _finish(tmp, manifest, calibration_images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""
