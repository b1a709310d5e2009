"""The greater-than task (Hanna et al. 2023; used by Dunefsky et al. 2024).

Prompts such as ``"The war lasted from the year 1735 to the year 17"``: the
next token is a two-digit year, and a model that understands the sentence puts
its probability on years greater than the start year's last two digits (35).

The metric is the *probability difference*: for a prompt with start year YY,
``sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over the 100 two-digit year tokens
``"00"``..``"99"`` (probabilities from the softmax over the whole vocabulary),
averaged over prompts.

Everything works for any model whose tokenizer writes each two-digit year
``"00"``..``"99"`` as one token and splits ``" 1735"`` into ``" 17"``, ``"35"``
(GPT-2's tokenizer and the demo model's); other tokenizers get a clear error.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import InvalidInputError
from ..model import check_context, model_device
from ..prompt_features import encode_layers

TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"

# Event nouns, after the kind of list Hanna et al. used; single tokens for GPT-2
# (with a leading space) and words of the demo model's vocabulary.
NOUNS = ("war", "siege", "strike", "drought", "famine", "reign", "journey", "trial",
         "voyage", "dynasty", "campaign", "project", "treaty", "marriage", "revolution",
         "occupation", "rebellion", "expedition", "festival", "study", "crisis", "program",
         "boom", "plague")

DEFAULT_START_YEARS = tuple(range(2, 99))  # 02..98, as in the paper: both sides non-empty


@dataclass(frozen=True)
class GreaterThanPrompt:
    text: str
    noun: str
    start_year: int      # YY, 0..99
    century: int = 17


@dataclass
class TokenizedPrompts:
    """Prompts as token ids. ``tokens`` is a list (prompts may differ in length
    for tokenizers with multi-token nouns); ``year_positions[i]`` is the
    position of the start year's two-digit token in ``tokens[i]``."""
    prompts: list[GreaterThanPrompt]
    tokens: list[torch.Tensor]
    year_positions: list[int]

    @property
    def start_years(self) -> torch.Tensor:
        return torch.tensor([p.start_year for p in self.prompts], dtype=torch.long)

    def stacked(self) -> torch.Tensor:
        """All prompts as one [n, pos] tensor; they must share one length."""
        lengths = {t.shape[0] for t in self.tokens}
        if len(lengths) != 1:
            raise InvalidInputError(f"The prompts have different token lengths {sorted(lengths)}; "
                                    "use single-token nouns to stack them.")
        return torch.stack(self.tokens)

    def __len__(self) -> int:
        return len(self.prompts)


def _tokenizer(model_or_tokenizer):
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None and hasattr(model_or_tokenizer, "encode"):
        tok = model_or_tokenizer
    if tok is None:
        raise InvalidInputError(f"{type(model_or_tokenizer).__name__} has no tokenizer; pass a "
                                "model from load_model or a Hugging Face tokenizer.")
    return tok


def _encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def year_token_ids(model_or_tokenizer) -> torch.Tensor:
    """Token ids of the 100 two-digit years ``"00"``..``"99"`` (index = year)."""
    tok = _tokenizer(model_or_tokenizer)
    ids, bad = [], []
    for yy in range(100):
        text = f"{yy:02d}"
        enc = _encode(tok, text)
        if len(enc) != 1 or tok.decode(enc) != text:
            bad.append(text)
        else:
            ids.append(enc[0])
    if bad:
        raise InvalidInputError(
            f"This tokenizer does not write every two-digit year as one token ({len(bad)} of "
            f"100 are not, e.g. {bad[:5]}): the greater-than task needs a tokenizer like "
            "GPT-2's, where '00'..'99' are single tokens.")
    if len(set(ids)) != 100:
        raise InvalidInputError("This tokenizer maps different two-digit years to the same "
                                "token (unknown-token fallback?): it cannot run greater-than.")
    return torch.tensor(ids, dtype=torch.long)


