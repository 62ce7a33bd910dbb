"""``cxrnode import-hf`` for ``LlavaForConditionalGeneration`` (Llama-family language model):
the ``decoder-only`` graph contract (README.md).

- ``encoder``: ``images`` [batch, views, 1, S, S], ``view_mask`` -> ``image_embeds``
  [batch, views x N, D] (vision tower at ``vision_feature_layer``, ``vision_feature_select_strategy``,
  multi-modal projector: ``get_image_features``), ``image_mask`` [batch, views x N]: several views
  are several image-token blocks side by side, as ``transformers`` places several ``<image>``
  blocks written together.
- ``embed``: the language model's token embedding.
- ``decoder``: the Llama layers with a stacked cache [layers, batch, kv_heads, seq, head_dim]
  (grouped-query attention kept: the cache holds the key/value heads), RoPE positions from
  ``cumsum(attention_mask) - 1`` so left padding does not shift them.

The prompt (manifest ``prompt``): ``prefix_tokens`` (the tokenizer's BOS), then the
``--prompt-template`` text with ``<image>`` where the image blocks go, ``{indication}`` and
``{views}``; there is no start token: the answer begins after the prompt (``tokenizer.bos`` null).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .bundle import FORMAT_NAME, FORMAT_VERSION, write_manifest
from .import_hf import NEG, NODE_MEAN, NODE_STD, OPSET, ImportHFError, _export, image_spec
from .views import VIEWS

DEFAULT_TEMPLATE = "USER: <image>\nViews: {views}. Indication: {indication}\nWrite the findings. ASSISTANT:"
SUPPORTED_TEXT = ("llama",)
MAX_VIEWS = 2


class _Encoder(nn.Module):
    mean: Tensor
    std: Tensor

    def __init__(self, model: Any, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, v, s = images.shape[0], images.shape[1], images.shape[-1]
        x = images.reshape(b * v, 1, s, s) * NODE_STD + NODE_MEAN
        x = (x.expand(b * v, 3, s, s) - self.mean) / self.std
        cfg, inner = self.model.config, self.model.model
        hidden = inner.vision_tower(x, output_hidden_states=True, return_dict=True).hidden_states
        layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
        pool = [hidden[i][:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden[i] for i in layers]
        f = inner.multi_modal_projector(torch.cat(pool, dim=-1))  # as LlavaModel.get_image_features
        n, d = f.shape[-2], f.shape[-1]
        embeds = f.reshape(b, v * n, d)
        mask = view_mask[:, :, None].expand(b, v, n).reshape(b, v * n)
        return embeds, mask


class _Embed(nn.Module):
    def __init__(self, emb: Any) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.emb(input_ids)


class _LlamaDecoder(nn.Module):
    """Llama layers over stacked caches; the HF modules' own projections, norms, MLP, rotary
    embedding and LM head, the attention written out."""

    lm: Any
    head: Any

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        cfg = self.lm.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        p = past_k.shape[3]
        pos = (attention_mask.cumsum(1) - 1.0).clamp(min=0.0).long()[:, p:]
        cos, sin = self.lm.rotary_emb(inputs_embeds, pos)
        k_pos = torch.arange(p + s, device=inputs_embeds.device)
        q_pos = torch.arange(s, device=inputs_embeds.device) + p
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & (attention_mask[:, None, :] > 0.5)
        zero = torch.zeros((), dtype=inputs_embeds.dtype)
        bias = torch.where(allowed, zero, zero + NEG)[:, None]
        h = inputs_embeds
        rep = self.heads // self.kv_heads
        pk, pv = [], []
        layer: Any
        for i, layer in enumerate(self.lm.layers):
            at = layer.self_attn
            r = layer.input_layernorm(h)
            q = at.q_proj(r).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = at.k_proj(r).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = at.v_proj(r).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past_k[i], k], dim=2)
            v = torch.cat([past_v[i], v], dim=2)
            pk.append(k)
            pv.append(v)
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            att = torch.softmax(q @ kk.transpose(2, 3) / (self.head_dim**0.5) + bias, dim=-1) @ vv
            h = h + at.o_proj(att.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.head(self.lm.norm(h)), torch.stack(pk), torch.stack(pv)


def load_llava(path: Path) -> Any:
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True,
                                                              attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ImportHFError(f"{path}: transformers could not load the checkpoint: {exc}") from exc
    return model.eval()


def export_encoder_and_embed(enc: nn.Module, model: Any, out: Path, s: int, external: bool) -> tuple[Tensor, Tensor]:
    """Export the image encoder (``images``, ``view_mask`` -> ``image_embeds``, ``image_mask``) and
    the token embedding (``input_ids`` -> ``inputs_embeds``) of an image-text-to-text model into
    ``out``; returns the encoder's outputs on the tracing input (they size the decoder's)."""
    views = {0: "batch", 1: "views"}
    images, vm = torch.randn(2, 2, 1, s, s), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _export(enc, (images, vm), out / "encoder.onnx", ["images", "view_mask"], ["image_embeds", "image_mask"],
            {"images": views, "view_mask": views, "image_embeds": {0: "batch", 1: "n"}, "image_mask": {0: "batch", 1: "n"}}, external=external)
    with torch.no_grad():
        e, m = enc(images, vm)
    _export(_Embed(model.model.language_model.embed_tokens).eval(), (torch.tensor([[1, 2, 3]]),), out / "embed.onnx",
            ["input_ids"], ["inputs_embeds"], {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}, external=external)
    return e, m


def export_llava(model: Any, out: Path, spec: dict[str, Any], external: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    text_type = model.config.text_config.model_type
    if text_type not in SUPPORTED_TEXT:
        raise ImportHFError(f"LLaVA language model {text_type!r} is not supported (supported: {SUPPORTED_TEXT})")
    s = spec["image_size"]
    enc = _Encoder(model, spec["image_mean"], spec["image_std"]).eval()
    dec = _LlamaDecoder(model).eval()
    e, _ = export_encoder_and_embed(enc, model, out, s, external)
    L, H, dh = len(dec.lm.layers), dec.kv_heads, dec.head_dim
    past = torch.randn(L, 2, H, 3, dh)
    kv = {1: "batch", 3: "past"}
    _export(dec, (torch.randn(2, 2, e.shape[-1]), torch.ones(2, 5), past, torch.randn_like(past)), out / "decoder.onnx",
            ["inputs_embeds", "attention_mask", "past_k", "past_v"], ["logits", "present_k", "present_v"],
            {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "past_k": kv,
             "past_v": kv, "logits": {0: "batch", 1: "seq"}, "present_k": {1: "batch", 3: "total"},
             "present_v": {1: "batch", 3: "total"}}, external=external)
    d = int(e.shape[-1])
    graphs = {
        "encoder": {"file": "encoder.onnx", "opset": OPSET,
                    "inputs": {"images": f"float32 [batch, views, 1, {s}, {s}] normalised",
                               "view_mask": "float32 [batch, views]"},
                    "outputs": {"image_embeds": f"float32 [batch, views x {e.shape[1] // 2}, {d}]",
                                "image_mask": "float32 [batch, N]"}},
        "embed": {"file": "embed.onnx", "opset": OPSET, "inputs": {"input_ids": "int64 [batch, seq]"},
                  "outputs": {"inputs_embeds": f"float32 [batch, seq, {d}]"}},
        "decoder": {"file": "decoder.onnx", "opset": OPSET,
                    "inputs": {"inputs_embeds": f"float32 [batch, seq, {d}]",
                               "attention_mask": "float32 [batch, past + seq]",
                               "past_k": f"float32 [{L}, batch, {H}, past, {dh}]", "past_v": "as past_k"},
                    "outputs": {"logits": "float32 [batch, seq, vocab]", "present_k": "past + seq",
                                "present_v": "as present_k"}},
    }
    return graphs, {"layers": L, "heads": H, "head_dim": dh}


def build_llava_manifest(model: Any, graphs: dict[str, Any], dims: dict[str, int], spec: dict[str, Any], tok: Any,
                         name: str, version: str, template: str, section: str, source: dict[str, Any]) -> dict[str, Any]:
    tc = model.config.text_config
    eos = tc.eos_token_id[0] if isinstance(tc.eos_token_id, list) else tc.eos_token_id
    pad = tc.pad_token_id if tc.pad_token_id is not None else getattr(model.config, "pad_token_id", None)
    pad = eos if pad is None else pad
    prefix = [tok.id_to_token(tc.bos_token_id)] if tc.bos_token_id is not None else []
    max_pos = int(getattr(tc, "max_position_embeddings", 2048))
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": name, "version": version,
        "task": "chest-xray-report-generation", "architecture": "decoder-only",
        "description": f"Imported Hugging Face LlavaForConditionalGeneration ({model.config.vision_config.model_type} + "
                       f"{tc.model_type}); research use only, not a medical device",
        "graphs": graphs,
        "tokenizer": {"file": "tokenizer.json", "type": "huggingface-tokenizers", "level": "subword", "bos": None,
                      "eos": tok.id_to_token(eos), "pad": tok.id_to_token(pad), "unk": None,
                      "section_separator": None, "empty_indication": None},
        "prompt": {"template": template, "prefix_tokens": prefix, "empty_indication": "none"},
        "input": {"image_size": spec["image_size"], "channels": 1, "photometric": "MONOCHROME2",
                  "value_range": [0.0, 1.0], "resize": "antialiased bilinear (onnx_models.imaging.resize)",
                  "normalisation": {"mean": NODE_MEAN, "std": NODE_STD},
                  "image_processor": {"type": spec["processor"], "size": spec["image_size"],
                                      "resample": spec["resample"], "image_mean": spec["image_mean"],
                                      "image_std": spec["image_std"]},
                  "views": list(VIEWS), "max_views": MAX_VIEWS, "view_policy": "all (one image block per view)",
                  "max_indication_tokens": 64, "max_report_tokens": 128},
        "observations": {"names": [], "thresholds": [], "labeller": "none"},
        "view_classifier": {"graph": "view_classifier", "image_size": 64, "labels": ["FRONTAL", "LATERAL"]},
        "decoder": {**dims, "kv_layout": "stacked [layers, batch, kv_heads, seq, head_dim]", "max_positions": max_pos},
        "generation": {"beam_size": 1, "max_tokens": 128, "no_repeat_ngram_size": 0, "length_penalty": 1.0,
                       "eos_penalty": 0.0, "section": section},
        "import": source, "files": {},
    }


def check_llava(model: Any, bundle: Path, spec: dict[str, Any], studies: list[Any], max_tokens: int = 16) -> dict[str, Any]:
    """ORT vs transformers: logits over the whole prompt and greedy ids (``model.generate`` on
    the same prompt: BOS, text, ``image_token_id`` x N per view, text)."""
    from .import_hf import hf_pixels
    from .runtime import ReportGenerator, _PrefixState

    gen = ReportGenerator(bundle, threads=1, beam_size=1)
    diffs, same = [], 0
    image_token = int(model.config.image_token_id)
    for st in studies:
        images, _, view_mask = gen._pixels([st])
        _, state = gen._encode([st])
        assert isinstance(state, _PrefixState) and state.prefix is not None
        out = gen._run_encoder(*gen._pixels([st]))
        n = out["image_embeds"].shape[1]
        ids = hf_prompt_ids(gen, st, n, image_token)
        pv = hf_pixels(images[0], spec)
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits.numpy()
        pk, pvv = gen._empty_past(state)
        got = gen._sessions["decoder"].run(["logits"], {"inputs_embeds": state.prefix, "attention_mask": state.mask,
                                                        "past_k": pk, "past_v": pvv})[0]
        diffs.append(float(np.abs(got - ref).max()))
        [(seq, _)] = gen._greedy(state, max_tokens, 0)
        g = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=max_tokens, do_sample=False,
                           num_beams=1, bad_words_ids=[[i] for i in gen._banned] or None,
                           eos_token_id=gen._eos, pad_token_id=gen._pad)[0, len(ids):].tolist()
        g = g[: g.index(gen._eos)] if gen._eos in g else g
        same += int(g == seq)
    return {"probe_studies": len(studies), "max_abs_logit_diff": max(diffs), "greedy_identical": same,
            "greedy_compared": len(studies), "max_tokens": max_tokens}


def hf_prompt_ids(gen: Any, st: Any, n_image: int, image_token: int) -> list[int]:
    """The prompt as transformers takes it: the runtime's text around ``n_image`` image tokens."""
    p = gen._prompt
    before, _, after = p["template"].partition("<image>")
    ids = gen.tokenizer.encode(" ".join((st.indication or "").split()), add_special_tokens=False).ids
    ind = gen.tokenizer.decode(ids[: gen._max_ind]) if ids else p["empty_indication"]
    views = ", ".join(v for _, v in st.views[: gen._max_views])
    text = [part.replace("{indication}", ind).replace("{views}", views) for part in (before, after)]
    return ([gen._tok_id(t) for t in p["prefix_tokens"]] + gen.tokenizer.encode(text[0], add_special_tokens=False).ids
            + [image_token] * n_image + gen.tokenizer.encode(text[1], add_special_tokens=False).ids)


