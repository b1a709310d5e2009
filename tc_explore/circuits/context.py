"""Everything the exact decomposition needs from one prompt, computed once.

A :class:`PromptContext` runs the model once with ``run_with_cache``, keeps the
frozen quantities (LayerNorm scales, attention patterns, value vectors), the
true MLP outputs, and each layer's transcoder encoding of the MLP input. Every
decomposition, path search and graph built for that prompt reuses it, so no
step of a trace reruns the model or re-encodes a transcoder.

Residual "stages" index the points of the residual stream in order:
``stage 2*L`` is ``blocks.L.hook_resid_pre`` (read by attention L through
``ln1``), ``stage 2*L + 1`` is ``blocks.L.hook_resid_mid`` (read by MLP L and
its transcoder through ``ln2``), and ``stage 2*n_layers`` is the final residual
stream (read by the unembedding through ``ln_final``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import IncompatibleTranscoderError, InvalidInputError
from ..model import (HOOK_LN_FINAL_SCALE, ModelWeights, Prompt, hook_attn_pattern, hook_attn_v, hook_ln1_scale,
                     hook_ln2_normalized, hook_ln2_scale, hook_mlp_out, hook_resid_mid,
                     hook_resid_pre, model_weights, to_tokens, token_strings)
from ..transcoder import Transcoder, TranscoderSet


def stage_of(layer: int, site: str) -> int:
    """Residual stage index of ``site`` ("resid_pre" | "resid_mid" | "resid_post") of ``layer``."""
    offsets = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}
    if site not in offsets:
        raise InvalidInputError(f"site must be one of {sorted(offsets)}, got {site!r}.")
    return 2 * layer + offsets[site]


def stage_name(stage: int, n_layers: int) -> str:
    if stage == 2 * n_layers:
        return f"blocks.{n_layers - 1}.hook_resid_post"
    return hook_resid_pre(stage // 2) if stage % 2 == 0 else hook_resid_mid(stage // 2)


def centre(v: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over d_model: LayerNorm's centring moved onto the
    reading direction, since (x - mean(x)) . w == x . (w - mean(w))."""
    return v - v.mean(dim=-1, keepdim=True)


def transcoder_reads_ln2(tc: Transcoder, layer: int) -> bool:
    """True if the transcoder reads the LayerNorm output (frozen scale and
    centring apply), False if it reads ``hook_resid_mid`` directly."""
    hook = tc.input_hook or hook_ln2_normalized(layer)
    if hook in (hook_ln2_normalized(layer), f"blocks.{layer}.mlp.hook_in"):
        return True
    if hook == hook_resid_mid(layer):
        return False
    raise IncompatibleTranscoderError(
        f"The transcoder of layer {layer} reads {hook!r}; circuit attribution supports "
        f"transcoders reading {hook_ln2_normalized(layer)!r} or {hook_resid_mid(layer)!r}.")


