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

The block may be GPT-2's (LayerNorm, processed weights), Llama's or Qwen 3's
(RMSNorm, grouped-query attention; Qwen 3's QK-norm only shapes patterns) or
Gemma 2's (RMSNorm before *and after* attention and the MLP, scaled
embeddings, softcapping): what differs is read once by
:func:`tc_explore.architecture.architecture`, and every norm scale is frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..architecture import Architecture, architecture
from ..errors import IncompatibleTranscoderError, InvalidInputError, as_integer, refuse_non_finite
from ..model import (HOOK_EMBED, HOOK_LN_FINAL_SCALE, HOOK_POS_EMBED, ModelWeights, Prompt,
                     hook_attn_pattern, hook_attn_v, hook_ln1_post_scale, hook_ln1_scale,
                     hook_ln2_normalized, hook_ln2_out, hook_ln2_post_scale, hook_ln2_scale,
                     hook_mlp_block_out, hook_mlp_in, hook_mlp_out, hook_resid_mid, hook_resid_post,
                     hook_resid_pre, model_weights, to_tokens, token_strings)
from ..transcoder import Transcoder, TranscoderSet, as_transcoder_set


def stage_of(layer: int, site: str) -> int:
    """Residual stage index of ``site`` ("resid_pre" | "resid_mid" | "resid_post") of ``layer``."""
    offsets = {"resid_pre": 0, "resid_mid": 1, "resid_post": 2}
    if site not in offsets:
        raise InvalidInputError(f"site must be one of {sorted(offsets)}, got {site!r}.")
    return 2 * layer + offsets[site]