def probe_studies() -> list[Any]:
    from .import_hf import probe_images
    from .runtime import StudyInput

    ims = probe_images(3)
    return [StudyInput(views=[(ims[0], "PA"), (ims[1], "LATERAL")], indication="Cough and fever."),
            StudyInput(views=[(ims[2], "AP")])]


def recheck_int8(src: Path, bundle: Path) -> dict[str, Any]:
    """The int8 bundle against transformers (reported, not enforced)."""
    return check_llava(load_llava(src), bundle, image_spec(src), probe_studies())


def read_prompt_tokenizer(src: Path, tmp: Path, template: str, family: str) -> Any:
    """Check the prompt template, copy the checkpoint's ``tokenizer.json`` into the bundle folder
    ``tmp`` and load it (the image-text-to-text families: LLaVA, Gemma 3).

    Raises
    ------
    ImportHFError
        The template has no ``<image>``, or the checkpoint has no ``tokenizer.json``.
    """
    from tokenizers import Tokenizer

    if "<image>" not in template:
        raise ImportHFError("--prompt-template must contain <image> (where the image blocks go)")
    if not (src / "tokenizer.json").is_file():
        raise ImportHFError(f"{src}: {family} import needs tokenizer.json")
    shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
    return Tokenizer.from_file(str(tmp / "tokenizer.json"))


