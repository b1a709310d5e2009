"""Building a feature index: one pass of the model over a corpus, resumable
from checkpoints, in shards that ``merge_indexes`` joins into the index a
single build would have made (the accumulator is order-independent).

Position 0 of every sequence (BOS with no context) is left out of all
statistics: its activations are identical in every sequence and would fill
every feature's top-k with copies of one example.

One module (over 500 lines) because build, resume and merge are one state
machine over the same folder: settings, lock, checkpoint, manifest
fingerprints and the final atomic writes; the accumulator, storage and
reader already live apart.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..corpus import Corpus, as_corpus
from ..errors import (NON_FINITE_REMEDY, FingerprintMismatchError, InvalidInputError, NonFiniteError,
                      as_flag, as_integer)
from ..integrity import (atomic_write, fingerprint_difference, model_fingerprint, reading,
                         replace_folder, tokenizer_digest)
from ..memory import release_free_heap, steady_heap
from ..model import check_context, model_device
from ..progress import progress_bar
from ..transcoder import TranscoderSet, as_transcoder_set
from .accumulator import Entries, _Best, _FeatureBlocks, _LayerAccumulator, _token_hash, histogram_edges
from .forward import EncodeWorker, reuses_buffers, stream_encodings
from .lock import FolderLock
from .storage import (FORMAT_VERSION, IndexManifest, _flat_windows, atomic_write_json,
                      atomic_write_parquet, data_file_names, file_checksums, index_files,
                      layer_file_names, read_layer_state, read_manifest, tokens_schema, write_layer)


# Seconds between a build's checkpoints unless IndexSettings.checkpoint_every says batches.
CHECKPOINT_SECONDS = 600.0


@dataclass(frozen=True)
class IndexSettings:
    """How ``FeatureIndex.build`` indexes a corpus.

    ``layers``: which layers (default all of the set). ``k`` top examples and
    ``n_samples`` uniformly sampled firing tokens per feature; ``bins``
    histogram edges (default ``histogram_edges()``); ``window`` = (before,
    after) tokens of context stored with each example; ``seed`` of the sample.
    ``batch_size`` sequences per model pass; a checkpoint every
    ``checkpoint_every`` batches, or by default once ``CHECKPOINT_SECONDS``
    (10 minutes) have passed since the last (a checkpoint writes every
    accumulator, ~1 GiB for GPT-2 small: a fixed number of batches is
    minutes apart on a CPU and seconds apart on a GPU). ``shard=(i, n)``
    indexes only the i-th of n contiguous runs of batches (join them with
    ``FeatureIndex.merge``).
    ``max_batches`` stops (with a checkpoint) after that many new batches, for
    builds in time slices. ``features_per_group`` features per Parquet row
    group. ``overwrite`` replaces what ``out_dir`` holds. ``fuse_layers``
    folds all layers (True) or groups of that many layers (an int) into one
    accumulator update per batch (same results; the default on CUDA, where an
    update costs kernel launches, not arithmetic; on CPU it would only hold
    all layers' activations at once). ``pipeline`` encodes the layers and
    updates the accumulators on a thread (and CUDA stream) of their own,
    beside the model's forward (same results; the default on CUDA, where the
    model's thread would otherwise wait for the GPU at every layer, as
    finding the nonzero activations needs their count on the host; on a CPU
    the forward and the update would share the cores)."""
    layers: Sequence[int] | None = None
    k: int = 20
    n_samples: int = 40
    batch_size: int = 8
    bins: np.ndarray | None = None
    window: tuple = (12, 4)
    seed: int = 0
    checkpoint_every: int | None = None
    shard: tuple | None = None
    max_batches: int | None = None
    features_per_group: int = 256
    overwrite: bool = False
    progress: bool | None = None         # None: on, off in CI (tc_explore.progress)
    fuse_layers: bool | int | None = None
    pipeline: bool | None = None

    @classmethod
    def of(cls, settings: "IndexSettings | None", options: dict) -> "IndexSettings":
        """``settings`` with ``options`` (keyword arguments of build) applied."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InvalidInputError(
                f"Unknown index setting(s) {unknown}; the settings are {sorted(names)}.")
        base = asdict(settings) if settings is not None else {}
        merged = {**base, **options}
        as_flag(merged.get("overwrite", False), "overwrite")
        for name in ("progress", "pipeline"):
            as_flag(merged.get(name), name, allow_none=True)
        fuse = merged.get("fuse_layers")
        if not (fuse is None or isinstance(fuse, bool) or (isinstance(fuse, (int, np.integer)) and fuse >= 1)):
            raise InvalidInputError(f"fuse_layers must be True, False, None (the device's default) or a "
                                    f"number of layers >= 1 per update, got {fuse!r}.")
        return cls(**merged)


def _layer_groups(layers: Sequence[int], fuse: bool | int) -> list[list[int]]:
    """The layers updated together: all (True), one by one (False), or runs of ``fuse``."""
    size = len(layers) if fuse is True else 1 if fuse is False else int(fuse)
    return [list(layers[i:i + size]) for i in range(0, len(layers), size)]


