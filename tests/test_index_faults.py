"""Faults around an index folder, for real: builds and merges killed with
SIGKILL in a child process and resumed, two builds into one folder, flipped
bytes in index files, a merge into one of its own inputs, a resume with other
weights. On the demo model ``tiny-years`` (3 layers, 512 features each)."""
import json
import os
import signal
import subprocess
import sys
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tc_explore import load_transcoders
from tc_explore.corpus import Corpus
from tc_explore.errors import (CorruptFileError, FingerprintMismatchError, IndexLockedError,
                               InvalidInputError)
from tc_explore.index import FeatureIndex
from tc_explore.index.lock import lock_path
from tc_explore.demo import SyntheticSentences

SEQ_LEN = 16
N_SEQ = 48
SETTINGS = dict(k=4, n_samples=5, batch_size=2, checkpoint_every=1, window=(3, 2), features_per_group=64)

CHILD = textwrap.dedent("""
    import sys, json
    from tc_explore import load_model, load_transcoders
    from tc_explore.corpus import Corpus
    from tc_explore.index import FeatureIndex
    from tc_explore.demo import SyntheticSentences
    what, out, n_seq, settings = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    model = load_model("tiny-years", device="cpu")
    ts = load_transcoders("tiny-years", device="cpu")
    gen = SyntheticSentences(0)
    corpus = Corpus.from_texts([gen.sentence() for _ in range(4000)], model, %d, seed=7)
    if what == "build":
        print("started", flush=True)
        FeatureIndex.build(model, ts, corpus, n_seq * %d, out, **settings)
        print("done", flush=True)
    else:                                   # merge the given shards, again and again
        shards = json.loads(sys.argv[5])
        while True:
            FeatureIndex.merge(shards, out, overwrite=True)
            print("merged", flush=True)
""" % (SEQ_LEN, SEQ_LEN))


