"""FeatureIndex: what every transcoder feature does on a corpus, from one pass.

``FeatureIndex.build`` runs the model once per batch of token sequences (with
``run_with_cache`` restricted to the transcoders' input hooks), encodes every
selected layer's transcoder on it and folds the activations into per-layer
accumulators, vectorised over features:

* top-k examples per feature: (sequence, position, activation) plus the
  feature's activations on a context window around the token, so dashboards
  highlight context without running the model again;
* a uniform random sample of each feature's firing tokens (a bottom-k sketch
  over a hash of (token, feature)), from which quantile bands are drawn for
  interval views;
* an activation histogram over fixed log-spaced bins, firing count, sum, max.

Every accumulator is an exact, order-independent function of the set of
tokens seen: top-k ties are broken by global token index, and sample keys
come from a hash of the global token index, not from a random stream. That
is what makes a resumed build, and shards merged with ``FeatureIndex.merge``,
equal to one uninterrupted build. Memory is O(d_sae * (k + n_samples)) per
layer plus one batch of activations.

Position 0 of every sequence (BOS with no context) is left out of all
statistics: its activations are identical in every sequence and would fill
every feature's top-k with copies of one example.

On disk (``out_dir``)::

    manifest.json                       model, transcoder set, corpus, tokens, k, bins, layers
    tokens.parquet                      sequence, tokens (fixed_size_list<int32>[seq_len])
    layer_{LL}/stats.parquet            feature, n_firing, act_sum, max, histogram
    layer_{LL}/top.parquet              feature, rank, sequence, position, activation, window
    layer_{LL}/samples.parquet          feature, sequence, position, activation, priority, window
    weight_views/                       optional, see tc_explore.weight_views
    checkpoint.pt                       only while a build is unfinished

``window`` is the feature's activation on the tokens around the indexed one,
``window[0]`` at position - before: fixed_size_binary of little-endian float16
values (``np.frombuffer(value, "<f2")``; ``FeatureIndex.table`` decodes it).

Per-layer tables are written in row groups of ``features_per_group``
features, so opening one feature reads one small row group.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .corpus import Corpus, as_corpus
from .errors import InvalidInputError, TcExploreError
from .model import check_context, model_device
from .transcoder import TranscoderSet

# 2: windows stored as fixed-size binary (little-endian float16 values), not
#    list<float16>: Parquet's per-element list levels made writing them the
#    slowest part of finishing a build.
FORMAT_VERSION = 2
TABLES = ("stats", "top", "samples")


class IndexIncompleteError(TcExploreError):
    """An index directory whose build has not finished (resume it with build)."""


# -- bins and hashes ---------------------------------------------------------------------
def histogram_edges(low: float = 1e-3, high: float = 1e3, per_decade: int = 8) -> np.ndarray:
    """Log-spaced bin edges. Bin 0 holds firing activations below ``low``,
    bin i holds ``edges[i-1] <= a < edges[i]``, the last bin ``a >= high``;
    non-firing tokens (activation 0) are not in the histogram (they are
    ``n_tokens - n_firing``)."""
    n = int(round(math.log10(high / low) * per_decade)) + 1
    return np.logspace(math.log10(low), math.log10(high), n)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (splitmix64's finaliser), wrapping arithmetic."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _unit_hash(x: np.ndarray, salt: int) -> np.ndarray:
    """Uniform floats in [0, 1) from integers, a different stream per salt."""
    h = _splitmix64(np.asarray(x, dtype=np.uint64) ^ _splitmix64(np.array([salt], dtype=np.uint64)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _token_hash(global_tokens: np.ndarray, seed: int) -> np.ndarray:
    return _unit_hash(global_tokens, 2 * seed + 1)


def _feature_hash(layer: int, d_sae: int, seed: int) -> np.ndarray:
    return _unit_hash(np.arange(d_sae, dtype=np.uint64) + (np.uint64(layer) << np.uint64(32)), 2 * seed + 2)


# -- accumulators -----------------------------------------------------------------------
# Hot path: every batch of every layer. On CPU, 1-D gathers use index_select
# (several times cheaper than advanced indexing) and 1-D sorts use numpy's
# (several times cheaper than torch's); see benchmarks/bench_accumulator.py.
def _argsort(key: torch.Tensor, stable: bool = False) -> torch.Tensor:
    """Indices that sort a 1-D tensor ascending (ties in input order if ``stable``)."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.argsort(key.numpy(), kind="stable" if stable else None))
    return torch.sort(key, stable=stable).indices


def _lex_order(f: torch.Tensor, score: torch.Tensor, token: torch.Tensor,
               tokens_ascending: bool = False) -> torch.Tensor:
    """Permutation sorting by feature asc, score desc, token asc.

    One stable sort of an int64 key (feature in the high 32 bits, the score's
    float bits inverted in the low 32: for positive floats the bit pattern is
    monotone), after a stable sort by token unless the tokens already ascend
    among candidates of one feature (as a batch's candidates do)."""
    order = None if tokens_ascending else _argsort(token, stable=True)
    f_o = f if order is None else f.index_select(0, order)
    s_o = score if order is None else score.index_select(0, order)
    bits = s_o.float().view(torch.int32).to(torch.int64)       # scores are > 0
    key = (f_o.to(torch.int64) << 32) | (0x7FFFFFFF - bits)
    by_key = _argsort(key, stable=True)
    return by_key if order is None else order.index_select(0, by_key)


def _segment_starts(sorted_keys: torch.Tensor) -> torch.Tensor:
    """[n] bool: True where a run of equal keys begins (keys sorted)."""
    start = torch.ones_like(sorted_keys, dtype=torch.bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return start


def _ranks_in_segments(sorted_keys: torch.Tensor) -> torch.Tensor:
    """Rank of each element within its run of equal keys (keys sorted): its
    index minus the running max of run-start indices (linear, no search)."""
    i = torch.arange(sorted_keys.numel(), device=sorted_keys.device)
    first = torch.where(_segment_starts(sorted_keys), i, 0).cummax(0).values
    return i - first


def _nonzero_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the nonzero entries of a 2-D tensor, row-major.

    On CPU numpy's ``!=`` and ``flatnonzero`` are several times faster than
    torch's comparison and ``nonzero`` (and its division by a scalar, through
    libdivide); this one dense pass over the batch would otherwise cost more
    than the rest of the update."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.float32, torch.float64):
        idx = np.flatnonzero(x.detach().numpy() != 0)
        row = idx // x.shape[1]
        return torch.from_numpy(row), torch.from_numpy(idx - row * x.shape[1])
    return (x != 0).nonzero(as_tuple=True)


