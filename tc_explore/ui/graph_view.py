"""The circuit graph's view model: from an attribution graph in the graph JSON
layout (``docs/graph_json.md``) to what the browser draws — rows, columns,
labels, tooltip fields — and which nodes and links show at a prune threshold.

Pure data, no widget: the widget (``tc_explore.ui.graph_widget``), its
standalone page export and the tests all call these functions.
"""
from __future__ import annotations

import html as _html
import math
import os
from typing import Any, Callable, Mapping

from ..circuits.contributions import NodeKind
from ..circuits.graph_json import FEATURE_TYPE, load_graph_dict
from ..circuits.influence import prune_levels_from_cumulative
from ..errors import InvalidInputError

__all__ = ["graph_view_data", "visible_elements", "node_kind", "parse_feature_node"]


_FEATURE_TYPES = {"cross layer transcoder", "transcoder", "transcoder feature", "feature",
                  "per layer transcoder"}
_ERROR_TYPES = {"mlp reconstruction error", "transcoder error", "error"}
_EMBED_TYPES = {"embedding", "position embedding", "positional embedding", "pos embedding"}
_BIAS_WORDS = ("bias", "remainder", "offset", "constant", "skip")
# Graph JSON fields that the tooltip does not repeat (they are boilerplate or shown otherwise).
_BOILERPLATE = {"node_id", "jsNodeId", "feature", "layer", "ctx_idx", "feature_type", "run_idx",
                "reverse_ctx_idx", "clerp", "token_prob", "is_target_logit"}


# tc_explore's own node kinds (the ``tc_kind`` field CircuitGraph writes) -> drawing kind
K = NodeKind
_TC_KINDS = {K.FEATURE: "feature", K.HEAD: "head", K.EMBED: "embed", K.POS_EMBED: "embed",
             K.ERROR: "error", K.MLP: "other", K.SKIP: "bias", K.ATTN_BIAS: "bias",
             K.DEC_BIAS: "bias", K.OFFSET: "bias", K.REMAINDER: "bias", K.LOGIT: "logit",
             K.DIRECTION: "logit"}


# What each of tc_explore's node kinds is, for the tooltip (the graph JSON's feature_type
# follows circuit-tracer's vocabulary, e.g. "cross layer transcoder" for every feature).
KIND_DESCRIPTIONS = {
    K.FEATURE: "transcoder feature",
    K.HEAD: "attention head (destination ← source token)",
    K.EMBED: "token embedding",
    K.POS_EMBED: "position embedding",
    K.ERROR: "transcoder error: true MLP output − transcoder output",
    K.MLP: "MLP without a transcoder (whole output)",
    K.SKIP: "skip term of a skip transcoder",
    K.ATTN_BIAS: "attention output bias (b_O)",
    K.DEC_BIAS: "transcoder output bias (b_dec_out)",
    K.OFFSET: "offset: the traced quantity's constant (a feature's encoder bias, the logits' bias)",
    K.REMAINDER: "pruned remainder: what the contributors left out of the graph add up to",
    K.LOGIT: "logit (target)",
    K.DIRECTION: "direction in the residual stream (target)",
}


def node_kind(node: Mapping) -> str:
    """The drawing kind of a graph JSON node: feature, head, embed, error, bias, logit or other."""
    if node.get("tc_kind") in _TC_KINDS:
        return _TC_KINDS[node["tc_kind"]]
    ftype = str(node.get("feature_type", "")).strip().lower()
    if ftype in _FEATURE_TYPES:
        return "feature"
    if ftype == "attention head" or ftype.startswith("attention"):
        return "head"
    if ftype in _EMBED_TYPES or ftype.endswith("embedding"):
        return "embed"
    if ftype in _ERROR_TYPES or "error" in ftype:
        return "error"
    if ftype == "logit" or ftype.endswith("target"):
        return "logit"
    if any(w in ftype for w in _BIAS_WORDS):
        return "bias"
    return "other"


