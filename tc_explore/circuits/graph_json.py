"""The attribution-graph JSON that circuit-tracer's viewer and Neuronpedia open:
node ids, validation, and (de)serialisation of :class:`AttributionGraph`.

The file layout is kept as a JSON Schema in ``tc_explore/schemas/
attribution_graph.schema.json`` (tests validate every file we write against
it). :func:`validate_graph_dict` is the one validator every reader uses
(``AttributionGraph.from_json``, ``CircuitGraph.from_json`` and the graph
widget): it checks what a reader relies on and names the field at fault.

Conventions (circuit-tracer's viewer reads them this way):

* feature ``"{layer}_{feature}_{pos}"``, ``feature`` = Cantor pairing of
  (layer, feature); error ``"{layer}_-1_{pos}"``, ``feature`` −1; embedding
  ``"E_{token_id}_{pos}"``, ``layer`` ``"E"``, ``feature`` = the position;
  logit ``"{n_layers + 1}_{token_id}_{pos}"``, ``feature`` = the token id,
  ``clerp`` ``Output "token" (p=0.123)``. A custom target (a logit
  difference or direction, a feature) is a logit node with a virtual token id
  ≥ d_vocab, as circuit-tracer writes custom targets.
* The viewer groups nodes by ``(layer, feature, ctx_idx)``, so every node that
  is not a feature, error or embedding carries its own ``feature`` number.
* ``influence`` is the cumulative fraction of influence (smaller = more
  important; the viewer's prune slider keeps ``influence <= threshold``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, as_count
from ..integrity import write_text_atomic

__all__ = ["cantor", "feature_node_id", "error_node_id", "embedding_node_id", "logit_node_id",
           "logit_clerp", "validate_graph_dict", "load_graph_dict", "dump_json", "schema_path",
           "SCHEMA_VERSION", "MAX_JSON_LINKS"]

SCHEMA_VERSION = 1
# The most links AttributionGraph.to_dict/to_json write unless told otherwise: a
# million links is about 80 MB of JSON, already slow to open in circuit-tracer's
# viewer; an unpruned graph has tens of millions (a 16-token GPT-2 prompt: ~80 M).
MAX_JSON_LINKS = 1_000_000
FEATURE_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                "embedding": "embedding", "logit": "logit"}


def schema_path() -> Path:
    """Where the JSON Schema of the graph file lives."""
    return Path(__file__).resolve().parent.parent / "schemas" / "attribution_graph.schema.json"


def cantor(layer: int, feature: int) -> int:
    """circuit-tracer's unique integer for (layer, feature)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def feature_node_id(layer: int, feature: int, pos: int) -> str:
    return f"{layer}_{feature}_{pos}"


def error_node_id(layer: int, pos: int) -> str:
    return f"{layer}_-1_{pos}"


def embedding_node_id(token_id: int, pos: int) -> str:
    return f"E_{token_id}_{pos}"


def logit_node_id(n_layers: int, token_id: int, pos: int) -> str:
    return f"{n_layers + 1}_{token_id}_{pos}"


def logit_clerp(token: str, prob: float) -> str:
    """The label the viewer parses a logit's probability from."""
    return f'Output "{token}" (p={prob:.3f})'


# -- validation ---------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return _is_num(v) and math.isfinite(v)


def _int_or_null(v) -> bool:
    return v is None or _is_int(v)


_TC_KIND_NAMES = frozenset({"feature", "error", "embedding", "logit", "head", "skip", "mlp", "embed",
                            "pos_embed", "attn_bias", "dec_bias", "offset", "remainder", "direction"})


_NODE_FIELDS = {  # field -> (check, what it must be); only checked when present
    "feature": (_is_int, "an integer"),
    "layer": (lambda v: isinstance(v, str) and v != "" or _is_int(v), "a non-empty string"),
    "ctx_idx": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "feature_type": (lambda v: isinstance(v, str), "a string"),
    "influence": (lambda v: v is None or _is_finite(v), "a finite number or null"),
    "activation": (lambda v: v is None or _is_finite(v), "a finite number or null"),
    "token_prob": (lambda v: v is None or _is_finite(v), "a finite number"),
    "clerp": (lambda v: v is None or isinstance(v, str), "a string"),
    # tc_explore's own fields (files we wrote)
    "tc_kind": (lambda v: v in _TC_KIND_NAMES, f"one of {sorted(_TC_KIND_NAMES)}"),
    **{key: (_int_or_null, "an integer or null")
       for key in ("tc_layer", "tc_index", "tc_token", "tc_source", "tc_token_id")},
    "tc_pos": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    **{key: (lambda v: v is None or _is_finite(v), "a finite number or null")
       for key in ("tc_weight", "tc_influence", "tc_attribution")},
}


