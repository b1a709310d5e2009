"""The streaming accumulator behind ``FeatureIndex.build``: per-feature exact
top-k examples, a uniform sample of firing tokens, and activation histograms,
updated one batch at a time and vectorised over features.

Every statistic is an exact, order-independent function of the set of tokens
seen: top-k ties are broken by global token index, and sample keys come from
a hash of the global token index, not from a random stream. That is what
makes a resumed build, and merged shards, equal to one uninterrupted build.
Memory is O(d_sae * (k + n_samples)) per layer plus one batch of activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Sequence

import numpy as np
import torch


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


def _feature_hash(layer: int, d_sae: int, seed: int, start: int = 0) -> np.ndarray:
    """Hashes of features ``start .. start + d_sae - 1`` of ``layer``."""
    features = np.arange(start, start + d_sae, dtype=np.uint64)
    return _unit_hash(features + (np.uint64(layer) << np.uint64(32)), 2 * seed + 2)


# -- accumulators -----------------------------------------------------------------------
# Bytes of temporaries one pass of ``_Best.offer`` may take, at about
# (12 + k) * 8 bytes a candidate (the [C, k] row keys of those it compares
# with their row). While rows fill, every nonzero of a batch is a candidate:
# 7 million at a GPU batch of 32 x 128 tokens over GPT-2's 12 fused layers,
# whose temporaries took 1.5-2 GiB in one pass. Larger offers are merged in
# slices, which is exact (the k best of a union are the k best of the k best
# so far and the next slice), and costs a few extra passes in the first
# batches only: once rows are full few entries are candidates.
OFFER_BYTES = 128 * 2 ** 20
# Bytes of the [R, k] temporaries of the candidates' rows that an offer off
# the CPU compares and sorts at a time (``_Best._row_chunks``): while rows
# fill, a pass's rows in one go would add a third to a GPU update's peak.
ROW_BYTES = 32 * 2 ** 20

# Hot path: every batch of every layer. On CPU, 1-D gathers use index_select
# (several times cheaper than advanced indexing) and 1-D sorts use numpy's
# (several times cheaper than torch's); see benchmarks/bench_accumulator.py.
# Tests turn CPU_SHORTCUTS off to run the code paths of CUDA on a CPU.
CPU_SHORTCUTS = True


def takes_cpu_shortcuts(device) -> bool:
    """Whether work on ``device`` takes the CPU's shortcuts (numpy, radix
    sorts by feature, the build's reused encode buffers)."""
    return CPU_SHORTCUTS and torch.device(device).type == "cpu"


def _on_cpu(t: torch.Tensor) -> bool:
    """Whether ``t``'s work takes the CPU's shortcuts."""
    return takes_cpu_shortcuts(t.device)


