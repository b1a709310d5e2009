import json
import os
import re
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from tc_explore.corpus import Corpus
from tc_explore.errors import InvalidInputError
from tc_explore.index import FeatureIndex, IndexIncompleteError, _feature_hash, _token_hash, histogram_edges
from tc_explore.testing import fixture_texts

LAYERS = [0, 5, 11]
SETTINGS = dict(layers=LAYERS, k=4, n_samples=5, batch_size=4, checkpoint_every=2,
                window=(3, 2), features_per_group=16)
SEQ_LEN = 16
N_SEQ = 22           # 6 batches, the last one short


def _corpus(model):
    return Corpus.from_texts(fixture_texts(120), model, SEQ_LEN, seed=7)


def _build(model, transcoders, out_dir, **kw):
    return FeatureIndex.build(model, transcoders, _corpus(model), N_SEQ * SEQ_LEN, out_dir,
                              **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def full_index(tiny_model, tiny_transcoders, tmp_path_factory):
    return _build(tiny_model, tiny_transcoders, tmp_path_factory.mktemp("idx") / "full")


@pytest.fixture(scope="module")
def brute(tiny_model, tiny_transcoders, full_index):
    """Activations [n_seq, seq_len, d_sae] per layer, computed batch by batch
    exactly as a user would, over the tokens the index stored."""
    tokens = torch.from_numpy(full_index.tokens().astype(np.int64))
    out = {layer: [] for layer in LAYERS}
    hooks = [tiny_transcoders.input_hook(layer) for layer in LAYERS]
    with torch.inference_mode():
        for start in range(0, len(tokens), SETTINGS["batch_size"]):
            _, cache = tiny_model.run_with_cache(tokens[start:start + SETTINGS["batch_size"]],
                                                 names_filter=hooks)
            for layer, hook in zip(LAYERS, hooks):
                out[layer].append(tiny_transcoders[layer].encode(cache[hook]))
    return tokens, {layer: torch.cat(v).numpy() for layer, v in out.items()}


def _entries(acts, feature):
    """(activation, global token) of every firing token at positions >= 1."""
    a = acts[:, 1:, feature]
    seq, pos = np.nonzero(a > 0)
    return a[seq, pos], seq * SEQ_LEN + pos + 1


def test_tokens_are_the_corpus_sequences(full_index, tiny_model):
    assert np.array_equal(full_index.tokens(), _corpus(tiny_model).take(N_SEQ).numpy())
    assert np.array_equal(full_index.sequence_tokens(13), full_index.tokens()[13])
    m = full_index.manifest
    assert m["n_tokens"] == N_SEQ * SEQ_LEN and m["n_tokens_counted"] == N_SEQ * (SEQ_LEN - 1)
    assert m["model"] and m["transcoder_set"] == "gpt2-small" and m["revision"]
    assert m["corpus"]["kind"] == "texts" and m["corpus"]["seq_len"] == SEQ_LEN


def test_top_k_equals_brute_force(full_index, brute):
    _, acts = brute
    k = SETTINGS["k"]
    for layer in LAYERS:
        for f in range(acts[layer].shape[-1]):
            vals, toks = _entries(acts[layer], f)
            order = np.lexsort((toks, -vals))[:k]
            got = full_index.top_examples(layer, f)
            assert [(e.sequence, e.position) for e in got] == \
                [(t // SEQ_LEN, t % SEQ_LEN) for t in toks[order]], (layer, f)
            np.testing.assert_array_equal([e.activation for e in got], vals[order])


def test_statistics_equal_brute_force(full_index, brute):
    _, acts = brute
    edges = full_index.edges
    for layer in LAYERS:
        for f in range(0, acts[layer].shape[-1], 3):
            vals, _ = _entries(acts[layer], f)
            s = full_index.feature_stats(layer, f)
            assert s["n_firing"] == len(vals)
            assert s["frequency"] == pytest.approx(len(vals) / (N_SEQ * (SEQ_LEN - 1)))
            assert s["max"] == (vals.max() if len(vals) else 0.0)
            assert s["mean"] == pytest.approx(vals.mean() if len(vals) else 0.0, rel=1e-6)
            hist = np.bincount(np.searchsorted(edges.astype(np.float32), vals, side="right"),
                               minlength=len(edges) + 1)
            np.testing.assert_array_equal(s["histogram"], hist)


def test_samples_are_the_hash_selected_uniform_sample(full_index, brute):
    _, acts = brute
    n = SETTINGS["n_samples"]
    for layer in LAYERS:
        b = _feature_hash(layer, acts[layer].shape[-1], seed=0)
        for f in range(acts[layer].shape[-1]):
            vals, toks = _entries(acts[layer], f)
            priority = (1.0 - np.remainder(_token_hash(toks, seed=0) + b[f], 1.0)).astype(np.float32)
            chosen = set(toks[np.lexsort((toks, -priority))[:n]].tolist())
            got = full_index.samples(layer, f)
            assert {e.sequence * SEQ_LEN + e.position for e in got} == chosen
            lookup = dict(zip(toks.tolist(), vals.tolist()))
            assert all(lookup[e.sequence * SEQ_LEN + e.position] == e.activation for e in got)


def test_windows_hold_the_context_activations(full_index, brute):
    _, acts = brute
    for layer in LAYERS:
        for f in (0, 17, 40):
            for e in full_index.top_examples(layer, f) + full_index.samples(layer, f):
                for j, a in enumerate(e.window_acts):
                    p = e.window_start + j
                    want = acts[layer][e.sequence, p, f] if 0 <= p < SEQ_LEN else 0.0
                    assert float(a) == pytest.approx(want, rel=2e-3, abs=2e-3)


def test_interval_bands_split_samples_by_quantile(full_index):
    bands = full_index.interval_samples(5, 3, n_bands=2)
    assert [(lo, hi) for lo, hi, _ in bands] == [(0.5, 1.0), (0.0, 0.5)]
    high, low = bands[0][2], bands[1][2]
    if high and low:
        assert min(e.activation for e in high) >= max(e.activation for e in low)


def _tables(index):
    out = {"tokens": pd.read_parquet(index.directory / "tokens.parquet")}
    for layer in index.layers:
        for name in ("stats", "top", "samples"):
            out[(layer, name)] = index.table(layer, name)
    return out


def _assert_same(a, b, exact_sums=True):
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        x, y = ta[key], tb[key]
        if not exact_sums and key != "tokens" and key[1] == "stats":
            np.testing.assert_allclose(x.pop("act_sum"), y.pop("act_sum"), rtol=1e-10)
        x = x.map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
        y = y.map(lambda v: v.tolist() if isinstance(v, np.ndarray) else v)
        pd.testing.assert_frame_equal(x, y, check_exact=True)


def test_resume_after_max_batches_equals_uninterrupted(tiny_model, tiny_transcoders, tmp_path, full_index):
    out = tmp_path / "resumed"
    assert _build(tiny_model, tiny_transcoders, out, max_batches=3) is None
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert (out / "checkpoint.pt").is_file()
    with pytest.raises(IndexIncompleteError, match="resume"):
        FeatureIndex.load(out)
    index = _build(tiny_model, tiny_transcoders, out)
    assert not (out / "checkpoint.pt").exists()
    _assert_same(index, full_index)


@pytest.mark.parametrize("seconds, saved", [(0.0, [1, 2, 3, 4, 5]), (3600.0, [])])
def test_by_default_a_build_checkpoints_by_time(tiny_model, tiny_transcoders, tmp_path, monkeypatch,
                                                seconds, saved):
    from tc_explore.index import build as build_module
    calls = []
    real = build_module._save_checkpoint
    monkeypatch.setattr(build_module, "CHECKPOINT_SECONDS", seconds)
    monkeypatch.setattr(build_module, "_save_checkpoint",
                        lambda out, done, *a: (calls.append(done), real(out, done, *a)))
    _build(tiny_model, tiny_transcoders, tmp_path / "timed", checkpoint_every=None)
    assert calls == saved                               # never after the last batch (6)


def test_resume_after_crash_skips_finished_batches(tiny_model, tiny_transcoders, tmp_path,
                                                   full_index, monkeypatch):
    out = tmp_path / "crashed"
    tc = tiny_transcoders[5]
    real_encode = tc.encode
    calls = {"n": 0}

    def crashing(x, crash_at=None, out=None):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt
        return real_encode(x, out=out)

    monkeypatch.setattr(tc, "encode", lambda x, out=None: crashing(x, crash_at=5, out=out))  # inside batch 5
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_model, tiny_transcoders, out)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["batches_done"] == 4          # the last checkpoint before the crash
    calls["n"] = 0
    monkeypatch.setattr(tc, "encode", lambda x, out=None: crashing(x, out=out))
    index = _build(tiny_model, tiny_transcoders, out)
    assert calls["n"] == 2                     # only batches 5 and 6 were recomputed
    _assert_same(index, full_index)


def test_merged_shards_equal_a_single_build(tiny_model, tiny_transcoders, tmp_path, full_index):
    shards = [_build(tiny_model, tiny_transcoders, tmp_path / f"shard{i}", shard=(i, 3))
              for i in (2, 0, 1)]
    assert shards[1].manifest["sequence_start"] == 0
    with pytest.raises(InvalidInputError, match="contiguous"):
        FeatureIndex.merge([shards[0].directory, shards[1].directory], tmp_path / "gap")
    merged = FeatureIndex.merge([s.directory for s in shards], tmp_path / "merged")
    assert merged.manifest["shard"] is None and merged.n_tokens == full_index.n_tokens
    _assert_same(merged, full_index, exact_sums=False)


def test_clear_errors(tiny_model, tiny_transcoders, full_index, tmp_path):
    with pytest.raises(InvalidInputError, match="not in this index"):
        full_index.top_examples(3, 0)
    with pytest.raises(InvalidInputError, match="out of range"):
        full_index.top_examples(0, 64)
    with pytest.raises(InvalidInputError, match="out of range"):
        full_index.feature_stats(0, -1)
    with pytest.raises(InvalidInputError, match="different settings"):
        _build(tiny_model, tiny_transcoders, full_index.directory, k=7)
    with pytest.raises(InvalidInputError, match="no transcoder"):
        _build(tiny_model, tiny_transcoders, tmp_path / "x", layers=[12])
    with pytest.raises(InvalidInputError, match="less than one sequence"):
        FeatureIndex.build(tiny_model, tiny_transcoders, _corpus(tiny_model), 3, tmp_path / "y")
    with pytest.raises(InvalidInputError, match="not a feature index"):
        FeatureIndex.load(tmp_path)


def test_a_finished_index_is_reopened_not_rebuilt(tiny_model, tiny_transcoders, full_index):
    before = (full_index.directory / "layer_00" / "top.parquet").stat().st_mtime_ns
    again = _build(tiny_model, tiny_transcoders, full_index.directory)
    assert again.manifest == full_index.manifest
    assert (full_index.directory / "layer_00" / "top.parquet").stat().st_mtime_ns == before


def test_features_by_token(full_index, brute):
    tokens, _ = brute
    top = full_index.table(0, "top")
    tok = int(tokens[top["sequence"][0], top["position"][0]])
    found = full_index.features_by_token(0, tok)
    assert int(top["feature"][0]) in found["feature"].tolist()
    assert (found["count"].diff().dropna() <= 0).all()


def test_ties_are_broken_by_token_order_across_shards(tiny_model, tiny_transcoders, tmp_path):
    # Repeated sequences give exactly tied activations; the index keeps the earliest.
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(1, 300, (3, SEQ_LEN), generator=g)
    rows[:, 0] = 0
    tokens = rows[torch.tensor([0, 1, 0, 2, 1, 0, 2, 0])]
    kw = dict(layers=[0], k=3, n_samples=3, batch_size=2, features_per_group=64)
    single = FeatureIndex.build(tiny_model, tiny_transcoders, tokens, tokens.numel(), tmp_path / "s", **kw)
    parts = [FeatureIndex.build(tiny_model, tiny_transcoders, tokens, tokens.numel(), tmp_path / f"p{i}",
                                shard=(i, 2), **kw) for i in range(2)]
    merged = FeatureIndex.merge([p.directory for p in parts], tmp_path / "m")
    with torch.inference_mode():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[tiny_transcoders.input_hook(0)])
        acts = tiny_transcoders[0].encode(cache[tiny_transcoders.input_hook(0)]).numpy()
    n_tied = 0
    for f in range(acts.shape[-1]):
        vals, toks = _entries(acts, f)
        order = np.lexsort((toks, -vals))[:3]
        n_tied += len(set(vals[order].tolist())) < len(order)
        want = [(t // SEQ_LEN, t % SEQ_LEN) for t in toks[order]]
        assert [(e.sequence, e.position) for e in single.top_examples(0, f)] == want
        assert [(e.sequence, e.position) for e in merged.top_examples(0, f)] == want
    assert n_tied > 10


# -- the accumulator on synthetic batches (exact, order-independent) ----------------------
def _synthetic_batches(n_batches=5, n_seq=3, seq_len=12, d_sae=10, seed=0):
    """Activations with ties (few distinct values), a feature firing nearly
    everywhere (many evictions per batch), one firing only at position 0, one
    never, and non-firing negative and -0.0 values (which windows show)."""
    rng = np.random.default_rng(seed)
    density = np.array([0.9, 0.5, 0.3, 0.3, 0.2, 0.1, 0.1, 0.05, 0.0, 0.0])[:d_sae]
    out = []
    for _ in range(n_batches):
        fire = rng.random((n_seq, seq_len, d_sae)) < density
        fire[:, 0, 8 % d_sae] = True
        a = np.where(fire, rng.choice([0.5, 1.0, 1.5, 2.0], fire.shape), 0.0).astype(np.float32)
        a[~fire & (rng.random(fire.shape) < 0.05)] = -0.75
        a[~fire & (rng.random(fire.shape) < 0.05)] = -0.0
        out.append(torch.from_numpy(a))
    return out


def _fold(batches, order, k=3, n_samples=4, window=(2, 3), layer=1, seed=0, resume_after=None,
          device="cpu"):
    """The accumulator's state (on the CPU) after folding in ``batches[b]`` for b in order."""
    from tc_explore.index import _LayerAccumulator, histogram_edges
    n_seq, seq_len, d_sae = batches[0].shape
    new = lambda: _LayerAccumulator(layer, d_sae, k, n_samples, histogram_edges(), window, seed, device)
    acc = new()
    for step, b in enumerate(order):
        first = b * n_seq * seq_len
        key = torch.from_numpy(_token_hash(first + np.arange(n_seq * seq_len), seed).reshape(n_seq, seq_len))
        acc.update(batches[b].to(device), key.to(device), first)
        if step == resume_after:
            acc2 = new()
            acc2.load(acc.state())
            acc = acc2
    cpu = lambda x: {k: cpu(v) for k, v in x.items()} if isinstance(x, dict) else x.cpu()
    return cpu(acc.state())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="no CUDA device"))]


