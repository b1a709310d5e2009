"""Shared fixtures. Every test runs offline against a Hugging Face cache that
the session builds (tiny GPT-2-architecture ``gpt2`` and transcoders in the exact
``pchlenski/gpt2-transcoders`` layout), through the real loading code."""
import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# One temporary folder for the session, removed at exit: what the tests, the
# notebooks they run (their indexes) and the kernels, servers and browsers they
# start put in temporary folders is not left behind in /tmp.
_TMP = tempfile.mkdtemp(prefix="tc_explore_tests_")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ["TMPDIR"] = tempfile.tempdir = _TMP
# Must happen before huggingface_hub / transformers are imported anywhere.
_HF_HOME = tempfile.mkdtemp(prefix="tc_explore_hf_")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]


def _import_repo_module(name: str, folder: str = "scripts"):
    folder_path = str(ROOT / folder)
    sys.path.insert(0, folder_path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder_path)


@pytest.fixture(scope="session")
def repo_module():
    """``repo_module("run_notebooks")``: module ``run_notebooks`` of this
    repository's scripts/ folder (or of ``folder``, e.g. "benchmarks"), plain
    folders rather than packages, imported by name."""
    return _import_repo_module


@pytest.fixture(scope="session")
def offline_hub():
    from tc_explore.testing import build_offline_hub
    return build_offline_hub(_HF_HOME)


@pytest.fixture(scope="session")
def tiny_model(offline_hub):
    from tc_explore import load_model
    return load_model("gpt2", device="cpu")


@pytest.fixture(scope="session")
def tiny_transcoders(offline_hub):
    from tc_explore import load_transcoders
    return load_transcoders("gpt2-small", device="cpu")


@pytest.fixture(scope="session")
def demo_model():
    from tc_explore import load_model
    return load_model("tiny-years", device="cpu")


@pytest.fixture(scope="session")
def demo_transcoders():
    from tc_explore import load_transcoders
    return load_transcoders("tiny-years", device="cpu")
