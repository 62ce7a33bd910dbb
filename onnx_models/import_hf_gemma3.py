"""``cxrnode import-hf`` for ``Gemma3ForConditionalGeneration`` (the family of MedGemma-4B): the
``decoder-only`` graph contract (README.md), as the LLaVA import (:mod:`onnx_models.import_hf_llava`)
with Gemma 3's differences:

- ``encoder``: ``images`` [batch, views, 1, S, S], ``view_mask`` -> ``image_embeds``, ``image_mask``.
  Per view the block ``Gemma3Processor`` writes for one ``<start_of_image>``: the embedded
  ``"\\n\\n"`` and ``<start_of_image>`` tokens, the view's ``mm_tokens_per_image`` image
  embeddings (SigLIP vision tower + Gemma 3 multi-modal projector), the embedded
  ``<end_of_image>`` and ``"\\n\\n"``. ``image_mask`` is 1 for the text tokens of the block,
  **2 for the image embeddings**, 0 for a padded view: Gemma 3 lets the image tokens of one
  image attend to each other in both directions (``token_type_ids`` in ``transformers``), and
  the mask value is how the decoder graph knows them. The runtime passes the mask through
  unchanged (values > 0.5 attend), so the contract's runtime needs nothing new.
- ``embed``: Gemma's scaled token embedding (``x sqrt(hidden)``, part of the graph).
- ``decoder``: the Gemma 3 layers over a stacked cache [layers, batch, kv_heads, seq, head_dim]:
  q/k RMS norms, ``query_pre_attn_scalar`` scaling, the four layer norms, local (sliding window)
  and global layers each with their own RoPE (the local window counted in positions, so left
  padding in a batch changes nothing), image tokens of one image block attending
  bidirectionally (consecutive mask-2 positions are one image, as ``transformers`` groups
  consecutive image tokens), optional attention / final logit soft-capping; RoPE positions from
  the attention mask (left padding does not shift them).

The prompt: ``prefix_tokens`` (``<bos>``), then ``--prompt-template`` (default: Gemma's chat
turn with the views and the indication) with ``<image>`` where the image blocks go. Decoding
stops at ``<end_of_turn>`` when the checkpoint's generation config lists it (the end of a chat
answer), else at the text model's end token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .import_hf import NEG, NODE_MEAN, NODE_STD, OPSET, ImportHFError, _export, image_spec
from .import_hf_llava import export_encoder_and_embed

DEFAULT_TEMPLATE = ("<start_of_turn>user\n<image>Views: {views}. Indication: {indication}\n"
                    "Write the findings section of the chest X-ray report.<end_of_turn>\n<start_of_turn>model\n")
SUPPORTED_TEXT = ("gemma3_text",)
MAX_VIEWS = 2
#: the text the Gemma 3 processor puts before and after each image's tokens
IMAGE_MARGIN = "\n\n"


def block_token_ids(model: Any, tok: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after one image's tokens: ``"\\n\\n" <start_of_image>`` and
    ``<end_of_image> "\\n\\n"`` (``Gemma3Processor``'s expansion of one ``<start_of_image>``)."""
    margin = tok.encode(IMAGE_MARGIN, add_special_tokens=False).ids
    return margin + [int(model.config.boi_token_id)], [int(model.config.eoi_token_id)] + margin


