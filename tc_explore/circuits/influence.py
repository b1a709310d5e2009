"""Influence, pruning and scores of an attribution graph (Ameisen et al. 2025).

All functions take an adjacency matrix ``A`` [n, n] with ``A[target, source]``
the direct effect of ``source`` on ``target`` (rows: the node receiving the
edge), and ``target_weights`` [n]: each output node's weight (a logit's
probability), zero elsewhere.

* The **normalised** adjacency is ``|A|`` with each row divided by its sum
  (rows summing to zero stay zero): the share of a node's direct inputs that
  each source provides.
* A node's **influence** is the weighted total of its normalised effect on the
  outputs over every path: ``w (Â + Â² + …) = w ((I − Â)⁻¹ − I)``, computed by
  power iteration (the graph is acyclic, so the series ends), or in one pass
  over the rows when each node's level (its layer) is known.
* **Pruning** keeps the nodes covering ``node_threshold`` of the total
  influence (outputs and embeddings always kept: a node is kept when the nodes
  more influential than it hold less than ``node_threshold``, its
  :func:`prune_levels`), then the edges covering
  ``edge_threshold`` of the total edge influence among the kept nodes, then
  drops features and errors left without an outgoing edge and features left
  without an incoming one, until nothing changes.
* The **replacement score** is the embeddings' share of the influence that
  embeddings and errors hold together; the **completeness score** the
  influence-weighted fraction of each node's normalised inputs not coming
  from errors.

The dense functions work on any matrix; influence and row sums run over row
blocks of at most ``_BLOCK_ELEMENTS`` entries (32 MiB in float32), so that a
large graph is never copied whole and its |A| is never held but one block at a
time (a full 16-token GPT-2 graph is 18k × 18k).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import InvalidInputError

__all__ = ["normalized_adjacency", "node_influence", "edge_influence", "coverage_threshold",
           "cumulative_influence", "prune_levels", "prune_levels_from_cumulative", "prune_masks",
           "PruneMasks", "graph_scores"]

_ROW_BLOCK = 4096
_BLOCK_ELEMENTS = 2 ** 23


def _block_rows(n_cols: int) -> int:
    """Rows per block of a matrix with ``n_cols`` columns: at most
    ``_BLOCK_ELEMENTS`` entries, between 16 and ``_ROW_BLOCK`` rows."""
    return max(16, min(_ROW_BLOCK, _BLOCK_ELEMENTS // max(n_cols, 1)))


def _row_sums(A: torch.Tensor) -> torch.Tensor:
    """Σ_j |A[i, j]| per row, in float64, over row blocks (no |A| copy)."""
    out = torch.empty(A.shape[0], dtype=torch.float64, device=A.device)
    step = _block_rows(A.shape[1])
    for a in range(0, A.shape[0], step):
        out[a:a + step] = A[a:a + step].abs().sum(1, dtype=torch.float64)
    return out


def normalized_adjacency(A: torch.Tensor) -> torch.Tensor:
    """|A| with every row scaled to sum to one (all-zero rows stay zero)."""
    inv = _inverse_row_sums(A).to(A.dtype)
    return A.abs().mul_(inv[:, None])


def node_influence(A: torch.Tensor, target_weights: torch.Tensor, levels: torch.Tensor | None = None,
                   max_iter: int | None = None) -> torch.Tensor:
    """Influence of every node on the weighted outputs: ``w (Â + Â² + …)``, [n].

    With ``levels`` [n] (any numbers such that every edge goes from a lower
    level to a strictly higher one, as layers do in an attribution graph),
    one pass over the rows from the highest level down gives the exact sum;
    without, power iteration (one pass per path length). Either way ``Â`` is
    applied block by block as ``(x / rowsum) @ |A|``, never stored."""
    n = A.shape[0]
    if A.shape != (n, n) or target_weights.shape != (n,):
        raise InvalidInputError(f"Expected a square adjacency and one weight per node, got "
                                f"{tuple(A.shape)} and {tuple(target_weights.shape)}.")
    inv = _inverse_row_sums(A)
    w = target_weights.to(device=A.device, dtype=torch.float64)
    if levels is not None:
        return _influence_by_levels(A, inv, w, levels.to(A.device), torch.arange(n, device=A.device))
    x = w
    total = torch.zeros(n, dtype=torch.float64, device=A.device)
    max_iter = max_iter if max_iter is not None else n + 1
    for _ in range(max_iter):
        y = x * inv
        nxt = torch.zeros(n, dtype=torch.float64, device=A.device)
        for rows in torch.nonzero(y).flatten().split(_block_rows(n)):
            nxt += (y[rows].to(A.dtype) @ A[rows].abs()).double()
        if not nxt.any():
            return total
        total += nxt
        x = nxt
    raise InvalidInputError("The adjacency matrix has a cycle: influence does not converge. "
                            "An attribution graph's edges must all point from earlier nodes.")


def _inverse_row_sums(rows: torch.Tensor) -> torch.Tensor:
    s = _row_sums(rows)
    return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))


def _influence_by_levels(rows: torch.Tensor, inv: torch.Tensor, w: torch.Tensor, row_level: torch.Tensor,
                         row_node: torch.Tensor) -> torch.Tensor:
    """One pass over ``rows`` (row r belongs to node ``row_node[r]`` and sits at
    ``row_level[r]``), highest level first: when a row is reached, every row
    that can feed its node has been, so its node's influence is final.
    ``w`` [n_nodes] holds the output weights; returns influence [n_nodes]
    (output weights not included)."""
    x = w.clone()                                  # a node's weight + influence so far
    total = torch.zeros_like(w)
    order = torch.argsort(row_level, descending=True, stable=True)
    lv = row_level[order]
    bounds = torch.nonzero(lv[1:] != lv[:-1]).flatten() + 1
    groups = torch.tensor_split(order, bounds.cpu()) if order.numel() else ()
    n_cols = rows.shape[1]
    step = _block_rows(n_cols)
    for group in groups:
        # a level's rows are usually one run of consecutive rows (an attribution
        # graph's nodes are in layer order): then blocks are views, not copies
        run = bool(group.numel()) and int(group[-1] - group[0]) + 1 == group.numel() and \
            bool((group[1:] > group[:-1]).all())
        for r in group.split(step):
            y = x[row_node[r]] * inv[r]
            keep = y != 0
            if not keep.any():
                continue
            if run:
                block, coef = rows[int(r[0]):int(r[-1]) + 1], y
            else:
                block, coef = rows[r[keep]], y[keep]
            add = (coef.to(rows.dtype) @ block.abs()).double()
            x[:n_cols] += add
            total[:n_cols] += add
    return total


def edge_influence(A: torch.Tensor, target_weights: torch.Tensor, levels: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Each edge's share of influence: ``Â[t, s] × (influence[t] + w[t])``, [n, n]."""
    infl = node_influence(A, target_weights, levels) + target_weights.double().to(A.device)
    return normalized_adjacency(A).mul_(infl.to(A.dtype)[:, None])


