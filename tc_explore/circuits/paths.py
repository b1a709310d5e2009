"""Greedy search for the computational paths that matter most to a target,
as in Dunefsky, Chlenski & Nanda (2024): from the target, take its top
contributors; then, for a number of iterations, expand the paths found so far
by their own top contributors and keep the best ``branches`` extensions.

A path is a chain target ← n1 ← n2 ← … ← nk; its attribution is nk's
contribution to the target *through* that chain (the chain's connections are
folded into each step's ``next_target`` direction, see ``contributions``).

Scores:

* ``"raw"``: the attribution itself.
* ``"capped"``: zero-ablation semantics. Removing an upstream node can at most
  switch off a feature on the path (a ReLU/JumpReLU feature cannot go below 0),
  so a path's effect is capped, in magnitude, by the smallest effect along the
  path of any feature it passes through: ``|capped| = min(|raw|, min over
  features f on the path (excluding nk) |attribution of the prefix ending at f|)``,
  where the prefix attribution is that feature's activation times its gain to the target.

Ranking is by |score| with ties broken by the nodes' kinds, layers, indices and
tokens, so a search is deterministic. All decompositions reuse the prompt's
:class:`PromptContext`: no encoding is recomputed per step.

``ranking="paper"`` reproduces the path lists of the paper's own code
(``greedy_get_top_paths`` in Dunefsky et al.'s ``transcoder_circuits``) on the
same weights. Its differences from the default, each a choice of that code:

* ranks by the signed score (largest first), not by |score|: paths that lower
  the target never make the cut while enough raise it;
* offers only transcoder features, attention (head, source) pairs and the
  embedding, not transcoder errors, biases, skip terms or offsets; its
  ``embed`` node is token + position embedding together (the code reads
  ``blocks.0.hook_resid_pre``), so the ``pos_embed`` kind does not appear;
* never uses position 0 (the BOS token) as an attention source;
* does not expand layer-0 heads (their sources' embeddings are not offered);
* keeps at most ``n_heads`` (head, source) pairs per attention layer as
  candidates for each target, before the best ``branches`` of all are taken;
* in ``"capped"`` mode, caps signed scores: a path's score is at most the
  (capped) score of the last feature before its end, and of the target
  feature's activation when the target is a feature; negative scores are not
  capped.

What it does not copy: the paper's code reads a feature target through its
LayerNorm as ``w × (w · ln(x)) / (w · x)`` (no centring). That direction gives
the right total ``w · ln(x)``, but not each part's share: a part adds
``centre(w) · part / scale`` with the LayerNorm scale frozen, which is what
ours read, so our contributions (with the encoder offset) sum exactly to the
pre-activation. The two agree on mean-zero parts (the model's centred writing
weights) and differ on transcoder decoder rows, which are not centred. Its
logit target reads the last layer's
``resid_post`` without ``ln_final``: ``residual_target(ctx, W_U[:, a] −
W_U[:, b], n_layers - 1, "resid_post")`` is that readout. Where fewer than
``branches`` contributions are positive, the paper's code fills its lists with
zero-valued (inactive) features in an order torch leaves unspecified; the
preset never keeps a zero contribution, and breaks ties between equal scores by
the larger raw attribution, then by the nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Literal

import pandas as pd
import torch

from ..errors import InvalidInputError, as_count
from .contributions import (Contribution, Decomposition, Node, PromptContext, Target, check_kinds, decompose,
                            next_target)

__all__ = ["Path", "PathSearchResult", "find_paths"]

Mode = Literal["raw", "capped"]
Ranking = Literal["magnitude", "paper"]
PAPER_KINDS = ("feature", "head", "embed")


@dataclass
class Path:
    """target ← contributions[0] ← contributions[1] ← …"""
    target: Target = field(repr=False)
    contributions: tuple[Contribution, ...]
    iteration: int

    @property
    def nodes(self) -> tuple[Node, ...]:
        return (self.target.node,) + tuple(c.node for c in self.contributions)

    @property
    def attribution(self) -> float:
        """Raw attribution: the last node's contribution to the target through this path."""
        return self.contributions[-1].value

    @property
    def capped(self) -> float:
        raw = self.attribution
        limits = [abs(c.value) for c in self.contributions[:-1] if c.node.kind == "feature"]
        mag = min([abs(raw)] + limits)
        return mag if raw >= 0 else -mag

    def score(self, mode: Mode = "raw") -> float:
        return self.capped if mode == "capped" else self.attribution

    @property
    def head(self) -> Contribution:
        return self.contributions[-1]

    def key(self) -> tuple:
        return tuple(n.sort_key() for n in self.nodes)

    def label(self) -> str:
        return " <- ".join([self.target.label] + [c.node.label() for c in self.contributions])


