"""Index builds spread over processes, GPUs and machines with torch.distributed.

Launched by ``torchrun`` (one process per device)::

    torchrun --nproc-per-node 8 -m tc_explore.index build --model gpt2 \\
        --transcoders gpt2-small --dataset Skylion007/openwebtext --tokens 100M --out idx/

every rank builds shard ``(rank, world_size)`` of the index on its own device
into ``<out>.shards/RRRRR-of-WWWWW/`` (an ordinary resumable build, with its
checkpoints); when all ranks are done (a barrier through torch.distributed:
gloo on CPU, NCCL on GPU), rank 0 merges the shards into ``<out>`` and removes
them. The accumulators are order-independent, so the result is the index a
single process would have built, byte for byte apart from its timestamp.

The corpus is tokenized once, by the first rank to get there, into the token
cache (``Corpus.cached``); the others wait for it and read their slices.

If a rank fails, torchrun stops the others; every shard keeps its last
checkpoint, and launching the same command again resumes each rank where it
stopped (with the same number of ranks: shards are named by rank and world
size). Ranks on several machines need ``<out>`` on a filesystem they share.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from ..corpus import as_corpus
from ..errors import IndexLockedError, InvalidInputError
from ..distributed import all_done, raise_where_rank0_failed
from ..transcoder import TranscoderSet
from .build import IndexSettings, _plan, _RESUME_KEYS, build_index, merge_indexes
from .lock import FolderLock
from .storage import IndexManifest, read_manifest

def shard_directory(out_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    out = Path(out_dir)
    return out.with_name(out.name + ".shards") / f"{rank:05d}-of-{world_size:05d}"


def remove_shards(out_dir: str | os.PathLike, shards: list[Path] | None = None) -> None:
    """Delete the shard folders of ``out_dir``'s distributed build (default:
    all of them, of any world size), each under its own lock, so a shard that
    a live process still builds is refused (``IndexLockedError``), never
    deleted; then the ``<out>.shards`` folder once it is empty."""
    parent = shard_directory(out_dir, 0, 1).parent
    if shards is None:
        shards = sorted(p for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    for d in shards:
        with FolderLock(d, "remove shard"):
            shutil.rmtree(d, ignore_errors=True)
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def _finished(out: Path, manifest: IndexManifest) -> bool:
    """Whether ``out`` already holds this very index, finished."""
    if not (out / "manifest.json").is_file():
        return False
    old, new = read_manifest(out, ""), manifest.to_json()
    if any(old.get(key) != new.get(key) for key in _RESUME_KEYS):
        raise InvalidInputError(
            f"{out} holds an index built with different settings; use another output directory, "
            "the same arguments, or overwrite.")
    return bool(old.get("complete"))


def build_distributed(model, transcoders: TranscoderSet, corpus, n_tokens: int,
                      out_dir: str | os.PathLike, settings: IndexSettings | None = None,
                      keep_shards: bool = False, **options):
    """This rank's part of a distributed build (see the module docstring); call
    it on every rank of an initialised process group, each with the model and
    transcoders on its own device. Returns the ``FeatureIndex`` on every rank
    once rank 0 has merged, or None on every rank if a shard stopped early
    (``max_batches``)."""
    import torch.distributed as dist

    from .reader import FeatureIndex

    if not dist.is_initialized():
        raise InvalidInputError("build_distributed needs torch.distributed initialised (run under "
                                "torchrun; see tc_explore.index.distributed.init_process_group).")
    s = IndexSettings.of(settings, options)
    if s.shard is not None:
        raise InvalidInputError("Under torch.distributed each rank builds shard (rank, world_size); "
                                "do not pass shard.")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    corpus = as_corpus(corpus, model)
    if s.overwrite:
        refusal = None
        if rank == 0:
            # Each folder under its own lock: a live build of ``out`` or of one of
            # its shards is refused, never deleted.
            try:
                with FolderLock(out, "overwrite"):
                    shutil.rmtree(out, ignore_errors=True)
                remove_shards(out)
            except IndexLockedError as err:
                refusal = err
        raise_where_rank0_failed(refusal, f"clear {out} for overwrite=True (a live process holds it "
                                          "or one of its shards)")
        s = replace(s, overwrite=False)
    if _finished(out, _plan(model, transcoders, corpus, n_tokens, s)):
        return FeatureIndex(out)
    total_sequences = int(n_tokens) // corpus.seq_len
    if corpus.fixed is None:
        corpus = corpus.cached(total_sequences, progress=s.progress if rank == 0 else False)
    shard = shard_directory(out, rank, world)
    shard_settings = replace(s, shard=(rank, world), progress=s.progress if rank == 0 else False)
    done = build_index(model, transcoders, corpus, n_tokens, shard, shard_settings) is not None
    if not all_done(done):
        return None
    if rank == 0:
        shards = [shard_directory(out, r, world) for r in range(world)]
        parts = [(d, IndexManifest.from_json(read_manifest(d, f"shard {d} has no manifest"), d))
                 for d in shards]
        merge_indexes(parts, out, overwrite=False)
        if not keep_shards:
            remove_shards(out, shards)
    all_done(True)                                                 # rank 0 has merged
    return FeatureIndex(out)