class _Encoder(nn.Module):
    mean: Tensor
    std: Tensor
    before: Tensor
    after: Tensor
    kind: Tensor

    def __init__(self, model: Any, mean: list[float], std: list[float], before: list[int], after: list[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        emb = model.get_input_embeddings()
        with torch.no_grad():
            self.register_buffer("before", emb(torch.tensor(before)).float())
            self.register_buffer("after", emb(torch.tensor(after)).float())
        n = int(model.config.mm_tokens_per_image)
        self.register_buffer("kind", torch.tensor([1.0] * len(before) + [2.0] * n + [1.0] * len(after)))

    def forward(self, images: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor]:
        b, v, s = images.shape[0], images.shape[1], images.shape[-1]
        x = images.reshape(b * v, 1, s, s) * NODE_STD + NODE_MEAN
        x = (x.expand(b * v, 3, s, s) - self.mean) / self.std
        inner = self.model.model
        f = inner.multi_modal_projector(inner.vision_tower(pixel_values=x).last_hidden_state)  # get_image_features
        n, d = f.shape[1], f.shape[2]
        f = f.reshape(b, v, n, d)
        blocks = torch.cat([self.before.expand(b, v, self.before.shape[0], d), f,
                            self.after.expand(b, v, self.after.shape[0], d)], dim=2)
        width = blocks.shape[2]
        mask = (view_mask[:, :, None] * self.kind[None, None, :]).reshape(b, v * width)
        return blocks.reshape(b, v * width, d), mask


class _Gemma3Decoder(nn.Module):
    """Gemma 3 text layers over stacked caches: the HF modules' own projections, norms, MLP,
    rotary embeddings and LM head; the attention and its masks written out."""

    lm: Any
    head: Any

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.lm = model.model.language_model
        self.head = model.lm_head
        cfg = self.lm.config
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ImportHFError("Gemma 3 with use_bidirectional_attention (an embedding model) is not a generator")
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(cfg.head_dim)
        self.types = list(cfg.layer_types)
        self.window = int(cfg.sliding_window or 1 << 30)
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.attn_cap = cfg.attn_logit_softcapping
        self.final_cap = cfg.final_logit_softcapping

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, past_k: Tensor,
                past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        p = past_k.shape[3]
        valid = attention_mask > 0.5
        pos_all = (valid.long().cumsum(1) - 1).clamp(min=0)
        pos = pos_all[:, p:]
        rope = {t: self.lm.rotary_emb(inputs_embeds, pos, t) for t in sorted(set(self.types))}
        k_idx = torch.arange(p + s, device=inputs_embeds.device)
        q_idx = torch.arange(s, device=inputs_embeds.device) + p
        causal = (k_idx[None, :] <= q_idx[:, None])[None]
        # one image = a run of consecutive image positions (mask 2): bidirectional within it
        img = attention_mask > 1.5
        prev = torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], dim=1)
        group = torch.where(img, (img & ~prev).long().cumsum(1), torch.zeros_like(k_idx)[None])
        gq = group[:, p:]
        block = (gq[:, :, None] == group[:, None, :]) & (gq[:, :, None] > 0)
        full = (causal | block) & valid[:, None, :]
        # the local window counts real tokens (positions), so left padding does not narrow it
        near = (pos[:, :, None] - pos_all[:, None, :]) < self.window
        zero = torch.zeros((), dtype=inputs_embeds.dtype)
        bias = {"full_attention": torch.where(full, zero, zero + NEG)[:, None],
                "sliding_attention": torch.where(full & near, zero, zero + NEG)[:, None]}
        h = inputs_embeds
        rep = self.heads // self.kv_heads
        pk, pv = [], []
        layer: Any
        for i, layer in enumerate(self.lm.layers):
            at, kind = layer.self_attn, self.types[i]
            r = layer.input_layernorm(h)
            q = at.q_norm(at.q_proj(r).view(b, s, self.heads, self.head_dim).transpose(1, 2))
            k = at.k_norm(at.k_proj(r).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2))
            v = at.v_proj(r).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            cos, sin = rope[kind]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([past_k[i], k], dim=2)
            v = torch.cat([past_v[i], v], dim=2)
            pk.append(k)
            pv.append(v)
            kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
            vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
            scores = q @ kk.transpose(2, 3) * self.scaling
            if self.attn_cap is not None:
                scores = torch.tanh(scores / self.attn_cap) * self.attn_cap
            att = torch.softmax(scores + bias[kind], dim=-1) @ vv
            a = at.o_proj(att.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))
            h = h + layer.post_attention_layernorm(a)
            h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        logits = self.head(self.lm.norm(h))
        if self.final_cap is not None:
            logits = torch.tanh(logits / self.final_cap) * self.final_cap
        return logits, torch.stack(pk), torch.stack(pv)


