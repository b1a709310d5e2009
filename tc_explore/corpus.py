"""Corpora: text from anywhere turned into fixed-length token sequences.

Every sequence starts with BOS; documents are concatenated across sequence
boundaries with a separator token (EOS, which is BOS for GPT-2) between them,
so no token is wasted on padding. The order of documents is shuffled with a
seed, so the same ``Corpus`` always yields the same sequences: a feature
index can be resumed, or built in shards on several machines, and still point
at the same tokens.

    corpus = Corpus.from_hub("Skylion007/openwebtext", model, seq_len=128,
                             n_documents=2000)   # downloaded once, then read from disk
    corpus = Corpus.from_hub("Skylion007/openwebtext", model, seq_len=128)  # streamed each pass
    corpus = Corpus.from_texts(["some text", ...], model, seq_len=64, seed=0)
    corpus = Corpus.from_files(["a.txt", "b.txt"], model, seq_len=64)
    tokens = corpus.take(100)            # [100, seq_len] int64

Slightly over 500 lines: one ``Corpus`` class with its three sources
(texts, files, a Hub dataset) and the token cache that makes a resumed or
sharded build read the same tokens.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from contextlib import contextmanager
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import InvalidInputError, OfflineFileMissingError, TokenizationWarning, as_count
from .model import token_id_tensor

# Documents are tokenized this many at a time (fast tokenizers batch well).
_TOKENIZE_CHUNK = 256


def _tokenizer_of(model_or_tokenizer):
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is not None:
        return tok
    if callable(model_or_tokenizer) and hasattr(model_or_tokenizer, "convert_ids_to_tokens"):
        return model_or_tokenizer
    raise InvalidInputError(
        f"Expected a model with a tokenizer or a Hugging Face tokenizer, got "
        f"{type(model_or_tokenizer).__name__}.")


def vocab_size(model_or_tokenizer) -> int | None:
    """The number of token ids a model embeds (or a tokenizer knows); None if unknown."""
    if model_or_tokenizer is None:
        return None
    cfg = getattr(model_or_tokenizer, "cfg", None)
    if cfg is not None and getattr(cfg, "d_vocab", None):
        return int(cfg.d_vocab)
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    try:
        return len(tok)
    except TypeError:
        return None


def _special_ids(tokenizer, bos_token_id: int | None, separator_token_id: int | None) -> tuple[int, int]:
    bos = bos_token_id if bos_token_id is not None else tokenizer.bos_token_id
    if bos is None:
        raise InvalidInputError(
            "The tokenizer has no BOS token; pass bos_token_id= (the token every sequence starts with).")
    sep = separator_token_id
    if sep is None:
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    return int(bos), int(sep)


@dataclass
class Corpus:
    """A reproducible stream of ``[seq_len]`` token sequences.

    ``documents`` is a zero-argument function returning a fresh iterator of
    documents, each a string or a list of token ids (already tokenized; no
    BOS). It is called again for every pass, so it must yield the same
    documents in the same order each time (shuffling is seeded).
    ``description`` identifies the corpus in an index manifest; two corpora
    with equal descriptions must yield equal sequences.
    """
    documents: Callable[[], Iterable[str | Sequence[int]]]
    tokenizer: Any
    seq_len: int
    bos_token_id: int
    separator_token_id: int
    description: dict = field(default_factory=dict)
    # Pre-tokenized sequences served as given instead of packing documents.
    fixed: np.ndarray | None = field(default=None, repr=False)
    _warned_unknown: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.seq_len = as_count(self.seq_len, "seq_len")
        if self.seq_len < 2:
            raise InvalidInputError(f"seq_len must be at least 2 (BOS and one token), got {self.seq_len}.")
        self.description = {**self.description, "seq_len": self.seq_len,
                            "bos_token_id": self.bos_token_id,
                            "separator_token_id": self.separator_token_id}

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Sequence[str], model_or_tokenizer, seq_len: int, seed: int | None = 0,
                   name: str = "texts", bos_token_id: int | None = None,
                   separator_token_id: int | None = None) -> "Corpus":
        """A list of strings; ``seed=None`` keeps their order."""
        if isinstance(texts, (str, bytes)):
            raise InvalidInputError(f"from_texts takes a list of strings, got one string {texts!r:.60}: "
                                    "wrap it in a list.")
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError("from_texts needs a non-empty list of strings.")
        order = _permutation(len(texts), seed)
        tok = _tokenizer_of(model_or_tokenizer)
        bos, sep = _special_ids(tok, bos_token_id, separator_token_id)
        return cls(lambda: (texts[i] for i in order), tok, seq_len, bos, sep,
                   {"kind": "texts", "name": name, "n_documents": len(texts), "seed": seed,
                    "tokenizer": _tokenizer_name(tok)})

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], model_or_tokenizer, seq_len: int,
                   seed: int | None = 0, split: str = "file", encoding: str = "utf-8",
                   bos_token_id: int | None = None, separator_token_id: int | None = None) -> "Corpus":
        """Local text files. ``split``: each ``"file"`` is one document, or each
        ``"line"``, or each ``"paragraph"`` (blank-line separated)."""
        if split not in ("file", "line", "paragraph"):
            raise InvalidInputError(f"split must be 'file', 'line' or 'paragraph', got {split!r}.")
        paths = [Path(p) for p in paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InvalidInputError(f"These corpus files do not exist: {missing}.")
        order = _permutation(len(paths), seed)
        tok = _tokenizer_of(model_or_tokenizer)
        bos, sep = _special_ids(tok, bos_token_id, separator_token_id)

        def documents():
            for i in order:
                try:
                    text = paths[i].read_text(encoding=encoding)
                except UnicodeDecodeError as err:
                    raise InvalidInputError(
                        f"Corpus file {paths[i]} is not {encoding} text ({err.reason} at byte "
                        f"{err.start}). Pass text files, or encoding= for another encoding.") from None
                if split == "file":
                    yield text
                elif split == "line":
                    yield from (line for line in text.splitlines() if line.strip())
                else:
                    yield from (p.strip() for p in text.split("\n\n") if p.strip())

        return cls(documents, tok, seq_len, bos, sep,
                   {"kind": "files", "paths": [str(p) for p in paths], "split": split, "seed": seed,
                    "tokenizer": _tokenizer_name(tok)})

    @classmethod
    def from_dataset(cls, dataset, model_or_tokenizer, seq_len: int, seed: int | None = 0,
                     text_column: str = "text", shuffle_buffer: int = 10_000, name: str | None = None,
                     bos_token_id: int | None = None, separator_token_id: int | None = None) -> "Corpus":
        """A ``datasets.Dataset`` (shuffled by a seeded permutation) or an
        ``IterableDataset`` (streaming; shuffled with a seeded buffer of
        ``shuffle_buffer`` documents, as ``datasets`` does it)."""
        import datasets

        features = getattr(dataset, "column_names", None) or list(getattr(dataset, "features", None) or [])
        if features and text_column not in features:
            raise InvalidInputError(
                f"The dataset has no column {text_column!r}; its columns are {list(features)}. "
                "Pass text_column=.")
        if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            raise InvalidInputError(f"from_dataset takes a datasets.Dataset or IterableDataset, got "
                                    f"{type(dataset).__name__}; use from_texts for a list of strings.")
        streaming = isinstance(dataset, datasets.IterableDataset)
        dataset = _shuffled(dataset, seed, shuffle_buffer)
        tok = _tokenizer_of(model_or_tokenizer)
        bos, sep = _special_ids(tok, bos_token_id, separator_token_id)
        info = getattr(dataset, "info", None)
        desc = {"kind": "dataset", "name": name or getattr(info, "dataset_name", None) or "dataset",
                "config": getattr(info, "config_name", None), "split": str(getattr(dataset, "split", None)),
                "text_column": text_column, "streaming": streaming, "seed": seed,
                "shuffle_buffer": shuffle_buffer if streaming else None,
                "tokenizer": _tokenizer_name(tok)}
        if not streaming:
            desc["n_documents"] = len(dataset)
            desc["fingerprint"] = getattr(dataset, "_fingerprint", None)
        return cls(lambda: (row[text_column] for row in dataset), tok, seq_len, bos, sep, desc)

    @classmethod
    def from_hub(cls, path: str, model_or_tokenizer, seq_len: int, split: str = "train",
                 name: str | None = None, seed: int | None = 0, text_column: str = "text",
                 n_documents: int | None = None, revision: str | None = None,
                 streaming: bool = True, shuffle_buffer: int = 10_000, **load_kwargs) -> "Corpus":
        """A dataset on the Hub (e.g. ``"Skylion007/openwebtext"`` for GPT-2).

        With ``n_documents``, the first that many documents of the split are
        downloaded once and kept on disk (``hub_slice``), and every later run,
        offline too, reads them from there: the corpus is fixed and needs the
        Hub once. Without it the split is streamed on every pass (nothing larger
        than the shuffle buffer is held), or loaded whole through the
        ``datasets`` cache with ``streaming=False``. Streamed, the dataset is
        opened only when documents are first read, so a corpus whose sequences
        are in the token cache (``cached``) needs no network."""
        import datasets

        if n_documents is not None:
            ds = hub_slice(path, n_documents, name=name, split=split, revision=revision,
                           text_column=text_column, **load_kwargs)
            corpus = cls.from_dataset(ds, model_or_tokenizer, seq_len, seed=seed,
                                      text_column=text_column, name=path)
            corpus.description.update({"name": path, "config": name, "split": split,
                                       "revision": revision, "first_documents": int(n_documents)})
            return corpus
        if not streaming:
            ds = datasets.load_dataset(path, name, split=split, streaming=False, revision=revision,
                                       **load_kwargs)
            corpus = cls.from_dataset(ds, model_or_tokenizer, seq_len, seed=seed,
                                      text_column=text_column, shuffle_buffer=shuffle_buffer, name=path)
            corpus.description.update({"name": path, "config": name, "split": split})
            return corpus
        tok = _tokenizer_of(model_or_tokenizer)
        bos, sep = _special_ids(tok, None, None)

        def documents():
            from .hub_access import hub_access
            with hub_access() as access:
                try:
                    ds = datasets.load_dataset(path, name, split=split, streaming=True,
                                               revision=revision, **load_kwargs)
                except Exception as err:
                    if access.mode == "online" or os.path.isdir(path):
                        raise
                    raise OfflineFileMissingError(
                        f"Streaming dataset {path!r} needs the Hub, and " +
                        ("HF_HUB_OFFLINE=1 is set" if access.mode == "offline" else
                         f"the Hub cannot be reached from this machine ({access.reason})") +
                        f" ({type(err).__name__}: {str(err)[:200]}). Use a fixed slice that is "
                        "downloaded once and then read from disk: "
                        f"Corpus.from_hub({path!r}, ..., n_documents=N), run once where the Hub "
                        "is reachable.") from err
            return (row[text_column] for row in _shuffled(ds, seed, shuffle_buffer))

        return cls(documents, tok, seq_len, bos, sep,
                   {"kind": "dataset", "name": path, "config": name, "split": split,
                    "text_column": text_column, "streaming": True, "seed": seed,
                    "shuffle_buffer": shuffle_buffer, "tokenizer": _tokenizer_name(tok)})

    @classmethod
    def from_token_ids(cls, sequences: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
                       model_or_tokenizer=None, name: str = "tokens", bos_token_id: int | None = None) -> "Corpus":
        """Sequences already tokenized, ``[n_seq, seq_len]``; they are used as
        they are (the first column should be BOS)."""
        arr = token_id_tensor(sequences, vocab_size(model_or_tokenizer), "corpus token ids").numpy()
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise InvalidInputError(
                f"from_token_ids needs a non-empty [n_seq, seq_len] array, got shape {arr.shape}.")
        tok = None if model_or_tokenizer is None else _tokenizer_of(model_or_tokenizer)
        bos = int(bos_token_id if bos_token_id is not None else arr[0, 0])
        digest = _digest(arr)
        return cls(lambda: iter(()), tok, arr.shape[1], bos, bos,
                   {"kind": "token_ids", "name": name, "n_sequences": int(arr.shape[0]),
                    "sha1": digest}, fixed=arr)

    # -- sequences --------------------------------------------------------------------
    def sequences(self) -> Iterator[np.ndarray]:
        """Every ``[seq_len]`` sequence in order: BOS, then the next
        ``seq_len - 1`` tokens of the document stream."""
        if self.fixed is not None:
            yield from (np.asarray(seq, dtype=np.int64) for seq in self.fixed)
            return
        body = self.seq_len - 1
        buffer: list[int] = []
        first = True
        for chunk in _chunks(self.documents(), _TOKENIZE_CHUNK):
            for ids in self._tokenize(chunk):
                if not ids:
                    continue
                if not first:
                    buffer.append(self.separator_token_id)
                buffer.extend(ids)
                first = False
                while len(buffer) >= body:
                    yield np.array([self.bos_token_id] + buffer[:body], dtype=np.int64)
                    del buffer[:body]

    def _tokenize(self, docs: list) -> list[list[int]]:
        texts = [d for d in docs if isinstance(d, str)]
        if len(texts) == len(docs):
            out = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        else:
            d_vocab = vocab_size(self.tokenizer)
            out = [self.tokenizer(d, add_special_tokens=False)["input_ids"] if isinstance(d, str)
                   else token_id_tensor(d, d_vocab, "corpus document's token ids").tolist()
                   for d in docs]
        if not self._warned_unknown:
            self._warn_unknown(docs, out)
        return out

    def _warn_unknown(self, docs: list, ids: list[list[int]]) -> None:
        """Warn once per corpus (naming the words of the first chunk of documents
        that has any) when the tokenizer maps words to its unknown token, which
        the demo's word-level tokenizer does silently."""
        from .tokenization import unknown_pieces, unknown_warning
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None:
            return
        pieces = [p for doc, doc_ids in zip(docs, ids) if isinstance(doc, str) and unk in doc_ids
                  for p in unknown_pieces(self.tokenizer, doc, doc_ids)]
        if pieces:
            self._warned_unknown = True
            warnings.warn(unknown_warning(self.tokenizer, pieces, "Corpus documents") +
                          " (Shown once per corpus.)", TokenizationWarning, stacklevel=4)

    def batches(self, batch_size: int, n_sequences: int | None = None,
                start: int = 0) -> Iterator[np.ndarray]:
        """``[<=batch_size, seq_len]`` int64 arrays of sequences ``start ..
        start + n_sequences`` (all remaining when None)."""
        batch_size, start = as_count(batch_size, "batch_size"), as_count(start, "start", minimum=0)
        if n_sequences is not None:
            n_sequences = as_count(n_sequences, "n_sequences", minimum=0)
        stop = None if n_sequences is None else start + n_sequences
        if self.fixed is not None:                                  # slices, no Python loop
            stop = len(self.fixed) if stop is None else min(stop, len(self.fixed))
            for lo in range(start, stop, batch_size):
                yield np.asarray(self.fixed[lo:min(lo + batch_size, stop)], dtype=np.int64)
            return
        batch: list[np.ndarray] = []
        for i, seq in enumerate(self.sequences()):
            if stop is not None and i >= stop:
                break
            if i < start:
                continue
            batch.append(seq)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def cached(self, n_sequences: int, cache_dir: str | os.PathLike | None = None,
               progress: bool | None = None) -> "Corpus":
        """This corpus's first ``n_sequences`` sequences, tokenized once into a
        cache file and served from there (memory-mapped) by every later call:
        a resumed build, the shards of a distributed build and a notebook run
        again read the same tokens without streaming or tokenizing anything,
        and without network once the cache holds them.

        The cache lives in ``datasets``' cache (``HF_DATASETS_CACHE``, or
        ``cache_dir``), keyed by the corpus description; a cache holding at
        least ``n_sequences`` sequences is reused as it is, a shorter one is
        rebuilt. Concurrent callers (ranks of one machine) wait for the one
        that writes it. The returned corpus has this one's description and
        yields only the cached sequences."""
        if self.fixed is not None:
            return self
        n_sequences = int(n_sequences)
        if n_sequences < 1:
            raise InvalidInputError(f"n_sequences must be at least 1, got {n_sequences}.")
        key = hashlib.sha256(json.dumps(self.description, sort_keys=True, default=str).encode())
        directory = Path(cache_dir if cache_dir is not None else _datasets_cache()) / key.hexdigest()[:24]
        directory.mkdir(parents=True, exist_ok=True)
        tokens = _read_token_cache(directory, n_sequences)
        if tokens is None:
            with _file_lock(directory / ".lock"):
                tokens = _read_token_cache(directory, n_sequences)       # written while we waited?
                if tokens is None:
                    tokens = self._write_token_cache(directory, n_sequences, progress)
        return Corpus(self.documents, self.tokenizer, self.seq_len, self.bos_token_id,
                      self.separator_token_id, dict(self.description), fixed=tokens)

    def _write_token_cache(self, directory: Path, n_sequences: int, progress: bool | None) -> np.ndarray:
        tmp = directory / "tokens.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n_sequences, self.seq_len))
        from .progress import progress_bar
        bar = progress_bar(total=n_sequences * self.seq_len, desc="tokenizing corpus", unit="tok",
                           unit_scale=True, progress=progress)
        got = 0
        for batch in self.batches(1024, n_sequences):
            out[got:got + len(batch)] = batch
            got += len(batch)
            bar.update(batch.size)
        bar.close()
        out.flush()
        del out
        if got < n_sequences:                                       # the corpus is shorter: keep what it has
            np.save(tmp, np.array(np.load(tmp, mmap_mode="r")[:got]))
        os.replace(tmp, directory / "tokens.npy")
        info = {"description": self.description, "n_sequences": got, "exhausted": got < n_sequences}
        (directory / "corpus.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str),
                                               encoding="utf-8")
        return np.load(directory / "tokens.npy", mmap_mode="r")

    def take(self, n_sequences: int, start: int = 0) -> torch.Tensor:
        """Sequences ``start .. start + n_sequences`` as a ``[n, seq_len]`` tensor;
        raises if the corpus is shorter."""
        n_sequences = as_count(n_sequences, "n_sequences")
        parts = list(self.batches(n_sequences, n_sequences, start))
        got = sum(len(p) for p in parts)
        if got < n_sequences:
            raise InvalidInputError(
                f"The corpus yields only {start + got} sequences of {self.seq_len} tokens; "
                f"{start + n_sequences} were asked for. Use fewer tokens or a larger corpus.")
        return torch.from_numpy(np.concatenate(parts))


