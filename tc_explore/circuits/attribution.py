"""Attribution graphs through transcoders (Ameisen et al. 2025, as circuit-tracer computes them).

In the prompt's local replacement model (``linear.py``: attention patterns
and norm scales frozen, each MLP replaced by its transcoder with its error
fixed) every target is an affine function of the writes into the residual
stream. The graph's nodes are those writes and the targets:

* ``feature``: every active transcoder feature at (layer, position ≥ 1);
  it writes ``activation × W_dec[f]`` (a cross-layer transcoder's feature:
  one such write into every MLP output from its layer on, so its edge sums
  them) and, as a target, reads its
  pre-activation minus ``b_enc`` along its encoder vector;
* ``error``: per (layer, position ≥ 1), true MLP output − transcoder output;
* ``embedding``: per position, the token embedding ``W_E[token]``;
* ``logit``: the most probable next tokens (reading the demeaned unembedding
  column at the final norm's output, last position), or custom targets.

The edge ``A[target, source]`` is the source's write dotted with the gradient
of the target's reading with respect to that write, so for every target
``Σ_s A[target, s] + C_target`` equals the target's value, where the constant
``C`` is what the target reads with every source removed: position
embeddings, attention and decoder biases, the BOS position's MLP outputs,
MLPs without a transcoder, and the reading's own offset. ``constants`` lists
``C`` and its split for every target row.

Computation: rows are computed in blocks of ``batch_size`` targets with the
explicit transposed maps of :class:`~.linear.LinearisedModel` (no autograd),
starting each block at its highest stage and stopping at its last position.
Storage is a dense float32 matrix: the ``n × n`` adjacency for a full graph
(``n`` = active features + errors + embeddings + targets), or, with
``max_feature_nodes``, the computed rows against every source; ``attribute``
refuses (with the size) a matrix over ``max_matrix_bytes`` rather than
exhausting memory.

One module (over 500 lines) because target selection, the blocked row loop
with its influence-ordered cap and the :class:`AttributionGraph` it fills
share one node order; the linear maps (``linear.py``), influence and
pruning (``influence.py``) and the file format (``graph_json.py``) live apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pandas as pd
import torch

from ..errors import InvalidInputError, as_count, as_flag, as_integer, as_number
from ..model import Prompt, as_device, as_dtype, single_token_id
from ..progress import progress_bar
from .context import INPUT_NORMALIZED, INPUT_RESID, PromptContext, prompt_context, transcoder_input_kind
from .contributions import Target
from .graph_json import MAX_JSON_LINKS
from .influence import (_block_rows, _influence_by_levels, _inverse_row_sums, cumulative_influence, graph_scores,
                        node_influence, prune_levels, prune_masks)
from .linear import LinearisedModel

__all__ = ["attribute", "AttributionGraph", "NODE_KINDS", "CONSTANT_TERMS"]

NODE_KINDS = ("feature", "error", "embedding", "logit")
CONSTANT_TERMS = ("pos_embed", "attn_bias", "dec_bias", "bos_mlp", "mlp", "offset", "left_out")
DEFAULT_MAX_MATRIX_BYTES = 8 * 2 ** 30


# -- what the rows read -----------------------------------------------------------------------
@dataclass
class _Rows:
    """Readings of a set of target rows: raw-residual direction ``vec`` at
    (``stage``, ``pos``), plus ``offset``; ``value`` is the reading on the prompt."""
    stage: torch.Tensor     # [n] long
    pos: torch.Tensor       # [n] long
    vec: torch.Tensor       # [n, d]
    offset: torch.Tensor    # [n] float64
    value: torch.Tensor     # [n] float64


@dataclass
class _LayerWrites:
    """One layer's feature writes, padded per position for one batched matmul:
    ``padded[p - first, k]`` is the k-th active feature at position p (zeros
    past ``counts[p]``); ``valid`` picks the real entries, in column order."""
    padded: torch.Tensor     # [P - first, n_max, d]
    valid: torch.Tensor      # [n_layer] flat indices into [P - first, n_max]
    counts: torch.Tensor     # [P - first] active features per position
    col0: int


@dataclass
class _Sources:
    """Every source's write, grouped as the backward pass meets them."""
    n_features: int
    feat_layer: torch.Tensor        # [N]
    feat_pos: torch.Tensor          # [N]
    feat_index: torch.Tensor        # [N]
    feat_act: torch.Tensor          # [N]
    writes: dict[int, list[_LayerWrites]]   # target layer -> the writes of each source layer
    err_layers: list[int]
    err_pos: list[int]
    errors: torch.Tensor            # [n_err_layers, P, d]
    err_col0: int
    embed: torch.Tensor             # [P, d]
    embed_col0: int
    n_src: int
    first_pos: int
    dec_bias: dict[int, torch.Tensor]   # layer -> [d]
    bos_write: dict[int, torch.Tensor]  # layer -> [d]: BOS features + error (left out by default)
    mlp_out: dict[int, torch.Tensor]    # layers without transcoder -> [P, d]
    pos_embed: torch.Tensor             # [P, d]

    def error_col(self, layer_i: int, pos: int) -> int:
        return self.err_col0 + layer_i * len(self.err_pos) + (pos - self.first_pos)


