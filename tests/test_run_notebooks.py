"""scripts/run_notebooks.py: the kernels that run our notebooks talk over IPC
sockets, not TCP, both in the runner and under ``pytest --nbval-lax notebooks``
(make test), whose kernels notebooks/conftest.py configures; the HTML export
names no network resource for the browser to fetch."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("from ipykernel.kernelapp import IPKernelApp\n"
         "app = IPKernelApp.instance()\n"
         "assert app.transport == 'ipc', f'kernel transport {app.transport}'\n"
         "print(app.transport)")


def run_nbval(directory: Path) -> subprocess.CompletedProcess:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(PROBE)]
    nbformat.write(nb, directory / "probe.ipynb")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "-W", "error", str(directory / "probe.ipynb")],
                          cwd=directory, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_nbval_kernels_use_ipc(tmp_path):
    with_conftest = tmp_path / "notebooks"
    with_conftest.mkdir()
    shutil.copy(ROOT / "notebooks" / "conftest.py", with_conftest / "conftest.py")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "run_notebooks.py", tmp_path / "scripts" / "run_notebooks.py")
    run = run_nbval(with_conftest)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "1 passed" in out and "warning" not in out.lower(), out
    # The probe does fail on nbval's own (TCP) kernels: the conftest is what changes it.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert run_nbval(plain).returncode != 0


def test_runner_kernels_use_ipc(tmp_path, repo_module):
    ipc_kernel_manager = repo_module("run_notebooks").ipc_kernel_manager
    km = ipc_kernel_manager(tmp_path)(kernel_name="python3")
    assert km.transport == "ipc" and km.ip == str(tmp_path / "kernel-ipc")


# What a browser fetches by itself: script/img/iframe/link sources, CSS url(), module import().
FETCHED = re.compile(r"""(?:\bsrc|\bhref)\s*=\s*["']?(https?:)?//|url\(\s*["']?(?:https?:)?//|"""
                     r"""import\(\s*["'](?:https?:)?//""", re.I)


def test_export_names_no_network_resource(repo_module):
    """A notebook with markdown, a table, an image and widget-like HTML output
    exports to a page with no CDN script (require.js, MathJax, mermaid) or other
    fetched URL; a plain link in the text is allowed (the reader clicks it)."""
    export_html = repo_module("run_notebooks").export_html
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Title\nSome *text*."),
                nbformat.v4.new_code_cell("1", outputs=[nbformat.v4.new_output(
                    "execute_result", {"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "1"},
                    execution_count=1)])]
    page = export_html(nb)
    assert "<table>" in page and "Some <em>text</em>" in page
    assert not FETCHED.findall(page), [m.group(0) for m in FETCHED.finditer(page)]
    for cdn in ("require.min.js", "mathjax", "mermaid.esm"):
        assert cdn not in page.lower()
