"""Directories of Parquet tables described by a ``manifest.json``: the storage
layer of feature indexes (``tc_explore.index``) and weight views
(``tc_explore.weight_views``). Files are written tmp-then-rename, so a crash
never leaves a half-written file under a final name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from .errors import CorruptFileError, InvalidInputError
from .integrity import atomic_write, reading, write_text_atomic


def layer_name(layer: int) -> str:
    """``layer_{LL}``: the file or folder name of one layer's tables."""
    return f"layer_{layer:02d}"


def read_manifest(directory: Path, missing: str) -> dict:
    """The parsed ``manifest.json`` of ``directory``; ``missing`` is the error
    message when there is none, CorruptFileError when it is not a JSON object."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise InvalidInputError(missing)
    with reading(path, "manifest", "Rebuild the folder's contents (or restore the file from a copy)."):
        data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise CorruptFileError(f"manifest {path} holds a JSON {type(data).__name__}, not an object; "
                               "rebuild the folder's contents (or restore the file from a copy).")
    return data


def atomic_write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def atomic_write_parquet(path: Path, blocks: Iterable, schema=None, compression: str = "lz4",
                         use_dictionary: bool = False) -> None:
    """Write a stream of Arrow tables (one row group or more each) as one file;
    ``schema`` defaults to the first table's.

    Index tables use no dictionary encoding (activations and windows hardly
    repeat, and trying it doubled both the write and the read of a row group)
    and LZ4 rather than zstd (files about 1.5x larger, written twice and read
    1.5x as fast)."""
    import pyarrow.parquet as pq

    with atomic_write(path) as tmp:
        writer = None
        try:
            for table in blocks:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, schema if schema is not None else table.schema,
                                              compression=compression, use_dictionary=use_dictionary)
                writer.write_table(table)
            if writer is None:                                      # no blocks: an empty file
                writer = pq.ParquetWriter(tmp, schema, compression=compression,
                                          use_dictionary=use_dictionary)
        finally:
            if writer is not None:
                writer.close()


class ParquetFiles:
    """Lazily opened Parquet files of one directory: each file's footer is
    parsed once, and the last ``cache_size`` row groups read are kept.
    ``verify(name)`` (optional) runs before a file is first opened; a file that
    cannot be parsed raises CorruptFileError, with ``remedy(name)`` as advice."""

    def __init__(self, directory: Path, cache_size: int, verify=None, remedy=None):
        self.directory = Path(directory)
        self._files: dict = {}
        self._verify = verify
        self._remedy = remedy or (lambda name: "Rebuild it (or restore it from a copy).")
        self.row_group = lru_cache(maxsize=cache_size)(self._read_row_group)

    def file(self, name: str):
        """The ParquetFile ``directory / name``."""
        file = self._files.get(name)
        if file is None:
            import pyarrow.parquet as pq
            if self._verify is not None:
                self._verify(name)
            with self.reading(name):
                file = self._files[name] = pq.ParquetFile(self.directory / name)
        return file

    def reading(self, name: str):
        """Context that turns a parse error of file ``name`` into CorruptFileError."""
        return reading(self.directory / name, "index file", self._remedy(name))

    def read_table(self, name: str, **kwargs):
        """The whole file ``name`` as an Arrow table (verified like ``file``)."""
        import pyarrow.parquet as pq
        if self._verify is not None:
            self._verify(name)
        with self.reading(name):
            return pq.read_table(self.directory / name, **kwargs)

    def _read_row_group(self, name: str, group: int):
        file = self.file(name)
        with self.reading(name):
            return file.read_row_group(group, use_threads=False)