def stage_name(stage: int, n_layers: int) -> str:
    if stage == 2 * n_layers:
        return hook_resid_post(n_layers - 1)
    return hook_resid_pre(stage // 2) if stage % 2 == 0 else hook_resid_mid(stage // 2)


def centre(v: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over d_model: LayerNorm's centring moved onto the
    reading direction, since (x - mean(x)) . w == x . (w - mean(w)).
    (Architecture-aware code uses :meth:`Architecture.centre`, the identity
    for RMSNorm.)"""
    return v - v.mean(dim=-1, keepdim=True)


# What a transcoder of layer L may read, by hook: the norm's output without
# gain and bias, the norm's whole output (the MLP's true input), or the raw
# residual stream before the norm.
INPUT_NORMALIZED, INPUT_NORM_OUT, INPUT_RESID = "normalized", "norm_out", "resid"


def transcoder_input_kind(tc: Transcoder, layer: int) -> str:
    """How the transcoder of ``layer`` reads the residual stream (see the
    ``INPUT_*`` constants); a clear error for an input hook we cannot trace."""
    hook = tc.input_hook or hook_ln2_normalized(layer)
    kinds = {hook_ln2_normalized(layer): INPUT_NORMALIZED,
             hook_ln2_out(layer): INPUT_NORM_OUT,
             hook_mlp_in(layer): INPUT_NORM_OUT,
             hook_resid_mid(layer): INPUT_RESID}
    if hook not in kinds:
        raise IncompatibleTranscoderError(
            f"The transcoder of layer {layer} reads {hook!r}; circuit attribution supports "
            f"transcoders reading one of {sorted(kinds)}.")
    return kinds[hook]


def transcoder_reads_ln2(tc: Transcoder, layer: int) -> bool:
    """True if the transcoder reads after the MLP's norm (its frozen scale
    applies), False if it reads ``hook_resid_mid`` directly."""
    return transcoder_input_kind(tc, layer) != INPUT_RESID


def transcoder_writes_before_post_norm(tc: Transcoder, layer: int, arch: Architecture) -> bool:
    """True if the transcoder predicts the MLP's output before a post-MLP norm
    (``mlp.hook_out`` on Gemma 2), False if it predicts what the MLP adds to
    the residual stream (``hook_mlp_out``; on models without post-norms
    ``mlp.hook_out`` is the same activation)."""
    hook = tc.output_hook or hook_mlp_out(layer)
    if hook == hook_mlp_out(layer):
        return False
    if hook == hook_mlp_block_out(layer):
        return arch.has_post_norms
    raise IncompatibleTranscoderError(
        f"The transcoder of layer {layer} writes {hook!r}; circuit attribution supports "
        f"transcoders writing {hook_mlp_out(layer)!r} or {hook_mlp_block_out(layer)!r}.")


@dataclass
class PromptContext:
    """One prompt's cached forward pass and transcoder encodings.

    Build it with :func:`prompt_context`. Shapes: ``pos`` = prompt length,
    ``L`` = n_layers, ``H`` = n_heads.
    """
    model: Any
    transcoders: TranscoderSet
    weights: ModelWeights
    arch: Architecture
    tokens: torch.Tensor            # [pos] token ids
    token_strs: list[str]
    resid: torch.Tensor             # [2L+1, pos, d_model] residual stream at every stage
    embed: torch.Tensor             # [pos, d_model] hook_embed
    pos_embed: torch.Tensor         # [pos, d_model] hook_pos_embed (zeros for rotary models)
    ln1_scale: torch.Tensor         # [L, pos]
    ln2_scale: torch.Tensor         # [L, pos]
    final_scale: torch.Tensor       # [pos]
    pattern: torch.Tensor           # [L, H, pos_dst, pos_src]
    v: torch.Tensor                 # [L, pos, H, d_head] value vectors (incl. b_V), one per query head
    v_cache: torch.Tensor           # [L, pos, H_kv, d_head] attn.hook_v as the model computes it
    mlp_in: torch.Tensor            # [L, pos, d_model] what each transcoder reads (model dtype)
    mlp_out: torch.Tensor           # [L, pos, d_model] true MLP writes to the residual (hook_mlp_out)
    mlp_target: torch.Tensor        # [L, pos, d_model] what each transcoder predicts (its output hook)
    ln1_post_scale: torch.Tensor | None = None   # [L, pos] Gemma 2's post-attention norm
    ln2_post_scale: torch.Tensor | None = None   # [L, pos] Gemma 2's post-MLP norm
    # All tensors above except tokens and mlp_in are float64.
    cache_encodings: bool = True
    n_encodings: int = 0            # how many times a transcoder was run on this prompt
    # layer -> (feature activations [pos, d_sae], transcoder output [pos, d_model])
    _encodings: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _clt_out: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

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
        token = as_integer(token, "token position")
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
    def _encode(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        tc = self.transcoders[layer]
        x = self.mlp_in[layer].to(tc.dtype)
        acts = tc.encode(x)                       # [pos, d_sae]
        refuse_non_finite(acts, f"The layer-{layer} transcoder's feature activations on this prompt",
                          ("position",), {"position": self.token_strs})
        # A cross-layer transcoder's output at a layer needs every earlier
        # layer's features: it is assembled in transcoder_out.
        out = None if self.transcoders.is_cross_layer else tc.decode(acts, x)  # [pos, d_model]
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
        """[pos, d_model] transcoder output (reconstruction of the MLP output;
        for a cross-layer transcoder, the writes of every layer ≤ ``layer``)."""
        if not self.transcoders.is_cross_layer:
            return self._encoded(layer)[1]
        if layer not in self._clt_out:
            out = self.transcoders.output_bias(layer).expand(self.n_pos, -1)
            for s in self.transcoders.sources(layer):
                idx, rows = self.active_decoder_rows(s)
                acts = self.feature_acts(s).index_select(1, idx.to(self.feature_acts(s).device))
                out = out + acts.to(rows.dtype) @ rows[:, layer - s]               # [pos, d_model]
            self._clt_out[layer] = out
        return self._clt_out[layer]

    def active_decoder_rows(self, source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature ids [k], decoder rows [k, n_targets, d_model]) of the features
        of layer ``source`` active anywhere on the prompt, read once per prompt
        (for a CLT, only these rows of its decoders are ever read for a prompt)."""
        if source not in self._rows:
            idx = torch.nonzero(self.feature_acts(source).abs().sum(0) > 0).flatten()
            self._rows[source] = (idx, self.transcoders.decoder_rows(source, idx))
        return self._rows[source]

    def feature_decoder(self, source: int, feature: int) -> torch.Tensor:
        """[n_targets, d_model]: one feature's decoder rows, one per layer it writes to."""
        idx, rows = self.active_decoder_rows(source)
        hit = torch.nonzero(idx == feature).flatten()
        if hit.numel():
            return rows[int(hit[0])]
        return self.transcoders.decoder_rows(source, [feature])[0]

    def transcoder_error(self, layer: int) -> torch.Tensor:
        """[pos, d_model] true MLP output minus transcoder output (at the
        transcoder's output hook)."""
        return self.mlp_target[layer] - self.transcoder_out(layer).double()

    def logits_at(self, token: int) -> torch.Tensor:
        """[d_vocab] the model's logits at ``token`` (after any final softcap),
        from the cached final residual stream."""
        w, arch = self.weights, self.arch
        norm = arch.ln_final
        x = arch.centre(self.resid[self.final_stage, token]) / self.final_scale[token]
        x = x * norm.gain.to(x) + norm.bias.to(x)
        logits = x.to(w.W_U.dtype) @ w.W_U + w.b_U
        if arch.logit_softcap is not None:
            logits = arch.logit_softcap * torch.tanh(logits / arch.logit_softcap)
        return logits

    # -- reading directions through the frozen norms --------------------------------------
    def attn_write_reading(self, layer: int, token: int, v: torch.Tensor) -> torch.Tensor:
        """Direction on attention ``layer``'s raw output (heads + b_O) at
        ``token`` whose dot product is its write's ``· v`` (through Gemma 2's
        post-attention norm, scale frozen; ``v`` itself elsewhere)."""
        if self.ln1_post_scale is None:
            return v
        return self.arch.through_post_norm(self.arch.ln1_post, layer, v, self.ln1_post_scale[layer, token])

    def mlp_write_reading(self, layer: int, token: int, v: torch.Tensor) -> torch.Tensor:
        """Direction on the transcoder of ``layer``'s output at ``token`` whose
        dot product is its write's ``· v`` (through the post-MLP norm when
        the transcoder predicts the activation before it)."""
        if layer in self.transcoders and self.ln2_post_scale is not None and \
                transcoder_writes_before_post_norm(self.transcoders[layer], layer, self.arch):
            return self.arch.through_post_norm(self.arch.ln2_post, layer, v, self.ln2_post_scale[layer, token])
        return v

    def transcoder_input_reading(self, layer: int, token: int, u: torch.Tensor
                                 ) -> tuple[torch.Tensor, float]:
        """(direction, offset) on the residual stream at stage ``2*layer+1``
        such that ``direction · resid + offset == u · (what the transcoder of
        ``layer`` reads)`` at ``token``, the ln2 scale frozen."""
        kind = transcoder_input_kind(self.transcoders[layer], layer)
        if kind == INPUT_RESID:
            return u, 0.0
        scale = self.ln2_scale[layer, token]
        if kind == INPUT_NORMALIZED:
            return self.arch.read_normalized(u, scale), 0.0
        return self.arch.read_norm_out(self.arch.ln2[layer], u, scale)

    def head_input_reading(self, layer: int, source: int, u: torch.Tensor
                           ) -> tuple[torch.Tensor, float]:
        """(direction, offset) on the residual stream at stage ``2*layer``
        such that ``direction · resid + offset == u · ln1(resid)`` at ``source``."""
        return self.arch.read_norm_out(self.arch.ln1[layer], u, self.ln1_scale[layer, source])

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
    as_transcoder_set(transcoders).check_fits(model)
    tokens = to_tokens(model, prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise InvalidInputError(f"Attribution works on one prompt at a time, got a batch of "
                                f"{tokens.shape[0]}.")
    arch = architecture(model)
    L = int(model.cfg.n_layers)
    for layer in transcoders.layers:
        transcoder_input_kind(transcoders[layer], layer)
        transcoder_writes_before_post_norm(transcoders[layer], layer, arch)
    names = {HOOK_EMBED, HOOK_POS_EMBED, HOOK_LN_FINAL_SCALE, hook_resid_post(L - 1)}
    for l in range(L):
        names |= {hook_resid_pre(l), hook_resid_mid(l), hook_ln1_scale(l), hook_ln2_scale(l),
                  hook_attn_pattern(l), hook_attn_v(l), hook_mlp_out(l), hook_ln2_normalized(l)}
        if arch.has_post_norms:
            names |= {hook_ln1_post_scale(l), hook_ln2_post_scale(l)}
        if l in transcoders:
            names |= {transcoders[l].input_hook, transcoders[l].output_hook}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)

    # Cached activations are kept in float64: the decomposition sums many
    # terms that cancel (large transcoder errors), and conservation is checked to 1e-4.
    def stack(fn):
        return torch.stack([cache[fn(l)][0].detach() for l in range(L)]).double()

    resid = [cache[h][0] for l in range(L) for h in (hook_resid_pre(l), hook_resid_mid(l))]
    resid.append(cache[hook_resid_post(L - 1)][0])
    mlp_in = [cache[transcoders[l].input_hook if l in transcoders else hook_ln2_normalized(l)][0]
              for l in range(L)]
    mlp_target = [cache[transcoders[l].output_hook if l in transcoders else hook_mlp_out(l)][0]
                  for l in range(L)]
    embed = cache[HOOK_EMBED][0].detach().double()
    pos_embed = cache[HOOK_POS_EMBED][0].detach().double() if HOOK_POS_EMBED in cache \
        else torch.zeros_like(embed)                      # rotary models add no position vector
    v_cache = stack(hook_attn_v)                          # [L, pos, H_kv, d_head]
    v = v_cache.repeat_interleave(arch.heads_per_kv, dim=2) if arch.heads_per_kv > 1 else v_cache
    ctx = PromptContext(
        model=model, transcoders=transcoders, weights=model_weights(model), arch=arch,
        tokens=tokens[0], token_strs=token_strings(model, tokens[0]),
        resid=torch.stack(resid).detach().double(), embed=embed, pos_embed=pos_embed,
        ln1_scale=stack(hook_ln1_scale)[..., 0], ln2_scale=stack(hook_ln2_scale)[..., 0],
        final_scale=cache[HOOK_LN_FINAL_SCALE][0, :, 0].detach().double(),
        pattern=stack(hook_attn_pattern), v=v, v_cache=v_cache,
        mlp_in=torch.stack(mlp_in).detach(),  # model dtype: exactly what the transcoder reads
        mlp_out=stack(hook_mlp_out), mlp_target=torch.stack(mlp_target).detach().double(),
        ln1_post_scale=stack(hook_ln1_post_scale)[..., 0] if arch.has_post_norms else None,
        ln2_post_scale=stack(hook_ln2_post_scale)[..., 0] if arch.has_post_norms else None,
        cache_encodings=cache_encodings)
    _refuse_non_finite_context(ctx)
    if encode_now and cache_encodings:
        for layer in transcoders.layers:
            ctx.feature_acts(layer)
    return ctx


def _refuse_non_finite_context(ctx: PromptContext) -> None:
    """NaN or infinity anywhere in the cached pass would turn every
    contribution, path and graph edge into NaN without an error: refused,
    naming the first hook and token where it appears."""
    L, where = ctx.n_layers, {"position": ctx.token_strs}
    for stage in range(2 * L + 1):
        refuse_non_finite(ctx.resid[stage], f"The residual stream at {stage_name(stage, L)} on this prompt",
                          ("position",), where)
    for layer in range(L):
        refuse_non_finite(ctx.mlp_in[layer], f"The layer-{layer} MLP input on this prompt", ("position",), where)
        refuse_non_finite(ctx.mlp_target[layer], f"The layer-{layer} MLP output on this prompt",
                          ("position",), where)