def hub_slice_directory(path: str, n_documents: int, name: str | None = None, split: str = "train",
                        revision: str | None = None, text_column: str = "text") -> Path:
    """Where ``hub_slice`` keeps a slice: under the ``datasets`` cache
    (``HF_HOME/datasets`` by default), so copying the Hugging Face cache
    carries it along."""
    import hashlib

    import datasets

    source = str(Path(path).resolve()) if os.path.isdir(path) else path
    key = json.dumps([source, name, split, revision, text_column, int(n_documents)])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-80:]
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path(datasets.config.HF_DATASETS_CACHE) / "tc_explore_slices" / \
        f"{slug}-{split}-first{int(n_documents)}-{digest}"


def hub_slice(path: str, n_documents: int, name: str | None = None, split: str = "train",
              revision: str | None = None, text_column: str = "text", **load_kwargs):
    """The first ``n_documents`` documents (column ``text_column``) of a Hub
    dataset's split as a ``datasets.Dataset``: streamed from the Hub the first
    time and saved with ``save_to_disk`` (see ``hub_slice_directory``); read
    from disk, without any network access, every time after. Where the slice is
    not cached and the Hub cannot be used, the error says so and how to fix it.

        hub_slice("Skylion007/openwebtext", 2000)"""
    import datasets

    from .hub_access import hub_access

    n_documents = as_count(n_documents, "n_documents")
    directory = hub_slice_directory(path, n_documents, name, split, revision, text_column)
    if (directory / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(directory))
    local = os.path.isdir(path)
    with hub_access() as access:
        if access.mode != "online" and not local:
            command = (f"python -c \"from tc_explore.corpus import hub_slice; "
                       f"hub_slice({path!r}, {n_documents}"
                       + (f", name={name!r}" if name else "") + (f", split={split!r}" if split != "train" else "")
                       + (f", revision={revision!r}" if revision else "") + ")\"")
            raise OfflineFileMissingError(access.missing(
                f"The first {n_documents} documents of dataset {path!r} ({split})", command,
                cache=str(directory.parent)))
        stream = datasets.load_dataset(path, name, split=split, streaming=True, revision=revision,
                                       **load_kwargs)
        columns = getattr(stream, "column_names", None)
        if columns and text_column not in columns:
            raise InvalidInputError(f"Dataset {path!r} has no column {text_column!r}; its columns "
                                    f"are {columns}. Pass text_column=.")
        texts = [row[text_column] for row in itertools.islice(stream, n_documents)]
    if len(texts) < n_documents:
        raise InvalidInputError(f"Dataset {path!r} ({split}) has only {len(texts)} documents; "
                                f"{n_documents} were asked for.")
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict({text_column: texts}).save_to_disk(str(tmp))
    try:
        tmp.rename(directory)        # atomic: a half-written slice is never read
    except OSError:                  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(directory))