def _child(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _corpus(model):
    gen = SyntheticSentences(0)      # the demo model's own vocabulary
    return Corpus.from_texts([gen.sentence() for _ in range(4000)], model, SEQ_LEN, seed=7)


def _build(model, ts, out, n_seq=N_SEQ, **kw):
    return FeatureIndex.build(model, ts, _corpus(model), n_seq * SEQ_LEN, out, **{**SETTINGS, **kw})


def _files(index_dir: Path) -> dict:
    """Every data file of an index, by relative path, as bytes (the manifest
    apart: it records when it was built)."""
    return {str(p.relative_to(index_dir)): p.read_bytes() for p in sorted(index_dir.rglob("*.parquet"))}


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        time.sleep(0.02)


def _batches_done(out: Path) -> int:
    try:
        return int(json.loads((out / "manifest.json").read_text()).get("batches_done_hint") or 0)
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def reference(demo_model, demo_transcoders, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "index"
    return _build(demo_model, demo_transcoders, out)


def test_build_killed_then_resumed_equals_an_uninterrupted_build(demo_model, demo_transcoders, tmp_path,
                                                                 reference):
    out = tmp_path / "killed"
    proc = _child("build", out, N_SEQ, json.dumps(SETTINGS))
    _wait_for(lambda: _batches_done(out) >= 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(out).is_file()                         # the dead build's lock is left behind
    index = _build(demo_model, demo_transcoders, out)       # takes the stale lock over, resumes
    assert not lock_path(out).exists()
    assert _files(index.directory) == _files(reference.directory)


def test_two_builds_into_one_folder(demo_model, demo_transcoders, tmp_path, reference):
    """The second build is refused while the first lives, overwrite=True
    included; once the first is killed, the second resumes its work."""
    out = tmp_path / "shared"
    proc = _child("build", out, N_SEQ * 30, json.dumps(SETTINGS))   # long enough to be caught running
    _wait_for(lambda: _batches_done(out) >= 1, proc)
    for overwrite in (False, True):
        with pytest.raises(IndexLockedError) as info:
            _build(demo_model, demo_transcoders, out, n_seq=N_SEQ * 30, overwrite=overwrite)
        text = str(info.value)
        assert f"pid {proc.pid}" in text and "host" in text and "since" in text
    assert (out / "manifest.json").is_file() and proc.poll() is None   # nothing was deleted
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    index = _build(demo_model, demo_transcoders, out, overwrite=True)  # stale lock: taken over
    assert _files(index.directory) == _files(reference.directory)


def test_merge_killed_then_rerun_equals_an_uninterrupted_merge(demo_model, demo_transcoders, tmp_path):
    shards = [_build(demo_model, demo_transcoders, tmp_path / f"shard{i}", shard=(i, 2)).directory
              for i in range(2)]
    inputs = {s: _files(s) for s in shards}
    expected = _files(FeatureIndex.merge(shards, tmp_path / "expected").directory)
    out = tmp_path / "merged"
    proc = _child("merge", out, N_SEQ, "{}", json.dumps([str(s) for s in shards]))
    _wait_for(lambda: (out / "manifest.json").is_file(), proc)
    time.sleep(0.3)                                         # somewhere inside a later merge
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert FeatureIndex(out).manifest.complete              # the last finished merge is whole
    merged = FeatureIndex.merge(shards, out, overwrite=True)
    assert _files(merged.directory) == expected
    assert {s: _files(s) for s in shards} == inputs           # inputs untouched
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_merge_into_one_of_its_inputs(demo_model, demo_transcoders, tmp_path, reference):
    shards = [_build(demo_model, demo_transcoders, tmp_path / f"s{i}", shard=(i, 2)).directory
              for i in range(2)]
    before = _files(shards[0])
    with pytest.raises(InvalidInputError, match="one of its inputs"):
        FeatureIndex.merge(shards, shards[0])
    assert _files(shards[0]) == before
    merged = FeatureIndex.merge(shards, shards[0], overwrite=True)    # replaces s0 only when done
    assert _files(merged.directory) == _files(reference.directory)
    with pytest.raises(InvalidInputError, match="inside"):
        FeatureIndex.merge(shards[1:], shards[1] / "sub")


def test_resume_with_other_weights_is_refused(demo_model, demo_transcoders, tmp_path):
    out = tmp_path / "weights"
    assert _build(demo_model, demo_transcoders, out, max_batches=2) is None
    other = load_transcoders("tiny-years", device="cpu")
    layer = other.layers[1]
    with torch.no_grad():
        other[layer].W_enc[0, 0] += 0.5
    with pytest.raises(FingerprintMismatchError, match=f"layer {layer}"):
        _build(demo_model, other, out)
    assert _build(demo_model, demo_transcoders, out) is not None     # the right weights resume it


def test_dashboard_with_other_weights_is_refused(demo_model, reference):
    from tc_explore.dashboard import feature_dashboard
    other = load_transcoders("tiny-years", device="cpu")
    with torch.no_grad():
        other[0].b_enc[3] = 1.0
    with pytest.raises(FingerprintMismatchError, match="layer-0"):
        feature_dashboard(reference, 0, 3, model=demo_model, transcoders=other)


@pytest.mark.parametrize("name", ["layer_01/top.parquet", "layer_00/stats.parquet", "tokens.parquet"])
def test_flipped_bytes_in_an_index_file(demo_model, demo_transcoders, tmp_path, name):
    index = _build(demo_model, demo_transcoders, tmp_path / "flip")
    path = index.directory / name
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    index = FeatureIndex(index.directory)
    layer = 1 if "layer_01" in name else 0
    with pytest.raises(CorruptFileError, match=f"index file {name} .*corrupted") as info:
        index.top_examples(layer, 3) if "layer" in name else index.sequence_tokens(0)
    if "layer" in name:
        assert f"rebuild layer {layer}" in str(info.value)


def test_a_failed_build_start_leaves_no_folder(demo_model, demo_transcoders, tmp_path):
    short = Corpus.from_texts(["The war lasted from 1735 to 1740."] * 3, demo_model, SEQ_LEN)
    out = tmp_path / "short"
    with pytest.raises(InvalidInputError, match="yields only"):
        FeatureIndex.build(demo_model, demo_transcoders, short, 10_000, out, **SETTINGS)
    assert not out.exists() and not lock_path(out).exists()
    out.mkdir()                                              # a folder the user made: kept, empty
    with pytest.raises(InvalidInputError, match="yields only"):
        FeatureIndex.build(demo_model, demo_transcoders, short, 10_000, out, **SETTINGS)
    assert out.is_dir() and list(out.iterdir()) == []


def test_lock_of_another_host_is_refused_and_a_dead_process_lock_taken_over(demo_model, demo_transcoders,
                                                                          tmp_path):
    out = tmp_path / "locked"
    lock_path(out).write_text(json.dumps({"pid": 1, "host": "node-17", "started_at": "2026-01-01T00:00:00Z",
                                          "purpose": "build"}))
    with pytest.raises(IndexLockedError, match="pid 1 on host 'node-17'.*2026-01-01"):
        _build(demo_model, demo_transcoders, out, n_seq=4)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    import socket
    lock_path(out).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "purpose": "build"}))
    assert _build(demo_model, demo_transcoders, out, n_seq=4) is not None
    assert not lock_path(out).exists()


