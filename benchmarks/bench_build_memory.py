"""Peak memory of a GPU index build, above the model and transcoders, measured
on a CPU running CUDA's code paths: where no GPU is lent, the figure behind
the target "a build's peak <= model + transcoders + 2 GiB".

On the GPT-2-small-shaped model and transcoders of ``bench_index.py`` (the
same files, ``--weights-dir`` shared), it runs ``FeatureIndex.build`` as a
GPU build runs, with the accumulator's CPU shortcuts off
(``accumulator.CPU_SHORTCUTS``): all layers fused in one update a batch, at
the GPU benchmark's batch of 32 x 128 tokens, every chunk encoded into fresh
memory (``forward.reuses_buffers``). After every operator it reads the bytes
the process has malloc'd and in use (glibc's ``mallinfo2``: tensors, and the
little else that is malloc'd), and prints the peak above the process once the
weights were loaded, and the code it was reached in.

The update runs in the model's thread here (``pipeline=False``; a dispatch
mode sees its own thread only); a GPU's worker runs the same operators in
the same order on a thread of its own. Not counted, as on the GPU they would
be: scratch space inside an operator (a CUDA sort's buffers), the caching
allocator's rounding, and the model's forward of the next batch with the
layer inputs it hands the worker (up to 12 of 12 MiB), which on a GPU run
beside the update.

    python benchmarks/bench_build_memory.py --weights-dir /tmp/w      # the peak and where
    python benchmarks/bench_build_memory.py --weights-dir /tmp/w --live   # and the tensors alive then
    python benchmarks/bench_build_memory.py --weights-dir /tmp/w --baseline-code /tmp/old  # against an older checkout
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
MiB = 2 ** 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use():
    """A function returning the bytes malloc'd and not freed (glibc >= 2.33):
    in use in the heap's arenas plus mapped on their own (large blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return in_use


def live_tensors(min_bytes: int = 0, leave_out: frozenset = frozenset()) -> dict:
    """{storage address: (bytes, shape, dtype)} of the CPU tensor storages
    alive now of at least ``min_bytes`` (each once, whatever views share it),
    but those at the addresses in ``leave_out``."""
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() >= min_bytes and ptr not in seen and ptr not in leave_out:
                seen[ptr] = (storage.nbytes(), tuple(obj.shape), str(obj.dtype).replace("torch.", ""))
    return seen


