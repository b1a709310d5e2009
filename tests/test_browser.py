"""The graph widget and the explorer as a person uses them: JupyterLab serves a
small notebook on localhost, Debian's Chromium (driven by Playwright) runs it,
clicks a graph node, prunes, expands, types a prompt into the explorer, and
opens the graph's standalone HTML export. Screenshots go to
artifacts/screenshots/.

Needs: the ``playwright`` Python package (test extras) and ``/usr/bin/chromium``
(installed with apt-get when missing and possible). Skips, saying why, only
where no browser can be installed. Uses the demo model ``tiny-years`` when it
is built, else the test fixtures' tiny model.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "The war lasted from 1735 to 17"


def _ensure_chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip("No browser: /usr/bin/chromium is missing and apt-get is not available to install it.")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("No browser: /usr/bin/chromium is missing and installing it needs root.")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update"], [apt, "install", "-y", "chromium"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"No browser: `{' '.join(cmd)}` failed: {r.stderr.strip()[-400:]}")
    if not os.path.exists(CHROMIUM):
        pytest.skip("No browser: apt-get installed chromium but /usr/bin/chromium is missing.")
    return CHROMIUM


def _ensure_playwright():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"playwright is not installed and pip could not install it: {r.stderr[-300:]}")
    from playwright.sync_api import sync_playwright
    return sync_playwright


def _demo_available() -> bool:
    from tc_explore.hub import registry
    registry.cache_clear()
    return "tiny-years" in registry()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOTEBOOK_SETUP = """
import os, torch
torch.set_num_threads(1)
from tc_explore import load_model, load_transcoders
from tc_explore.circuits import find_paths, logit_direction_target, prompt_context
from tc_explore.index import FeatureIndex
from tc_explore.prompt_features import run_prompt
from tc_explore.tasks.greater_than import year_token_ids
from tc_explore.ui.explorer import FeatureExplorer
from tc_explore.ui.graph_widget import circuit_graph_widget, feature_dashboard_html

OUT = os.environ["TCX_TEST_OUT"]
MODEL = os.environ["TCX_TEST_MODEL"]
model = load_model(MODEL, device="cpu")
transcoders = load_transcoders(os.environ["TCX_TEST_TRANSCODERS"], device="cpu")
texts = [l for l in open(os.environ["TCX_TEST_TEXTS"]).read().splitlines() if l]
index = FeatureIndex.build(model, transcoders, texts, n_tokens=1024, out_dir=os.path.join(OUT, "index"), k=5)
ctx = prompt_context(model, transcoders, {prompt!r})
years = year_token_ids(model).tolist()
target = logit_direction_target(ctx, years[36:], years[:36])
paths = find_paths(ctx, target, iterations=2, branches=6)
graph = circuit_graph_widget(paths, dashboard=feature_dashboard_html(index, model, transcoders))
def _record(change):
    with open(os.path.join(OUT, "selected.txt"), "w") as f:
        f.write(change["new"])
graph.observe(_record, "selected_node")
graph.to_html(os.path.join(OUT, "graph.html"))
graph
"""

NOTEBOOK_EXPLORER = """
LAST = transcoders.layers[-1]
top = run_prompt(model, transcoders, {prompt!r}).top_features(k=1, layers=[LAST])
FEATURE = int(top.iloc[-1].feature)
with open(os.path.join(OUT, "explorer_feature.json"), "w") as f:
    f.write(json.dumps([LAST, FEATURE]))