# -- locks held by another host: heartbeats -------------------------------------------------------
def _foreign_lock(out, age_s: float, heartbeat=True):
    """A lock file as a build on host node-17 writes it, last touched ``age_s`` ago."""
    holder = {"pid": 4242, "host": "node-17", "started_at": "2026-01-01T00:00:00Z", "purpose": "build",
              "token": "f" * 32}
    if heartbeat:
        holder.update(heartbeat_every=30.0, stale_after=600.0)
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_lock_of_another_host_fresh_is_refused_stale_is_taken_over(demo_model, demo_transcoders, tmp_path):
    from tc_explore.errors import StaleLockWarning
    out = tmp_path / "shared"
    _foreign_lock(out, age_s=20)                          # beating: refused, and says when it would go
    with pytest.raises(IndexLockedError, match=r"pid 4242 on host 'node-17'.*heartbeat is 2\d s old.*600 s"):
        _build(demo_model, demo_transcoders, out, n_seq=4)
    _foreign_lock(out, age_s=3600, heartbeat=False)       # an old lock without a heartbeat: by hand
    with pytest.raises(IndexLockedError, match="delete the lock file"):
        _build(demo_model, demo_transcoders, out, n_seq=4)
    _foreign_lock(out, age_s=601)                         # silent for longer than it promised
    with pytest.warns(StaleLockWarning, match=r"from pid 4242 on host 'node-17', build since 2026-01-01.*"
                                              r"heartbeat was 60\d s ago"):
        index = _build(demo_model, demo_transcoders, out, n_seq=4)
    assert index.manifest.complete and not lock_path(out).exists()


def test_the_holder_beats_and_notices_a_takeover(tmp_path):
    from tc_explore.index.lock import FolderLock
    lock = FolderLock(tmp_path / "idx", "build", heartbeat_every=0.05).acquire()
    try:
        holder = json.loads(lock.path.read_text())
        assert holder["heartbeat_every"] == 0.05 and holder["stale_after"] == 600
        os.utime(lock.path, (time.time() - 500, time.time() - 500))
        deadline = time.time() + 10
        while time.time() - lock.path.stat().st_mtime > 5 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.path.stat().st_mtime < 5        # the daemon thread refreshed it
        lock.check_held()
        # Judged dead (say the host was suspended) and taken over by node-17:
        lock.path.write_text(json.dumps({"pid": 7, "host": "node-17", "token": "other"}))
        with pytest.raises(IndexLockedError, match="no longer holds.*taken over by pid 7 on host 'node-17'"):
            lock.check_held()
    finally:
        lock.release()
    assert json.loads(lock.path.read_text())["token"] == "other"    # the new holder's lock stays


# -- the merge's swap: killed between its steps ---------------------------------------------------
SWAP_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from tc_explore import integrity
    from tc_explore.index import FeatureIndex
    step, out, shards = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if step == "after-exchange":            # the atomic swap done, the old index not yet deleted
        exchange = integrity.exchange_paths
        integrity.exchange_paths = lambda a, b: exchange(a, b) and die()
    else:                                   # no exchange on this OS: killed between the two renames
        integrity.exchange_paths = lambda a, b: False
        rename = os.rename
        def rename_then_die(src, dst):
            rename(src, dst)
            if ".replaced-" in str(dst):
                die()
        os.rename = rename_then_die
    FeatureIndex.merge(shards, out, overwrite=True)
