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

Through transcoders (Dunefsky et al. 2024, §4.3), the same module traces the
"year > YY" direction (``trace_greater_than``), measures the probability
difference as features are kept (``feature_count_curve``) and profiles features
over the 100 year tokens by logit lens and de-embedding (``year_profile``).
The traced direction: at the last position, **mean logit of the year tokens
greater than YY minus mean logit of the year tokens at or below YY** (``YY+``
vs ``YY−``), i.e. the unembedding direction ``mean W_U[:, y > YY] − mean
W_U[:, y ≤ YY]`` read through the frozen final LayerNorm scale. It is the
linear counterpart of the probability difference (which is not linear in the
residual stream).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import pandas as pd
import torch

from ..circuits.context import PromptContext, prompt_context
from ..circuits.contributions import Target
from ..circuits.targets import logit_direction_target
from ..circuits.paths import Mode, PathSearchResult, find_paths
from ..errors import InvalidInputError, as_count, as_integer
from ..ablation import ablation_curve
from ..model import check_context, check_layer, hook_mlp_post, model_device, model_weights
from ..prompt_features import encode_layers
from ..replacement import transcoder_hooks

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
    n = as_count(n, "n")
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
    out = []
    for noun, yy in pairs:
        yy = as_integer(yy, "start_year")
        if not 0 <= yy <= 99:
            raise InvalidInputError(f"start_year is the year's last two digits (0..99), got {yy}.")
        out.append(_prompt(template, noun, yy, century))
    return out


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
        if not isinstance(p, GreaterThanPrompt):
            raise InvalidInputError(f"Expected GreaterThanPrompt objects (make_prompts, prompts_from_pairs), "
                                    f"got {type(p).__name__} {p!r:.60}.")
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

    top_k = None if top_k is None else as_count(top_k, "top_k")
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


def probability_difference_metric(model, start_year: int, position: int = -1) -> Callable[[torch.Tensor], float]:
    """The greater-than probability difference P(year > YY) − P(year ≤ YY) at
    ``position``, as a metric for :mod:`tc_explore.interventions`."""
    if isinstance(start_year, bool) or not isinstance(start_year, int) or not 0 <= start_year <= 99:
        raise InvalidInputError(f"start_year must be a two-digit year in 0..99, got {start_year!r}.")
    years = year_token_ids(model)

    def metric(logits: torch.Tensor) -> float:
        probs = year_probabilities(logits[position][None], years)
        return float(probability_difference_from_probs(probs, torch.tensor([start_year]))[0])
    metric.__name__ = f"probability difference (YY={start_year:02d})"
    return metric


# -- through transcoders ---------------------------------------------------------------
def greater_than_target(ctx: PromptContext, start_year: int, token: int = -1) -> Target:
    """The YY+ − YY− logit direction (see module docstring) at ``token``."""
    if isinstance(start_year, bool) or not isinstance(start_year, int) or not 0 <= start_year <= 98:
        raise InvalidInputError(f"start_year must be a two-digit year in 0..98 (some year must be "
                                f"greater), got {start_year!r}.")
    years = year_token_ids(ctx.model).tolist()
    return logit_direction_target(ctx, years[start_year + 1:], years[:start_year + 1], token,
                                  label=f"years > {start_year:02d} − years ≤ {start_year:02d}")


def trace_greater_than(model, transcoders, prompt: GreaterThanPrompt, iterations: int = 3,
                       branches: int = 15, mode: Mode = "raw",
                       exclude_kinds: Sequence[str] = ()) -> tuple[PromptContext, PathSearchResult, int]:
    """Trace the greater-than direction on one prompt. Returns (context,
    search result, position of the start year's token in the prompt)."""
    tp = tokenize_prompts(model, [prompt])
    ctx = prompt_context(model, transcoders, tp.tokens[0], prepend_bos=False)
    result = find_paths(ctx, greater_than_target(ctx, prompt.start_year), iterations, branches, mode,
                        exclude_kinds=exclude_kinds)
    return ctx, result, tp.year_positions[0]


@torch.no_grad()
def neuron_variance(model, prompts, layer: int, position: int = -1) -> torch.Tensor:
    """[d_mlp] variance across prompts of each MLP neuron's activation
    (``blocks.L.mlp.hook_post``) at ``position``."""
    tp = _as_tokenized(model, prompts)
    name = hook_mlp_post(check_layer(model, layer))
    _, cache = model.run_with_cache(tp.stacked().to(model_device(model)),
                                    names_filter=lambda n: n == name)
    return cache[name][:, position].float().var(0, unbiased=False).cpu()


def _neuron_keep_hook(layer: int, keep: torch.Tensor, position: int | None):
    def fn(post, hook):
        mask = torch.zeros(post.shape[-1], dtype=post.dtype, device=post.device)
        mask[keep.to(post.device)] = 1.0
        if position is None:
            return post * mask
        post = post.clone()
        post[:, position] = post[:, position] * mask
        return post
    return hook_mlp_post(layer), fn


