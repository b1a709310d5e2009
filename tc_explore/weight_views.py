"""Precomputed input-invariant views of every feature, for instant dashboards.

The weight-based sections of a dashboard (``tc_explore.circuits.invariant``:
strongest connections to earlier and later features, logit effects,
de-embeddings direct and through the top OV heads, OV norms) depend on the
weights alone, not on the corpus. Computed per feature they read every other
layer's ``W_enc`` / ``W_dec`` plus ``W_E`` and ``W_U`` (about 1.3 GB for GPT-2
small), which alone takes longer than a dashboard may. ``WeightViews.build``
computes them for *all* features at once as blocked matrix products (each
layer pair's ``W_dec[l'] @ W_enc[l]`` once, serving both the upstream view of
layer l and the downstream view of layer l') and keeps only each feature's
top-k, in Parquet beside an index (``<index>/weight_views/``)::

    manifest.json           model, transcoder set, k, n_heads, per-layer weight fingerprints
    layer_{LL}.parquet      one row per feature, row groups of ``features_per_group``

Results equal the per-feature functions of ``circuits.invariant`` (same
scores up to float32 rounding of a different summation order, same ordering
rules: score first, then lower layer, feature or token id), which remain the
way to look at a single feature without precomputing anything.

Top-k is exact, ties included: ``torch.topk`` picks k+1 candidates; rows
whose k-th and (k+1)-th values tie (rare: dead features, zero rows) are
redone with a full stable sort, so the lower index wins as in ``invariant._top``.

Slightly over 500 lines: the stored views (:class:`WeightViews`, built at
once) and the live ones (:class:`LiveWeightViews`, per feature) are one
interface and share their section layout, so they stay together.
"""
from __future__ import annotations

import os
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .distributed import all_done, raise_where_rank0_failed
from .errors import (IncompatibleTranscoderError, InvalidInputError, TcExploreError, as_count, as_flag, as_integer,
                     check_feature)
from .integrity import replace_folder, weights_digest
from .store import ParquetFiles, atomic_write_json, atomic_write_parquet, layer_name, read_manifest
from .model import model_weights, token_strings
from .progress import progress_bar
from .transcoder import TranscoderSet

FORMAT_VERSION = 1
DIRECTORY = "weight_views"