def _argsort(key: torch.Tensor, stable: bool = False) -> torch.Tensor:
    """Indices that sort a 1-D tensor ascending (ties in input order if ``stable``)."""
    if _on_cpu(key):
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
    index minus the index where its run starts. On CPU that start is the
    running max of run-start indices (linear); elsewhere a binary search for
    the key (one kernel, where CUDA's cummax is a slow scan)."""
    i = torch.arange(sorted_keys.numel(), device=sorted_keys.device)
    if _on_cpu(sorted_keys):
        first = torch.where(_segment_starts(sorted_keys), i, 0).cummax(0).values
    else:
        first = torch.searchsorted(sorted_keys, sorted_keys)
    return i - first


def _argsort_small(key: torch.Tensor, bound: int) -> torch.Tensor:
    """Stable ascending argsort of a 1-D integer tensor with values in
    [0, bound): on CPU, below 2**16, numpy's radix sort on uint16 (O(n),
    several times faster than a comparison sort)."""
    if _on_cpu(key) and bound <= 2 ** 16:
        return torch.from_numpy(np.argsort(key.numpy().astype(np.uint16), kind="stable"))
    return _argsort(key, stable=True)


@dataclass
class Entries:
    """The nonzero activations of one layer on a batch, token-major (row-major
    over ``[n_tok, d_sae]``): token row, feature, value. The sparse form a
    fused accumulator gathers layer by layer, so all layers' dense
    activations are never held at once."""
    row: torch.Tensor             # [nnz] int64 token index in the batch
    feature: torch.Tensor         # [nnz] int64
    value: torch.Tensor           # [nnz]

    @classmethod
    def of(cls, acts: torch.Tensor, first_row: int = 0, features: slice | None = None) -> "Entries":
        """The nonzeros of ``acts [n_seq, seq_len, d_sae]`` (contiguous), whose
        first token is row ``first_row`` of the batch; with ``features``, only
        those of that block of features, numbered from its start."""
        d_sae = acts.shape[-1]
        flat = acts.reshape(-1, d_sae)
        lo = 0 if features is None else features.start
        row, f = _nonzero_2d(flat if features is None else flat[:, features])
        value = flat.reshape(-1).index_select(0, row * d_sae + (f + lo if lo else f))
        return cls(row + first_row if first_row else row, f, value)

    def block(self, features: slice) -> "Entries":
        """The entries of one block of features, numbered from its start (token-major still)."""
        keep = ((self.feature >= features.start) & (self.feature < features.stop)).nonzero().squeeze(1)
        return Entries(self.row.index_select(0, keep), self.feature.index_select(0, keep) - features.start,
                       self.value.index_select(0, keep))

    @classmethod
    def cat(cls, parts: Sequence["Entries"]) -> "Entries":
        """Entries of consecutive chunks of rows, in order, as one."""
        if len(parts) == 1:
            return parts[0]
        return cls(torch.cat([p.row for p in parts]), torch.cat([p.feature for p in parts]),
                   torch.cat([p.value for p in parts]))


def _nonzero_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the nonzero entries of a 2-D tensor, row-major.

    On CPU numpy's ``!=`` and ``flatnonzero`` are several times faster than
    torch's comparison and ``nonzero`` (and its division by a scalar, through
    libdivide); this one dense pass over the batch would otherwise cost more
    than the rest of the update."""
    if _on_cpu(x) and x.dtype in (torch.float16, torch.float32, torch.float64):
        idx = np.flatnonzero(x.detach().numpy() != 0)
        row = idx // x.shape[1]
        return torch.from_numpy(row), torch.from_numpy(idx - row * x.shape[1])
    return (x != 0).nonzero(as_tuple=True)


def _context_windows(at: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor,
                     before: int, after: int, dtype: torch.dtype, chunk_bytes: int = 64 * 2 ** 20) -> torch.Tensor:
    """``[len(at), before + 1 + after]`` windows of the nonzero activations
    ``at`` (ids into ``seg``/``pos``/``vals``): the feature's activations at
    positions -before..+after around each, zero elsewhere and outside its
    sequence. Entries are sorted by ``seg`` (feature and sequence), then by
    ``pos`` (distinct within a segment).

    Built from the nonzeros alone rather than gathered from the dense batch,
    where each window element is a cache miss (d_sae * 4 bytes from the last),
    and only for the entries asked for: once the rows of the statistics are
    full, few of a batch's entries are kept, and windows of all of them were
    most of an update's work and memory. The entries within D positions
    after entry i in its segment are among entries i+1..i+D (and before it,
    i-D..i-1); those are tested in chunks of ``at`` small enough that the
    [chunk, D] temporaries stay near ``chunk_bytes``."""
    n, m, width = seg.numel(), at.numel(), before + 1 + after
    win = torch.zeros(m + 1, width, dtype=dtype, device=seg.device)    # + a spare row, see below
    flat, spare = win.view(-1), m * width
    flat[torch.arange(m, device=at.device) * width + before] = vals.index_select(0, at).to(dtype)
    if n < 2:
        return win[:m]
    per = max(1, chunk_bytes // (64 * max(1, before, after)))
    seg_at, pos_at = seg.index_select(0, at), pos.index_select(0, at)     # [m]
    for step, reach in ((1, after), (-1, before)):
        if reach == 0:
            continue
        if m <= per and not _on_cpu(seg):
            # One chunk of rows: all tested, with no host sync to find the few
            # that need it (which on CUDA costs more than testing the rest).
            has = torch.arange(m, device=at.device)
        else:
            # An entry has a neighbour within reach on this side only if the
            # entry next to it is one (positions ascend within a segment),
            # which few are: only those are tested against all ``reach`` candidates.
            next_to = at + step
            nb = next_to.clamp(0, n - 1)
            has = ((next_to >= 0) & (next_to < n) & (seg[nb] == seg_at)
                   & ((pos[nb] - pos_at) * step <= reach)).nonzero().squeeze(1)   # [H] rows of win
        for lo in range(0, has.numel(), per):
            r = has[lo:lo + per]                                # [R] rows
            j = at.index_select(0, r)[:, None] + step * torch.arange(1, reach + 1, device=at.device)
            jc = j.clamp(0, n - 1)                              # [R, reach] candidates
            gap = (pos[jc] - pos_at.index_select(0, r)[:, None]) * step        # [R, reach] positions apart
            near = (j >= 0) & (j < n) & (seg[jc] == seg_at.index_select(0, r)[:, None]) & (gap <= reach)
            # Candidates out of reach are written to the spare row instead of
            # being masked out (boolean masks cost a host sync each on CUDA).
            flat[torch.where(near, (r * width + before)[:, None] + step * gap, spare)] = vals[jc].to(dtype)
    return win[:m]


class _Best:
    """For every feature, the ``k`` best entries by score (desc), ties by token (asc).

    Dense ``[d_sae, k]`` tensors, kept *unsorted* within a row while streaming:
    a merge then writes only the slots it evicts (no row is shifted or
    rewritten, which in the early batches, when nearly every feature takes new
    entries, cost more than the encoding itself). ``state()`` returns the rows
    sorted. Empty slots have score 0 and token -1 (every real score is > 0, so
    an empty slot always loses); the row minimum is the k-th best score, a
    per-feature threshold that filters a batch's candidates before sorting.

    Each slot is held as its ``_goodness``, one int64 from which its score
    and token are read back exactly (one comparison per slot instead of
    three, and 12 bytes a slot less than holding all three: 212 MiB for
    GPT-2 small's 294,912 features at the default 20 + 40 slots).
    ``_filled`` is the number of non-empty slots per row (kept up to date
    on CPU, whose offers read it). Empty slots are filled in order and never
    reappear, so a row's filled slots are always a prefix (also after
    ``load``: ``state()`` puts empty slots last).
    """

    def __init__(self, d_sae: int, k: int, window: int, device):
        self.k = k
        self._key = torch.zeros(d_sae, k, dtype=torch.int64, device=device)     # all slots empty
        self.act = torch.zeros(d_sae, k, dtype=torch.float32, device=device)
        self.window = torch.zeros(d_sae, k, window, dtype=torch.float16, device=device)
        self._threshold = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self._filled = torch.zeros(d_sae, dtype=torch.int64, device=device)

    def threshold(self) -> torch.Tensor:
        return self._threshold

    @property
    def per_pass(self) -> int:
        """Candidates one pass of ``offer`` takes (see OFFER_BYTES)."""
        return max(1, OFFER_BYTES // (8 * (12 + self.k)))

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
    def _score_of(key: torch.Tensor) -> torch.Tensor:
        """The float32 scores of ``_goodness`` keys (0 for an empty slot)."""
        return (key >> 32).to(torch.int32).view(torch.float32)

    @staticmethod
    def _token_of(key: torch.Tensor) -> torch.Tensor:
        """The tokens of ``_goodness`` keys (-1 for an empty slot)."""
        return torch.where(key == 0, -1, 0xFFFFFFFF - (key & 0xFFFFFFFF))

    @staticmethod
    def _best_first(key: torch.Tensor) -> torch.Tensor:
        """[rows, k] slot order from best to worst: score desc, then token asc
        (keys are unique within a row but for empty slots, which are alike)."""
        if _on_cpu(key):                                        # numpy's row sorts: several times faster
            return torch.from_numpy(np.argsort(np.negative(key.numpy()), axis=1))
        return torch.argsort(key, dim=1, descending=True)

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
        k, per = self.k, self.per_pass
        if f.numel() > per:
            for lo in range(0, f.numel(), per):
                part = slice(lo, lo + per)
                self.offer(f[part], score[part], token[part], act[part],
                           lambda idx, lo=lo: window_of(idx + lo), tokens_ascending)
            return
        order = _lex_order(f, score, token, tokens_ascending)       # [C] by feature, best first
        f = f.index_select(0, order)
        key = self._goodness(score.index_select(0, order), token.index_select(0, order))  # [C]
        rank = _ranks_in_segments(f)                                # [C] among the feature's candidates
        filling_first = _on_cpu(f)
        if filling_first:
            keep = self._keep_filling_first(f, key, rank)
        else:
            # Every candidate compared with all k slots of its row: more work
            # than settling first those that rows still filling take (see
            # _keep_filling_first), but no host sync in between; on CUDA a sync
            # costs more than these few small kernels.
            keep = torch.empty_like(rank, dtype=torch.bool)         # [C]
            for part in self._row_chunks(f.numel()):
                rows = self._key.index_select(0, f[part])           # [R, k]
                keep[part] = rank[part] + (rows > key[part, None]).sum(1, dtype=torch.int32) < k
        kept = keep.nonzero().squeeze(1)                            # [C']
        if kept.numel() == 0:
            return
        # Kept candidates of a feature are its best ones (one kept beats every
        # one dropped), so each one's rank among them is its rank among all.
        f, key, src, j = (t.index_select(0, kept) for t in (f, key, order, rank))    # [C']
        slot = self._worst_slots(f, j) if filling_first else self._worst_slots_sorted(f, j)     # [C']
        at = f * k + slot                                           # [C'] flat slot each one takes
        self._key.view(-1).index_copy_(0, at, key)
        self.act.view(-1).index_copy_(0, at, act.index_select(0, src).to(self.act.dtype))
        self.window.view(-1, self.window.shape[-1]).index_copy_(
            0, at, window_of(src).to(self.window.dtype))
        if filling_first:                                           # the only reader of _filled
            self._filled.index_add_(0, f, torch.ones_like(f)).clamp_(max=k)
        # Row minima of all rows: one pass over [d_sae, k], about as cheap on CPU
        # as finding the rows that changed, and free of host syncs on CUDA
        # (the lowest key holds the lowest score; on CPU an int64 amin takes
        # 3-4 times as long as min, which is vectorised).
        self._threshold.copy_(self._score_of(self._key.min(dim=1).values))

    def _keep_filling_first(self, f: torch.Tensor, key: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        """[C] whether each candidate (sorted by feature, best first; ``rank``
        among its feature's) is kept: fewer than k entries beat it.

        At most the row's filled slots can beat a candidate: one with rank +
        filled < k is kept without looking at the row (in the first batches,
        while rows fill, nearly all are), one with rank >= k is not. Only the
        rest are compared with all k slots of their row."""
        k = self.k
        keep = rank + self._filled.index_select(0, f) < k           # [C]
        doubt = ((rank < k) & ~keep).nonzero().squeeze(1)          # [D]
        if doubt.numel():
            row_key = self._key.index_select(0, f.index_select(0, doubt))        # [D, k]
            beaten = (row_key > key.index_select(0, doubt)[:, None]).sum(1, dtype=torch.int32)  # [D]
            keep[doubt] = rank.index_select(0, doubt) + beaten < k
        return keep

    def _worst_slots(self, f: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """[C'] the slot the j-th best kept candidate of feature f takes: the
        j-th worst of the row, which is its j-th empty slot while there is one
        (empties, the worst, follow the filled prefix)."""
        k = self.k
        slot = self._filled.index_select(0, f) + j                  # [C']
        evict = (slot >= k).nonzero().squeeze(1)                    # [E] displace a real entry
        if evict.numel():
            # Keys are unique within a row except identical empty slots, so this
            # is exact. Once rows are full nearly every evicting candidate has
            # j == 0: the row's argmin, a fraction of the cost of a topk.
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
        return slot

    def _worst_slots_sorted(self, f: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """As ``_worst_slots``, with no host sync: each candidate's row sorted
        ascending, stably, so that its empty slots (key 0) come first and in
        order, and fill in order."""
        slots = []
        for part in self._row_chunks(f.numel()):
            rows = self._key.index_select(0, f[part])               # [R, k] as before this offer
            worst_first = torch.sort(rows, dim=1, stable=True).indices
            slots.append(worst_first.gather(1, j[part, None]).squeeze(1))
        return slots[0] if len(slots) == 1 else torch.cat(slots)

    def _row_chunks(self, n: int) -> list[slice]:
        """Slices of ``n`` candidates whose rows' temporaries (keys, and a
        sort's values and indices: 24 bytes a slot) take at most ROW_BYTES."""
        per = max(1, ROW_BYTES // (24 * self.k))
        return [slice(lo, lo + per) for lo in range(0, n, per)]

    def state(self, rows: slice = slice(None)) -> dict:
        """Rows (all, or a slice) sorted best first (score desc, token asc), as
        written to disk."""
        key = self._key[rows]
        order = self._best_first(key).to(key.device)            # [rows, k]
        # Flat 1-D gathers (a gather of the [rows, k, width] windows along dim 1
        # cost several times the sort on CPU).
        n, k = order.shape
        flat = (torch.arange(n, device=order.device)[:, None] * k + order).view(-1)
        width = self.window.shape[-1]

        def take(t):
            return t.reshape(n * k, -1).index_select(0, flat).view(n, k, -1)
        key = take(key).view(n, k)
        return {"score": self._score_of(key), "token": self._token_of(key),
                "act": take(self.act[rows]).view(n, k), "window": take(self.window[rows]).view(n, k, width)}

    def load(self, state: dict, rows: slice = slice(None)) -> None:
        """Load a ``state()`` into all rows or a slice (rows best first, so empty slots last)."""
        device = self._key.device
        score, token = state["score"].to(device), state["token"].to(device)
        self._key[rows] = self._goodness(score, token)
        self.act[rows] = state["act"]
        self.window[rows] = state["window"]
        self._threshold[rows] = score.float().min(dim=1).values
        self._filled[rows] = (token >= 0).sum(dim=1)


class _LayerAccumulator:
    """Everything the index keeps for one layer, or for several layers fused,
    while it streams.

    Fused (``layer`` and ``d_sae`` sequences), the layers' features are rows
    of one set of tensors, and ``update`` takes one activation tensor (or its
    ``Entries``) per layer. Every statistic is per feature, so the result is the
    same as separate accumulators'; on CUDA, where an update is bound by its
    kernel launches and host syncs rather than by arithmetic (about 280 and 5
    once rows are full, benchmarks/bench_update_memory.py), one update for all
    layers instead of one per layer removes most of the index's overhead."""

    def __init__(self, layer: int | Sequence[int], d_sae: int | Sequence[int], k: int, n_samples: int,
                 edges: np.ndarray, window: tuple[int, int], seed: int, device, first_feature: int = 0):
        """``first_feature``: the accumulator holds features ``first_feature ..
        first_feature + d_sae - 1`` of its one layer (a block of ``_FeatureBlocks``);
        its activations come numbered from there."""
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
            [_feature_hash(l, n, seed, first_feature) for l, n in zip(layers, sizes)]), device=device)

    def update(self, acts: torch.Tensor | Sequence, token_key: torch.Tensor, first_token: int) -> None:
        """Fold in the activations of consecutive sequences whose first token has
        global index ``first_token``: ``acts [n_seq, seq_len, d_sae]``, or for a
        fused accumulator one such tensor (or its ``Entries``) per layer, in
        layer order; ``token_key [n_seq, seq_len]`` is the hash of each
        token's global index. A list of them is emptied once read, so its
        tensors are freed before the update's own (fused, they are hundreds
        of MB at GPU batch sizes)."""
        parts = [acts] if isinstance(acts, (torch.Tensor, Entries)) else list(acts)
        if len(parts) != len(self.rows):
            raise ValueError(f"expected activations of {len(self.rows)} layer(s), got {len(parts)}")
        n_seq, seq_len = token_key.shape
        n_tok = n_seq * seq_len
        entries = [p if isinstance(p, Entries) else Entries.of(p) for p in parts]
        del parts
        if isinstance(acts, list):
            acts.clear()
        # One field joined, and its parts let go, before the next.
        rows, feats, values = ([getattr(e, name) for e in entries] for name in ("row", "feature", "value"))
        del entries
        sizes = [t.numel() for t in feats]

        def join(parts: list) -> torch.Tensor:
            joined = parts[0] if len(parts) == 1 else torch.cat(parts)
            parts.clear()
            return joined
        row, f, vals = join(rows), join(feats), join(values)
        lo = 0
        for size, layer_rows in zip(sizes, self.rows.values()):
            if layer_rows.start:                                    # features numbered from the layer's rows
                f[lo:lo + size] += layer_rows.start
            lo += size
        d_sae = self.n_firing.shape[0]                              # rows of all layers
        # Every nonzero activation once, feature-major (a feature's entries
        # contiguous and in token order): the order of a batch's candidates.
        # Memory is what bounds a GPU update (7 million entries at 32 x 128
        # tokens over 12 fused layers, each int64 array 54 MiB): arrays are
        # made one at a time and freed as soon as they are spent.
        if _on_cpu(f) and d_sae <= 2 ** 16:
            # Entries are token-major: a stable radix sort by feature alone does it.
            order = _argsort_small(f, d_sae)
        else:
            # Keys are distinct: in 32 bits (GPT-2's 12 fused layers x 4,096
            # tokens fit) a radix sort makes half the passes of 64.
            key = f * n_tok + row
            order = _argsort(key.to(torch.int32) if d_sae * n_tok < 2 ** 31 else key)
            del key
        row = row.index_select(0, order)
        f = f.index_select(0, order)
        vals = vals.index_select(0, order)
        del order
        # Position in the sequence by table look-up (integer division is slow on CPU).
        pos = (torch.arange(n_tok, dtype=torch.int32, device=row.device) % seq_len).index_select(0, row)
        # Context windows come from every nonzero (position 0 and non-positive
        # values show in windows), made only for the entries kept; a segment
        # (feature * n_tok + first row of the sequence) is one feature in one sequence.
        seg = f * n_tok
        seg += row
        seg -= pos
        all_vals = vals

        def windows_of(entry_ids: torch.Tensor) -> torch.Tensor:
            return _context_windows(entry_ids, seg, pos, all_vals, self.before, self.after,
                                    self.top.window.dtype)
        # The firing entries that count: activation > 0, position 0 (BOS) left out.
        e = ((vals > 0) & (pos != 0)).nonzero().squeeze(1)          # [n] entry ids
        row = row.index_select(0, e)
        f = f.index_select(0, e)
        vals = vals.index_select(0, e)

        ones = torch.ones_like(f)
        self.n_firing.index_add_(0, f, ones)
        cell = torch.bucketize(vals, self.edges, right=True).add_(f, alpha=self.n_bins)  # [n] histogram cell
        self.hist.index_add_(0, cell, ones)                         # no [d_sae * n_bins] temporary
        del ones, cell
        # Batch sums first. CUDA's bincount waits for the GPU (it sizes its
        # output by the largest feature), and adds in no fixed order anyway.
        self.act_sum += (torch.bincount(f, weights=vals.double(), minlength=d_sae) if _on_cpu(f) else
                         torch.zeros_like(self.act_sum).index_add_(0, f, vals.double()))

        def offer(best: _Best, score: torch.Tensor) -> None:
            # >=: a token tied with the row minimum can still win the tie on
            # token order if batches come out of order (build feeds them in order).
            cand = (score >= best.threshold().index_select(0, f)).nonzero().squeeze(1)
            # Offered in passes of best.per_pass, so the candidates' own copies
            # are as bounded as the offer's temporaries (see OFFER_BYTES).
            for lo in range(0, cand.numel(), best.per_pass):
                c = cand[lo:lo + best.per_pass]
                c_e = e.index_select(0, c)                          # candidates' entry ids
                best.offer(f.index_select(0, c), score.index_select(0, c),
                           first_token + row.index_select(0, c), vals.index_select(0, c),
                           lambda i, c_e=c_e: windows_of(c_e.index_select(0, i)),
                           tokens_ascending=True)

        offer(self.top, vals)
        # Sample priority 1 - frac(a_token + b_feature): for one feature the order
        # over tokens is a uniform random permutation, so the n_samples highest
        # priorities are a uniform sample of its firing tokens, reproducibly.
        key = token_key.reshape(-1).index_select(0, row)
        key += self.feature_key.index_select(0, f)
        score = key.remainder_(1.0).neg_().add_(1.0).float()      # 1 - key, exactly
        del key
        offer(self.samples, score)

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


class _FeatureBlocks:
    """One layer's accumulator as accumulators of contiguous blocks of its
    features, updated side by side, from the layer's dense activations or
    ``Entries``: the first block on the calling thread (torch on one thread
    meanwhile), the others on the threads of ``pool`` (each running torch on
    one thread). Handing every block to the pool measured slower: in two
    8,192-token builds the model's forward between the layers, which resumes
    right after, took 0.3-2.2 s longer than in the bare pass (0.5 s with the
    calling thread taking a block).

    Every statistic is per feature, so the blocks hold exactly what one
    accumulator would (and ``state`` joins them into it). The update is mostly
    single-threaded numpy and torch work; split this way it uses every core,
    and the build runs it between the layers' encodes on a CPU: run beside a
    multi-threaded matmul instead, a worker thread slows that matmul by about
    its own duration (the matmul's threads wait for the one it displaces)."""

    def __init__(self, layer: int, d_sae: int, k: int, n_samples: int, edges: np.ndarray,
                 window: tuple[int, int], seed: int, device, n_blocks: int, pool):
        bounds = [d_sae * i // n_blocks for i in range(n_blocks + 1)]
        self.blocks = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.parts = [_LayerAccumulator(layer, b.stop - b.start, k, n_samples, edges, window, seed, device,
                                        first_feature=b.start) for b in self.blocks]
        self.rows = {layer: slice(0, d_sae)}
        self.n_bins = self.parts[0].n_bins
        self._pool = pool

    @property
    def act_sum(self) -> torch.Tensor:
        return torch.cat([p.act_sum for p in self.parts])

    def update(self, acts: torch.Tensor | Entries | Sequence, token_key: torch.Tensor, first_token: int) -> None:
        """As ``_LayerAccumulator.update`` (the one layer's activations, or a list of them)."""
        if not isinstance(acts, (torch.Tensor, Entries)):
            if len(acts) != 1:
                raise ValueError(f"expected activations of 1 layer, got {len(acts)}")
            acts = acts[0]

        def update_block(part: _LayerAccumulator, block: slice) -> None:
            with torch.inference_mode():                        # grad mode is per thread
                entries = acts.block(block) if isinstance(acts, Entries) else Entries.of(acts, features=block)
                part.update(entries, token_key, first_token)
        from concurrent.futures import wait
        futures = [self._pool.submit(update_block, p, b) for p, b in zip(self.parts[1:], self.blocks[1:])]
        outer = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            update_block(self.parts[0], self.blocks[0])
        finally:
            torch.set_num_threads(outer)
            wait(futures)                                       # all blocks done before any error is raised
        for f in futures:
            f.result()

    def state(self, layer: int | None = None) -> dict:
        states = [p.state() for p in self.parts]

        def join(parts: list):
            if isinstance(parts[0], dict):
                return {key: join([p[key] for p in parts]) for key in parts[0]}
            return torch.cat(parts)
        return join(states)

    def load(self, state: dict, layer: int | None = None) -> None:
        n_bins = self.n_bins

        def rows(value, b: slice):
            if isinstance(value, dict):
                return {key: rows(v, b) for key, v in value.items()}
            return value[b]
        for part, b in zip(self.parts, self.blocks):
            block = {key: rows(v, b) for key, v in state.items() if key != "hist"}
            block["hist"] = state["hist"][b.start * n_bins:b.stop * n_bins]
            part.load(block)