def _context_windows(seg: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor, before: int,
                     after: int, dtype: torch.dtype) -> torch.Tensor:
    """``[nnz, before + 1 + after]`` windows of nonzero activations: the
    feature's activations at positions -before..+after around each, zero
    elsewhere and outside its sequence. Entries are sorted by ``seg`` (feature
    and sequence), then by ``pos`` (distinct within a segment).

    Built from the nonzeros alone rather than gathered from the dense batch,
    where each window element is a cache miss (d_sae * 4 bytes from the last):
    the entries within D = max(before, after) positions after entry i in its
    segment are among entries i+1..i+D."""
    nnz, width, reach = seg.numel(), before + 1 + after, max(before, after)
    win = torch.zeros(nnz + 1, width, dtype=dtype, device=seg.device)   # + a spare row, see below
    win[:nnz, before] = vals.to(dtype)
    if reach == 0 or nnz < 2:
        return win[:nnz]
    # Entry i has a neighbour within reach only if entry i+1 is one (positions
    # ascend within a segment), which few are: test i+1..i+D for those only.
    near = ((seg[1:] == seg[:-1]) & (pos[1:] - pos[:-1] <= reach)).nonzero().squeeze(1)   # [N]
    j = near[:, None] + torch.arange(1, reach + 1, device=seg.device)   # [N, D] candidate partners
    valid = j < nnz
    j = j.clamp(max=nnz - 1)
    gap = pos[j] - pos[near, None]                              # [N, D] positions apart
    n, d = (valid & (seg[j] == seg[near, None]) & (gap <= reach)).nonzero(as_tuple=True)
    i, j, gap = near.index_select(0, n), j[n, d], gap[n, d]    # [P] pairs i < j within reach
    # j goes into i's window if gap <= after, i into j's if gap <= before. Pairs
    # that do not are written to the spare row instead of being masked out
    # (boolean masks cost a host sync each on CUDA).
    flat, spare = win.view(-1), nnz * width
    flat[torch.where(gap <= after, i * width + before + gap, spare)] = vals.index_select(0, j).to(dtype)
    flat[torch.where(gap <= before, j * width + before - gap, spare)] = vals.index_select(0, i).to(dtype)
    return win[:nnz]