def _sorted_coverage(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive scores sorted largest first, their cumulative fraction of the total)."""
    flat = scores.reshape(-1)
    srt = torch.sort(flat[flat > 0].double(), descending=True).values
    return srt, torch.cumsum(srt, 0) / srt.sum()


def coverage_threshold(scores: torch.Tensor, fraction: float) -> float:
    """The smallest score among the highest-scoring entries that together
    reach ``fraction`` of the total; keep entries ``>=`` it. A fraction of 1
    keeps every positive entry (whatever the rounding of the running sum)."""
    if not 0.0 <= fraction <= 1.0:
        raise InvalidInputError(f"A threshold must be a fraction in [0, 1], got {fraction!r}.")
    srt, cum = _sorted_coverage(scores)
    if srt.numel() == 0:
        return 0.0
    if fraction >= 1.0:
        return float(srt[-1])
    i = int(torch.searchsorted(cum, torch.tensor([fraction], dtype=torch.float64, device=cum.device)))
    return float(srt[min(i, srt.numel() - 1)])


def prune_levels(influence: torch.Tensor) -> torch.Tensor:
    """[n] float64: the node threshold each node needs. Pruning at
    ``node_threshold=t`` keeps node ``i`` exactly when ``levels[i] < t``:
    ``levels[i]`` is the fraction of the total influence held by the nodes
    strictly more influential than ``i`` (the running sum
    :func:`coverage_threshold` uses, so the two agree to the last bit), −1 for
    the most influential (kept at every threshold) and +inf for nodes without
    influence (never kept). The graph widget's prune slider shows the nodes
    with ``levels < slider`` (they are written to the graph file)."""
    infl = influence.double()
    out = torch.full_like(infl, math.inf)
    positive = infl > 0
    srt, cum = _sorted_coverage(infl)
    if srt.numel() == 0:
        return out
    # first index of each node's value among the sorted scores (ties share it)
    first = torch.searchsorted(-srt, -infl[positive], side="left")
    before = torch.cat([torch.tensor([-1.0], dtype=torch.float64, device=cum.device), cum[:-1]])
    out[positive] = before[first]
    return out


def prune_levels_from_cumulative(cumulative: torch.Tensor) -> torch.Tensor:
    """:func:`prune_levels` of a graph file that has only each node's
    cumulative fraction of influence (circuit-tracer's files): the largest
    cumulative fraction below the node's own (−1 for the first; equal
    fractions share a level); NaN entries (nodes without one) get +inf. Exact
    for an unpruned file without ties in influence."""
    cum = cumulative.double()
    out = torch.full_like(cum, math.inf)
    known = ~torch.isnan(cum)
    if not known.any():
        return out
    srt = torch.sort(cum[known]).values
    first = torch.searchsorted(srt, cum[known], side="left")
    before = torch.cat([torch.tensor([-1.0], dtype=torch.float64, device=cum.device), srt[:-1]])
    out[known] = before[first]
    return out


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Each node's cumulative fraction of influence when nodes are sorted by
    influence, largest first (what graph viewers prune on: smaller = more important)."""
    infl = influence.double()
    order = torch.argsort(infl, descending=True, stable=True)
    cum = torch.cumsum(infl[order], 0)
    total = cum[-1] if cum.numel() and cum[-1] > 0 else torch.tensor(1.0, dtype=torch.float64)
    out = torch.zeros_like(infl)
    out[order] = cum / total
    return out


