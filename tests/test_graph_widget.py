"""The circuit graph widget's Python side: traits, selection → dashboard,
prune, expand through the library's path search, standalone HTML export.
(Rendering in a real browser is tests/test_browser.py.)"""
import html
import json
import re

import pytest

from tc_explore.errors import InvalidInputError
from tc_explore.circuits import PathGraphExpander
from tc_explore.ui.graph_view import graph_view_data, visible_elements
from tc_explore.ui.graph_widget import CircuitGraphWidget, circuit_graph_widget
from tc_explore.widgets import widget_asset

PROMPT = "The war lasted from 17 35 to 17"


@pytest.fixture(scope="module")
def search(tiny_model, tiny_transcoders):
    from tc_explore.circuits import find_paths, logit_diff_target, prompt_context
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    target = logit_diff_target(ctx, "40", "20")
    return find_paths(ctx, target, iterations=2, branches=5)


def _dashboard(layer, feature):
    return f'<div class="dash"><h3>Layer {layer} feature {feature}</h3></div>'


def test_assets_ship_as_package_data():
    js, css = widget_asset("circuit_graph.js"), widget_asset("circuit_graph.css")
    assert "export default" in js and "tcx-dashboard-panel" in js
    assert ".tcx-node" in css
    with pytest.raises(FileNotFoundError):
        widget_asset("no_such_file.js")


def test_view_of_a_search_graph(search):
    w = circuit_graph_widget(search, dashboard=_dashboard)
    graph = w.expander.graph()
    view = w.graph_data
    assert {n["id"] for n in view["nodes"]} == set(graph.nodes)
    assert len(view["links"]) == len(graph.edges)
    roots = [n for n in view["nodes"] if n["is_root"]]
    assert [r["id"] for r in roots] == [graph.target_id]
    assert roots[0]["kind"] == "logit"
    assert view["tokens"] == list(search.ctx.token_strs)
    # rows: embeddings lowest, the output highest; a feature of layer l sits in "mlp l"
    labels = {r["row"]: r["label"] for r in view["rows"]}
    for n in view["nodes"]:
        g = graph.nodes[n["id"]]
        assert n["contribution"] == pytest.approx(g.influence)
        if n["kind"] == "feature":
            assert labels[n["row"]] == f"mlp {g.node.layer}"
            assert (n["layer"], n["feature"]) == (g.node.layer, g.node.index)
            assert n["ctx"] == g.node.token
            names = [k for k, _ in n["tooltip"]]
            assert "activation" in names and "contribution" in names
        if n["kind"] == "head":
            assert labels[n["row"]] == f"attn {g.node.layer}"
    assert labels[min(labels)] in ("emb", "attn 0", "mlp 0")
    assert labels[max(labels)] == "out"


def test_selection_shows_that_features_dashboard(search):
    calls = []

    def dash(layer, feature):
        calls.append((layer, feature))
        return _dashboard(layer, feature)

    w = circuit_graph_widget(search, dashboard=dash)
    feats = [n for n in w.graph_data["nodes"] if n["kind"] == "feature"]
    assert feats, "the search found no feature nodes"
    f = feats[0]
    w.selected_node = f["id"]
    assert w.dashboard["node_id"] == f["id"]
    assert (w.dashboard["layer"], w.dashboard["feature"]) == (f["layer"], f["feature"])
    assert f"Layer {f['layer']} feature {f['feature']}" in w.dashboard["html"]
    w.selected_node = ""
    assert w.dashboard == {}
    w.selected_node = f["id"]                       # cached: the renderer runs once per feature
    assert calls == [(f["layer"], f["feature"])]
    other = next(n for n in w.graph_data["nodes"] if n["kind"] != "feature")
    w.select(other["id"])
    assert w.dashboard["feature"] is None and html.escape(other["label"]) in w.dashboard["html"]
    with pytest.raises(Exception, match="No node"):
        w.selected_node = "no-such-node"


def test_prune_hides_small_nodes_and_edges(search):
    w = circuit_graph_widget(search)
    all_nodes, all_links = w.visible()
    assert all_nodes == set(w.node_ids) and len(all_links) == len(w.graph_data["links"])
    kept = w.prune(0.5)
    non_root = [n for n in w.graph_data["nodes"] if not n["is_root"]]
    biggest = max(abs(n["contribution"]) for n in non_root)
    for n in w.graph_data["nodes"]:
        assert (n["id"] in kept) == (n["is_root"] or abs(n["contribution"]) >= 0.5 * biggest)
    assert len(kept) < len(all_nodes)
    assert w.prune(1.0) >= {n["id"] for n in w.graph_data["nodes"] if n["is_root"]}
    _, links = w.visible()
    assert all(l["source"] in kept and l["target"] in kept for l in links)
    for bad in (-0.1, 1.5, "lots"):
        with pytest.raises(Exception, match="threshold"):
            w.threshold = bad