def _at_position_only(transcoders, layer: int, hooks: list, position: int | None) -> list:
    """Wrap replacement hooks so that they act at ``position`` only: the true
    MLP output is kept at every other position (``position=None``: hooks unchanged)."""
    if position is None:
        return list(hooks)
    name = transcoders.output_hook(layer)
    saved: dict[str, torch.Tensor] = {}

    def save(out, hook):
        saved["true"] = out
        return out

    def restore(out, hook):
        true = saved.pop("true").clone()
        true[:, position] = out[:, position]
        return true
    return [(name, save)] + list(hooks) + [(name, restore)]


Positions = Literal["ranked", "all"]


@torch.no_grad()
def feature_count_curve(model, transcoders, prompts, layer: int,
                        ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                        neurons: bool = True, position: int = -1,
                        positions: Positions = "ranked") -> pd.DataFrame:
    """The paper's probability difference against the number of units kept in
    one layer's MLP: ``transcoder`` — the MLP replaced by its transcoder with
    only the top-k features by activation variance across the prompts
    (the rest zero-ablated, no error term); ``neurons`` — the original MLP with
    only its top-k neurons by variance (the rest zero-ablated at ``hook_post``).

    Units are ranked by their variance at ``position`` (default the last
    token, where the end year is predicted). ``positions="ranked"`` (default)
    applies the replacement there only and leaves the MLP unchanged at every
    other token, so the curve measures the units the ranking looked at.
    ``positions="all"`` applies it at every token, as the paper's code does;
    that is harmless for GPT-2's MLP10 but wrong for an early MLP, whose output
    at the start-year token carries the year to later layers: the sparse
    features that encode it there have no variance at the last token, are
    ranked last and get dropped (dense neurons that vary at the last token fire
    there too and survive). On the demo model this alone reverses the paper's
    comparison.

    Columns: kind, k, prob_diff. Reference rows: kind ``original`` (the
    unchanged model) and ``full transcoder`` (every feature kept), with k the
    layer's number of features / neurons.
    """
    if positions not in ("ranked", "all"):
        raise InvalidInputError(f"positions must be 'ranked' or 'all', got {positions!r}.")
    tp = _as_tokenized(model, prompts)
    layer = transcoders.check_layer(layer)
    d_sae = transcoders.d_sae(layer)
    where = position if positions == "ranked" else None
    ranking = rank_features_by_variance(model, transcoders, tp, layers=[layer], position=position,
                                           top_k=None)
    order = torch.as_tensor(ranking.feature.tolist(), dtype=torch.long)

    def score(hooks):
        return probability_difference(model, tp, _at_position_only(transcoders, layer, hooks, where))

    rows = [dict(kind="original", k=d_sae, prob_diff=probability_difference(model, tp))]
    rows.append(dict(kind="full transcoder", k=d_sae,
                     prob_diff=score(transcoder_hooks(model, transcoders, [layer]))))
    kept = ablation_curve(model, transcoders, [(layer, f) for f in order.tolist()], score,
                          [min(int(k), d_sae) for k in ks], keep=True, kind="transcoder",
                          value_name="prob_diff")
    rows += kept.to_dict("records")
    if neurons:
        var = neuron_variance(model, tp, layer, position)
        n_order = torch.argsort(var, descending=True, stable=True)
        for k in ks:
            k = min(int(k), var.shape[0])
            hook = _neuron_keep_hook(layer, n_order[:k], where)
            rows.append(dict(kind="neurons", k=k, prob_diff=probability_difference(model, tp, [hook])))
    return pd.DataFrame(rows, columns=["kind", "k", "prob_diff"])


@torch.no_grad()
def year_profile(model, transcoders, features: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """For each (layer, feature): over the 100 year tokens "00".."99", the
    feature's logit lens ``W_dec[f] @ W_U[:, year]`` and its direct
    de-embedding score ``W_E[year] @ W_enc[:, f]`` (for upstream features: how
    much each start-year token excites it). Columns layer, feature, year,
    token_id, logit_lens, de_embedding."""
    years = year_token_ids(model)
    w = model_weights(model)
    W_U = w.W_U[:, years]                                 # [d_model, 100]
    W_E = w.W_E[years] * w.embed_scale                    # [100, d_model]
    frames = []
    for layer, f in features:
        transcoders.check_feature(layer, f)
        tc = transcoders[layer]
        lens = tc.W_dec[f] @ W_U.to(tc.dtype)             # [100]
        de = W_E.to(tc.dtype) @ tc.W_enc[:, f]            # [100]
        frames.append(pd.DataFrame(dict(layer=layer, feature=f, year=range(100),
                                        token_id=years.tolist(), logit_lens=lens.double().cpu().tolist(),
                                        de_embedding=de.double().cpu().tolist())))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["layer", "feature", "year", "token_id", "logit_lens", "de_embedding"])