class PruneMasks(NamedTuple):
    node_mask: torch.Tensor       # [n] bool
    edge_mask: torch.Tensor       # [n, n] bool
    influence: torch.Tensor       # [n] node influence on the unpruned graph
    cumulative: torch.Tensor      # [n] cumulative fraction of influence


def prune_masks(A: torch.Tensor, target_weights: torch.Tensor, always_keep: torch.Tensor,
                is_feature: torch.Tensor, node_threshold: float = 0.8,
                edge_threshold: float = 0.98, levels: torch.Tensor | None = None) -> PruneMasks:
    """Masks of the nodes and edges to keep (see the module docstring).

    ``always_keep`` [n] bool: outputs and embeddings; ``is_feature`` [n] bool:
    nodes that need an incoming edge to stay."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise InvalidInputError(f"{name} must be a fraction in [0, 1], got {t!r}.")
    infl = node_influence(A, target_weights, levels)
    node_mask = prune_levels(infl) < node_threshold
    node_mask |= always_keep.to(node_mask.device)
    pruned = A * (node_mask[:, None] & node_mask[None, :]).to(A.dtype)
    scores = edge_influence(pruned, target_weights, levels)
    edge_mask = (scores >= coverage_threshold(scores, edge_threshold)) & (scores > 0)
    del scores, pruned
    droppable = ~always_keep.to(node_mask.device)
    needs_input = is_feature.to(node_mask.device)
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        keep = node_mask.clone()
        keep[droppable] &= edge_mask[:, droppable].any(0)         # an outgoing edge
        keep[needs_input] &= edge_mask[needs_input].any(1)        # an incoming edge
        if torch.equal(keep, node_mask):
            break
        node_mask = keep
    return PruneMasks(node_mask, edge_mask, infl, cumulative_influence(infl))


def graph_scores(A: torch.Tensor, target_weights: torch.Tensor, is_error: torch.Tensor,
                 is_embedding: torch.Tensor, levels: torch.Tensor | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) of a graph."""
    infl = node_influence(A, target_weights, levels)
    emb = float(infl[is_embedding].sum())
    err = float(infl[is_error].sum())
    replacement = emb / (emb + err) if emb + err > 0 else float("nan")
    s = _row_sums(A)
    err_share = A[:, is_error].abs().sum(1, dtype=torch.float64)
    err_frac = torch.where(s > 0, err_share / torch.where(s > 0, s, torch.ones_like(s)),
                           torch.zeros_like(s))
    out_infl = infl + target_weights.double().to(A.device)
    completeness = float(((1 - err_frac) * out_infl).sum() / out_infl.sum()) \
        if out_infl.sum() > 0 else float("nan")
    return replacement, completeness
