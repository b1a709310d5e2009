"""The prompt's local replacement model as explicit linear maps on the residual stream.

With attention patterns and every norm scale frozen at their values on the
prompt, and each MLP replaced by its transcoder (features and error fixed,
only a skip connection ``W_skip`` still reading its input), the residual
stream at every stage is an affine function of the writes into it. Attribution
needs the transpose of that map: for a reading direction at one (stage,
position), the gradient of the reading with respect to the residual stream at
every earlier stage and position. :class:`LinearisedModel` computes it for a
block of readings at once, walking the stages downwards:

* stage ``2l + 2`` → ``2l + 1`` (through MLP ``l``): identity, plus the skip
  connection's transpose ``centre(g W_skipᵀ) / ln2_scale`` where there is one;
* stage ``2l + 1`` → ``2l`` (through attention ``l``): identity, plus
  ``centre(Σ_h Σ_dst pattern[h, dst, src] · g[dst] W_O[h]ᵀ W_V[h]ᵀ) / ln1_scale[src]``.

That is GPT-2's block (processed weights: gains folded, LayerNorm centres).
On other blocks (:mod:`tc_explore.architecture`) ``centre`` is the identity
for RMSNorm, unfolded norm gains multiply (``ln1`` after ``W_Vᵀ``; ``ln2`` for
transcoders reading the norm's output), and Gemma 2's post-attention norm
maps ``g[dst]`` to ``gain ⊙ g[dst] / scale[dst]`` before ``W_Oᵀ`` (and
makes the attention bias a per-position constant). Grouped-query heads use
their key/value head's ``W_V`` (expanded per query head in ``ModelWeights``).

Everything that depends on the architecture (norm type, frozen scales,
attention OV maps, biases, skip connections) lives in this module, in the
small methods of :class:`LinearisedModel`; attribution (``attribution.py``)
only calls them. Stages follow ``context.py``: ``2l`` = ``resid_pre`` of layer
``l``, ``2l + 1`` = ``resid_mid``, ``2 n_layers`` = the final residual stream.
"""
from __future__ import annotations

import torch

from ..errors import IncompatibleTranscoderError
from .context import (INPUT_NORM_OUT, INPUT_NORMALIZED, INPUT_RESID, PromptContext,
                      transcoder_input_kind, transcoder_writes_before_post_norm)

__all__ = ["LinearisedModel"]


