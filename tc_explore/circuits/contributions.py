"""The exact decomposition of a target into contributions (why it is exact:
``docs/design.md``).

With every norm scale and attention pattern frozen at its value on the prompt,
a target (``v · resid + offset``) splits exactly into contributions of
embeddings, heads per source token, biases, transcoder features, skip terms,
errors and whole MLPs without a transcoder; the sum is checked in tests.

Each traceable contribution carries the ``Target`` one step further upstream
whose value equals the contribution itself (the path-attribution view of
Dunefsky, Chlenski & Nanda 2024):

* feature g of layer l at token t: ``a_g × c`` with ``c = W_dec[g] · v``; the
  next target reads stage ``2l+1`` at token t along ``c × centre(W_enc[:, g]) /
  ln2_scale[l, t]`` with offset ``c × (b_enc[g] − b_dec · W_enc[:, g])``.
* head h of layer l, destination t, source s: ``pattern[l,h,t,s] × (v_s W_O[h]) · v``;
  the next target reads stage ``2l`` at token s along ``pattern × centre(W_V[h]
  W_O[h] v) / ln1_scale[l, s]`` with offset ``pattern × b_V[h] · (W_O[h] v)``.
* the skip term of a skip transcoder: ``ln2(x) W_skip · v``, traced like a feature's input.

These are GPT-2's formulas; other blocks run the same steps through the
model's own norms (:mod:`tc_explore.architecture`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Collection

import pandas as pd
import torch

from ..errors import InvalidInputError, as_count, as_integer
from .context import PromptContext, prompt_context

__all__ = ["Node", "Target", "Contribution", "Decomposition", "decompose", "next_target",
           "PromptContext", "prompt_context", "KIND_ORDER", "NodeKind"]


class NodeKind(str, Enum):
    """What a ``Node`` is (see ``Node``). A str: members equal their names as
    written in graph JSON (``tc_kind``) and in tables, and print as them."""
    FEATURE = "feature"
    HEAD = "head"
    SKIP = "skip"
    ERROR = "error"
    MLP = "mlp"
    EMBED = "embed"
    POS_EMBED = "pos_embed"
    ATTN_BIAS = "attn_bias"
    DEC_BIAS = "dec_bias"
    OFFSET = "offset"
    REMAINDER = "remainder"
    LOGIT = "logit"
    DIRECTION = "direction"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__       # so {NodeKind.HEAD: ...}["head"] finds it


# Fixed order of node kinds (the enum's), used to break ties deterministically.
KIND_ORDER = tuple(NodeKind)


@dataclass(frozen=True, order=True)
class Node:
    """One unit of the computation. ``token`` is the position it writes at
    (a head's destination); ``source`` a head's source position.

    kinds: ``feature`` (index = feature id), ``head`` (index = head), ``skip``,
    ``error`` (transcoder error of ``layer``), ``mlp`` (a whole MLP with no
    transcoder), ``embed`` (index = token id), ``pos_embed``, ``attn_bias`` (b_O of ``layer``),
    ``dec_bias`` (b_dec_out of ``layer``), ``offset`` (the constant of the node
    traced: a feature's encoder offset or the logits' bias), ``remainder``
    (what a graph's pruning left out), and the root kinds ``logit`` and
    ``direction`` (a feature target is a ``feature`` node).
    """
    kind: NodeKind
    layer: int | None = None
    index: int | None = None
    token: int | None = None
    source: int | None = None

    def __post_init__(self):
        if not isinstance(self.kind, NodeKind):
            try:
                object.__setattr__(self, "kind", NodeKind(self.kind))
            except ValueError:
                raise InvalidInputError(f"Unknown node kind {self.kind!r}; the kinds are "
                                        f"{[k.value for k in NodeKind]}.") from None

    def sort_key(self) -> tuple:
        rank = KIND_ORDER.index(self.kind) if self.kind in KIND_ORDER else len(KIND_ORDER)
        n = lambda x: -1 if x is None else x  # noqa: E731
        return (rank, n(self.layer), n(self.index), n(self.token), n(self.source))

    def label(self) -> str:
        if self.kind == "feature":
            return f"L{self.layer}F{self.index}@{self.token}"
        if self.kind == "head":
            return f"L{self.layer}H{self.index}@{self.token}<-{self.source}"
        if self.kind in ("error", "mlp", "skip", "attn_bias", "dec_bias"):
            return f"{self.kind}{self.layer}@{self.token}"
        if self.kind == "offset" and self.layer is not None:
            return f"offset L{self.layer}F{self.index}"
        return f"{self.kind}@{self.token}" if self.token is not None else self.kind


@dataclass
class Target:
    """A scalar read off the residual stream: ``direction · resid[stage, token] + offset``.

    ``direction`` lives in the raw residual basis: any frozen LayerNorm scale
    and centring are already folded in. ``value`` is the scalar on the prompt.
    """
    node: Node
    stage: int
    token: int
    direction: torch.Tensor   # [d_model]
    offset: float
    value: float
    label: str = ""
    # (positive, negative) token ids of a logit target, None for other targets
    logit_tokens: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __post_init__(self):
        # A NaN or infinite direction would decompose into NaN contributions and
        # find no paths, silently; refuse it where it is made.
        bad = [name for name, ok in (("direction", bool(torch.isfinite(self.direction).all())),
                                     ("offset", _finite(self.offset)), ("value", _finite(self.value)))
               if not ok]
        if bad:
            raise InvalidInputError(
                f"Target {self.label or self.node.label()!r} has a NaN or infinite {' and '.join(bad)}"
                f" (offset {self.offset}, value {self.value}). Give a finite vector; if the model "
                "itself produced NaN on this prompt, check its weights and dtype.")

    def value_from_resid(self, ctx: PromptContext) -> float:
        return float(self.direction @ ctx.resid[self.stage, self.token]) + self.offset


@dataclass
class Contribution:
    """One contributor's share of a target.

    ``value`` is its contribution; for features ``value == activation ×
    connection`` (activation: input-dependent; connection ``W_dec[g] · v``:
    input-invariant); for heads ``activation`` is the attention weight and
    ``connection`` the value vector's OV image dotted with ``v``.
    ``next_target`` is the direction to trace further (None for leaves).
    """
    node: Node
    value: float
    activation: float | None = None
    connection: float | None = None
    next_target: Target | None = None

    def sort_key(self) -> tuple:
        return (-abs(self.value),) + self.node.sort_key()


@dataclass
class Decomposition:
    """All contributions to one target, as tensors (materialise with
    :meth:`contributions`). ``features[l]`` is [d_sae] (zero where inactive);
    ``heads`` [n_attn_layers, H, pos_src]; per-layer leaves are [n_layers]
    tensors, zero-padded past the layers upstream of the target."""
    ctx: PromptContext = field(repr=False)
    target: Target
    embed: float
    pos_embed: float
    heads: torch.Tensor                 # [n_attn, H, pos]
    attn_bias: torch.Tensor             # [n_attn]
    features: dict[int, torch.Tensor]   # layer -> [d_sae]
    connections: dict[int, torch.Tensor] = field(repr=False)  # layer -> [d_sae] W_dec @ v
    acts: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # layer -> [d_sae] at token
    dec_bias: dict[int, float] = field(default_factory=dict)
    error: dict[int, float] = field(default_factory=dict)
    skip: dict[int, float] = field(default_factory=dict)
    mlp: dict[int, float] = field(default_factory=dict)       # layers without transcoder
    offset: float = 0.0

    @property
    def total(self) -> float:
        """Sum of every contribution; equals ``target.value`` (conservation)."""
        s = self.embed + self.pos_embed + float(self.heads.double().sum()) \
            + float(self.attn_bias.double().sum()) + self.offset
        s += sum(float(f.double().sum()) for f in self.features.values())
        s += sum(self.dec_bias.values()) + sum(self.error.values()) + sum(self.skip.values()) \
            + sum(self.mlp.values())
        return s

    # -- materialising -----------------------------------------------------------------
    def _flat(self) -> list[tuple[str, int, torch.Tensor]]:
        groups = [("head", -1, self.heads.reshape(-1))]
        groups += [("feature", l, f) for l, f in sorted(self.features.items())]
        return groups

    def _scalars(self) -> list[tuple[Node, float]]:
        t = self.target.token
        items = [(Node("embed", index=int(self.ctx.tokens[t]), token=t), self.embed),
                 (Node("pos_embed", token=t), self.pos_embed)]
        items += [(Node("attn_bias", layer=l, token=t), float(b)) for l, b in enumerate(self.attn_bias)]
        items += [(Node("dec_bias", layer=l, token=t), b) for l, b in self.dec_bias.items()]
        items += [(Node("error", layer=l, token=t), e) for l, e in self.error.items()]
        items += [(Node("skip", layer=l, token=t), e) for l, e in self.skip.items()]
        items += [(Node("mlp", layer=l, token=t), e) for l, e in self.mlp.items()]
        owner = self.target.node
        items.append((Node("offset", layer=owner.layer if owner.kind == "feature" else None,
                           index=owner.index if owner.kind == "feature" else None, token=t),
                      self.offset))
        return items

    def contributions(self, k: int | None = None, targets: bool = True,
                      include_zero: bool = False, exclude: Collection[str] = ()) -> list[Contribution]:
        """Contributions sorted by |value| (ties broken by node kind, layer,
        index, token, source — deterministic). ``k`` keeps the top k (all
        entries tied with the k-th are considered before the tie-break cut);
        ``targets`` builds each traceable contributor's ``next_target``;
        ``exclude`` leaves out node kinds (e.g. ``("error",)``)."""
        exclude = check_kinds(exclude, "exclude")
        k = None if k is None else as_count(k, "k", minimum=0)
        scalars = [(n, v) for n, v in self._scalars()
                   if (include_zero or v != 0.0) and n.kind not in exclude]
        groups = [(kind, layer, vals) for kind, layer, vals in self._flat() if kind not in exclude]
        threshold = None
        if k is not None:
            if k <= 0:
                return []
            mags = [g.abs() for _, _, g in groups]
            mags.append(torch.tensor([abs(v) for _, v in scalars], dtype=self.heads.dtype))
            flat = torch.cat([m.to(torch.float64) for m in mags])
            kk = min(k, flat.numel())
            if kk == 0:
                return []
            threshold = float(torch.topk(flat, kk).values[-1])
        out: list[Contribution] = []
        for n, v in scalars:
            if threshold is None or abs(v) >= threshold:
                out.append(Contribution(n, v))
        H, P = self.heads.shape[1], self.heads.shape[2]
        for kind, layer, vals in groups:
            mask = vals.abs() >= threshold if threshold is not None else \
                (torch.ones_like(vals, dtype=torch.bool) if include_zero else vals != 0)
            if threshold is not None and not include_zero:
                mask &= vals != 0
            for i in torch.nonzero(mask).flatten().tolist():
                if kind == "head":
                    l, h, s = i // (H * P), (i // P) % H, i % P
                    out.append(self._head_contribution(l, h, s, targets=False))
                else:
                    out.append(self._feature_contribution(layer, i, targets=False))
        out.sort(key=Contribution.sort_key)
        if k is not None:
            out = out[:k]
        if targets:
            for c in out:
                c.next_target = next_target(self.ctx, self.target, c.node, value=c.value)
        return out

    def _head_contribution(self, l: int, h: int, s: int, targets: bool = True) -> Contribution:
        t = self.target.token
        node = Node("head", layer=l, index=h, token=t, source=s)
        a = float(self.ctx.pattern[l, h, t, s])
        val = float(self.heads[l, h, s])
        conn = val / a if a != 0 else 0.0
        c = Contribution(node, val, activation=a, connection=conn)
        if targets:
            c.next_target = next_target(self.ctx, self.target, node, value=val)
        return c

    def _feature_contribution(self, l: int, g: int, targets: bool = True) -> Contribution:
        t = self.target.token
        node = Node("feature", layer=l, index=g, token=t)
        c = Contribution(node, float(self.features[l][g]), activation=float(self.acts[l][g]),
                         connection=float(self.connections[l][g]))
        if targets:
            c.next_target = next_target(self.ctx, self.target, node, value=c.value)
        return c

    def contribution_of(self, node: Node, targets: bool = True) -> Contribution:
        """The contribution of one node (e.g. a feature you care about) at the
        target's token (``node.token`` None means that token). Nodes write at
        their own token: one at another token contributes only through heads,
        and asking for it directly is an error, not a silent zero."""
        _check_node(node)
        if node.kind == "feature":
            if node.layer not in self.features:
                raise InvalidInputError(
                    f"Layer {node.layer}'s transcoder features are not upstream of this target "
                    f"(or the layer has no transcoder); upstream layers: {sorted(self.features)}.")
            self._check_node_token(node)
            feature = self.ctx.transcoders.check_feature(node.layer, node.index)
            return self._feature_contribution(node.layer, feature, targets)
        if node.kind == "head":
            if not 0 <= as_integer(node.layer, "head layer") < self.heads.shape[0]:
                raise InvalidInputError(f"Attention layer {node.layer} is not upstream of this target.")
            if not 0 <= as_integer(node.index, "head index") < self.heads.shape[1]:
                raise InvalidInputError(f"head {node.index} is out of range (0..{self.heads.shape[1] - 1}).")
            self._check_node_token(node)
            return self._head_contribution(node.layer, node.index,
                                           self.ctx.check_token(node.source), targets)
        self._check_node_token(node)
        t = self.target.token
        node = Node(node.kind, node.layer, node.index, t, node.source)
        for n, v in self._scalars():
            if n == node:
                return Contribution(n, v, next_target=next_target(self.ctx, self.target, n)
                                    if targets else None)
        raise InvalidInputError(f"{node} is not a contributor of this target.")

    def _check_node_token(self, node: Node) -> None:
        t = self.target.token
        if node.token is None:
            return
        token = self.ctx.check_token(node.token)
        if token != t:
            raise InvalidInputError(
                f"{node.label()} writes at token {token}, but this target reads token {t}: only "
                f"nodes at the target's token contribute to it directly. Its effect reaches token "
                f"{t} through attention heads: decompose a head's next_target, or use find_paths.")

    def to_pandas(self, k: int | None = None) -> pd.DataFrame:
        """One row per (non-zero) contribution: kind, layer, index, token,
        source, value, activation, connection, label."""
        rows = [dict(kind=c.node.kind, layer=c.node.layer, index=c.node.index, token=c.node.token,
                     source=c.node.source, value=c.value, activation=c.activation,
                     connection=c.connection, label=c.node.label())
                for c in self.contributions(k=k, targets=False)]
        df = pd.DataFrame(rows, columns=["kind", "layer", "index", "token", "source", "value",
                                         "activation", "connection", "label"])
        for col in ("layer", "index", "token", "source"):
            df[col] = df[col].astype("Int64")   # integers, blank (<NA>) where a kind has none
        return df

    def by_kind(self) -> dict[str, float]:
        """Total contribution per node kind (features, heads, errors, ...)."""
        out: dict[str, float] = {}
        for n, v in self._scalars():
            kind = NodeKind(n.kind).value          # plain str keys: the dict prints as a reader expects
            out[kind] = out.get(kind, 0.0) + v
        out["head"] = float(self.heads.double().sum())
        out["feature"] = sum(float(f.double().sum()) for f in self.features.values())
        return out


def _finite(x) -> bool:
    import math
    return math.isfinite(float(x))


# -- the decomposition --------------------------------------------------------------------
@torch.no_grad()
def _check_node(node) -> None:
    if not isinstance(node, Node):
        raise InvalidInputError(f"Expected a Node (e.g. Node('feature', layer=1, index=3, token=8)), got "
                                f"{type(node).__name__} {node!r:.60}.")


def check_kinds(kinds, what: str = "kinds") -> frozenset[str]:
    """A collection of node kind names (``NodeKind`` values), checked: a bare
    string or a misspelt kind would otherwise exclude nothing, silently."""
    if isinstance(kinds, (str, bytes)) or not isinstance(kinds, Collection):
        raise InvalidInputError(f"{what} must be a list of node kinds such as ('error', 'attn_bias'), "
                                f"got {kinds!r:.80}.")
    known = {k.value for k in NodeKind}
    unknown = [k for k in kinds if str(k) not in known]
    if unknown:
        raise InvalidInputError(f"{what} names unknown node kind(s) {unknown}; the kinds are {sorted(known)}.")
    return frozenset(str(k) for k in kinds)


def decompose(ctx: PromptContext, target: Target) -> Decomposition:
    """Split ``target`` into the contributions of everything upstream of it."""
    if not isinstance(ctx, PromptContext):
        raise InvalidInputError(f"decompose takes a PromptContext (prompt_context(model, transcoders, "
                                f"prompt)), got {type(ctx).__name__}.")
    if not isinstance(target, Target):
        raise InvalidInputError(f"decompose takes a Target (logit_diff_target, feature_target, ...), got "
                                f"{type(target).__name__} {target!r:.60}.")
    S, t = target.stage, target.token
    v = target.direction.double()                        # [d_model]; small sums in float64
    w = ctx.weights
    n_attn = (S + 1) // 2     # attention l writes before stage 2l+1
    n_mlp = S // 2            # MLP l writes before stage 2l+2

    # Heads: pattern[l,h,t,s] × (v[l,s,h] · (W_O[l,h] v_l)), where v_l is v pulled
    # back through attention l's post-norm (Gemma 2; v itself elsewhere).
    v_attn = torch.stack([ctx.attn_write_reading(l, t, v) for l in range(n_attn)]) \
        if n_attn else v.new_zeros(0, v.shape[0])                              # [n_attn, d_model]
    Wo_v = torch.einsum("lhed,ld->lhe", w.W_O[:n_attn].double(), v_attn)       # [n_attn, H, d_head]
    ov_img = torch.einsum("lshe,lhe->lhs", ctx.v[:n_attn], Wo_v)               # [n_attn, H, pos]
    heads = ctx.pattern[:n_attn, :, t, :] * ov_img                             # [n_attn, H, pos]
    attn_bias = (w.b_O[:n_attn].double() * v_attn).sum(-1)                     # [n_attn]

    features, connections, acts_at, dec_bias, error, skip, mlp = {}, {}, {}, {}, {}, {}, {}
    if ctx.transcoders.is_cross_layer:
        _decompose_clt(ctx, t, v, n_mlp, features, connections, acts_at, dec_bias, error, mlp)
    for l in range(n_mlp if not ctx.transcoders.is_cross_layer else 0):
        true_out = float(ctx.mlp_out[l, t] @ v)
        if not ctx.has_transcoder(l):
            mlp[l] = true_out
            continue
        tc = ctx.transcoders[l]
        v_mlp = ctx.mlp_write_reading(l, t, v)                                 # [d_model]
        vt = v_mlp.to(tc.dtype)
        conn = tc.W_dec @ vt                                                   # [d_sae] input-invariant
        acts = ctx.feature_acts(l)[t]                                          # [d_sae] input-dependent
        connections[l] = conn
        acts_at[l] = acts
        features[l] = acts.double() * conn.double()
        dec_bias[l] = float(tc.b_dec_out.double() @ v_mlp)
        if tc.W_skip is not None:
            skip[l] = float(ctx.mlp_in[l, t].double() @ (tc.W_skip.double() @ v_mlp))
        # error · v = (true MLP write − transcoder write) · v, with the transcoder
        # write's projection summed from the same terms as above, so that rounding
        # in the (often large) error does not break conservation.
        error[l] = true_out - (float(features[l].sum()) + dec_bias[l] + skip.get(l, 0.0))
    return Decomposition(ctx=ctx, target=target, embed=float(ctx.embed[t] @ v),
                         pos_embed=float(ctx.pos_embed[t] @ v), heads=heads, attn_bias=attn_bias,
                         features=features, connections=connections, acts=acts_at, dec_bias=dec_bias, error=error,
                         skip=skip, mlp=mlp, offset=float(target.offset))


def _decompose_clt(ctx: PromptContext, t: int, v: torch.Tensor, n_mlp: int, features, connections,
                   acts_at, dec_bias, error, mlp) -> None:
    """The MLP part of :func:`decompose` for a cross-layer transcoder: feature g
    of layer s writes to every MLP l with s ≤ l < n_mlp, so its connection is
    ``Σ_l W_dec_s[g, l − s] · v_l`` (v_l: v through layer l's output norm,
    if any), and layer l's error is its true write minus the writes of all
    features of layers ≤ l and its bias. Connections are computed for the
    features active on the prompt (only their decoder rows are read); the
    others are zero."""
    tcs = ctx.transcoders
    v_out = {l: ctx.mlp_write_reading(l, t, v) for l in range(n_mlp)}       # layer -> [d_model]
    written = {l: 0.0 for l in range(n_mlp)}                              # Σ feature writes · v_l
    for s in [s for s in tcs.layers if s < n_mlp]:
        idx, rows = ctx.active_decoder_rows(s)                            # [k], [k, n_targets, d_model]
        acts = ctx.feature_acts(s)[t]                                     # [d_sae]
        a_k = acts.index_select(0, idx.to(acts.device)).double()          # [k]
        conn_k = torch.zeros(idx.numel(), dtype=torch.float64, device=a_k.device)
        for l in range(s, n_mlp):
            c = rows[:, l - s].double() @ v_out[l].to(rows.device)        # [k]
            conn_k += c
            written[l] += float(a_k @ c)
        conn = torch.zeros(acts.shape[0], dtype=torch.float64, device=a_k.device)
        conn[idx.to(conn.device)] = conn_k
        connections[s], acts_at[s] = conn, acts
        features[s] = acts.double() * conn
    for l in range(n_mlp):
        true_out = float(ctx.mlp_out[l, t] @ v)
        dec_bias[l] = float(tcs.output_bias(l).double() @ v_out[l])
        error[l] = true_out - (written[l] + dec_bias[l])


@torch.no_grad()
def next_target(ctx: PromptContext, target: Target, node: Node,
                value: float | None = None) -> Target | None:
    """The target one step upstream through ``node``, whose value on the prompt
    equals ``node``'s contribution to ``target``; None for leaves. ``value``
    (that contribution, when the caller has it) saves recomputing it."""
    _check_node(node)
    v = target.direction.double()
    w = ctx.weights
    if node.kind == "feature":
        l, g, t = node.layer, node.index, node.token
        tc = ctx.transcoders[l]
        if ctx.transcoders.is_cross_layer:                 # writes to every MLP before the target
            rows = ctx.feature_decoder(l, g).double()                          # [n_targets, d_model]
            conn = sum(float(rows[j] @ ctx.mlp_write_reading(l + j, t, v).to(rows.device))
                       for j in range(max(0, target.stage // 2 - l)))
        else:
            conn = float(tc.W_dec[g] @ ctx.mlp_write_reading(l, t, v).to(tc.dtype))
        direction, offset = encoder_reading(ctx, l, g, t)
        if value is None:
            value = conn * float(ctx.feature_acts(l)[t, g])
        return Target(node, 2 * l + 1, t, conn * direction, conn * offset, value,
                      label=f"{node.label()} -> {target.label}")
    if node.kind == "head":
        l, h, t, s = node.layer, node.index, node.token, node.source
        a = float(ctx.pattern[l, h, t, s])
        Wo_v = w.W_O[l, h].double() @ ctx.attn_write_reading(l, t, v)          # [d_head]
        direction, ln_offset = ctx.head_input_reading(l, s, w.W_V[l, h].double() @ Wo_v)
        direction = a * direction                                              # [d_model]
        offset = a * (ln_offset + float(w.b_V[l, h].double() @ Wo_v))
        if value is None:
            value = a * float(ctx.v[l, s, h] @ Wo_v)
        return Target(node, 2 * l, s, direction, offset, value, label=f"{node.label()} -> {target.label}")
    if node.kind == "skip":
        l, t = node.layer, node.token
        tc = ctx.transcoders[l]
        raw = tc.W_skip.double() @ ctx.mlp_write_reading(l, t, v)              # [d_model]
        d, offset = ctx.transcoder_input_reading(l, t, raw)
        if value is None:
            value = float(ctx.mlp_in[l, t].double() @ raw)
        return Target(node, 2 * l + 1, t, d, offset, value, label=f"{node.label()} -> {target.label}")
    return None


def encoder_reading(ctx: PromptContext, layer: int, feature: int, token: int
                     ) -> tuple[torch.Tensor, float]:
    """Direction in the raw residual stream at stage 2*layer+1 and constant
    such that ``direction · resid + offset`` is the feature's pre-activation."""
    tc = ctx.transcoders[layer]
    w_enc = tc.W_enc[:, feature].double()                                      # [d_model]
    offset = float(tc.b_enc[feature].double() - tc.b_dec.double() @ w_enc)
    direction, norm_offset = ctx.transcoder_input_reading(layer, token, w_enc)
    return direction, offset + norm_offset