def build_index(model, transcoders: TranscoderSet, corpus, n_tokens: int, out_dir: str | os.PathLike,
                settings: IndexSettings) -> Path | None:
    """Index ``n_tokens`` tokens of ``corpus`` into ``out_dir`` (see
    ``FeatureIndex.build``). Returns the directory, or None if the build
    stopped at ``max_batches`` before its end. Holds the folder's lock
    throughout: a second build or merge into it is refused while this one lives."""
    corpus = as_corpus(corpus, model)
    if not isinstance(out_dir, (str, os.PathLike)):
        raise InvalidInputError(f"out_dir must be a folder path, got {type(out_dir).__name__} {out_dir!r:.60}.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir {out} is a file, not a folder: give a folder for the index.")
    manifest = _plan(model, transcoders, corpus, n_tokens, settings)
    with FolderLock(out, "build") as lock:
        _clean_after(lock, out)
        created = not out.exists()
        existing = _prepare_out_dir(out, manifest, settings.overwrite)
        if existing == "complete":
            return out
        try:
            digest = _write_tokens(out, corpus, manifest.sequence_start, manifest.n_sequences,
                                   manifest.batch_size, int(model.cfg.d_vocab))
            if digest is None:              # resumed: the tokens it started with are stored
                digest = _check_resumed_corpus(out, corpus, manifest)
        except BaseException:
            if existing == "new":           # leave no half-made folder that looks like an index
                _undo_new_folder(out, created)
            raise
        _record_corpus_digest(out, manifest, digest)
        return _build_locked(model, transcoders, out, manifest, settings, lock)


def _build_locked(model, transcoders: TranscoderSet, out: Path, manifest: IndexManifest,
                  s: IndexSettings, lock: FolderLock) -> Path | None:
    try:
        with steady_heap() if transcoders.device.type == "cpu" else nullcontext():
            return _build_accumulating(model, transcoders, out, manifest, s, lock)
    finally:
        # The update threads' freed scratch, for what the user runs next (no
        # garbage collection: ~0.3 s with a model loaded, and the build makes no cycles).
        release_free_heap(collect_garbage=False)


def _build_accumulating(model, transcoders: TranscoderSet, out: Path, manifest: IndexManifest,
                        s: IndexSettings, lock: FolderLock) -> Path | None:
    release_free_heap(collect_garbage=False)    # what loading freed, before the accumulators
    layers = manifest.layers
    cuda = transcoders.device.type == "cuda"
    pipeline = cuda if s.pipeline is None else s.pipeline
    groups = _layer_groups(layers, cuda if s.fuse_layers is None else s.fuse_layers)
    # On a CPU a layer's update runs between the encodes, its features split in
    # blocks over as many threads as torch's matmuls use (_FeatureBlocks); on a
    # GPU the encodes and updates run on a thread and stream of their own
    # beside the model's forward (forward.EncodeWorker).
    n_blocks = 1 if pipeline or any(len(g) > 1 for g in groups) else torch.get_num_threads()
    with _block_threads(n_blocks) as pool:
        accs = {}                                               # layer -> its (shared) accumulator
        for group in groups:
            sizes = [transcoders.d_sae(l) for l in group]
            common = (manifest.k, manifest.n_samples, np.asarray(manifest.histogram_edges), manifest.window,
                      manifest.seed, transcoders.device)
            acc = (_FeatureBlocks(group[0], sizes[0], *common, n_blocks, pool) if pool is not None
                   else _LayerAccumulator(group, sizes, *common))
            accs.update(dict.fromkeys(group, acc))
        done = 0
        ckpt = out / "checkpoint.pt"
        if ckpt.is_file():
            done = _load_checkpoint(ckpt, accs, layers, manifest.n_batches, transcoders.device)
        # One batch of layer inputs may wait for the worker ([tokens, d_model] each).
        worker = EncodeWorker(transcoders.device, max_pending=len(layers)) if pipeline else None
        try:
            reached = _run_batches(model, transcoders, out, manifest, groups, accs, done, s, worker)
        finally:
            if worker is not None:
                worker.close()
    if reached < manifest.n_batches:
        return None
    lock.check_held()                   # never finish into a folder another process took over
    # The heap pages the loop kept (steady_heap) go back before the sorted
    # copies of the statistics and the Parquet writers take theirs.
    release_free_heap(collect_garbage=False)

    # Arrow encodes and compresses without the GIL: the layers' tables are
    # written side by side. On a CPU each layer's sorted state is taken in its
    # own task, and its accumulator let go once it is (fused layers share one,
    # freed with the last), so the copies do not add up: all layers' together
    # are as large as the accumulators, ~0.9 GiB for GPT-2 small. On a GPU the
    # states are taken in turn, each copied to host memory at once: taken side
    # by side, all layers' sorted copies would be on the GPU together.
    from concurrent.futures import ThreadPoolExecutor

    # Each layer's files are hashed by the thread that wrote them (hashlib too
    # runs without the GIL): ~1 GB/s a thread, 0.3 s for GPT-2 small's 1M-token index in one.
    def write(layer, state=None) -> dict:
        if state is None:
            state = accs[layer].state(layer)
            del accs[layer]
        write_layer(out, layer, state, manifest.n_bins, manifest.seq_len, manifest.features_per_group)
        return file_checksums(out, layer_file_names(layer))
    checksums = file_checksums(out, ["tokens.parquet"])
    with ThreadPoolExecutor(max_workers=max(1, min(len(layers), os.cpu_count() or 1))) as pool:
        writes = [pool.submit(write, layer, _on_host(accs.pop(layer).state(layer)) if cuda else None)
                  for layer in layers]
        for w in writes:
            checksums.update(w.result())
    manifest.checksums = {name: checksums[name] for name in data_file_names(manifest)}
    manifest.complete = True
    manifest.built_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out / "manifest.json", manifest.to_json())
    if ckpt.exists():
        ckpt.unlink()
    return out