class LinearisedModel:
    """Frozen linear maps of one prompt, on ``device`` in ``dtype``.

    Shapes: ``B`` readings in a block, ``P`` positions, ``d`` = d_model.
    """

    def __init__(self, ctx: PromptContext, dtype: torch.dtype = torch.float32, device=None):
        self.ctx = ctx
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else ctx.resid.device
        w = ctx.weights
        put = lambda t: t.detach().to(device=self.device, dtype=dtype)  # noqa: E731
        L, H = ctx.n_layers, ctx.n_heads
        self.n_layers, self.n_pos, self.n_heads = L, ctx.n_pos, H
        d_head = w.W_O.shape[2]
        # [L, H*dh, d] and [L, d, H*dh]: one matmul per layer for all heads.
        self.W_O = put(w.W_O.reshape(L, H * d_head, -1))
        self.W_V = put(w.W_V.permute(0, 2, 1, 3).reshape(L, -1, H * d_head))
        self.d_head = d_head
        self.pattern = put(ctx.pattern)                       # [L, H, dst, src]
        self.ln1_scale = put(ctx.ln1_scale)                   # [L, P]
        self.ln2_scale = put(ctx.ln2_scale)                   # [L, P]
        self.final_scale = put(ctx.final_scale)               # [P]
        arch = self.arch = ctx.arch
        self.ln1_gain = put(torch.stack([n.gain for n in arch.ln1]))               # [L, d]
        self.ln2_gain = put(torch.stack([n.gain for n in arch.ln2]))               # [L, d]
        self.ln1_post_gain = None if ctx.ln1_post_scale is None else \
            put(torch.stack([n.gain for n in arch.ln1_post]))                     # [L, d]
        self.ln1_post_scale = None if ctx.ln1_post_scale is None else put(ctx.ln1_post_scale)
        # Per-position constant written by attention l: b_O + Σ_h b_V[h] W_O[h]
        # (each frozen pattern row sums to one), and ln1's bias carried through
        # the values; through Gemma 2's post-attention norm where there is one.
        ln1_bias = torch.stack([n.bias for n in arch.ln1]).to(w.W_V)               # [L, d]
        b_V = w.b_V.double() + torch.einsum("ld,lhde->lhe", ln1_bias.double(), w.W_V.double())
        bias = w.b_O.double() + torch.einsum("lhe,lhed->ld", b_V, w.W_O.double())  # [L, d]
        bias = bias[:, None, :].expand(L, ctx.n_pos, -1)                           # [L, P, d]
        if ctx.ln1_post_scale is not None:
            gain = torch.stack([n.gain for n in arch.ln1_post]).to(bias)
            bias = arch.centre(bias) * gain[:, None, :] / ctx.ln1_post_scale[..., None].to(bias)
        self.attn_bias = put(bias)
        self.skip: dict[int, tuple[torch.Tensor, str]] = {}
        for l in ctx.transcoders.layers:
            tc = ctx.transcoders[l]
            if transcoder_writes_before_post_norm(tc, l, arch):
                raise IncompatibleTranscoderError(
                    f"The transcoder of layer {l} writes {tc.output_hook!r}, before Gemma 2's "
                    "post-MLP norm; attribution graphs need transcoders writing hook_mlp_out "
                    "(the exact decomposition, decompose, handles both).")
            kind = transcoder_input_kind(tc, l)
            if kind == INPUT_NORM_OUT and float(arch.ln2[l].bias.abs().max()) > 0:
                raise IncompatibleTranscoderError(
                    f"Layer {l}'s transcoder reads the output of a norm with a bias; attribution "
                    "graphs support bias-free norms there (RMSNorm, or processed LayerNorm).")
            if tc.W_skip is not None:
                self.skip[l] = (put(tc.W_skip), kind)

    def _read_ln2(self, layer: int, kind: str, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Directions ``x`` on what the transcoder of ``layer`` reads → on the raw
        residual stream (the transpose of the frozen ln2, as its kind of input needs)."""
        if kind == INPUT_RESID:
            return x
        if kind == INPUT_NORMALIZED:
            return self.arch.centre(x) / scale
        return self.arch.centre(x * self.ln2_gain[layer].to(x.dtype)) / scale

    # -- reading directions (forward side) ------------------------------------------------
    def mlp_input_reading(self, layer: int, pos: torch.Tensor, vectors: torch.Tensor,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """[n, d] directions read at MLP ``layer``'s transcoder input (after the
        frozen ``ln2``, if the transcoder reads it) → the same readings as
        directions in the raw residual stream at stage ``2 layer + 1``."""
        kind = transcoder_input_kind(self.ctx.transcoders[layer], layer)
        vectors = vectors.to(device=self.device, dtype=dtype or self.dtype)
        scale = self.ctx.ln2_scale[layer].to(device=self.device, dtype=vectors.dtype)
        return self._read_ln2(layer, kind, vectors, scale[pos][:, None])

    # -- transposed maps (backward side) --------------------------------------------------
    def attention_backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """g [B, P, d] at stage ``2 layer + 1`` → what attention ``layer``
        adds to the gradient at stage ``2 layer`` (its input, through the frozen ``ln1``)."""
        B, P, d = g.shape
        H, dh = self.n_heads, self.d_head
        if self.ln1_post_gain is not None:                                       # Gemma 2's post-norm
            g = self.arch.centre(g * self.ln1_post_gain[layer]) / self.ln1_post_scale[layer, :P][None, :, None]
        z = (g.reshape(B * P, d) @ self.W_O[layer].T).reshape(B, P, H, dh)       # d(out)/d(z) per head
        pattern = self.pattern[layer, :, :P, :P]                                 # [H, dst, src]
        y = torch.einsum("hts,bthe->bshe", pattern, z)                           # [B, src, H, dh]
        x = (y.reshape(B * P, H * dh) @ self.W_V[layer].T).reshape(B, P, d)      # through W_V
        return self.arch.centre(x * self.ln1_gain[layer]) / self.ln1_scale[layer, :P][None, :, None]

    def mlp_backward(self, layer: int, g: torch.Tensor) -> torch.Tensor | None:
        """g [B, P, d] at stage ``2 layer + 2`` → what MLP ``layer`` adds to the
        gradient at stage ``2 layer + 1``: only a skip connection passes
        anything (features and errors are fixed writes); None when nothing does."""
        if layer not in self.skip:
            return None
        W_skip, kind = self.skip[layer]
        x = g @ W_skip.T                                                         # [B, P, d_in]
        return self._read_ln2(layer, kind, x, self.ln2_scale[layer, :g.shape[1]][None, :, None])

    def backward(self, stage_from: int, stage_to: int, g: torch.Tensor) -> torch.Tensor:
        """One stage down: the gradient at ``stage_to = stage_from - 1``."""
        assert stage_to == stage_from - 1
        layer = stage_to // 2
        if stage_to % 2 == 1:            # resid_post(l) = resid_mid(l) + mlp_l
            extra = self.mlp_backward(layer, g)
        else:                            # resid_mid(l) = resid_pre(l) + attn_l
            extra = self.attention_backward(layer, g)
        return g if extra is None else g + extra
