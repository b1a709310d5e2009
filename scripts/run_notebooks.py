"""Execute the notebooks end to end and keep the results.

    python scripts/run_notebooks.py                 # all four, on the demo models, offline
    python scripts/run_notebooks.py walkthrough     # one (name with or without .ipynb)
    python scripts/run_notebooks.py --gpt2          # the three GPT-2 ones on GPT-2 small + gpt2-small
    python scripts/run_notebooks.py --out DIR --timeout 600

For each notebook in ``notebooks/`` this writes ``<out>/<name>.ipynb`` (executed,
with outputs and the widget state) and ``<out>/<name>.html`` (nbconvert's HTML
export), default ``artifacts/notebooks/`` (``artifacts/notebooks-gpt2/`` with
``--gpt2``). The HTML shows every output in a form that needs no kernel and no
network: plotly figures and tc_explore's widgets carry self-contained HTML
(``tc_explore.ui.figures``, the graph widget's and explorer's ``text/html``),
which the export prefers to the live widget. Progress bars are switched off
(``QUIET``): in a saved notebook a bar's widget stays at its first state.

On the demo model the kernel runs with ``TC_EXPLORE_DEMO=1``,
``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``. With ``--gpt2`` it runs
with ``TC_EXPLORE_DEMO=0`` and the Hugging Face cache as it is: the first run
downloads GPT-2, the 12 transcoders and the OpenWebText slice (see the README),
later runs read them from the cache. The kernel's working directory is
``<out>`` (files a notebook saves land there, e.g. ``greater_than_graph.html``),
and it talks to this process over local IPC sockets. Exit status 1 if any
notebook fails; the failing cell's error is printed and the partially executed
notebook is still written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("walkthrough", "feature_dashboards", "greater_than", "another_model")
# The notebooks whose full run is GPT-2 small (another_model's is Gemma-2-2B).
GPT2_NOTEBOOKS = ("walkthrough", "feature_dashboards", "greater_than")


# No progress bars (ours, transformers', huggingface_hub's, datasets'): nobody
# watches a kernel this script runs, and in the saved notebook and its HTML a
# bar's widget is frozen at its first state ("0%| | 0/6").
QUIET = {"TC_EXPLORE_PROGRESS": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def demo_environment() -> dict[str, str]:
    """Environment variables set for the kernel (and restored afterwards)."""
    return {"TC_EXPLORE_DEMO": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1", **QUIET}


def gpt2_environment() -> dict[str, str]:
    """Environment variables set for the kernel with ``--gpt2``: the Hugging Face
    cache and network settings are left as the caller has them."""
    return {"TC_EXPLORE_DEMO": "0", "TOKENIZERS_PARALLELISM": "false",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1", **QUIET}


# The export shows self-contained HTML before a live widget: offline, a widget
# view is an empty box (its JavaScript would come from a CDN).
EXPORT_PRIORITY = ["text/html", "application/javascript", "text/markdown", "image/svg+xml",
                   "text/latex", "image/png", "image/jpeg", "text/plain",
                   "application/vnd.jupyter.widget-view+json"]

# nbconvert's lab template, less the three scripts it takes from cdnjs: require.js
# (which only classic widget/ipython outputs use; ours carry their own JS),
# MathJax (our notebooks' text has no TeX) and mermaid (no diagrams). Offline
# each is a failed request; online, a page that phones a CDN on every open.
OFFLINE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_html(nb) -> str:
    """nbconvert's HTML (lab template) of an executed notebook, viewable offline:
    the page fetches nothing from the network (:data:`OFFLINE_TEMPLATE`)."""
    import copy

    import jinja2
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    nb = copy.deepcopy(nb)
    # No live widgets in the page, so no widget manager fetched from a CDN.
    nb.metadata.pop("widgets", None)
    exporter = HTMLExporter(config=Config({"NbConvertBase": {"display_data_priority": EXPORT_PRIORITY}}),
                            extra_loaders=[jinja2.DictLoader({"tcx_offline.html.j2": OFFLINE_TEMPLATE})],
                            template_file="tcx_offline.html.j2")
    body, _ = exporter.from_notebook_node(nb)
    return body


def _ipc_kernel_config(work: Path):
    """Kernels that talk over local IPC sockets in ``work``, not TCP: no open
    ports, and no warning about unencrypted TCP."""
    from traitlets.config import Config
    return Config({"KernelManager": {"transport": "ipc", "ip": str(work / "kernel-ipc")}})


def ipc_kernel_manager(work: Path):
    """A jupyter_client ``KernelManager`` class whose kernels use IPC sockets in
    ``work`` (as :func:`execute_notebook`'s do): what ``notebooks/conftest.py``
    gives nbval, which builds its kernel managers without any configuration."""
    from jupyter_client.manager import KernelManager

    class IPCKernelManager(KernelManager):
        def __init__(self, **kwargs):
            kwargs.setdefault("config", _ipc_kernel_config(Path(work)))
            super().__init__(**kwargs)

    return IPCKernelManager


def execute_notebook(path: Path, out_dir: Path, timeout: int = 600,
                     kernel_name: str = "python3", gpt2: bool = False) -> tuple[Path, Path, float]:
    """Run one notebook; write the executed copy and its HTML into ``out_dir``.
    Returns (ipynb path, html path, seconds). Raises on a failing cell, after
    writing what ran."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No notebook at {path}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    environment = gpt2_environment() if gpt2 else demo_environment()
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    os.environ["TC_EXPLORE_OUT"] = str(out_dir.resolve())
    ipc_dir = Path(tempfile.mkdtemp(prefix="tcx_kernel_"))
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            config=_ipc_kernel_config(ipc_dir),
                            resources={"metadata": {"path": str(out_dir)}},
                            store_widget_state=True)
    t0 = time.time()
    error = None
    try:
        client.execute()
    except Exception as err:  # keep the partial notebook, then re-raise
        error = err
    finally:
        shutil.rmtree(ipc_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("TC_EXPLORE_OUT", None)
    seconds = time.time() - t0
    out_nb = out_dir / path.name
    nbformat.write(nb, out_nb)
    out_html = out_nb.with_suffix(".html")
    out_html.write_text(export_html(nb), encoding="utf-8")
    if error is not None:
        raise error
    return out_nb, out_html, seconds


def run_all(names=NOTEBOOKS, out_dir: Path | str = ROOT / "artifacts" / "notebooks",
            timeout: int = 600, gpt2: bool = False) -> dict[str, float]:
    """Run the named notebooks; returns {name: seconds}. Raises RuntimeError
    listing the notebooks that failed."""
    failed, times = [], {}
    for name in names:
        stem = name[:-6] if name.endswith(".ipynb") else name
        src = ROOT / "notebooks" / f"{stem}.ipynb"
        try:
            nb, page, secs = execute_notebook(src, Path(out_dir), timeout=timeout, gpt2=gpt2)
            times[stem] = secs
            print(f"{stem}: ran in {secs:.1f} s -> {nb}, {page}", flush=True)
        except Exception as err:
            failed.append(stem)
            print(f"{stem}: FAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    if failed:
        raise RuntimeError(f"notebooks failed: {', '.join(failed)}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=None,
                        help=f"notebooks to run (default: {' '.join(NOTEBOOKS)}; with --gpt2: "
                             f"{' '.join(GPT2_NOTEBOOKS)})")
    parser.add_argument("--gpt2", action="store_true",
                        help="run on GPT-2 small with the gpt2-small transcoders (needs the Hub once)")
    parser.add_argument("--out", default=None,
                        help="directory for the executed notebooks and HTML (default "
                             "artifacts/notebooks, or artifacts/notebooks-gpt2 with --gpt2)")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds allowed per cell (default 600; 3600 with --gpt2)")
    args = parser.parse_args(argv)
    out = args.out or str(ROOT / "artifacts" / ("notebooks-gpt2" if args.gpt2 else "notebooks"))
    timeout = args.timeout or (3600 if args.gpt2 else 600)
    try:
        run_all(args.names or (GPT2_NOTEBOOKS if args.gpt2 else NOTEBOOKS), out, timeout, gpt2=args.gpt2)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
