"""How a feature index lies on disk (written and read through the storage
layer it shares with weight views, ``tc_explore.store``).

An index directory::

    manifest.json                       IndexManifest: model, transcoder set, corpus, tokens, k, bins, layers
    tokens.parquet                      sequence, tokens (fixed_size_list<int32>[seq_len])
    layer_{LL}/stats.parquet            feature, n_firing, act_sum, max, histogram
    layer_{LL}/top.parquet              feature, rank, sequence, position, activation, window
    layer_{LL}/samples.parquet          feature, rank, sequence, position, activation, priority, window
    weight_views/                       optional, see tc_explore.weight_views
    checkpoint.pt                       only while a build is unfinished

``window`` is the feature's activation on the tokens around the indexed one,
``window[0]`` at position - before: fixed_size_binary of little-endian float16
values (``np.frombuffer(value, "<f2")``; ``FeatureIndex.table`` decodes it).
Per-layer tables are written in row groups of ``features_per_group``
features, so opening one feature reads one small row group.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import CorruptFileError, InvalidInputError
from ..integrity import sha256_file
# the shared storage layer, used by the index modules through this one
from ..store import (ParquetFiles, atomic_write_json, atomic_write_parquet, layer_name,  # noqa: F401
                     read_manifest)
from .accumulator import _Best

# 2: windows stored as fixed-size binary (little-endian float16 values), not
#    list<float16>: Parquet's per-element list levels made writing them the
#    slowest part of finishing a build.
FORMAT_VERSION = 2
TABLES = ("stats", "top", "samples")


# -- the manifest ------------------------------------------------------------------------
_OMITTED_WHEN_NONE = ("built_at", "batches_done_hint", "merged_from", "fingerprints", "checksums")


@dataclass
class IndexManifest(Mapping):
    """An index's ``manifest.json``: what was indexed, with which settings.

    ``d_sae`` maps layer -> number of features (string keys in JSON). As a
    read-only mapping (``manifest["n_tokens"]``, ``.items()``) it shows the
    JSON values, for code written against the raw file. Keys this version does not know are kept in
    ``extra`` and written back unchanged."""
    format_version: int
    model: str
    transcoder_set: str
    transcoder_repo: str | None
    revision: str | None
    corpus: dict                  # Corpus.description
    seq_len: int
    layers: list
    d_sae: dict
    k: int
    n_samples: int
    batch_size: int
    histogram_edges: list
    window: tuple                 # (before, after)
    seed: int
    total_sequences: int          # of the whole build (all shards)
    sequence_start: int
    sequence_stop: int
    n_batches: int
    n_sequences: int
    n_tokens: int
    n_tokens_counted: int         # position 0 of each sequence left out
    positions_counted: str
    shard: list | None            # (i, n) of a shard build; the shard directories of a merge
    features_per_group: int
    tokens_rows_per_group: int
    complete: bool = False
    built_at: str | None = None
    batches_done_hint: int | None = None   # while unfinished: batches checkpointed
    merged_from: int | None = None
    # What the index was built from (see tc_explore.integrity): per-layer
    # transcoder fingerprints, the model's fingerprint, the tokenizer's and the
    # corpus's digests. Checked on resume, merge and when a dashboard is made.
    fingerprints: dict | None = None
    # sha256 of every data file (relative path -> hex), written when the index
    # is complete and checked when a file is first opened.
    checksums: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict, directory: Path | None = None) -> "IndexManifest":
        known = {f.name for f in fields(cls)} - {"extra"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        lacking = sorted(required - set(data))
        if lacking:
            where = f" in {directory}" if directory is not None else ""
            raise InvalidInputError(
                f"The index manifest{where} lacks {lacking}; it was not written by "
                "FeatureIndex.build. Rebuild the index.")
        values = {key: data[key] for key in known if key in data}
        try:
            values["d_sae"] = {int(layer): int(n) for layer, n in data["d_sae"].items()}
            values["window"] = tuple(int(w) for w in data["window"])
            values["layers"] = [int(layer) for layer in data["layers"]]
        except (AttributeError, TypeError, ValueError) as err:
            where = f" in {directory}" if directory is not None else ""
            raise CorruptFileError(
                f"The index manifest{where} is damaged: d_sae, window or layers do not have the "
                f"form FeatureIndex.build writes ({type(err).__name__}: {err}). Rebuild the index.") from None
        return cls(**values, extra={key: v for key, v in data.items() if key not in known})

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["d_sae"] = {str(layer): n for layer, n in self.d_sae.items()}
        out["window"] = list(self.window)
        for key in _OMITTED_WHEN_NONE:
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    def __getitem__(self, key: str):
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    @property
    def window_width(self) -> int:
        return self.window[0] + 1 + self.window[1]

    @property
    def n_bins(self) -> int:
        return len(self.histogram_edges) + 1


# -- the per-layer tables ----------------------------------------------------------------
def layer_path(directory: Path, layer: int, name: str) -> Path:
    return Path(directory) / layer_name(layer) / f"{name}.parquet"


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
    dense = {"score": torch.zeros(d_sae, k), "token": torch.full((d_sae, k), -1, dtype=torch.int64),
             "act": torch.zeros(d_sae, k), "window": torch.zeros(d_sae, k, width, dtype=torch.float16)}
    for name, values, dtype in (("score", score, np.float32), ("token", token, np.int64),
                                ("act", act, np.float32), ("window", window, np.float16)):
        dense[name][feat, rank] = torch.from_numpy(values.astype(dtype))
    best = _Best(d_sae, k, width, "cpu")
    best.load(dense)
    return best.state()


def tokens_schema(seq_len: int):
    """tokens.parquet: one row per sequence. Files read back name the list's
    child "element", not "item": tables from them are cast to this schema
    before being written again, so a merged file equals a built one."""
    import pyarrow as pa
    return pa.schema([("sequence", pa.int64()), ("tokens", pa.list_(pa.int32(), seq_len))])


def _flat_windows(column, width: int) -> np.ndarray:
    """A fixed_size_list column (tokens) as ``[n, width]``."""
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, width)



def write_layer(out: Path, layer: int, state: dict, n_bins: int, seq_len: int, group: int) -> None:
    """One layer's stats, top and samples tables from an accumulator state."""
    d = Path(out) / layer_name(layer)
    d.mkdir(parents=True, exist_ok=True)
    width = state["top"]["window"].shape[-1]
    atomic_write_parquet(d / "stats.parquet", _stats_blocks(state, n_bins, group), _stats_schema(n_bins))
    for kind in ("top", "samples"):
        atomic_write_parquet(d / f"{kind}.parquet", _best_blocks(state[kind], seq_len, group, kind),
                             _best_schema(kind, width))