def test_expand_traces_one_more_step(search):
    w = circuit_graph_widget(search, dashboard=_dashboard)
    graph = w.expander.graph()
    # a node of the last iteration that can be traced: it has no incoming edges yet
    cand = [n for n in w.graph_data["nodes"] if n["expandable"]]
    assert cand, "no expandable node"
    nid = cand[0]["id"]
    assert not graph.incoming(nid)
    n_before = len(w.node_ids)
    w.selected_node = nid
    w._handle_message(w, {"type": "expand", "node_id": nid}, [])   # what the button sends
    assert w.status.startswith("expanded"), w.status
    g2 = w.expander.graph()
    incoming = g2.incoming(nid)
    assert incoming, "expanding added no contributors"
    # the new children of the expanded node, plus its remainder, add up to its attribution
    assert sum(e.weight for e in incoming) == pytest.approx(g2.nodes[nid].influence, rel=1e-6, abs=1e-9)
    assert len(w.node_ids) > n_before and w.selected_node == nid
    assert not w.node(nid)["expandable"]
    w._handle_message(w, {"type": "expand", "node_id": nid}, [])
    assert w.status.startswith("expand failed")
    leaf = next(n for n in w.graph_data["nodes"] if n["kind"] in ("embed", "error", "bias"))
    with pytest.raises(InvalidInputError, match="cannot be traced"):
        w.expand_node(leaf["id"])


def test_export_html_is_standalone(search, tmp_path):
    w = circuit_graph_widget(search, dashboard=_dashboard)
    page = w.to_html(tmp_path / "graph.html")
    assert (tmp_path / "graph.html").read_text() == page
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org", "")
    assert "https://" not in page
    state = json.loads(re.search(r'class="tcx-state">(.*?)</script>', page, re.S).group(1))
    dashes = json.loads(re.search(r'class="tcx-dashboards">(.*?)</script>', page, re.S).group(1))
    assert {n["id"] for n in state["graph_data"]["nodes"]} == set(w.node_ids)
    assert state["can_expand"] is False
    for n in w.graph_data["nodes"]:
        if n["kind"] == "feature":
            assert f"Layer {n['layer']} feature {n['feature']}" in dashes[n["id"]]["html"]
    assert widget_asset("circuit_graph.js") in page


def test_plain_json_graph_and_bad_input(tmp_path, search):
    w0 = circuit_graph_widget(search)
    text = w0.expander.graph().to_json()
    path = tmp_path / "g.json"
    path.write_text(text)
    for source in (text, path, json.loads(text)):
        w = CircuitGraphWidget(source)
        assert w.node_ids == w0.node_ids
        assert not w.can_expand
        with pytest.raises(InvalidInputError, match="without an expand function"):
            w.expand_node(w.node_ids[0])
    with pytest.raises(InvalidInputError, match="nodes"):
        CircuitGraphWidget({"links": []})
    with pytest.raises(InvalidInputError, match="unknown node"):
        CircuitGraphWidget({"nodes": [{"node_id": "a"}], "links": [{"source": "a", "target": "b"}]})
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        CircuitGraphWidget("{not json")
    with pytest.raises(InvalidInputError):
        CircuitGraphWidget(42)
    with pytest.raises(InvalidInputError, match="PathSearchResult"):
        PathGraphExpander({"nodes": []})
    view = graph_view_data(json.loads(text))
    assert visible_elements(view, 0.0)[0] == {n["id"] for n in view["nodes"]}


def test_tooltips_say_what_each_node_kind_is(search):
    from tc_explore.ui.graph_view import KIND_DESCRIPTIONS
    w = circuit_graph_widget(search)
    graph = w.expander.graph()
    seen = set()
    for n in w.graph_data["nodes"]:
        kind = dict(n["tooltip"])["kind"]
        tc_kind = graph.nodes[n["id"]].node.kind
        assert kind == KIND_DESCRIPTIONS[tc_kind]
        assert "cross layer" not in kind          # per-layer transcoders here
        seen.add(tc_kind)
    assert {"feature", "error", "remainder"} <= seen


def test_panel_promises_dashboards_only_when_attached(search):
    without = circuit_graph_widget(search)
    assert without.has_dashboards is False
    with_dash = circuit_graph_widget(search, dashboard=_dashboard)
    assert with_dash.has_dashboards is True
    for w, expected in ((without, False), (with_dash, True)):
        state = json.loads(re.search(r'class="tcx-state">(.*?)</script>', w.to_html(), re.S).group(1))
        assert state["has_dashboards"] is expected
    js = widget_asset("circuit_graph.js")
    assert 'model.get("has_dashboards")' in js and "Click a node to see its details" in js