@dataclass
class PromptContext:
    """One prompt's cached forward pass and transcoder encodings.

    Build it with :func:`prompt_context`. Shapes: ``pos`` = prompt length,
    ``L`` = n_layers, ``H`` = n_heads.
    """
    model: Any
    transcoders: TranscoderSet
    weights: ModelWeights
    tokens: torch.Tensor            # [pos] token ids
    token_strs: list[str]
    resid: torch.Tensor             # [2L+1, pos, d_model] residual stream at every stage
    embed: torch.Tensor             # [pos, d_model] hook_embed
    pos_embed: torch.Tensor         # [pos, d_model] hook_pos_embed
    ln1_scale: torch.Tensor         # [L, pos]
    ln2_scale: torch.Tensor         # [L, pos]
    final_scale: torch.Tensor       # [pos]
    pattern: torch.Tensor           # [L, H, pos_dst, pos_src]
    v: torch.Tensor                 # [L, pos, H, d_head] value vectors (incl. b_V)
    mlp_in: torch.Tensor            # [L, pos, d_model] what each transcoder reads (model dtype)
    mlp_out: torch.Tensor           # [L, pos, d_model] true MLP outputs
    # All tensors above except tokens and mlp_in are float64.
    cache_encodings: bool = True
    n_encodings: int = 0            # how many times a transcoder was run on this prompt
    # layer -> (feature activations [pos, d_sae], transcoder output [pos, d_model])
    _encodings: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    # -- facts -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.pattern.shape[0]

    @property
    def n_heads(self) -> int:
        return self.pattern.shape[1]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[0]

    @property
    def final_stage(self) -> int:
        return 2 * self.n_layers

    def check_token(self, token: int) -> int:
        """Validate a token position (negative counts from the end)."""
        if isinstance(token, bool) or not isinstance(token, int):
            try:
                token = int(token)
            except (TypeError, ValueError):
                raise InvalidInputError(f"token position must be an integer, got {token!r}.") from None
        if not -self.n_pos <= token < self.n_pos:
            raise InvalidInputError(
                f"token position {token} is out of range: the prompt has {self.n_pos} tokens "
                f"(0..{self.n_pos - 1}).")
        return token % self.n_pos

    def check_layer(self, layer: int) -> int:
        from ..model import check_layer
        return check_layer(self.n_layers, layer)

    def has_transcoder(self, layer: int) -> bool:
        return layer in self.transcoders

    # -- transcoder encodings, once per prompt ------------------------------------------
    @torch.no_grad()
    def _encode(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        tc = self.transcoders[layer]
        x = self.mlp_in[layer].to(tc.dtype)
        acts = tc.encode(x)                       # [pos, d_sae]
        out = tc.decode(acts, x)                  # [pos, d_model]
        self.n_encodings += 1
        return acts, out

    def _encoded(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache_encodings:
            return self._encode(layer)
        if layer not in self._encodings:
            self._encodings[layer] = self._encode(layer)
        return self._encodings[layer]

    def feature_acts(self, layer: int) -> torch.Tensor:
        """[pos, d_sae] feature activations of ``layer``'s transcoder on the prompt."""
        return self._encoded(layer)[0]

    def transcoder_out(self, layer: int) -> torch.Tensor:
        """[pos, d_model] transcoder output (reconstruction of the MLP output)."""
        return self._encoded(layer)[1]

    def transcoder_error(self, layer: int) -> torch.Tensor:
        """[pos, d_model] true MLP output minus transcoder output."""
        return self.mlp_out[layer] - self.transcoder_out(layer).double()

    def feature_pre(self, layer: int, token: int) -> torch.Tensor:
        """[d_sae] pre-activations at one token (for checks and targets)."""
        tc = self.transcoders[layer]
        with torch.no_grad():
            return tc.pre_activation(self.mlp_in[layer, token])


@torch.no_grad()
def prompt_context(model, transcoders: TranscoderSet, prompt: Prompt, prepend_bos: bool = True,
                   cache_encodings: bool = True, encode_now: bool = True) -> PromptContext:
    """Run ``model`` once on ``prompt`` (a string or token ids) and cache what
    attribution needs. ``encode_now`` encodes every transcoder layer right away
    (else on first use); ``cache_encodings=False`` re-encodes at every use
    (only for measuring what the cache saves)."""
    transcoders.check_fits(model)
    tokens = to_tokens(model, prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise InvalidInputError(f"Attribution works on one prompt at a time, got a batch of "
                                f"{tokens.shape[0]}.")
    L = int(model.cfg.n_layers)
    for layer in transcoders.layers:
        transcoder_reads_ln2(transcoders[layer], layer)
    names = {"hook_embed", "hook_pos_embed", HOOK_LN_FINAL_SCALE, f"blocks.{L - 1}.hook_resid_post"}
    for l in range(L):
        names |= {hook_resid_pre(l), hook_resid_mid(l), hook_ln1_scale(l), hook_ln2_scale(l),
                  hook_attn_pattern(l), hook_attn_v(l), hook_mlp_out(l), hook_ln2_normalized(l)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)

    # Cached activations are kept in float64: the decomposition sums many
    # terms that cancel (large transcoder errors), and conservation is checked to 1e-4.
    def stack(fn):
        return torch.stack([cache[fn(l)][0].detach() for l in range(L)]).double()

    resid = [cache[h][0] for l in range(L) for h in (hook_resid_pre(l), hook_resid_mid(l))]
    resid.append(cache[f"blocks.{L - 1}.hook_resid_post"][0])
    mlp_in = []
    for l in range(L):
        reads_ln2 = l not in transcoders or transcoder_reads_ln2(transcoders[l], l)
        mlp_in.append(cache[hook_ln2_normalized(l) if reads_ln2 else hook_resid_mid(l)][0])
    ctx = PromptContext(
        model=model, transcoders=transcoders, weights=model_weights(model),
        tokens=tokens[0], token_strs=token_strings(model, tokens[0]),
        resid=torch.stack(resid).detach().double(),
        embed=cache["hook_embed"][0].detach().double(),
        pos_embed=cache["hook_pos_embed"][0].detach().double(),
        ln1_scale=stack(hook_ln1_scale)[..., 0], ln2_scale=stack(hook_ln2_scale)[..., 0],
        final_scale=cache[HOOK_LN_FINAL_SCALE][0, :, 0].detach().double(),
        pattern=stack(hook_attn_pattern), v=stack(hook_attn_v),
        mlp_in=torch.stack(mlp_in).detach(),  # model dtype: exactly what the transcoder reads
        mlp_out=stack(hook_mlp_out),
        cache_encodings=cache_encodings)
    if encode_now and cache_encodings:
        for layer in transcoders.layers:
            ctx.feature_acts(layer)
    return ctx