def make_tracker(in_use, package_root: str, dump_at: int | None, min_bytes: int, leave_out: frozenset):
    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakAfterEachOperator(TorchDispatchMode):
        """The peak of ``in_use()`` after each operator dispatched in this
        thread, the operator's number and the package code it ran in; with
        ``dump_at``, the tensors alive after that operator (but ``leave_out``)."""

        def __init__(self):
            super().__init__()
            self.peak, self.n, self.at, self.where, self.live = in_use(), 0, 0, [], None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.n += 1
            now = in_use()
            if now > self.peak:
                self.peak, self.at = now, self.n
                self.where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                              if f.filename.startswith(package_root)][-6:] + [func.overloadpacket.__name__]
            if self.n == dump_at:
                self.live = sorted(live_tensors(min_bytes, leave_out).values(), reverse=True)
            return out
    return PeakAfterEachOperator


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-dir", default=None,
                    help="bench_index.py's model and transcoder files (written there if absent)")
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--l0", type=float, default=100.0)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences a batch (the GPU benchmark's 32)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2, help="batches built (the first is the largest update)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--live", action="store_true",
                    help="build again up to the peak's operator and list the tensors alive then")
    ap.add_argument("--live-min-mib", type=float, default=4.0)
    ap.add_argument("--code", default=None, help="a checkout whose tc_explore to measure (default: this one)")
    ap.add_argument("--baseline-code", default=None,
                    help="an older checkout, measured the same way in a process of its own, as the baseline")
    import records
    records.add_arguments(ap)
    args = ap.parse_args(argv)
    recorder = records.Recorder(args, argv)
    code = Path(args.code).resolve() if args.code else HERE.parent
    sys.path.insert(0, str(code))
    torch.set_num_threads(args.threads)

    from bench_index import load_weights, random_tokens, written_weights

    import tc_explore
    from tc_explore.corpus import Corpus
    from tc_explore.index import FeatureIndex, accumulator
    package_root = str(Path(tc_explore.__file__).parent)
    assert package_root.startswith(str(code)), f"tc_explore came from {package_root}, not {code}"

    work = tempfile.mkdtemp(prefix="tc_bench_mem_")
    try:                                                            # the indexes built go with it
        weights_dir = written_weights(args.weights_dir or work, args.d_sae, args.l0)
        in_use = malloc_in_use()
        gc.collect()
        before_weights = in_use()
        model, transcoders = load_weights(weights_dir, "cpu")
        accumulator.CPU_SHORTCUTS = False                               # CUDA's code paths
        n_seq = args.batch_size * args.batches
        corpus = Corpus.from_token_ids(random_tokens(model, n_seq, args.seq_len), model, name="random-ids")
        gc.collect()
        base = in_use()
        weights = base - before_weights                                 # as loaded, with all else loading keeps
        before_build = frozenset(live_tensors())                        # the weights, left out of --live

        def build(dump_at=None):
            gc.collect()
            tracker = make_tracker(in_use, package_root, dump_at, int(args.live_min_mib * MiB), before_build)()
            out = tempfile.mkdtemp(dir=work)
            t = time.perf_counter()
            with tracker:
                FeatureIndex.build(model, transcoders, corpus, n_seq * args.seq_len, out, batch_size=args.batch_size,
                                   fuse_layers=True, pipeline=False, checkpoint_every=10 ** 9, progress=False)
            return tracker, time.perf_counter() - t

        tracker, wall = build()
        above = tracker.peak - base
        baseline = ratio = ""
        if args.baseline_code:
            old, label = baseline_peak(args, weights_dir), checkout_label(args.baseline_code)
            baseline, ratio = f"{label}: {old / MiB:,.0f} MiB", f"{(above - old) / old:+.1%}".replace("%", " %")
        print(f"code: {code}")
        print(f"shape: 12 layers x {args.d_sae} features, batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.batches} batches, CUDA's code paths; the model and transcoders loaded: "
              f"{weights / 2 ** 30:.2f} GiB")
        print(f"peak above the loaded process: {above / MiB:.0f} MiB ({above / 2 ** 30:.2f} GiB; target 2 GiB), "
              f"after operator {tracker.at} of {tracker.n}; {wall:.0f} s")
        print("  reached in: " + " <- ".join(reversed(tracker.where)))
        if baseline:
            print(f"baseline, {baseline} ({ratio} now)")
        if args.live:
            again, _ = build(dump_at=tracker.at)
            live = again.live or []
            print(f"tensors of >= {args.live_min_mib:g} MiB made by the build and alive then, "
                  f"{sum(b for b, _, _ in live) / MiB:.0f} MiB:")
            for nbytes, shape, dtype in live:
                print(f"  {nbytes / MiB:8.1f} MiB  {dtype:8s} {list(shape)}")
        recorder.add("index build memory, CUDA's code paths on a CPU",
                     f"12 × {args.d_sae:,} features fused, batch {args.batch_size} × {args.seq_len} tokens",
                     f"{above / MiB:,.0f} MiB above the weights", baseline, ratio,
                     notes=f"peak malloc'd above the loaded process (the model and transcoders: "
                           f"{weights / 2 ** 30:.2f} GiB), "
                           f"{args.batches} batches, in {tracker.where[-2] if len(tracker.where) > 1 else '?'}; "
                           f"target ≤ 2 GiB",
                     peak_above_bytes=above, weights_bytes=weights, batches=args.batches, d_sae=args.d_sae,
                     l0=args.l0, batch_size=args.batch_size, seq_len=args.seq_len, code=str(args.code or ""))
        recorder.save()
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def baseline_peak(args, weights_dir: str) -> int:
    """The peak above the loaded process of ``--baseline-code``'s build, this
    script run on it in a process of its own (two versions of a package do
    not share one)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "baseline.json")
        command = [sys.executable, __file__, "--code", args.baseline_code, "--weights-dir", weights_dir,
                   "--d-sae", str(args.d_sae), "--l0", str(args.l0), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--batches", str(args.batches), "--threads", str(args.threads),
                   "--record", out]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["records"][0]["figures"]["peak_above_bytes"]


def checkout_label(path: str) -> str:
    """The short commit of a git checkout, else its folder."""
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return path


if __name__ == "__main__":
    sys.exit(main())