class _Best:
    """For every feature, the ``k`` best entries by score (desc), ties by token (asc).

    Dense ``[d_sae, k]`` tensors, kept *unsorted* within a row while streaming:
    a merge then writes only the slots it evicts (no row is shifted or
    rewritten, which in the early batches, when nearly every feature takes new
    entries, cost more than the encoding itself). ``state()`` returns the rows
    sorted. Empty slots have score 0 and token -1 (every real score is > 0, so
    an empty slot always loses); the row minimum is the k-th best score, a
    per-feature threshold that filters a batch's candidates before sorting.

    Internal caches: ``_key`` is ``_goodness`` of every slot (one int64
    comparison per slot instead of three), ``_filled`` the number of non-empty
    slots per row. Empty slots are filled in order and never reappear, so a
    row's filled slots are always a prefix (also after ``load``: ``state()``
    puts empty slots last).
    """

    def __init__(self, d_sae: int, k: int, window: int, device):
        self.k = k
        self.score = torch.zeros(d_sae, k, dtype=torch.float32, device=device)
        self.token = torch.full((d_sae, k), -1, dtype=torch.int64, device=device)
        self.act = torch.zeros(d_sae, k, dtype=torch.float32, device=device)
        self.window = torch.zeros(d_sae, k, window, dtype=torch.float16, device=device)
        self._threshold = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self._key = self._goodness(self.score, self.token)
        self._filled = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def threshold(self) -> torch.Tensor:
        return self._threshold

    @staticmethod
    def _goodness(score: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """An int64 key per entry that orders by score, then by lower token:
        the score's float bits (monotone for non-negative floats) above the
        inverted low 32 bits of the token. Exact for corpora under 2**32 tokens
        (build() checks); all empty slots share the lowest key, 0; every real
        entry's key is >= 2**32."""
        bits = score.float().view(torch.int32).to(torch.int64)            # scores are >= 0
        return (bits << 32) | (0xFFFFFFFF - (token & 0xFFFFFFFF))

    @staticmethod
    def _worst_first(score: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """[rows, k] slot order from worst to best: score asc, then token desc."""
        return torch.argsort(_Best._goodness(score, token), dim=1)

    def offer(self, f: torch.Tensor, score: torch.Tensor, token: torch.Tensor, act: torch.Tensor,
              window_of, tokens_ascending: bool = False) -> None:
        """Merge candidates (all with score at least their feature's threshold).
        ``window_of(idx)`` returns ``[len(idx), window]`` context activations of
        candidates ``idx``; it is called only for candidates that are kept.

        A candidate is kept if fewer than k entries beat it: (state entries
        that beat it) + (candidates of its feature that beat it) < k. The m
        kept candidates of a feature displace exactly its m worst entries, so
        only those slots are written."""
        if f.numel() == 0:
            return
        k = self.k
        order = _lex_order(f, score, token, tokens_ascending)       # [C] by feature, best first
        f = f.index_select(0, order)
        key = self._goodness(score.index_select(0, order), token.index_select(0, order))  # [C]
        rank = _ranks_in_segments(f)                                # [C] among the feature's candidates
        # At most the row's filled slots can beat a candidate: one with
        # rank + filled < k is kept without looking at the row (in the first
        # batches, while rows fill, nearly all are), one with rank >= k is not.
        # Only the rest are compared with all k slots of their row.
        keep = rank + self._filled.index_select(0, f) < k           # [C]
        doubt = ((rank < k) & ~keep).nonzero().squeeze(1)          # [D]
        if doubt.numel():
            row_key = self._key.index_select(0, f.index_select(0, doubt))        # [D, k]
            beaten = (row_key > key.index_select(0, doubt)[:, None]).sum(1, dtype=torch.int32)  # [D]
            keep[doubt] = rank.index_select(0, doubt) + beaten < k
        kept = keep.nonzero().squeeze(1)                            # [C']
        if kept.numel() == 0:
            return
        f, key, src = f.index_select(0, kept), key.index_select(0, kept), order.index_select(0, kept)
        # Kept candidates of a feature are its best ones, so they stay contiguous
        # and in rank order after the mask: j-th kept candidate -> j-th worst slot,
        # which is the j-th empty slot while there is one (empties, the worst,
        # follow the filled prefix).
        j = _ranks_in_segments(f)                                   # [C']
        slot = self._filled.index_select(0, f) + j                  # [C']
        evict = (slot >= k).nonzero().squeeze(1)                    # [E] displace a real entry
        if evict.numel():
            # The j-th worst slot of the row (its empties first; keys are unique
            # within a row except identical empty slots, so this is exact). Once
            # rows are full nearly every evicting candidate has j == 0: the row's
            # argmin, a fraction of the cost of a topk.
            ev_f, ev_j = f.index_select(0, evict), j.index_select(0, evict)
            ev_slot = self._key.index_select(0, ev_f).argmin(dim=1)            # [E], right for j == 0
            more = (ev_j > 0).nonzero().squeeze(1)                  # [M]
            if more.numel():
                # A topk over each such row once (a dense feature can have k evictors).
                m_f, m_j = ev_f.index_select(0, more), ev_j.index_select(0, more)
                start = _segment_starts(m_f)
                rows, row_of = m_f[start], start.cumsum(0) - 1      # [R] their rows, [M] index in rows
                worst = torch.topk(self._key.index_select(0, rows), int(m_j.max()) + 1, dim=1,
                                   largest=False, sorted=True).indices         # [R, m_max]
                ev_slot[more] = worst[row_of, m_j]
            slot[evict] = ev_slot
        at = f * k + slot                                           # [C'] flat slot each one takes
        self._key.view(-1).index_copy_(0, at, key)
        self.score.view(-1).index_copy_(0, at, score.index_select(0, src).to(self.score.dtype))
        self.token.view(-1).index_copy_(0, at, token.index_select(0, src))
        self.act.view(-1).index_copy_(0, at, act.index_select(0, src).to(self.act.dtype))
        self.window.view(-1, self.window.shape[-1]).index_copy_(
            0, at, window_of(src).to(self.window.dtype))
        self._filled.index_add_(0, f, torch.ones_like(f)).clamp_(max=k)
        # Row minima of all rows: one pass over [d_sae, k], about as cheap on CPU
        # as finding the rows that changed, and free of host syncs on CUDA.
        torch.amin(self.score, dim=1, out=self._threshold)

    def state(self, rows: slice = slice(None)) -> dict:
        """Rows (all, or a slice) sorted best first (score desc, token asc), as
        written to disk."""
        score, token = self.score[rows], self.token[rows]
        order = torch.flip(self._worst_first(score, token), dims=[1])
        width = self.window.shape[-1]
        return {"score": score.gather(1, order), "token": token.gather(1, order),
                "act": self.act[rows].gather(1, order),
                "window": self.window[rows].gather(1, order[..., None].expand(-1, -1, width))}

    def load(self, state: dict, rows: slice = slice(None)) -> None:
        """Load a ``state()`` into all rows or a slice (rows best first, so empty slots last)."""
        for name, t in state.items():
            getattr(self, name)[rows] = t
        self._threshold[rows] = self.score[rows].min(dim=1).values
        self._key[rows] = self._goodness(self.score[rows], self.token[rows])
        self._filled[rows] = (self.token[rows] >= 0).sum(dim=1)


class _LayerAccumulator:
    """Everything the index keeps for one layer, or for several layers fused,
    while it streams.

    Fused (``layer`` and ``d_sae`` sequences), the layers' features are rows
    of one set of tensors, and ``update`` takes their activations concatenated
    along the feature axis. Every statistic is per feature, so the result is the
    same as separate accumulators'; on CUDA, where an update is bound by its
    ~400 kernel launches rather than by arithmetic, one update for all layers
    instead of one per layer removes most of the index's overhead."""

    def __init__(self, layer: int | Sequence[int], d_sae: int | Sequence[int], k: int, n_samples: int,
                 edges: np.ndarray, window: tuple[int, int], seed: int, device):
        layers = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
        sizes = [d_sae] if isinstance(d_sae, (int, np.integer)) else list(d_sae)
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.rows = {l: slice(starts[i], starts[i + 1]) for i, l in enumerate(layers)}
        d_sae = int(starts[-1])                                     # rows of all layers
        self.before, self.after = window
        w = self.before + self.after + 1
        self.top = _Best(d_sae, k, w, device)
        self.samples = _Best(d_sae, n_samples, w, device)
        self.edges = torch.as_tensor(edges, dtype=torch.float32, device=device)
        self.n_bins = len(edges) + 1
        self.n_firing = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae * self.n_bins, dtype=torch.int64, device=device)
        self.feature_key = torch.as_tensor(np.concatenate(
            [_feature_hash(l, n, seed) for l, n in zip(layers, sizes)]), device=device)

    def update(self, acts: torch.Tensor, token_key: torch.Tensor, first_token: int) -> None:
        """Fold in ``acts [n_seq, seq_len, d_sae]`` of consecutive sequences whose
        first token has global index ``first_token``; ``token_key [n_seq, seq_len]``
        is the hash of each token's global index."""
        n_seq, seq_len, d_sae = acts.shape
        n_tok = n_seq * seq_len
        flat = acts.reshape(-1)                                     # a view: acts is contiguous
        # Every nonzero activation once, feature-major (a feature's entries
        # contiguous and in token order): the order of a batch's candidates.
        row, f = _nonzero_2d(acts.reshape(n_tok, d_sae))            # [nnz] row-major
        vals = flat.index_select(0, row * d_sae + f)                # [nnz]
        fr = f * n_tok + row                                        # [nnz] distinct
        order = _argsort(fr)
        fr, row, f, vals = (t.index_select(0, order) for t in (fr, row, f, vals))
        # Position in the sequence by table look-up (integer division is slow on CPU).
        pos = (torch.arange(n_tok, device=row.device) % seq_len).index_select(0, row)
        # Context windows of all of them, built once for top-k and samples alike
        # (from every nonzero: position 0 and non-positive values show in windows);
        # fr - pos = feature * n_tok + first row of the sequence names the segment.
        windows = _context_windows(fr - pos, pos, vals, self.before, self.after,
                                   self.top.window.dtype)           # [nnz, w]
        # The firing entries that count: activation > 0, position 0 (BOS) left out.
        e = ((vals > 0) & (pos != 0)).nonzero().squeeze(1)          # [n] entry ids
        row, f, vals = row.index_select(0, e), f.index_select(0, e), vals.index_select(0, e)
        token = first_token + row                                   # [n] global token index

        ones = torch.ones_like(f)
        self.n_firing.index_add_(0, f, ones)
        self.act_sum += torch.bincount(f, weights=vals.double(), minlength=d_sae)   # batch sums first
        bins = torch.bucketize(vals, self.edges, right=True)
        self.hist.index_add_(0, f * self.n_bins + bins, ones)      # no [d_sae * n_bins] temporary

        def offer(best: _Best, score: torch.Tensor) -> None:
            # >=: a token tied with the row minimum can still win the tie on
            # token order if batches come out of order (build feeds them in order).
            cand = (score >= best.threshold().index_select(0, f)).nonzero().squeeze(1)
            c_e = e.index_select(0, cand)                           # candidates' entry ids
            best.offer(f.index_select(0, cand), score.index_select(0, cand),
                       token.index_select(0, cand), vals.index_select(0, cand),
                       lambda i: windows.index_select(0, c_e.index_select(0, i)),
                       tokens_ascending=True)

        offer(self.top, vals)
        # Sample priority 1 - frac(a_token + b_feature): for one feature the order
        # over tokens is a uniform random permutation, so the n_samples highest
        # priorities are a uniform sample of its firing tokens, reproducibly.
        key = (token_key.reshape(-1).index_select(0, row)
               + self.feature_key.index_select(0, f)).remainder_(1.0)
        offer(self.samples, (1.0 - key).float())

    def _layer_rows(self, layer) -> slice:
        if layer is None:
            if len(self.rows) != 1:
                raise ValueError("a fused accumulator needs the layer")
            return next(iter(self.rows.values()))
        return self.rows[layer]

    def state(self, layer: int | None = None) -> dict:
        """One layer's statistics (the only layer's if not fused)."""
        r = self._layer_rows(layer)
        bins = slice(r.start * self.n_bins, r.stop * self.n_bins)
        return {"top": self.top.state(r), "samples": self.samples.state(r),
                "n_firing": self.n_firing[r], "act_sum": self.act_sum[r], "hist": self.hist[bins]}

    def load(self, state: dict, layer: int | None = None) -> None:
        r = self._layer_rows(layer)
        self.top.load(state["top"], r)
        self.samples.load(state["samples"], r)
        self.n_firing[r] = state["n_firing"]
        self.act_sum[r] = state["act_sum"]
        self.hist[r.start * self.n_bins:r.stop * self.n_bins] = state["hist"]


# -- parquet helpers --------------------------------------------------------------------
def _atomic_write_parquet(path: Path, blocks: Iterable, schema) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    # No dictionary encoding: activations and windows hardly repeat, and trying it
    # doubled both the write and the read of a row group. LZ4 rather than zstd:
    # files about 1.5x larger, written twice and read 1.5x as fast.
    with pq.ParquetWriter(tmp, schema, compression="lz4", use_dictionary=False) as writer:
        for table in blocks:
            writer.write_table(table)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _windows_array(w: np.ndarray):
    """``[n, width]`` -> fixed_size_binary(2 * width): each row's float16 values,
    little-endian, back to back (``np.frombuffer(value, "<f2")`` reads one)."""
    import pyarrow as pa
    n, width = w.shape
    data = np.ascontiguousarray(w, dtype="<f2")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * width), n, [None, pa.py_buffer(data)])


