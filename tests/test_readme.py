"""Every Python block of README.md runs, so the README cannot drift from the code.

Blocks on the demo model run as written. Blocks on GPT-2 (preceded in the
README source by ``<!-- readme-test: fixture-hub ... -->``) run as written
against the offline fixture hub of ``tc_explore.testing`` (a tiny
GPT-2-architecture ``gpt2`` and ``gpt2-small`` transcoders in the published
formats, read through huggingface_hub with ``HF_HUB_OFFLINE=1``, and the
OpenWebText slice they ask for, of fixture sentences: ``build_gpt2_notebook_hub``).
Each block runs in a fresh Python process in an empty directory.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MARK = "<!-- readme-test: fixture-hub"


def readme_blocks() -> list[tuple[int, str, bool]]:
    """(line number, code, runs on the fixture hub) of each ```python block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[:m.start()].rstrip("\n").splitlines()
        fixture = bool(before) and before[-1].strip().startswith(FIXTURE_MARK)
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1), fixture))
    return blocks


BLOCKS = readme_blocks()


def test_readme_has_python_blocks_of_both_kinds():
    assert any(not f for _, _, f in BLOCKS) and any(f for _, _, f in BLOCKS)


@pytest.fixture(scope="module")
def readme_hub(tmp_path_factory):
    """A Hugging Face cache with the fixture gpt2 (context 128, as GPT-2 blocks use
    seq_len=128) and the OpenWebText slice."""
    from tc_explore.testing import build_gpt2_notebook_hub
    hf_home = tmp_path_factory.mktemp("readme_hf")
    build_gpt2_notebook_hub(hf_home)
    return hf_home


@pytest.mark.slow
@pytest.mark.parametrize("line, code, fixture", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, code, fixture, tmp_path, request):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CI="1",
               TOKENIZERS_PARALLELISM="false")
    script = code
    if fixture:
        env["HF_HOME"] = str(request.getfixturevalue("readme_hub"))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, f"README.md line {line} failed:\n{run.stderr[-4000:]}"


def test_benchmark_tables_are_generated_from_the_results_file(repo_module):
    benchmark_table = repo_module("benchmark_table")
    assert benchmark_table.main(["--check"]) == 0, \
        "README.md's benchmark tables differ from benchmarks/results.json: run scripts/benchmark_table.py"
