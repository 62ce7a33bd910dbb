"""Decoder-only (LLaVA-style) bundles: a tiny torch model whose image embeddings are a prefix to
a causal language model, exported to the three graphs (encoder, embed, decoder) and run by
``ReportGenerator`` with the same greedy and beam search as encoder-decoder bundles."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx_synth import synthetic_image

torch = pytest.importorskip("torch")

from torch import Tensor, nn  # noqa: E402

from onnx_models.bundle import BundleError, load_bundle, write_manifest  # noqa: E402
from onnx_models.runtime import ReportGenerator, StudyInput  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "onnx_models" / "bundles" / "default"
D, HEADS, LAYERS, PER_VIEW, MAX_POS = 32, 2, 2, 3, 256
NEG = -1e9


class TinyLlava(nn.Module):
    """A tiny CNN per view -> PER_VIEW embeddings per view (+ view embedding), a token embedding,
    learned positions from the attention mask's cumsum, LAYERS pre-LN causal transformer layers
    with a stacked KV cache, and an LM head."""

    def __init__(self, vocab: int, eos: int) -> None:
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(16, PER_VIEW * D)
        self.view_emb = nn.Embedding(5, D)
        self.obs = nn.Linear(16, 13)
        self.tok = nn.Embedding(vocab, D)
        self.pos = nn.Embedding(MAX_POS, D)
        self.ln1 = nn.ModuleList(nn.LayerNorm(D) for _ in range(LAYERS))
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(D, D) for _ in range(LAYERS))
        self.ln2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(LAYERS))
        self.ff = nn.ModuleList(nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
                                for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, vocab)
        with torch.no_grad():
            self.lm_head.bias.mul_(20.0)  # a few tokens are clearly preferred: no argmax near-ties
            self.lm_head.bias[eos] = -20.0  # never stops at step 1: the comparisons mean something

    def encode(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, v = images.shape[0], images.shape[1]
        f = self.cnn(images.flatten(0, 1)).view(b, v, 16)
        e = self.proj(f).view(b, v, PER_VIEW, D) + self.view_emb(view_ids)[:, :, None, :]
        mask = view_mask[:, :, None].expand(b, v, PER_VIEW).reshape(b, v * PER_VIEW)
        pooled = (f * view_mask[:, :, None]).sum(1) / view_mask.sum(1, keepdim=True).clamp(min=1.0)
        return e.reshape(b, v * PER_VIEW, D), self.obs(pooled), mask

    def decode(self, x: Tensor, attention_mask: Tensor, past_k: Tensor,
               past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s = x.shape[0], x.shape[1]
        p = past_k.shape[3]
        pos = (attention_mask.cumsum(1) - 1.0).clamp(min=0.0).long()[:, p:]
        h = x + self.pos(pos)
        k_pos = torch.arange(p + s).unsqueeze(0)
        q_pos = (torch.arange(s) + p).unsqueeze(1)
        allowed = (k_pos <= q_pos)[None] & (attention_mask[:, None, :] > 0.5)  # B, S, P+S
        bias = ((~allowed).to(x.dtype) * NEG)[:, None]
        pk, pv = [], []
        hd = D // HEADS
        for i in range(LAYERS):
            q, k, v = self.qkv[i](self.ln1[i](h)).split(D, dim=-1)
            q, k, v = (t.view(b, s, HEADS, hd).transpose(1, 2) for t in (q, k, v))
            k = torch.cat([past_k[i], k], dim=2)
            v = torch.cat([past_v[i], v], dim=2)
            pk.append(k)
            pv.append(v)
            att = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(hd) + bias, dim=-1) @ v
            h = h + self.out[i](att.transpose(1, 2).reshape(b, s, D))
            h = h + self.ff[i](self.ln2[i](h))
        return self.lm_head(self.ln(h)), torch.stack(pk), torch.stack(pv)

    def empty_past(self, b: int) -> tuple[Tensor, Tensor]:
        z = torch.zeros(LAYERS, b, HEADS, 0, D // HEADS)
        return z, z.clone()


class _Enc(nn.Module):
    def __init__(self, m: TinyLlava, with_obs: bool) -> None:
        super().__init__()
        self.m, self.with_obs = m, with_obs

    def forward(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> tuple[Tensor, ...]:
        e, obs, mask = self.m.encode(images, view_ids, view_mask)
        return (e, obs, mask) if self.with_obs else (e,)


class _Embed(nn.Module):
    def __init__(self, m: TinyLlava) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: Tensor) -> Tensor:
        return self.m.tok(ids)


class _Dec(nn.Module):
    def __init__(self, m: TinyLlava) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Tensor, mask: Tensor, pk: Tensor, pv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.m.decode(x, mask, pk, pv)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=axes, opset_version=17, dynamo=False)


def _write_bundle(model: TinyLlava, out: Path, with_obs: bool = True) -> Path:
    out.mkdir(parents=True)
    shutil.copy(DEFAULT / "tokenizer.json", out / "tokenizer.json")
    size = 32
    images = torch.randn(2, 2, 1, size, size)
    view_ids, view_mask = torch.tensor([[0, 2], [1, 4]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    views = {0: "batch", 1: "views"}
    enc_out = ["image_embeds", "obs_logits", "image_mask"] if with_obs else ["image_embeds"]
    _export(_Enc(model, with_obs), (images, view_ids, view_mask), out / "encoder.onnx",
            ["images", "view_ids", "view_mask"], enc_out,
            {"images": views, "view_ids": views, "view_mask": views, "image_embeds": {0: "batch", 1: "n"},
             **({"obs_logits": {0: "batch"}, "image_mask": {0: "batch", 1: "n"}} if with_obs else {})})
    _export(_Embed(model), (torch.tensor([[1, 2, 3]]),), out / "embed.onnx", ["input_ids"], ["inputs_embeds"],
            {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}})
    pk = torch.randn(LAYERS, 2, HEADS, 3, D // HEADS)
    kv = {1: "batch", 3: "past"}
    _export(_Dec(model), (torch.randn(2, 2, D), torch.ones(2, 5), pk, torch.randn_like(pk)), out / "decoder.onnx",
            ["inputs_embeds", "attention_mask", "past_k", "past_v"], ["logits", "present_k", "present_v"],
            {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
             "past_k": kv, "past_v": kv, "logits": {0: "batch", 1: "seq"},
             "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}})
    m = json.loads((DEFAULT / "manifest.json").read_text())
    m.update(name="tiny-llava", version="0.0.1", architecture="decoder-only")
    m["graphs"] = {
        "encoder": {"file": "encoder.onnx", "opset": 17,
                    "inputs": {"images": "float32 [batch, views, 1, S, S]", "view_ids": "int64 [batch, views]",
                               "view_mask": "float32 [batch, views]"},
                    "outputs": {"image_embeds": f"float32 [batch, N, {D}]", "obs_logits": "float32 [batch, 13]",
                                "image_mask": "float32 [batch, N]"}},
        "embed": {"file": "embed.onnx", "opset": 17, "inputs": {"input_ids": "int64 [batch, seq]"},
                  "outputs": {"inputs_embeds": f"float32 [batch, seq, {D}]"}},
        "decoder": {"file": "decoder.onnx", "opset": 17,
                    "inputs": {"inputs_embeds": f"float32 [batch, seq, {D}]",
                               "attention_mask": "float32 [batch, past + seq]",
                               "past_k": "float32 [layers, batch, heads, past, head_dim]", "past_v": "as past_k"},
                    "outputs": {"logits": "float32 [batch, seq, vocab]", "present_k": "past + seq",
                                "present_v": "as present_k"}},
    }
    m["input"]["image_size"] = size
    m["observations"].pop("classifier", None)
    m.pop("view_classifier", None)
    m.pop("training", None)
    m["generation"].pop("grounding", None)
    m.pop("input_check", None)  # the default bundle's gate describes its own encoder, not this one
    m["decoder"] = {"layers": LAYERS, "heads": HEADS, "head_dim": D // HEADS,
                    "kv_layout": "stacked [layers, batch, heads, seq, head_dim]", "max_positions": MAX_POS}
    write_manifest(out, m)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyLlava, ReportGenerator, Path]:
    torch.set_num_threads(1)
    torch.manual_seed(7)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))
    model = TinyLlava(tok.get_vocab_size(), int(tok.token_to_id("[EOS]"))).eval()
    path = _write_bundle(model, tmp_path_factory.mktemp("dec_only") / "tiny-llava")
    return model, ReportGenerator(path, threads=1), path


def _studies() -> list[StudyInput]:
    return [
        StudyInput(views=[(synthetic_image(False, 1, 80), "PA"), (synthetic_image(True, 2, 70), "LATERAL")],
                   indication="Chest pain and shortness of breath."),
        StudyInput(views=[(synthetic_image(False, 3, 60), "AP")]),  # one view, [NONE]
        StudyInput(views=[(synthetic_image(False, 4, 90), "PA"), (synthetic_image(True, 5, 90), "LL")],
                   indication="Cough."),
    ]


def _torch_greedy(model: TinyLlava, gen: ReportGenerator, study: StudyInput, max_tokens: int) -> list[int]:
    """Eager greedy for one study (no padding): BOS, PAD, [NONE], [UNK] banned, [SEP] at most once."""
    images, view_ids, view_mask = (torch.from_numpy(x) for x in gen._pixels([study]))
    ids = gen._indication_ids(study.indication) + [gen._bos]
    with torch.no_grad():
        embeds, _, img_mask = model.encode(images, view_ids, view_mask)
        x = torch.cat([embeds, model.tok(torch.tensor([ids]))], dim=1)
        mask = torch.cat([img_mask, torch.ones(1, len(ids))], dim=1)
        pk, pv = model.empty_past(1)
        out: list[int] = []
        for _ in range(max_tokens):
            logits, pk, pv = model.decode(x, mask, pk, pv)
            last = logits[0, -1].clone()
            last[list(gen._banned)] = float("-inf")
            if gen._sep in out:
                last[gen._sep] = float("-inf")
            nxt = int(last.argmax())
            if nxt == gen._eos:
                break
            out.append(nxt)
            x = model.tok(torch.tensor([[nxt]]))
            mask = torch.cat([mask, torch.ones(1, 1)], dim=1)
    return out


def test_loads_and_logits_match_torch(tiny: tuple[TinyLlava, ReportGenerator, Path]) -> None:
    model, gen, _ = tiny
    assert gen.bundle.architecture == "decoder-only"
    assert set(gen._banned) == {gen._bos, gen._pad, gen._none, gen.tokenizer.token_to_id("[UNK]")}
    studies = _studies()
    probs, st = gen._encode(studies)
    images, view_ids, view_mask = (torch.from_numpy(x) for x in gen._pixels(studies))
    with torch.no_grad():
        embeds, obs, img_mask = model.encode(images, view_ids, view_mask)
        assert np.allclose(torch.sigmoid(obs).numpy(), probs, atol=1e-5)
        assert st.prefix is not None and np.abs(st.prefix[:, : embeds.shape[1]] - embeds.numpy()).max() < 1e-4
        assert np.array_equal(st.mask[:, : embeds.shape[1]], img_mask.numpy())
        # the prefix step ([image ; left-padded indication ; BOS]) and one cached step
        bos = np.full((len(studies), 1), gen._bos, dtype=np.int64)
        pk0, pv0 = model.empty_past(len(studies))
        x = torch.cat([torch.from_numpy(st.prefix), model.tok(torch.from_numpy(bos))], dim=1)
        mask = torch.cat([torch.from_numpy(st.mask), torch.ones(len(studies), 1)], dim=1)
        logits_t, pk_t, pv_t = model.decode(x, mask, pk0, pv0)
        logits_o, pk_o, pv_o = gen._sessions["decoder"].run(None, {
            "inputs_embeds": x.numpy(), "attention_mask": mask.numpy(), "past_k": pk0.numpy(), "past_v": pv0.numpy()})
        assert np.abs(logits_t.numpy() - logits_o).max() < 1e-4
        assert np.abs(pk_t.numpy() - pk_o).max() < 1e-4
        nxt = torch.tensor([[11]] * len(studies))
        mask2 = torch.cat([mask, torch.ones(len(studies), 1)], dim=1)
        step_t, _, _ = model.decode(model.tok(nxt), mask2, pk_t, pv_t)
        step_o, _, _ = gen._sessions["decoder"].run(None, {
            "inputs_embeds": gen._sessions["embed"].run(None, {"input_ids": nxt.numpy()})[0],
            "attention_mask": mask2.numpy(), "past_k": pk_o, "past_v": pv_o})
        assert np.abs(step_t.numpy() - step_o).max() < 1e-4
    # the runtime's own step agrees with the graph called directly
    pk, pv = gen._empty_past(st)
    last, _, _, st2 = gen._step(bos, st, pk, pv)
    assert np.abs(last - logits_o[:, -1]).max() < 1e-6
    assert st2.prefix is None and st2.mask.shape == mask.shape


def test_greedy_equals_torch_and_batching_is_exact(tiny: tuple[TinyLlava, ReportGenerator, Path]) -> None:
    model, gen, _ = tiny
    studies = _studies()
    _, st = gen._encode(studies)
    batch = [ids for ids, _ in gen._greedy(st, 20, 0)]
    eager = [_torch_greedy(model, gen, s, 20) for s in studies]
    assert batch == eager
    assert all(len(ids) >= 2 for ids in batch)  # no EOS at step 1
    assert all(ids.count(gen._sep) <= 1 and not set(ids) & set(gen._banned) for ids in batch)
    # batching (different indication lengths and view counts: padding) changes nothing
    together = gen.generate(studies, beam_size=1, max_tokens=20, no_repeat_ngram_size=0)
    for s, ids, r in zip(studies, batch, together, strict=True):
        [alone] = gen.generate([s], beam_size=1, max_tokens=20, no_repeat_ngram_size=0)
        assert [w for w, _ in r.tokens] == [gen.tokenizer.id_to_token(i) for i in ids if i != gen._sep]
        assert [w for w, _ in alone.tokens] == [w for w, _ in r.tokens]
        assert np.allclose([p for _, p in alone.tokens], [p for _, p in r.tokens], atol=1e-5)


def test_beam_batch_and_observations(tiny: tuple[TinyLlava, ReportGenerator, Path]) -> None:
    _, gen, _ = tiny
    two = _studies()[::2]  # two studies, indications of different lengths
    reports = gen.generate(two, beam_size=3, max_tokens=15)
    assert len(reports) == 2
    for r in reports:
        assert isinstance(r.findings, str) and isinstance(r.impression, str)
        assert r.findings or r.impression
        assert 0 < len(r.tokens) <= 15 and all(0.0 < p <= 1.0 for _, p in r.tokens)
        assert set(r.observations) == set(gen.observation_names)
        assert r.grounded == []
    # beam search on a batch gives each study what it gets alone
    alone = [gen.generate([s], beam_size=3, max_tokens=15)[0] for s in two]
    for r, a in zip(reports, alone, strict=True):
        assert [w for w, _ in r.tokens] == [w for w, _ in a.tokens]
        assert np.allclose([p for _, p in r.tokens], [p for _, p in a.tokens], atol=1e-5)
    emb = gen.embed_images(two)
    assert emb.shape == (2, D) and np.isfinite(emb).all()
    with pytest.raises(BundleError, match="no view_classifier"):
        gen.classify_views([synthetic_image(False, 1)])


def test_encoder_without_obs_logits(tiny: tuple[TinyLlava, ReportGenerator, Path], tmp_path: Path) -> None:
    model, _, _ = tiny
    gen = ReportGenerator(_write_bundle(model, tmp_path / "b", with_obs=False), threads=1)
    [r] = gen.generate(_studies()[1:2], beam_size=2, max_tokens=8)
    assert r.observations == {} and r.tokens


def test_missing_embed_graph_is_refused(tiny: tuple[TinyLlava, ReportGenerator, Path], tmp_path: Path) -> None:
    _, _, path = tiny
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["graphs"]["embed"]
    (copy / "embed.onnx").unlink()
    write_manifest(copy, m)
    with pytest.raises(BundleError, match="decoder-only bundle lacks the 'embed' graph"):
        load_bundle(copy)
    # a graph that breaks the contract is named at load time
    m = json.loads((path / "manifest.json").read_text())
    m["graphs"]["embed"]["file"] = "decoder.onnx"
    write_manifest(copy, m)
    with pytest.raises(BundleError, match="graph 'embed' lacks"):
        ReportGenerator(copy, threads=1)
