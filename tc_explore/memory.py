"""The process's memory as the operating system counts it."""
from __future__ import annotations

import ctypes
import gc
import sys
from contextlib import contextmanager


def release_free_heap(collect_garbage: bool = True) -> None:
    """Give the C heap's free pages back to the operating system (glibc's
    ``malloc_trim``; elsewhere nothing), after a garbage collection unless
    ``collect_garbage`` is False (it takes ~0.2 s with a model loaded).

    Loading a model and transcoders frees hundreds of MiB in pieces small
    enough for glibc to keep in its heaps (one per thread), where they count
    in the process's resident memory until reused. ``FeatureIndex.build``
    calls this (without collecting garbage) before allocating its
    accumulators, before writing its tables and when it ends (0.2 ms when
    there is nothing to give back, ~60 ms for what loading GPT-2 small and
    its transcoders leaves); the benchmarks call it before measuring a peak."""
    if not sys.platform.startswith("linux"):
        return
    if collect_garbage:
        gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """The C library if it is glibc on Linux (with ``malloc_trim`` and
    ``mallopt``), else None (other systems, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest value glibc's own, dynamic mmap threshold reaches (64-bit), and
# the trim threshold it pairs with it.
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20
_TRIM_THRESHOLD_AT_MAX = 2 * _MMAP_THRESHOLD_MAX


def _mallopt(param: int, value: int) -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(param, value))


@contextmanager
def steady_heap(trim_threshold: int = 512 * 2 ** 20):
    """Keep the C heap's freed pages for reuse while the block runs, instead
    of handing them back to the operating system and faulting them in again.

    By default glibc trims its heaps whenever their free top passes a
    threshold that follows the largest block freed so far (at most 64 MiB).
    A CPU index build alternates the model's forward with accumulator
    updates whose temporaries are freed between the layers, so its heaps
    shrink and grow about once a layer: an 8,192-token build (GPT-2-small
    shape) took 1.4-1.75 million page faults and 4-5 s of system time where
    the bare forward took 25 thousand; with these settings and no trimming
    between batches, 0.56 million and 2 s, most of them the accumulators'
    first touch. Here blocks up to 32 MiB come from the heaps (glibc's
    largest dynamic value) and the heaps keep up to ``trim_threshold`` bytes
    free; on leaving, the trim threshold is set to 64 MiB, where glibc's
    dynamic one ends up once a block of 32 MiB or more was freed. Setting
    either turns glibc's dynamic thresholds off for the life of the process.
    Without glibc (not Linux, or musl) nothing changes."""
    if not _mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX):
        yield
        return
    _mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    try:
        yield
    finally:
        _mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AT_MAX)