""")


@pytest.mark.parametrize("step", ["after-exchange", "between-renames"])
def test_merge_killed_inside_its_swap(demo_model, demo_transcoders, tmp_path, step):
    shards = [_build(demo_model, demo_transcoders, tmp_path / f"s{i}", n_seq=8, shard=(i, 2)).directory
              for i in range(2)]
    out = tmp_path / "merged"
    expected = _files(FeatureIndex.merge(shards, out).directory)
    old = _files(_build(demo_model, demo_transcoders, tmp_path / "other", n_seq=4).directory)
    for p in out.iterdir():                                      # out holds another (smaller) index
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in (tmp_path / "other").iterdir():
        shutil.move(str(p), out / p.name)
    assert _files(out) == old
    proc = subprocess.run([sys.executable, "-c", SWAP_CHILD, step, str(out), json.dumps([str(s) for s in shards])],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    if step == "after-exchange":
        # out switched to the merged index in one step; the old one waits beside it
        assert _files(out) == expected and FeatureIndex(out).manifest.complete
        assert any(".merging-" in name for name in leftovers), leftovers
    else:
        assert not out.exists()                                 # the gap the exchange closes
    # The next build or merge of out takes over the dead process's lock and repairs what it left.
    assert _files(FeatureIndex.merge(shards, out, overwrite=True).directory) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- everything that writes an index folder holds its lock ----------------------------------------
def test_weight_views_are_built_under_the_index_lock(demo_model, demo_transcoders, tmp_path, monkeypatch):
    from tc_explore import weight_views
    from tc_explore.index.lock import FolderLock
    index = _build(demo_model, demo_transcoders, tmp_path / "idx", n_seq=4)
    views_dir = index.directory / weight_views.DIRECTORY
    with FolderLock(index.directory, "build"):                 # a live build of the index
        with pytest.raises(IndexLockedError, match="in use by another process"):
            weight_views.WeightViews.build(demo_model, demo_transcoders, views_dir, k=3, n_heads=1)
    assert not views_dir.exists()
    seen = {}
    run = weight_views._Builder.run

    def run_and_probe(self, *args, **kwargs):
        seen["holder"] = json.loads(lock_path(index.directory).read_text())["purpose"]
        with pytest.raises(IndexLockedError):                  # an overwrite must not delete the index now
            _build(demo_model, demo_transcoders, index.directory, n_seq=4, overwrite=True)
        return run(self, *args, **kwargs)
    monkeypatch.setattr(weight_views._Builder, "run", run_and_probe)
    views = weight_views.WeightViews.build(demo_model, demo_transcoders, views_dir, k=3, n_heads=1)
    assert seen["holder"] == "weight views build" and views.k == 3
    assert not lock_path(index.directory).exists() and FeatureIndex(index.directory).manifest.complete
    # views elsewhere lock their own folder
    elsewhere = tmp_path / "views"
    with FolderLock(elsewhere, "weight views build"):
        with pytest.raises(IndexLockedError):
            weight_views.WeightViews.build(demo_model, demo_transcoders, elsewhere, k=3, n_heads=1)


def test_distributed_build_removes_shards_only_under_their_locks(demo_model, demo_transcoders, tmp_path):
    import torch.distributed as dist
    from tc_explore.index.distributed import build_distributed, remove_shards, shard_directory
    from tc_explore.index.lock import FolderLock
    out = tmp_path / "dist"
    live, dead = shard_directory(out, 1, 2), shard_directory(out, 0, 2)
    for d in (live, dead):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
    with FolderLock(live, "build"):                            # rank 1 of an earlier launch, still running
        with pytest.raises(IndexLockedError, match="00001-of-00002"):
            remove_shards(out)
        assert live.is_dir()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        try:
            with pytest.raises(IndexLockedError, match="00001-of-00002"):
                build_distributed(demo_model, demo_transcoders, _corpus(demo_model), 4 * SEQ_LEN, out,
                                  overwrite=True, **SETTINGS)
            assert live.is_dir()
        finally:
            dist.destroy_process_group()
    remove_shards(out)                                         # released: removed, folder and all
    assert not live.parent.exists()


# -- the corpus fingerprint covers every token ----------------------------------------------------
def test_resume_on_a_corpus_that_diverges_later_is_refused(demo_model, demo_transcoders, tmp_path):
    import hashlib
    gen = SyntheticSentences(0)
    texts = [gen.sentence() for _ in range(400)]
    later = texts[:8] + [gen.sentence() for _ in range(392)]      # same size and first sequences
    first, second = (Corpus.from_texts(t, demo_model, SEQ_LEN, seed=None) for t in (texts, later))
    assert first.description == second.description
    assert torch.equal(first.take(2), second.take(2)) and not torch.equal(first.take(12), second.take(12))
    out = tmp_path / "idx"
    assert FeatureIndex.build(demo_model, demo_transcoders, first, 12 * SEQ_LEN, out,
                              **{**SETTINGS, "max_batches": 1}) is None
    with pytest.raises(FingerprintMismatchError,
                       match=r"sequence ([2-9]|1[01]) of this corpus differs.*sequences 0\.\.\d+ agree"):
        FeatureIndex.build(demo_model, demo_transcoders, second, 12 * SEQ_LEN, out, **SETTINGS)
    shorter = Corpus.from_texts(texts[:12], demo_model, SEQ_LEN, seed=None)
    shorter.description.update(first.description)
    with pytest.raises((FingerprintMismatchError, InvalidInputError), match="ends before|yields only"):
        FeatureIndex.build(demo_model, demo_transcoders, shorter, 12 * SEQ_LEN, out, **SETTINGS)
    index = FeatureIndex.build(demo_model, demo_transcoders, first, 12 * SEQ_LEN, out, **SETTINGS)
    # The digest covers every token indexed, and a merge of shards records the same one.
    recorded = index.manifest.fingerprints["corpus_tokens"]
    assert recorded == {"sha256": hashlib.sha256(first.take(12).numpy().astype("<i4").tobytes()).hexdigest(),
                        "sequences": [0, 12]}
    shards = [FeatureIndex.build(demo_model, demo_transcoders, first, 12 * SEQ_LEN, tmp_path / f"s{i}",
                                 **{**SETTINGS, "shard": (i, 2)}).directory for i in range(2)]
    merged = FeatureIndex.merge(shards, tmp_path / "merged")
    assert merged.manifest.fingerprints["corpus_tokens"] == recorded


# -- NaN and infinity met by a build ---------------------------------------------------------------
@pytest.mark.parametrize("value,what", [(float("nan"), r"input held \d+ NaN or infinite values"),
                                        (3e38, r"activations reached infinity")])
def test_nan_or_inf_in_a_batch_stops_the_build_at_its_last_good_checkpoint(demo_transcoders, tmp_path,
                                                                          value, what):
    """NaN activations would silently drop out of the statistics (NaN > 0 is
    false) and infinite ones poison every mean: the build refuses, naming the
    layer and batches, and keeps the checkpoint before them; resumed with a
    sound model it finishes as an uninterrupted build does."""
    from tc_explore import load_model
    from tc_explore.errors import NonFiniteError
    model = load_model("tiny-years", device="cpu")
    calls = []

    def poison_third_batch(x, hook):
        calls.append(1)
        if len(calls) != 3:
            return x
        x = x.clone()
        x[:, 5] = value * torch.sign(demo_transcoders[2].W_enc[:, 0])      # feature 0 overflows
        return x
    model.add_hook(demo_transcoders.input_hook(2), poison_third_batch)     # finite 3e38: encodes to inf
    out = tmp_path / "idx"
    with pytest.raises(NonFiniteError, match=rf"Layer 2's transcoder {what} in batches 2\.\.2 of this build "
                                             rf"\(sequences 4\.\.5\)(: \d+ features have a non-finite activation "
                                             rf"sum \(first \[[\d, ]+\]\))?\. The build stops there; .* keeps its "
                                             rf"checkpoint at batch 2\."):
        _build(model, demo_transcoders, out, n_seq=8)
    assert json.loads((out / "manifest.json").read_text())["batches_done_hint"] == 2
    model.reset_hooks()
    resumed = _build(model, demo_transcoders, out, n_seq=8)
    assert _files(resumed.directory) == _files(_build(model, demo_transcoders, tmp_path / "clean", n_seq=8).directory)
