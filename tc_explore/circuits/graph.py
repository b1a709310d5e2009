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

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path as FilePath
from typing import Any

import pandas as pd
import torch

from .contributions import Node, NodeKind
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


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's unique integer for (layer, feature)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


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

        feature_ids = {f"{k.layer}_{k.index}_{pos_str(k)}" for k in influence if k.kind == "feature"}

        def node_id(k: Node) -> str:
            p = pos_str(k)
            if k.kind == "feature":
                return f"{k.layer}_{k.index}_{p}"
            if k.kind == "error":
                nid = f"0_{k.layer}_{p}"
                return nid if nid not in feature_ids else f"{k.layer}_-1_{p}"
            if k.kind == "embed":
                return f"E_{k.index}_{p}"
            if k.kind == "logit":
                return f"{n_layers + 1}_{k.index}_{p}"
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
            if k.kind == "logit":
                gn.token_id = k.index
                gn.token_prob = float(probs[k.index])
                gn.label = f'Output {ctx.model.tokenizer.decode([k.index])!r} ' \
                           f'(p={gn.token_prob:.3f}); target {target.label}'
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
        return [e for e in self.edges if e.target == node_id]

    # -- JSON ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        nodes = []
        for n in self.nodes.values():
            k = n.node
            if k.kind == "feature":
                feature, layer, js = cantor(k.layer, k.index), str(k.layer), f"{k.layer}_{k.index}-0"
            elif k.kind in ("embed", "logit"):
                feature = n.token_id
                layer = "E" if k.kind == "embed" else str(self.n_layers + 1)
                js = f"{'E' if k.kind == 'embed' else 'L'}_{n.token_id}-{k.token}"
            else:
                feature = k.index if k.kind == "head" else -1
                layer = "E" if k.kind == "pos_embed" else str(k.layer if k.layer is not None else "")
                js = f"{n.id}-{k.token}"
            rec = dict(node_id=n.id, feature=feature, layer=layer, ctx_idx=k.token,
                       feature_type=FEATURE_TYPES[k.kind], token_prob=n.token_prob,
                       is_target_logit=bool(n.is_target and k.kind == "logit"), run_idx=0,
                       reverse_ctx_idx=0, jsNodeId=js, clerp=n.label, influence=_num(n.influence),
                       activation=_num(n.activation), tc_kind=k.kind, tc_layer=k.layer,
                       tc_index=k.index, tc_token=k.token, tc_source=k.source,
                       tc_is_target=n.is_target, tc_token_id=n.token_id)
            if k.kind == "head":
                rec.update(head=k.index, source_ctx_idx=k.source)
            nodes.append(rec)
        return dict(metadata=self.metadata,
                    qParams=dict(pinnedIds=[], supernodes=[], linkType="both",
                                 clickedId=self.target_id, sg_pos=""),
                    nodes=nodes,
                    links=[dict(source=e.source, target=e.target, weight=e.weight) for e in self.edges])

    def to_json(self, path: str | FilePath | None = None, indent: int | None = None) -> str:
        """The graph as a JSON string (and written to ``path`` if given)."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            FilePath(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | FilePath | dict) -> "CircuitGraph":
        """Read a graph written by ``to_json`` (a JSON string, a file path or a
        parsed dict). Graphs from circuit-tracer read too: their nodes' kinds
        are taken from ``feature_type``."""
        if isinstance(source, dict):
            data = source
        else:
            text = str(source)
            if not text.lstrip().startswith("{"):
                text = FilePath(source).read_text()
            data = json.loads(text)
        meta = data.get("metadata", {})
        nodes: dict[str, GraphNode] = {}
        target_id = data.get("qParams", {}).get("clickedId", "")
        n_layers = 0
        for rec in data["nodes"]:
            node, token_id = _node_from_record(rec)
            is_target = bool(rec.get("tc_is_target", rec.get("is_target_logit", False)))
            if node.kind == "logit":
                n_layers = int(rec["layer"]) - 1
            nodes[rec["node_id"]] = GraphNode(
                rec["node_id"], node, influence=_float(rec.get("influence")) or 0.0,
                activation=_float(rec.get("activation")), label=rec.get("clerp", ""),
                token_id=token_id, is_target=is_target, token_prob=float(rec.get("token_prob") or 0.0))
            if is_target and not target_id:
                target_id = rec["node_id"]
        edges = [GraphEdge(e["source"], e["target"], float(e["weight"])) for e in data["links"]]
        return cls(nodes, edges, target_id, list(meta.get("prompt_tokens", [])), n_layers, meta)


def _node_from_record(rec: dict) -> tuple[Node, int | None]:
    if "tc_kind" in rec:
        return (Node(rec["tc_kind"], rec.get("tc_layer"), rec.get("tc_index"), rec.get("tc_token"),
                     rec.get("tc_source")), rec.get("tc_token_id"))
    ftype, pos = rec.get("feature_type"), rec.get("ctx_idx")
    if ftype == "cross layer transcoder":
        layer, feat = rec["node_id"].split("_")[:2]
        return Node("feature", int(layer), int(feat), pos), None
    if ftype == "mlp reconstruction error":
        return Node("error", int(rec["layer"]), None, pos), None
    if ftype == "embedding":
        return Node("embed", None, None, pos), int(rec["feature"])
    if ftype == "logit":
        return Node("logit", None, int(rec["feature"]), pos), int(rec["feature"])
    return Node(ftype or "unknown", None, None, pos), None


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