def _window_values(column, width: int) -> np.ndarray:
    """Inverse of _windows_array for a (chunked) column: ``[n, width]`` float16."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(arr) == 0:
        return np.zeros((0, width), np.float16)
    return np.frombuffer(arr.buffers()[1], dtype="<f2", count=len(arr) * width,
                         offset=arr.offset * 2 * width).reshape(-1, width).astype(np.float16)


def _best_blocks(best: dict, seq_len: int, group: int, kind: str):
    """Arrow tables (one per block of ``group`` features, possibly empty) of a
    _Best state: the columns are built once for the layer and cut by zero-copy
    slices (per-block numpy work cost more than the Parquet encoding)."""
    import pyarrow as pa

    score, token = best["score"].cpu().numpy(), best["token"].cpu().numpy()
    act, window = best["act"].cpu().numpy(), best["window"].cpu().numpy()
    d_sae, k = token.shape
    valid = token >= 0
    feat, rank = np.nonzero(valid)                              # feature-major, rank ascending
    tok = token[valid]
    cols = {"feature": feat.astype(np.int32), "rank": rank.astype(np.int32),
            "sequence": tok // seq_len, "position": (tok % seq_len).astype(np.int32),
            "activation": act[valid].astype(np.float32)}
    if kind == "samples":
        cols["priority"] = score[valid].astype(np.float32)
    cols["window"] = _windows_array(window[valid])
    table = pa.table(cols)
    bounds = np.searchsorted(feat, np.arange(0, d_sae + group, group).clip(max=d_sae))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield table.slice(int(lo), int(hi - lo))


def _best_schema(kind: str, width: int):
    import pyarrow as pa
    fields = [("feature", pa.int32()), ("rank", pa.int32()), ("sequence", pa.int64()),
              ("position", pa.int32()), ("activation", pa.float32())]
    if kind == "samples":
        fields.append(("priority", pa.float32()))
    fields.append(("window", pa.binary(2 * width)))
    return pa.schema(fields)


def _stats_schema(n_bins: int):
    import pyarrow as pa
    return pa.schema([("feature", pa.int32()), ("n_firing", pa.int64()), ("act_sum", pa.float64()),
                      ("max", pa.float32()), ("histogram", pa.list_(pa.int64(), n_bins))])


def _stats_blocks(state: dict, n_bins: int, group: int):
    import pyarrow as pa

    n_firing = state["n_firing"].cpu().numpy()
    d_sae = len(n_firing)
    hist = state["hist"].cpu().numpy().reshape(-1)
    table = pa.table({"feature": np.arange(d_sae, dtype=np.int32), "n_firing": n_firing,
                      "act_sum": state["act_sum"].cpu().numpy(),
                      "max": state["top"]["act"].cpu().numpy()[:, 0].astype(np.float32),
                      "histogram": pa.FixedSizeListArray.from_arrays(pa.array(hist), n_bins)})
    for start in range(0, d_sae, group):
        yield table.slice(start, min(group, d_sae - start))


def _best_from_table(table, d_sae: int, k: int, width: int, seq_len: int, kind: str) -> dict:
    """Inverse of _best_blocks: dense [d_sae, k] state from a table."""
    feat = table.column("feature").to_numpy().astype(np.int64)
    rank = table.column("rank").to_numpy().astype(np.int64)
    token = table.column("sequence").to_numpy() * seq_len + table.column("position").to_numpy()
    act = table.column("activation").to_numpy()
    score = table.column("priority").to_numpy() if kind == "samples" else act
    window = _window_values(table.column("window"), width)
    best = _Best(d_sae, k, width, "cpu")
    best.score[feat, rank] = torch.from_numpy(score.astype(np.float32))
    best.token[feat, rank] = torch.from_numpy(token.astype(np.int64))
    best.act[feat, rank] = torch.from_numpy(act.astype(np.float32))
    best.window[feat, rank] = torch.from_numpy(window.astype(np.float16))
    return best.state()


def _flat_windows(column, width: int) -> np.ndarray:
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, width)


# -- the index --------------------------------------------------------------------------
@dataclass
class TopExample:
    """One indexed token: where it is and the feature's activation around it."""
    sequence: int
    position: int
    activation: float
    window_start: int             # position of window_acts[0] in the sequence
    window_acts: np.ndarray       # [window] activations of the feature (float16 precision)