def make_prompts(n: int = 100, seed: int = 0, nouns: Sequence[str] = NOUNS,
                 start_years: Iterable[int] = DEFAULT_START_YEARS, century: int = 17,
                 template: str = TEMPLATE) -> list[GreaterThanPrompt]:
    """``n`` prompts with nouns and start years drawn with a fixed seed. Start
    years are spread evenly: each appears ``n // len(start_years)`` or one more
    times."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}.")
    nouns = list(nouns)
    years = sorted(set(int(y) for y in start_years))
    if not nouns:
        raise InvalidInputError("nouns is empty.")
    if not years or years[0] < 0 or years[-1] > 99:
        raise InvalidInputError(f"start_years must be two-digit years in 0..99, got {years[:5]}...")
    if not 10 <= int(century) <= 99:
        raise InvalidInputError(f"century must be a two-digit number such as 17, got {century!r}.")
    for key in ("{noun}", "{yy", "{century}"):
        if key not in template:
            raise InvalidInputError(f"template must contain {key}...; got {template!r}.")
    if not template.endswith("{century}"):
        raise InvalidInputError("template must end with '{century}' (the model then predicts "
                                "the end year's two digits).")
    rng = random.Random(seed)
    chosen: list[int] = []
    while len(chosen) < n:
        block = years[:]
        rng.shuffle(block)
        chosen.extend(block)
    chosen = chosen[:n]
    return [_prompt(template, rng.choice(nouns), yy, century) for yy in chosen]


def _prompt(template: str, noun: str, yy: int, century: int) -> GreaterThanPrompt:
    return GreaterThanPrompt(template.format(noun=noun, yy=yy, century=century), noun, yy, century)


def prompts_from_pairs(pairs: Iterable[tuple[str, int]], century: int = 17,
                       template: str = TEMPLATE) -> list[GreaterThanPrompt]:
    """Prompts for given ``(noun, start_year)`` pairs."""
    return [_prompt(template, noun, int(yy), century) for noun, yy in pairs]


def tokenize_prompts(model, prompts: Sequence[GreaterThanPrompt]) -> TokenizedPrompts:
    """Token ids (with BOS) of each prompt, checked: every word known to the
    tokenizer, the start year one token, the prompt ending in the century
    token, and no prompt longer than the model's context."""
    if not prompts:
        raise InvalidInputError("No prompts given.")
    tok = _tokenizer(model)
    years = year_token_ids(model)
    tokens, positions = [], []
    for p in prompts:
        t = model.to_tokens(p.text, prepend_bos=True)[0].cpu()
        body = t[1:].tolist()
        if tok.decode(body) != p.text:
            raise InvalidInputError(
                f"The tokenizer does not reproduce {p.text!r} (it decodes to "
                f"{tok.decode(body)!r}): a word such as {p.noun!r} is unknown to it.")
        century_ids = _encode(tok, f" {p.century}")
        if len(century_ids) != 1 or body[-1] != century_ids[0]:
            raise InvalidInputError(
                f"{p.text!r} does not end in the single token ' {p.century}' for this tokenizer, "
                "so the next token is not the end year's two digits.")
        hits = [i + 1 for i, x in enumerate(body[:-1]) if x == int(years[p.start_year])]
        if not hits:
            raise InvalidInputError(
                f"In {p.text!r} the start year {p.century}{p.start_year:02d} is not split into "
                f"' {p.century}' + '{p.start_year:02d}' by this tokenizer; choose another start "
                "year (GPT-2 writes a few years as one token).")
        check_context(model, t.shape[0])
        tokens.append(t)
        positions.append(hits[-1])
    return TokenizedPrompts(list(prompts), tokens, positions)


def _as_tokenized(model, prompts) -> TokenizedPrompts:
    if isinstance(prompts, TokenizedPrompts):
        return prompts
    return tokenize_prompts(model, list(prompts))


def year_probabilities(logits: torch.Tensor, year_ids: torch.Tensor) -> torch.Tensor:
    """[n, d_vocab] final-position logits -> [n, 100] probabilities of the year
    tokens under the softmax over the whole vocabulary."""
    if logits.ndim != 2:
        raise InvalidInputError(f"logits must be [n, d_vocab], got {tuple(logits.shape)}.")
    probs = torch.softmax(logits.float(), dim=-1)
    return probs[:, year_ids.to(logits.device)]


