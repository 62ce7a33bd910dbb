"""The report tokenizer: a word-level HF ``tokenizers`` model trained on training reports.

Text is lower-cased and split into words and punctuation; words seen fewer than
``min_frequency`` times in the training reports map to ``[UNK]``. Special tokens:
``[PAD]`` (0), ``[BOS]``, ``[EOS]``, ``[SEP]`` (between findings and impression), ``[UNK]``,
``[NONE]`` (stands for an empty indication).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[SEP]", "[UNK]", "[NONE]")


def build_tokenizer(texts: Iterable[str], min_frequency: int = 3) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def normalise_text(text: str) -> str:
    """Canonical form used for metrics: lower case, words and punctuation separated by spaces."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def join_words(words: Sequence[str]) -> str:
    """Word-level tokens joined as written: no space before punctuation or after an opening
    bracket, hyphen or slash (the case is left as it is)."""
    out = ""
    for w in words:
        if not out:
            out = w
        elif re.fullmatch(r"[.,;:!?)%]", w) or out.endswith(("(", "-", "/")) or w in ("-", "/"):
            out += w
        else:
            out += " " + w
    return out


def detokenize(words: Sequence[str]) -> str:
    """Join word-level tokens into readable text: no space before punctuation, capitalised
    sentences."""
    out = join_words(words)
    sentences = re.split(r"(?<=[.!?])\s+", out)
    return " ".join(s[:1].upper() + s[1:] for s in sentences if s)
