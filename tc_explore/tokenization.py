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


def unknown_pieces(tokenizer, text: str, ids: list[int] | None = None) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` maps to its unknown token.

    A word-level tokenizer such as the demo's maps every word outside its
    vocabulary to the unknown token (``<|endoftext|>`` for the demo, which is
    also BOS), so a prompt with a word it does not know silently reads as a
    different prompt. Byte-level BPE (GPT-2) never does; there the list is
    empty unless the text literally contains the unknown token, which does not
    count. ``ids`` (the text's ids without special tokens), when given, spares
    the work where no unknown token occurs at all."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    if ids is not None and unk not in ids:
        return []
    if not getattr(tokenizer, "is_fast", False):      # no offsets: compare decoded text
        ids = ids if ids is not None else tokenizer(text, add_special_tokens=False)["input_ids"]
        n_unknown = ids.count(unk) - text.count(str(tokenizer.unk_token))
        return [str(tokenizer.unk_token)] * max(0, n_unknown)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    unk_text = str(tokenizer.unk_token)
    return [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
            if i == unk and text[a:b].strip() != unk_text]


def unknown_warning(tokenizer, pieces: list[str], where: str) -> str:
    """The text of the warning for ``pieces`` that became the unknown token."""
    shown = sorted(set(p.strip() or p for p in pieces))
    more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
    return (f"{where}: {len(pieces)} piece(s) are not in the tokenizer's vocabulary and became "
            f"its unknown token {tokenizer.unk_token!r} (id {tokenizer.unk_token_id}): "
            f"{', '.join(repr(p) for p in shown[:8])}{more}. The model reads that token instead "
            "of the words; use words the tokenizer knows (for the demo model, those of its "
            "synthetic corpus: `tc_explore.demo.SyntheticSentences(0).sentence()` shows some).")
