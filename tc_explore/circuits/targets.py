"""Targets to decompose: a transcoder feature's pre-activation, a logit
direction or difference, or any direction of the residual stream at a site.
Each is a ``Target``: ``direction · resid[stage, token] + offset``."""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch

from ..errors import InvalidInputError, TokenizationWarning, as_integer
from ..model import single_token_id
from .context import PromptContext, stage_name, stage_of
from .contributions import Node, Target, encoder_reading

__all__ = ["feature_target", "logit_diff_target", "logit_direction_target", "residual_target",
           "RESIDUAL_SITES"]


def feature_target(ctx: PromptContext, layer: int, feature: int, token: int = -1) -> Target:
    """A transcoder feature's pre-activation at (layer, token)."""
    layer = ctx.check_layer(layer)
    if not ctx.has_transcoder(layer):
        raise InvalidInputError(f"Layer {layer} has no transcoder in set "
                                f"{ctx.transcoders.name!r}; its layers are {ctx.transcoders.layers}.")
    feature = ctx.transcoders.check_feature(layer, feature)
    token = ctx.check_token(token)
    direction, offset = encoder_reading(ctx, layer, feature, token)
    value = float(ctx.feature_pre(layer, token)[feature])
    node = Node("feature", layer=layer, index=feature, token=token)
    return Target(node, 2 * layer + 1, token, direction, offset, value,
                  label=f"pre-activation L{layer}F{feature}@{token}")


def _token_ids(ctx: PromptContext, tokens: int | str | Sequence[int | str],
               position: int | None = None) -> list[int]:
    """Token ids of ``tokens`` (ids, or strings that are one token each). With
    ``position``, a string whose twin with the leading space toggled (``" 90"``
    / ``"90"``) is far more probable there draws a ``TokenizationWarning``:
    the two are different tokens, and the one written is likely not the one meant."""
    if isinstance(tokens, (int, str)) or getattr(tokens, "ndim", None) == 0 or not isinstance(tokens, Iterable):
        tokens = [tokens]
    ids = []
    d_vocab = ctx.weights.W_U.shape[1]
    for tok in tokens:
        if isinstance(tok, str):
            text, tok = tok, single_token_id(ctx.model, tok)
            if position is not None:
                _warn_if_twin_predicted(ctx, text, tok, position)
        tok = as_integer(tok, "token id")
        if not 0 <= tok < d_vocab:
            raise InvalidInputError(f"token id {tok} is out of range (0..{d_vocab - 1}).")
        ids.append(tok)
    if not ids:
        raise InvalidInputError("Give at least one token for each side of a logit difference.")
    return ids


def _warn_if_twin_predicted(ctx: PromptContext, text: str, token_id: int, position: int) -> None:
    twin = text[1:] if text.startswith(" ") else " " + text
    try:
        twin_id = single_token_id(ctx.model, twin)
    except InvalidInputError:
        return
    # The model's own next-token distribution at ``position``, from the frozen final norm.
    arch, norm = ctx.arch, ctx.arch.ln_final
    x = ctx.resid[ctx.final_stage, position]
    normed = arch.centre(x) / ctx.final_scale[position] * norm.gain.to(x) + norm.bias.to(x)
    logits = normed @ ctx.weights.W_U.to(x)
    if ctx.weights.b_U is not None:
        logits = logits + ctx.weights.b_U.to(x)
    if arch.logit_softcap:
        logits = arch.logit_softcap * torch.tanh(logits / arch.logit_softcap)
    probs = torch.softmax(logits, -1)
    p_text, p_twin = float(probs[token_id]), float(probs[twin_id])
    if p_twin >= 0.01 and p_twin >= 10 * p_text:
        warnings.warn(
            f"Target token {text!r} (id {token_id}) has probability {p_text:.2g} at position "
            f"{position}, where {twin!r} (id {twin_id}, the same text with the leading space "
            f"{'removed' if text.startswith(' ') else 'added'}) has {p_twin:.2g}. They are "
            f"different tokens; pass {twin!r} if that is the one you meant.",
            TokenizationWarning, stacklevel=4)