def validate_graph_dict(data: Any) -> dict:
    """Check a parsed graph file; return it, or raise :class:`InvalidInputError`
    naming the field (e.g. ``nodes[3].ctx_idx``), a duplicate node id, or a
    link to a node that is not there."""
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"An attribution graph is a JSON object with 'nodes' and 'links', "
                                f"got {type(data).__name__}.")
    nodes, links = data.get("nodes"), data.get("links", [])
    if not isinstance(nodes, list):
        raise InvalidInputError("The graph's 'nodes' must be a list of node objects"
                                + ("" if "nodes" in data else " (the field is missing)") + ".")
    if not isinstance(links, list):
        raise InvalidInputError("The graph's 'links' must be a list of {source, target, weight} objects.")
    if not nodes:
        raise InvalidInputError("The graph has no nodes: there is nothing to show. Was it written from an "
                                "empty or failed attribution?")
    meta = data.get("metadata", {})
    if meta is not None and not isinstance(meta, Mapping):
        raise InvalidInputError("The graph's 'metadata' must be an object.")
    if isinstance(meta, Mapping) and "prompt_tokens" in meta and not (
            isinstance(meta["prompt_tokens"], list) and all(isinstance(t, str) for t in meta["prompt_tokens"])):
        raise InvalidInputError("metadata.prompt_tokens must be a list of strings.")
    ours = meta.get("tc_explore") if isinstance(meta, Mapping) else None
    if ours is not None:
        _validate_our_metadata(ours)
    n_tokens = len(meta["prompt_tokens"]) if isinstance(meta, Mapping) and meta.get("prompt_tokens") else None
    seen: set[str] = set()
    for i, n in enumerate(nodes):
        if not isinstance(n, Mapping):
            raise InvalidInputError(f"nodes[{i}] must be an object, got {type(n).__name__}.")
        nid = n.get("node_id")
        if not isinstance(nid, str) or not nid:
            raise InvalidInputError(f"nodes[{i}].node_id must be a non-empty string, got {nid!r}.")
        if nid in seen:
            raise InvalidInputError(f"nodes[{i}].node_id {nid!r} is a duplicate: node ids must be unique.")
        seen.add(nid)
        for key, (ok, what) in _NODE_FIELDS.items():
            if key in n and not ok(n[key]):
                raise InvalidInputError(f"nodes[{i}].{key} (node {nid!r}) must be {what}, got {n[key]!r}.")
        if n_tokens is not None and _is_int(n.get("ctx_idx")) and n["ctx_idx"] >= n_tokens:
            raise InvalidInputError(f"nodes[{i}].ctx_idx (node {nid!r}) is {n['ctx_idx']}, past the prompt's "
                                    f"{n_tokens} tokens (metadata.prompt_tokens).")
    for i, l in enumerate(links):
        if not isinstance(l, Mapping):
            raise InvalidInputError(f"links[{i}] must be an object, got {type(l).__name__}.")
        for end in ("source", "target"):
            if end not in l:
                raise InvalidInputError(f"links[{i}].{end} is missing.")
            if not isinstance(l[end], str) or l[end] not in seen:
                raise InvalidInputError(f"links[{i}].{end} refers to an unknown node {l[end]!r}: no node "
                                        f"of this graph has that node_id (a dangling link).")
        if "weight" not in l:
            raise InvalidInputError(f"links[{i}].weight is missing (every link carries its weight).")
        if not _is_finite(l["weight"]):
            raise InvalidInputError(f"links[{i}].weight must be a finite number, got {l['weight']!r}.")
    return dict(data)


def _validate_our_metadata(ours: Any) -> None:
    """metadata.tc_explore, the fields only tc_explore writes and reads back."""
    if not isinstance(ours, Mapping):
        raise InvalidInputError(f"metadata.tc_explore must be an object, got {type(ours).__name__}.")
    if "n_layers" in ours and not (_is_int(ours["n_layers"]) and ours["n_layers"] >= 0):
        raise InvalidInputError(f"metadata.tc_explore.n_layers must be a non-negative integer, "
                                f"got {ours['n_layers']!r}.")
    ids = ours.get("token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(t) and t >= 0 for t in ids)):
        raise InvalidInputError(f"metadata.tc_explore.token_ids must be a list of token ids, got {ids!r:.80}.")
    consts = ours.get("constants")
    if consts is not None and not (isinstance(consts, list) and all(isinstance(c, Mapping) for c in consts)):
        raise InvalidInputError(f"metadata.tc_explore.constants must be a list of objects (one per node), "
                                f"got {consts!r:.80}.")


def load_graph_dict(source) -> dict:
    """A graph from a dict, a JSON string, or a path to a ``.json`` file; validated."""
    if isinstance(source, Mapping):
        return validate_graph_dict(source)
    if isinstance(source, bytes):
        source = source.decode("utf-8", errors="replace")
    if not isinstance(source, (str, Path)) and not hasattr(source, "__fspath__"):
        raise InvalidInputError(f"Expected a graph as a dict, JSON text or a .json path, "
                                f"got {type(source).__name__}.")
    text = str(source)
    if not isinstance(source, str) or not text.lstrip().startswith(("{", "[")):
        path = Path(text)
        if not path.is_file():
            raise InvalidInputError(f"No graph file at {path}.")
        text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"The graph is not valid JSON: {err}.") from None
    return validate_graph_dict(data)