def _collect_sources(ctx: PromptContext, lin: LinearisedModel, keep_bos: bool) -> _Sources:
    dev, dt = lin.device, lin.dtype
    first = 0 if keep_bos else 1
    P = ctx.n_pos
    tc_layers = [l for l in range(ctx.n_layers) if ctx.has_transcoder(l)]
    layers, poss, idxs, acts, writes = [], [], [], [], {}
    clt = ctx.transcoders.is_cross_layer
    col = 0
    for l in tc_layers:
        a = ctx.feature_acts(l)                                         # [P, d_sae]
        nz = torch.nonzero(a[first:])                                   # sorted by (pos, feature)
        p, f = nz[:, 0] + first, nz[:, 1]
        v = a[p, f]
        counts = torch.bincount(p - first, minlength=P - first).cpu()
        n_max = int(counts.max()) if counts.numel() else 0
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(p)) - starts[(p - first).cpu()]         # rank within its position
        flat = (p - first).cpu() * n_max + slot
        # decoder rows [n_active, n_targets, d]: one target (W_dec) for a per-layer
        # transcoder; every later layer for a cross-layer transcoder (only the
        # active features' rows are read)
        if clt:
            idx, rows = ctx.active_decoder_rows(l)
            where = torch.full((a.shape[1],), -1, dtype=torch.long, device=a.device)
            where[idx.to(a.device)] = torch.arange(idx.numel(), device=a.device)
            r = rows[where[f]].double()                                 # [n, n_targets, d]
        else:
            r = ctx.transcoders[l].W_dec[f][:, None].double()           # [n, 1, d]
        for j, t in enumerate(ctx.transcoders.target_layers(l)):
            padded = torch.zeros((P - first) * n_max, r.shape[-1], device=dev, dtype=dt)
            padded[flat.to(dev)] = (v[:, None].double() * r[:, j]).to(device=dev, dtype=dt)
            writes.setdefault(t, []).append(
                _LayerWrites(padded.reshape(P - first, n_max, -1), flat.to(dev), counts, col))
        col += len(p)
        layers.append(torch.full_like(f, l)), poss.append(p), idxs.append(f), acts.append(v.float())
    cat = lambda xs, dtype: torch.cat(xs).cpu() if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
    feat_layer, feat_pos = cat(layers, torch.long), cat(poss, torch.long)
    feat_index, feat_act = cat(idxs, torch.long), cat(acts, torch.float32)
    N = col
    err_pos = list(range(first, P))
    errors64 = {l: _error64(ctx, l) for l in tc_layers}
    errors = torch.stack([errors64[l] for l in tc_layers]).to(device=dev, dtype=dt) \
        if tc_layers else torch.zeros(0, P, lin.W_O.shape[-1], device=dev, dtype=dt)
    n_err = len(tc_layers) * len(err_pos)
    dec_bias = {l: ctx.transcoders.output_bias(l).to(device=dev, dtype=dt) for l in tc_layers}
    bos_write = {}
    if not keep_bos:
        for l in tc_layers:
            bos_write[l] = (_decoded64(ctx, l, 0) + errors64[l][0]).to(device=dev, dtype=dt)
    mlp_out = {l: ctx.mlp_out[l].to(device=dev, dtype=dt) for l in range(ctx.n_layers)
               if not ctx.has_transcoder(l)}
    return _Sources(N, feat_layer, feat_pos, feat_index, feat_act, writes, tc_layers, err_pos, errors,
                    N, ctx.embed.to(device=dev, dtype=dt), N + n_err, N + n_err + P, first, dec_bias,
                    bos_write, mlp_out, ctx.pos_embed.to(device=dev, dtype=dt))


def _decoded64(ctx: PromptContext, layer: int, pos: int | None = None) -> torch.Tensor:
    """Σ_f activation × W_dec[f] in float64 over the active features only, at
    every position ([P, d]) or at ``pos`` ([d]). For a cross-layer transcoder:
    the writes into ``layer`` of the features of every layer up to it."""
    if ctx.transcoders.is_cross_layer:
        out = 0.0
        for s in ctx.transcoders.sources(layer):
            idx, rows = ctx.active_decoder_rows(s)
            a = ctx.feature_acts(s).index_select(1, idx.to(ctx.feature_acts(s).device)).double()
            out = out + a @ rows[:, layer - s].double().to(a.device)                  # [P, d]
        return out if pos is None else out[pos]
    tc = ctx.transcoders[layer]
    a = ctx.feature_acts(layer)
    if pos is not None:
        f = torch.nonzero(a[pos]).flatten()
        return a[pos, f].double() @ tc.W_dec[f].double()
    p, f = torch.nonzero(a, as_tuple=True)
    out = torch.zeros(a.shape[0], tc.W_dec.shape[1], dtype=torch.float64, device=a.device)
    return out.index_add_(0, p, a[p, f].double()[:, None] * tc.W_dec[f].double())


