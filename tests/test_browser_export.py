"""The exported notebook as a reader meets it: scripts/run_notebooks.py runs a
small notebook (circuit graph widget, explorer, two plotly figures) and exports
it to HTML; Debian's Chromium opens that page with the network switched off.
The page must make no network request at all (no failed request), and the
graph's SVG, its dashboards, the explorer's dashboard and both figures must be
there. Screenshots go to artifacts/screenshots/.

Its own module: test_browser.py keeps a Playwright session open for its
module-scoped JupyterLab fixture, and Playwright's sync API allows one at a time.
"""
from __future__ import annotations

import pytest

from test_browser import CHROME_ARGS, CHROMIUM, PROMPT, SHOTS, _demo_available, _ensure_chromium, \
    _ensure_playwright

pytestmark = pytest.mark.browser

EXPORT_NOTEBOOK = [
    """import os, tempfile, torch
torch.set_num_threads(1)
import plotly.graph_objects as go
from tc_explore import load_model, load_transcoders
from tc_explore.circuits import find_paths, logit_direction_target, prompt_context
from tc_explore.demo import SyntheticSentences
from tc_explore.index import FeatureIndex
from tc_explore.tasks.greater_than import year_token_ids
from tc_explore.ui.explorer import FeatureExplorer
from tc_explore.ui.figures import use_offline_plotly
from tc_explore.ui.graph_widget import circuit_graph_widget, feature_dashboard_html

use_offline_plotly()
model = load_model("tiny-years", device="cpu")
transcoders = load_transcoders("tiny-years", device="cpu")
texts = [" ".join(SyntheticSentences(seed=7).sentence() for _ in range(6)) for _ in range(40)]
index = FeatureIndex.build(model, transcoders, texts, n_tokens=1024,
                           out_dir=os.path.join(tempfile.mkdtemp(), "index"), k=5)
ctx = prompt_context(model, transcoders, {prompt!r})
years = year_token_ids(model).tolist()
paths = find_paths(ctx, logit_direction_target(ctx, years[36:], years[:36]), iterations=2, branches=6)
circuit_graph_widget(paths, dashboard=feature_dashboard_html(index, model, transcoders))""",
    """FeatureExplorer(index, model, transcoders, layer=transcoders.layers[-1], feature=0, prompt={prompt!r})""",
    """go.Figure(go.Scatter(x=list(range(10)), y=[x * x for x in range(10)], name="squares"))""",
    """go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))""",
]


def test_exported_notebook_shows_graph_dashboard_and_figures_offline(tmp_path, repo_module):
    """The runner's HTML export, opened in Chromium with the network switched
    off: it requests nothing but itself (so no request fails), the graph's SVG,
    a dashboard (the graph panel's and the explorer's) and both plotly figures
    are there, and nbconvert warned about nothing."""
    if not _demo_available():
        pytest.skip("needs the demo model tiny-years (pretrained/tiny-years)")
    _ensure_chromium()
    sync_playwright = _ensure_playwright()
    import warnings

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    execute_notebook = repo_module("run_notebooks").execute_notebook
    nb = new_notebook(cells=[new_code_cell(src.format(prompt=PROMPT)) for src in EXPORT_NOTEBOOK])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "export_test.ipynb"
    nbformat.write(nb, src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, page_path, _ = execute_notebook(src, tmp_path / "out", timeout=300)
    unrepresented = [str(w.message) for w in caught if "not able to be represented" in str(w.message)]
    assert not unrepresented, unrepresented
    text = page_path.read_text(encoding="utf-8")
    assert text.count("plotly.js v") == 1                 # plotly.js inlined once

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1000})
        context.route("**/*", lambda route: route.abort()
                      if not route.request.url.startswith(("file:", "blob:", "data:")) else route.continue_())
        page = context.new_page()
        errors, failed, requested = [], [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(f"{r.url[:120]}: {r.failure}"))
        page.on("request", lambda r: requested.append(r.url[:120]))
        page.goto(page_path.as_uri(), wait_until="networkidle")
        page.wait_for_selector(".tcx-embed[data-ready='1'] svg .tcx-node[data-node-id]", timeout=30_000)
        assert page.locator(".tcx-embed svg .tcx-node").count() >= 3
        assert page.locator(".tcx-embed svg .tcx-edge").count() >= 2
        # the graph's panel opens a pre-rendered dashboard on click, with no kernel
        node = page.locator(".tcx-embed .tcx-node[data-kind='feature']").first
        layer, feature = node.get_attribute("data-layer"), node.get_attribute("data-feature")
        node.click()
        page.locator(f".tcx-embed .tcx-dashboard-panel .tcx-dashboard[data-layer='{layer}']"
                     f"[data-feature='{feature}']").wait_for(timeout=5000)
        # the explorer's static copy: its dashboard and the prompt's tokens
        static = page.locator(".tcx-explorer-static")
        assert static.count() == 1
        assert static.locator(".tcx-dashboard h2").count() == 1
        n_rows = static.locator(".tcx-top-features tr").count() - 1          # one per token
        assert n_rows > 0 and static.locator(".tcx-prompt-view .tcx-token[data-position]").count() == n_rows
        # both figures drawn by the inlined plotly.js
        page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 2",
                               timeout=30_000)
        page.locator(".tcx-embed").first.screenshot(path=str(SHOTS / "export_graph_offline.png"))
        page.screenshot(path=str(SHOTS / "export_notebook_offline.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert not failed, failed
    assert not [url for url in requested if not url.startswith(("file:", "data:", "blob:"))], requested