class FeatureIndex:
    """A built index directory, opened lazily: nothing but the manifest is
    read until a layer's table or a token sequence is asked for."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            raise InvalidInputError(f"{self.directory} is not a feature index (no manifest.json).")
        self.manifest = json.loads(path.read_text(encoding="utf-8"))
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidInputError(
                f"The index in {self.directory} has format version {version}; this tc_explore reads "
                f"version {FORMAT_VERSION}. Rebuild it with FeatureIndex.build(..., overwrite=True).")
        if not self.manifest.get("complete"):
            done = self.manifest.get("batches_done_hint", "?")
            raise IndexIncompleteError(
                f"The index in {self.directory} is unfinished ({done} of "
                f"{self.manifest['n_batches']} batches checkpointed). Run FeatureIndex.build "
                "again with the same arguments and out_dir to resume it.")
        self.edges = np.asarray(self.manifest["histogram_edges"])
        self._files: dict = {}
        self._blocks = lru_cache(maxsize=256)(self._read_block)
        self._token_groups = lru_cache(maxsize=64)(self._read_token_group)

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FeatureIndex":
        return cls(directory)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def n_tokens(self) -> int:
        """Tokens counted in the statistics (position 0 of each sequence excluded)."""
        return int(self.manifest["n_tokens_counted"])

    def d_sae(self, layer: int) -> int:
        return int(self.manifest["d_sae"][str(self.check_layer(layer))])

    def check_layer(self, layer) -> int:
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            raise InvalidInputError(f"layer must be an integer, got {layer!r}.") from None
        if layer not in self.manifest["layers"]:
            raise InvalidInputError(
                f"Layer {layer} is not in this index; it covers layers {self.layers}.")
        return layer

    def check_feature(self, layer, feature) -> tuple[int, int]:
        layer = self.check_layer(layer)
        d = int(self.manifest["d_sae"][str(layer)])
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < d:
            raise InvalidInputError(
                f"feature {feature!r} is out of range for layer {layer}: the index covers "
                f"{d} features (0..{d - 1}).")
        return layer, int(feature)

    # -- reading -----------------------------------------------------------------------
    def _path(self, layer: int, name: str) -> Path:
        return self.directory / f"layer_{layer:02d}" / f"{name}.parquet"

    def _file(self, path: Path):
        """An open ParquetFile per table: its footer is parsed once, not per read."""
        file = self._files.get(path)
        if file is None:
            import pyarrow.parquet as pq
            file = self._files[path] = pq.ParquetFile(path)
        return file

    def _read_block(self, layer: int, name: str, block: int):
        return self._file(self._path(layer, name)).read_row_group(block, use_threads=False)

    def _feature_rows(self, layer: int, feature: int, name: str):
        layer, feature = self.check_feature(layer, feature)
        block = self._blocks(layer, name, feature // int(self.manifest["features_per_group"]))
        feats = block.column("feature").to_numpy()
        lo, hi = np.searchsorted(feats, feature), np.searchsorted(feats, feature, side="right")
        return block.slice(lo, hi - lo)

    def table(self, layer: int, name: str):
        """A whole per-layer table (``"stats"``, ``"top"`` or ``"samples"``) as a
        pandas DataFrame, for queries across features (windows decoded to float16
        arrays)."""
        import pyarrow.parquet as pq
        if name not in TABLES:
            raise InvalidInputError(f"table must be one of {TABLES}, got {name!r}.")
        table = pq.read_table(self._path(self.check_layer(layer), name))
        if "window" not in table.column_names:
            return table.to_pandas()
        frame = table.drop_columns(["window"]).to_pandas()
        frame["window"] = list(_window_values(table.column("window"), sum(self.manifest["window"]) + 1))
        return frame

    def feature_stats(self, layer: int, feature: int) -> dict:
        """``n_firing``, ``frequency`` (of counted tokens), ``max``, ``mean`` (over
        firing tokens), ``histogram`` (counts per bin of ``edges``)."""
        rows = self._feature_rows(layer, feature, "stats")
        n = int(rows.column("n_firing")[0].as_py())
        s = float(rows.column("act_sum")[0].as_py())
        hist = np.asarray(rows.column("histogram")[0].as_py(), dtype=np.int64)
        return {"n_firing": n, "frequency": n / max(1, self.n_tokens),
                "max": float(rows.column("max")[0].as_py()), "mean": s / n if n else 0.0,
                "histogram": hist}

    def _examples(self, layer: int, feature: int, name: str) -> list[TopExample]:
        rows = self._feature_rows(layer, feature, name)
        before = int(self.manifest["window"][0])
        width = sum(self.manifest["window"]) + 1
        windows = _window_values(rows.column("window"), width)
        seqs = rows.column("sequence").to_numpy()
        poss = rows.column("position").to_numpy()
        acts = rows.column("activation").to_numpy()
        return [TopExample(int(s), int(p), float(a), int(p) - before, w)
                for s, p, a, w in zip(seqs, poss, acts, windows)]

    def top_examples(self, layer: int, feature: int) -> list[TopExample]:
        """The feature's top-k tokens, highest activation first."""
        return self._examples(layer, feature, "top")

    def samples(self, layer: int, feature: int) -> list[TopExample]:
        """A uniform random sample of the feature's firing tokens (sorted by activation)."""
        out = self._examples(layer, feature, "samples")
        return sorted(out, key=lambda e: (-e.activation, e.sequence, e.position))

    def interval_samples(self, layer: int, feature: int, n_bands: int = 5,
                         per_band: int | None = None) -> list[tuple[float, float, list[TopExample]]]:
        """Samples split into ``n_bands`` activation quantile bands of the
        feature's firing distribution (estimated from the uniform sample),
        highest band first: ``[(q_low, q_high, examples), ...]``."""
        if n_bands < 1:
            raise InvalidInputError(f"n_bands must be at least 1, got {n_bands}.")
        samples = self.samples(layer, feature)
        bands = []
        for b, part in enumerate(np.array_split(np.arange(len(samples)), n_bands)):
            items = [samples[i] for i in part][:per_band]
            bands.append((1 - (b + 1) / n_bands, 1 - b / n_bands, items))
        return bands

    # -- tokens --------------------------------------------------------------------------
    def _read_token_group(self, group: int) -> np.ndarray:
        table = self._file(self.directory / "tokens.parquet").read_row_group(group, use_threads=False)
        return _flat_windows(table.column("tokens"), self.seq_len)

    def sequence_tokens(self, sequence: int) -> np.ndarray:
        """Token ids ``[seq_len]`` of one (global) sequence index."""
        start, stop = self.manifest["sequence_start"], self.manifest["sequence_stop"]
        if not start <= sequence < stop:
            raise InvalidInputError(f"Sequence {sequence} is not in this index ({start}..{stop - 1}).")
        rows = int(self.manifest["tokens_rows_per_group"])
        return self._token_groups((sequence - start) // rows)[(sequence - start) % rows]

    def tokens(self) -> np.ndarray:
        """All indexed sequences, ``[n_seq, seq_len]`` (reads the whole table)."""
        import pyarrow.parquet as pq
        return _flat_windows(pq.read_table(self.directory / "tokens.parquet").column("tokens"),
                             self.seq_len)

    # -- search ------------------------------------------------------------------------
    def features_by_token(self, layer: int, token_id: int, limit: int = 20):
        """Features whose top examples most often sit on ``token_id``: a
        DataFrame[feature, count, max_activation], most frequent first."""
        import pandas as pd
        layer = self.check_layer(layer)
        top = self.table(layer, "top")
        toks = self.tokens()
        start = self.manifest["sequence_start"]
        at = toks[top["sequence"].to_numpy() - start, top["position"].to_numpy()]
        hit = top[at == int(token_id)]
        if hit.empty:
            return pd.DataFrame({"feature": [], "count": [], "max_activation": []})
        out = hit.groupby("feature").agg(count=("rank", "size"), max_activation=("activation", "max"))
        return out.sort_values(["count", "max_activation"], ascending=False).head(limit).reset_index()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"FeatureIndex({str(self.directory)!r}, model={m['model']!r}, "
                f"transcoders={m['transcoder_set']!r}, layers={self.layers}, "
                f"n_tokens={self.n_tokens}, k={self.k})")

    # -- building ----------------------------------------------------------------------
    @classmethod
    def build(cls, model, transcoders: TranscoderSet, corpus, n_tokens: int,
              out_dir: str | os.PathLike, layers: Sequence[int] | None = None, k: int = 20,
              n_samples: int = 40, batch_size: int = 8, bins: np.ndarray | None = None,
              window: tuple[int, int] = (12, 4), seed: int = 0, checkpoint_every: int = 25,
              shard: tuple[int, int] | None = None, max_batches: int | None = None,
              features_per_group: int = 256, overwrite: bool = False,
              progress: bool = False, fuse_layers: bool | None = None) -> "FeatureIndex | None":
        """Index ``n_tokens`` tokens of ``corpus`` (a Corpus, list of strings,
        ``datasets`` dataset or ``[n_seq, seq_len]`` token tensor) into ``out_dir``.

        Resumes an unfinished build found in ``out_dir`` (same arguments),
        skipping its checkpointed batches. ``shard=(i, n)`` indexes only the
        i-th of n contiguous runs of batches; merge shard directories with
        ``FeatureIndex.merge``. ``max_batches`` stops (with a checkpoint) after
        that many new batches and returns None — for builds in time slices.

        ``fuse_layers`` folds all layers' activations into one accumulator
        update per batch instead of one per layer (same results). It is the
        default on CUDA, where an update's cost is kernel launches, not
        arithmetic; on CPU it would only hold all layers' activations at once
        (batch tokens x total features x 4 bytes).
        """
        corpus = as_corpus(corpus, model)
        layers = transcoders.select_layers(layers)
        if not layers:
            raise InvalidInputError("layers is empty: index at least one layer.")
        transcoders.check_fits(model)
        check_context(model, corpus.seq_len)
        for name, value in (("k", k), ("n_samples", n_samples), ("batch_size", batch_size),
                            ("checkpoint_every", checkpoint_every),
                            ("features_per_group", features_per_group)):
            if int(value) < 1:
                raise InvalidInputError(f"{name} must be at least 1, got {value}.")
        seq_len = corpus.seq_len
        total_sequences = int(n_tokens) // seq_len
        if total_sequences < 1:
            raise InvalidInputError(
                f"n_tokens={n_tokens} is less than one sequence of {seq_len} tokens.")
        if total_sequences * seq_len >= 2 ** 32:
            raise InvalidInputError(
                f"n_tokens={n_tokens} is too large for one index (at most 2**32 tokens); build "
                "shards over parts of the corpus and keep them as separate indexes.")
        n_batches_total = -(-total_sequences // batch_size)
        if shard is None:
            first_batch, stop_batch = 0, n_batches_total
        else:
            i, n = shard
            if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
                raise InvalidInputError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}.")
            first_batch, stop_batch = i * n_batches_total // n, (i + 1) * n_batches_total // n
        seq_start = first_batch * batch_size
        seq_stop = min(stop_batch * batch_size, total_sequences)
        edges = histogram_edges() if bins is None else np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or len(edges) < 1 or np.any(np.diff(edges) <= 0) or edges[0] <= 0:
            raise InvalidInputError("bins must be increasing positive bin edges.")
        window = (int(window[0]), int(window[1]))

        out = Path(out_dir)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": _model_name(model), "transcoder_set": transcoders.name,
            "transcoder_repo": transcoders.repo_id, "revision": transcoders.revision,
            "corpus": corpus.description, "seq_len": seq_len, "layers": layers,
            "d_sae": {str(layer): transcoders.d_sae(layer) for layer in layers},
            "k": int(k), "n_samples": int(n_samples), "batch_size": int(batch_size),
            "histogram_edges": [float(e) for e in edges], "window": list(window), "seed": int(seed),
            "total_sequences": total_sequences, "sequence_start": seq_start,
            "sequence_stop": seq_stop, "n_batches": stop_batch - first_batch,
            "n_sequences": seq_stop - seq_start, "n_tokens": (seq_stop - seq_start) * seq_len,
            "n_tokens_counted": (seq_stop - seq_start) * (seq_len - 1),
            "positions_counted": "1..seq_len-1 (position 0, BOS, left out)",
            "shard": list(shard) if shard is not None else None,
            "features_per_group": int(features_per_group), "tokens_rows_per_group": int(batch_size),
        }
        existing = _prepare_out_dir(out, manifest, overwrite)
        if existing == "complete":
            return cls(out)

        n_batches = manifest["n_batches"]
        _write_tokens(out, corpus, seq_start, seq_stop - seq_start, batch_size)

        device = model_device(model)
        if fuse_layers is None:
            fuse_layers = transcoders.device.type == "cuda"
        groups = [layers] if fuse_layers else [[layer] for layer in layers]
        accs = {}                                                   # layer -> its (shared) accumulator
        for group in groups:
            acc = _LayerAccumulator(group, [transcoders.d_sae(l) for l in group], k, n_samples,
                                    edges, window, seed, transcoders.device)
            accs.update(dict.fromkeys(group, acc))
        done = 0
        ckpt = out / "checkpoint.pt"
        if ckpt.is_file():
            saved = torch.load(ckpt, map_location=transcoders.device, weights_only=True)
            done = int(saved["batches_done"])
            for layer in layers:
                accs[layer].load(saved["layers"][layer], layer)

        hooks = {transcoders.input_hook(layer) for layer in layers}
        stop_at = max(layers) + 1
        stop_at = None if stop_at >= int(model.cfg.n_layers) else stop_at
        import pyarrow.parquet as pq
        tokens_file = pq.ParquetFile(out / "tokens.parquet")
        bar = _progress(n_batches, done, progress)
        new_batches = 0
        last_saved = done
        for b in range(done, n_batches):
            if max_batches is not None and new_batches >= max_batches:
                break
            toks = torch.from_numpy(_flat_windows(tokens_file.read_row_group(b).column("tokens"),
                                                  seq_len).astype(np.int64))
            first_seq = seq_start + b * batch_size
            first_token = first_seq * seq_len
            gtok = first_token + np.arange(toks.numel(), dtype=np.int64)
            token_key = torch.as_tensor(_token_hash(gtok, seed).reshape(toks.shape),
                                        device=transcoders.device)
            with torch.inference_mode():
                _, cache = model.run_with_cache(toks.to(device), names_filter=lambda n: n in hooks,
                                                stop_at_layer=stop_at)
                for group in groups:
                    acts = [transcoders[l].encode(cache[transcoders.input_hook(l)].to(transcoders.device))
                            for l in group]
                    acts = acts[0] if len(acts) == 1 else torch.cat(acts, dim=-1)  # [n_seq, seq_len, features]
                    accs[group[0]].update(acts, token_key, first_token)
                    del acts
                del cache
            new_batches += 1
            if bar is not None:
                bar.update(1)
            if (b + 1) % checkpoint_every == 0 and b + 1 < n_batches:
                _save_checkpoint(out, b + 1, accs)
                last_saved = b + 1
        if bar is not None:
            bar.close()
        reached = done + new_batches
        if reached < n_batches:
            if reached > last_saved:
                _save_checkpoint(out, reached, accs)
            return None

        # Arrow encodes and compresses without the GIL: the layers' tables are
        # written side by side (the states are taken here, on the build's device).
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=max(1, min(len(layers), os.cpu_count() or 1))) as pool:
            writes = [pool.submit(_write_layer, out, layer, accs[layer].state(layer), len(edges) + 1,
                                  seq_len, features_per_group) for layer in layers]
            for w in writes:
                w.result()
        manifest["complete"] = True
        manifest["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _atomic_write_json(out / "manifest.json", manifest)
        if ckpt.exists():
            ckpt.unlink()
        return cls(out)

    # -- merging -----------------------------------------------------------------------
    @classmethod
    def merge(cls, shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              overwrite: bool = False) -> "FeatureIndex":
        """Combine finished shards (same model, transcoders, corpus and settings;
        contiguous sequence ranges) into one index equal to a single build over
        their union."""
        import pyarrow.parquet as pq

        shards = sorted((cls(d) for d in shard_dirs), key=lambda s: s.manifest["sequence_start"])
        if not shards:
            raise InvalidInputError("merge needs at least one shard directory.")
        first = shards[0].manifest
        same = ("model", "transcoder_set", "revision", "corpus", "seq_len", "layers", "d_sae", "k",
                "n_samples", "batch_size", "histogram_edges", "window", "seed", "total_sequences",
                "features_per_group")
        for s in shards[1:]:
            diff = [key for key in same if s.manifest.get(key) != first.get(key)]
            if diff:
                raise InvalidInputError(
                    f"Shard {s.directory} differs from {shards[0].directory} in {diff}; only shards "
                    "of the same build settings can be merged.")
        for a, b in zip(shards, shards[1:]):
            if a.manifest["sequence_stop"] != b.manifest["sequence_start"]:
                raise InvalidInputError(
                    f"Shards must cover contiguous sequence ranges: {a.directory} ends at sequence "
                    f"{a.manifest['sequence_stop']} but {b.directory} starts at "
                    f"{b.manifest['sequence_start']}.")
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            if not overwrite:
                raise InvalidInputError(f"{out} is not empty; pass overwrite=True to replace it.")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)

        seq_len, n_bins = first["seq_len"], len(first["histogram_edges"]) + 1
        width = sum(first["window"]) + 1
        group = int(first["features_per_group"])
        for layer in first["layers"]:
            d_sae = int(first["d_sae"][str(layer)])
            state = None
            for s in shards:
                st = _state_from_disk(s, layer, d_sae, n_bins, width, seq_len)
                state = st if state is None else _merge_states(state, st)
            _write_layer(out, layer, state, n_bins, seq_len, group)

        rows = int(first["tokens_rows_per_group"])
        schema = pq.ParquetFile(shards[0].directory / "tokens.parquet").schema_arrow

        def token_groups():
            for s in shards:
                f = pq.ParquetFile(s.directory / "tokens.parquet")
                for g in range(f.num_row_groups):
                    yield f.read_row_group(g)
        _atomic_write_parquet(out / "tokens.parquet", _regroup(token_groups(), rows), schema)

        manifest = dict(first)
        manifest["sequence_start"] = first["sequence_start"]
        manifest["sequence_stop"] = shards[-1].manifest["sequence_stop"]
        n_seq = manifest["sequence_stop"] - manifest["sequence_start"]
        manifest.update(n_sequences=n_seq, n_tokens=n_seq * seq_len,
                        n_tokens_counted=n_seq * (seq_len - 1),
                        n_batches=sum(s.manifest["n_batches"] for s in shards),
                        shard=None if (manifest["sequence_start"] == 0 and
                                       manifest["sequence_stop"] == first["total_sequences"])
                        else [str(s.directory) for s in shards],
                        merged_from=len(shards), complete=True,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _atomic_write_json(out / "manifest.json", manifest)
        return cls(out)


# -- build helpers ----------------------------------------------------------------------
def _model_name(model) -> str:
    cfg = model.cfg
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "original_architecture", None)
               or type(model).__name__)