def probability_difference_from_probs(year_probs: torch.Tensor,
                                      start_years: torch.Tensor) -> torch.Tensor:
    """Per prompt: P(year > YY) - P(year <= YY)."""
    start_years = torch.as_tensor(start_years, device=year_probs.device)
    if year_probs.ndim != 2 or year_probs.shape[1] != 100:
        raise InvalidInputError(f"year_probs must be [n, 100], got {tuple(year_probs.shape)}.")
    if start_years.shape != (year_probs.shape[0],):
        raise InvalidInputError(f"start_years must be [n] with n={year_probs.shape[0]}, got "
                                f"{tuple(start_years.shape)}.")
    greater = torch.arange(100, device=year_probs.device)[None, :] > start_years[:, None]
    return (year_probs * greater).sum(-1) - (year_probs * ~greater).sum(-1)


def final_logits(model, prompts, fwd_hooks: Sequence | None = None,
                 batch_size: int = 64) -> torch.Tensor:
    """Logits at each prompt's last position, [n, d_vocab], optionally with
    forward hooks (e.g. ``replacement.transcoder_hooks``)."""
    tp = _as_tokenized(model, prompts)
    out = [None] * len(tp)
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tp.tokens):
        by_length.setdefault(t.shape[0], []).append(i)
    with torch.no_grad():
        for idx in by_length.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                batch = torch.stack([tp.tokens[i] for i in chunk]).to(model_device(model))
                if fwd_hooks:
                    logits = model.run_with_hooks(batch, fwd_hooks=list(fwd_hooks))
                else:
                    logits = model(batch)
                for j, i in enumerate(chunk):
                    out[i] = logits[j, -1].float().cpu()
    return torch.stack(out)


def probability_difference(model, prompts, fwd_hooks: Sequence | None = None,
                           per_prompt: bool = False, batch_size: int = 64):
    """The mean probability difference over ``prompts`` (a list of
    GreaterThanPrompt or a TokenizedPrompts), or the per-prompt tensor."""
    tp = _as_tokenized(model, prompts)
    probs = year_probabilities(final_logits(model, tp, fwd_hooks, batch_size),
                               year_token_ids(model))
    diff = probability_difference_from_probs(probs, tp.start_years)
    return diff if per_prompt else float(diff.mean())


def feature_activations(model, transcoders, prompts, layers: Sequence[int] | None = None,
                        position: int = -1) -> dict[int, torch.Tensor]:
    """Transcoder feature activations at one position of each prompt (default
    the last, where the end year is predicted), on the original model:
    ``{layer: [n_prompts, d_sae]}``."""
    tp = _as_tokenized(model, prompts)
    transcoders.check_fits(model)
    layers = transcoders.select_layers(layers)
    rows: dict[int, list] = {l: [None] * len(tp) for l in layers}
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tp.tokens):
        if not -t.shape[0] <= position < t.shape[0]:
            raise InvalidInputError(f"position {position} is outside prompt {i} "
                                    f"({t.shape[0]} tokens).")
        by_length.setdefault(t.shape[0], []).append(i)
    for idx in by_length.values():
        batch = torch.stack([tp.tokens[i] for i in idx]).to(model_device(model))
        for l, acts in encode_layers(model, transcoders, batch, layers, position).items():
            for j, i in enumerate(idx):
                rows[l][i] = acts[j]
    return {l: torch.stack(r) for l, r in rows.items()}


def rank_features_by_variance(model, transcoders, prompts, layers: Sequence[int] | None = None,
                              position: int = -1, top_k: int | None = 20):
    """Features ranked, per layer, by the variance of their activation across
    the prompts (at ``position``, default the last). A pandas DataFrame with
    columns layer, rank, feature, variance, mean, max, frac_active; the
    ``top_k`` highest per layer (all with ``top_k=None``)."""
    import pandas as pd

    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidInputError(f"top_k must be a positive integer or None, got {top_k!r}.")
    acts = feature_activations(model, transcoders, prompts, layers, position)
    frames = []
    for layer, a in acts.items():
        var = a.var(0, unbiased=False)
        order = torch.argsort(var, descending=True, stable=True)
        if top_k is not None:
            order = order[:top_k]
        frames.append(pd.DataFrame({
            "layer": layer, "rank": range(len(order)), "feature": order.tolist(),
            "variance": var[order].tolist(), "mean": a.mean(0)[order].tolist(),
            "max": a.max(0).values[order].tolist(),
            "frac_active": (a > 0).float().mean(0)[order].tolist()}))
    return pd.concat(frames, ignore_index=True)