@pytest.fixture(params=["cpu", "cpu-cuda-paths", *DEVICES[1:]])
def acc_device(request, monkeypatch):
    """The accumulator's device; "cpu-cuda-paths": the CPU without its numpy
    shortcuts, running the code CUDA runs (tested here when no GPU is)."""
    if request.param == "cpu-cuda-paths":
        from tc_explore.index import accumulator
        monkeypatch.setattr(accumulator, "CPU_SHORTCUTS", False)
        return "cpu"
    return request.param


def test_accumulator_equals_brute_force_on_synthetic_batches(acc_device):
    device = acc_device
    batches = _synthetic_batches()
    k, n_samples, (before, after), layer = 3, 4, (2, 3), 1
    state = _fold(batches, range(len(batches)), device=device)
    acts = torch.cat(batches).numpy()                               # [n_seq, seq_len, d_sae]
    n_seq, seq_len, d_sae = acts.shape
    fh = _feature_hash(layer, d_sae, seed=0)
    for f in range(d_sae):
        s, p = np.nonzero(acts[:, 1:, f] > 0)
        p = p + 1
        vals, toks = acts[s, p, f], s * seq_len + p
        assert int(state["n_firing"][f]) == len(vals)
        assert float(state["act_sum"][f]) == pytest.approx(float(vals.astype(np.float64).sum()))
        prio = (1.0 - np.remainder(_token_hash(toks, seed=0) + fh[f], 1.0)).astype(np.float32)
        for kind, score, n in (("top", vals, k), ("samples", prio, n_samples)):
            best = np.lexsort((toks, -score))[:n]
            got = state[kind]
            assert got["token"][f, :len(best)].tolist() == toks[best].tolist(), (kind, f)
            assert (got["token"][f, len(best):] == -1).all()
            np.testing.assert_array_equal(got["score"][f, :len(best)].numpy(), score[best])
            np.testing.assert_array_equal(got["act"][f, :len(best)].numpy(), vals[best])
            for slot, e in enumerate(best):
                want = [acts[s[e], q, f] if 0 <= q < seq_len else 0.0
                        for q in range(p[e] - before, p[e] + after + 1)]
                np.testing.assert_array_equal(got["window"][f, slot].numpy(),
                                              np.array(want, dtype=np.float16), err_msg=f"{kind} {f}")
    assert int(state["n_firing"][8 % d_sae]) == 0 and (state["top"]["token"][9] == -1).all()
    # The windows do show non-firing negative activations.
    assert (state["top"]["window"] < 0).any()