# -- exact batched top-k ----------------------------------------------------------------
def top_along_rows(scores: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``scores [r, n]`` the min(k, n) best entries, best first,
    ties broken by lower column index: (indices [r, k], values [r, k]).

    ``scores`` may be a transposed view (top-k down columns)."""
    r, n = scores.shape
    k = min(k, n)
    if k == 0 or r == 0:
        return (torch.zeros(r, 0, dtype=torch.long, device=scores.device),
                torch.zeros(r, 0, dtype=scores.dtype, device=scores.device))
    s = scores if largest else -scores
    val, idx = torch.topk(s, min(k + 1, n), dim=1)                 # [r, k+1] desc
    if val.shape[1] > k:
        tied = (val[:, k - 1] == val[:, k]).nonzero().flatten()   # k-th place is ambiguous
    else:
        tied = val.new_zeros(0, dtype=torch.long)
    val, idx = val[:, :k], idx[:, :k]
    # Within the chosen k, equal values go by index: sort by index, then stably by value.
    by_index = idx.argsort(dim=1)
    idx, val = idx.gather(1, by_index), val.gather(1, by_index)
    by_value = torch.sort(val, dim=1, descending=True, stable=True).indices
    idx, val = idx.gather(1, by_value), val.gather(1, by_value)
    if tied.numel():
        full = torch.sort(s[tied], dim=1, descending=True, stable=True)
        idx[tied], val[tied] = full.indices[:, :k], full.values[:, :k]
    return idx, (val if largest else -val)


def _merge_ranked(old: tuple, new: tuple, k: int) -> tuple:
    """Merge two best-first lists per row (score, layer, feature), keeping k.
    Every key of ``new`` sorts after every key of ``old`` (later layer, or
    later chunk of the same layer), so a stable sort leaves ties in key order."""
    score, layer, feature = (torch.cat([a, b], dim=1) for a, b in zip(old, new))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    return score.gather(1, order), layer.gather(1, order), feature.gather(1, order)


def _empty_ranked(rows: int, device, dtype) -> tuple:
    return (torch.zeros(rows, 0, dtype=dtype, device=device), torch.zeros(rows, 0, dtype=torch.long, device=device),
            torch.zeros(rows, 0, dtype=torch.long, device=device))


# -- fingerprints -----------------------------------------------------------------------
def _layer_fingerprint(transcoders: TranscoderSet, layer: int) -> str:
    return transcoders.fingerprint(layer)


def _model_fingerprint(model) -> str:
    w = model_weights(model)
    return weights_digest(w.W_E[:8], w.W_U[:, :8], w.W_V[:, :, :4, :4], w.W_O[:, :, :4, :4])


# -- building ---------------------------------------------------------------------------
class _Builder:
    """Top-k tables of every feature of every layer, from blocked weight products."""

    def __init__(self, model, transcoders: TranscoderSet, k: int, n_heads: int, chunk_size: int,
                 device):
        self.tcs, self.k, self.n_heads, self.chunk = transcoders, k, n_heads, chunk_size
        self.device = device
        self.dtype = transcoders.dtype
        w = model_weights(model)
        self.W_E = w.W_E.to(device, self.dtype)                          # [vocab, d_model]
        if w.embed_scale != 1.0:                                         # Gemma: sqrt(d_model)
            self.W_E = self.W_E * w.embed_scale
        self.W_U = w.W_U.to(device, self.dtype)                          # [d_model, vocab]
        self.W_V = w.W_V.to(device, self.dtype)                          # [L, H, d_model, d_head]
        self.W_O = w.W_O.to(device, self.dtype)                          # [L, H, d_head, d_model]
        # ||W_V u|| = sqrt(u^T (W_V^T W_V) u): the OV norm from d_head-sized vectors.
        self.gram = torch.einsum("lhde,lhdf->lhef", self.W_V, self.W_V)  # [L, H, d_head, d_head]
        self.n_model_heads = self.W_V.shape[1]
        self._E_V = {}                                                   # (l, h) -> W_E @ W_V[l, h]
        self._weights = {}                                               # layer -> (W_enc, W_dec) on device

    def weights(self, layer: int):
        if layer not in self._weights:
            tc = self.tcs[layer]
            self._weights[layer] = (tc.W_enc.detach().to(self.device, self.dtype),
                                    tc.W_dec.detach().to(self.device, self.dtype))
        return self._weights[layer]

    def up_decoder(self, up_layer: int, layer: int) -> torch.Tensor:
        """What the features of ``up_layer`` write that a reader at ``layer``
        sees: their decoders (a cross-layer transcoder's summed over the target
        layers before ``layer``, read per layer pair; its W_dec is the total write)."""
        if not self.tcs.is_cross_layer:
            return self.weights(up_layer)[1]
        return self.tcs.decoder_sum(up_layer, before=layer).detach().to(self.device, self.dtype)

    def run(self, progress: bool | None = None, part: tuple[int, int] | None = None) -> dict:
        """Every layer's view columns. With ``part=(i, n)`` only every n-th
        chunk of features, from the i-th (the work of rank i of n): the layers'
        columns hold those chunks' rows (``rows`` gives their features), and
        the downstream lists only those chunks' candidates (``merge_parts``
        joins the parts into what one run computes)."""
        layers = self.tcs.layers
        k = self.k
        chunks = [(l, start) for l in layers for start in range(0, self.tcs.d_sae(l), self.chunk)]
        mine = set(chunks if part is None else chunks[part[0]::part[1]])
        down = {l: _empty_ranked(self.tcs.d_sae(l), self.device, self.dtype) for l in layers}
        per_layer = {}
        bar = progress_bar(total=len(mine), desc="weight views", unit="chunk", progress=progress)
        for layer in layers:                                             # downstream layer, ascending
            if not any((layer, start) in mine for start in range(0, self.tcs.d_sae(layer), self.chunk)):
                continue
            W_enc, W_dec = self.weights(layer)
            up_decs = {l: self.up_decoder(l, layer) for l in layers if l < layer}
            cols = {name: [] for name in ("up_score", "up_layer", "up_feature", "logit_top_id",
                                          "logit_top", "logit_bottom_id", "logit_bottom",
                                          "deemb_id", "deemb", "ov_norm", "ov_head", "ov_token",
                                          "ov_score", "rows")}
            for start in range(0, W_enc.shape[1], self.chunk):
                if (layer, start) not in mine:
                    continue
                stop = min(start + self.chunk, W_enc.shape[1])
                cols["rows"].append(torch.arange(start, stop, device=self.device))
                enc = W_enc[:, start:stop]                               # [d_model, c]
                c = stop - start
                up = _empty_ranked(c, self.device, self.dtype)
                for up_layer in [l for l in layers if l < layer]:        # ascending
                    up_dec = up_decs[up_layer]
                    conn = up_dec @ enc                                  # [d_up, c] W_dec[l'] · W_enc[l]
                    idx, val = top_along_rows(conn.T, k)                 # [c, k] best upstream g per f
                    up = _merge_ranked(up, (val, torch.full_like(idx, up_layer), idx), k)
                    idx, val = top_along_rows(conn, k)                   # [d_up, k] best f per g
                    down[up_layer] = _merge_ranked(
                        down[up_layer], (val, torch.full_like(idx, layer), idx + start), k)
                for name, t in zip(("up_score", "up_layer", "up_feature"), up):
                    cols[name].append(t)
                logits = W_dec[start:stop] @ self.W_U                    # [c, vocab]
                for largest, name in ((True, "logit_top"), (False, "logit_bottom")):
                    idx, val = top_along_rows(logits, k, largest)
                    cols[name + "_id"].append(idx)
                    cols[name].append(val)
                del logits
                deemb = enc.T @ self.W_E.T                               # [c, vocab] W_E @ W_enc[:, f]
                idx, val = top_along_rows(deemb, k)
                cols["deemb_id"].append(idx)
                cols["deemb"].append(val)
                del deemb
                for name, t in zip(("ov_norm", "ov_head", "ov_token", "ov_score"), self.ov(layer, enc)):
                    cols[name].append(t)
                bar.update(1)
            per_layer[layer] = {name: torch.cat(ts) for name, ts in cols.items()}
        bar.close()
        for layer in layers:
            if part is None:
                del per_layer[layer]["rows"]
            for name, t in zip(("down_score", "down_layer", "down_feature"), down[layer]):
                per_layer.setdefault(layer, {})[name] = t
        return per_layer


    def ov(self, layer: int, enc: torch.Tensor) -> tuple:
        """OV norms of every head of layers <= ``layer`` and, for each feature's
        ``n_heads`` largest, the top-k tokens of ``W_E @ OV_h @ W_enc[:, f]``."""
        n, H, k = layer + 1, self.n_model_heads, self.k
        u = torch.einsum("lhem,mc->lhec", self.W_O[:n], enc)            # [n, H, d_head, c]
        sq = (u * torch.einsum("lhef,lhfc->lhec", self.gram[:n], u)).sum(2)   # [n, H, c]
        norms = sq.clamp(min=0).sqrt().reshape(n * H, -1).T             # [c, n*H]
        heads, _ = top_along_rows(norms, self.n_heads)                   # [c, n_heads] flat l*H+h
        c, m = heads.shape
        tokens = torch.zeros(c, m, k, dtype=torch.long, device=self.device)
        scores = torch.zeros(c, m, k, dtype=self.dtype, device=self.device)
        for flat in torch.unique(heads).tolist():
            rows, slot = (heads == flat).nonzero(as_tuple=True)
            l, h = divmod(flat, H)
            E_V = self._E_V.get((l, h))
            if E_V is None:
                E_V = self._E_V[(l, h)] = self.W_E @ self.W_V[l, h]     # [vocab, d_head]
            s = u[l, h][:, rows].T @ E_V.T                               # [rows, vocab]
            idx, val = top_along_rows(s, k)
            tokens[rows, slot], scores[rows, slot] = idx, val
        return norms, heads, tokens.reshape(c, -1), scores.reshape(c, -1)


def _list_column(values: np.ndarray):
    """[rows, m] -> an Arrow list column (m may be 0)."""
    import pyarrow as pa
    rows, m = values.shape
    offsets = pa.array(np.arange(0, rows * m + 1, m, dtype=np.int32) if m else np.zeros(rows + 1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))


_INT_COLUMNS = {"up_layer", "up_feature", "down_layer", "down_feature", "logit_top_id",
                "logit_bottom_id", "deemb_id", "ov_head", "ov_token"}


def _write_layer(path: Path, table_cols: dict, group: int) -> None:
    import pyarrow as pa

    arrays = {name: t.cpu().numpy().astype(np.int32 if name in _INT_COLUMNS else np.float32)
              for name, t in table_cols.items()}
    d_sae = next(iter(arrays.values())).shape[0]

    def blocks():
        for start in range(0, d_sae, group):
            sl = slice(start, min(start + group, d_sae))
            yield pa.table({"feature": np.arange(sl.start, sl.stop, dtype=np.int32),
                            **{name: _list_column(a[sl]) for name, a in sorted(arrays.items())}})
    # zstd and dictionary encoding: written once, small, read a row group at a time.
    atomic_write_parquet(path, blocks(), compression="zstd", use_dictionary=True)


def merge_parts(parts: list[dict], d_sae: dict, k: int) -> dict:
    """The columns one ``_Builder.run`` computes, from the runs of its parts
    (``run(part=(i, n))`` for every i): rows placed by feature, and each
    downstream list re-ranked over all parts' candidates by score, ties to
    the lower (layer, feature), which is the order one run's merges leave.
    Exact: a candidate a part dropped had k better ones in that part."""
    tables = {}
    for layer, n in d_sae.items():
        cols = {}
        for p in parts:
            got = p.get(layer, {})
            if "rows" not in got:
                continue
            rows = got["rows"]
            for name, t in got.items():
                if name == "rows" or name.startswith("down_"):
                    continue
                if name not in cols:
                    cols[name] = torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
                cols[name][rows] = t
        score, lay, feat = (torch.cat([p[layer][name] for p in parts], dim=1)
                            for name in ("down_score", "down_layer", "down_feature"))
        by_key = torch.argsort(lay * (1 << 32) + feat, dim=1, stable=True)
        score, lay, feat = (t.gather(1, by_key) for t in (score, lay, feat))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        cols.update(down_score=score.gather(1, order), down_layer=lay.gather(1, order),
                    down_feature=feat.gather(1, order))
        tables[layer] = cols
    return tables



def _run_distributed(builder: _Builder, out: Path, transcoders: TranscoderSet, k: int,
                     progress: bool | None) -> dict | None:
    """This rank's part of the views; on rank 0 all parts joined, elsewhere None."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    parts_dir = out.with_name(out.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    part = builder.run(progress if rank == 0 else False, part=(rank, world))
    part = {layer: {name: t.cpu() for name, t in cols.items()} for layer, cols in part.items()}
    tmp = parts_dir / f"{rank:05d}-of-{world:05d}.pt.tmp"
    torch.save(part, tmp)
    os.replace(tmp, tmp.with_suffix(""))
    all_done(True)                                                       # every part is written
    if rank != 0:
        return None
    files = [parts_dir / f"{r:05d}-of-{world:05d}.pt" for r in range(world)]
    parts = [torch.load(f, weights_only=True) for f in files]
    tables = merge_parts(parts, {l: transcoders.d_sae(l) for l in transcoders.layers}, k)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return tables


