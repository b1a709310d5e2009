"""The tc-explore command line, on the offline tiny GPT-2 and its transcoders."""
import configparser
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tc_explore.cli import main, parse_count
from tc_explore.corpus import Corpus
from tc_explore.index import FeatureIndex
from tc_explore.testing import fixture_texts, install_in_hf_cache

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    paths = []
    for i in range(4):
        p = d / f"part{i}.txt"
        p.write_text("\n".join(fixture_texts(30, seed=i)), encoding="utf-8")
        paths.append(str(p))
    return paths


def _build_args(text_files, out, *extra):
    return ["index", "build", "--model", "gpt2", "--transcoders", "gpt2-small", "--device", "cpu",
            "--text-files", *text_files, "--tokens", "320", "--seq-len", str(SEQ_LEN),
            "--batch-size", "4", "--layers", "0,5-6", "--k", "3", "--n-samples", "4",
            "--window", "2,1", "--out", str(out), "--no-progress", *extra]


def _library_build(model, transcoders, text_files, out, **kw):
    corpus = Corpus.from_files(text_files, model, SEQ_LEN, seed=0)
    return FeatureIndex.build(model, transcoders, corpus, 320, out, layers=[0, 5, 6], k=3, n_samples=4,
                              batch_size=4, window=(2, 1), **kw)


def _same_index(a: FeatureIndex, b: FeatureIndex):
    assert {k: v for k, v in a.manifest.to_json().items() if k != "built_at"} == \
        {k: v for k, v in b.manifest.to_json().items() if k != "built_at"}
    for layer in a.layers:
        for name in ("stats", "top", "samples"):
            pd.testing.assert_frame_equal(a.table(layer, name).drop(columns="window", errors="ignore"),
                                          b.table(layer, name).drop(columns="window", errors="ignore"))
    assert np.array_equal(a.tokens(), b.tokens())


def test_build_equals_the_library_build(text_files, tmp_path, tiny_model, tiny_transcoders, capsys):
    assert main(_build_args(text_files, tmp_path / "cli")) == 0
    assert "index ready" in capsys.readouterr().out
    _same_index(FeatureIndex(tmp_path / "cli"),
                _library_build(tiny_model, tiny_transcoders, text_files, tmp_path / "lib"))


def test_build_resumes_an_interrupted_build(text_files, tmp_path, tiny_model, tiny_transcoders, capsys):
    out = tmp_path / "idx"
    assert _library_build(tiny_model, tiny_transcoders, text_files, out, max_batches=2,
                          checkpoint_every=25) is None
    assert main(["index", "info", str(out)]) == 0
    assert "unfinished: 2 of 5 batches" in capsys.readouterr().out
    assert main(_build_args(text_files, out)) == 0
    _same_index(FeatureIndex(out), _library_build(tiny_model, tiny_transcoders, text_files, tmp_path / "x"))


def test_shards_then_merge(text_files, tmp_path, tiny_model, tiny_transcoders, capsys):
    for i in range(2):
        assert main(_build_args(text_files, tmp_path / f"s{i}", "--shard", f"{i}/2")) == 0
    assert main(["index", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    merged = FeatureIndex(tmp_path / "m")
    single = _library_build(tiny_model, tiny_transcoders, text_files, tmp_path / "x")
    for layer in single.layers:
        pd.testing.assert_frame_equal(merged.table(layer, "top").drop(columns="window"),
                                      single.table(layer, "top").drop(columns="window"))
    assert main(["index", "info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "320 (20 sequences x 16" in out and "gpt2-small" in out


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1X"], "'1X' is not a count"),
    (["--tokens", "100"], "not a whole number of 16-token sequences"),
    (["--layers", "a,b"], "is not a list of layers"),
    (["--shard", "2/2"], "is not a shard"),
    (["--window", "3"], "is not a window"),
    (["--batch-size", "0"], "must be at least 1"),
    (["--dtype", "float8"], "use float32, float16 or bfloat16"),
    (["--layers", "0,40"], "Layer(s) [40] are not in transcoder set"),
])
def test_bad_arguments_get_clear_errors(text_files, tmp_path, capsys, args, message):
    code = None
    try:
        code = main(_build_args(text_files, tmp_path / "bad") + args)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cuda_on_a_machine_without_it_is_refused(text_files, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        main(_build_args(text_files, tmp_path / "c") + ["--device", "cuda"])
    assert "this machine has no CUDA device" in capsys.readouterr().err


def test_info_of_something_that_is_no_index(tmp_path, capsys):
    assert main(["index", "info", str(tmp_path)]) == 2
    assert "is not a feature index" in capsys.readouterr().err


def test_views_build(text_files, tmp_path, tiny_model, tiny_transcoders, capsys):
    _library_build(tiny_model, tiny_transcoders, text_files, tmp_path / "idx")
    assert main(["views", "build", str(tmp_path / "idx"), "--model", "gpt2", "--transcoders", "gpt2-small",
                 "--device", "cpu", "--k", "3", "--n-heads", "1", "--no-progress"]) == 0
    assert "weight views ready" in capsys.readouterr().out
    assert (tmp_path / "idx" / "weight_views" / "manifest.json").is_file()


def test_pull_from_the_offline_cache(text_files, tmp_path, offline_hub, tiny_model, tiny_transcoders, capsys):
    index = _library_build(tiny_model, tiny_transcoders, text_files, tmp_path / "idx")
    files = {p.relative_to(index.directory).as_posix(): p for p in index.directory.rglob("*") if p.is_file()}
    install_in_hf_cache(offline_hub.hf_home, "erin/cli-index", files, repo_type="dataset")
    assert main(["index", "pull", "erin/cli-index"]) == 0
    path = capsys.readouterr().out.strip()
    assert "datasets--erin--cli-index" in path and FeatureIndex(path).manifest == index.manifest
    assert main(["index", "pull", "erin/not-there"]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_console_script_is_declared_and_runs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "tc-explore = tc_explore.cli:main" in scripts
    run = subprocess.run([sys.executable, "-m", "tc_explore.cli", "index", "build", "--help"],
                         capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert run.returncode == 0 and "--tokens" in run.stdout and "torchrun" in run.stdout


def test_parse_count():
    assert [parse_count(t) for t in ("65536", "8k", "100M", "1.5M", "64Ki", "1Mi", "2G", "10_000")] == \
        [65536, 8000, 10 ** 8, 1_500_000, 65536, 2 ** 20, 2 * 10 ** 9, 10_000]
