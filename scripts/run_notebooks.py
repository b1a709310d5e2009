"""Execute the notebooks end to end on the demo model, offline, and keep the results.

    python scripts/run_notebooks.py                 # all three
    python scripts/run_notebooks.py walkthrough     # one (name with or without .ipynb)
    python scripts/run_notebooks.py --out DIR --timeout 600

For each notebook in ``notebooks/`` this writes ``<out>/<name>.ipynb`` (executed,
with outputs) and ``<out>/<name>.html`` (nbconvert's HTML export, with the
widget state embedded so the graph and explorer render in a browser), default
``artifacts/notebooks/``. The kernel runs with ``TC_EXPLORE_DEMO=1``,
``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``, in ``<out>`` as working
directory (files a notebook saves land there, e.g. ``greater_than_graph.html``).
Exit status 1 if any notebook fails; the failing cell's error is printed and the
partially executed notebook is still written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("walkthrough", "feature_dashboards", "greater_than")


def demo_environment() -> dict[str, str]:
    """Environment variables set for the kernel (and restored afterwards)."""
    return {"TC_EXPLORE_DEMO": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def execute_notebook(path: Path, out_dir: Path, timeout: int = 600,
                     kernel_name: str = "python3") -> tuple[Path, Path, float]:
    """Run one notebook; write the executed copy and its HTML into ``out_dir``.
    Returns (ipynb path, html path, seconds). Raises on a failing cell, after
    writing what ran."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No notebook at {path}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in demo_environment()}
    os.environ.update(demo_environment())
    os.environ["TC_EXPLORE_OUT"] = str(out_dir.resolve())
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(out_dir)}},
                            store_widget_state=True)
    t0 = time.time()
    error = None
    try:
        client.execute()
    except Exception as err:  # keep the partial notebook, then re-raise
        error = err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("TC_EXPLORE_OUT", None)
    seconds = time.time() - t0
    out_nb = out_dir / path.name
    nbformat.write(nb, out_nb)
    body, _ = HTMLExporter().from_notebook_node(nb)
    out_html = out_nb.with_suffix(".html")
    out_html.write_text(body, encoding="utf-8")
    if error is not None:
        raise error
    return out_nb, out_html, seconds


def run_all(names=NOTEBOOKS, out_dir: Path | str = ROOT / "artifacts" / "notebooks",
            timeout: int = 600) -> dict[str, float]:
    """Run the named notebooks; returns {name: seconds}. Raises RuntimeError
    listing the notebooks that failed."""
    failed, times = [], {}
    for name in names:
        stem = name[:-6] if name.endswith(".ipynb") else name
        src = ROOT / "notebooks" / f"{stem}.ipynb"
        try:
            nb, page, secs = execute_notebook(src, Path(out_dir), timeout=timeout)
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
    parser.add_argument("names", nargs="*", default=list(NOTEBOOKS),
                        help=f"notebooks to run (default: {' '.join(NOTEBOOKS)})")
    parser.add_argument("--out", default=str(ROOT / "artifacts" / "notebooks"),
                        help="directory for the executed notebooks and HTML")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    try:
        run_all(args.names, args.out, args.timeout)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
