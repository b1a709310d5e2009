"""CircuitGraph: built from a path search, conserved at expanded nodes,
graph JSON fields (docs/graph_json.md), JSON round trip, token merging, networkx."""
import json

import pytest

from tc_explore.circuits import CircuitGraph, find_paths, logit_diff_target, prompt_context

PROMPT = "The war lasted from 1735 to 17"
FIELDS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
          "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}


@pytest.fixture(scope="module")
def search(tiny_model, tiny_transcoders):
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    return find_paths(ctx, logit_diff_target(ctx, "40", "20"), iterations=3, branches=8)


def test_graph_conserves_at_expanded_nodes(search):
    g = CircuitGraph.from_paths(search)
    nodes, edges = g.to_pandas()
    assert nodes.is_target.sum() == 1 and g.nodes[g.target_id].node.kind == "logit"
    incoming = edges.groupby("target").weight.sum()
    # The target's contributions (kept + remainder) add up to its value.
    assert incoming[g.target_id] == pytest.approx(search.target.value, abs=1e-4)
    # Every expanded occurrence of a node is fully accounted for by its incoming edges.
    expanded: dict = {}
    for p in search.paths:
        if p.iteration < 3 and p.head.next_target is not None:
            expanded[p.head.node] = expanded.get(p.head.node, 0.0) + p.attribution
    assert expanded
    by_node = {n.node: nid for nid, n in g.nodes.items()}
    for node, total in expanded.items():
        assert incoming[by_node[node]] == pytest.approx(total, abs=1e-4)
    kinds = set(nodes.kind)
    assert {"feature", "remainder"} <= kinds
    G = g.to_networkx()
    assert G.number_of_nodes() == len(g.nodes) and G.number_of_edges() == len(g.edges)
    for e in g.edges:
        assert G.edges[e.source, e.target]["weight"] == e.weight


def test_json_has_viewer_fields_and_round_trips(search, tmp_path):
    g = CircuitGraph.from_paths(search, slug="gt-test")
    data = json.loads(g.to_json(tmp_path / "g.json"))
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    md = data["metadata"]
    for key in ("slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
                "schema_version"):
        assert key in md
    assert md["slug"] == "gt-test" and md["schema_version"] == 1
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    for n in data["nodes"]:
        assert FIELDS <= set(n)
        assert isinstance(n["layer"], str) and isinstance(n["feature"], int)
        if n["feature_type"] == "cross layer transcoder":
            l, f = n["tc_layer"], n["tc_index"]
            assert n["node_id"] == f"{l}_{f}_{n['ctx_idx']}" and n["jsNodeId"] == f"{l}_{f}-0"
            assert n["feature"] == (l + f) * (l + f + 1) // 2 + f
        if n["feature_type"] == "logit":
            # a logit difference is written as circuit-tracer's custom target: a virtual token id
            assert n["is_target_logit"] and n["layer"] == "13" and n["token_prob"] == 1.0
            assert n["feature"] == search.ctx.weights.W_U.shape[1]
            assert n["clerp"] == f'Output "{search.target.label}" (p=1.000)'
        if n["feature_type"] == "embedding":
            assert n["feature"] == n["ctx_idx"] and n["node_id"] == f"E_{n['tc_index']}_{n['ctx_idx']}"
        assert n["layer"] != "" and 0.0 <= n["influence"] <= 1.0 + 1e-12
    # the viewer groups nodes by (layer, feature, ctx_idx): every node its own group
    assert len({(n["layer"], n["feature"], n["ctx_idx"]) for n in data["nodes"]}) == len(ids)
    # influence is the cumulative fraction of |attribution|: the largest node has the smallest
    biggest = max(data["nodes"], key=lambda n: abs(n["tc_attribution"]))
    assert biggest["influence"] == min(n["influence"] for n in data["nodes"])
    jsonschema = pytest.importorskip("jsonschema")
    from tc_explore.circuits.graph_json import schema_path
    jsonschema.validate(data, json.loads(schema_path().read_text()))
    for link in data["links"]:
        assert link["source"] in ids and link["target"] in ids
    back = CircuitGraph.from_json(tmp_path / "g.json")
    assert back.nodes == g.nodes and back.edges == g.edges and back.target_id == g.target_id
    assert back.metadata == g.metadata
    assert CircuitGraph.from_json(g.to_json()).nodes == g.nodes


def test_sum_over_tokens_merges_positions(tiny_model, tiny_transcoders):
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    # A target at an early layer, so heads moving information between tokens make the cut.
    from tc_explore.circuits import residual_target
    import torch
    vec = torch.randn(32, generator=torch.Generator().manual_seed(0))
    only_heads = ("feature", "error", "skip", "mlp", "embed", "pos_embed", "attn_bias", "dec_bias",
                  "offset")
    res = find_paths(ctx, residual_target(ctx, vec, 6, "resid_mid", -1), iterations=3, branches=10,
                     exclude_kinds=only_heads)
    assert all(c.node.kind == "head" for p in res.paths for c in p.contributions)
    g = CircuitGraph.from_paths(res)
    assert any(n.node.kind == "head" for n in g.nodes.values())
    tokens_seen = {n.node.token for n in g.nodes.values() if n.node.kind != "remainder"}
    assert len(tokens_seen) > 1
    s = CircuitGraph.from_paths(res, sum_over_tokens=True)
    assert len(s.nodes) < len(g.nodes)
    assert sum(e.weight for e in s.edges) == pytest.approx(sum(e.weight for e in g.edges), abs=1e-6)
    assert all("_all" in nid or n.node.kind in ("logit", "direction") for nid, n in s.nodes.items()
               if n.node.kind not in ("embed",))
    assert CircuitGraph.from_json(s.to_json()).nodes == s.nodes