def _plan(model, transcoders: TranscoderSet, corpus: Corpus, n_tokens: int,
          s: IndexSettings) -> IndexManifest:
    """Check the arguments and describe the build: its manifest before it runs."""
    layers = as_transcoder_set(transcoders).select_layers(s.layers)
    if not layers:
        raise InvalidInputError("layers is empty: index at least one layer.")
    transcoders.check_fits(model)
    check_context(model, corpus.seq_len)
    for name in ("k", "n_samples", "batch_size", "checkpoint_every", "features_per_group"):
        if name == "checkpoint_every" and s.checkpoint_every is None:
            continue
        value = as_integer(getattr(s, name), name)
        if value < 1:
            raise InvalidInputError(f"{name} must be at least 1, got {value}.")
    if s.max_batches is not None and as_integer(s.max_batches, "max_batches") < 0:
        raise InvalidInputError(f"max_batches must be at least 0, got {s.max_batches}.")
    window = _check_window(s.window)
    seq_len, batch_size = corpus.seq_len, int(s.batch_size)
    total_sequences = as_integer(n_tokens, "n_tokens") // seq_len
    if total_sequences < 1:
        raise InvalidInputError(
            f"n_tokens={n_tokens} is less than one sequence of {seq_len} tokens.")
    if total_sequences * seq_len != n_tokens:
        # An index holds whole sequences; say so rather than index fewer tokens silently.
        warnings.warn(f"n_tokens={n_tokens} is not a whole number of {seq_len}-token sequences: "
                      f"indexing {total_sequences * seq_len} tokens ({total_sequences} sequences). "
                      f"Pass a multiple of {seq_len} to silence this.", stacklevel=4)
    for name in ("k", "n_samples"):
        if int(getattr(s, name)) > total_sequences * (seq_len - 1):
            raise InvalidInputError(
                f"{name}={getattr(s, name)} is more than the {total_sequences * (seq_len - 1)} tokens "
                "counted in this index: each feature keeps at most that many examples.")
    as_integer(s.seed, "seed")
    if total_sequences * seq_len >= 2 ** 32:
        raise InvalidInputError(
            f"n_tokens={n_tokens} is too large for one index (at most 2**32 tokens); build "
            "shards over parts of the corpus and keep them as separate indexes.")
    n_batches_total = -(-total_sequences // batch_size)
    if s.shard is None:
        first_batch, stop_batch = 0, n_batches_total
    else:
        i, n = s.shard if isinstance(s.shard, (tuple, list)) and len(s.shard) == 2 else (None, None)
        try:
            i, n = as_integer(i, "shard index"), as_integer(n, "shard count")
        except InvalidInputError:
            i = n = None
        if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
            raise InvalidInputError(f"shard must be (i, n) with 0 <= i < n, got {s.shard!r}.")
        first_batch, stop_batch = i * n_batches_total // n, (i + 1) * n_batches_total // n
    seq_start = first_batch * batch_size
    seq_stop = min(stop_batch * batch_size, total_sequences)
    try:
        edges = histogram_edges() if s.bins is None else np.asarray(s.bins, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"bins must be a list of numbers, got {s.bins!r:.80}.") from None
    if edges.ndim != 1 or len(edges) < 1 or not np.all(np.isfinite(edges)) or \
            np.any(np.diff(edges) <= 0) or edges[0] <= 0:
        raise InvalidInputError(f"bins must be increasing, finite, positive bin edges; got {s.bins!r:.80}.")
    return IndexManifest(
        format_version=FORMAT_VERSION, model=_model_name(model), transcoder_set=transcoders.name,
        transcoder_repo=transcoders.repo_id, revision=transcoders.revision,
        corpus=corpus.description, seq_len=seq_len, layers=layers,
        d_sae={layer: transcoders.d_sae(layer) for layer in layers},
        k=int(s.k), n_samples=int(s.n_samples), batch_size=int(batch_size),
        histogram_edges=[float(e) for e in edges], window=window,
        seed=int(s.seed), total_sequences=total_sequences, sequence_start=seq_start,
        sequence_stop=seq_stop, n_batches=stop_batch - first_batch,
        n_sequences=seq_stop - seq_start, n_tokens=(seq_stop - seq_start) * seq_len,
        n_tokens_counted=(seq_stop - seq_start) * (seq_len - 1),
        positions_counted="1..seq_len-1 (position 0, BOS, left out)",
        shard=[i, n] if s.shard is not None else None,
        features_per_group=int(s.features_per_group), tokens_rows_per_group=int(batch_size),
        fingerprints=_fingerprints(model, transcoders, layers, corpus, min(batch_size, total_sequences)))


def _check_window(window) -> tuple[int, int]:
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise InvalidInputError(f"window must be (before, after), two token counts; got {window!r:.80}.")
    before, after = (as_integer(w, "window") for w in window)
    if before < 0 or after < 0:
        raise InvalidInputError(f"window must be (before, after) with both at least 0, got {window!r}.")
    return before, after


def _fingerprints(model, transcoders: TranscoderSet, layers: Sequence[int], corpus: Corpus,
                  n_sequences: int) -> dict:
    """What the index is built from (compared on resume, merge and dashboards)."""
    first = corpus.take(n_sequences).numpy().astype(np.int64)
    return {"transcoders": {str(layer): transcoders.fingerprint(layer) for layer in layers},
            "model": model_fingerprint(model), "tokenizer": tokenizer_digest(getattr(model, "tokenizer", None)),
            "corpus": hashlib.sha256(np.ascontiguousarray(first).tobytes()).hexdigest()[:16]}


def fingerprint_mismatch(recorded: dict | None, current: dict | None) -> str | None:
    """A sentence saying what differs between two indexes' fingerprints (None:
    they match, or one predates fingerprints)."""
    if not recorded or not current:
        return None
    old_tc, new_tc = recorded.get("transcoders") or {}, current.get("transcoders") or {}
    for layer in sorted(set(old_tc) & set(new_tc), key=int):
        if old_tc[layer] != new_tc[layer]:
            return (f"the transcoder weights of layer {layer} differ (fingerprint {old_tc[layer]} "
                    f"then, {new_tc[layer]} now)")
    diff = fingerprint_difference(recorded.get("model"), current.get("model"))
    if diff:
        return diff
    for key, what in (("tokenizer", "the model's tokenizer"), ("corpus", "the corpus's first sequences")):
        if recorded.get(key) and current.get(key) and recorded[key] != current[key]:
            return f"{what} differ ({str(recorded[key])[:16]} then, {str(current[key])[:16]} now)"
    return None


def _run_batches(model, transcoders: TranscoderSet, out: Path, manifest: IndexManifest,
                 groups: list, accs: dict, done: int, s: IndexSettings, worker: EncodeWorker | None) -> int:
    """Fold batches ``done..`` into the accumulators, checkpointing; returns
    the number of batches done when it stops (all, or after ``max_batches``)."""
    import pyarrow.parquet as pq

    layers, seq_len, n_batches = manifest.layers, manifest.seq_len, manifest.n_batches
    group_of = {layer: group for group in groups for layer in group}
    tokens_file = pq.ParquetFile(out / "tokens.parquet")
    bar = _progress(n_batches, done, s.progress)
    nonfinite: dict = {}                                        # layer -> NaN/inf inputs (device counts)
    # On a CPU every layer is encoded into one reused buffer: each update runs
    # before the next layer is encoded, in the model's thread or in order on the worker.
    buffers = {} if reuses_buffers(transcoders.device) else None
    new_batches = 0
    last_saved, saved_at = done, time.monotonic()
    for b in range(done, n_batches):
        if s.max_batches is not None and new_batches >= s.max_batches:
            break
        toks = torch.from_numpy(_flat_windows(tokens_file.read_row_group(b).column("tokens"),
                                              seq_len).astype(np.int64))
        first_seq = manifest.sequence_start + b * manifest.batch_size
        first_token = first_seq * seq_len
        gtok = first_token + np.arange(toks.numel(), dtype=np.int64)
        token_key = torch.from_numpy(_token_hash(gtok, manifest.seed).reshape(toks.shape))
        toks = _to_device(toks, model_device(model))
        gathered = {id(group): {} for group in groups}         # group -> {layer: activations}

        def consume(layer, chunks, token_key=token_key, first_token=first_token, gathered=gathered):
            # In the model's thread, or the worker's (then on its stream: the
            # token keys are copied there, where they are used and freed).
            group = group_of[layer]
            got = gathered[id(group)]
            got[layer] = _activations(chunks, seq_len, len(token_key), dense_ok=len(group) == 1)
            if len(got) == len(group):                          # the group's last layer
                accs[group[0]].update([got.pop(l) for l in group], _to_device(token_key, transcoders.device),
                                      first_token)

        with torch.inference_mode():
            stream_encodings(model, transcoders, layers, toks, consume, nonfinite=nonfinite, buffers=buffers,
                             worker=worker)
        del gathered, consume
        new_batches += 1
        bar.update(1)
        due = ((b + 1) % s.checkpoint_every == 0 if s.checkpoint_every is not None
               else time.monotonic() - saved_at >= CHECKPOINT_SECONDS)
        if due and b + 1 < n_batches:
            if worker is not None:
                worker.wait()
            _save_checkpoint(out, b + 1, accs, nonfinite)
            last_saved, saved_at = b + 1, time.monotonic()
    if worker is not None:
        worker.wait()
    bar.close()
    reached = done + new_batches
    _refuse_non_finite(out, accs, nonfinite, reached)
    if reached < n_batches and reached > last_saved:
        _save_checkpoint(out, reached, accs, nonfinite)
    return reached


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` (on the current stream); to a GPU from
    pinned memory, without waiting: a copy from pageable memory waits for all
    work queued on the stream (once a batch the model's forward, and the worker's)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _activations(chunks, seq_len: int, n_seq: int, dense_ok: bool):
    """One layer's activations from ``stream_encodings``' chunks: the dense
    ``[n_seq, seq_len, d_sae]`` tensor if its first chunk holds all ``n_seq``
    sequences and ``dense_ok`` (a layer updated alone: its nonzeros are then
    found by the update), else its ``Entries``, taken from each chunk before
    the next is asked for (fused, all layers' dense activations would be
    gigabytes at GPU batch sizes; and a reused buffer holds a chunk only until
    the next one is encoded)."""
    parts = []
    for first_seq, acts in chunks:
        if dense_ok and first_seq == 0 and len(acts) == n_seq:
            return acts                                         # the one chunk
        parts.append(Entries.of(acts, first_row=first_seq * seq_len))
        del acts                        # in fresh memory (a GPU's), freed before the next chunk is encoded
    return Entries.cat(parts)


@contextmanager
def _block_threads(n: int):
    """A pool of ``n - 1`` threads for ``_FeatureBlocks`` updates of ``n``
    blocks (the calling thread takes one), each running torch on one thread
    (threads of their own each would oversubscribe the cores), or None for
    ``n <= 1``."""
    if n <= 1:
        yield None
        return
    from concurrent.futures import ThreadPoolExecutor
    outer = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="tc-index-block",
                              initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)
        # A worker's set_num_threads(1) is also the default of threads started
        # later: give the process back its setting.
        torch.set_num_threads(outer)


# -- merging -----------------------------------------------------------------------------
_SAME_IN_SHARDS = ("model", "transcoder_set", "revision", "corpus", "seq_len", "layers", "d_sae", "k",
                   "n_samples", "batch_size", "histogram_edges", "window", "seed", "total_sequences",
                   "features_per_group")


def merge_indexes(shards: Sequence[tuple[Path, IndexManifest]], out_dir: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Combine finished shards ``(directory, manifest)`` (same model,
    transcoders, corpus and settings; contiguous sequence ranges) into one
    index equal to a single build over their union; returns its directory."""
    overwrite = as_flag(overwrite, "overwrite")
    shards = sorted(shards, key=lambda s: s[1].sequence_start)
    if not shards:
        raise InvalidInputError("merge needs at least one shard directory.")
    first_dir, first = shards[0]
    first_json = first.to_json()
    for directory, m in shards[1:]:
        m_json = m.to_json()
        diff = [key for key in _SAME_IN_SHARDS if m_json.get(key) != first_json.get(key)]
        if diff:
            raise InvalidInputError(
                f"Shard {directory} differs from {first_dir} in {diff}; only shards "
                "of the same build settings can be merged.")
        differs = fingerprint_mismatch(first.fingerprints, m.fingerprints)
        if differs:
            raise FingerprintMismatchError(
                f"Shard {directory} was not built from what {first_dir} was: {differs}. Only shards "
                "of one build can be merged.")
    for (a_dir, a), (b_dir, b) in zip(shards, shards[1:]):
        if a.sequence_stop != b.sequence_start:
            raise InvalidInputError(
                f"Shards must cover contiguous sequence ranges: {a_dir} ends at sequence "
                f"{a.sequence_stop} but {b_dir} starts at {b.sequence_start}.")
    out = Path(os.path.abspath(out_dir))
    inputs = [Path(os.path.abspath(d)) for d, _ in shards]
    for d in inputs:
        if out == d and not overwrite:
            raise InvalidInputError(
                f"out_dir {out} is one of its inputs of the merge; pass overwrite=True to replace that "
                "shard by the merged index once the merge is complete, or choose another folder.")
        if out != d and (out.is_relative_to(d) or d.is_relative_to(out)):
            inner, outer = (out, d) if out.is_relative_to(d) else (d, out)
            raise InvalidInputError(
                f"The merge's out_dir {out} and its input {d} lie one inside the other ({inner} is "
                f"inside {outer}); choose an out_dir outside every input.")
    with FolderLock(out, "merge") as lock:
        _clean_after(lock, out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InvalidInputError(f"{out} is not empty; pass overwrite=True to replace it.")
        # Written elsewhere and swapped in when complete: out (possibly one of the
        # inputs) keeps its content until the merged index is whole.
        staging = _merge_staging(out, os.getpid())
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            _write_merged(shards, first_json, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        lock.check_held()
        _swap_in(staging, out)
    return out


def _write_merged(shards, first_json: dict, out: Path) -> None:
    _, first = shards[0]
    for layer in first.layers:
        state = None
        for directory, m in shards:
            st = read_layer_state(directory, m, layer)
            state = st if state is None else _merge_states(state, st)
        write_layer(out, layer, state, first.n_bins, first.seq_len, first.features_per_group)

    schema = tokens_schema(first.seq_len)

    digest = CorpusDigest()

    def token_groups():
        for directory, m in shards:
            files = index_files(directory, m, cache_size=1)
            f = files.file("tokens.parquet")
            for g in range(f.num_row_groups):
                with files.reading("tokens.parquet"):
                    group = f.read_row_group(g)
                digest.update(_flat_windows(group.column("tokens"), first.seq_len))
                yield group.cast(schema)
    atomic_write_parquet(out / "tokens.parquet", _regroup(token_groups(), first.tokens_rows_per_group),
                         schema)

    merged = IndexManifest.from_json(first_json)
    merged.sequence_stop = shards[-1][1].sequence_stop
    n_seq = merged.sequence_stop - merged.sequence_start
    merged.n_sequences, merged.n_tokens = n_seq, n_seq * merged.seq_len
    merged.n_tokens_counted = n_seq * (merged.seq_len - 1)
    merged.n_batches = sum(m.n_batches for _, m in shards)
    whole = merged.sequence_start == 0 and merged.sequence_stop == first.total_sequences
    merged.shard = None if whole else [str(directory) for directory, _ in shards]
    # Merged shards of a whole build make the index a single build makes, to the
    # byte (timestamp aside); a partial merge records its shards.
    merged.merged_from, merged.complete = (None if whole else len(shards)), True
    merged.fingerprints = {**(merged.fingerprints or {}), "corpus_tokens": {
        "sha256": digest.hexdigest(), "sequences": [merged.sequence_start, merged.sequence_stop]}}
    merged.checksums = file_checksums(out, data_file_names(merged))
    merged.built_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out / "manifest.json", merged.to_json())


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` folder at ``out`` (``integrity.replace_folder``:
    one atomic exchange on Linux; elsewhere two renames, a crash between
    which the next build or merge of ``out`` repairs when it takes over the
    dead process's lock and finds the folder set aside by its pid)."""
    replace_folder(staging, out, _merge_aside(out, os.getpid()))


def _merge_states(a: dict, b: dict) -> dict:
    out = {"n_firing": a["n_firing"] + b["n_firing"], "act_sum": a["act_sum"] + b["act_sum"],
           "hist": a["hist"] + b["hist"]}
    for kind in ("top", "samples"):
        d_sae, k = a[kind]["token"].shape
        best = _Best(d_sae, k, a[kind]["window"].shape[-1], "cpu")
        best.load(a[kind])
        other = b[kind]
        valid = other["token"] >= 0
        f = torch.arange(d_sae)[:, None].expand(-1, k)[valid]
        windows = other["window"][valid]
        # Shards are merged in sequence order, so every token of `other` comes
        # after every token of `best` and loses a tie at the threshold.
        keep = other["score"][valid] > best.threshold()[f]
        best.offer(f[keep], other["score"][valid][keep], other["token"][valid][keep],
                   other["act"][valid][keep], lambda idx, w=windows[keep]: w[idx])
        out[kind] = best.state()
    return out


# -- build helpers -----------------------------------------------------------------------
def _model_name(model) -> str:
    cfg = model.cfg
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "original_architecture", None)
               or type(model).__name__)


