"""The reference report model in torch (training and export only; never imported at run time).

Architecture ("encoder-decoder" in the bundle manifest):

- ``ViewEncoder``: a small CNN shared by all views of a study (128 px in, 8 x 8 feature map
  out), projected to ``d_model`` tokens, plus a learned 2-D position embedding and a learned
  view-position embedding (PA, AP, LATERAL, LL, UNKNOWN). 1..max_views views with a mask.
- ``ObservationHead``: masked mean + max pooling over views -> MLP -> 13 logits (the abnormal
  CheXpert observations). Trained jointly with the report loss.
- ``Bridge``: builds the decoder memory = [image tokens ; 13 observation prompt tokens ;
  indication tokens]. A prompt token is ``obs_embedding[i] + state_embedding[state_i]`` where
  the state (0 absent, 1 present) comes from the thresholded head at inference and from the
  reference labels during training (PromptMRG-style diagnosis-driven prompts). The indication
  is embedded and passed through one self-attention layer; an empty indication is ``[NONE]``.
  The bridge returns the per-layer cross-attention keys/values once per study, and a
  diagnosis conditioning vector ``cond = sum_i cond_emb[i, state_i]`` that the decoder adds to
  every input embedding (a direct path from the predicted labels to the text).
- ``Decoder``: a pre-LN transformer decoder (causal self-attention with a KV cache, cross-
  attention over the memory, feed-forward), tied input/output embeddings.
  KV layout: ``[layers, batch, heads, seq, head_dim]`` stacked in one tensor.
- ``ViewClassifier``: a separate tiny CNN (64 px) that tells FRONTAL from LATERAL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelConfig:
    vocab_size: int = 1200
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.1
    image_size: int = 128
    channels: tuple[int, ...] = (32, 48, 96, 160, 192)
    n_views: int = 5  # size of the view vocabulary
    max_views: int = 4
    n_observations: int = 13
    max_report_tokens: int = 100
    max_indication_tokens: int = 32
    view_image_size: int = 64

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ViewEncoder(nn.Module):
    """CNN shared by the views: (N, 1, S, S) -> (N, (S/16)^2, d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.channels
        self.features = nn.Sequential(
            _conv(1, c[0], 2),  # 64
            _conv(c[0], c[1], 2),  # 32
            _conv(c[1], c[1], 1),
            _conv(c[1], c[2], 2),  # 16
            _conv(c[2], c[2], 1),
            _conv(c[2], c[3], 2),  # 8
            _conv(c[3], c[4], 1),
        )
        self.proj = nn.Conv2d(c[4], cfg.d_model, 1)
        n_tokens = (cfg.image_size // 16) ** 2
        self.pos = nn.Parameter(torch.randn(n_tokens, cfg.d_model) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        f = self.proj(self.features(x))  # N, D, h, w
        return f.flatten(2).transpose(1, 2) + self.pos


class MultiHeadAttention(nn.Module):
    def __init__(self, d: int, h: int, dropout: float):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def split(self, x: Tensor) -> Tensor:  # B, S, D -> B, H, S, dh
        b, s, _ = x.shape
        return x.view(b, s, self.h, self.dh).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.dh))
        if bias is not None:
            att = att + bias
        att = self.drop(torch.softmax(att, dim=-1))
        out = torch.matmul(att, v)  # B, H, S, dh
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, self.h * self.dh))