@dataclass
class PathSearchResult:
    target: Target
    paths: list[Path]             # every kept path, iteration by iteration, best first within one
    iterations: int
    branches: int
    mode: Mode
    n_decompositions: int = 0     # how many decompositions the search ran
    ctx: PromptContext | None = field(default=None, repr=False)
    ranking: Ranking = "magnitude"
    root_cap: float | None = None  # ranking="paper", feature target: its activation (the first cap)

    def capped_of(self, path: Path) -> float:
        """The path's capped score under this search's ranking (see ``find_paths``)."""
        return _paper_capped(path, self.root_cap) if self.ranking == "paper" else path.capped

    def score_of(self, path: Path) -> float:
        return self.capped_of(path) if self.mode == "capped" else path.attribution

    def top(self, k: int | None = None) -> list[Path]:
        """All paths ranked as the search ranked them (by |score|, or by signed
        score for ``ranking="paper"``; deterministic tie-break)."""
        ranked = sorted(self.paths, key=lambda p: _rank_key(p, self))
        return ranked if k is None else ranked[:as_count(k, "k", minimum=0)]

    def to_pandas(self) -> pd.DataFrame:
        rows = [dict(iteration=p.iteration, length=len(p.contributions), attribution=p.attribution,
                     capped=self.capped_of(p), score=self.score_of(p), path=p.label(),
                     start_kind=p.head.node.kind, start_layer=p.head.node.layer,
                     start_index=p.head.node.index, start_token=p.head.node.token,
                     start_source=p.head.node.source) for p in self.top()]
        df = pd.DataFrame(rows, columns=["iteration", "length", "attribution", "capped", "score", "path",
                                         "start_kind", "start_layer", "start_index", "start_token",
                                         "start_source"])
        for col in ("start_layer", "start_index", "start_token", "start_source"):
            df[col] = df[col].astype("Int64")   # integers, blank where a kind has none
        return df


def _rank_key(path: Path, result: PathSearchResult) -> tuple:
    score = result.score_of(path)
    if result.ranking == "paper":
        return (-score, -path.attribution) + path.key()
    return (-abs(score),) + path.key()


def _paper_capped(path: Path, root_cap: float | None) -> float:
    """The paper code's cap: walking down the path, each score is at most the
    capped score of the last feature before it (the target feature's
    activation at the start, if the target is a feature); signed."""
    cap, value = root_cap, path.attribution
    for c in path.contributions:
        value = c.value if cap is None or c.value <= cap else cap
        if c.node.kind == "feature":
            cap = value
    return value