_RESUME_KEYS = ("format_version", "model", "transcoder_set", "revision", "corpus", "seq_len", "layers",
                "d_sae", "k", "n_samples", "batch_size", "histogram_edges", "window", "seed",
                "total_sequences", "sequence_start", "sequence_stop", "features_per_group")


def _prepare_out_dir(out: Path, manifest: dict, overwrite: bool) -> str:
    """Create ``out``, or check that what is there is this same build.
    Returns "new", "resume" or "complete"."""
    path = out / "manifest.json"
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [key for key in _RESUME_KEYS if old.get(key) != manifest.get(key)]
        if diff:
            raise InvalidInputError(
                f"{out} holds an index built with different settings ({', '.join(diff)}). "
                "Use another out_dir, the same arguments to resume it, or overwrite=True.")
        return "complete" if old.get("complete") else "resume"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InvalidInputError(
                f"{out} is not empty and holds no feature index; pass overwrite=True or another out_dir.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, {**manifest, "complete": False})
    return "new"


def _write_tokens(out: Path, corpus: Corpus, start: int, n_sequences: int, rows: int) -> None:
    """tokens.parquet: one row group per batch, written before the pass (and
    kept on resume), so a batch is a row group read back by number."""
    import pyarrow as pa

    path = out / "tokens.parquet"
    if path.is_file():
        return
    schema = pa.schema([("sequence", pa.int64()), ("tokens", pa.list_(pa.int32(), corpus.seq_len))])
    got = [0]

    def blocks():
        for batch in corpus.batches(rows, n_sequences, start):
            seq = np.arange(start + got[0], start + got[0] + len(batch), dtype=np.int64)
            got[0] += len(batch)
            yield pa.table({"sequence": seq, "tokens": pa.FixedSizeListArray.from_arrays(
                pa.array(batch.reshape(-1).astype(np.int32)), corpus.seq_len)}, schema=schema)

    _atomic_write_parquet(path, blocks(), schema)
    if got[0] < n_sequences:
        path.unlink()
        raise InvalidInputError(
            f"The corpus yields only {start + got[0]} sequences of {corpus.seq_len} tokens; "
            f"{start + n_sequences} are needed. Ask for fewer tokens or give a larger corpus.")


def _save_checkpoint(out: Path, batches_done: int, accs: dict) -> None:
    tmp = out / "checkpoint.pt.tmp"
    torch.save({"batches_done": batches_done,
                "layers": {layer: acc.state(layer) for layer, acc in accs.items()}}, tmp)
    os.replace(tmp, out / "checkpoint.pt")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest["batches_done_hint"] = batches_done
    _atomic_write_json(out / "manifest.json", manifest)


def _write_layer(out: Path, layer: int, state: dict, n_bins: int, seq_len: int, group: int) -> None:
    d = out / f"layer_{layer:02d}"
    d.mkdir(parents=True, exist_ok=True)
    width = state["top"]["window"].shape[-1]
    _atomic_write_parquet(d / "stats.parquet", _stats_blocks(state, n_bins, group), _stats_schema(n_bins))
    for kind in ("top", "samples"):
        _atomic_write_parquet(d / f"{kind}.parquet", _best_blocks(state[kind], seq_len, group, kind),
                              _best_schema(kind, width))


def _state_from_disk(index: FeatureIndex, layer: int, d_sae: int, n_bins: int, width: int,
                     seq_len: int) -> dict:
    import pyarrow.parquet as pq
    m = index.manifest
    stats = pq.read_table(index._path(layer, "stats"))
    hist = stats.column("histogram").combine_chunks().flatten().to_numpy()
    return {
        "top": _best_from_table(pq.read_table(index._path(layer, "top")), d_sae, m["k"], width,
                                seq_len, "top"),
        "samples": _best_from_table(pq.read_table(index._path(layer, "samples")), d_sae,
                                    m["n_samples"], width, seq_len, "samples"),
        "n_firing": torch.from_numpy(stats.column("n_firing").to_numpy().copy()),
        "act_sum": torch.from_numpy(stats.column("act_sum").to_numpy().copy()),
        "hist": torch.from_numpy(hist.astype(np.int64).copy()),
    }


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


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="indexing", unit="batch")
