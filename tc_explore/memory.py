"""The process's memory as the operating system counts it."""
from __future__ import annotations

import ctypes
import gc
import sys


def release_free_heap(collect_garbage: bool = True) -> None:
    """Give the C heap's free pages back to the operating system (glibc's
    ``malloc_trim``; elsewhere nothing), after a garbage collection unless
    ``collect_garbage`` is False (it takes ~0.2 s with a model loaded).

    Loading a model and transcoders frees hundreds of MiB in pieces small
    enough for glibc to keep in its heaps (one per thread), where they count
    in the process's resident memory until reused. ``FeatureIndex.build``
    calls this (without collecting garbage) before allocating its
    accumulators and after every CPU batch (0.2 ms when there is nothing to
    give back, ~60 ms for what loading GPT-2 small and its transcoders leaves;
    measured there, a build's peak resident memory 0.3 GiB lower); the
    benchmarks call it before measuring a peak."""
    if not sys.platform.startswith("linux"):
        return
    if collect_garbage:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc (e.g. musl)
        pass