explorer = FeatureExplorer(index, model, transcoders, layer=LAST, feature=FEATURE)
explorer
"""


def _wait_kernel_idle(port: int, token: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernels?token={token}", timeout=5) as r:
            kernels = json.loads(r.read())
        if kernels and all(k.get("execution_state") == "idle" for k in kernels):
            return
        time.sleep(0.5)
    raise RuntimeError("The notebook's kernel did not start (not idle after 90 s).")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """JupyterLab on localhost with the test notebook, and the model it uses."""
    _ensure_chromium()
    sync_playwright = _ensure_playwright()
    work = tmp_path_factory.mktemp("browser")
    env = dict(os.environ)
    env.update(TCX_TEST_OUT=str(work), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", JUPYTER_PLATFORM_DIRS="1")
    if _demo_available():
        model_name, tc_name = "tiny-years", "tiny-years"
        from tc_explore.demo import SyntheticSentences
        texts = [" ".join(SyntheticSentences(seed=7).sentence() for _ in range(6)) for _ in range(40)]
    else:
        from tc_explore.testing import FIXTURE_WORDS, build_offline_hub
        build_offline_hub(os.environ["HF_HOME"])      # conftest points HF_HOME at a temp cache
        model_name, tc_name = "gpt2", "gpt2-small"
        import random
        rng = random.Random(0)
        texts = [" ".join(rng.choice(FIXTURE_WORDS) for _ in range(40)) + " 1735 to 17"
                 for _ in range(40)]
    (work / "texts.txt").write_text("\n".join(texts))
    env.update(TCX_TEST_MODEL=model_name, TCX_TEST_TRANSCODERS=tc_name,
               TCX_TEST_TEXTS=str(work / "texts.txt"))

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nb = new_notebook(cells=[new_code_cell("import json\n" + NOTEBOOK_SETUP.format(prompt=PROMPT).strip()),
                             new_code_cell(NOTEBOOK_EXPLORER.format(prompt=PROMPT).strip())])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, work / "ui_test.ipynb")

    port, token = _free_port(), "tcx-test-token"
    log = open(work / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
         "--LabApp.expose_app_in_browser=True", "--LabApp.extension_manager=readonly",
         "--ServerApp.open_browser=False", "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (work / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        SHOTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="tcx_chromium_"), executable_path=CHROMIUM, args=CHROME_ARGS,
                headless=True, viewport={"width": 1500, "height": 1000})
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/lab/tree/ui_test.ipynb?token={token}")
            page.wait_for_function("window.jupyterapp && window.jupyterapp.shell && "
                                   "document.querySelector('.jp-Notebook')", timeout=90_000)
            page.wait_for_function("document.querySelector('.jp-Notebook .jp-Cell')", timeout=30_000)
            # wait until the kernel is ready, focus the notebook, then run every cell
            _wait_kernel_idle(port, token)
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            try:
                page.wait_for_selector(".tcx-node[data-node-id]", timeout=150_000)
            except Exception:
                page.screenshot(path=str(SHOTS / "failed_start.png"), full_page=True)
                raise
            page.wait_for_selector(".tcx-prompt-input input", timeout=90_000)
            yield dict(page=page, work=work, model=model_name, transcoders=tc_name, errors=errors)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_click_graph_node_shows_its_dashboard(served):
    page, work = served["page"], served["work"]
    graph = page.locator(".tcx-circuit-graph")
    graph.scroll_into_view_if_needed()
    node = page.locator(".tcx-node[data-kind='feature']").first
    layer, feature = node.get_attribute("data-layer"), node.get_attribute("data-feature")
    node_id = node.get_attribute("data-node-id")
    node.hover()
    tip = page.locator(".tcx-tooltip")
    tip.wait_for(state="visible", timeout=5000)
    assert tip.get_attribute("data-node-id") == node_id
    assert "contribution" in tip.inner_text() and "activation" in tip.inner_text()
    node.click()
    panel = page.locator(f".tcx-dashboard-panel[data-layer='{layer}'][data-feature='{feature}']")
    panel.wait_for(timeout=30_000)
    dash = panel.locator(f".tcx-dashboard[data-layer='{layer}'][data-feature='{feature}']")
    dash.wait_for(timeout=30_000)
    assert f"{feature}" in dash.locator("h2").inner_text()
    assert page.locator(f".tcx-node.tcx-selected[data-node-id='{node_id}']").count() == 1
    # the selection reached Python: the notebook's observer wrote it
    deadline = time.time() + 20
    sel = work / "selected.txt"
    while not (sel.exists() and sel.read_text() == node_id) and time.time() < deadline:
        time.sleep(0.2)
    assert sel.read_text() == node_id
    graph.screenshot(path=str(SHOTS / "graph_node_dashboard.png"))


def test_prune_and_expand_in_the_browser(served):
    page = served["page"]
    canvas = page.locator(".tcx-graph-canvas")
    n_total = int(canvas.get_attribute("data-node-count"))
    page.evaluate("""() => { const s = document.querySelector('.tcx-prune');
        s.value = '0.5'; s.dispatchEvent(new Event('input', {bubbles: true})); }""")
    hidden = page.locator(".tcx-node.tcx-hidden").count()
    assert hidden > 0 and int(canvas.get_attribute("data-visible-nodes")) == n_total - hidden
    assert page.locator(".tcx-node.tcx-root.tcx-hidden").count() == 0
    page.locator(".tcx-graph-canvas").screenshot(path=str(SHOTS / "graph_pruned.png"))
    page.evaluate("""() => { const s = document.querySelector('.tcx-prune');
        s.value = '0'; s.dispatchEvent(new Event('input', {bubbles: true})); }""")
    assert page.locator(".tcx-node.tcx-hidden").count() == 0
    # expand: select an expandable feature or head (one without incoming edges), press the button
    expandable = page.locator(".tcx-node[data-expandable='true']").first.get_attribute("data-node-id")
    n_in = page.locator(f".tcx-edge[data-target='{expandable}']").count()
    assert expandable, "no node to expand"
    page.locator(f".tcx-node[data-node-id='{expandable}']").click()
    button = page.locator(".tcx-expand")
    page.wait_for_function("!document.querySelector('.tcx-expand').disabled", timeout=10_000)
    button.click()
    page.wait_for_function(f"Number(document.querySelector('.tcx-graph-canvas').dataset.nodeCount) > {n_total}",
                           timeout=60_000)
    assert page.locator(f".tcx-edge[data-target='{expandable}']").count() > n_in
    assert page.locator(f".tcx-node[data-node-id='{expandable}']").get_attribute("data-expandable") == "false"
    assert page.locator(".tcx-graph-status").inner_text().startswith("expanded")
    page.locator(".tcx-circuit-graph").screenshot(path=str(SHOTS / "graph_expanded.png"))


def test_ablate_and_scale_nodes_in_the_browser(served):
    page = served["page"]
    node = page.locator(".tcx-node[data-kind='feature']").first
    node_id = node.get_attribute("data-node-id")
    node.click()
    page.wait_for_function("!document.querySelector('.tcx-intervene-toggle').disabled", timeout=10_000)
    page.locator(".tcx-intervene-toggle").click()       # the slider starts at 0: ablation
    result = page.locator(f".tcx-intervention[data-nodes='{node_id}'] .tcx-intervention-metric")
    result.wait_for(timeout=60_000)
    ablated = float(result.get_attribute("data-metric-after"))
    assert "→" in result.inner_text()
    assert page.locator(".tcx-intervention-tokens tr").count() == 6      # header + top 5 tokens
    assert page.locator(f".tcx-node.tcx-intervened[data-node-id='{node_id}']").count() == 1
    # factor 1 leaves the feature as it is: the metric goes back to its clean value
    page.evaluate("""() => { const s = document.querySelector('.tcx-intervene-scale');
        s.value = '1'; s.dispatchEvent(new Event('change', {bubbles: true})); }""")
    page.wait_for_function(f"(() => {{ const m = document.querySelector('.tcx-intervention-metric');"
                           f" return m && Number(m.dataset.metricAfter) !== {ablated}; }})()", timeout=60_000)
    text = page.locator(".tcx-intervention-metric").inner_text()
    assert "(+0)" in text or "(0)" in text, text
    page.locator(".tcx-circuit-graph").screenshot(path=str(SHOTS / "graph_intervention.png"))
    page.locator(".tcx-intervene-clear").click()
    page.wait_for_function("document.querySelectorAll('.tcx-node.tcx-intervened').length === 0", timeout=30_000)


def test_explorer_highlights_prompt_tokens(served):
    page, work = served["page"], served["work"]
    from tc_explore import load_model, load_transcoders
    from tc_explore.prompt_features import run_prompt
    layer, feature = json.loads((work / "explorer_feature.json").read_text())
    model = load_model(served["model"], device="cpu")
    transcoders = load_transcoders(served["transcoders"], device="cpu")
    expected = run_prompt(model, transcoders, PROMPT, layers=[layer]).feature(layer, feature)

    box = page.locator(".tcx-prompt-input input")
    box.scroll_into_view_if_needed()
    box.fill(PROMPT)
    box.press("Enter")
    view = page.locator(f".tcx-prompt-tokens .tcx-prompt-view[data-layer='{layer}'][data-feature='{feature}']")
    view.wait_for(timeout=60_000)
    tokens = view.locator(".tcx-token[data-position]")
    assert tokens.count() == len(expected)
    acts = [float(tokens.nth(i).get_attribute("data-activation")) for i in range(tokens.count())]
    assert acts == pytest.approx(expected["activation"].tolist(), rel=1e-3, abs=1e-3)
    # highlighted = shaded: tokens where the feature fires have a non-transparent background
    firing = [i for i, a in enumerate(acts) if a > 0]
    assert firing, "the chosen feature does not fire on the prompt"
    for i in range(tokens.count()):
        style = tokens.nth(i).get_attribute("style")
        assert ("rgba(224,123,40,0.000)" not in style) == (i in firing)
    page.locator(".tcx-explorer").screenshot(path=str(SHOTS / "explorer_prompt.png"))


def test_standalone_export_works_without_python(served, tmp_path):
    page_src = served["work"] / "graph.html"
    assert page_src.exists()
    context = served["page"].context
    page = context.new_page()
    page.goto(page_src.as_uri())
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
    assert page.locator(".tcx-dashboard-title").inner_text() == "Click a node to see its dashboard"
    node = page.locator(".tcx-node[data-kind='feature']").first
    layer, feature = node.get_attribute("data-layer"), node.get_attribute("data-feature")
    node.click()
    page.locator(f".tcx-dashboard-panel[data-layer='{layer}'][data-feature='{feature}'] "
                 f".tcx-dashboard[data-feature='{feature}']").wait_for(timeout=5000)
    assert page.locator(".tcx-expand").is_disabled()
    page.screenshot(path=str(SHOTS / "graph_export.png"), full_page=True)
    page.close()
    # the same page without dashboards promises none
    bare = tmp_path / "bare.html"
    text = page_src.read_text()
    assert '"has_dashboards": true' in text
    bare.write_text(text.replace('"has_dashboards": true', '"has_dashboards": false'))
    page = context.new_page()
    page.goto(bare.as_uri())
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=20_000)
    assert page.locator(".tcx-dashboard-title").inner_text() == "Click a node to see its details"
    page.close()

