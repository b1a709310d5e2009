"""An attribution graph of a few hundred nodes in a real headless browser (the
standalone page, the widget's own module): no two nodes overlap, the page opens
centred on the target with the row labels in view, hovering a node highlights
exactly its incoming and outgoing edges, and nodes pin and group into a
named supernode. Needs /usr/bin/chromium and playwright, as test_browser.py."""
import math

import pytest
import torch

from test_browser import CHROME_ARGS, CHROMIUM, _ensure_chromium, _ensure_playwright

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page_path(tmp_path_factory):
    from tc_explore import TranscoderSet, load_model
    from tc_explore.circuits import attribute
    from tc_explore.testing import build_tiny_gpt2, random_transcoder
    from tc_explore.ui.graph_widget import circuit_graph_widget
    work = tmp_path_factory.mktemp("attr_page")
    model = load_model(str(build_tiny_gpt2(work / "model", n_layers=3, d_model=32)), device="cpu")
    tcs = TranscoderSet.from_transcoders([random_transcoder(32, 64, l, seed=3) for l in range(3)])
    graph = attribute(model, tcs, "The war lasted from to and the cat sat on the mat", dtype=torch.float64)
    pruned = graph.prune(node_threshold=0.995, edge_threshold=0.99)
    assert 150 <= len(pruned) <= 700, len(pruned)
    w = circuit_graph_widget(pruned)
    path = work / "attribution.html"
    w.to_html(path)
    # what the slider must show (tests/test_graph_widget.py ties these to graph.prune)
    shown = {t: w.prune(t) for t in (0.3, 0.6, 0.9)}
    w.prune(0.995)
    return path, len(pruned), pruned.nodes.node_id[pruned.nodes.kind == "logit"].iloc[0], shown


def test_attribution_graph_in_the_browser(page_path):
    path, n_nodes, top_logit, shown = page_path
    _ensure_chromium()
    sync_playwright = _ensure_playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(path.as_uri())
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
        assert page.locator(".tcx-node").count() == n_nodes
        # the prune slider is the node threshold: it opens at the file's (0.995), showing
        # everything, and at each value shows the nodes Python's visible_elements does
        assert page.locator(".tcx-prune-label").inner_text().startswith("node threshold")
        assert page.locator(".tcx-prune").input_value() == "0.995"
        assert page.locator(".tcx-node.tcx-hidden").count() == 0
        for t, ids in shown.items():
            page.evaluate(f"""() => {{ const s = document.querySelector('.tcx-prune');
                s.value = '{t}'; s.dispatchEvent(new Event('input', {{bubbles: true}})); }}""")
            seen = page.evaluate("""() => [...document.querySelectorAll('.tcx-node:not(.tcx-hidden)')]
                .map((g) => g.dataset.nodeId)""")
            assert set(seen) == ids, t
        assert len(shown[0.3]) < len(shown[0.9]) < n_nodes
        page.evaluate("""() => { const s = document.querySelector('.tcx-prune');
            s.value = '1'; s.dispatchEvent(new Event('input', {bubbles: true})); }""")
        assert page.locator(".tcx-node.tcx-hidden").count() == 0
        # no overlaps: every pair of node shapes at least touching-distance apart
        shapes = page.evaluate("""() => [...document.querySelectorAll('.tcx-node')].map((g) => {
            const b = g.getBoundingClientRect();
            return [b.x + b.width / 2, b.y + b.height / 2, Math.max(b.width, b.height) / 2]; })""")
        for i in range(len(shapes)):
            xi, yi, ri = shapes[i]
            for j in range(i + 1, len(shapes)):
                xj, yj, rj = shapes[j]
                assert math.hypot(xi - xj, yi - yj) >= ri + rj - 0.5, (i, j, shapes[i], shapes[j])
        # opens centred on a target (a root), with the row labels visible
        canvas = page.locator(".tcx-graph-canvas")
        page.wait_for_function("document.querySelector('.tcx-graph-canvas').dataset.centredOn", timeout=5000)
        root_id = canvas.get_attribute("data-centred-on")
        box = canvas.bounding_box()
        assert page.evaluate("document.querySelector('.tcx-graph-canvas').scrollWidth") > box["width"]
        rb = page.locator(f".tcx-node[data-node-id='{root_id}']").bounding_box()
        assert box["x"] <= rb["x"] and rb["x"] + rb["width"] <= box["x"] + box["width"]
        labels = page.locator(".tcx-row-label")
        assert labels.count() >= 4
        page.evaluate("() => { const c = document.querySelector('.tcx-graph-canvas'); c.scrollLeft = c.scrollWidth; }")
        lb = labels.first.bounding_box()
        assert box["x"] <= lb["x"] and lb["x"] + lb["width"] <= box["x"] + box["width"]
        # hover: exactly the node's incoming and outgoing edges are highlighted
        node_id = page.evaluate("""() => {
            const ids = [...document.querySelectorAll('.tcx-edge')].map((e) => e.dataset.target);
            return ids.find((id) => !id.startsWith('E_') && document.querySelector(`.tcx-edge[data-source='${id}']`)); }""")
        page.locator(f".tcx-node[data-node-id='{node_id}']").hover(force=True)
        n_touching = page.locator(f".tcx-edge[data-source='{node_id}'], .tcx-edge[data-target='{node_id}']").count()
        assert n_touching > 0
        assert page.locator(".tcx-edge.tcx-edge-hover").count() == n_touching
        assert page.locator(".tcx-graph-canvas.tcx-hovering").count() == 1
        page.mouse.move(1, 1)
        assert page.locator(".tcx-edge.tcx-edge-hover").count() == 0
        # pin two nodes, group them, show the pinned subgraph only
        for nid in (node_id, top_logit):
            page.locator(f".tcx-node[data-node-id='{nid}']").click(force=True)
            page.locator(".tcx-pin").click()
        assert page.locator(".tcx-node.tcx-pinned").count() == 2
        page.locator(".tcx-group-name").fill("my circuit")
        page.locator(".tcx-group").click()
        group = page.locator(".tcx-supernode[data-name='my circuit']")
        assert group.count() == 1 and set(group.get_attribute("data-members").split()) == {node_id, top_logit}
        page.locator(".tcx-pinned-only").check()
        assert page.locator(".tcx-node:not(.tcx-hidden)").count() == 2
        browser.close()