def test_intervention_controls_call_the_library(search):
    from tc_explore.interventions import Intervention, intervene
    w = circuit_graph_widget(search)
    assert w.can_intervene and w.intervention == {}
    feats = [n for n in w.graph_data["nodes"] if n["kind"] == "feature"]
    a, b = feats[0], feats[-1]
    shown = w.set_intervention([a["id"]], 0.0)
    ctx = search.ctx
    ref = intervene(ctx.model, ctx.transcoders, ctx, [Intervention.ablate(a["layer"], a["feature"], a["ctx"])],
                    metric=search.target)
    assert shown["metric_after"] == pytest.approx(ref.metric_after, abs=1e-9)
    assert shown["metric_change"] != 0 and shown["nodes"] == [a["id"]] and shown["scale"] == 0.0
    assert [t["token"] for t in shown["top_tokens"]] == ref.top_tokens(5).token.tolist()
    w.intervention_scale = 1.0                          # the slider: factor 1 changes nothing
    assert w.intervention["metric_change"] == 0.0
    # the buttons: toggle the selected node in and out, clear
    w.select(b["id"])
    w._handle_message(w, {"type": "intervene_toggle", "node_id": b["id"]}, [])
    assert w.intervention_nodes == [a["id"], b["id"]] and len(w.intervention["interventions"]) == 2
    w._handle_message(w, {"type": "intervene_toggle", "node_id": a["id"]}, [])
    assert w.intervention_nodes == [b["id"]]
    root = next(n for n in w.graph_data["nodes"] if n["is_root"])
    w._handle_message(w, {"type": "intervene_toggle", "node_id": root["id"]}, [])
    assert "not a transcoder feature" in w.status and w.intervention_nodes == [b["id"]]
    w._handle_message(w, {"type": "intervene_clear"}, [])
    assert w.intervention_nodes == [] and w.intervention == {}
    with pytest.raises(InvalidInputError, match="not a transcoder feature"):
        w.set_intervention([root["id"]], 0.0)
    page = w.to_html()
    assert '"can_intervene": false' in page
    plain = CircuitGraphWidget(w.graph)
    assert not plain.can_intervene
    with pytest.raises(InvalidInputError, match="without an intervene function"):
        plain.set_intervention([a["id"]], 0.0)


def test_mimebundle_carries_a_self_contained_html_fallback(search):
    """Static HTML (nbconvert, offline) shows the text/html rendering: the graph's
    state, its browser module and every feature node's dashboard, no network."""
    w = circuit_graph_widget(search, dashboard=_dashboard)
    bundle = w._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data
    fragment = data["text/html"]
    assert "<html" not in fragment and "https://" not in fragment and "<script src" not in fragment
    state = json.loads(re.search(r'class="tcx-state">(.*?)</script>', fragment, re.S).group(1))
    dashes = json.loads(re.search(r'class="tcx-dashboards">(.*?)</script>', fragment, re.S).group(1))
    assert {n["id"] for n in state["graph_data"]["nodes"]} == set(w.node_ids)
    for n in w.graph_data["nodes"]:
        if n["kind"] == "feature":
            assert f"Layer {n['layer']} feature {n['feature']}" in dashes[n["id"]]["html"]
    assert widget_asset("circuit_graph.js") in fragment
    # two graphs on one page do not share element ids
    ids = {re.search(r'class="tcx-embed" id="([^"]+)"', w.embed_html()).group(1) for _ in range(2)}
    assert len(ids) == 2


def test_pins_and_supernodes_round_trip_through_the_graph_file():
    ids = ["a", "b", "c"]
    w = CircuitGraphWidget({"nodes": [{"node_id": i} for i in ids], "links": []})
    w.pin("a")
    w.group("pair", ["b", "c"])
    assert w.pinned_nodes == ["a", "b", "c"]
    data = w.graph_json()
    assert data["qParams"]["pinnedIds"] == ["a", "b", "c"]
    assert data["qParams"]["supernodes"] == [["pair", "b", "c"]]
    again = CircuitGraphWidget(data)              # a saved subgraph opens with its pins and groups
    assert again.pinned_nodes == w.pinned_nodes and again.supernodes == w.supernodes
    assert w.unpin("a") == ["b", "c"]
    with pytest.raises(InvalidInputError, match="no node"):
        w.pin("nope")
    with pytest.raises(InvalidInputError, match="name"):
        w.group(" ", ["a"])
    with pytest.raises(InvalidInputError, match="no node"):
        w.supernodes = [["g", "zzz"]]


def test_circuit_graph_widget_accepts_a_loaded_graph(search, tmp_path):
    from tc_explore.circuits import CircuitGraph
    g = CircuitGraph.from_paths(search)
    g.to_json(tmp_path / "g.json")
    for source in (g, g.to_dict(), g.to_json(), tmp_path / "g.json", str(tmp_path / "g.json")):
        w = circuit_graph_widget(source)
        assert set(w.node_ids) == set(g.nodes) and not w.can_expand


