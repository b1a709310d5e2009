"""Forward passes with LayerNorm scales and attention patterns frozen at their
values on a prompt — the linear world in which the decomposition is exact.

Used to check contributions against brute force (remove one write, rerun,
compare), and by users who want to intervene under the same semantics.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..model import (HOOK_LN_FINAL_SCALE, hook_attn_pattern, hook_attn_v, hook_attn_z, hook_ln1_post_scale,
                     hook_ln1_scale, hook_ln2_post_scale, hook_ln2_scale, hook_mlp_out)
from .context import PromptContext

Hook = tuple[str, Callable]


def frozen_hooks(ctx: PromptContext, values: bool = False, mlps: bool = False) -> list[Hook]:
    """Hooks that overwrite every norm's ``hook_scale`` (``ln1``, ``ln2``,
    ``ln_final``, and Gemma 2's ``ln1_post`` / ``ln2_post``) and every
    ``attn.hook_pattern`` with the values cached on ``ctx``'s prompt.

    ``values`` also freezes every ``attn.hook_v`` and ``mlps`` every MLP
    output (at the transcoder's output hook, else ``hook_mlp_out``): with
    both, every write to the residual stream is fixed,
    so a change made by an extra hook reaches a target only directly — the
    setting in which a contribution is exactly the change its removal causes.
    """
    def put(value: torch.Tensor):
        def fn(act, hook):
            return value.to(act.dtype).reshape(act.shape[1:]).expand_as(act).clone()
        return fn

    hooks: list[Hook] = []
    for l in range(ctx.n_layers):
        hooks.append((hook_ln1_scale(l), put(ctx.ln1_scale[l][:, None])))
        hooks.append((hook_ln2_scale(l), put(ctx.ln2_scale[l][:, None])))
        hooks.append((hook_attn_pattern(l), put(ctx.pattern[l])))
        if ctx.ln1_post_scale is not None:
            hooks.append((hook_ln1_post_scale(l), put(ctx.ln1_post_scale[l][:, None])))
            hooks.append((hook_ln2_post_scale(l), put(ctx.ln2_post_scale[l][:, None])))
        if values:
            hooks.append((hook_attn_v(l), put(ctx.v_cache[l])))
        if mlps:
            hooks.append((_mlp_write_hook(ctx, l), put(ctx.mlp_target[l])))
    hooks.append((HOOK_LN_FINAL_SCALE, put(ctx.final_scale[:, None])))
    return hooks


def _mlp_write_hook(ctx: PromptContext, layer: int) -> str:
    return ctx.transcoders[layer].output_hook if layer in ctx.transcoders else hook_mlp_out(layer)


def remove_feature_write_hooks(ctx: PromptContext, layer: int, feature: int, token: int) -> list[Hook]:
    """Hooks that subtract feature ``feature`` of ``layer``'s decoder writes
    (activation × W_dec row) at ``token`` from every output hook it writes to:
    its own layer's for a per-layer transcoder, every later layer's too for a
    cross-layer transcoder."""
    tcs = ctx.transcoders
    a = ctx.feature_acts(layer)[token, feature]
    hooks = []
    for out_hook, rows in tcs.feature_writes(layer, [feature]):
        write = a * rows[0]                                                   # [d_model]

        def fn(out, hook, write=write):
            out = out.clone()
            out[:, token] -= write.to(out.dtype)
            return out
        hooks.append((out_hook, fn))
    return hooks


def remove_feature_write_hook(ctx: PromptContext, layer: int, feature: int, token: int) -> Hook:
    """A hook on the transcoder's output hook (``blocks.{layer}.hook_mlp_out``)
    that subtracts feature ``feature``'s decoder write (activation × W_dec row) at ``token``."""
    tc = ctx.transcoders[layer]
    write = ctx.feature_acts(layer)[token, feature] * tc.W_dec[feature]      # [d_model]

    def fn(out, hook):
        out = out.clone()
        out[:, token] -= write.to(out.dtype)
        return out
    return _mlp_write_hook(ctx, layer), fn


@torch.no_grad()
def run_frozen(ctx: PromptContext, extra_hooks: list[Hook] = (), names: set[str] | None = None,
               values: bool = False, mlps: bool = False):
    """Run the model on ``ctx``'s prompt with frozen scales and patterns (and
    values / MLP outputs, see :func:`frozen_hooks`) plus ``extra_hooks``, which
    run after the freezing hooks; returns (logits, cache of ``names``)."""
    names = set(names or ())
    # model.hooks(...) rather than run_with_cache(fwd_hooks=...): TransformerBridge's
    # run_with_cache does not apply fwd_hooks passed to it.
    with ctx.model.hooks(fwd_hooks=frozen_hooks(ctx, values, mlps) + list(extra_hooks)):
        return ctx.model.run_with_cache(ctx.tokens[None], names_filter=lambda n: n in names)


def remove_head_value_hook(ctx: PromptContext, layer: int, head: int, source: int) -> Hook:
    """A hook that removes what head ``head`` of ``layer`` moves from position
    ``source``: zeroes its value vector there (``attn.hook_v``), or, under
    grouped-query attention, where that value vector is shared with other
    query heads, subtracts ``pattern × value`` from this head's ``attn.hook_z``
    (exact with the patterns frozen)."""
    if ctx.arch.heads_per_kv == 1:
        def fn(v, hook):
            v = v.clone()
            v[:, source, head] = 0.0
            return v
        return hook_attn_v(layer), fn
    moved = ctx.pattern[layer, head, :, source, None] * ctx.v[layer, source, head]   # [pos_dst, d_head]

    def fn_z(z, hook):
        z = z.clone()
        z[:, :, head] -= moved.to(z.dtype)
        return z
    return hook_attn_z(layer), fn_z