def _assert_same_state(a: dict, b: dict, what) -> None:
    for kind in ("top", "samples"):
        for name, t in a[kind].items():
            assert torch.equal(t, b[kind][name]), (kind, name, what)
    assert torch.equal(a["n_firing"], b["n_firing"])
    assert torch.equal(a["hist"], b["hist"])
    torch.testing.assert_close(a["act_sum"], b["act_sum"], rtol=1e-12, atol=0)


def test_accumulator_is_independent_of_batch_order_and_resume(acc_device):
    batches = _synthetic_batches(n_batches=6, seed=3)
    straight = _fold(batches, range(6))
    for order, resume_after in (([5, 2, 0, 4, 1, 3], None), (range(6), 2), ([3, 4, 5, 0, 1, 2], 3)):
        other = _fold(batches, order, resume_after=resume_after, device=acc_device)
        _assert_same_state(straight, other, order)


def test_offers_in_passes_equal_one_pass(acc_device, monkeypatch):
    """A GPU batch's first offers are merged in passes of OFFER_BYTES (the
    candidates outnumber a pass while rows fill): passes of 1-2 candidates
    give what one pass gives."""
    from tc_explore.index import accumulator
    batches = _synthetic_batches(n_batches=4, seed=5)
    one_pass = _fold(batches, range(4), device=acc_device)
    monkeypatch.setattr(accumulator, "OFFER_BYTES", 8 * (12 + 3) * 2)
    passes = []
    offer = accumulator._Best.offer
    monkeypatch.setattr(accumulator._Best, "offer", lambda self, f, *a, **kw: (
        passes.append((self.per_pass, f.numel())), offer(self, f, *a, **kw))[1])
    in_passes = _fold(batches, range(4), device=acc_device)
    assert {per for per, _ in passes} == {2, 1}                    # k = 3 and n_samples = 4
    assert max(n for _, n in passes) <= 2 and len(passes) > 100
    _assert_same_state(one_pass, in_passes, "passes")
    # Offered whole, larger offers are split by _Best.offer itself (as a merge's are).
    best = accumulator._Best(2, 3, 1, acc_device)
    f = torch.tensor([0, 0, 0, 0, 1, 1], device=acc_device)
    score = torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0, 0.5], device=acc_device)
    token = torch.arange(6, device=acc_device)
    best.offer(f, score, token, score, lambda idx: score.index_select(0, idx)[:, None].half())
    state = best.state()
    assert state["token"].tolist() == [[3, 1, 2], [4, 5, -1]]
    assert state["window"][..., 0].tolist() == [[4.0, 3.0, 2.0], [5.0, 0.5, 0.0]]


