"""Distributed builds: ``torchrun -m tc_explore.index build`` with two CPU
processes (gloo) against the offline tiny GPT-2, compared file by file with a
single-process build."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tc_explore.cli import main
from tc_explore.index import FeatureIndex
from tc_explore.index.distributed import shard_directory
from tc_explore.testing import fixture_texts


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, offline_hub):
    d = tmp_path_factory.mktemp("dist_texts")
    paths = []
    for i in range(3):
        p = d / f"part{i}.txt"
        p.write_text("\n".join(fixture_texts(40, seed=10 + i)), encoding="utf-8")
        paths.append(str(p))
    return paths


def _args(text_files, out, *extra):
    return ["build", "--model", "gpt2", "--transcoders", "gpt2-small", "--device", "cpu",
            "--text-files", *text_files, "--tokens", "320", "--seq-len", "16", "--batch-size", "4",
            "--layers", "1,4,11", "--k", "3", "--n-samples", "4", "--window", "2,1",
            "--checkpoint-every", "1", "--out", str(out), "--no-progress", *extra]


def _torchrun(args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(n), "-m", "tc_explore.index", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _files(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_identical(a: Path, b: Path):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    ma, mb = json.loads(fa.pop("manifest.json")), json.loads(fb.pop("manifest.json"))
    assert ma.pop("built_at") and mb.pop("built_at")            # timestamps aside
    assert ma == mb
    for name in fa:
        assert fa[name] == fb[name], name


@pytest.fixture(scope="module")
def single(text_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_single") / "idx"
    assert main(["index", *_args(text_files, out)]) == 0
    return out


@pytest.mark.slow
def test_two_gloo_ranks_build_the_single_process_index_byte_for_byte(text_files, single, tmp_path):
    run = _torchrun(_args(text_files, tmp_path / "dist"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("index ready") == 1                 # rank 0 reports
    _assert_identical(single, tmp_path / "dist")
    assert not shard_directory(tmp_path / "dist", 0, 2).parent.exists()     # shards removed


@pytest.mark.slow
def test_stopped_ranks_resume_where_each_stopped(text_files, single, tmp_path):
    out = tmp_path / "dist"
    run = _torchrun(_args(text_files, out, "--max-batches", "1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "run the same command again" in run.stdout
    assert not (out / "manifest.json").exists()
    for rank in range(2):                      # each shard checkpointed after its first batch
        shard = shard_directory(out, rank, 2)
        m = json.loads((shard / "manifest.json").read_text())
        assert m["complete"] is False and m["batches_done_hint"] == 1
        assert (shard / "checkpoint.pt").is_file()
    run = _torchrun(_args(text_files, out))
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_identical(single, out)
    assert FeatureIndex(out).manifest["n_batches"] == 5


@pytest.mark.slow
def test_weight_views_split_across_two_ranks_equal_one_process(single, tmp_path, tiny_model, tiny_transcoders):
    import shutil

    import pandas as pd
    import pyarrow.parquet as pq

    from tc_explore.weight_views import WeightViews
    idx = Path(shutil.copytree(single, tmp_path / "idx"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          "2", "-m", "tc_explore.cli", "views", "build", str(idx), "--model", "gpt2",
                          "--transcoders", "gpt2-small", "--device", "cpu", "--k", "4", "--n-heads", "2",
                          "--chunk-size", "24", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("weight views ready") == 1
    one = WeightViews.build(tiny_model, tiny_transcoders, tmp_path / "one", k=4, n_heads=2, chunk_size=24)
    two = idx / "weight_views"
    assert not (idx / "weight_views.parts").exists()
    for layer in tiny_transcoders.layers:
        name = f"layer_{layer:02d}.parquet"
        pd.testing.assert_frame_equal(pq.read_table(two / name).to_pandas(),
                                      pq.read_table(one.directory / name).to_pandas())