def parse_feature_node(node: Mapping) -> tuple[int, int] | None:
    """(layer, feature index) of a transcoder-feature node. The graph JSON's ``feature``
    field is a pairing of (layer, feature), so the index is read from our
    extra field ``feature_index`` when present, else from ``node_id``
    ``"{layer}_{feature}_{pos}"``."""
    if node_kind(node) != "feature":
        return None
    if isinstance(node.get("tc_layer"), int) and isinstance(node.get("tc_index"), int):
        return node["tc_layer"], node["tc_index"]
    try:
        layer = int(node["layer"])
    except (KeyError, TypeError, ValueError):
        return None
    for key in ("feature_index", "feature_idx", "index"):
        if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool):
            return layer, int(node[key])
    parts = str(node.get("node_id", "")).split("_")
    if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _head_layer(node: Mapping) -> int | None:
    for key in ("tc_layer", "attn_layer", "layer"):
        try:
            return int(node[key])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _number(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


def _as_graph_dict(graph: Any) -> dict:
    """Accept a graph JSON dict, a JSON string, a path, or an object with
    to_dict()/to_json() (a CircuitGraph or AttributionGraph); validated by the
    one graph-file validator (``circuits.graph_json.validate_graph_dict``)."""
    if not isinstance(graph, (Mapping, str, bytes, os.PathLike)):
        if hasattr(graph, "to_dict"):
            graph = graph.to_dict()
        elif hasattr(graph, "to_json"):
            graph = graph.to_json()
        else:
            raise InvalidInputError(
                f"Expected an attribution graph (a dict in the graph JSON layout of docs/graph_json.md, "
                f"JSON text, a .json path, a CircuitGraph or an AttributionGraph), got {type(graph).__name__}.")
    return load_graph_dict(graph)


def _contribution(node: Mapping) -> float:
    """A node's signed size: its attribution where the file has one; else, for
    graph files whose ``influence`` is the viewers' cumulative fraction
    (smaller = more important), ``1 - influence``."""
    for key in ("contribution", "value", "tc_attribution", "tc_influence"):
        v = _number(node.get(key))
        if v is not None:
            return v
    cum = _number(node.get("influence"))
    if cum is not None:
        return 1.0 - cum
    v = _number(node.get("activation"))
    return v if v is not None else 0.0


def graph_view_data(graph: Any, expanded: set[str] | frozenset = frozenset(),
                    expandable: Callable[[Mapping], bool] | None = None) -> dict:
    """What the browser draws, from a graph JSON dict: rows (embedding, attention and
    MLP of each layer, output), one column per prompt token, every node with
    its kind, row, column, label, signed value (``contribution``, else
    ``influence``/``activation``), tooltip fields and whether it is the root
    (a target: ``is_target_logit`` / ``is_target``, or a node nothing reads)."""
    data = _as_graph_dict(graph)
    meta = data.get("metadata", {}) or {}
    nodes, links = data["nodes"], data.get("links", [])
    tokens = [str(t) for t in meta.get("prompt_tokens", []) or []]

    layers = []
    for n in nodes:
        try:
            layers.append(int(n.get("layer")))
        except (TypeError, ValueError):
            pass
    logit_layers = [int(n["layer"]) for n in nodes if node_kind(n) == "logit"
                    and str(n.get("layer", "")).lstrip("-").isdigit()]
    n_layers = meta.get("n_layers")
    if not isinstance(n_layers, int):
        n_layers = (max(logit_layers) - 1) if logit_layers else (max(layers) + 1 if layers else 0)

    sources = {str(l["source"]) for l in links}
    def flagged(n):
        return bool(n.get("tc_is_target") or n.get("is_target_logit") or n.get("is_target"))
    has_target_flag = any(flagged(n) for n in nodes)
    parent_of = {}
    for l in links:
        parent_of.setdefault(str(l["source"]), str(l["target"]))
    by_id = {str(n["node_id"]): n for n in nodes}

    def row_of(n: Mapping, kind: str, depth: int = 0) -> int:
        tc = n.get("tc_kind")
        if tc == "remainder" and depth < 3 and str(n["node_id"]) in parent_of:
            return row_of(by_id[parent_of[str(n["node_id"])]], node_kind(
                by_id[parent_of[str(n["node_id"])]]), depth + 1)   # beside what it belongs to
        if kind == "embed" or str(n.get("layer")) == "E":
            return 0
        if kind == "logit":
            return 2 * n_layers + 1
        if tc == "attn_bias" and isinstance(n.get("tc_layer"), int):
            return 2 * n["tc_layer"] + 1
        if kind == "head":
            l = _head_layer(n)
            return 2 * l + 1 if l is not None else 2 * n_layers + 1
        try:
            l = int(n.get("layer"))
        except (TypeError, ValueError):
            return 2 * n_layers + 1
        if l > n_layers - 1:                 # a graph JSON logit-layer number on a non-logit node
            return 2 * n_layers + 1
        return 2 * l + 2

    def row_label(r: int) -> str:
        if r == 0:
            return "emb"
        if r == 2 * n_layers + 1:
            return "out"
        return f"attn {(r - 1) // 2}" if r % 2 == 1 else f"mlp {(r - 2) // 2}"

    out_nodes = []
    for n in nodes:
        kind = node_kind(n)
        nid = str(n["node_id"])
        ctx = n.get("ctx_idx")
        ctx = int(ctx) if isinstance(ctx, (int, float)) and not isinstance(ctx, bool) else 0
        is_root = flagged(n) if has_target_flag else (nid not in sources)
        parsed = parse_feature_node(n)
        layer = parsed[0] if parsed else (_head_layer(n) if kind in ("head", "error") else None)
        feature = parsed[1] if parsed else None
        contribution = _contribution(n)
        label = str(n.get("clerp") or "").strip() or _default_label(n, kind, parsed, tokens, ctx)
        described = KIND_DESCRIPTIONS.get(n.get("tc_kind"))
        tip: list[list] = [["kind", described or str(n.get("feature_type", kind))]]
        if 0 <= ctx < len(tokens):
            tip.append(["token", f"{ctx} {tokens[ctx]!r}"])
        tip.append(["contribution" if not is_root else "value", contribution])
        act = _number(n.get("activation"))
        if act is not None and not is_root and kind in ("feature", "head") and act != 0:
            # contribution = activation × gain: the input-dependent and the input-invariant factor
            tip.append(["attention weight" if kind == "head" else "activation", act])
            tip.append(["gain (contribution / " + ("weight)" if kind == "head" else "activation)"),
                        contribution / act])
        for key, v in n.items():
            if key in _BOILERPLATE or key in ("contribution", "activation") or v is None \
                    or key.startswith("tc_") or (key == "influence" and "contribution" not in n):
                continue
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                tip.append([key, v])
        if parsed:
            tip.append(["feature", f"layer {parsed[0]}, #{parsed[1]}"])
        can = nid not in expanded and (expandable(n) if expandable else kind in ("feature", "head"))
        out_nodes.append(dict(id=nid, kind=kind, row=row_of(n, kind), ctx=ctx, label=label,
                              contribution=contribution, layer=layer, feature=feature,
                              is_root=is_root, expandable=bool(can), tooltip=tip))
    prune = _prune_setting(data, out_nodes)
    rows = sorted({n["row"] for n in out_nodes})
    out_links = [dict(source=str(l["source"]), target=str(l["target"]),
                      weight=_number(l.get("weight")) or 0.0) for l in links]
    title = str(meta.get("prompt") or "")
    if meta.get("slug"):
        title = f"{meta['slug']}: {title}" if title else str(meta["slug"])
    return dict(tokens=tokens, rows=[dict(row=r, label=row_label(r)) for r in rows],
                nodes=out_nodes, links=out_links, title=title, prune=prune)


def _is_attribution_graph(data: Mapping) -> bool:
    """An attribution graph's file: ours (``metadata.tc_explore.kind``), or one
    with only the four node types circuit-tracer writes and no path-search
    metadata of ours."""
    ours = (data.get("metadata") or {}).get("tc_explore")
    if isinstance(ours, Mapping):
        return ours.get("kind") == "attribution"
    types = set(FEATURE_TYPE.values())
    return bool(data["nodes"]) and all(n.get("feature_type") in types for n in data["nodes"])


def _prune_setting(data: Mapping, out_nodes: list[dict]) -> dict:
    """How the prune slider works on this graph, and where it starts.

    Attribution graphs (``mode`` "influence"): the slider is the node threshold
    of ``AttributionGraph.prune`` — each node gets its ``prune_level`` (the
    file's ``tc_prune_level``, else derived from the cumulative ``influence``
    of circuit-tracer's files) and shows when ``prune_level < threshold``;
    starts at the file's ``node_threshold`` (everything it holds), else 1.
    Path graphs (``mode`` "contribution"): a fraction of the largest
    |contribution| and |weight|; starts at 0 (everything)."""
    if not _is_attribution_graph(data):
        for n in out_nodes:
            n["prune_level"] = None
        return dict(mode="contribution", default=0.0)
    raw = data["nodes"]
    if all("tc_prune_level" in n for n in raw):
        levels = [_number(n["tc_prune_level"]) for n in raw]
    else:
        import torch
        cum = torch.tensor([_number(n.get("influence")) if _number(n.get("influence")) is not None
                            else math.nan for n in raw], dtype=torch.float64)
        levels = [v if math.isfinite(v) else None for v in prune_levels_from_cumulative(cum).tolist()]
    for n, level in zip(out_nodes, levels):
        n["prune_level"] = -1.0 if n["kind"] in _ALWAYS_SHOWN else level
    start = _number((data.get("metadata") or {}).get("node_threshold"))
    return dict(mode="influence", default=start if start is not None and 0.0 <= start <= 1.0 else 1.0)


# Node kinds an attribution graph's pruning always keeps (AttributionGraph.prune).
_ALWAYS_SHOWN = ("logit", "embed")


def _default_label(n: Mapping, kind: str, parsed, tokens, ctx) -> str:
    tok = f" {tokens[ctx]!r}" if 0 <= ctx < len(tokens) else ""
    if parsed:
        return f"L{parsed[0]} feature {parsed[1]} @{ctx}{tok}"
    if kind == "head":
        h = n.get("head")
        return f"L{_head_layer(n)} head {h} @{ctx}{tok}"
    if kind == "embed":
        return f"embedding @{ctx}{tok}"
    if kind == "error":
        return f"L{n.get('layer')} MLP error @{ctx}{tok}"
    return f"{n.get('feature_type', kind)} {n.get('node_id')}"


def visible_elements(view: Mapping, threshold: float | None = None) -> tuple[set[str], list[int]]:
    """Node ids and link indices shown at prune ``threshold`` (None: where the
    view starts); the same rule as ``visibility`` in circuit_graph.js.

    Attribution graphs (``view["prune"]["mode"] == "influence"``): the
    threshold is ``AttributionGraph.prune``'s ``node_threshold``: logits and
    embeddings, and the nodes with ``prune_level < threshold``; then, as
    ``prune`` does, features and errors without a link to a shown node and
    features without a link from one are hidden, until nothing changes. On an
    unpruned graph this is exactly the node set of
    ``graph.prune(node_threshold=threshold, edge_threshold=1.0)``. Links show
    when both ends do.

    Path graphs: a fraction of the largest |contribution| among non-root nodes
    and of the largest |weight|. Roots always show; a link shows when both
    ends show and its |weight| reaches the threshold."""
    t = _resolve_threshold(view, threshold)
    nodes, links = view.get("nodes", []), view.get("links", [])
    if (view.get("prune") or {}).get("mode") == "influence":
        return _visible_by_influence(nodes, links, t)
    max_c = max([abs(n["contribution"]) for n in nodes if not n["is_root"]], default=0.0)
    max_w = max([abs(l["weight"]) for l in links], default=0.0)
    shown = {n["id"] for n in nodes if n["is_root"] or abs(n["contribution"]) >= t * max_c}
    shown_links = [i for i, l in enumerate(links)
                   if l["source"] in shown and l["target"] in shown and abs(l["weight"]) >= t * max_w]
    return shown, shown_links


def _visible_by_influence(nodes: list, links: list, t: float) -> tuple[set[str], list[int]]:
    kind = {n["id"]: n["kind"] for n in nodes}
    always = {n["id"] for n in nodes if n["kind"] in _ALWAYS_SHOWN}
    shown = always | {n["id"] for n in nodes if n.get("prune_level") is not None and n["prune_level"] < t}
    while True:
        has_out, has_in = set(), set()
        for l in links:
            if l["weight"] != 0 and l["source"] in shown and l["target"] in shown:
                has_out.add(l["source"])
                has_in.add(l["target"])
        keep = {i for i in shown
                if i in always or (i in has_out and (kind[i] != "feature" or i in has_in))}
        if keep == shown:
            break
        shown = keep
    return shown, [i for i, l in enumerate(links) if l["source"] in shown and l["target"] in shown]


def _resolve_threshold(view: Mapping, t) -> float:
    """``t`` checked, or the view's starting threshold when None."""
    if t is None:
        return float((view.get("prune") or {}).get("default", 0.0))
    return _check_threshold(t)


def _check_threshold(t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise InvalidInputError(f"The prune threshold must be a number in [0, 1], got {t!r}.") from None
    if not 0.0 <= t <= 1.0:
        raise InvalidInputError(
            f"The prune threshold must be in [0, 1] (for an attribution graph, the node threshold: the "
            f"fraction of influence kept; for a path graph, a fraction of the largest value); got {t}.")
    return t


def _node_summary_html(node: Mapping) -> str:
    """The panel's content for a node that has no feature dashboard: its fields."""
    rows = "".join(f"<tr><th>{_html.escape(str(k))}</th><td>{_html.escape(_fmt(v))}</td></tr>"
                   for k, v in node.get("tooltip", []))
    return (f'<div class="tcx-node-summary" data-node-id="{_html.escape(node["id"])}">'
            f"<p>{_html.escape(node['label'])}</p><table>{rows}</table></div>")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