def _error64(ctx: PromptContext, layer: int) -> torch.Tensor:
    """[P, d] MLP output − transcoder output, in float64 from the same terms
    the graph uses (float64 writes, the skip term read off the float64
    residual), so that conservation holds to float64 rounding."""
    tc = ctx.transcoders[layer]
    out = _decoded64(ctx, layer) + ctx.transcoders.output_bias(layer).double()
    if tc.W_skip is not None:
        out = out + _mlp_input64(ctx, layer) @ tc.W_skip.double()
    return ctx.mlp_out[layer].to(out.device) - out


def _mlp_input64(ctx: PromptContext, layer: int) -> torch.Tensor:
    """[P, d_in] the transcoder's input recomputed from the float64 residual."""
    x = ctx.resid[2 * layer + 1]
    kind = transcoder_input_kind(ctx.transcoders[layer], layer)
    if kind == INPUT_RESID:
        return x
    x = ctx.arch.centre(x) / ctx.ln2_scale[layer][:, None]
    if kind == INPUT_NORMALIZED:
        return x
    norm = ctx.arch.ln2[layer]
    return x * norm.gain.to(x) + norm.bias.to(x)


# -- the row computation ----------------------------------------------------------------------
def _compute_rows(lin: LinearisedModel, src: _Sources, rows: _Rows, out_t: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Fill ``out_t`` [n_src, B] (transposed: one column per row) with the
    rows' edges from every source; return the constant terms, each [B] float64.

    Rows are walked highest stage first; at stage s only the rows reading at
    stage ≥ s have a gradient yet, so the work at s runs on that prefix of
    the rows (sorted by stage), and on positions up to the last one read."""
    B = rows.stage.shape[0]
    d = rows.vec.shape[1]
    dev, dt = lin.device, lin.dtype
    order = torch.argsort(rows.stage, descending=True, stable=True)
    stage = rows.stage[order]
    pos = rows.pos[order].to(dev)
    vec = rows.vec.to(device=dev, dtype=dt)[order.to(dev)]
    P = int(rows.pos.max()) + 1                      # nothing later reaches these targets
    top = int(stage[0])
    g = torch.zeros(B, P, d, device=dev, dtype=dt)
    terms = {k: torch.zeros(B, dtype=torch.float64, device=dev) for k in CONSTANT_TERMS}
    out_t.zero_()
    n_live = 0
    for s in range(top, -1, -1):
        k = int((stage >= s).sum())
        if k > n_live:
            live = torch.arange(n_live, k, device=dev)
            g[live, pos[live]] += vec[live]
            n_live = k
        gl = g[:k]
        ol = out_t[:, :k]
        if s >= 2 and s % 2 == 0:                    # writes of MLP l = s/2 - 1 land here
            _mlp_sources(s // 2 - 1, gl, src, ol, terms, k)
        elif s % 2 == 1:                             # attention l = (s-1)/2 wrote here
            terms["attn_bias"][:k] += torch.einsum("bpd,pd->b", gl, lin.attn_bias[s // 2, :P]).double()
        if s == 0:
            ol[src.embed_col0:src.embed_col0 + P] = torch.einsum("bpd,pd->pb", gl, src.embed[:P])
            terms["pos_embed"][:k] += torch.einsum("bpd,pd->b", gl, src.pos_embed[:P]).double()
        else:
            g[:k] = lin.backward(s, s - 1, gl)
    # back to the caller's row order
    inv = torch.empty_like(order)
    inv[order] = torch.arange(B)
    out_t[:] = out_t[:, inv.to(dev)]
    terms = {name: t[inv.to(dev)] for name, t in terms.items()}
    terms["offset"] += rows.offset.to(dev)
    return terms


def _mlp_sources(layer: int, g: torch.Tensor, src: _Sources, out_t: torch.Tensor,
                 terms: dict[str, torch.Tensor], k: int) -> None:
    P = g.shape[1]
    if layer in src.mlp_out:
        terms["mlp"][:k] += torch.einsum("bpd,pd->b", g, src.mlp_out[layer][:P]).double()
        return
    if layer not in src.writes:
        return
    first = src.first_pos
    for w in src.writes[layer]:           # a CLT feature adds one term per layer it writes to
        if P > first and w.padded.shape[1]:
            # edges = write · gradient at the write's position: one matmul per position, batched
            e = torch.bmm(w.padded[:P - first], g[:, first:].permute(1, 2, 0))      # [P', n_max, k]
            n_here = int(w.counts[:P - first].sum())
            ol = out_t[w.col0:w.col0 + n_here]
            ol.add_(e.reshape(-1, g.shape[0])[w.valid[:n_here]])
    li = src.err_layers.index(layer)
    if P > first:
        e = torch.einsum("bpd,pd->pb", g[:, first:], src.errors[li, first:P])
        c0 = src.error_col(li, first)
        out_t[c0:c0 + e.shape[0]] = e
    terms["dec_bias"][:k] += (g.sum(1) @ src.dec_bias[layer]).double()
    if layer in src.bos_write:
        terms["bos_mlp"][:k] += (g[:, 0] @ src.bos_write[layer]).double()


# -- targets ---------------------------------------------------------------------------------
@dataclass
class _TargetSpec:
    label: str
    index: int              # token id, or a virtual id ≥ d_vocab for custom targets
    token_str: str
    weight: float
    kind: str               # "logit" (a token's logit) | "custom"
    target: Target | None = None


def _final_logits(ctx: PromptContext) -> torch.Tensor:
    """[d_vocab] logits at the last position from the cached final residual
    (after any final softcap: they give the probabilities)."""
    return ctx.logits_at(ctx.n_pos - 1)


def _target_specs(ctx: PromptContext, targets, max_n_logits: int, desired_logit_prob: float
                  ) -> tuple[list[_TargetSpec], torch.Tensor]:
    logits = _final_logits(ctx).double()
    probs = torch.softmax(logits, -1)
    d_vocab = logits.shape[0]
    tok = lambda i: ctx.model.tokenizer.decode([i])  # noqa: E731
    if targets is None:
        max_n_logits = as_count(max_n_logits, "max_n_logits")
        if not 0.0 < as_number(desired_logit_prob, "desired_logit_prob", 0.0, 1.0):
            raise InvalidInputError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob!r}.")
        top_p, top_i = torch.topk(probs, min(max_n_logits, d_vocab))
        cut = int(torch.searchsorted(torch.cumsum(top_p, 0),
                                     torch.tensor([float(desired_logit_prob)], dtype=torch.float64,
                                                  device=top_p.device))) + 1
        ids = top_i[:cut].tolist()
        return [_TargetSpec(f'Output "{tok(i)}"', i, tok(i), float(probs[i]), "logit") for i in ids], logits
    if isinstance(targets, (int, str, Target)) or (isinstance(targets, tuple) and len(targets) == 2
                                                    and isinstance(targets[0], Target)) \
            or getattr(targets, "ndim", None) == 0 or not isinstance(targets, Iterable):
        targets = [targets]
    if isinstance(targets, Mapping):
        raise InvalidInputError(f"targets must be a list of token ids, token strings or Targets, got a "
                                f"{type(targets).__name__}: {targets!r:.80}.")
    specs = []
    for j, t in enumerate(targets):
        weight = None
        if isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], Target):
            t, weight = t
            weight = as_number(weight, f"the weight of target {j}")
        if isinstance(t, Target):
            specs.append(_TargetSpec(t.label or f"target {j}", d_vocab + j, t.label or f"target {j}",
                                     1.0 if weight is None else float(weight), "custom", t))
            continue
        if isinstance(t, str):
            t = single_token_id(ctx.model, t)
        try:
            t = as_integer(t, "target")
        except InvalidInputError:
            raise InvalidInputError(f"A target must be a token id, a token string, or a Target "
                                    f"(logit_direction_target, feature_target, ...), got {t!r}.") from None
        if not 0 <= t < d_vocab:
            raise InvalidInputError(f"target token id {t} is out of range (0..{d_vocab - 1}).")
        specs.append(_TargetSpec(f'Output "{tok(t)}"', t, tok(t), float(probs[t]) if weight is None
                                 else float(weight), "logit"))
    if not specs:
        raise InvalidInputError("targets is empty: give at least one target, or None for the top logits.")
    seen = [s.index for s in specs if s.kind == "logit"]
    if len(set(seen)) < len(seen):
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise InvalidInputError(f"targets name token id(s) {twice} more than once; give each token once "
                                "(its graph node would be duplicated).")
    return specs, logits


def _target_rows(ctx: PromptContext, lin: LinearisedModel, specs: list[_TargetSpec],
                 logits: torch.Tensor) -> _Rows:
    w = ctx.weights
    W_U = w.W_U
    mean_u = W_U.sum(1, dtype=torch.float64) / W_U.shape[1]     # no float64 copy of W_U
    last = ctx.n_pos - 1
    stage, pos, vecs, offset, value = [], [], [], [], []
    for s in specs:
        if s.kind == "logit":
            u = W_U[:, s.index].double() - mean_u              # demeaned unembedding column
            # through the frozen final norm (its gain and centring, if any); the
            # logit before any final softcap
            v, ln_offset = ctx.arch.read_norm_out(ctx.arch.ln_final, u, ctx.final_scale[last])
            stage.append(ctx.final_stage), pos.append(last)
            vecs.append(v)                                     # float64 here; cast below
            offset.append(float(w.b_U[s.index].double() - w.b_U.sum(dtype=torch.float64) / w.b_U.numel())
                          + ln_offset)
            value.append(float(vecs[-1] @ ctx.resid[ctx.final_stage, last]) + offset[-1])
        else:
            t = s.target
            stage.append(t.stage), pos.append(t.token)
            vecs.append(t.direction.double().cpu())
            offset.append(float(t.offset)), value.append(float(t.value))
    return _Rows(torch.tensor(stage), torch.tensor(pos),
                 torch.stack([v.cpu() for v in vecs]).to(device=lin.device, dtype=lin.dtype),
                 torch.tensor(offset, dtype=torch.float64), torch.tensor(value, dtype=torch.float64))


def _feature_rows(ctx: PromptContext, lin: LinearisedModel, src: _Sources, which: torch.Tensor) -> _Rows:
    """Rows of active features ``which`` (indices into the feature nodes): each
    reads its pre-activation minus b_enc along its encoder vector."""
    layers, poss, idx = src.feat_layer[which], src.feat_pos[which], src.feat_index[which]
    vec = torch.empty(len(which), lin.W_O.shape[-1], device=lin.device, dtype=lin.dtype)
    offset = torch.empty(len(which), dtype=torch.float64)
    value = torch.empty(len(which), dtype=torch.float64)
    for l in layers.unique().tolist():
        m = torch.nonzero(layers == l).flatten()
        tc = ctx.transcoders[l]
        enc = tc.W_enc[:, idx[m].to(tc.W_enc.device)].T.double()            # [n, d_in]
        read = lin.mlp_input_reading(l, poss[m].to(lin.device), enc, dtype=torch.float64)
        vec[m.to(lin.device)] = read.to(lin.dtype)
        offset[m] = -(enc @ tc.b_dec.double()).cpu()
        # pre-activation − b_enc, read off the float64 residual (equals an active
        # feature's activation − b_enc up to the cache's float32 rounding)
        resid = ctx.resid[2 * l + 1].to(lin.device)[poss[m].to(lin.device)]        # [n, d]
        value[m] = (read * resid).sum(1).cpu() + offset[m]
    return _Rows(2 * layers + 1, poss, vec, offset, value)


# -- the graph object ----------------------------------------------------------------------------
@dataclass
class AttributionGraph:
    """An attribution graph: ``nodes`` (one row per node, in adjacency order:
    features, errors, embeddings, targets) and ``adjacency`` [n, n] with
    ``adjacency[target, source]`` the direct effect of ``source`` on ``target``.

    ``nodes`` columns: ``node_id`` (circuit-tracer's convention), ``kind``
    (feature | error | embedding | logit), ``layer`` (embeddings −1, targets
    n_layers), ``pos``, ``index`` (feature id, token id, or a virtual id ≥
    d_vocab for a custom target), ``activation`` (features), ``value`` (what a
    row reads on the prompt: a feature's pre-activation − b_enc, a target's
    value), ``weight`` (a target's weight in influence: its probability),
    ``influence`` (node influence on the weighted targets), ``cumulative`` (its
    cumulative fraction, what viewers prune on), ``prune_level`` (``prune``
    at ``node_threshold=t`` keeps the node when ``prune_level < t``: the share
    of influence held by more influential nodes, −1 for the first, +inf
    without influence; the widget's prune slider uses it) and ``label``.
    ``constants``: one row per target row (targets and computed features) with
    ``value``, ``edge_sum``, ``constant`` (= value − edge_sum) and its split into
    ``CONSTANT_TERMS``."""
    nodes: pd.DataFrame
    adjacency: torch.Tensor
    constants: pd.DataFrame
    prompt_tokens: list[str]
    token_ids: list[int]
    n_layers: int
    scan: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- facts -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(torch.count_nonzero(self.adjacency))

    def _mask(self, kind: str) -> torch.Tensor:
        return torch.tensor((self.nodes["kind"] == kind).to_numpy(), device=self.adjacency.device)

    @property
    def target_weights(self) -> torch.Tensor:
        w = self.nodes["weight"].fillna(0.0).to_numpy()
        return torch.tensor(w, dtype=torch.float64, device=self.adjacency.device)

    def node_index(self, node_id: str) -> int:
        hits = (self.nodes["node_id"] == node_id).to_numpy().nonzero()[0]
        if not len(hits):
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        return int(hits[0])

    def edges(self, min_abs: float = 0.0) -> pd.DataFrame:
        """Non-zero edges as a DataFrame: source, target (node ids), weight."""
        A = self.adjacency
        t, s = torch.nonzero(A.abs() > as_number(min_abs, "min_abs", low=0.0), as_tuple=True)
        ids = self.nodes["node_id"].to_numpy()
        return pd.DataFrame({"source": ids[s.cpu().numpy()], "target": ids[t.cpu().numpy()],
                             "weight": A[t, s].double().cpu().numpy()})

    # -- influence, pruning, scores ------------------------------------------------------
    @property
    def levels(self) -> torch.Tensor:
        """[n] each node's level: edges only go from lower to higher levels."""
        return _levels(self.nodes).to(self.adjacency.device)

    def influence(self) -> torch.Tensor:
        """Node influence on the weighted targets (recomputed on this graph)."""
        return node_influence(self.adjacency, self.target_weights, self.levels)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "AttributionGraph":
        """A new graph with the nodes that cover ``node_threshold`` of the
        influence and the edges that cover ``edge_threshold`` of the edge
        influence (targets and embeddings always kept), then the features and
        errors left without an edge to a kept node and the features left
        without an input. Node ``influence``, ``cumulative`` and
        ``prune_level`` stay those of the unpruned graph. Thresholds of 1
        keep every node and edge with positive influence."""
        always = self._mask("logit") | self._mask("embedding")
        masks = prune_masks(self.adjacency, self.target_weights, always, self._mask("feature"),
                            node_threshold, edge_threshold, self.levels)
        keep = torch.nonzero(masks.node_mask).flatten()
        A = (self.adjacency * masks.edge_mask.to(self.adjacency.dtype))[keep][:, keep]
        nodes = self.nodes.iloc[keep.cpu().numpy()].reset_index(drop=True)
        meta = dict(self.metadata, node_threshold=node_threshold, edge_threshold=edge_threshold,
                    pruned_from=len(self))
        return AttributionGraph(nodes, A.contiguous(), self.constants, self.prompt_tokens, self.token_ids,
                                self.n_layers, self.scan, meta)

    def scores(self) -> dict[str, float]:
        """``replacement``: the embeddings' share of the influence held by
        embeddings and errors; ``completeness``: the influence-weighted share of
        the nodes' inputs that do not come from errors."""
        r, c = graph_scores(self.adjacency, self.target_weights, self._mask("error"),
                            self._mask("embedding"), self.levels)
        return {"replacement": r, "completeness": c}

    # -- views ---------------------------------------------------------------------------
    def to_networkx(self):
        import networkx as nx
        g = nx.DiGraph(prompt_tokens=self.prompt_tokens, scan=self.scan)
        for rec in self.nodes.to_dict("records"):
            g.add_node(rec["node_id"], **{k: v for k, v in rec.items() if k != "node_id"})
        for rec in self.edges().itertuples(index=False):
            g.add_edge(rec.source, rec.target, weight=float(rec.weight))
        return g

    def to_dict(self, slug: str = "tc-explore-attribution", max_links: int | None = MAX_JSON_LINKS) -> dict:
        """The graph file as a dict (see :meth:`to_json`, and its ``max_links``)."""
        from .graph_json import attribution_graph_to_dict
        if not isinstance(slug, str) or not slug.strip():
            raise InvalidInputError(f"slug must be a non-empty string (the graph's name in the viewer), "
                                    f"got {slug!r}.")
        return attribution_graph_to_dict(self, slug, max_links)
    def to_json(self, path=None, slug: str = "tc-explore-attribution", indent: int | None = None,
                max_links: int | None = MAX_JSON_LINKS) -> str:
        """The graph in the attribution-graph JSON that circuit-tracer's viewer
        and Neuronpedia open (written to ``path`` if given). Prune first: a full
        graph has tens of millions of edges, and a graph with more than
        ``max_links`` (default ``MAX_JSON_LINKS``, one million: about 80 MB) is
        refused with an :class:`InvalidInputError`; ``max_links=None`` writes
        any size."""
        from .graph_json import dump_json
        return dump_json(self.to_dict(slug, max_links), path, indent)

    @classmethod
    def from_json(cls, source) -> "AttributionGraph":
        """Read a graph written by :meth:`to_json` or by circuit-tracer (a path,
        a JSON string or a parsed dict); validated first."""
        from .graph_json import attribution_graph_from_dict, load_graph_dict
        return attribution_graph_from_dict(load_graph_dict(source), cls)


# -- attribute -------------------------------------------------------------------------------------
def attribute(model, transcoders, prompt: Prompt | PromptContext, *, targets=None,
              max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int = 256, keep_bos: bool = False,
              device=None, dtype: torch.dtype = torch.float32,
              max_matrix_bytes: int = DEFAULT_MAX_MATRIX_BYTES,
              progress: bool | None = None) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string, token ids, or a
    :class:`PromptContext` already built for it).

    ``targets``: None for the most probable next tokens (at most
    ``max_n_logits``, stopping once their probability reaches
    ``desired_logit_prob``); else a list of token ids / single-token strings /
    :class:`Target` objects (e.g. ``logit_direction_target(ctx, pos, neg)``,
    ``feature_target(ctx, l, f, t)``), or ``(Target, weight)`` pairs; a
    token's weight is its probability, a Target's 1 unless given.
    ``max_feature_nodes`` keeps only that many features, computing rows in
    order of influence (logits first, then the most influential features not
    yet computed, ``batch_size`` at a time). ``keep_bos`` keeps the BOS
    position's features and errors as nodes. ``dtype`` of the computation
    (float32; float64 for checks). ``progress``: a bar over the feature rows
    (default on, off in CI; see ``tc_explore.progress``)."""
    batch_size = as_count(batch_size, "batch_size")
    if max_feature_nodes is not None:
        max_feature_nodes = as_count(max_feature_nodes, "max_feature_nodes", minimum=0)
    max_matrix_bytes = as_count(max_matrix_bytes, "max_matrix_bytes")
    dtype = as_dtype(dtype)
    keep_bos = as_flag(keep_bos, "keep_bos")
    if isinstance(prompt, PromptContext):
        ctx = prompt
        if (model is not None and ctx.model is not model) or (transcoders is not None
                                                              and ctx.transcoders is not transcoders):
            raise InvalidInputError("The PromptContext was built for another model or transcoder set: "
                                    "pass the ones it was built with (ctx.model, ctx.transcoders).")
    else:
        ctx = prompt_context(model, transcoders, prompt)
    if ctx.n_pos < 2 and not keep_bos:
        raise InvalidInputError(
            f"The prompt {''.join(ctx.token_strs)!r} has no token after BOS to attribute: give a longer "
            "prompt (or keep_bos=True).")
    device = as_device(device) if device is not None else (
        ctx.transcoders.device if ctx.transcoders is not None else ctx.resid.device)
    lin = LinearisedModel(ctx, dtype=dtype, device=device)
    src = _collect_sources(ctx, lin, keep_bos)
    specs, logits = _target_specs(ctx, targets, max_n_logits, desired_logit_prob)
    trows = _target_rows(ctx, lin, specs, logits)
    T, N, n_src = len(specs), src.n_features, src.n_src
    capped = max_feature_nodes is not None and max_feature_nodes < N
    n_rows = T + max_feature_nodes if capped else n_src + T
    n_cols = n_src if capped else n_src + T
    need = n_rows * n_cols * torch.finfo(dtype).bits // 8
    if need > max_matrix_bytes:
        raise InvalidInputError(
            f"This graph has {N} active features: its {n_rows} x {n_cols} matrix needs "
            f"{need / 2 ** 30:.1f} GiB, over max_matrix_bytes={max_matrix_bytes / 2 ** 30:.1f} GiB. "
            f"Pass max_feature_nodes (e.g. 4096) to keep the most influential features, or raise "
            f"max_matrix_bytes if the memory is there.")

    row_value = torch.zeros(n_rows, dtype=torch.float64)
    row_terms = {k: torch.zeros(n_rows, dtype=torch.float64) for k in CONSTANT_TERMS}
    store = torch.zeros(n_rows, n_cols, device=lin.device, dtype=dtype)

    def run(rows: _Rows, at: torch.Tensor) -> None:
        """Compute ``rows`` into store rows ``at`` (block by block)."""
        for a in range(0, len(at), batch_size):
            sl = slice(a, a + batch_size)
            part = _Rows(rows.stage[sl], rows.pos[sl], rows.vec[sl], rows.offset[sl], rows.value[sl])
            buf = torch.empty(n_src, len(part.stage), device=lin.device, dtype=dtype)
            terms = _compute_rows(lin, src, part, buf)
            store[at[sl].to(lin.device), :n_src] = buf.T
            for k, v in terms.items():
                row_terms[k][at[sl]] = v.cpu()
            row_value[at[sl]] = part.value

    if not capped:
        # Node order = row order: features, errors, embeddings, targets. Feature
        # rows come sorted by (layer, pos), so a block starts low and stops early.
        run(trows, torch.arange(n_src, n_src + T))
        for a in progress_bar(range(0, N, batch_size), desc="attribution", unit="block",
                              progress=progress):
            which = torch.arange(a, min(a + batch_size, N))
            run(_feature_rows(ctx, lin, src, which), which)
        selected = torch.arange(N)
        A = store
        row_of_node = torch.cat([torch.arange(N), torch.full((n_src - N,), -1), torch.arange(n_src, n_src + T)])
    else:
        run(trows, torch.arange(T))
        weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
        visited = torch.zeros(N, dtype=torch.bool)
        order: list[torch.Tensor] = []
        done = 0
        bar = progress_bar(total=max_feature_nodes, desc="attribution", unit="feature", progress=progress)
        while done < max_feature_nodes:
            rows = store[:T + done]
            row_node = torch.cat([torch.arange(n_src, n_src + T)] + order).to(lin.device)
            row_level = torch.cat([torch.full((T,), math.inf)] +
                                  [2.0 * src.feat_layer[o] + 1 for o in order]).to(lin.device)
            w = torch.cat([torch.zeros(n_src, dtype=torch.float64), weights]).to(lin.device)
            infl = _influence_by_levels(rows, _inverse_row_sums(rows), w, row_level, row_node)[:N].cpu()
            infl[visited] = -math.inf
            k = min(batch_size, max_feature_nodes - done)
            pick = torch.topk(infl, k).indices
            pick = pick[torch.argsort(src.feat_layer[pick] * ctx.n_pos + src.feat_pos[pick], stable=True)]
            run(_feature_rows(ctx, lin, src, pick), torch.arange(T + done, T + done + k))
            visited[pick] = True
            order.append(pick)
            done += k
            bar.update(k)
        bar.close()
        picked = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
        selected = torch.sort(picked).values
        # Assemble [features kept, errors, embeddings, targets] x same, from the stored rows.
        n_nodes = len(selected) + (n_src - N) + T
        keep_cols = torch.cat([selected, torch.arange(N, n_src)]).to(lin.device)
        A = torch.zeros(n_nodes, n_nodes, device=lin.device, dtype=dtype)
        rank = torch.empty(N, dtype=torch.long)
        rank[selected] = torch.arange(len(selected))
        A[rank[picked].to(lin.device), :len(keep_cols)] = store[T:T + len(picked)][:, keep_cols]
        A[n_nodes - T:, :len(keep_cols)] = store[:T][:, keep_cols]
        # What features left out by the cap give each computed row goes into its constant.
        left = torch.ones(N, dtype=torch.bool)
        left[selected] = False
        left_sum = _row_sums64(store[:, :N], left.to(lin.device))
        row_terms["left_out"] += left_sum
        perm = torch.cat([T + torch.argsort(rank[picked]), torch.arange(T)])
        row_value, row_terms = row_value[perm], {k: v[perm] for k, v in row_terms.items()}
        row_of_node = torch.cat([torch.arange(len(selected)), torch.full((n_src - N,), -1),
                                 torch.arange(len(selected), len(selected) + T)])
        del store
    nodes = _node_table(ctx, src, specs, selected, logits)
    rows_idx = torch.nonzero(row_of_node >= 0).flatten()
    if not capped:
        row_value, row_terms = row_value[rows_idx], {k: v[rows_idx] for k, v in row_terms.items()}
    edge_sum = _row_sums64(A)[rows_idx]
    constants = pd.DataFrame({"node_id": nodes["node_id"].to_numpy()[rows_idx.numpy()],
                              "value": row_value.numpy(), "edge_sum": edge_sum.numpy(),
                              **{k: v.numpy() for k, v in row_terms.items()}})
    constants["constant"] = constants[list(CONSTANT_TERMS)].sum(axis=1)
    infl = node_influence(A, torch.tensor(nodes["weight"].fillna(0.0).to_numpy(), dtype=torch.float64,
                                          device=A.device), _levels(nodes).to(A.device))
    nodes["influence"] = infl.cpu().numpy()
    nodes["cumulative"] = cumulative_influence(infl).cpu().numpy()
    nodes["prune_level"] = prune_levels(infl).cpu().numpy()
    meta = dict(prompt="".join(ctx.token_strs), n_active_features=N, max_feature_nodes=max_feature_nodes,
                keep_bos=keep_bos, d_vocab=int(logits.shape[0]),
                targets=[dict(label=s.label, index=s.index, token_str=s.token_str, weight=s.weight,
                              kind=s.kind) for s in specs])
    return AttributionGraph(nodes, A, constants, list(ctx.token_strs), ctx.tokens.tolist(), ctx.n_layers,
                            ctx.transcoders.name, meta)


def _row_sums64(M: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j M[i, j] (over ``cols`` if given) per row, in float64, block by
    block: never a float64 copy of the whole matrix. Returned on the CPU."""
    out = torch.empty(M.shape[0], dtype=torch.float64)
    block = _block_rows(M.shape[1])
    for a in range(0, M.shape[0], block):
        m = M[a:a + block]
        if cols is not None:
            m = m[:, cols]
        out[a:a + block] = m.sum(1, dtype=torch.float64).cpu()
    return out


def _levels(nodes: pd.DataFrame) -> torch.Tensor:
    """Each node's level for one-pass influence: a feature's reading stage
    (2 layer + 1), +inf for targets (nothing reads them), -1 for errors and
    embeddings (they read nothing)."""
    kind = nodes["kind"].to_numpy()
    layer = torch.tensor(nodes["layer"].to_numpy().astype("float64"))
    lv = torch.full((len(nodes),), -1.0, dtype=torch.float64)
    feat = torch.tensor(kind == "feature")
    lv[feat] = 2 * layer[feat] + 1
    lv[torch.tensor(kind == "logit")] = math.inf
    return lv


def _node_table(ctx: PromptContext, src: _Sources, specs: list[_TargetSpec], selected: torch.Tensor,
                logits: torch.Tensor) -> pd.DataFrame:
    from .graph_json import error_node_id, feature_node_id, logit_node_id, embedding_node_id
    L, P = ctx.n_layers, ctx.n_pos
    rec = []
    fl, fp, fi, fa = (src.feat_layer[selected].tolist(), src.feat_pos[selected].tolist(),
                      src.feat_index[selected].tolist(), src.feat_act[selected].tolist())
    for l, p, f, a in zip(fl, fp, fi, fa):
        rec.append(dict(node_id=feature_node_id(l, f, p), kind="feature", layer=l, pos=p, index=f,
                        activation=a, weight=0.0, label=f"L{l}F{f}"))
    for l in src.err_layers:
        for p in src.err_pos:
            rec.append(dict(node_id=error_node_id(l, p), kind="error", layer=l, pos=p, index=-1,
                            activation=float("nan"), weight=0.0,
                            label=f"error L{l} {ctx.token_strs[p]!r}"))
    for p, t in enumerate(ctx.tokens.tolist()):
        rec.append(dict(node_id=embedding_node_id(t, p), kind="embedding", layer=-1, pos=p, index=t,
                        activation=float("nan"), weight=0.0, label=f"token {ctx.token_strs[p]!r}"))
    probs = torch.softmax(logits, -1)
    for s in specs:
        p = P - 1 if s.kind == "logit" else s.target.token
        prob = float(probs[s.index]) if s.kind == "logit" else s.weight
        rec.append(dict(node_id=logit_node_id(L, s.index, p), kind="logit", layer=L, pos=p, index=s.index,
                        activation=float("nan"), weight=s.weight,
                        label=f'Output "{s.token_str}" (p={prob:.3f})'))
    return pd.DataFrame(rec, columns=["node_id", "kind", "layer", "pos", "index", "activation", "weight",
                                      "label"])
