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

It also counts what a GPU build's update costs beside its arithmetic: the
operators it dispatches (non-view aten calls, about one kernel launch each) and
those that wait for the GPU (host syncs: ``nonzero``, ``item``, CUDA's
``bincount``, boolean-mask indexing), per batch. Once rows are full, those
counts hardly depend on the width (only offers larger than a pass are split),
so a narrower shape with the same firing rate per feature (``--d-sae 2048
--l0 12``) shows the steady state in seconds a batch. With ``--baseline FILE`` (an older ``tc_explore/index/accumulator.py``)
both fold the same batches, and their final states are compared.

    python benchmarks/bench_update_memory.py                     # GPT-2 small's shape, batch 32 x 128
    python benchmarks/bench_update_memory.py --batches 6 --profile 0 1 5
    python benchmarks/bench_update_memory.py --d-sae 2048 --l0 12 --batches 40 --profile \
        --baseline /tmp/accumulator_old.py                       # launches and syncs, steady state
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
from bench_accumulator import compare_states, load_index_module  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

MiB = 2 ** 20
# Operators that wait for the device to learn a size or a value.
SYNCING = {"nonzero", "_local_scalar_dense", "item", "bincount", "masked_select", "unique", "_unique2"}


class CountOps(TorchDispatchMode):
    """Counts the non-view operators dispatched, and those that sync with the device."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in ("detach", "alias"):
            self.ops += 1
            # Indexing with a boolean mask finds its nonzeros first.
            masked = name in ("index", "index_put_", "index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None)
            self.syncs += name in SYNCING or masked
        return func(*args, **(kwargs or {}))


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


def main(argv=None) -> int:
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
    ap.add_argument("--profile", type=int, nargs="*", default=[0, 1, 3],
                    help="batches whose memory to profile (none: count operators only)")
    ap.add_argument("--baseline", default=None,
                    help="an older accumulator.py: its operators and syncs are counted on the same batches")
    records.add_arguments(ap)
    args = ap.parse_args(argv)
    recorder = records.Recorder(args, argv)
    from torch.profiler import ProfilerActivity, profile

    impls = {"current": load_index_module(None)}
    if args.baseline:
        impls["baseline"] = load_index_module(args.baseline)
    for module in impls.values():
        module.CPU_SHORTCUTS = False                    # CUDA's code paths
    L, D, S, T = args.layers, args.d_sae, args.n_seq, args.seq_len
    g = torch.Generator().manual_seed(0)
    p_fire = torch.exp(torch.randn(L, D, generator=g) * 1.5)
    p_fire = (p_fire / p_fire.sum(1, keepdim=True) * args.l0).clamp(max=0.5)
    chunk = torch.empty(args.chunk_seq, T, D)             # the build's reused encode buffer
    accs = {name: m._LayerAccumulator(list(range(L)), [D] * L, args.k, args.n_samples, m.histogram_edges(),
                                      (12, 4), 0, "cpu") for name, m in impls.items()}
    acc = accs["current"]
    held = tensor_bytes(*(t for best in (acc.top, acc.samples)
                          for t in (best._key, best.act, best.window, best._threshold, best._filled)),
                        acc.n_firing, acc.act_sum, acc.hist, acc.feature_key)
    print(f"shape: {L} layers x {D} features, batch {S} x {T} tokens, L0 {args.l0:g}; "
          f"k {args.k}, n_samples {args.n_samples}")
    print(f"accumulators: {held / MiB:.0f} MiB; encode buffer {tensor_bytes(chunk) / MiB:.0f} MiB")

    def one_batch(b: int, name: str) -> tuple[int, CountOps]:
        """Batch b's activations (the same for every implementation) folded into accs[name]."""
        module, gen = impls[name], torch.Generator().manual_seed(1 + b)
        first = b * S * T
        token_key = torch.as_tensor(module._token_hash(first + np.arange(S * T), 0).reshape(S, T))
        layers = []
        for layer in range(L):
            parts = []
            for s0 in range(0, S, args.chunk_seq):
                torch.rand(chunk.shape, generator=gen, out=chunk)
                fire = chunk < p_fire[layer]
                torch.rand(chunk.shape, generator=gen, out=chunk)
                chunk.exp_().mul_(fire)
                del fire
                parts.append(module.Entries.of(chunk, first_row=s0 * T))
            layers.append(module.Entries.cat(parts))
        nnz = sum(e.row.numel() for e in layers)
        with torch.inference_mode(), CountOps() as counted:
            accs[name].update(layers, token_key, first)     # empties the list, as the build's does
        return nnz, counted

    def profiled():
        # The memory timeline needs shapes and stacks to tell tensors apart.
        return profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                       with_stack=True)

    peaks, nnzs, counts = {}, [], {name: [] for name in impls}
    for b in range(args.batches):
        t0 = time.perf_counter()
        for name in impls:
            if name == "current" and b in args.profile:
                with profiled() as prof:
                    nnz, counted = one_batch(b, name)
                peak, first = live_bytes_peak(prof)
                peaks[b] = peak - first
            else:
                nnz, counted = one_batch(b, name)
            counts[name].append((counted.ops, counted.syncs))
        nnzs.append(nnz)
        print(f"batch {b}: {nnz:,} nonzero activations; "
              + "; ".join(f"{name}: {c[-1][0]} operators, {c[-1][1]} syncs" for name, c in counts.items())
              + (f"; peak {peaks[b] / MiB:.0f} MiB above the accumulators and buffer (the batch's "
                 f"activations and the update)" if b in peaks else "")
              + f"; {time.perf_counter() - t0:.1f} s", flush=True)
    with profiled() as prof:
        state = acc.state(0)
    peak, first = live_bytes_peak(prof)
    print(f"one layer's sorted state: peak {(peak - first) / MiB:.0f} MiB above the accumulators")
    del state
    shape = f"{L} × {D:,} features fused, batch {S} × {T} tokens"
    if peaks:
        recorder.add(
            "index update memory, CUDA's code paths on a CPU", shape, "",
            notes=(f"{held / MiB:.0f} MiB accumulators; peak live tensors above them and the "
                   f"{tensor_bytes(chunk) / MiB:.0f} MiB encode buffer: "
                   + ", ".join(f"{v / MiB:.0f} MiB (batch {b})" for b, v in peaks.items())
                   + f"; {np.mean(nnzs) / 1e6:.2f} M nonzeros a batch (L0 {args.l0:g})"),
            accumulator_bytes=held, buffer_bytes=tensor_bytes(chunk), update_peak_bytes=max(peaks.values()),
            peaks_by_batch={str(b): v for b, v in peaks.items()}, nonzeros=float(np.mean(nnzs)),
            d_sae=D, layers=L, n_seq=S, seq_len=T, l0=args.l0, k=args.k, n_samples=args.n_samples)
    last = args.batches - 1

    def summary(name: str) -> str:
        c = counts[name]
        return (f"batch 0 {c[0][0]} ({c[0][1]} syncs), batch {last} {c[-1][0]} ({c[-1][1]} syncs); "
                f"in all {sum(n for n, _ in c)} ({sum(n for _, n in c)} syncs)")
    print(f"\noperators per update (CUDA's code paths): {summary('current')}")
    (first_ops, first_syncs), (ops, syncs) = counts["current"][0], counts["current"][-1]
    old_ops, old_syncs = counts["baseline"][-1] if "baseline" in counts else (None, None)
    versus = ""
    if "baseline" in counts:
        versus = f"; the --baseline accumulator: {old_ops} operators, {old_syncs} syncs"
        print(f"  --baseline: {summary('baseline')}")
        bad = [f"layer {layer} {name}" for layer in range(L)
               for name in compare_states(*(a.state(layer) for a in accs.values()))]
        print("final states: " + ("identical" if not bad else f"DIFFER in {bad}"))
        if bad:
            return 1
    recorder.add(
        "index update operators, CUDA's code paths on a CPU", shape,
        f"{ops} operators, {syncs} host syncs (batch {last})",
        notes=f"batch 0: {first_ops} operators, {first_syncs} syncs; L0 {args.l0:g}{versus}",
        operators=ops, syncs=syncs, first_operators=first_ops, first_syncs=first_syncs,
        baseline_operators=old_ops, baseline_syncs=old_syncs,
        batches=args.batches, d_sae=D, layers=L, n_seq=S, seq_len=T, l0=args.l0, k=args.k,
        n_samples=args.n_samples)
    recorder.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
