"""Greater-than through transcoders (Dunefsky et al. 2024, §4.3): tracing the
"year > YY" direction, the probability difference as features are kept, and a
logit lens / de-embedding profile of features over the 100 year tokens.

Prompts, year tokens, the probability difference and the variance ranking of
features come from :mod:`tc_explore.tasks.greater_than`.

The traced direction: at the last position, **mean logit of the year tokens
greater than YY minus mean logit of the year tokens at or below YY** (``YY+``
vs ``YY−``), i.e. the unembedding direction ``mean W_U[:, y > YY] − mean
W_U[:, y ≤ YY]`` read through the frozen final LayerNorm scale. It is the
linear counterpart of the probability difference (which is not linear in the
residual stream).
"""
from __future__ import annotations

from typing import Literal, Sequence

import pandas as pd
import torch

from ..errors import InvalidInputError
from ..model import model_device, model_weights
from ..interventions import ablation_curve
from ..replacement import transcoder_hooks
from ..tasks import greater_than as gt
from .context import PromptContext, prompt_context
from .contributions import Target, logit_direction_target
from .paths import Mode, PathSearchResult, find_paths

__all__ = ["greater_than_target", "trace_greater_than", "feature_count_curve", "neuron_variance",
           "year_profile"]


def greater_than_target(ctx: PromptContext, start_year: int, token: int = -1) -> Target:
    """The YY+ − YY− logit direction (see module docstring) at ``token``."""
    if isinstance(start_year, bool) or not isinstance(start_year, int) or not 0 <= start_year <= 98:
        raise InvalidInputError(f"start_year must be a two-digit year in 0..98 (some year must be "
                                f"greater), got {start_year!r}.")
    years = gt.year_token_ids(ctx.model).tolist()
    return logit_direction_target(ctx, years[start_year + 1:], years[:start_year + 1], token,
                                  label=f"years > {start_year:02d} − years ≤ {start_year:02d}")


def trace_greater_than(model, transcoders, prompt: "gt.GreaterThanPrompt", iterations: int = 3,
                       branches: int = 15, mode: Mode = "raw",
                       exclude_kinds: Sequence[str] = ()) -> tuple[PromptContext, PathSearchResult, int]:
    """Trace the greater-than direction on one prompt. Returns (context,
    search result, position of the start year's token in the prompt)."""
    tp = gt.tokenize_prompts(model, [prompt])
    ctx = prompt_context(model, transcoders, tp.tokens[0], prepend_bos=False)
    result = find_paths(ctx, greater_than_target(ctx, prompt.start_year), iterations, branches, mode,
                        exclude_kinds=exclude_kinds)
    return ctx, result, tp.year_positions[0]


@torch.no_grad()
def neuron_variance(model, prompts, layer: int, position: int = -1) -> torch.Tensor:
    """[d_mlp] variance across prompts of each MLP neuron's activation
    (``blocks.L.mlp.hook_post``) at ``position``."""
    tp = gt._as_tokenized(model, prompts)
    name = f"blocks.{layer}.mlp.hook_post"
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
    return f"blocks.{layer}.mlp.hook_post", fn


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
    tp = gt._as_tokenized(model, prompts)
    layer = transcoders._check(layer)
    d_sae = transcoders.d_sae(layer)
    where = position if positions == "ranked" else None
    ranking = gt.rank_features_by_variance(model, transcoders, tp, layers=[layer], position=position,
                                           top_k=None)
    order = torch.as_tensor(ranking.feature.tolist(), dtype=torch.long)

    def score(hooks):
        return gt.probability_difference(model, tp, _at_position_only(transcoders, layer, hooks, where))

    rows = [dict(kind="original", k=d_sae, prob_diff=gt.probability_difference(model, tp))]
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
            rows.append(dict(kind="neurons", k=k, prob_diff=gt.probability_difference(model, tp, [hook])))
    return pd.DataFrame(rows, columns=["kind", "k", "prob_diff"])


@torch.no_grad()
def year_profile(model, transcoders, features: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """For each (layer, feature): over the 100 year tokens "00".."99", the
    feature's logit lens ``W_dec[f] @ W_U[:, year]`` and its direct
    de-embedding score ``W_E[year] @ W_enc[:, f]`` (for upstream features: how
    much each start-year token excites it). Columns layer, feature, year,
    token_id, logit_lens, de_embedding."""
    years = gt.year_token_ids(model)
    w = model_weights(model)
    W_U = w.W_U[:, years]                                 # [d_model, 100]
    W_E = w.W_E[years]                                    # [100, d_model]
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
