"""``FeatureIndex``: read a built index directory (see ``storage`` for its
layout), one feature's row group at a time."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import (FingerprintMismatchError, IncompatibleTranscoderError, IndexIncompleteError,
                      InvalidInputError, as_count, as_integer, check_feature)
from ..integrity import fingerprint_difference, model_fingerprint, tokenizer_digest
from ..transcoder import TranscoderSet
from .build import IndexSettings, build_index, merge_indexes
from .storage import (FORMAT_VERSION, TABLES, IndexManifest, _flat_windows, index_files,
                      _window_values, layer_name, layer_path, read_manifest)


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
        if not isinstance(directory, (str, os.PathLike)):
            raise InvalidInputError(f"A feature index is opened from its folder (a path), got "
                                    f"{type(directory).__name__} {directory!r:.60}.")
        self.directory = Path(directory)
        raw = read_manifest(self.directory, f"{self.directory} is not a feature index (no manifest.json).")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidInputError(
                f"The index in {self.directory} has format version {version}; this tc_explore reads "
                f"version {FORMAT_VERSION}. Rebuild it with FeatureIndex.build(..., overwrite=True).")
        if not raw.get("complete"):
            done = raw.get("batches_done_hint", "?")
            raise IndexIncompleteError(
                f"The index in {self.directory} is unfinished ({done} of "
                f"{raw['n_batches']} batches checkpointed). Run FeatureIndex.build "
                "again with the same arguments and out_dir to resume it.")
        self.manifest = IndexManifest.from_json(raw, self.directory)
        self.edges = np.asarray(self.manifest.histogram_edges)
        self._files = index_files(self.directory, self.manifest, cache_size=256)
        self._token_groups = lru_cache(maxsize=64)(self._read_token_group)
        self._verified: dict = {}           # (id(obj), what) -> weakref of an object checked

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FeatureIndex":
        return cls(directory)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def k(self) -> int:
        return int(self.manifest.k)

    @property
    def seq_len(self) -> int:
        return int(self.manifest.seq_len)

    @property
    def n_tokens(self) -> int:
        """Tokens counted in the statistics (position 0 of each sequence excluded)."""
        return int(self.manifest.n_tokens_counted)

    def d_sae(self, layer: int) -> int:
        return int(self.manifest.d_sae[self.check_layer(layer)])

    def check_layer(self, layer) -> int:
        """``layer`` as an int, if this index covers it."""
        layer = as_integer(layer, "layer")
        if layer not in self.manifest.layers:
            raise InvalidInputError(
                f"Layer {layer} is not in this index; it covers layers {self.layers}.")
        return layer

    def check_feature(self, layer, feature) -> int:
        """``feature`` as an int, if it is one of layer ``layer``'s features."""
        layer = self.check_layer(layer)
        return check_feature(feature, int(self.manifest.d_sae[layer]), f"layer {layer} of this index")

    def check_transcoders(self, transcoders: TranscoderSet | None,
                          layers: Sequence[int] | None = None) -> None:
        """Refuse to mix this index with a transcoder set it was not built from
        (another set's name, other widths, or other weights of ``layers``:
        default all the index's layers in the set); None passes."""
        if transcoders is None:
            return
        from ..transcoder import as_transcoder_set
        as_transcoder_set(transcoders)
        m = self.manifest
        if m.transcoder_set != transcoders.name:
            raise IncompatibleTranscoderError(
                f"The index in {self.directory} was built with transcoder set {m.transcoder_set!r}, "
                f"not {transcoders.name!r}; load that set, or build an index for this one.")
        for layer in self.layers:
            if layer in transcoders and transcoders.d_sae(layer) != self.d_sae(layer):
                raise IncompatibleTranscoderError(
                    f"Layer {layer}: the index has {self.d_sae(layer)} features but the transcoder has "
                    f"{transcoders.d_sae(layer)}; they do not belong together.")
        recorded = (m.fingerprints or {}).get("transcoders") or {}
        for layer in (self.layers if layers is None else [self.check_layer(l) for l in layers]):
            key = (id(transcoders), layer)
            if str(layer) not in recorded or layer not in transcoders or \
                    self._verified.get(key, lambda: None)() is transcoders:
                continue
            now = transcoders.fingerprint(layer)
            if now != recorded[str(layer)]:
                raise FingerprintMismatchError(
                    f"The index in {self.directory} was built with other layer-{layer} weights than "
                    f"these transcoders of {transcoders.name!r} (fingerprint {recorded[str(layer)]} "
                    f"then, {now} now): its examples and statistics do not describe these features. "
                    "Load the weights it was built with, or rebuild the index for these.")
            self._remember(key, transcoders)

    def check_model(self, model) -> None:
        """Refuse a model other than the one this index was built with: another
        tokenizer (examples would be decoded into other text) or other weights."""
        if model is not None:
            from ..model import check_model_surface
            check_model_surface(model)
        recorded = self.manifest.fingerprints or {}
        key = (id(model), "model")
        if model is None or not recorded or self._verified.get(key, lambda: None)() is model:
            return
        tokenizer = getattr(model, "tokenizer", None)
        if recorded.get("tokenizer") and tokenizer is not None and \
                tokenizer_digest(tokenizer) != recorded["tokenizer"]:
            raise FingerprintMismatchError(
                f"The index in {self.directory} was built with another tokenizer than this model's "
                f"({self.manifest.model!r}); its examples would be decoded into other text. Use the "
                "model it was built with.")
        diff = fingerprint_difference(recorded.get("model"), model_fingerprint(model))
        if diff:
            raise FingerprintMismatchError(
                f"The index in {self.directory} was built with another model: {diff}. Use the model "
                f"it was built with ({self.manifest.model!r}).")
        self._remember(key, model)

    def _remember(self, key, obj) -> None:
        try:
            self._verified[key] = weakref.ref(obj)
        except TypeError:                   # not weakly referenceable: checked every time
            pass

    # -- reading -----------------------------------------------------------------------
    def _path(self, layer: int, name: str) -> Path:
        return layer_path(self.directory, layer, name)

    def _feature_rows(self, layer: int, feature: int, name: str):
        layer = self.check_layer(layer)
        feature = self.check_feature(layer, feature)
        block = self._files.row_group(f"{layer_name(layer)}/{name}.parquet",
                                      feature // int(self.manifest.features_per_group))
        feats = block.column("feature").to_numpy()
        lo, hi = np.searchsorted(feats, feature), np.searchsorted(feats, feature, side="right")
        return block.slice(lo, hi - lo)

    def table(self, layer: int, name: str):
        """A whole per-layer table (``"stats"``, ``"top"`` or ``"samples"``) as a
        pandas DataFrame, for queries across features (windows decoded to float16
        arrays)."""
        if name not in TABLES:
            raise InvalidInputError(f"table must be one of {TABLES}, got {name!r}.")
        table = self._files.read_table(f"{layer_name(self.check_layer(layer))}/{name}.parquet")
        if "window" not in table.column_names:
            return table.to_pandas()
        frame = table.drop_columns(["window"]).to_pandas()
        frame["window"] = list(_window_values(table.column("window"), self.manifest.window_width))
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
        before = int(self.manifest.window[0])
        windows = _window_values(rows.column("window"), self.manifest.window_width)
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
        n_bands = as_count(n_bands, "n_bands")
        per_band = None if per_band is None else as_count(per_band, "per_band", minimum=0)
        samples = self.samples(layer, feature)
        bands = []
        for b, part in enumerate(np.array_split(np.arange(len(samples)), n_bands)):
            items = [samples[i] for i in part][:per_band]
            bands.append((1 - (b + 1) / n_bands, 1 - b / n_bands, items))
        return bands

    # -- tokens --------------------------------------------------------------------------
    def _read_token_group(self, group: int) -> np.ndarray:
        table = self._files.row_group("tokens.parquet", group)
        return _flat_windows(table.column("tokens"), self.seq_len)

    def sequence_tokens(self, sequence: int) -> np.ndarray:
        """Token ids ``[seq_len]`` of one (global) sequence index."""
        start, stop = self.manifest.sequence_start, self.manifest.sequence_stop
        sequence = as_integer(sequence, "sequence")
        if not start <= sequence < stop:
            raise InvalidInputError(f"Sequence {sequence} is not in this index ({start}..{stop - 1}).")
        rows = int(self.manifest.tokens_rows_per_group)
        return self._token_groups((sequence - start) // rows)[(sequence - start) % rows]

    def tokens(self) -> np.ndarray:
        """All indexed sequences, ``[n_seq, seq_len]`` (reads the whole table)."""
        return _flat_windows(self._files.read_table("tokens.parquet").column("tokens"),
                             self.seq_len)

    # -- search ------------------------------------------------------------------------
    def features_by_token(self, layer: int, token_id: int, limit: int = 20):
        """Features whose top examples most often sit on ``token_id``: a
        DataFrame[feature, count, max_activation], most frequent first."""
        import pandas as pd
        layer = self.check_layer(layer)
        token_id = as_integer(token_id, "token_id")
        limit = as_count(limit, "limit")
        if token_id < 0:
            raise InvalidInputError(f"token_id {token_id} is negative; token ids start at 0.")
        top = self.table(layer, "top")
        toks = self.tokens()
        start = self.manifest.sequence_start
        at = toks[top["sequence"].to_numpy() - start, top["position"].to_numpy()]
        hit = top[at == int(token_id)]
        if hit.empty:
            return pd.DataFrame({"feature": [], "count": [], "max_activation": []})
        out = hit.groupby("feature").agg(count=("rank", "size"), max_activation=("activation", "max"))
        return out.sort_values(["count", "max_activation"], ascending=False).head(limit).reset_index()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"FeatureIndex({str(self.directory)!r}, model={m.model!r}, "
                f"transcoders={m.transcoder_set!r}, layers={self.layers}, "
                f"n_tokens={self.n_tokens}, k={self.k})")

    # -- building ----------------------------------------------------------------------
    @classmethod
    def build(cls, model, transcoders: TranscoderSet, corpus, n_tokens: int,
              out_dir: str | os.PathLike, settings: IndexSettings | None = None,
              **options) -> "FeatureIndex | None":
        """Index ``n_tokens`` tokens of ``corpus`` (a Corpus, list of strings,
        ``datasets`` dataset or ``[n_seq, seq_len]`` token tensor) into ``out_dir``.

        Settings come from ``settings`` and/or keyword arguments with the names
        of ``IndexSettings`` fields (``layers``, ``k``, ``n_samples``,
        ``batch_size``, ``bins``, ``window``, ``seed``, ``checkpoint_every``,
        ``shard``, ``max_batches``, ``features_per_group``, ``overwrite``,
        ``progress``, ``fuse_layers``, ``pipeline``). Without ``checkpoint_every``
        (batches) a build checkpoints every 10 minutes.

        Resumes an unfinished build found in ``out_dir`` (same arguments),
        skipping its checkpointed batches. ``shard=(i, n)`` indexes only the
        i-th of n contiguous runs of batches; merge shard directories with
        ``FeatureIndex.merge``. ``max_batches`` stops (with a checkpoint) after
        that many new batches and returns None — for builds in time slices.
        """
        out = build_index(model, transcoders, corpus, n_tokens, out_dir,
                          IndexSettings.of(settings, options))
        return None if out is None else cls(out)

    @classmethod
    def merge(cls, shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
              overwrite: bool = False) -> "FeatureIndex":
        """Combine finished shards (same model, transcoders, corpus and settings;
        contiguous sequence ranges) into one index equal to a single build over
        their union."""
        if isinstance(shard_dirs, (str, bytes, os.PathLike)) or not isinstance(shard_dirs, Iterable):
            raise InvalidInputError(f"merge takes a list of shard folders, got {type(shard_dirs).__name__} "
                                    f"{shard_dirs!r:.60}.")
        shards = [cls(d) for d in shard_dirs]
        return cls(merge_indexes([(s.directory, s.manifest) for s in shards], out_dir, overwrite))

    # -- sharing -----------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str | None = None, api=None):
        """Upload this index to the Hub dataset repo ``repo_id`` (created if
        missing) in one commit, with a dataset card listing the model,
        transcoder set, corpus, token count, settings and weight fingerprints.
        ``revision`` is a branch (created if missing); ``api`` a
        ``huggingface_hub.HfApi`` (default: a new one). Returns the CommitInfo."""
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, api=api)

    @classmethod
    def from_hub(cls, repo_id: str, revision: str | None = None, *, model=None,
                 transcoders: TranscoderSet | None = None, cache_dir: str | os.PathLike | None = None,
                 token: str | None = None, local_files_only: bool = False) -> "FeatureIndex":
        """The index in Hub dataset repo ``repo_id`` (at ``revision``: branch,
        tag or commit), downloaded through the Hugging Face cache (offline, with
        ``HF_HUB_OFFLINE=1``, from the cache alone). Given ``model`` and/or
        ``transcoders``, it is refused unless it was built from those weights
        (transcoder set, widths, and weight fingerprints where it has them)."""
        from .hub import check_weights, download_index
        index = cls(download_index(repo_id, revision, cache_dir, token, local_files_only))
        check_weights(index, model, transcoders)
        return index