_RESUME_KEYS = ("format_version", "model", "transcoder_set", "revision", "corpus", "seq_len", "layers",
                "d_sae", "k", "n_samples", "batch_size", "histogram_edges", "window", "seed",
                "total_sequences", "sequence_start", "sequence_stop", "features_per_group")


def _prepare_out_dir(out: Path, manifest: IndexManifest, overwrite: bool) -> str:
    """Create ``out``, or check that what is there is this same build.
    Returns "new", "resume" or "complete"."""
    path = out / "manifest.json"
    new = manifest.to_json()
    if path.is_file() and not overwrite:
        old = read_manifest(out, "")
        diff = [key for key in _RESUME_KEYS if old.get(key) != new.get(key)]
        if diff:
            raise InvalidInputError(
                f"{out} holds an index built with different settings ({', '.join(diff)}). "
                "Use another out_dir, the same arguments to resume it, or overwrite=True.")
        differs = fingerprint_mismatch(old.get("fingerprints"), new.get("fingerprints"))
        if differs:
            state = "finished" if old.get("complete") else "unfinished"
            raise FingerprintMismatchError(
                f"{out} holds a {state} index of the same name and settings, but {differs}. "
                f"{'Resuming would mix two sets of weights in one index. ' if state == 'unfinished' else ''}"
                "Use the weights, tokenizer and corpus it was started with, another out_dir, or "
                "overwrite=True to start afresh.")
        return "complete" if old.get("complete") else "resume"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInputError(
                f"{out} is not empty and holds no feature index; pass overwrite=True or another out_dir.")
        _clear_folder(out)                  # its contents: the lock beside it stays ours
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**new, "complete": False})
    return "new"


