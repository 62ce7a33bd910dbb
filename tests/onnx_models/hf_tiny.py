"""Tiny random Hugging Face checkpoints built in the tests (no download): a ViT + BERT
``VisionEncoderDecoderModel`` with a WordPiece tokenizer trained on a few report sentences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SENTENCES = [
    "the heart size is normal . the lungs are clear .",
    "no pleural effusion or pneumothorax .",
    "cardiomegaly with small right pleural effusion .",
    "right lower lobe opacity may represent pneumonia .",
    "no acute cardiopulmonary abnormality .",
    "there is mild pulmonary edema and bibasilar atelectasis .",
    "the mediastinal contours are within normal limits .",
] * 4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
README = """---
license: mit
base_model: tiny-random
---
# tiny random report generator

Trained on nothing. Reports in the style of MIMIC-CXR (PhysioNet).
"""


def wordpiece_tokenizer(vocab_size: int = 160) -> Any:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                ("[SEP]", sep)])
    return tok


def tiny_ved(out: Path, seed: int = 0, image_size: int = 32, hidden: int = 48, encoder: str = "vit",
             readme: str = README, layers: int = 2, heads: int = 2, decoder_hidden: int | None = None, bias_scale: float = 0.5,
             init: float = 0.2) -> Path:
    """Save a random VisionEncoderDecoderModel checkpoint (weights, config, processor,
    tokenizer, README) to ``out``."""
    import torch
    from transformers import (
        BertConfig,
        Swinv2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    tok = wordpiece_tokenizer()
    if encoder == "vit":
        enc = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, image_size=image_size, patch_size=8,
                        initializer_range=init)
    else:
        enc = Swinv2Config(image_size=image_size, patch_size=4, embed_dim=hidden // 2, depths=[1, 1],
                           num_heads=[1, 2], window_size=4)
    dh = decoder_hidden or hidden
    dec = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=dh, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * dh, max_position_embeddings=64,
                     is_decoder=True, add_cross_attention=True, initializer_range=init)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = cls, sep, pad
    model = VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():  # a few words clearly preferred (no argmax near-ties), no stop at step 1
        bias = model.decoder.cls.predictions.decoder.bias
        bias.mul_(0.0).add_(torch.randn_like(bias) * bias_scale)
        bias[sep] = -4.0
    model.generation_config.decoder_start_token_id = cls
    model.generation_config.eos_token_id = sep
    model.generation_config.pad_token_id = pad
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225], resample=3).save_pretrained(out)
    (out / "README.md").write_text(readme, encoding="utf-8")
    return out


def bpe_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer (Llama/LLaVA style specials) trained on the report sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES + ["USER: Views: PA, LATERAL. Indication: cough and fever. ASSISTANT:"],
                            trainer)
    return tok


def tiny_llava(out: Path, seed: int = 0, image_size: int = 32, hidden: int = 48) -> Path:
    """Save a random LlavaForConditionalGeneration (CLIP vision tower + Llama with grouped-query
    attention) with a byte-level BPE tokenizer and a CLIP image processor config to ``out``."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=8, projection_dim=hidden)
    text = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
                       pad_token_id=tok.token_to_id("<pad>"), initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                      image_seq_length=(image_size // 8) ** 2)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # words, not byte soup: embedding dimension 0 is a large constant that the residual
        # stream carries to the last layer, and the LM head reads it as "whole word" (+) or
        # "anything else" (-); the rest of the logit stays random and input-dependent
        import re

        model.model.language_model.embed_tokens.weight[:, 0] = 8.0
        head = model.lm_head.weight
        head.mul_(3.0)  # a few words clearly preferred: no argmax near-ties
        vocab = tok.get_vocab()
        for t, i in vocab.items():
            head[i, 0] = 2.0 if re.fullmatch(r"\u0120[a-z]{3,}|\.", t) else -2.0
        head[tok.token_to_id("</s>")] *= 0.0
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=[0.48, 0.46, 0.41], image_std=[0.27, 0.26, 0.28]).save_pretrained(out)
    (out / "README.md").write_text(README, encoding="utf-8")
    return out