def _paper_contributions(dec: Decomposition, k: int, exclude: Collection[str]) -> list[Contribution]:
    """The paper code's candidates for one target, best ``k`` by signed value:
    nonzero features, per attention layer the best ``n_heads`` (head, source)
    pairs with source > 0, and the embedding (token + position). Layer-0 heads
    and the embedding are leaves."""
    ctx, t = dec.ctx, dec.target.token
    scored: list[tuple[float, Node]] = []
    if "feature" not in exclude:
        for layer, vals in sorted(dec.features.items()):
            for g in torch.nonzero(vals).flatten().tolist():
                scored.append((float(vals[g]), Node("feature", layer=layer, index=g, token=t)))
    if "head" not in exclude and dec.heads.shape[-1] > 1:
        n_heads, n_src = dec.heads.shape[1], dec.heads.shape[2] - 1
        for layer in range(dec.heads.shape[0]):
            flat = dec.heads[layer, :, 1:].reshape(-1)                           # [H * (pos - 1)]
            top = torch.topk(flat, min(k, n_heads, flat.numel()))
            for v, i in zip(top.values.tolist(), top.indices.tolist()):
                if v != 0.0:
                    scored.append((v, Node("head", layer=layer, index=i // n_src, token=t,
                                           source=i % n_src + 1)))
    embed = dec.embed + dec.pos_embed
    if "embed" not in exclude and embed != 0.0:
        scored.append((embed, Node("embed", index=int(ctx.tokens[t]), token=t)))
    scored.sort(key=lambda vn: (-vn[0],) + vn[1].sort_key())
    out = []
    for v, node in scored[:k]:
        if node.kind == "feature":
            c = dec._feature_contribution(node.layer, node.index, targets=False)
        elif node.kind == "head":
            c = dec._head_contribution(node.layer, node.index, node.source, targets=False)
        else:
            c = Contribution(node, v)
        if node.kind == "feature" or (node.kind == "head" and node.layer > 0):
            c.next_target = next_target(ctx, dec.target, node, value=c.value)
        out.append(c)
    return out


def find_paths(ctx: PromptContext, target: Target, iterations: int = 3, branches: int = 15,
               mode: Mode = "raw", exclude_kinds: Collection[str] = (),
               ranking: Ranking = "magnitude") -> PathSearchResult:
    """Greedy path search (paper settings: 3 iterations × 15 branches).

    Iteration 1 keeps the target's top ``branches`` contributors; each later
    iteration decomposes the last node of every path kept in the previous
    iteration (leaves — embeddings, biases, errors — are not expanded), and
    keeps the best ``branches`` of all extensions by |score| under ``mode``.
    ``exclude_kinds`` never keeps contributors of those node kinds (e.g.
    ``("error", "attn_bias", "dec_bias", "offset")`` to look only at
    interpretable nodes; a graph counts what they add in its remainders).

    ``ranking="paper"`` follows the paper's code instead (signed ranking; only
    features, heads and the embedding; no BOS source; layer-0 heads not
    expanded; at most ``n_heads`` head candidates per layer; the paper's cap in
    ``"capped"`` mode): see the module docstring for each difference.
    """
    if mode not in ("raw", "capped"):
        raise InvalidInputError(f"mode must be 'raw' or 'capped', got {mode!r}.")
    if ranking not in ("magnitude", "paper"):
        raise InvalidInputError(f"ranking must be 'magnitude' or 'paper', got {ranking!r}.")
    iterations, branches = as_count(iterations, "iterations"), as_count(branches, "branches")
    exclude_kinds = check_kinds(exclude_kinds, "exclude_kinds")
    root_cap = None
    if ranking == "paper" and target.node.kind == "feature":
        root_cap = float(ctx.feature_acts(target.node.layer)[target.node.token, target.node.index])
    result = PathSearchResult(target, [], iterations, branches, mode, ctx=ctx, ranking=ranking,
                              root_cap=root_cap)

    def candidates(t: Target) -> list[Contribution]:
        # Each parent needs at most `branches` children: no other extension of it can make the cut
        # (for the paper's ranking too: its cap never reorders one parent's children).
        if ranking == "paper":
            return _paper_contributions(decompose(ctx, t), branches, exclude_kinds)
        return decompose(ctx, t).contributions(k=branches, exclude=exclude_kinds)

    n_dec = 1
    frontier = [Path(target, (c,), 1) for c in candidates(target) if c.value != 0.0]
    frontier.sort(key=lambda p: _rank_key(p, result))
    frontier = frontier[:branches]
    kept = list(frontier)
    for it in range(2, iterations + 1):
        extensions: list[Path] = []
        for path in frontier:
            nxt = path.head.next_target
            if nxt is None:
                continue
            n_dec += 1
            for c in candidates(nxt):
                if c.value != 0.0:
                    extensions.append(Path(target, path.contributions + (c,), it))
        extensions.sort(key=lambda p: _rank_key(p, result))
        frontier = extensions[:branches]
        kept += frontier
        if not frontier:
            break
    result.paths = kept
    result.n_decompositions = n_dec
    return result