def load_gemma3(path: Path) -> Any:
    from transformers import Gemma3ForConditionalGeneration

    try:
        model = Gemma3ForConditionalGeneration.from_pretrained(str(path), local_files_only=True,
                                                               attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ImportHFError(f"{path}: transformers could not load the checkpoint: {exc}") from exc
    return model.eval()


def export_gemma3(model: Any, out: Path, spec: dict[str, Any], tok: Any, external: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    text_type = model.config.text_config.model_type
    if text_type not in SUPPORTED_TEXT:
        raise ImportHFError(f"Gemma 3 language model {text_type!r} is not supported (supported: {SUPPORTED_TEXT})")
    s = spec["image_size"]
    before, after = block_token_ids(model, tok)
    enc = _Encoder(model, spec["image_mean"], spec["image_std"], before, after).eval()
    dec = _Gemma3Decoder(model).eval()
    e, m = export_encoder_and_embed(enc, model, out, s, external)
    L, H, dh = len(dec.lm.layers), dec.kv_heads, dec.head_dim
    past = torch.randn(L, 2, H, 3, dh)
    kv = {1: "batch", 3: "past"}
    # traced with image positions in the mask, so the block-mask branch is in the graph
    mask = torch.cat([torch.ones(2, 3), m[:, :2], torch.ones(2, 2)], dim=1)
    _export(dec, (torch.randn(2, 4, e.shape[-1]), mask, past, torch.randn_like(past)), out / "decoder.onnx",
            ["inputs_embeds", "attention_mask", "past_k", "past_v"], ["logits", "present_k", "present_v"],
            {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}, "past_k": kv,
             "past_v": kv, "logits": {0: "batch", 1: "seq"}, "present_k": {1: "batch", 3: "total"},
             "present_v": {1: "batch", 3: "total"}}, external=external)
    d, per_view = int(e.shape[-1]), int(e.shape[1]) // 2
    graphs = {
        "encoder": {"file": "encoder.onnx", "opset": OPSET,
                    "inputs": {"images": f"float32 [batch, views, 1, {s}, {s}] normalised",
                               "view_mask": "float32 [batch, views]"},
                    "outputs": {"image_embeds": f"float32 [batch, views x {per_view}, {d}] (per view: "
                                                f"{len(before)} text, {model.config.mm_tokens_per_image} image, "
                                                f"{len(after)} text embeddings)",
                                "image_mask": "float32 [batch, N]: 1 text, 2 image token (bidirectional within "
                                              "its image), 0 padded view"}},
        "embed": {"file": "embed.onnx", "opset": OPSET, "inputs": {"input_ids": "int64 [batch, seq]"},
                  "outputs": {"inputs_embeds": f"float32 [batch, seq, {d}] (scaled by sqrt(hidden))"}},
        "decoder": {"file": "decoder.onnx", "opset": OPSET,
                    "inputs": {"inputs_embeds": f"float32 [batch, seq, {d}]",
                               "attention_mask": "float32 [batch, past + seq]: 0 padding, 1 attend, 2 image token",
                               "past_k": f"float32 [{L}, batch, {H}, past, {dh}]", "past_v": "as past_k"},
                    "outputs": {"logits": "float32 [batch, seq, vocab]", "present_k": "past + seq",
                                "present_v": "as present_k"}},
    }
    return graphs, {"layers": L, "heads": H, "head_dim": dh}


def end_token(model: Any, src: Path, tok: Any) -> int:
    """``<end_of_turn>`` when the generation config lists it among its end tokens (a chat
    answer ends there), else the first end token."""
    gc = json.loads((src / "generation_config.json").read_text(encoding="utf-8")) \
        if (src / "generation_config.json").is_file() else {}
    ends = gc.get("eos_token_id", model.config.text_config.eos_token_id)
    ends = [int(e) for e in (ends if isinstance(ends, list) else [ends]) if e is not None]
    turn = tok.token_to_id("<end_of_turn>")
    if turn is not None and turn in ends:
        return int(turn)
    if not ends:
        raise ImportHFError(f"{src}: the checkpoint names no end token (eos_token_id)")
    return ends[0]


def hf_inputs(gen: Any, model: Any, st: Any) -> tuple[list[int], list[int]]:
    """The prompt as ``transformers`` takes it (the processor's expansion of one
    ``<start_of_image>`` per view) and its ``token_type_ids`` (1 = image token)."""
    p = gen._prompt
    before_t, _, after_t = p["template"].partition("<image>")
    ids = gen.tokenizer.encode(" ".join((st.indication or "").split()), add_special_tokens=False).ids
    ind = gen.tokenizer.decode(ids[: gen._max_ind]) if ids else p["empty_indication"]
    views = ", ".join(v for _, v in st.views[: gen._max_views])
    text = [part.replace("{indication}", ind).replace("{views}", views) for part in (before_t, after_t)]
    before, after = block_token_ids(model, gen.tokenizer)
    image = [int(model.config.image_token_id)] * int(model.config.mm_tokens_per_image)
    out = [gen._tok_id(t) for t in p["prefix_tokens"]] + gen.tokenizer.encode(text[0], add_special_tokens=False).ids
    for _ in st.views[: gen._max_views]:
        out += before + image + after
    out += gen.tokenizer.encode(text[1], add_special_tokens=False).ids
    return out, [int(i == model.config.image_token_id) for i in out]


def check_gemma3(model: Any, bundle: Path, spec: dict[str, Any], studies: list[Any], max_tokens: int = 16) -> dict[str, Any]:
    """ORT vs transformers (with ``token_type_ids``, so its image tokens attend bidirectionally
    as the processor's output makes them): logits over the whole prompt and greedy ids."""
    from .import_hf import hf_pixels
    from .runtime import ReportGenerator, _PrefixState

    gen = ReportGenerator(bundle, threads=1, beam_size=1)
    diffs, same = [], 0
    for st in studies:
        images, _, _ = gen._pixels([st])
        _, state = gen._encode([st])
        assert isinstance(state, _PrefixState) and state.prefix is not None
        ids, types = hf_inputs(gen, model, st)
        pv = hf_pixels(images[0, : len(st.views[: gen._max_views])], spec)
        kw = {"input_ids": torch.tensor([ids]), "pixel_values": pv, "token_type_ids": torch.tensor([types])}
        with torch.no_grad():
            ref = model(**kw).logits.numpy()
        pk, pvv = gen._empty_past(state)
        got = gen._sessions["decoder"].run(["logits"], {"inputs_embeds": state.prefix, "attention_mask": state.mask,
                                                        "past_k": pk, "past_v": pvv})[0]
        diffs.append(float(np.abs(got - ref).max()))
        [(seq, _)] = gen._greedy(state, max_tokens, 0)
        g = model.generate(**kw, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                           bad_words_ids=[[i] for i in gen._banned] or None, eos_token_id=gen._eos,
                           pad_token_id=gen._pad)[0, len(ids):].tolist()
        g = g[: g.index(gen._eos)] if gen._eos in g else g
        same += int(g == seq)
    return {"probe_studies": len(studies), "max_abs_logit_diff": max(diffs), "greedy_identical": same,
            "greedy_compared": len(studies), "max_tokens": max_tokens}


def recheck_int8(src: Path, bundle: Path) -> dict[str, Any]:
    """The int8 bundle against transformers (reported, not enforced)."""
    from .import_hf_llava import probe_studies

    return check_gemma3(load_gemma3(src), bundle, image_spec(src), probe_studies())


def import_gemma3(src: Path, tmp: Path, spec_src: Path, name: str, version: str, template: str, section: str,
                  source: dict[str, Any], check: bool, external: bool = True) -> dict[str, Any]:
    """Write the decoder-only bundle for ``src`` into ``tmp`` and return its manifest
    (``external``: the graphs' weights in ``<graph>.data`` side files, the bundle's external data)."""
    from .import_hf_llava import finish_decoder_only_bundle, read_prompt_tokenizer

    spec = image_spec(spec_src)
    tok = read_prompt_tokenizer(src, tmp, template, "Gemma 3")
    model = load_gemma3(src)
    graphs, dims = export_gemma3(model, tmp, spec, tok, external=external)

    def gemma3_entries(manifest: dict[str, Any]) -> None:
        manifest["description"] = (f"Imported Hugging Face Gemma3ForConditionalGeneration ({model.config.vision_config.model_type}"
                                   f" + {model.config.text_config.model_type}); research use only, not a medical device")
        manifest["tokenizer"]["eos"] = tok.id_to_token(end_token(model, src, tok))
        manifest["input"]["max_views"] = MAX_VIEWS
        manifest["input"]["view_policy"] = "all (one Gemma 3 image block per view: \\n\\n<start_of_image> ... <end_of_image>\\n\\n)"

    return finish_decoder_only_bundle(src, tmp, model, graphs, dims, spec, tok, name, version, template, section,
                                      source, check_gemma3 if check else None, gemma3_entries)
