"""A small word-level tokenizer in the conventions of GPT-2's tokenizer.

Words carry their leading space (``" war"``), numbers split into two-digit
tokens (``" 1735"`` -> ``" 17"``, ``"35"``) as GPT-2 splits years, and
``<|endoftext|>`` is BOS and EOS. Used by the demo model and the test fixtures;
it is saved with ``save_pretrained`` and loads with ``AutoTokenizer``.
"""
from __future__ import annotations

from typing import Iterable

BOS = "<|endoftext|>"
# A word with its leading space, a digit pair, a lone digit, punctuation, whitespace.
SPLIT_PATTERN = r" ?[A-Za-z]+| ?\d\d|\d| ?[^\sA-Za-z\d]+|\s+"


def vocabulary(words: Iterable[str]) -> list[str]:
    """BOS, then every word with and without a leading space, digit pairs and
    single digits (bare and spaced), and common punctuation — no duplicates."""
    vocab: list[str] = [BOS]
    seen = {BOS}

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)

    for i in range(100):
        add(f"{i:02d}")
    for i in range(100):
        add(f" {i:02d}")
    for i in range(10):
        add(str(i))
        add(f" {i}")
    for p in [".", ",", "!", "?", ":", ";", "'", '"', "-", "(", ")"]:
        add(p)
        add(" " + p)
    add(" ")
    add("\n")
    for w in words:
        w = w.strip()
        if w:
            add(w)
            add(" " + w)
    return vocab


def word_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over ``vocabulary(words)``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(words)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token=BOS, pad_token=BOS, model_max_length=10**6)
