"""``make gpt2`` end to end, offline: scripts/run_notebooks.py --gpt2 (what the
target runs) executes the walkthrough with HF_HOME pointing at the fixture that
tc_explore.testing.build_gpt2_notebook_hub writes in GPT-2's exact formats (the
model served as ``gpt2``, ``pchlenski/gpt2-transcoders`` files, the OpenWebText
slice under its dataset id). Nothing is mocked: the notebook's GPT-2 branch
loads them through huggingface_hub, transformers and datasets."""
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts += [str(v) for k, v in out.data.items() if k in ("text/plain", "text/html")]
    return "\n".join(parts)


@pytest.mark.slow
def test_make_gpt2_walkthrough_runs_on_the_fixture_hub(tmp_path):
    from tc_explore.testing import OPENWEBTEXT_SLICE, build_gpt2_notebook_hub

    hub = build_gpt2_notebook_hub(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k != "TC_EXPLORE_DEMO"}
    # One thread per process: the kernel shares the CI machine with this test run.
    env.update(HF_HOME=str(hub.hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CI="1",
               OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--gpt2",
                          "--out", str(out), "walkthrough"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    nb = nbformat.read(out / "walkthrough.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    everything = "\n".join(_text(c) for c in code)
    # The GPT-2 branch: GPT-2's Hub id and transcoder set, 12 layers of the fixture's width ...
    assert f"model 'gpt2': {hub.n_layers} layers, d_model {hub.d_model}" in _text(code[0])
    assert "TranscoderSet('gpt2-small'" in _text(code[0])
    # ... the OpenWebText slice (256 sequences of 128 tokens), not the demo's corpus ...
    corpus_cell = next(c for c in code if "corpus_tokens = " in c.source)
    assert OPENWEBTEXT_SLICE[0] in corpus_cell.source and "(256, 128)" in _text(corpus_cell)
    # ... and nothing of the demo model anywhere.
    assert "tiny-years" not in everything
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # The dashboard, the metrics table and the graph are in the exported page.
    page = (out / "walkthrough.html").read_text(encoding="utf-8")
    assert "tcx-dashboard" in page and "ce_recovered" in page and "tcx-embed" in page