def as_corpus(source, model, seq_len: int | None = None, seed: int | None = 0) -> Corpus:
    """Accept a Corpus, a list of strings, a ``datasets`` dataset or a token
    tensor wherever a corpus is expected."""
    if isinstance(source, Corpus):
        return source
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return Corpus.from_token_ids(source, model)
    seq_len = seq_len or min(int(model.cfg.n_ctx), 128)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source):
        return Corpus.from_texts(source, model, seq_len, seed=seed)
    try:
        import datasets
        if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
            return Corpus.from_dataset(source, model, seq_len, seed=seed)
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    raise InvalidInputError(
        f"Cannot make a corpus from {type(source).__name__}: pass a tc_explore.corpus.Corpus, a "
        "list of strings, a datasets.Dataset / IterableDataset or a [n_seq, seq_len] token tensor.")


def _shuffled(dataset, seed: int | None, shuffle_buffer: int):
    """A dataset shuffled with ``seed``: a seeded permutation in memory, a seeded
    buffer of ``shuffle_buffer`` documents when streaming (as ``datasets`` does it)."""
    import datasets
    if seed is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return dataset.shuffle(seed=seed)


def _datasets_cache() -> Path:
    import datasets.config
    return Path(datasets.config.HF_DATASETS_CACHE) / "tc_explore_tokens"


def _read_token_cache(directory: Path, n_sequences: int) -> np.ndarray | None:
    """The first ``n_sequences`` cached sequences (all there are if the corpus
    ran out before), or None when the cache holds fewer."""
    info_path, path = directory / "corpus.json", directory / "tokens.npy"
    if not (info_path.is_file() and path.is_file()):
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info["n_sequences"] < n_sequences and not info.get("exhausted"):
        return None
    return np.load(path, mmap_mode="r")[:n_sequences]


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (flock) on ``path`` for the block."""
    import fcntl
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _permutation(n: int, seed: int | None) -> list[int]:
    if seed is None:
        return list(range(n))
    return np.random.default_rng(as_count(seed, "seed", minimum=0)).permutation(n).tolist()


def _chunks(it: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenizer_name(tok) -> str | None:
    return getattr(tok, "name_or_path", None) or type(tok).__name__


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
