"""What the exact decomposition must know about a model's block, read off the
loaded model once: the kind of normalisation and every norm's gain and bias,
post-sublayer norms, the embedding scale, grouped-query attention, softcaps.

The block we decompose (TransformerLens hook names)::

    resid_pre ─ ln1 ─ attention ─ [ln1_post] ─┐
        └──────────────────────────────────── + ─ resid_mid ─ ln2 ─ MLP ─ [ln2_post] = hook_mlp_out ─┐
                                                   └──────────────────────────────────────────────── + ─ resid_post

A norm ``n(x) = gain ⊙ (x − [mean x]) / scale + bias`` is linear in ``x`` once
its ``scale`` (``hook_scale``) is frozen at its value on the prompt; LayerNorm
centres (``[mean x]``), RMSNorm does not. ``hook_normalized`` is
``(x − [mean x]) / scale`` (before gain and bias, as in TransformerLens),
``hook_out`` is the whole norm. GPT-2 is loaded with TransformerLens' weight
processing (gains folded into the next weights: gain 1, bias 0 here); the
RMSNorm models (Llama, Qwen 3, Gemma 2) are loaded unprocessed, as
circuit-tracer loads them for their published transcoders, so their gains
appear here (Gemma's ``1 + w`` included).

Attention-score and final-logit softcapping, QK-norm and rotary embeddings act
only on attention patterns (frozen in the decomposition) or after the logits
we read (a logit target is the logit *before* the final softcap).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

_ARCH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Norm:
    """One norm's affine part, float64 on the CPU-or-model device: ``gain`` [d_model], ``bias`` [d_model]."""
    gain: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class Architecture:
    name: str                       # e.g. "GPT2LMHeadModel", "Gemma2ForCausalLM"
    centred: bool                   # LayerNorm (centres) vs RMSNorm (does not)
    ln1: list[Norm]                 # per layer, before attention
    ln2: list[Norm]                 # per layer, before the MLP
    ln_final: Norm
    ln1_post: list[Norm] | None     # Gemma 2: after attention, before the residual add
    ln2_post: list[Norm] | None     # Gemma 2: after the MLP (hook_mlp_out is after it)
    embed_scale: float              # Gemma: sqrt(d_model); else 1
    n_heads: int
    n_kv_heads: int                 # < n_heads: grouped-query attention
    attn_softcap: float | None
    logit_softcap: float | None
    qk_norm: bool
    tied_embeddings: bool | None    # None where the model does not say

    @property
    def has_post_norms(self) -> bool:
        return self.ln1_post is not None

    @property
    def heads_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def centre(self, v: torch.Tensor) -> torch.Tensor:
        """LayerNorm's centring moved onto a reading direction, since
        (x - mean(x)) . w == x . (w - mean(w)); the identity for RMSNorm."""
        return v - v.mean(dim=-1, keepdim=True) if self.centred else v

    def read_normalized(self, u: torch.Tensor, scale) -> torch.Tensor:
        """Direction in the raw residual stream such that ``direction · x`` is
        ``u · hook_normalized`` (frozen ``scale``)."""
        return self.centre(u) / scale

    def read_norm_out(self, norm: Norm, u: torch.Tensor, scale) -> tuple[torch.Tensor, float]:
        """(direction, offset) with ``direction · x + offset == u · norm(x)``
        (the norm's ``hook_out``, gain and bias included, frozen ``scale``)."""
        return self.centre(norm.gain.to(u) * u) / scale, float(norm.bias.to(u) @ u)

    def through_post_norm(self, post: list[Norm] | None, layer: int, u: torch.Tensor, scale) -> torch.Tensor:
        """A reading direction ``u`` on the residual stream pulled back through a
        post-sublayer norm (frozen ``scale``) onto the sublayer's raw output;
        ``u`` itself where the block has no such norm. (Post-norm biases, which
        no supported model has, are refused when the architecture is read.)"""
        if post is None:
            return u
        return self.centre(post[layer].gain.to(u) * u) / scale


def _norm(module, d_model: int, uses_offset: bool) -> Norm:
    w = getattr(module, "w", None)
    if w is None:
        w = getattr(getattr(module, "original_component", None), "weight", None)
    gain = torch.ones(d_model, dtype=torch.float64) if w is None else \
        w.detach().double().cpu() + (1.0 if uses_offset else 0.0)
    b = getattr(module, "b", None)
    bias = torch.zeros(d_model, dtype=torch.float64) if b is None else b.detach().double().cpu()
    return Norm(gain.reshape(d_model), bias.reshape(d_model))


def _cap(value) -> float | None:
    return float(value) if value is not None and float(value) > 0 else None


@torch.no_grad()
def _embed_scale(model) -> float:
    """Ratio of what ``hook_embed`` writes to the embedding matrix rows
    (Gemma multiplies by sqrt(d_model)), measured on a few tokens."""
    embed = getattr(model, "embed", None)
    if embed is None:
        return 1.0
    ids = torch.arange(min(8, int(model.cfg.d_vocab)), device=model.W_E.device)[None]
    out = embed(ids)[0].double()
    rows = model.W_E[ids[0]].double()
    denom = float((rows * rows).sum())
    return float((out * rows).sum()) / denom if denom > 0 else 1.0


def architecture(model) -> Architecture:
    """The model's :class:`Architecture`, read once and cached per model object."""
    try:
        cached = _ARCH.get(model)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    cfg = model.cfg
    d, L = int(cfg.d_model), int(cfg.n_layers)
    norm_type = str(getattr(cfg, "normalization_type", "LN") or "LN")
    uses_offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    blocks = list(model.blocks)
    post = hasattr(blocks[0], "ln1_post")
    arch = Architecture(
        name=str(getattr(cfg, "architecture", None) or type(model).__name__),
        centred=norm_type.startswith("LN"),
        ln1=[_norm(b.ln1, d, uses_offset) for b in blocks],
        ln2=[_norm(b.ln2, d, uses_offset) for b in blocks],
        ln_final=_norm(model.ln_final, d, uses_offset),
        ln1_post=[_norm(b.ln1_post, d, uses_offset) for b in blocks] if post else None,
        ln2_post=[_norm(b.ln2_post, d, uses_offset) for b in blocks] if post else None,
        embed_scale=_embed_scale(model),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        attn_softcap=_cap(getattr(cfg, "attn_scores_soft_cap", None)),
        logit_softcap=_cap(getattr(cfg, "output_logits_soft_cap", None)),
        qk_norm=hasattr(blocks[0].attn, "q_norm"),
        tied_embeddings=getattr(cfg, "tie_word_embeddings", None),
    )
    if arch.has_post_norms:
        from .errors import IncompatibleTranscoderError
        if any(float(n.bias.abs().max()) > 0 for n in arch.ln1_post + arch.ln2_post):
            raise IncompatibleTranscoderError(
                "This model's post-sublayer norms have biases; the exact decomposition "
                "supports bias-free post-norms only (as in Gemma 2).")
    if L != len(arch.ln1):
        raise AssertionError("layer count mismatch")
    try:
        _ARCH[model] = arch
    except TypeError:
        pass
    return arch
