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

Everything that depends on the architecture (norm type, frozen scales,
attention OV maps, biases, skip connections) lives in this module, in the
small methods of :class:`LinearisedModel`; attribution (``attribution.py``)
only calls them. Stages follow ``context.py``: ``2l`` = ``resid_pre`` of layer
``l``, ``2l + 1`` = ``resid_mid``, ``2 n_layers`` = the final residual stream.
"""
from __future__ import annotations

import torch

from .context import PromptContext, transcoder_reads_ln2

__all__ = ["LinearisedModel"]


def _centre(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm's mean subtraction, which is its own transpose."""
    return x - x.mean(dim=-1, keepdim=True)


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
        # Per-position constant written by attention l: b_O + Σ_h b_V[h] W_O[h]
        # (each frozen pattern row sums to one).
        self.attn_bias = put(w.b_O.double() + torch.einsum("lhe,lhed->ld", w.b_V.double(), w.W_O.double()))
        self.skip: dict[int, tuple[torch.Tensor, bool]] = {}
        for l in ctx.transcoders.layers:
            tc = ctx.transcoders[l]
            if tc.W_skip is not None:
                self.skip[l] = (put(tc.W_skip), transcoder_reads_ln2(tc, l))

    # -- reading directions (forward side) ------------------------------------------------
    def mlp_input_reading(self, layer: int, pos: torch.Tensor, vectors: torch.Tensor,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """[n, d] directions read at MLP ``layer``'s transcoder input (after the
        frozen ``ln2``, if the transcoder reads it) → the same readings as
        directions in the raw residual stream at stage ``2 layer + 1``."""
        tc = self.ctx.transcoders[layer]
        vectors = vectors.to(device=self.device, dtype=dtype or self.dtype)
        if transcoder_reads_ln2(tc, layer):
            scale = self.ctx.ln2_scale[layer].to(device=self.device, dtype=vectors.dtype)
            return _centre(vectors) / scale[pos][:, None]
        return vectors

    # -- transposed maps (backward side) --------------------------------------------------
    def attention_backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """g [B, P, d] at stage ``2 layer + 1`` → what attention ``layer``
        adds to the gradient at stage ``2 layer`` (its input, through the frozen ``ln1``)."""
        B, P, d = g.shape
        H, dh = self.n_heads, self.d_head
        z = (g.reshape(B * P, d) @ self.W_O[layer].T).reshape(B, P, H, dh)       # d(out)/d(z) per head
        pattern = self.pattern[layer, :, :P, :P]                                 # [H, dst, src]
        y = torch.einsum("hts,bthe->bshe", pattern, z)                           # [B, src, H, dh]
        x = (y.reshape(B * P, H * dh) @ self.W_V[layer].T).reshape(B, P, d)      # through W_V
        return _centre(x) / self.ln1_scale[layer, :P][None, :, None]

    def mlp_backward(self, layer: int, g: torch.Tensor) -> torch.Tensor | None:
        """g [B, P, d] at stage ``2 layer + 2`` → what MLP ``layer`` adds to the
        gradient at stage ``2 layer + 1``: only a skip connection passes
        anything (features and errors are fixed writes); None when nothing does."""
        if layer not in self.skip:
            return None
        W_skip, reads_ln2 = self.skip[layer]
        x = g @ W_skip.T                                                         # [B, P, d_in]
        if reads_ln2:
            return _centre(x) / self.ln2_scale[layer, :g.shape[1]][None, :, None]
        return x

    def backward(self, stage_from: int, stage_to: int, g: torch.Tensor) -> torch.Tensor:
        """One stage down: the gradient at ``stage_to = stage_from - 1``."""
        assert stage_to == stage_from - 1
        layer = stage_to // 2
        if stage_to % 2 == 1:            # resid_post(l) = resid_mid(l) + mlp_l
            extra = self.mlp_backward(layer, g)
        else:                            # resid_mid(l) = resid_pre(l) + attn_l
            extra = self.attention_backward(layer, g)
        return g if extra is None else g + extra