@pytest.mark.parametrize("offer_bytes, row_bytes", [(None, None), (8 * (12 + 8) * 6, 24 * 8 * 5), (1, 1)])
def test_best_keeps_the_k_best_whatever_its_passes(acc_device, monkeypatch, offer_bytes, row_bytes):
    """Offers of many candidates a feature (the k = 8 best kept of 40, with
    tied scores), in rounds that fill rows, evict several slots of a row at
    once and leave one row short: the k best by score, then token, in passes
    of OFFER_BYTES and chunks of ROW_BYTES (6 candidates a pass and 5 rows a
    chunk; 1 and 1) as in one."""
    from tc_explore.index import accumulator
    if offer_bytes is not None:
        monkeypatch.setattr(accumulator, "OFFER_BYTES", offer_bytes)
        monkeypatch.setattr(accumulator, "ROW_BYTES", row_bytes)
    rng = np.random.default_rng(7)
    d_sae, k = 3, 8
    best = accumulator._Best(d_sae, k, 1, acc_device)
    feats, scores, tokens = [], [], []
    for r in range(5):
        n = 12 if r < 4 else 3
        f = np.sort(rng.integers(0, d_sae - 1, n))                  # feature 2 gets only the last round's
        if r == 4:
            f[:] = 2
        score = rng.choice([0.5, 1.0, 1.5, 2.0, 2.5], n).astype(np.float32)
        token = r * 100 + np.arange(n)
        best.offer(*(torch.as_tensor(x, device=acc_device) for x in (f, score, token, score)),
                   lambda idx, s=torch.as_tensor(score, device=acc_device): s.index_select(0, idx)[:, None].half(),
                   tokens_ascending=True)
        feats.append(f), scores.append(score), tokens.append(token)
    f, score, token = (np.concatenate(x) for x in (feats, scores, tokens))
    state = {name: t.cpu() for name, t in best.state().items()}
    for feature in range(d_sae):
        mine = np.flatnonzero(f == feature)
        top = mine[np.lexsort((token[mine], -score[mine]))][:k]
        assert state["token"][feature, :len(top)].tolist() == token[top].tolist(), feature
        assert (state["token"][feature, len(top):] == -1).all()
        np.testing.assert_array_equal(state["score"][feature, :len(top)].numpy(), score[top])
        np.testing.assert_array_equal(state["window"][feature, :len(top), 0].numpy(), score[top].astype(np.float16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonzero_2d_matches_torch(dtype, device):
    from tc_explore.index import _nonzero_2d
    x = torch.randn(37, 29).to(dtype).to(device)
    x[x.abs() < 1.0] = 0.0
    x[0, :5] = torch.tensor([-0.0, float("nan"), -1.0, 0.0, float("inf")]).to(dtype).to(device)
    row, col = _nonzero_2d(x)
    want = (x != 0).nonzero(as_tuple=True)
    assert torch.equal(row, want[0]) and torch.equal(col, want[1])


def test_fused_layers_equal_separate_accumulators(tiny_model, tiny_transcoders, tmp_path, full_index):
    # One accumulator over all layers' features (the CUDA default) gives the
    # same index, and a checkpoint of either kind resumes the other.
    fused = _build(tiny_model, tiny_transcoders, tmp_path / "fused", fuse_layers=True)
    _assert_same(fused, full_index)
    out = tmp_path / "mixed"
    assert _build(tiny_model, tiny_transcoders, out, max_batches=3, fuse_layers=False) is None
    _assert_same(_build(tiny_model, tiny_transcoders, out, fuse_layers=True), full_index)


@pytest.mark.parametrize("fuse", [False, 2, True])
def test_pipelined_builds_equal_the_inline_build(tiny_model, tiny_transcoders, tmp_path, full_index, fuse):
    # Encodes and updates on the worker thread (the CUDA default), with layers
    # updated alone, in pairs or all together: the same index; a pipelined
    # build's checkpoint (taken once the worker is done) resumes inline.
    _assert_same(_build(tiny_model, tiny_transcoders, tmp_path / "all", pipeline=True, fuse_layers=fuse),
                 full_index)
    out = tmp_path / "resumed"
    assert _build(tiny_model, tiny_transcoders, out, max_batches=3, pipeline=True, fuse_layers=fuse) is None
    _assert_same(_build(tiny_model, tiny_transcoders, out, pipeline=False), full_index)
    assert not [t for t in threading.enumerate() if t.name == "tc-index-encode"]


def test_a_build_on_the_gpus_code_paths_equals_the_cpu_build(tiny_model, tiny_transcoders, tmp_path,
                                                             full_index, monkeypatch):
    # A GPU build's ways on a CPU (no numpy shortcuts, every chunk encoded into
    # fresh memory rather than a buffer kept from batch to batch, all layers
    # fused in one update on the pipeline's worker): the same index.
    from tc_explore.index import accumulator, build
    real, passed = build.stream_encodings, []

    def spy(*args, buffers=None, **kwargs):
        passed.append(buffers)
        return real(*args, buffers=buffers, **kwargs)
    monkeypatch.setattr(build, "stream_encodings", spy)
    _build(tiny_model, tiny_transcoders, tmp_path / "cpu", max_batches=1)
    assert len(passed) == 1 and len(passed[0]) == 1        # the CPU's: one buffer, kept
    monkeypatch.setattr(accumulator, "CPU_SHORTCUTS", False)
    passed.clear()
    _assert_same(_build(tiny_model, tiny_transcoders, tmp_path / "gpu-ways", fuse_layers=True, pipeline=True),
                 full_index)
    assert passed and all(buffers is None for buffers in passed)


def test_a_layers_chunks_are_let_go_one_by_one():
    # Each chunk of a layer's activations (in fresh memory on a GPU) is freed
    # once its nonzeros are taken, before the next is encoded: at GPT-2 small's
    # GPU batch, two chunks alive at once would add 192 MiB.
    import weakref

    from tc_explore.index.build import _activations
    made = []

    def chunks():
        for i in range(3):
            assert all(ref() is None for ref in made), "an earlier chunk is still alive"
            acts = torch.zeros(1, 4, 6)
            acts[0, i, i] = 1.0 + i
            made.append(weakref.ref(acts))
            yield i, acts
            del acts
    entries = _activations(chunks(), seq_len=4, n_seq=3, dense_ok=False)
    assert entries.row.tolist() == [0, 5, 10] and entries.feature.tolist() == [0, 1, 2]
    assert entries.value.tolist() == [1.0, 2.0, 3.0]


def test_an_error_on_the_pipeline_worker_reaches_the_caller(tiny_model, tiny_transcoders, tmp_path,
                                                           monkeypatch, full_index):
    from tc_explore.index import accumulator
    real, calls = accumulator._LayerAccumulator.update, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("update 4 failed")
        return real(self, *a, **kw)
    monkeypatch.setattr(accumulator._LayerAccumulator, "update", failing)
    with pytest.raises(RuntimeError, match="update 4 failed"):
        _build(tiny_model, tiny_transcoders, tmp_path / "failed", pipeline=True, fuse_layers=True)
    assert len(calls) == 4                              # the tasks after the error are skipped
    assert not [t for t in threading.enumerate() if t.name == "tc-index-encode"]
    # The checkpoint it left (before the failed batch) resumes to the full index.
    monkeypatch.setattr(accumulator._LayerAccumulator, "update", real)
    assert (tmp_path / "failed" / "checkpoint.pt").is_file()
    _assert_same(_build(tiny_model, tiny_transcoders, tmp_path / "failed", pipeline=True), full_index)


def test_encode_worker_runs_tasks_in_order_and_bounds_what_waits():
    from tc_explore.index.forward import EncodeWorker
    gate, seen = threading.Event(), []
    worker = EncodeWorker("cpu", max_pending=2)

    def task(x):
        gate.wait()
        seen.append(int(x))
    worker.submit(task, torch.tensor(0))                # taken by the thread, blocked on the gate
    time.sleep(0.2)
    worker.submit(task, torch.tensor(1))
    worker.submit(task, torch.tensor(2))                # two wait: the queue is full
    blocked = threading.Thread(target=worker.submit, args=(task, torch.tensor(3)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()                           # a third would hold one input too many
    gate.set()
    blocked.join(5)
    worker.close()
    assert seen == [0, 1, 2, 3]


def test_encode_worker_skips_every_task_after_an_error():
    from tc_explore.index.forward import EncodeWorker
    gate, seen = threading.Event(), []
    worker = EncodeWorker("cpu", max_pending=4)

    def task(x):
        gate.wait()
        if int(x) == 1:
            raise ValueError("task 1 failed")
        seen.append(int(x))
    for i in range(4):
        worker.submit(task, torch.tensor(i))
    gate.set()
    with pytest.raises(ValueError, match="task 1 failed"):
        worker.wait()
    worker.submit(task, torch.tensor(4))                # after the error was raised: still skipped
    worker.close()                                      # nothing more to raise
    assert seen == [0]
    assert not worker._thread.is_alive()


@pytest.mark.parametrize("bad", [0, -2, 1.5, "all"])
def test_a_bad_fuse_layers_is_refused(tiny_model, tiny_transcoders, tmp_path, bad):
    with pytest.raises(InvalidInputError, match="fuse_layers must be"):
        _build(tiny_model, tiny_transcoders, tmp_path / "bad", fuse_layers=bad)


@pytest.mark.parametrize("threads", [1, 3])
def test_feature_blocks_on_any_number_of_threads_equal_one_accumulator(
        tiny_model, tiny_transcoders, tmp_path, full_index, threads):
    # On a CPU a layer's features are updated in as many blocks as torch has
    # threads: any number gives the same index (and a checkpoint made with one
    # number resumes with another); the build leaves torch's setting as it was.
    outer = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = tmp_path / "blocks"
        assert _build(tiny_model, tiny_transcoders, out, max_batches=3) is None
        assert torch.get_num_threads() == threads
        torch.set_num_threads(4 - threads)
        index = _build(tiny_model, tiny_transcoders, out)
        assert torch.get_num_threads() == 4 - threads
    finally:
        torch.set_num_threads(outer)
    _assert_same(index, full_index)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_heap_gives_freed_memory_back():
    # Memory freed in pieces below glibc's mmap threshold stays resident (here
    # under a live allocation above it, as loading weights leaves it) until trimmed.
    from tc_explore.memory import release_free_heap

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    pieces = [bytearray(b"x" * 20_000) for _ in range(15_000)]          # ~300 MB
    pin = bytearray(b"x" * 20_000)
    del pieces
    before = rss()
    release_free_heap()
    assert before - rss() > 100 * 2 ** 20
    del pin


_STEADY_HEAP_PROBE = """
import ctypes, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[1])
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def kept_after_free(n=24 * 2 ** 20):
    before = rss()
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    libc.free(block)
    return rss() - before
plain = kept_after_free()
with memory.steady_heap():
    steady = kept_after_free()
    again = kept_after_free()              # the kept pages are reused, not added to
held = rss()
memory.release_free_heap(collect_garbage=False)
print(plain, steady, again, held - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_steady_heap_keeps_freed_pages_until_released():
    # In a fresh process (glibc's default thresholds), a freed 24 MiB block
    # goes back to the system at once; inside steady_heap it stays resident
    # for reuse, and release_free_heap gives it back.
    import subprocess
    import tc_explore.memory
    n = 24 * 2 ** 20
    out = subprocess.run([sys.executable, "-c", _STEADY_HEAP_PROBE, tc_explore.memory.__file__],
                         capture_output=True, text=True, check=True).stdout
    plain, steady, again, given_back = (int(v) for v in out.split())
    assert plain < 0.1 * n, out
    assert steady > 0.9 * n and again < 0.1 * n, out
    assert given_back > 0.9 * n, out


def test_feature_blocks_hold_what_one_accumulator_holds():
    # Dense activations and Entries alike; a state loads into another number of blocks.
    from concurrent.futures import ThreadPoolExecutor
    from tc_explore.index.accumulator import Entries, _FeatureBlocks, _LayerAccumulator
    g = torch.Generator().manual_seed(0)
    args = (3, 37, 4, 5, histogram_edges(), (2, 1), 0, "cpu")
    one = _LayerAccumulator(*args)
    with ThreadPoolExecutor(3) as pool:
        blocks = _FeatureBlocks(*args, 3, pool)
        for b in range(4):
            acts = torch.relu(torch.randn(2, 6, 37, generator=g) - 1.0)
            key = torch.rand(2, 6, generator=g, dtype=torch.float64)
            one.update(acts, key, b * 12)
            blocks.update(acts if b % 2 else [Entries.of(acts)], key, b * 12)
        assert len(blocks.blocks) == 3
        _assert_states_equal(blocks.state(), one.state())
        again = _FeatureBlocks(*args, 2, pool)
        again.load(blocks.state())
        _assert_states_equal(again.state(), one.state())
        with pytest.raises(ValueError, match="1 layer"):
            blocks.update([acts, acts], key, 48)


def _assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_states_equal(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_build_on_cuda_equals_per_layer_build_on_cuda(tiny_model, offline_hub, tmp_path):
    from tc_explore import load_transcoders
    on_gpu = load_transcoders("gpt2-small", device="cuda")
    fused = _build(tiny_model, on_gpu, tmp_path / "fused")          # fused: the CUDA default
    assert fused.manifest["complete"]
    separate = _build(tiny_model, on_gpu, tmp_path / "separate", fuse_layers=False)
    _assert_same(fused, separate, exact_sums=False)                 # CUDA float64 bincount order
    # The pipeline (the CUDA default: a thread and stream of its own) against
    # updates in the model's thread, and a model on the GPU too.
    inline = _build(tiny_model, on_gpu, tmp_path / "inline", pipeline=False, fuse_layers=2)
    _assert_same(fused, inline, exact_sums=False)
    out = tmp_path / "resumed"
    assert _build(tiny_model, on_gpu, out, max_batches=3, fuse_layers=2) is None
    _assert_same(_build(tiny_model, on_gpu, out), fused, exact_sums=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pipelined_build_with_the_model_on_cuda(offline_hub, tmp_path):
    # The layer inputs now come from the model's CUDA stream to the worker's.
    from tc_explore import load_model, load_transcoders
    model = load_model("gpt2", device="cuda")
    on_gpu = load_transcoders("gpt2-small", device="cuda")
    _assert_same(_build(model, on_gpu, tmp_path / "pipelined"),
                 _build(model, on_gpu, tmp_path / "inline", pipeline=False), exact_sums=False)


def test_an_index_of_another_format_version_is_refused(full_index, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(full_index.directory, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="format version 1.*overwrite=True"):
        FeatureIndex.load(old)
    top = full_index.table(full_index.layers[0], "top")
    assert top["window"].iloc[0].dtype == np.float16


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_stream_encodings_equal_cached_encodings(tiny_model, tiny_transcoders, chunk_bytes, reuse):
    """The build's forward (each layer encoded in its hook, the pass stopped
    after the last one, optionally one sequence per chunk, optionally into
    reused buffers) gives exactly the activations of run_with_cache + encode,
    layer by layer, in forward order."""
    from tc_explore.index.forward import CHUNK_BYTES, stream_encodings
    tokens = torch.from_numpy(_corpus(tiny_model).take(5).numpy().astype(np.int64))
    hooks = [tiny_transcoders.input_hook(layer) for layer in LAYERS]
    buffers = {} if reuse else None
    for attempt in range(2 if reuse else 1):                    # the second pass reuses the buffers
        got, order, storage = {}, [], set()

        def consume(layer, chunks):
            order.append(layer)
            got[layer] = []
            for first, acts in chunks:
                storage.add(acts.data_ptr())
                got[layer].append((first, acts.clone()))
        with torch.inference_mode():
            _, cache = tiny_model.run_with_cache(tokens, names_filter=hooks)
            stream_encodings(tiny_model, tiny_transcoders, LAYERS[::-1], tokens, consume,
                             chunk_bytes=chunk_bytes or CHUNK_BYTES, buffers=buffers)
        assert order == LAYERS
        for layer, hook in zip(LAYERS, hooks):
            want = tiny_transcoders[layer].encode(cache[hook])
            firsts = [first for first, _ in got[layer]]
            assert firsts == (list(range(5)) if chunk_bytes else [0])
            assert torch.equal(torch.cat([acts for _, acts in got[layer]]), want)
        if reuse:                                               # one buffer per chunk shape, kept
            assert storage == {b.data_ptr() for b in buffers.values()} and len(buffers) == 1


@pytest.mark.parametrize("jumprelu", [False, True])
def test_encode_into_a_buffer_gives_the_same_activations(jumprelu):
    # What the CPU build does every layer: the same values, written over the buffer it passes.
    from tc_explore.testing import random_transcoder
    tc = random_transcoder(16, 40, 0, jumprelu=jumprelu)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    buffer = torch.full((3, 5, 40), float("nan"))
    with torch.inference_mode():
        want = tc.encode(x)
        got = tc.encode(x, out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(got, want) and bool((want == 0).any()) and bool((want > 0).any())


def test_encode_refuses_a_buffer_that_does_not_fit():
    from tc_explore.errors import InvalidInputError
    from tc_explore.testing import random_transcoder
    tc = random_transcoder(16, 40, 0)
    x = torch.randn(3, 5, 16)
    with torch.inference_mode():
        for bad, named in ((torch.empty(3, 5, 39), "(3, 5, 39)"), (torch.empty(3, 5, 40, dtype=torch.float64),
                                                                  "float64"), ([0.0], "list")):
            with pytest.raises(InvalidInputError, match=re.escape(named)):
                tc.encode(x, out=bad)
    with pytest.raises(InvalidInputError, match="without autograd"):     # grad mode on, weights need grad
        tc.encode(x, out=torch.empty(3, 5, 40))
