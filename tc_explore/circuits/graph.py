"""``CircuitGraph``: the paths of a search assembled into one graph.

Nodes are transcoder features, attention heads (with destination and source
token), token and position embeddings, transcoder error nodes, whole MLPs of
layers without a transcoder, skip terms, bias / offset terms, the target, and
one "pruned remainder" node per expanded node (what its contributors not kept
by the search add up to). Edges point upstream → downstream and carry signed
weights **in units of the target**: the weight of u → w is the sum, over the
found paths in which u feeds w directly, of those paths' attributions (u's
contribution to the target through that chain). Because every expanded node's
contributions sum exactly to its own attribution, for every expanded node:
Σ incoming weights (remainder included) = Σ over its occurrences of its
attribution.

``sum_over_tokens=True`` merges nodes that differ only in token position (and a
head's source), summing their weights.

``to_json`` writes the graph JSON of circuit-tracer / Neuronpedia's viewer,
with every field it reads, plus our own node kinds and ``tc_*`` fields; the
layout, node ids and weight units are in ``docs/graph_json.md``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path as FilePath
from typing import Any

import pandas as pd
import torch

from ..errors import InvalidInputError
from .contributions import Node, NodeKind
from .graph_json import (cantor, embedding_node_id, error_node_id, feature_node_id, load_graph_dict,
                         logit_clerp)
from .paths import PathSearchResult

__all__ = ["GraphNode", "GraphEdge", "CircuitGraph", "cantor"]

SCHEMA_VERSION = 1
K = NodeKind
# graph JSON's feature_type of each node kind (circuit-tracer's vocabulary where it has one)
FEATURE_TYPES = {
    K.FEATURE: "cross layer transcoder", K.ERROR: "mlp reconstruction error", K.EMBED: "embedding",
    K.LOGIT: "logit", K.HEAD: "attention head", K.POS_EMBED: "position embedding", K.MLP: "mlp",
    K.SKIP: "transcoder skip", K.ATTN_BIAS: "bias", K.DEC_BIAS: "bias", K.OFFSET: "bias",
    K.DIRECTION: "residual direction", K.REMAINDER: "pruned remainder",
}


@dataclass
class GraphNode:
    id: str
    node: Node
    influence: float = 0.0
    activation: float | None = None
    label: str = ""
    token_id: int | None = None     # embeddings and logits: the vocabulary id
    is_target: bool = False
    token_prob: float = 0.0
    # Cumulative fraction of influence, as graph viewers read ``influence``
    # (set when read from a file; smaller = more important).
    cumulative: float | None = field(default=None, compare=False)


@dataclass
class GraphEdge:
    source: str
    target: str
    weight: float


@dataclass
class CircuitGraph:
    nodes: dict[str, GraphNode]
    edges: list[GraphEdge]
    target_id: str
    prompt_tokens: list[str] = field(default_factory=list)
    n_layers: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- building ----------------------------------------------------------------------
    @classmethod
    def from_paths(cls, result: PathSearchResult, ctx=None, sum_over_tokens: bool = False,
                   include_remainder: bool = True, slug: str = "tc-explore-graph") -> "CircuitGraph":
        """Assemble the paths of ``result`` (from ``find_paths``) into a graph.
        ``ctx`` defaults to the search's PromptContext."""
        if not isinstance(result, PathSearchResult):
            raise InvalidInputError(f"from_paths takes the PathSearchResult of find_paths, got "
                                    f"{type(result).__name__}.")
        ctx = ctx if ctx is not None else result.ctx
        n_layers = ctx.n_layers

        def key(node: Node) -> Node:
            return replace(node, token=None, source=None) if sum_over_tokens else node

        # Pass 1: accumulate per (merged) node and per edge, remembering each
        # merged node's largest member for its position and activation.
        influence: dict[Node, float] = {}
        best: dict[Node, tuple[float, Node, float | None]] = {}
        edges: dict[tuple[Node, Node], float] = {}

        def visit(node: Node, attribution: float, activation: float | None):
            k = key(node)
            influence[k] = influence.get(k, 0.0) + attribution
            if k not in best or abs(attribution) > best[k][0]:
                best[k] = (abs(attribution), node, activation)

        target = result.target
        visit(target.node, target.value, target.value)
        children_sum: dict[tuple, float] = {}
        for p in result.paths:
            parent = p.nodes[-2]
            c = p.head
            visit(c.node, c.value, c.activation)
            e = (key(c.node), key(parent))
            edges[e] = edges.get(e, 0.0) + c.value
            prefix = tuple(p.nodes[:-1])
            children_sum[prefix] = children_sum.get(prefix, 0.0) + c.value

        remainders: dict[Node, float] = {}
        if include_remainder:
            expanded: list[tuple[tuple, Node, float]] = [((target.node,), target.node, target.value)]
            expanded += [(tuple(p.nodes), p.head.node, p.attribution) for p in result.paths
                         if p.iteration < result.iterations and p.head.next_target is not None]
            for prefix, node, value in expanded:
                rem = value - children_sum.get(prefix, 0.0)
                if rem != 0.0:
                    remainders[key(node)] = remainders.get(key(node), 0.0) + rem

        # Pass 2: ids and node records.
        def pos_str(node: Node) -> str:
            return "all" if sum_over_tokens else str(node.token)

        custom_logit = target.node.kind == "logit" and not (
            target.logit_tokens is not None and len(target.logit_tokens[0]) == 1
            and not target.logit_tokens[1])
        d_vocab = int(ctx.weights.W_U.shape[1])

        def node_id(k: Node) -> str:
            p = pos_str(k)
            if k.kind == "feature":
                return feature_node_id(k.layer, k.index, p)
            if k.kind == "error":
                return error_node_id(k.layer, p)
            if k.kind == "embed":
                return embedding_node_id(k.index, p)
            if k.kind == "logit":
                return f"{n_layers + 1}_{d_vocab if custom_logit and k == key(target.node) else k.index}_{p}"
            if k.kind == "head":
                src = "all" if sum_over_tokens else str(k.source)
                return f"A_{k.layer}_{k.index}_{p}_{src}"
            if k.kind == "pos_embed":
                return f"P_{p}"
            if k.kind in ("mlp", "skip"):
                return f"{k.kind[0].upper()}_{k.layer}_{p}"
            if k.kind in ("attn_bias", "dec_bias", "offset"):
                return f"B_{k.kind}_{k.layer}_{k.index}_{p}"
            if k.kind == "direction":
                return f"D_{k.layer}_{p}"
            raise ValueError(f"unknown node kind {k.kind!r}")

        probs = None
        if target.node.kind == "logit":
            logits = ctx.logits_at(target.token)
            probs = torch.softmax(logits, -1)
        nodes: dict[str, GraphNode] = {}
        ids: dict[Node, str] = {}
        for k, infl in influence.items():
            nid = node_id(k)
            ids[k] = nid
            member = best[k][1]
            gn = GraphNode(nid, replace(k, token=member.token, source=member.source)
                           if sum_over_tokens else k, influence=infl, activation=best[k][2],
                           label=_clerp(ctx, k, member, target))
            if k.kind == "embed":
                gn.token_id = k.index
            if k.kind == "logit" and custom_logit:
                # circuit-tracer's custom target: a virtual token id, the label as its "token"
                gn.token_id, gn.token_prob = d_vocab, 1.0
                gn.label = logit_clerp(target.label, 1.0)
            elif k.kind == "logit":
                gn.token_id = k.index
                gn.token_prob = float(probs[k.index])
                gn.label = logit_clerp(ctx.model.tokenizer.decode([k.index]), gn.token_prob)
            nodes[nid] = gn
        tid = ids[key(target.node)]
        nodes[tid].is_target = True
        out_edges = [GraphEdge(ids[u], ids[w], wt) for (u, w), wt in edges.items()]
        for k, rem in remainders.items():
            parent = ids[k]
            rid = f"R_{parent}"
            nodes[rid] = GraphNode(rid, Node("remainder", layer=k.layer, index=k.index,
                                             token=nodes[parent].node.token), influence=rem,
                                   label=f"pruned remainder of {nodes[parent].label or parent}")
            out_edges.append(GraphEdge(rid, parent, rem))
        out_edges.sort(key=lambda e: (e.target, e.source))
        meta = dict(slug=slug, scan=ctx.transcoders.name, transcoder_list=[],
                    prompt_tokens=list(ctx.token_strs), prompt="".join(ctx.token_strs),
                    node_threshold=None, schema_version=SCHEMA_VERSION,
                    tc_explore=dict(target_label=target.label, target_value=target.value,
                                    iterations=result.iterations, branches=result.branches,
                                    mode=result.mode, sum_over_tokens=sum_over_tokens,
                                    weight_units="target"))
        return cls(nodes, out_edges, tid, list(ctx.token_strs), n_layers, meta)

    # -- views -------------------------------------------------------------------------
    def to_pandas(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(nodes, edges) DataFrames."""
        nodes = pd.DataFrame([dict(id=n.id, kind=n.node.kind, layer=n.node.layer, index=n.node.index,
                                   token=n.node.token, source=n.node.source, influence=n.influence,
                                   activation=n.activation, label=n.label, is_target=n.is_target)
                              for n in self.nodes.values()],
                             columns=["id", "kind", "layer", "index", "token", "source", "influence",
                                      "activation", "label", "is_target"])
        edges = pd.DataFrame([dict(source=e.source, target=e.target, weight=e.weight)
                              for e in self.edges], columns=["source", "target", "weight"])
        return nodes, edges

    def to_networkx(self):
        import networkx as nx
        g = nx.DiGraph(**{k: v for k, v in self.metadata.items() if k != "tc_explore"})
        for n in self.nodes.values():
            g.add_node(n.id, kind=n.node.kind, layer=n.node.layer, index=n.node.index,
                       token=n.node.token, source=n.node.source, influence=n.influence,
                       activation=n.activation, label=n.label, is_target=n.is_target)
        for e in self.edges:
            g.add_edge(e.source, e.target, weight=e.weight)
        return g

    def incoming(self, node_id: str) -> list[GraphEdge]:
        if node_id not in self.nodes:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        return [e for e in self.edges if e.target == node_id]

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        mags = torch.tensor([abs(n.influence) for n in self.nodes.values()], dtype=torch.float64)
        from .influence import cumulative_influence
        cum = cumulative_influence(mags).tolist() if len(mags) else []
        nodes, own = [], -1
        for n, c in zip(self.nodes.values(), cum):
            k = n.node
            if k.kind == "feature":
                feature, js = cantor(k.layer, k.index), f"{k.layer}_{k.index}-0"
            elif k.kind == "error":
                feature, js = -1, f"{k.layer}_-1-{k.token}"
            elif k.kind in ("embed", "logit"):
                feature = k.token if k.kind == "embed" else n.token_id
                js = f"{'E' if k.kind == 'embed' else 'L'}_{n.token_id}-{k.token}"
            else:
                own -= 1
                feature, js = own, f"{n.id}-{k.token}"
            rec = dict(node_id=n.id, feature=feature, layer=self._viewer_layer(k), ctx_idx=k.token or 0,
                       feature_type=FEATURE_TYPES.get(k.kind, k.kind), token_prob=n.token_prob,
                       is_target_logit=bool(n.is_target and k.kind == "logit"), run_idx=0,
                       reverse_ctx_idx=0, jsNodeId=js, clerp=n.label, influence=_num(c),
                       activation=_num(n.activation), tc_kind=k.kind, tc_layer=k.layer,
                       tc_index=k.index, tc_token=k.token, tc_source=k.source,
                       tc_is_target=n.is_target, tc_token_id=n.token_id,
                       tc_attribution=_num(n.influence))
            if k.kind == "head":
                rec.update(head=k.index, source_ctx_idx=k.source)
            nodes.append(rec)
        return dict(metadata=self.metadata,
                    qParams=dict(pinnedIds=[], supernodes=[], linkType="both",
                                 clickedId=self.target_id, sg_pos=""),
                    nodes=nodes,
                    links=[dict(source=e.source, target=e.target, weight=e.weight) for e in self.edges])

    def _viewer_layer(self, k: Node) -> str:
        """The viewer's row: "E" for embeddings and layer-less constants, the
        layer otherwise, n_layers + 1 for targets (never empty)."""
        if k.kind in ("embed", "pos_embed"):
            return "E"
        if k.kind in ("logit", "direction"):
            return str(self.n_layers + 1)
        if k.layer is None:
            return "E" if k.kind != "remainder" else str(self.n_layers + 1)
        return str(k.layer)

    def to_json(self, path: str | FilePath | None = None, indent: int | None = None) -> str:
        """The graph as a JSON string (and written to ``path`` if given)."""
        from .graph_json import dump_json
        return dump_json(self.to_dict(), path, indent)

    @classmethod
    def from_json(cls, source: str | FilePath | dict) -> "CircuitGraph":
        """Read a graph written by ``to_json`` (a JSON string, a file path or a
        parsed dict), validated first (a clear error names the field at fault).
        Graphs from circuit-tracer read too: kinds come from ``feature_type``,
        an embedding's token id from its node id (its ``feature`` is the
        position), and since their ``influence`` is a cumulative fraction
        (smaller = more important), it is kept as ``cumulative`` and
        ``influence`` is set to ``1 - cumulative`` (an importance, not target units)."""
        data = load_graph_dict(source)
        meta = data.get("metadata") or {}
        nodes: dict[str, GraphNode] = {}
        target_id = (data.get("qParams") or {}).get("clickedId", "") or ""
        n_layers = 0
        for i, rec in enumerate(data["nodes"]):
            node, token_id = _node_from_record(rec, i)
            is_target = bool(rec.get("tc_is_target", rec.get("is_target_logit", False)))
            if node.kind == "logit" and str(rec.get("layer", "")).isdigit():
                n_layers = int(rec["layer"]) - 1
            cum = _float(rec.get("influence"))
            ours = "tc_attribution" in rec
            influence = _float(rec.get("tc_attribution")) if ours else (1.0 - cum if cum is not None else 0.0)
            nodes[rec["node_id"]] = GraphNode(
                rec["node_id"], node, influence=influence or 0.0,
                activation=_float(rec.get("activation")), label=rec.get("clerp") or "",
                token_id=token_id, is_target=is_target, token_prob=float(rec.get("token_prob") or 0.0),
                cumulative=cum)
            if is_target and not target_id:
                target_id = rec["node_id"]
        edges = [GraphEdge(e["source"], e["target"], float(e.get("weight", 0.0))) for e in data["links"]]
        return cls(nodes, edges, target_id, list(meta.get("prompt_tokens", [])), n_layers, meta)


def _node_from_record(rec: dict, i: int) -> tuple[Node, int | None]:
    from ..errors import InvalidInputError
    pos = rec.get("ctx_idx")
    if "tc_kind" in rec and "tc_token" in rec:     # written by CircuitGraph.to_json (an
        # AttributionGraph's file carries tc_kind too, with tc_pos: read it as circuit-tracer's)
        return (Node(rec["tc_kind"], rec.get("tc_layer"), rec.get("tc_index"), rec.get("tc_token"),
                     rec.get("tc_source")), rec.get("tc_token_id"))
    ftype = rec.get("feature_type")
    parts = rec["node_id"].split("_")

    def part(j: int) -> int:
        try:
            return int(parts[j])
        except (IndexError, ValueError):
            raise InvalidInputError(f"nodes[{i}].node_id {rec['node_id']!r} does not follow the "
                                    f"{ftype!r} id convention.") from None
    try:
        if ftype == "cross layer transcoder":
            return Node("feature", part(0), part(1), pos), None
        if ftype == "mlp reconstruction error":
            return Node("error", int(rec["layer"]), None, pos), None
        if ftype == "embedding":
            return Node("embed", None, part(1), pos), part(1)   # ``feature`` holds the position
        if ftype == "logit":
            return Node("logit", None, int(rec["feature"]), pos), int(rec["feature"])
    except InvalidInputError:
        raise
    except KeyError as err:
        raise InvalidInputError(f"nodes[{i}] ({ftype}) has no {err.args[0]!r} field.") from None
    except (TypeError, ValueError):
        raise InvalidInputError(f"nodes[{i}].layer {rec.get('layer')!r} must be a layer number for "
                                f"a {ftype!r} node.") from None
    raise InvalidInputError(f"nodes[{i}].feature_type {ftype!r} (node {rec['node_id']!r}) is not a node "
                            f"type of this graph format: expected one of {sorted(set(FEATURE_TYPES.values()))} "
                            f"(files written by tc_explore also carry tc_kind).")


def _clerp(ctx, k: Node, member: Node, target) -> str:
    if k.kind == "embed":
        return f"token {ctx.token_strs[member.token]!r}"
    if k.kind == "head" and member.source is not None and k.source is not None:
        return f"L{k.layer}H{k.index} {ctx.token_strs[member.token]!r} <- {ctx.token_strs[member.source]!r}"
    if k.kind == "direction":
        return target.label
    return k.label()


def _num(x: float | None) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(x)


def _float(x) -> float | None:
    return None if x is None else float(x)