def logit_direction_target(ctx: PromptContext, positive: int | str | Sequence[int | str],
                           negative: int | str | Sequence[int | str] | None = None,
                           token: int = -1, label: str | None = None) -> Target:
    """mean logit of ``positive`` tokens − mean logit of ``negative`` tokens at
    ``token`` (through the frozen ln_final scale and W_U). ``'40' − '20'`` is
    ``logit_direction_target(ctx, "40", "20")``; greater-than's YY+ vs YY−
    direction takes the year tokens above and at-or-below YY."""
    token = ctx.check_token(token)
    pos_ids = _token_ids(ctx, positive, token)
    neg_ids = _token_ids(ctx, negative, token) if negative is not None else []
    if sorted(set(pos_ids)) == sorted(set(neg_ids)):
        raise InvalidInputError(f"positive and negative are the same token(s) {pos_ids}: their logit "
                                "difference is 0 for every input. Pick different tokens.")
    W_U, b_U = ctx.weights.W_U, ctx.weights.b_U
    u = W_U[:, pos_ids].double().mean(1) - (W_U[:, neg_ids].double().mean(1) if neg_ids else 0)
    offset = float(b_U[pos_ids].double().mean() - (b_U[neg_ids].double().mean() if neg_ids else 0))
    # Logits before any final softcap (Gemma 2 caps logits with cap·tanh(x/cap),
    # which is not linear): the target is the raw logit, ``unembed.hook_out``.
    direction, ln_offset = ctx.arch.read_norm_out(ctx.arch.ln_final, u, ctx.final_scale[token])
    offset += ln_offset
    node = Node("logit", index=pos_ids[0], token=token)
    resid = ctx.resid[ctx.final_stage, token]
    value = float(direction @ resid) + offset
    if label is None:
        show = lambda ids: "+".join(repr(ctx.model.tokenizer.decode([i])) for i in ids[:3]) + \
            ("…" if len(ids) > 3 else "")  # noqa: E731
        label = f"logit {show(pos_ids)}" + (f" − {show(neg_ids)}" if neg_ids else "") + f"@{token}"
    return Target(node, ctx.final_stage, token, direction, offset, value, label=label,
                  logit_tokens=(tuple(pos_ids), tuple(neg_ids)))


def logit_diff_target(ctx: PromptContext, positive: int | str, negative: int | str,
                      token: int = -1) -> Target:
    """logit[positive] − logit[negative] at ``token`` (default the last)."""
    return logit_direction_target(ctx, [positive], [negative], token)


RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "ln1", "ln2", "ln_final")


def residual_target(ctx: PromptContext, vector: torch.Tensor, layer: int, site: str = "resid_pre",
                    token: int = -1, label: str | None = None) -> Target:
    """``vector · activation`` at (layer, site, token). Sites: raw residual
    ``resid_pre`` / ``resid_mid`` / ``resid_post`` of ``layer``, or the
    normalised inputs ``ln1`` (attention ``layer``), ``ln2`` (MLP ``layer``),
    ``ln_final`` (unembedding; ``layer`` ignored) through their frozen scales."""
    layer = ctx.check_layer(layer)
    token = ctx.check_token(token)
    if getattr(vector, "dtype", None) is not None and (getattr(vector.dtype, "is_complex", False)
                                                       or str(vector.dtype).startswith("complex")):
        raise InvalidInputError(f"vector must hold real numbers, got dtype {vector.dtype}.")
    try:
        vector = torch.as_tensor(vector, dtype=ctx.resid.dtype, device=ctx.resid.device).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(f"vector must be a [d_model] tensor or list of numbers, got "
                                f"{type(vector).__name__} {vector!r:.60}.") from None
    if not bool(torch.isfinite(vector).all()):
        raise InvalidInputError(
            f"vector holds {int((~torch.isfinite(vector)).sum())} NaN or infinite values; a "
            "target direction must be finite.")
    if vector.shape[0] != ctx.resid.shape[-1]:
        raise InvalidInputError(f"vector has size {vector.shape[0]}, the model's d_model is "
                                f"{ctx.resid.shape[-1]}.")
    if site in ("resid_pre", "resid_mid", "resid_post"):
        stage, direction = stage_of(layer, site), vector
    elif site == "ln1":
        stage, direction = 2 * layer, ctx.arch.read_normalized(vector, ctx.ln1_scale[layer, token])
    elif site == "ln2":
        stage, direction = 2 * layer + 1, ctx.arch.read_normalized(vector, ctx.ln2_scale[layer, token])
    elif site == "ln_final":
        stage, direction = ctx.final_stage, ctx.arch.read_normalized(vector, ctx.final_scale[token])
    else:
        raise InvalidInputError(f"site must be one of {RESIDUAL_SITES}, got {site!r}.")
    value = float(direction @ ctx.resid[stage, token])
    node = Node("direction", layer=layer, token=token)
    return Target(node, stage, token, direction, 0.0, value,
                  label=label or f"direction @ {site} L{layer} ({stage_name(stage, ctx.n_layers)})@{token}")