def read_layer_state(directory: Path, manifest: IndexManifest, layer: int) -> dict:
    """Inverse of write_layer: the accumulator state of one layer (its files
    checked against the manifest's checksums)."""
    m, d_sae = manifest, manifest.d_sae[layer]
    width, seq_len = m.window_width, m.seq_len
    files = index_files(directory, manifest, cache_size=1)
    stats = files.read_table(f"{layer_name(layer)}/stats.parquet")
    hist = stats.column("histogram").combine_chunks().flatten().to_numpy()
    return {
        "top": _best_from_table(files.read_table(f"{layer_name(layer)}/top.parquet"), d_sae, m.k, width,
                                seq_len, "top"),
        "samples": _best_from_table(files.read_table(f"{layer_name(layer)}/samples.parquet"), d_sae,
                                    m.n_samples, width, seq_len, "samples"),
        "n_firing": torch.from_numpy(stats.column("n_firing").to_numpy().copy()),
        "act_sum": torch.from_numpy(stats.column("act_sum").to_numpy().copy()),
        "hist": torch.from_numpy(hist.astype(np.int64).copy()),
    }


# -- checksums -----------------------------------------------------------------------------
def data_file_names(manifest: IndexManifest) -> list[str]:
    """Every data file of an index, relative to its folder."""
    return ["tokens.parquet"] + [name for layer in manifest.layers for name in layer_file_names(layer)]


def layer_file_names(layer: int) -> list[str]:
    """One layer's data files, relative to the index's folder."""
    return [f"{layer_name(layer)}/{table}.parquet" for table in TABLES]


def file_checksums(directory: Path, names: list[str]) -> dict:
    """``{name: sha256}`` of the files ``directory / name`` (about 1 GB/s)."""
    return {name: sha256_file(Path(directory) / name) for name in names}


def _layer_of(name: str) -> int | None:
    head = name.split("/", 1)[0]
    return int(head[len("layer_"):]) if head.startswith("layer_") else None


def rebuild_advice(name: str) -> str:
    """What to do about a damaged data file ``name`` (a phrase, lower case)."""
    layer = _layer_of(name)
    if layer is None:
        return ("rebuild the index (FeatureIndex.build(..., overwrite=True)) or restore the file "
                "from a copy.")
    return (f"rebuild layer {layer}: build it again (FeatureIndex.build(..., layers=[{layer}]) into "
            "a new folder, or the whole index with overwrite=True), or restore the file from a copy.")


def _rebuild_sentence(name: str) -> str:
    advice = rebuild_advice(name)
    return advice[0].upper() + advice[1:]


class _Checksums:
    """Checks an index's files against its manifest's checksums, one layer at
    a time: opening any file of a layer checks all of that layer's files once."""

    def __init__(self, directory: Path, manifest: IndexManifest):
        self.directory = Path(directory)
        self.expected = dict(manifest.checksums or {})
        self.checked: set[str] = set()

    def verify(self, name: str) -> None:
        layer = _layer_of(name)
        group = [n for n in self.expected if _layer_of(n) == layer] if layer is not None else [name]
        for n in group:
            if n in self.checked or n not in self.expected:
                continue
            path = self.directory / n
            try:
                got = sha256_file(path)
            except FileNotFoundError:
                raise CorruptFileError(f"index file {n} of {self.directory} is missing; "
                                       f"{rebuild_advice(n)}") from None
            if got != self.expected[n]:
                raise CorruptFileError(
                    f"index file {n} of {self.directory} is corrupted (its sha256 is {got[:16]}…, "
                    f"the manifest recorded {self.expected[n][:16]}… when it was written); "
                    f"{rebuild_advice(n)}")
            self.checked.add(n)


def index_files(directory: Path, manifest: IndexManifest, cache_size: int) -> ParquetFiles:
    """The Parquet files of an index folder, each checked against the
    manifest's checksums when first opened (indexes built before checksums
    existed are read unchecked)."""
    return ParquetFiles(directory, cache_size, verify=_Checksums(directory, manifest).verify,
                        remedy=_rebuild_sentence)