def test_intervention_controls_on_an_attribution_graph(tiny_model, tiny_transcoders):
    """An attribution graph's feature nodes map back to (layer, feature index,
    position), not to the graph file's unique integer, so the controls ablate
    the feature the node shows."""
    from tc_explore.circuits import attribute, prompt_context
    from tc_explore.interventions import Intervention, feature_scaling, intervene
    ctx = prompt_context(tiny_model, tiny_transcoders, "The war lasted from the")
    graph = attribute(tiny_model, tiny_transcoders, ctx, max_n_logits=2)
    w = circuit_graph_widget(graph, intervene=feature_scaling(tiny_model, tiny_transcoders, ctx))
    assert w.can_intervene
    feats = graph.nodes[graph.nodes.kind == "feature"]
    row = feats.iloc[len(feats) // 2]
    node_id = str(row.node_id)
    assert w._intervention_target(node_id) == (int(row.layer), int(row["index"]), int(row.pos))
    shown = w.set_intervention([node_id], 0.0)
    ref = intervene(tiny_model, tiny_transcoders, ctx, [Intervention.ablate(int(row.layer), int(row["index"]),
                                                                           int(row.pos))])
    assert [t["token"] for t in shown["top_tokens"]] == ref.top_tokens(5).token.tolist()
    assert shown["nodes"] == [node_id]


# -- attribution graphs: the prune slider is AttributionGraph.prune's node threshold --------------
@pytest.fixture(scope="module")
def attribution(tmp_path_factory):
    import torch
    from tc_explore import TranscoderSet, load_model
    from tc_explore.circuits import attribute
    from tc_explore.testing import build_tiny_gpt2, random_transcoder
    model = load_model(str(build_tiny_gpt2(tmp_path_factory.mktemp("slider"), n_layers=3, d_model=32)),
                       device="cpu")
    tcs = TranscoderSet.from_transcoders([random_transcoder(32, 64, l, seed=3) for l in range(3)])
    return attribute(model, tcs, "The war lasted from to and the cat", dtype=torch.float64, progress=False)


def test_attribution_prune_slider_shows_what_prune_keeps(attribution):
    graph = attribution
    w = circuit_graph_widget(graph)
    assert w.graph_data["prune"] == {"mode": "influence", "default": 1.0} and w.threshold == 1.0
    previous = set()
    for t in (0.0, 0.1, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        kept = set(graph.prune(node_threshold=t, edge_threshold=1.0).nodes.node_id)
        assert w.prune(t) == kept, t
        nodes, links = w.visible()
        assert all(l["source"] in kept and l["target"] in kept for l in links)
        assert len(links) == sum(l["source"] in kept and l["target"] in kept for l in w.graph_data["links"])
        assert previous <= kept
        previous = kept
    assert len(graph.prune(node_threshold=0.5, edge_threshold=1.0)) < len(graph.prune(node_threshold=0.9))
    # logits and embeddings show at every threshold
    always = set(graph.nodes.node_id[graph.nodes.kind.isin(["logit", "embedding"])])
    assert always <= w.prune(0.0)
    # a pruned file opens at its node threshold with everything it holds, and
    # below it shows the same nodes as pruning the full graph there
    pruned = graph.prune(node_threshold=0.9, edge_threshold=1.0)
    wp = circuit_graph_widget(pruned)
    assert wp.threshold == 0.9 and wp.visible()[0] == set(pruned.nodes.node_id)
    for t in (0.0, 0.3, 0.5, 0.8, 0.9):
        assert wp.prune(t) == set(graph.prune(node_threshold=t, edge_threshold=1.0).nodes.node_id), t
    # the level rides in the file (tc_prune_level) and back
    back = type(graph).from_json(pruned.to_json())
    assert back.nodes.prune_level.tolist() == pruned.nodes.prune_level.tolist()


def test_prune_slider_on_a_circuit_tracer_file():
    """circuit-tracer's files carry only the cumulative fraction (``influence``):
    a node shows when the fraction above it is below the threshold, and, as
    prune does, only with a link into the shown graph."""
    from test_graph import CT_FILE
    w = CircuitGraphWidget(CT_FILE)
    assert w.graph_data["prune"] == {"mode": "influence", "default": 0.8}
    levels = {n["id"]: n["prune_level"] for n in w.graph_data["nodes"]}
    assert levels == {"0_7_2": -1.0, "0_1_2": 0.3, "E_50_1": -1.0, "3_9_2": -1.0}
    assert w.prune(0.3) == w.prune(0.9) == {"E_50_1", "0_7_2", "3_9_2"}   # the error has no link out
    assert w.prune(0.0) == {"E_50_1", "0_7_2", "3_9_2"}