def finish_decoder_only_bundle(src: Path, tmp: Path, model: Any, graphs: dict[str, Any], dims: dict[str, Any],
                               spec: dict[str, Any], tok: Any, name: str, version: str, template: str, section: str,
                               source: dict[str, Any], checker: Any = None,
                               extra: Any = None) -> dict[str, Any]:
    """The rest of a decoder-only bundle once its graphs are exported: the shipped view
    classifier, the manifest (``extra(manifest)`` adds a family's own entries) written into
    ``tmp``, and, with ``checker(model, tmp, spec, studies)``, the parity check against
    transformers (refused over 1e-4 in the logits).

    Raises
    ------
    ImportHFError
        The exported graphs differ from transformers by more than 1e-4.
    """
    from .bundle import BUNDLES_DIR

    shutil.copy(BUNDLES_DIR / "default" / "view_classifier.onnx", tmp / "view_classifier.onnx")
    graphs["view_classifier"] = {"file": "view_classifier.onnx", "opset": OPSET,
                                 "inputs": {"images": "float32 [batch, 1, 64, 64] normalised"},
                                 "outputs": {"probs": "float32 [batch, 2] (FRONTAL, LATERAL)"}}
    source.update(encoder=model.config.vision_config.model_type, decoder=model.config.text_config.model_type,
                  parameters=int(sum(p.numel() for p in model.parameters())))
    manifest = build_llava_manifest(model, graphs, dims, spec, tok, name, version, template, section, source)
    if extra is not None:
        extra(manifest)
    write_manifest(tmp, manifest)
    if checker is not None:
        source["checks"] = checker(model, tmp, spec, probe_studies())
        if source["checks"]["max_abs_logit_diff"] > 1e-4:
            raise ImportHFError(f"{src}: the exported graphs differ from transformers by "
                                f"{source['checks']['max_abs_logit_diff']:.2e} in the logits; not written")
    return manifest


def import_llava(src: Path, tmp: Path, spec_src: Path, name: str, version: str, template: str, section: str,
                 source: dict[str, Any], check: bool, external: bool = True) -> dict[str, Any]:
    """Write the decoder-only bundle for ``src`` into ``tmp`` and return its manifest
    (``external``: the graphs' weights in ``<graph>.data`` side files, the bundle's external data)."""
    spec = image_spec(spec_src)
    tok = read_prompt_tokenizer(src, tmp, template, "LLaVA")
    model = load_llava(src)
    graphs, dims = export_llava(model, tmp, spec, external=external)
    return finish_decoder_only_bundle(src, tmp, model, graphs, dims, spec, tok, name, version, template, section,
                                      source, check_llava if check else None)