def test_every_node_kind_has_an_entry_in_every_table():
    from tc_explore.circuits.contributions import KIND_ORDER, Node, NodeKind
    from tc_explore.errors import InvalidInputError
    from tc_explore.circuits.graph import FEATURE_TYPES
    from tc_explore.ui.graph_view import _TC_KINDS, KIND_DESCRIPTIONS
    for table in (FEATURE_TYPES, _TC_KINDS, KIND_DESCRIPTIONS):
        assert set(table) == set(NodeKind)
        assert all(table[k.value] == table[k] for k in NodeKind)      # plain strings look up too
    assert list(KIND_ORDER) == list(NodeKind)
    assert Node("head", 1, 2, 3, 0).kind is NodeKind.HEAD and f"{NodeKind.HEAD}" == "head"
    with pytest.raises(InvalidInputError, match="Unknown node kind"):
        Node("neuron", 0, 1)


def test_single_logit_target_quotes_the_token(tiny_model, tiny_transcoders):
    from tc_explore.circuits import logit_direction_target
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    res = find_paths(ctx, logit_direction_target(ctx, "40"), iterations=1, branches=4)
    data = CircuitGraph.from_paths(res).to_dict()
    (logit,) = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    tid = tiny_model.to_tokens("40", prepend_bos=False)[0, 0].item()
    assert logit["feature"] == tid and logit["node_id"] == f"13_{tid}_{ctx.n_pos - 1}"
    assert logit["clerp"].startswith('Output "40" (p=') and 0 < logit["token_prob"] < 1


CT_FILE = {  # as circuit-tracer writes a graph (node layout of its create_graph_files)
    "metadata": {"slug": "ct", "scan": "gpt2", "transcoder_list": [], "prompt_tokens": ["<bos>", "a", "b"],
                 "prompt": "ab", "node_threshold": 0.8, "schema_version": 1},
    "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
    "nodes": [
        {"node_id": "E_50_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
         "jsNodeId": "E_50-1", "influence": 0.9},
        {"node_id": "0_7_2", "feature": 35, "layer": "0", "ctx_idx": 2,
         "feature_type": "cross layer transcoder", "jsNodeId": "0_7-0", "influence": 0.3, "activation": 1.5},
        {"node_id": "0_1_2", "feature": -1, "layer": "1", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
         "jsNodeId": "1_2-0", "influence": 0.6},
        {"node_id": "3_9_2", "feature": 9, "layer": "3", "ctx_idx": 2, "feature_type": "logit",
         "token_prob": 0.7, "is_target_logit": True, "jsNodeId": "L_9-2", "clerp": 'Output "x" (p=0.700)'},
    ],
    "links": [{"source": "E_50_1", "target": "0_7_2", "weight": 2.0},
              {"source": "0_7_2", "target": "3_9_2", "weight": 1.0}],
}


def test_reads_circuit_tracer_files():
    g = CircuitGraph.from_json(json.dumps(CT_FILE))
    emb = g.nodes["E_50_1"]
    assert emb.node.kind == "embed" and emb.node.token == 1 and emb.token_id == 50    # not the position
    feat = g.nodes["0_7_2"]
    assert (feat.node.layer, feat.node.index, feat.node.token) == (0, 7, 2)
    # cumulative influence: the most important node (smallest fraction) gets the largest importance
    assert feat.cumulative == 0.3 and feat.influence == pytest.approx(0.7)
    assert g.nodes["E_50_1"].influence < feat.influence
    assert g.target_id == "3_9_2" and g.n_layers == 2


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("nodes"), "'nodes'"),
    (lambda d: d.update(nodes={}), "'nodes' must be a list"),
    (lambda d: d["nodes"].append(dict(d["nodes"][0])), r"nodes\[4\].node_id 'E_50_1' is a duplicate"),
    (lambda d: d["links"].append({"source": "E_50_1", "target": "nope", "weight": 1.0}),
     r"links\[2\].target refers to an unknown node 'nope'.*dangling"),
    (lambda d: d["links"].append({"target": "E_50_1"}), r"links\[2\].source is missing"),
    (lambda d: d["links"][0].update(weight="x"), r"links\[0\].weight must be a finite number"),
    (lambda d: d["nodes"][1].update(ctx_idx="2"), r"nodes\[1\].ctx_idx.*non-negative integer"),
    (lambda d: d["nodes"][1].update(layer=""), r"nodes\[1\].layer.*non-empty"),
    (lambda d: d["nodes"][1].update(feature=1.5), r"nodes\[1\].feature.*integer"),
    (lambda d: d["nodes"][0].pop("node_id"), r"nodes\[0\].node_id must be a non-empty string"),
    (lambda d: d["nodes"].__setitem__(2, 5), r"nodes\[2\] must be an object"),
    (lambda d: (d["nodes"][1].update(node_id="0_x_2"), d.update(links=[])), r"nodes\[1\].node_id '0_x_2' does not follow"),
    (lambda d: d["nodes"][2].update(layer="E"), r"nodes\[2\].layer 'E' must be a layer number"),
    (lambda d: d.update(metadata=[]), "'metadata' must be an object"),
])
def test_from_json_validates_with_clear_errors(mutate, match):
    import copy
    from tc_explore import InvalidInputError
    data = copy.deepcopy(CT_FILE)
    mutate(data)
    with pytest.raises(InvalidInputError, match=match):
        CircuitGraph.from_json(data)
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        CircuitGraph.from_json("{nodes")
    with pytest.raises(InvalidInputError, match="No graph file"):
        CircuitGraph.from_json("/nonexistent/graph.json")
