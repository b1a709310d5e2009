"""Graph files across the two libraries: ours (a pruned attribution graph and a
3-iteration x 25-branch path graph) through circuit-tracer 0.5.0's own pydantic
graph model and its local viewer in headless Chromium (every node must show),
and a file circuit-tracer's ``create_graph_files`` writes, read by our
``AttributionGraph.from_json``.

circuit-tracer's viewer loads d3 (with d3-jetpack), dagre and pako from CDNs;
``scripts/make_circuit_tracer_env.sh`` puts them in the environment's
``viewer-js`` folder and the browser is served those instead (no network)."""
from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest
import torch

from test_circuit_tracer import CT_PYTHON, REQUIRED, ROOT, _case, run_circuit_tracer

VIEWER = ROOT / "scripts" / "circuit_tracer_viewer.py"
JS = CT_PYTHON.parent.parent / "viewer-js"
# the viewer's CDN scripts -> local files (None: a script the graph view does not need)
CDN = {
    "static_js/lib/d3.js": "d3-jetpack-bundle.js",
    "static_js/lib/jetpack_2024-07-20.js": None,      # the bundle above holds d3-jetpack
    "static_js/lib/hotserver-client-ws.js": None,     # the authors' live-reload client
    "static_js/lib/npy_v0.js": None,                  # .npy feature data, not used by the graph
    "dagre@0.8.5/dist/dagre.min.js": "node_modules/dagre/dist/dagre.min.js",
    "pako@2.1.0/dist/pako.min.js": "node_modules/pako/dist/pako.min.js",
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return _case("gpt2", "plt", tmp_path_factory)


@pytest.fixture(scope="module")
def our_files(case, tmp_path_factory):
    """A data folder with our pruned attribution graph and a path graph."""
    from tc_explore.circuits import CircuitGraph, attribute, find_paths, logit_diff_target, prompt_context
    out = tmp_path_factory.mktemp("viewer_data")
    pruned = attribute(case.model, case.transcoders, case.tokens).prune()
    pruned.to_json(out / "tc-attribution.json", slug="tc-attribution")
    ctx = prompt_context(case.model, case.transcoders, case.tokens, prepend_bos=False)
    target = logit_diff_target(ctx, case.model.to_single_token(" cat"), case.model.to_single_token(" dog"))
    paths = CircuitGraph.from_paths(find_paths(ctx, target, iterations=3, branches=25))
    data = paths.to_dict()
    data["metadata"]["slug"] = "tc-paths"
    (out / "tc-paths.json").write_text(json.dumps(data))
    return out


def _ct_validate(*paths) -> list[dict]:
    proc = subprocess.run([str(CT_PYTHON), str(VIEWER), "validate", *map(str, paths)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"circuit-tracer rejected the file:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("slug", ["tc-attribution", "tc-paths"])
def test_circuit_tracer_graph_model_accepts_our_files(our_files, slug):
    data = json.loads((our_files / f"{slug}.json").read_text())
    (summary,) = _ct_validate(our_files / f"{slug}.json")
    assert summary["nodes"] == len(data["nodes"]) and summary["links"] == len(data["links"])
    assert summary["unique_ids"] == summary["nodes"]        # no node id shared
    assert summary["unique_keys"] == summary["nodes"]       # nothing the viewer would merge
    assert summary["dangling_links"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.browser
@pytest.mark.parametrize("slug", ["tc-attribution", "tc-paths"])
def test_circuit_tracer_viewer_shows_every_node(our_files, slug):
    from test_browser import CHROME_ARGS, CHROMIUM, _ensure_chromium, _ensure_playwright
    missing = [p for p in CDN.values() if p and not (JS / p).is_file()]
    if missing:
        reason = f"the viewer's JavaScript libraries are missing from {JS} (make circuit-tracer fetches them)"
        pytest.fail(reason) if REQUIRED else pytest.skip(reason)
    _ensure_chromium()
    sync_playwright = _ensure_playwright()
    data = json.loads((our_files / f"{slug}.json").read_text())
    port = _free_port()
    server = subprocess.Popen([str(CT_PYTHON), str(VIEWER), "serve", str(our_files), str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()[-3000:]

        def cdn(route):
            url = route.request.url
            local = next((v for k, v in CDN.items() if url.endswith(k)), "absent")
            if local == "absent":
                route.abort()                  # nothing else may leave the machine
            elif local is None:
                route.fulfill(status=200, content_type="application/javascript", body="")
            else:
                route.fulfill(status=200, content_type="application/javascript", path=str(JS / local))

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route(lambda url: not url.startswith(f"http://127.0.0.1:{port}/"), cdn)
            # The viewer hides nodes whose cumulative influence is over the slider
            # (the file's node_threshold by default), and pruning at 0.8 keeps the one
            # node that crosses 0.8 (circuit-tracer's own files too): open it at 1.
            page.goto(f"http://127.0.0.1:{port}/index.html?slug={slug}&pruningThreshold=1")
            page.wait_for_function("document.querySelectorAll('.link-graph text.node').length > 0",
                                   timeout=60_000)
            shown = page.evaluate("""() => Array.from(document.querySelectorAll('.link-graph text.node'))
                .map(e => ({id: e.__data__.node_id, transform: e.getAttribute('transform')}))""")
            browser.close()
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert not errors, errors
    ids = [s["id"] for s in shown]
    want = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(want), (f"not shown: {sorted(set(want) - set(ids))}; "
                                   f"not ours: {sorted(set(ids) - set(want))}")
    for s in shown:                                  # every node drawn at a real place
        xy = [float(v) for v in s["transform"].split("(")[1].rstrip(")").split(",")]
        assert all(np.isfinite(xy)), s


def test_we_read_circuit_tracers_own_files(case, tmp_path):
    """create_graph_files (at its default thresholds) → AttributionGraph.from_json:
    the same nodes, positions, tokens, activations and cumulative influence."""
    from tc_explore.circuits import AttributionGraph
    ct, info = run_circuit_tracer(case.hub, case.tokens, tmp_path, "--prune", "--graph-files", "ct-graph")
    graph = AttributionGraph.from_json(tmp_path / "ct-graph.json")
    data = json.loads((tmp_path / "ct-graph.json").read_text())
    assert len(graph) == len(data["nodes"])
    n_layers, P = case.hub.n_layers, len(case.tokens)
    sel = ct["active_features"][ct["selected_features"]]
    n_feat = len(sel)
    keep = torch.nonzero(ct["node_mask"]).flatten().tolist()
    written = {n["node_id"] for n in data["nodes"]}
    expected = {}
    for j in keep:
        if j < n_feat:
            l, p, f = sel[j].tolist()
            expected[f"{l}_{f}_{p}"] = ("feature", l, p, f, float(ct["activation_values"][ct["selected_features"][j]]))
        elif j < n_feat + n_layers * P:
            l, p = divmod(j - n_feat, P)
            expected[f"0_{l}_{p}"] = ("error", l, p, -1, None)
        elif j < n_feat + (n_layers + 1) * P:
            p = j - n_feat - n_layers * P
            expected[f"E_{case.tokens[p]}_{p}"] = ("embedding", -1, p, case.tokens[p], None)
        else:
            t = int(ct["logit_token_ids"][j - n_feat - (n_layers + 1) * P])
            expected[f"{n_layers + 1}_{t}_{P - 1}"] = ("logit", n_layers, P - 1, t, None)
    # circuit-tracer writes the kept nodes that have a kept edge (and all embeddings and logits)
    assert written <= set(expected)
    cumulative = dict(zip(expected, [float(ct["cumulative_scores"][j]) for j in keep]))
    for row in graph.nodes.itertuples():
        kind, layer, pos, index, act = expected[row.node_id]
        assert (row.kind, row.layer, row.pos, row.index) == (kind, layer, pos, index), row
        if kind == "feature":
            assert row.activation == pytest.approx(act, rel=1e-6)
        if kind != "logit":     # its viewer file carries no influence for logits
            assert row.cumulative == pytest.approx(cumulative[row.node_id], rel=1e-6)
    assert set(graph.nodes.kind) == {"feature", "error", "embedding", "logit"}