class EncoderLayer(nn.Module):
    """Pre-LN self-attention layer (used for the indication tokens)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.att = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        h = self.ln1(x)
        a = self.att
        x = x + self.drop(a.attend(a.split(a.q(h)), a.split(a.k(h)), a.split(a.v(h)), key_bias))
        return x + self.drop(self.ff(self.ln2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d)
        self.self_att = MultiHeadAttention(d, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(d)
        self.cross_att = MultiHeadAttention(d, cfg.n_heads, cfg.dropout)
        self.ln3 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        self_bias: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_bias: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        a = self.self_att
        h = self.ln1(x)
        k = torch.cat([past_k, a.split(a.k(h))], dim=2)
        v = torch.cat([past_v, a.split(a.v(h))], dim=2)
        x = x + self.drop(a.attend(a.split(a.q(h)), k, v, self_bias))
        c = self.cross_att
        x = x + self.drop(c.attend(c.split(c.q(self.ln2(x))), cross_k, cross_v, cross_bias))
        x = x + self.drop(self.ff(self.ln3(x)))
        return x, k, v


NEG = -1e4  # additive mask value (finite: keeps fp16/ORT softmax free of NaN)


class ReportModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder = ViewEncoder(cfg)
        self.view_emb = nn.Embedding(cfg.n_views, d)
        self.enc_ln = nn.LayerNorm(d)
        feat = d
        self.head = nn.Sequential(
            nn.Linear(2 * feat, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, cfg.n_observations)
        )
        self.obs_emb = nn.Parameter(torch.randn(cfg.n_observations, d) * 0.02)
        self.state_emb = nn.Embedding(2, d)
        # diagnosis conditioning added to every decoder input embedding (per observation, per state)
        self.cond_emb = nn.Parameter(torch.zeros(cfg.n_observations, 2, d))
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.ind_pos = nn.Parameter(torch.randn(cfg.max_indication_tokens, d) * 0.02)
        self.ind_layer = EncoderLayer(cfg)
        self.type_emb = nn.Embedding(3, d)  # image / prompt / indication segment
        self.mem_ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.dec_pos = nn.Parameter(torch.randn(cfg.max_report_tokens + 2, d) * 0.02)
        self.out_ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.tok_emb.weight, std=d**-0.5)

    # --- image side -------------------------------------------------------------------------
    def encode_images(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, V, 1, S, S), view_ids (B, V) int64, view_mask (B, V) float
        -> image tokens (B, V, T, D), observation logits (B, 13)."""
        b, v = view_ids.shape
        flat = images.reshape(b * v, 1, images.shape[-2], images.shape[-1])
        if self.training:
            # encode only the real views (padding must not touch BatchNorm statistics)
            idx = torch.nonzero(view_mask.reshape(-1) > 0.5).squeeze(1)
            enc = self.encoder(flat.index_select(0, idx))
            tokens = enc.new_zeros(b * v, enc.shape[1], enc.shape[2]).index_copy(0, idx, enc)
        else:
            tokens = self.encoder(flat)
        tokens = tokens.reshape(b, v, tokens.shape[1], tokens.shape[2])
        tokens = self.enc_ln(tokens + self.view_emb(view_ids).unsqueeze(2))
        m = view_mask.unsqueeze(-1)  # B, V, 1
        pooled = tokens.mean(dim=2)  # B, V, D
        mean = (pooled * m).sum(1) / m.sum(1).clamp(min=1.0)
        mx = (pooled + (m - 1.0) * 1e4).max(dim=1).values
        logits = self.head(torch.cat([mean, mx], dim=-1))
        return tokens, logits

    # --- memory and cross-attention keys/values ----------------------------------------------
    def bridge(
        self,
        image_tokens: Tensor,
        view_mask: Tensor,
        obs_states: Tensor,
        indication_ids: Tensor,
        indication_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> cross_k, cross_v (L, B, H, M, dh), memory_mask (B, M) float and the diagnosis
        conditioning vector cond (B, D) that the decoder adds to its input embeddings."""
        b, v, t, d = image_tokens.shape
        img = image_tokens.reshape(b, v * t, d) + self.type_emb.weight[0]
        img_mask = view_mask.unsqueeze(-1).expand(b, v, t).reshape(b, v * t)
        prompts = self.obs_emb.unsqueeze(0) + self.state_emb(obs_states) + self.type_emb.weight[1]
        prompt_mask = torch.ones_like(obs_states, dtype=img_mask.dtype)
        li = indication_ids.shape[1]
        ind = self.tok_emb(indication_ids) * math.sqrt(d) + self.ind_pos[:li] + self.type_emb.weight[2]
        ind_bias = ((1.0 - indication_mask) * NEG)[:, None, None, :]
        ind = self.ind_layer(self.drop(ind), ind_bias)
        memory = self.mem_ln(torch.cat([img, prompts, ind], dim=1))
        memory_mask = torch.cat([img_mask, prompt_mask, indication_mask], dim=1)
        ks, vs = [], []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            c = layer.cross_att
            ks.append(c.split(c.k(memory)))
            vs.append(c.split(c.v(memory)))
        onehot = F.one_hot(obs_states, 2).to(memory.dtype)  # B, O, 2
        cond = (onehot.unsqueeze(-1) * self.cond_emb.unsqueeze(0)).sum(dim=(1, 2))
        return torch.stack(ks), torch.stack(vs), memory_mask, cond

    # --- decoder step (also used for teacher forcing with an empty past) --------------------
    def decode(
        self,
        input_ids: Tensor,
        memory_mask: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        cond: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """input_ids (B, S); past (L, B, H, P, dh); cond (B, D)
        -> logits (B, S, vocab), present (L, B, H, P+S, dh)."""
        p = past_k.shape[3]
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device) + p
        x = self.tok_emb(input_ids) * math.sqrt(self.cfg.d_model) + self.dec_pos[pos] + cond.unsqueeze(1)
        x = self.drop(x)
        q_pos = pos.unsqueeze(1)
        k_pos = torch.arange(p + s, device=input_ids.device).unsqueeze(0)
        self_bias = (k_pos > q_pos).to(x.dtype) * NEG  # S, P+S
        cross_bias = ((1.0 - memory_mask) * NEG)[:, None, None, :]
        pk, pv = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, past_k[i], past_v[i], self_bias, cross_k[i], cross_v[i], cross_bias)
            pk.append(k)
            pv.append(v)
        logits = torch.matmul(self.out_ln(x), self.tok_emb.weight.t())
        return logits, torch.stack(pk), torch.stack(pv)

    def empty_past(self, batch: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        shape = (cfg.n_layers, batch, cfg.n_heads, 0, cfg.d_model // cfg.n_heads)
        z = torch.zeros(shape, device=self.tok_emb.weight.device)
        return z, z.clone()

    def forward(
        self,
        images: Tensor,
        view_ids: Tensor,
        view_mask: Tensor,
        obs_states: Tensor,
        indication_ids: Tensor,
        indication_mask: Tensor,
        input_ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced training pass -> (report logits (B, S, vocab), observation logits)."""
        tokens, obs_logits = self.encode_images(images, view_ids, view_mask)
        ck, cv, mm, cond = self.bridge(tokens, view_mask, obs_states, indication_ids, indication_mask)
        pk, pv = self.empty_past(input_ids.shape[0])
        logits, _, _ = self.decode(input_ids, mm, ck, cv, pk, pv, cond)
        return logits, obs_logits

    @torch.no_grad()
    def greedy(
        self,
        images: Tensor,
        view_ids: Tensor,
        view_mask: Tensor,
        thresholds: Tensor,
        indication_ids: Tensor,
        indication_mask: Tensor,
        bos: int,
        eos: int,
        max_tokens: int,
        banned: tuple[int, ...] = (),
        sep: int | None = None,
        probs_hook: Callable[[Tensor], Tensor] | None = None,
        eos_penalty: float = 0.0,
    ) -> list[list[int]]:
        """Greedy decoding with the KV cache in torch eager (for parity tests and benchmarks);
        ``banned`` tokens are never chosen and ``sep`` at most once, as in the ONNX runtime.
        ``probs_hook`` maps the head's probabilities to the ones thresholded (e.g. the mean with
        a separate findings classifier, as a bundle's ``observations.classifier`` does)."""
        tokens, obs_logits = self.encode_images(images, view_ids, view_mask)
        probs = torch.sigmoid(obs_logits)
        if probs_hook is not None:
            probs = probs_hook(probs)
        states = (probs >= thresholds).long()
        ck, cv, mm, cond = self.bridge(tokens, view_mask, states, indication_ids, indication_mask)
        b = images.shape[0]
        pk, pv = self.empty_past(b)
        cur = torch.full((b, 1), bos, dtype=torch.long)
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for _ in range(max_tokens):
            logits, pk, pv = self.decode(cur, mm, ck, cv, pk, pv, cond)
            last = logits[:, -1].clone()
            if banned:
                last[:, list(banned)] = float("-inf")
            if eos_penalty:  # as the runtime's generation.eos_penalty (same argmax as on log-probs)
                last = torch.log_softmax(last, dim=-1)
                last[:, eos] -= eos_penalty
            if sep is not None:
                for i in range(b):
                    if sep in out[i]:
                        last[i, sep] = float("-inf")
            nxt = last.argmax(-1)
            for i in range(b):
                if not done[i]:
                    if int(nxt[i]) == eos:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if all(done):
                break
            cur = nxt.unsqueeze(1)
        return out


class ViewClassifier(nn.Module):
    """Tiny CNN: (N, 1, 64, 64) normalised pixels -> (N, 2) probabilities [FRONTAL, LATERAL]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _conv(1, 16, 2), _conv(16, 32, 2), _conv(32, 48, 2), _conv(48, 64, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def probs(self, x: Tensor) -> Tensor:
        return F.softmax(self.net(x), dim=-1)


def load_checkpoint(path: str | Path) -> tuple[dict, ReportModel, ViewClassifier]:
    """A checkpoint written by ``train`` and its report model and view classifier, loaded."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model = ReportModel(ModelConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    view_clf = ViewClassifier()
    view_clf.load_state_dict(ck["view_classifier"])
    return ck, model, view_clf


class FindingsClassifier(nn.Module):
    """The bundle's observation classifier (SEI's "structural entities"): a CNN shared by the
    views at full resolution (256 px, so small nodules survive), a view-position embedding, and
    mean + max pooling over the real views -> 13 observation logits.

    images (B, V, 1, S, S) normalised, view_ids (B, V) int64, view_mask (B, V) float -> (B, 13).
    """

    def __init__(self, n_views: int = 5, n_observations: int = 13,
                 channels: tuple[int, ...] = (16, 24, 48, 96, 128, 192)):
        super().__init__()
        c = channels
        layers: list[nn.Module] = [_conv(1, c[0], 2)]
        for cin, cout in zip(c[:-1], c[1:], strict=True):
            layers += [_conv(cin, cout, 2), _conv(cout, cout, 1)]
        self.features = nn.Sequential(*layers)
        feat = 2 * c[-1]
        self.view_emb = nn.Embedding(n_views, feat)
        self.head = nn.Sequential(nn.Linear(2 * feat, 256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, n_observations))

    def forward(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> Tensor:
        b, v = view_ids.shape
        flat = images.reshape(b * v, 1, images.shape[-2], images.shape[-1])
        if self.training:  # padding views must not touch BatchNorm statistics
            idx = torch.nonzero(view_mask.reshape(-1) > 0.5).squeeze(1)
            f = self.features(flat.index_select(0, idx))
            f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            f = f.new_zeros(b * v, f.shape[1]).index_copy(0, idx, f)
        else:
            f = self.features(flat)
            f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        f = f.reshape(b, v, -1) + self.view_emb(view_ids)
        m = view_mask.unsqueeze(-1)
        mean = (f * m).sum(1) / m.sum(1).clamp(min=1.0)
        mx = (f + (m - 1.0) * 1e4).max(dim=1).values
        return self.head(torch.cat([mean, mx], dim=-1))
