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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Literal

import pandas as pd

from ..errors import InvalidInputError
from .contributions import Contribution, Node, PromptContext, Target, decompose

__all__ = ["Path", "PathSearchResult", "find_paths"]

Mode = Literal["raw", "capped"]


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

    def top(self, k: int | None = None) -> list[Path]:
        """All paths ranked by |score| (deterministic tie-break)."""
        ranked = sorted(self.paths, key=lambda p: (-abs(p.score(self.mode)), p.key()))
        return ranked if k is None else ranked[:k]

    def to_pandas(self) -> pd.DataFrame:
        rows = [dict(iteration=p.iteration, length=len(p.contributions), attribution=p.attribution,
                     capped=p.capped, score=p.score(self.mode), path=p.label(),
                     start_kind=p.head.node.kind, start_layer=p.head.node.layer,
                     start_index=p.head.node.index, start_token=p.head.node.token,
                     start_source=p.head.node.source) for p in self.top()]
        return pd.DataFrame(rows)


def _rank_key(path: Path, mode: Mode) -> tuple:
    return (-abs(path.score(mode)),) + path.key()


def find_paths(ctx: PromptContext, target: Target, iterations: int = 3, branches: int = 15,
               mode: Mode = "raw", exclude_kinds: Collection[str] = ()) -> PathSearchResult:
    """Greedy path search (paper settings: 3 iterations × 15 branches).

    Iteration 1 keeps the target's top ``branches`` contributors; each later
    iteration decomposes the last node of every path kept in the previous
    iteration (leaves — embeddings, biases, errors — are not expanded), and
    keeps the best ``branches`` of all extensions by |score| under ``mode``.
    ``exclude_kinds`` never keeps contributors of those node kinds (e.g.
    ``("error", "attn_bias", "dec_bias", "offset")`` to look only at
    interpretable nodes; a graph counts what they add in its remainders).
    """
    if mode not in ("raw", "capped"):
        raise InvalidInputError(f"mode must be 'raw' or 'capped', got {mode!r}.")
    for name, val in (("iterations", iterations), ("branches", branches)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise InvalidInputError(f"{name} must be a positive integer, got {val!r}.")
    n_dec = 1
    first = decompose(ctx, target).contributions(k=branches, exclude=exclude_kinds)
    frontier = [Path(target, (c,), 1) for c in first if c.value != 0.0]
    frontier.sort(key=lambda p: _rank_key(p, mode))
    kept = list(frontier)
    for it in range(2, iterations + 1):
        candidates: list[Path] = []
        for path in frontier:
            nxt = path.head.next_target
            if nxt is None:
                continue
            n_dec += 1
            # Each parent needs at most `branches` children: no other extension of it can make the cut.
            for c in decompose(ctx, nxt).contributions(k=branches, exclude=exclude_kinds):
                if c.value != 0.0:
                    candidates.append(Path(target, path.contributions + (c,), it))
        candidates.sort(key=lambda p: _rank_key(p, mode))
        frontier = candidates[:branches]
        kept += frontier
        if not frontier:
            break
    return PathSearchResult(target, kept, iterations, branches, mode, n_decompositions=n_dec, ctx=ctx)