def _aside(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def _views_lock(out: Path):
    """The lock a views build holds: views inside an index folder
    (``<index>/weight_views``) are written under the index's own lock, so no
    build, merge or overwrite of that index runs meanwhile; views elsewhere
    get a lock of their own."""
    from .folder_lock import FolderLock
    if out.name == DIRECTORY and (out.parent / "manifest.json").is_file():
        return FolderLock(out.parent, "weight views build")
    return FolderLock(out, "weight views build")


# -- the stored views -------------------------------------------------------------------
class WeightViews:
    """Stored weight-based views of every feature of a transcoder set, read
    one row group at a time. Build with ``WeightViews.build``; an index's
    views live in ``<index>/weight_views`` (``WeightViews.of_index``).
    ``LiveWeightViews`` has the same ``sections`` interface without storage."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.manifest = read_manifest(
            self.directory, f"{self.directory} holds no weight views (no manifest.json); build them "
            "with WeightViews.build(model, transcoders, directory).")
        self._files = ParquetFiles(self.directory, cache_size=64)
        # A dashboard reads six sections of the same feature: decode its row once.
        self.row = lru_cache(maxsize=16)(self._decode_row)
        self._verified: dict = {}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "WeightViews":
        return cls(directory)

    @classmethod
    def of_index(cls, index) -> "WeightViews | None":
        """The views stored with a FeatureIndex, or None if it has none."""
        directory = Path(index.directory) / DIRECTORY
        return cls(directory) if (directory / "manifest.json").is_file() else None

    @classmethod
    @torch.no_grad()
    def build(cls, model, transcoders: TranscoderSet, out_dir: str | os.PathLike, k: int = 10,
              n_heads: int = 3, chunk_size: int = 1024, features_per_group: int = 128,
              device=None, overwrite: bool = False, progress: bool | None = None,
              distributed: bool = False) -> "WeightViews":
        """Compute and store the views of every feature of every layer of
        ``transcoders`` (connections need all layers, so there is no layer
        subset). ``device`` defaults to the transcoders' device. For GPT-2
        small's 12 x 24576 features the work is about 110 TFLOP (the 66
        layer-pair products and the vocabulary-sized ones): 27 s on an H200,
        41 minutes on 2 CPU cores (``benchmarks/bench_index.py``).

        ``distributed=True``, on every rank of an initialised torch.distributed
        group (torchrun, ``tc-explore views build``): each rank computes every
        world_size-th chunk of features on its own device, and rank 0 joins
        the parts (exchanged as files beside ``out_dir``, so ranks on several
        machines need a shared filesystem) into the views one process builds."""
        overwrite, distributed = as_flag(overwrite, "overwrite"), as_flag(distributed, "distributed")
        k, n_heads, chunk_size, features_per_group = (
            as_count(value, name) for name, value in (("k", k), ("n_heads", n_heads), ("chunk_size", chunk_size),
                                                      ("features_per_group", features_per_group)))
        transcoders.check_fits(model)
        out = Path(out_dir)
        device = torch.device(device) if device is not None else transcoders.device
        builder = _Builder(model, transcoders, k, n_heads, chunk_size, device)
        if not distributed:
            with _views_lock(out):
                cls._check_out(out, overwrite)
                return cls._build_locked(model, transcoders, out, builder, k, n_heads,
                                         features_per_group, device, progress, False)
        import torch.distributed as dist
        # Rank 0 alone writes ``out`` and holds its lock from start to end; every
        # rank learns whether it got it before any work is done.
        lock = _views_lock(out) if dist.get_rank() == 0 else None
        refusal = None
        if lock is not None:
            try:
                lock.acquire()
                cls._check_out(out, overwrite)
            except TcExploreError as err:
                lock.release()
                refusal = err
        raise_where_rank0_failed(refusal, f"start writing weight views into {out} (in use, or "
                                          "already built)")
        try:
            return cls._build_locked(model, transcoders, out, builder, k, n_heads, features_per_group,
                                     device, progress, True)
        finally:
            if lock is not None:
                lock.release()

    @staticmethod
    def _check_out(out: Path, overwrite: bool) -> None:
        if not out.exists() and _aside(out).exists():     # a crash inside a two-rename swap
            os.rename(_aside(out), out)
        if (out / "manifest.json").is_file() and not overwrite:
            raise InvalidInputError(f"{out} already holds weight views; pass overwrite=True to rebuild.")

    @classmethod
    def _build_locked(cls, model, transcoders, out: Path, builder: "_Builder", k: int, n_heads: int,
                      features_per_group: int, device, progress, distributed: bool) -> "WeightViews":
        t0 = time.perf_counter()
        if not distributed:
            tables = builder.run(progress)
        else:
            tables = _run_distributed(builder, out, transcoders, k, progress)
            if tables is None:                                           # not rank 0: wait for it
                all_done(True)
                return cls(out)
        tmp = out.with_name(out.name + ".tmp")                         # ours alone: under the lock
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for layer, cols in tables.items():
            _write_layer(tmp / f"{layer_name(layer)}.parquet", cols, features_per_group)
        w = model_weights(model)
        manifest = {
            "format_version": FORMAT_VERSION, "transcoder_set": transcoders.name,
            "transcoder_repo": transcoders.repo_id, "revision": transcoders.revision,
            "model": str(getattr(model.cfg, "model_name", "") or type(model).__name__),
            "k": k, "n_heads": n_heads, "layers": transcoders.layers,
            "d_sae": {str(l): transcoders.d_sae(l) for l in transcoders.layers},
            "n_model_heads": int(w.W_V.shape[1]), "d_vocab": int(w.W_E.shape[0]),
            "features_per_group": features_per_group,
            "fingerprints": {str(l): _layer_fingerprint(transcoders, l) for l in transcoders.layers},
            "model_fingerprint": _model_fingerprint(model),
            "seconds": round(time.perf_counter() - t0, 2), "device": str(device),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        replace_folder(tmp, out, _aside(out))
        if distributed:
            all_done(True)                                               # rank 0 has written them
        return cls(out)

    def __repr__(self) -> str:
        m = self.manifest
        n = sum(int(d) for d in m["d_sae"].values())
        return (f"WeightViews({str(self.directory)!r}, transcoders={m['transcoder_set']!r}, "
                f"layers={m['layers']}, features={n}, k={m['k']}, n_heads={m['n_heads']}, "
                f"built in {m['seconds']} s on {m['device']})")

    # -- checks --------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def n_heads(self) -> int:
        return int(self.manifest["n_heads"])

    def check_layer(self, layer) -> int:
        """``layer`` as an int, if these views cover it."""
        layer = as_integer(layer, "layer")
        if str(layer) not in self.manifest["d_sae"]:
            raise InvalidInputError(
                f"Layer {layer!r} has no weight views; they cover layers {self.manifest['layers']}.")
        return layer

    def check_feature(self, layer, feature) -> int:
        """``feature`` as an int, if it is one of layer ``layer``'s features."""
        layer = self.check_layer(layer)
        return check_feature(feature, int(self.manifest["d_sae"][str(layer)]), f"layer {layer}")

    def covers(self, k: int, n_heads: int) -> bool:
        """Whether the stored top lists are long enough for a request."""
        return k <= self.k and n_heads <= self.n_heads

    def verify(self, model=None, transcoders: TranscoderSet | None = None, layer: int | None = None) -> None:
        """Refuse views computed from other weights than ``model`` / ``transcoders``
        (checked on ``layer`` only, so other layers need not be loaded)."""
        m = self.manifest
        if transcoders is not None:
            if transcoders.name != m["transcoder_set"]:
                raise IncompatibleTranscoderError(
                    f"The weight views in {self.directory} belong to transcoder set "
                    f"{m['transcoder_set']!r}, not {transcoders.name!r}.")
            for l in ([layer] if layer is not None else transcoders.layers):
                key = ("tc", id(transcoders), l)
                if key not in self._verified:
                    if _layer_fingerprint(transcoders, l) != m["fingerprints"].get(str(l)):
                        raise IncompatibleTranscoderError(
                            f"The weight views in {self.directory} were computed from other layer-{l} "
                            "weights than these transcoders; rebuild them with "
                            "WeightViews.build(..., overwrite=True).")
                    self._verified[key] = True
        if model is not None and ("model", id(model)) not in self._verified:
            if _model_fingerprint(model) != m["model_fingerprint"]:
                raise IncompatibleTranscoderError(
                    f"The weight views in {self.directory} were computed with another model's "
                    "embedding, unembedding or attention weights; rebuild them for this model.")
            self._verified[("model", id(model))] = True

    # -- reading -------------------------------------------------------------------------
    def _decode_row(self, layer: int, feature: int) -> dict:
        """Every stored column of one feature, as numpy arrays (``row``, cached)."""
        layer = self.check_layer(layer)
        feature = self.check_feature(layer, feature)
        group = int(self.manifest["features_per_group"])
        table = self._files.row_group(f"{layer_name(layer)}.parquet", feature // group)
        i = feature - (feature // group) * group
        return {name: np.asarray(table.column(name)[i].values) for name in table.column_names
                if name != "feature"}

    def _k(self, k) -> int:
        """``k`` entries of a section: at most the ``k`` these views were built with."""
        if k is None:
            return self.k
        k = as_count(k, "k")
        if k > self.k:
            raise InvalidInputError(f"These weight views hold {self.k} entries per section, k={k} were asked "
                                    f"for: rebuild them with k >= {k}, or use tc_explore.circuits' live views.")
        return k

    def connections(self, layer: int, feature: int, direction: str = "upstream",
                    k: int | None = None) -> pd.DataFrame:
        if direction not in ("upstream", "downstream"):
            raise InvalidInputError(f"direction must be 'upstream' or 'downstream', got {direction!r}.")
        r = self.row(layer, feature)
        p = "up" if direction == "upstream" else "down"
        k = self._k(k)
        return pd.DataFrame({"layer": r[p + "_layer"][:k].astype(np.int64),
                             "feature": r[p + "_feature"][:k].astype(np.int64),
                             "score": r[p + "_score"][:k].astype(np.float64)})

    def logit_effects(self, model, layer: int, feature: int, k: int | None = None):
        r = self.row(layer, feature)
        k = self._k(k)
        return tuple(_token_frame(model, r[name + "_id"][:k], r[name][:k])
                     for name in ("logit_top", "logit_bottom"))

    def de_embeddings(self, model, layer: int, feature: int, k: int | None = None) -> pd.DataFrame:
        r = self.row(layer, feature)
        k = self._k(k)
        return _token_frame(model, r["deemb_id"][:k], r["deemb"][:k])

    def ov_norms(self, layer: int, feature: int) -> pd.DataFrame:
        r = self.row(layer, feature)
        H = int(self.manifest["n_model_heads"])
        flat = np.arange(len(r["ov_norm"]))
        return pd.DataFrame({"layer": flat // H, "head": flat % H,
                             "norm": r["ov_norm"].astype(np.float64)})

    def sections(self, model, layer: int, feature: int, k: int, n_heads: int) -> dict:
        """The dashboard's weight-based sections of one feature (see
        ``SECTIONS``); those that decode tokens only when ``model`` is given."""
        out = {"upstream": self.connections(layer, feature, "upstream", k),
               "downstream": self.connections(layer, feature, "downstream", k)}
        if model is not None:
            out["logits_boosted"], out["logits_suppressed"] = self.logit_effects(model, layer, feature, k)
            out["de_embeddings"] = self.de_embeddings(model, layer, feature, k)
            out["ov_de_embeddings"] = self.ov_de_embeddings(model, layer, feature, k, n_heads)
            out["ov_norms"] = self.ov_norms(layer, feature)
        return out

    def ov_de_embeddings(self, model, layer: int, feature: int, k: int | None = None,
                         n_heads: int | None = None) -> pd.DataFrame:
        r = self.row(layer, feature)
        H, stored_k = int(self.manifest["n_model_heads"]), self.k
        k = self._k(k)
        n_heads = self.n_heads if n_heads is None else as_count(n_heads, "n_heads")
        if n_heads > self.n_heads:
            raise InvalidInputError(f"These weight views hold {self.n_heads} OV heads per feature, n_heads="
                                    f"{n_heads} were asked for: rebuild them with n_heads >= {n_heads}.")
        tokens = r["ov_token"].reshape(-1, stored_k)[:n_heads, :k]          # [heads, k]
        scores = r["ov_score"].reshape(-1, stored_k)[:n_heads, :k]
        heads = np.repeat(r["ov_head"][:n_heads].astype(np.int64), tokens.shape[1])
        return pd.DataFrame({"layer": heads // H, "head": heads % H,
                             "token_id": tokens.reshape(-1).astype(np.int64),
                             "token": token_strings(model, tokens.reshape(-1)),
                             "score": scores.reshape(-1).astype(np.float64)})


def _token_frame(model, ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"token_id": ids.astype(np.int64), "token": token_strings(model, ids),
                         "score": scores.astype(np.float64)})


class LiveWeightViews:
    """The interface of ``WeightViews`` (``sections``), computed for one feature
    at a time from the weights (``tc_explore.circuits.invariant``): nothing to
    precompute, but each dashboard reads every layer's weights."""

    def __init__(self, transcoders: TranscoderSet):
        self.transcoders = transcoders

    def covers(self, k: int, n_heads: int) -> bool:
        return True

    def sections(self, model, layer: int, feature: int, k: int, n_heads: int) -> dict:
        from .circuits import invariant
        tcs = self.transcoders
        out = {"upstream": invariant.feature_connections(tcs, layer, feature, "upstream", k=k),
               "downstream": invariant.feature_connections(tcs, layer, feature, "downstream", k=k)}
        if model is not None:
            out["logits_boosted"], out["logits_suppressed"] = invariant.logit_effects(
                model, tcs, layer, feature, k=k)
            out["de_embeddings"] = invariant.de_embeddings(model, tcs, layer, feature, k=k)
            out["ov_de_embeddings"] = invariant.ov_de_embeddings(model, tcs, layer, feature, k=k,
                                                                 n_heads=n_heads)
            out["ov_norms"] = invariant.ov_norms(model, tcs, layer, feature)
        return out