def _write_tokens(out: Path, corpus: Corpus, start: int, n_sequences: int, rows: int,
                  d_vocab: int) -> None:
    """tokens.parquet: one row group per batch, written before the pass (and
    kept on resume), so a batch is a row group read back by number. Token ids
    outside the model's vocabulary are refused here, before any model pass."""
    import pyarrow as pa

    path = out / "tokens.parquet"
    if path.is_file():
        return None
    schema = tokens_schema(corpus.seq_len)
    got = [0]
    digest = CorpusDigest()

    def blocks():
        for batch in corpus.batches(rows, n_sequences, start):
            bad = (batch < 0) | (batch >= d_vocab)
            if bad.any():
                row = int(np.nonzero(bad.any(axis=1))[0][0])
                raise InvalidInputError(
                    f"Sequence {start + got[0] + row} of the corpus holds token ids outside the model's "
                    f"vocabulary 0..{d_vocab - 1}: {sorted(set(batch[bad].tolist()))[:5]}. Was it "
                    "tokenized for another model?")
            seq = np.arange(start + got[0], start + got[0] + len(batch), dtype=np.int64)
            got[0] += len(batch)
            digest.update(batch)
            yield pa.table({"sequence": seq, "tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(batch.reshape(-1).astype(np.int32)), corpus.seq_len)}, schema=schema)

    atomic_write_parquet(path, blocks(), schema)
    if got[0] < n_sequences:
        path.unlink()
        raise InvalidInputError(
            f"The corpus yields only {start + got[0]} sequences of {corpus.seq_len} tokens; "
            f"{start + n_sequences} are needed. Ask for fewer tokens or give a larger corpus.")
    return digest.hexdigest()


class CorpusDigest:
    """sha256 of token sequences fed in order, batch by batch (``[n, seq_len]``
    arrays, hashed as little-endian int32): the digest of every token an index
    was built from, whatever the batch size, so a single build and its merged
    shards record the same one."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, tokens) -> None:
        self._h.update(np.ascontiguousarray(tokens, dtype="<i4").tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _stored_token_batches(out: Path, seq_len: int) -> Iterable[np.ndarray]:
    """The token rows of ``out/tokens.parquet``, one ``[n, seq_len]`` array per row group."""
    import pyarrow.parquet as pq
    with reading(out / "tokens.parquet", "index file", "Delete the index folder (or pass "
                 "overwrite=True) to start this build afresh."):
        f = pq.ParquetFile(out / "tokens.parquet")
        for g in range(f.num_row_groups):
            yield _flat_windows(f.read_row_group(g).column("tokens"), seq_len)


def _check_resumed_corpus(out: Path, corpus: Corpus, manifest: IndexManifest) -> str:
    """Compare every sequence of the corpus a resumed build was given with the
    tokens its interrupted run stored (one read of the corpus; cheap for a
    ``Corpus.cached`` one). Refuses the first that differs; returns the digest
    of all of them."""
    start, seq_len = manifest.sequence_start, manifest.seq_len
    digest = CorpusDigest()
    fresh = corpus.batches(manifest.batch_size, manifest.n_sequences, start)
    seen = 0
    for stored in _stored_token_batches(out, seq_len):
        given = next(fresh, None)
        n = 0 if given is None else min(len(given), len(stored))
        differs = np.nonzero((np.asarray(given[:n]) != stored[:n]).any(axis=1))[0] if n else []
        if n < len(stored) or len(differs):
            where = start + seen + (int(differs[0]) if len(differs) else n)
            what = (f"sequence {where} of this corpus differs from the one it started with"
                    if len(differs) else f"this corpus ends before sequence {where}")
            raise FingerprintMismatchError(
                f"{out} holds an unfinished index whose first run stored the tokens it indexes; "
                f"{what} (sequences {start}..{where - 1} agree). Resuming would finish an index "
                "of that other corpus, not of this one. Resume with the corpus the build started "
                "with, or use another out_dir or overwrite=True to index this one.")
        digest.update(stored)
        seen += len(stored)
    return digest.hexdigest()


def _record_corpus_digest(out: Path, manifest: IndexManifest, digest: str) -> None:
    """``fingerprints["corpus_tokens"]``: the digest of every token the index is
    built from, kept in the manifest on disk (resumes read it back) and in
    ``manifest``, which the finished build writes."""
    record = {"sha256": digest, "sequences": [manifest.sequence_start, manifest.sequence_stop]}
    manifest.fingerprints = {**(manifest.fingerprints or {}), "corpus_tokens": record}
    on_disk = read_manifest(out, f"{out} lost its manifest.json during the build.")
    if (on_disk.get("fingerprints") or {}).get("corpus_tokens") != record:
        on_disk["fingerprints"] = {**(on_disk.get("fingerprints") or {}), "corpus_tokens": record}
        atomic_write_json(out / "manifest.json", on_disk)


def _refuse_non_finite(out: Path, accs: dict, nonfinite: dict, reached: int) -> None:
    """Refuse to checkpoint or finish a build whose model passes met NaN or
    infinite values (a model or transcoder overflowing, e.g. in float16):
    NaN inputs silently drop out of the statistics, infinite activations make
    every later mean and top example meaningless. The last checkpoint, before
    the batches at fault, stays; the message names the layer and batches."""
    m = read_manifest(out, f"{out} lost its manifest.json during the build.")
    saved = int(m.get("batches_done_hint") or 0)
    first_seq = m["sequence_start"] + saved * m["batch_size"]
    last_seq = min(m["sequence_start"] + reached * m["batch_size"], m["sequence_stop"]) - 1
    where = f"in batches {saved}..{reached - 1} of this build (sequences {first_seq}..{last_seq})"
    kept = f"keeps its checkpoint at batch {saved}" if saved else "has no checkpoint yet"
    stops = f"The build stops there; {out} {kept}. {NON_FINITE_REMEDY}"
    for layer in sorted(nonfinite):
        n = int(nonfinite[layer])
        if n:
            raise NonFiniteError(f"Layer {layer}'s transcoder input held {n} NaN or infinite values "
                                 f"{where}. {stops}")
    for layer, acc in accs.items():
        act_sum = acc.act_sum[acc.rows[layer]]                   # per feature, over all batches so far
        bad = ~torch.isfinite(act_sum)
        if bool(bad.any()):
            features = torch.nonzero(bad).flatten()[:5].tolist()
            raise NonFiniteError(
                f"Layer {layer}'s transcoder activations reached infinity {where}: {int(bad.sum())} "
                f"features have a non-finite activation sum (first {features}). {stops}")


def _save_checkpoint(out: Path, batches_done: int, accs: dict, nonfinite: dict) -> None:
    _refuse_non_finite(out, accs, nonfinite, batches_done)
    with atomic_write(out / "checkpoint.pt") as tmp:
        torch.save({"batches_done": batches_done,
                    "layers": {layer: _on_host(acc.state(layer)) for layer, acc in accs.items()}}, tmp)
    manifest = read_manifest(out, f"{out} lost its manifest.json during the build.")
    manifest["batches_done_hint"] = batches_done
    atomic_write_json(out / "manifest.json", manifest)


def _on_host(state: dict) -> dict:
    """An accumulator state with its tensors in host memory, so that the
    sorted copies of several layers never pile up on a GPU."""
    return {key: _on_host(v) if isinstance(v, dict) else v.cpu() for key, v in state.items()}


def _load_checkpoint(ckpt: Path, accs: dict, layers: list, n_batches: int, device) -> int:
    """Load a checkpoint into the accumulators; returns the batches it covers."""
    remedy = ("Delete it to restart this build from its first batch (or pass overwrite=True "
              "to start afresh).")
    with reading(ckpt, "checkpoint", remedy):
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        done = int(saved["batches_done"])
        if not 0 <= done <= n_batches:
            raise ValueError(f"batches_done={done} is outside 0..{n_batches}")
        for layer in layers:
            accs[layer].load(saved["layers"][layer], layer)
    return done


def _clear_folder(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _undo_new_folder(out: Path, created: bool) -> None:
    """Remove what a build start that failed had made."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    else:
        for name in ("manifest.json", "tokens.parquet"):
            (out / name).unlink(missing_ok=True)


def _clean_after(lock: FolderLock, out: Path) -> None:
    """After taking over a dead process's lock: remove its temporary files
    (``*.<pid>.tmp`` in the folder, a merge's staging folder beside it), and
    put back a folder it had moved aside mid-swap."""
    dead = lock.stale_holder
    if not dead or not isinstance(dead.get("pid"), int):
        return
    pid = dead["pid"]
    if out.is_dir():
        for tmp in out.rglob(f"*.{pid}.tmp"):
            tmp.unlink(missing_ok=True)
    staging, aside = _merge_staging(out, pid), _merge_aside(out, pid)
    if aside.exists():
        if out.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, out)
    shutil.rmtree(staging, ignore_errors=True)


def _merge_staging(out: Path, pid: int) -> Path:
    return out.with_name(f".{out.name}.merging-{pid}")


def _merge_aside(out: Path, pid: int) -> Path:
    return out.with_name(f".{out.name}.replaced-{pid}")


def _regroup(tables: Iterable, rows: int):
    """Re-cut a stream of arrow tables into tables of ``rows`` rows."""
    import pyarrow as pa
    pending = []
    n = 0
    for t in tables:
        pending.append(t)
        n += t.num_rows
        while n >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(pending)


def _progress(total: int, initial: int, enabled: bool | None):
    return progress_bar(total=total, initial=initial, desc="indexing", unit="batch", progress=enabled)
