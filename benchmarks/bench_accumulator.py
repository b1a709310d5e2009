"""Benchmark of the index accumulator update for one layer (a script, not a test).

    python benchmarks/bench_accumulator.py [--batches 64] [--baseline path/to/old_accumulator.py] [--record]

Builds GPT-2-small-shaped activations for one layer, batch by batch (8 x 128
tokens, d_model 768, d_sae 24576): ``relu(x @ W_enc + b_enc)`` with random
unit-RMS inputs and an encoder bias shifted per feature so that about --l0
features fire per token, with firing rates spread log-uniformly over two
decades (as in trained transcoders: a few dense features, many rare ones).
Every batch is a fresh draw, so early batches see rows that are still filling
(the warm-up, when nearly every firing is a candidate) and later batches the
steady state.

It prints, per phase (the first --warm batches, and batches --steady):

* the encode-equivalent baseline: one [1024, 768] @ [768, 24576] matmul + relu;
* ``_LayerAccumulator.update`` (k 20, n_samples 40, window (8, 8)) per batch.

With ``--baseline FILE`` (an older ``tc_explore/index/accumulator.py``, e.g.
from ``git show HEAD~1:tc_explore/index/accumulator.py > /tmp/accumulator_old.py``,
or an ``index.py`` from before the index became a package) both
implementations fold the same batches, interleaved (alternating which runs
first, so load from other processes hits both alike), and their final states
are compared exactly.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from statistics import NormalDist

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402

def load_index_module(path: str | None):
    """tc_explore.index.accumulator, or the file ``path`` loaded as a sibling
    module of it if its name contains "accumulator" (else, an old single-file
    ``index.py``, as one of ``tc_explore``), so its relative imports resolve."""
    if path is None:
        from tc_explore.index import accumulator
        return accumulator
    import tc_explore.index
    package = tc_explore.index if "accumulator" in os.path.basename(path) else tc_explore
    name = package.__name__ + "._bench_baseline_" + str(abs(hash(os.path.abspath(path))))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    assert module.__package__ == package.__name__
    return module


class Encoder:
    """relu(x @ W + b) with per-feature firing rates log-uniform in
    [rate_lo, rate_hi] * c, scaled so the mean L0 is ``l0``."""

    def __init__(self, d_model: int, d_sae: int, l0: float, seed: int, device, spread: float = 100.0):
        g = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5).to(device)
        rates = np.exp(np.random.default_rng(seed).uniform(0, np.log(spread), d_sae))
        rates *= (l0 / d_sae) / rates.mean()
        rates = np.clip(rates, 1e-7, 0.5)
        # x has unit RMS, so x @ W is about N(0, 1): fire above the (1 - rate) quantile.
        nd = NormalDist()
        self.b = torch.tensor([-nd.inv_cdf(1 - r) for r in rates], dtype=torch.float32, device=device)
        self.d_model, self.device = d_model, device

    def inputs(self, batch: int, n_seq: int, seq_len: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_000 + batch)
        return torch.randn(n_seq * seq_len, self.d_model, generator=g).to(self.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W + self.b)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, clock=time.perf_counter) -> float:
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


def compare_states(a: dict, b: dict, path: str = "") -> list[str]:
    """Names of the tensors that differ. ``act_sum`` (float64 sums) must match
    bit for bit on CPU; on CUDA bincount adds with atomics, in no fixed order,
    so there it is compared to a relative 1e-12."""
    bad = []
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            bad += compare_states(x, y, f"{path}{key}.")
            continue
        x, y = x.cpu(), y.cpu()
        same = torch.equal(x, y) or (key == "act_sum" and a[key].is_cuda
                                     and torch.allclose(x, y, rtol=1e-12, atol=0))
        if not same:
            bad.append(path + key)
    return bad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--warm", type=int, default=8, help="the first WARM batches are the warm-up phase")
    p.add_argument("--steady", type=int, nargs=2, default=(56, 64), metavar=("START", "STOP"))
    p.add_argument("--n-seq", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--l0", type=float, default=100.0)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--n-samples", type=int, default=40)
    p.add_argument("--window", type=int, nargs=2, default=(8, 8))
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", default=None, help="an older accumulator.py (or index.py) to time against, interleaved")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of this process (steadier on a shared machine; "
                        "with --threads 1, since it adds up the time of all threads)")
    records.add_arguments(p)
    args = p.parse_args(argv)
    recorder = records.Recorder(args, argv)
    torch.set_num_threads(args.threads)

    impls = {"current": load_index_module(None)}
    if args.baseline:
        impls = {"baseline": load_index_module(args.baseline), **impls}
    edges = impls["current"].histogram_edges()
    accs = {name: m._LayerAccumulator(args.layer, args.d_sae, args.k, args.n_samples, edges,
                                      tuple(args.window), args.seed, args.device)
            for name, m in impls.items()}
    enc = Encoder(args.d_model, args.d_sae, args.l0, seed=1, device=args.device)
    n_tok = args.n_seq * args.seq_len
    print(f"{args.batches} batches of {args.n_seq} x {args.seq_len} tokens, d_model {args.d_model}, "
          f"d_sae {args.d_sae}, k {args.k}, n_samples {args.n_samples}, window {tuple(args.window)}; "
          f"{args.threads} threads, device {args.device}, torch {torch.__version__}, {args.clock} clock")

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    t_enc, t_upd, l0s = [], {name: [] for name in accs}, []
    names = list(accs)
    with torch.inference_mode():
        enc(enc.inputs(0, args.n_seq, args.seq_len))                    # warm-up of the matmul
        for b in range(args.batches):
            x = enc.inputs(b, args.n_seq, args.seq_len)
            acts = None

            def encode():
                nonlocal acts
                acts = enc(x)
            t_enc.append(timed(encode, args.device, clock))
            acts = acts.reshape(args.n_seq, args.seq_len, args.d_sae)
            l0s.append(float((acts[:, 1:] > 0).sum()) / (args.n_seq * (args.seq_len - 1)))
            first_token = b * n_tok
            gtok = first_token + np.arange(n_tok, dtype=np.int64)
            token_key = torch.as_tensor(impls["current"]._token_hash(gtok, args.seed)
                                        .reshape(args.n_seq, args.seq_len), device=args.device)
            for name in (names if b % 2 == 0 else names[::-1]):
                t_upd[name].append(timed(lambda: accs[name].update(acts, token_key, first_token),
                                         args.device, clock))
            del acts

    def phase(ts, lo, hi):
        ts = np.array(ts[lo:hi]) * 1000
        return f"median {np.median(ts):7.1f} ms  mean {ts.mean():7.1f} ms  min {ts.min():7.1f} ms"

    warm = (0, min(args.warm, args.batches))
    steady = (min(args.steady[0], args.batches), min(args.steady[1], args.batches))
    print(f"measured L0: {np.mean(l0s):.1f} features per token (positions >= 1)")
    for label, (lo, hi) in ((f"warm-up, batches {warm[0]}-{warm[1] - 1}", warm),
                            (f"steady, batches {steady[0]}-{steady[1] - 1}", steady)):
        if hi <= lo:
            continue
        print(f"\n{label}:")
        print(f"  encode (matmul + relu)   {phase(t_enc, lo, hi)}")
        for name, ts in t_upd.items():
            print(f"  update [{name:8s}]      {phase(ts, lo, hi)}")
        enc_ms = float(np.median(t_enc[lo:hi])) * 1000
        upd_ms = {name: float(np.median(ts[lo:hi])) * 1000 for name, ts in t_upd.items()}
        versus = (f"; the --baseline accumulator: {upd_ms['baseline']:.1f} ms "
                  f"({records.speedup(upd_ms['baseline'], upd_ms['current'])})" if "baseline" in upd_ms else "")
        recorder.add("index accumulator update, one layer",
                     f"{label.split(',')[0]} batches {lo}-{hi - 1} of {args.n_seq} × {args.seq_len} tokens"
                     + ("" if args.d_sae == 24576 else f", d_sae {args.d_sae}"),
                     f"{upd_ms['current']:.1f} ms median per batch",
                     baseline=f"encode (matmul + relu) {enc_ms:.1f} ms",
                     ratio=f"{100 * upd_ms['current'] / enc_ms:.0f} % of encode",
                     notes=f"{args.clock} clock, L0 {np.mean(l0s):.0f}{versus}",
                     encode_ms=enc_ms, update_ms=upd_ms["current"], baseline_update_ms=upd_ms.get("baseline"),
                     l0=float(np.mean(l0s)), d_sae=args.d_sae, k=args.k, n_samples=args.n_samples)
    print("\nper batch (ms): encode " + " ".join(f"{t * 1000:.0f}" for t in t_enc[:12]) + " ...")
    for name, ts in t_upd.items():
        print(f"  update [{name}] " + " ".join(f"{t * 1000:.0f}" for t in ts[:12]) + " ...")
    if len(accs) == 2:
        bad = compare_states(*(acc.state() for acc in accs.values()))
        print("\nfinal states: " + ("identical" if not bad else f"DIFFER in {bad}"))
        if bad:
            return 1
    recorder.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
