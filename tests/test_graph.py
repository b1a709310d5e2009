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
            assert n["is_target_logit"] and n["layer"] == "13" and 0 < n["token_prob"] < 1
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