def dump_json(data: dict, path=None, indent: int | None = None) -> str:
    if indent is not None:
        indent = as_count(indent, "indent", minimum=0)
    text = json.dumps(data, indent=indent, allow_nan=False)
    if path is not None:
        write_text_atomic(path, text)
    return text


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# -- AttributionGraph <-> dict -----------------------------------------------------------------
def attribution_graph_to_dict(graph, slug: str, max_links: int | None = MAX_JSON_LINKS) -> dict:
    """The graph file's dict; refuses a graph with more than ``max_links``
    non-zero edges (None: no limit) before building anything."""
    import torch
    if max_links is not None:
        if isinstance(max_links, bool) or not isinstance(max_links, int) or max_links < 0:
            raise InvalidInputError(f"max_links must be None or a non-negative integer, got {max_links!r}.")
        n_links = graph.n_edges
        if n_links > max_links:
            raise InvalidInputError(
                f"This graph has {n_links:,} edges ({len(graph):,} nodes), over max_links={max_links:,}: "
                f"its JSON would take about {n_links * 80 / 1e6:,.0f} MB, too large for a graph viewer "
                f"to open. Prune it first (graph.prune(node_threshold=0.8, edge_threshold=0.98)), or pass "
                f"max_links=None to write it anyway.")
    L = graph.n_layers
    nodes = []
    recs = graph.nodes.to_dict("records")
    first_logit = next((i for i, r in enumerate(recs) if r["kind"] == "logit"), None)
    for i, r in enumerate(recs):
        kind, l, p, idx = r["kind"], int(r["layer"]), int(r["pos"]), int(r["index"])
        common = dict(node_id=r["node_id"], ctx_idx=p, feature_type=FEATURE_TYPE[kind], token_prob=0.0,
                      is_target_logit=False, run_idx=0, reverse_ctx_idx=0,
                      clerp=r["label"], influence=_num(r.get("cumulative")), activation=None,
                      tc_kind=kind, tc_layer=l, tc_index=idx, tc_pos=p,
                      tc_influence=_num(r.get("influence")), tc_prune_level=_num(r.get("prune_level")))
        if kind == "feature":
            common.update(feature=cantor(l, idx), layer=str(l), jsNodeId=f"{l}_{idx}-0",
                          activation=_num(r["activation"]))
        elif kind == "error":
            common.update(feature=-1, layer=str(l), jsNodeId=f"{l}_-1-{p}")
        elif kind == "embedding":
            common.update(feature=p, layer="E", jsNodeId=f"E_{idx}-{p}")
        else:
            common.update(feature=idx, layer=str(L + 1), jsNodeId=f"L_{idx}-{p}",
                          token_prob=float(r["weight"]), is_target_logit=i == first_logit,
                          tc_weight=float(r["weight"]))
        nodes.append(common)
    ids = graph.nodes["node_id"].tolist()
    A = graph.adjacency
    t, s = torch.nonzero(A, as_tuple=True)
    w = A[t, s].double().cpu().tolist()
    links = [dict(source=ids[a], target=ids[b], weight=x) for a, b, x in zip(s.tolist(), t.tolist(), w)]
    present = set(ids)
    consts = [{k: (_num(v) if k != "node_id" else v) for k, v in row.items()}
              for row in graph.constants.to_dict("records") if row["node_id"] in present]
    meta = dict(slug=slug, scan=graph.scan or "", transcoder_list=[], prompt_tokens=list(graph.prompt_tokens),
                prompt=graph.metadata.get("prompt", "".join(graph.prompt_tokens)),
                node_threshold=graph.metadata.get("node_threshold"), schema_version=SCHEMA_VERSION,
                tc_explore=dict(kind="attribution", n_layers=L, token_ids=list(graph.token_ids),
                                weight_units="target", constants=consts,
                                **{k: v for k, v in graph.metadata.items()
                                   if k in ("targets", "n_active_features", "max_feature_nodes", "keep_bos",
                                            "d_vocab", "edge_threshold", "pruned_from")}))
    top = next((n["node_id"] for n in nodes if n["is_target_logit"]), "")
    return dict(metadata=meta, qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId=top,
                                            sg_pos=""),
                nodes=nodes, links=links)


