"""Growing a path search's circuit graph one node at a time: the computation
behind the graph widget's "expand" button (the widget only calls it)."""
from __future__ import annotations

from typing import Mapping

from ..errors import InvalidInputError, as_count
from .graph import CircuitGraph
from .paths import Path, PathSearchResult, find_paths


class PathGraphExpander:
    """Keeps a path search's paths and grows them when a node is expanded.

    ``expand(node_id)`` takes every kept path that ends at that node and runs
    the library's path search (:func:`tc_explore.circuits.find_paths`, one
    iteration, ``branches`` contributors) from the node's next target — the
    target one step upstream whose value is the node's contribution — then
    appends the found contributors to the path. The graph is rebuilt with
    :meth:`CircuitGraph.from_paths`, on a copy of the search result whose
    iteration numbers mark exactly the expanded paths (so that "pruned
    remainder" nodes appear for expanded nodes only, as in a plain search).
    """

    def __init__(self, result, branches: int | None = None, sum_over_tokens: bool = False,
                 slug: str = "tc-explore-graph"):
        if not isinstance(result, PathSearchResult):
            raise InvalidInputError(f"Expected a PathSearchResult from tc_explore.circuits.find_paths, "
                                    f"got {type(result).__name__}.")
        if result.ctx is None:
            raise InvalidInputError("This PathSearchResult has no PromptContext (ctx); run "
                                    "find_paths with a context from prompt_context.")
        if sum_over_tokens:
            raise InvalidInputError("Expanding nodes needs per-token nodes; use sum_over_tokens=False.")
        self.result = result
        self.branches = result.branches if branches is None else as_count(branches, "branches")
        self.slug = slug
        self.paths = list(result.paths)
        # paths whose head node was decomposed: by the search (every iteration but the last) ...
        self._expanded_keys = {p.key() for p in self.paths
                               if p.iteration < result.iterations and p.head.next_target is not None}
        self._graph = None

    def _result_for_graph(self):
        big = 1 << 30
        paths = [Path(p.target, p.contributions, 0 if p.key() in self._expanded_keys else big)
                 for p in self.paths]
        r = self.result
        return PathSearchResult(r.target, paths, big, r.branches, r.mode,
                                n_decompositions=r.n_decompositions, ctx=r.ctx, ranking=r.ranking,
                                root_cap=r.root_cap)

    def graph(self):
        """The current :class:`CircuitGraph`."""
        if self._graph is None:
            self._graph = CircuitGraph.from_paths(self._result_for_graph(), slug=self.slug)
        return self._graph

    def _paths_ending_at(self, node_id: str) -> list:
        graph = self.graph()
        if node_id not in graph.nodes:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        node = graph.nodes[node_id].node
        return [p for p in self.paths if p.head.node == node]

    def expandable(self, record: Mapping) -> bool:
        """True if the node has a kept path that ends at it, can be traced
        (a feature, head or skip term) and was not decomposed yet."""
        nid = str(record.get("node_id"))
        if nid not in self.graph().nodes:
            return False
        return any(p.head.next_target is not None and p.key() not in self._expanded_keys
                   for p in self._paths_ending_at(nid))

    def expand(self, node_id: str):
        """Trace ``node_id`` one step further; returns the new CircuitGraph."""
        todo = [p for p in self._paths_ending_at(node_id)
                if p.head.next_target is not None and p.key() not in self._expanded_keys]
        if not todo:
            raise InvalidInputError(f"Node {node_id!r} cannot be traced further (a leaf such as an "
                                    "embedding, error or bias, or already expanded).")
        ctx = self.result.ctx
        for p in todo:
            sub = find_paths(ctx, p.head.next_target, iterations=1, branches=self.branches,
                             mode=self.result.mode, ranking=self.result.ranking)
            for q in sub.top():
                self.paths.append(Path(p.target, p.contributions + q.contributions, p.iteration + 1))
            self._expanded_keys.add(p.key())
        self._graph = None
        return self.graph()
