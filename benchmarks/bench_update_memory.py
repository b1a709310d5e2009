"""Peak tensor memory of the index build's accumulator update as a GPU build
runs it (all layers fused in one update per batch, CUDA's code paths), measured
on a CPU: what a GPU build holds beyond its weights, where no GPU is lent.

The accumulator's numpy shortcuts are turned off (``accumulator.CPU_SHORTCUTS``),
so every tensor the CUDA code makes is made here too, and torch.profiler's
memory timeline gives the peak of live tensor bytes, the figure
``torch.cuda.max_memory_allocated`` gives on a GPU. Not counted: the CUDA
sort's scratch space (cub's double buffers), the caching allocator's
rounding, and the model's forward of the next batch, which runs beside the
update on a GPU.

Activations are synthetic with GPT-2 transcoders' sparsity: each feature fires
with a log-normally spread probability, scaled to ``--l0`` features per token
(GPT-2 small's fire about 20-150).

    python benchmarks/bench_update_memory.py                     # GPT-2 small's shape, batch 32 x 128
    python benchmarks/bench_update_memory.py --batches 6 --profile 0 1 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import records  # noqa: E402
from tc_explore.index import accumulator  # noqa: E402

MiB = 2 ** 20


def live_bytes_peak(prof) -> tuple[int, int]:
    """(peak, first) of the live CPU tensor bytes over a profiled stretch."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Deprecated in favour of CUDA's memory snapshots, which a CPU has not.
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(s) for s in sizes]
    return max(totals), totals[0]


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--l0", type=float, default=144.0, help="features firing per token per layer")
    ap.add_argument("--n-seq", type=int, default=32, help="sequences per batch (the GPU benchmark's 32)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--chunk-seq", type=int, default=16,
                    help="sequences per encoded chunk (forward.CHUNK_BYTES makes 16 of GPT-2's)")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--n-samples", type=int, default=40)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--profile", type=int, nargs="+", default=[0, 1, 3], help="batches to profile")
    records.add_arguments(ap)
    args = ap.parse_args(argv)
    recorder = records.Recorder(args, argv)
    from torch.profiler import ProfilerActivity, profile

    accumulator.CPU_SHORTCUTS = False                   # CUDA's code paths
    L, D, S, T = args.layers, args.d_sae, args.n_seq, args.seq_len
    g = torch.Generator().manual_seed(0)
    p_fire = torch.exp(torch.randn(L, D, generator=g) * 1.5)
    p_fire = (p_fire / p_fire.sum(1, keepdim=True) * args.l0).clamp(max=0.5)
    chunk = torch.empty(args.chunk_seq, T, D)             # the build's reused encode buffer
    acc = accumulator._LayerAccumulator(list(range(L)), [D] * L, args.k, args.n_samples,
                                        accumulator.histogram_edges(), (12, 4), 0, "cpu")
    held = tensor_bytes(*(t for best in (acc.top, acc.samples)
                          for t in (best._key, best.act, best.window, best._threshold, best._filled)),
                        acc.n_firing, acc.act_sum, acc.hist, acc.feature_key)
    print(f"shape: {L} layers x {D} features, batch {S} x {T} tokens, L0 {args.l0:g}; "
          f"k {args.k}, n_samples {args.n_samples}")
    print(f"accumulators: {held / MiB:.0f} MiB; encode buffer {tensor_bytes(chunk) / MiB:.0f} MiB")

    def one_batch(b: int) -> int:
        first = b * S * T
        token_key = torch.as_tensor(accumulator._token_hash(first + np.arange(S * T), 0).reshape(S, T))
        layers = []
        for layer in range(L):
            parts = []
            for s0 in range(0, S, args.chunk_seq):
                torch.rand(chunk.shape, generator=g, out=chunk)
                fire = chunk < p_fire[layer]
                torch.rand(chunk.shape, generator=g, out=chunk)
                chunk.exp_().mul_(fire)
                del fire
                parts.append(accumulator.Entries.of(chunk, first_row=s0 * T))
            layers.append(accumulator.Entries.cat(parts))
        nnz = sum(e.row.numel() for e in layers)
        with torch.inference_mode():
            acc.update(layers, token_key, first)            # empties the list, as the build's does
        return nnz

    def profiled():
        # The memory timeline needs shapes and stacks to tell tensors apart.
        return profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                       with_stack=True)

    peaks, nnzs = {}, []
    for b in range(args.batches):
        t0 = time.perf_counter()
        if b not in args.profile:
            one_batch(b)
            print(f"batch {b}: {time.perf_counter() - t0:.1f} s")
            continue
        with profiled() as prof:
            nnz = one_batch(b)
        peak, first = live_bytes_peak(prof)
        peaks[b] = peak - first
        nnzs.append(nnz)
        print(f"batch {b}: {nnz:,} nonzero activations; peak {(peak - first) / MiB:.0f} MiB above the "
              f"accumulators and buffer (the batch's activations and the update); {time.perf_counter() - t0:.1f} s")
    with profiled() as prof:
        state = acc.state(0)
    peak, first = live_bytes_peak(prof)
    print(f"one layer's sorted state: peak {(peak - first) / MiB:.0f} MiB above the accumulators")
    del state
    if peaks:
        recorder.add(
            "index update memory, CUDA's code paths on a CPU",
            f"{L} × {D:,} features fused, batch {S} × {T} tokens", "",
            notes=(f"{held / MiB:.0f} MiB accumulators; peak live tensors above them and the "
                   f"{tensor_bytes(chunk) / MiB:.0f} MiB encode buffer: "
                   + ", ".join(f"{v / MiB:.0f} MiB (batch {b})" for b, v in peaks.items())
                   + f"; {np.mean(nnzs) / 1e6:.2f} M nonzeros a batch (L0 {args.l0:g})"),
            accumulator_bytes=held, buffer_bytes=tensor_bytes(chunk), update_peak_bytes=max(peaks.values()),
            peaks_by_batch={str(b): v for b, v in peaks.items()}, nonzeros=float(np.mean(nnzs)),
            d_sae=D, layers=L, n_seq=S, seq_len=T, l0=args.l0, k=args.k, n_samples=args.n_samples)
        recorder.save()


if __name__ == "__main__":
    main()