def _kind_of(rec: Mapping, i: int) -> str:
    if rec.get("tc_kind") in FEATURE_TYPE:
        return rec["tc_kind"]
    ftype = rec.get("feature_type")
    for kind, name in FEATURE_TYPE.items():
        if ftype == name:
            return kind
    raise InvalidInputError(f"nodes[{i}].feature_type {ftype!r} (node {rec['node_id']!r}) is not a node of "
                            f"an attribution graph: expected one of {sorted(FEATURE_TYPE.values())}.")


def _id_part(rec: Mapping, i: int, part: int) -> int:
    try:
        return int(rec["node_id"].split("_")[part])
    except (IndexError, ValueError):
        raise InvalidInputError(f"nodes[{i}].node_id {rec['node_id']!r} does not follow the "
                                f"{rec.get('feature_type')!r} id convention.") from None


def attribution_graph_from_dict(data: dict, cls):
    import pandas as pd
    import torch

    from .influence import prune_levels_from_cumulative
    meta = dict(data.get("metadata") or {})
    ours = dict(meta.get("tc_explore") or {})
    recs = data["nodes"]
    logit_layers = [int(r["layer"]) for r in recs if r.get("feature_type") == "logit"
                    and str(r.get("layer", "")).lstrip("-").isdigit()]
    n_layers = ours.get("n_layers")
    if n_layers is None:
        n_layers = max(logit_layers) - 1 if logit_layers else 1 + max(
            [int(r["layer"]) for r in recs if str(r.get("layer", "")).isdigit()] or [-1])
    rows = []
    for i, r in enumerate(recs):
        kind = _kind_of(r, i)
        pos = r.get("tc_pos", r.get("ctx_idx"))
        if not _is_int(pos):
            raise InvalidInputError(f"nodes[{i}].ctx_idx (node {r['node_id']!r}) is missing.")
        if kind == "feature":
            layer = r.get("tc_layer", None)
            layer = layer if _is_int(layer) else _id_part(r, i, 0)
            index = r["tc_index"] if _is_int(r.get("tc_index")) else _id_part(r, i, 1)
        elif kind == "error":
            layer = r["tc_layer"] if _is_int(r.get("tc_layer")) else int(str(r.get("layer")))
            index = -1
        elif kind == "embedding":
            # ``feature`` is the position here; the token id is in the node id.
            layer, index = -1, r["tc_index"] if _is_int(r.get("tc_index")) else _id_part(r, i, 1)
        else:
            layer = n_layers
            index = r["tc_index"] if _is_int(r.get("tc_index")) else int(r.get("feature", -1))
        weight = r.get("tc_weight", r.get("token_prob", 0.0)) if kind == "logit" else 0.0
        rows.append(dict(node_id=r["node_id"], kind=kind, layer=int(layer), pos=int(pos), index=int(index),
                         activation=_num(r.get("activation")) if kind == "feature" else float("nan"),
                         weight=float(weight or 0.0), label=r.get("clerp") or "",
                         influence=_num(r.get("tc_influence")) if r.get("tc_influence") is not None
                         else float("nan"),
                         cumulative=_num(r.get("influence")) if r.get("influence") is not None
                         else float("nan"),
                         prune_level=r.get("tc_prune_level")))
    if all("tc_prune_level" in r for r in recs):       # ours; null: no influence, never kept
        for row in rows:
            row["prune_level"] = math.inf if row["prune_level"] is None else float(row["prune_level"])
    else:                                                # circuit-tracer's: from the cumulative fractions
        levels = prune_levels_from_cumulative(torch.tensor([r["cumulative"] for r in rows], dtype=torch.float64))
        for row, level in zip(rows, levels.tolist()):
            row["prune_level"] = level
    nodes = pd.DataFrame(rows, columns=["node_id", "kind", "layer", "pos", "index", "activation", "weight",
                                        "label", "influence", "cumulative", "prune_level"])
    order = {"feature": 0, "error": 1, "embedding": 2, "logit": 3}
    nodes = nodes.iloc[sorted(range(len(nodes)), key=lambda k: (order[rows[k]["kind"]], k))]
    nodes = nodes.reset_index(drop=True)
    where = {nid: k for k, nid in enumerate(nodes["node_id"])}
    A = torch.zeros(len(nodes), len(nodes))
    for l in data.get("links", []):
        A[where[l["target"]], where[l["source"]]] += float(l.get("weight", 0.0))
    consts = pd.DataFrame(ours.get("constants") or [])
    tokens = list(meta.get("prompt_tokens") or [])
    extra = {k: v for k, v in ours.items() if k not in ("constants", "n_layers", "token_ids", "kind")}
    extra.update(prompt=meta.get("prompt", "".join(tokens)), node_threshold=meta.get("node_threshold"),
                 slug=meta.get("slug"))
    return cls(nodes, A, consts, tokens, list(ours.get("token_ids") or []), int(n_layers),
               str(meta.get("scan") or ""), extra)
