"""Benchmark of FeatureIndex.build and dashboard opening (a script, not a test).

    python benchmarks/bench_index.py [--n-tokens 4096] [--seq-len 128] [--batch-size 8]
    python benchmarks/bench_index.py --n-tokens 8192 --no-views --no-on-the-fly     # CPU target
    python benchmarks/bench_index.py --device cuda --n-tokens 1048576 --batch-size 32 --no-on-the-fly
    ... --record [FILE]       # also write the figures into benchmarks/results.json (benchmarks/records.py)

On a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257,
n_ctx 1024; random weights, saved with save_pretrained and loaded through
tc_explore.load_model) and 12 full-width (d_sae 24576) random transcoders, it
prints:

* the bare cost of the same forward passes (run_with_cache restricted to the
  transcoders' input hooks) plus every layer's encoding, over the same tokens,
  timed before AND after the build (the machine's load drifts);
* FeatureIndex.build time over those tokens, and its overhead over each bare
  run (targets: CPU <= 25 % at >= 8,192 tokens, <= 15 % at >= 65,536; GPU
  <= 15 % and >= 30k tokens/s at 1M tokens);
* peak resident memory during each (sampled every 20 ms) and, on CUDA, peak
  GPU memory against the weights (target: build <= weights + 2 GiB);
* dashboard open time from the saved index, per feature (target: under 100 ms on
  CPU), cold (fresh FeatureIndex.load) and warm: index sections only; with the
  weight-based sections (logit effects, de-embeddings, OV, connections)
  computed per feature; and with them read from weight views precomputed into
  the index (``add_weight_views``), whose build time is printed too.

Random transcoders are given a realistic sparsity (about --l0 features firing
per token, as trained transcoders do) by shifting the encoder bias; the
measured L0 is printed. Dense firing would make every accumulator (and any
top-k over real data) slower; it is not what real transcoders do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from statistics import NormalDist

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402


class PeakMemory:
    """Peak resident set size of this process while the block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def build_model(directory: str):
    from transformers import GPT2Config, GPT2LMHeadModel
    from tc_explore.tokenization import word_tokenizer, vocabulary

    # 245 fixed entries + 2 per word (with and without a leading space) = 50257.
    n_words = (50257 - len(vocabulary([]))) // 2
    tokenizer = word_tokenizer([f"w{i}" for i in range(n_words)])
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return len(tokenizer)


def build_transcoders(d_model: int, d_sae: int, n_layers: int, l0: float):
    from tc_explore.testing import random_transcoder
    from tc_explore.transcoder import TranscoderSet

    # Pre-activations are about N(b_enc, 1) on unit-RMS inputs: shift the bias so
    # that a fraction l0 / d_sae of features fire.
    shift = NormalDist().inv_cdf(1 - l0 / d_sae)
    tcs = {}
    for layer in range(n_layers):
        tc = random_transcoder(d_model, d_sae, layer, seed=1)
        with torch.no_grad():
            tc.b_enc.sub_(tc.b_enc.mean() + shift)
        tcs[layer] = tc
    return TranscoderSet.from_transcoders(tcs, name="bench-random-24576")


def bare_pass(model, transcoders, batches) -> float:
    """The same forwards and encodings the index does, with nothing kept:
    seconds (the device synchronised at the end)."""
    hooks = {transcoders.input_hook(layer): layer for layer in transcoders.layers}
    sync = torch.cuda.synchronize if transcoders.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for toks in batches:
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in hooks)
            for hook, layer in hooks.items():
                acts = transcoders[layer].encode(cache[hook])
                del acts
            del cache
    sync()
    return time.perf_counter() - t0


def measured_l0(model, transcoders, batch) -> float:
    """Mean features firing per token (positions >= 1) over layers, on one batch."""
    hooks = {transcoders.input_hook(layer): layer for layer in transcoders.layers}
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in hooks)
        return float(np.mean([float((transcoders[l].encode(cache[h])[:, 1:] > 0).sum())
                              / (batch.shape[0] * (batch.shape[1] - 1)) for h, l in hooks.items()]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--l0", type=float, default=100.0)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--n-samples", type=int, default=40)
    p.add_argument("--n-dashboards", type=int, default=20)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-views", dest="views", action="store_false",
                   help="skip precomputing the weight views (minutes on CPU at full width)")
    p.add_argument("--no-on-the-fly", dest="on_the_fly", action="store_false",
                   help="skip timing dashboards whose weight sections are computed per feature")
    p.add_argument("--views-chunk", type=int, default=1024)
    records.add_arguments(p)
    args = p.parse_args(argv)
    recorder = records.Recorder(args, argv)
    torch.set_num_threads(args.threads)

    from tc_explore import load_model
    from tc_explore.corpus import Corpus
    from tc_explore.dashboard import add_weight_views, feature_dashboard
    from tc_explore.index import FeatureIndex

    work = tempfile.mkdtemp(prefix="tc_bench_")
    try:
        t = time.perf_counter()
        vocab = build_model(os.path.join(work, "model"))
        model = load_model(os.path.join(work, "model"), device=args.device)
        transcoders = build_transcoders(768, args.d_sae, 12, args.l0).to(device=args.device)
        for layer in transcoders.layers:
            transcoders[layer]
        print(f"setup: GPT-2-small-shaped model (vocab {model.cfg.d_vocab}, tokenizer {vocab}), "
              f"12 x d_sae {args.d_sae} transcoders, {time.perf_counter() - t:.1f} s; "
              f"{args.threads} threads, device {args.device}")

        n_seq = args.n_tokens // args.seq_len
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(1, vocab, (n_seq, args.seq_len), generator=g)
        tokens[:, 0] = model.tokenizer.bos_token_id
        corpus = Corpus.from_token_ids(tokens, model, name="random-ids")
        batches = [tokens[i:i + args.batch_size].to(args.device) for i in range(0, n_seq, args.batch_size)]
        print(f"tokens: {n_seq} sequences x {args.seq_len} = {n_seq * args.seq_len}, "
              f"{len(batches)} batches of {args.batch_size}")

        bare_pass(model, transcoders, batches[:1])                    # warm-up
        print(f"measured L0: {measured_l0(model, transcoders, batches[0]):.1f} features per token per layer")
        if str(args.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem_bare:
            bare = bare_pass(model, transcoders, batches)
        gpu_bare = torch.cuda.max_memory_allocated() if str(args.device).startswith("cuda") else 0

        out = os.path.join(work, "index")
        # Diagnostic only: when the build's final Parquet writes start and end.
        import tc_explore.index.build as index_module
        write_span = []
        real_write = index_module.write_layer

        def timed_write(*a, **kw):
            write_span.append(time.perf_counter())
            real_write(*a, **kw)
            write_span.append(time.perf_counter())
        index_module.write_layer = timed_write
        if str(args.device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem_build:
            t = time.perf_counter()
            index = FeatureIndex.build(model, transcoders, corpus, n_seq * args.seq_len, out,
                                       k=args.k, n_samples=args.n_samples, batch_size=args.batch_size,
                                       checkpoint_every=10 ** 9, progress=False)
            build = time.perf_counter() - t
        index_module.write_layer = real_write
        writing = max(write_span) - min(write_span)
        gpu_build = torch.cuda.max_memory_allocated() if str(args.device).startswith("cuda") else 0
        bare2 = bare_pass(model, transcoders, batches)                 # drift check
        base = min(bare, bare2)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
        print()
        print(f"bare forwards + encodings: {bare:.1f} s (again after the build: {bare2:.1f} s)")
        print(f"FeatureIndex.build:        {build:.1f} s (includes writing {size / 2 ** 20:.0f} MiB of Parquet)")
        print(f"  of which the streaming pass {build - writing:.1f} s, writing the layer tables {writing:.1f} s")
        gpu = str(args.device).startswith("cuda")
        target = 15 if (gpu or n_seq * args.seq_len >= 65536) else 25
        print(f"overhead over bare:        {100 * (build / base - 1):.1f} % against the faster bare run "
              f"({100 * (build / bare - 1):.1f} % against the first, {100 * (build / bare2 - 1):.1f} % "
              f"against the second)  (target <= {target} %)")
        print(f"throughput:                {n_seq * args.seq_len / build:.0f} tokens/s "
              f"(bare {n_seq * args.seq_len / base:.0f} tokens/s)")
        weights = (sum(p.numel() * p.element_size() for p in model.parameters())
                   + sum(p.numel() * p.element_size() for l in transcoders.layers
                         for p in transcoders[l].parameters()))
        print(f"weights (model + transcoders): {gib(weights)}")
        print(f"peak RSS: bare {gib(mem_bare.peak)} (start {gib(mem_bare.start)}), "
              f"build {gib(mem_build.peak)} (start {gib(mem_build.start)}); "
              f"build above its start: {gib(mem_build.peak - mem_build.start)}")
        if gpu:
            print(f"peak GPU memory allocated: bare {gib(gpu_bare)}, build {gib(gpu_build)} "
                  f"(weights {gib(weights)}; target: build <= weights + 2 GiB = {gib(weights + 2 ** 31)})")
        n_tok = n_seq * args.seq_len
        width = "" if args.d_sae == 24576 else f", d_sae {args.d_sae}"
        other = bare2 if base == bare else bare
        recorder.add(
            "FeatureIndex.build", f"{n_tok:,} tokens, batch {args.batch_size}{width}", f"{build:.1f} s",
            baseline=f"bare pass {base:.1f} s (other bare run {other:.1f} s)",
            ratio=f"{100 * (build / base - 1):+.1f} %", peak_rss=gib(mem_build.peak),
            notes=f"{n_tok / build:,.0f} tokens/s; {build - writing:.1f} s pass + {writing:.1f} s writing "
                  f"{size / 2 ** 20:.0f} MiB" + (f"; peak GPU {gib(gpu_build)} (weights {gib(weights)})" if gpu
                                                 else "") + f"; target ≤ {target} %",
            tokens=n_tok, build_s=build, pass_s=build - writing, writing_s=writing, bare_s=bare,
            bare_after_s=bare2, index_bytes=size, weights_bytes=weights, peak_rss_bare_bytes=mem_bare.peak,
            peak_rss_build_bytes=mem_build.peak, rss_build_start_bytes=mem_build.start,
            peak_gpu_bare_bytes=gpu_bare if gpu else None, peak_gpu_build_bytes=gpu_build if gpu else None,
            d_sae=args.d_sae, l0=args.l0, k=args.k, n_samples=args.n_samples, seq_len=args.seq_len)

        rng = np.random.default_rng(0)
        picks = [(int(rng.integers(12)), int(rng.integers(args.d_sae))) for _ in range(args.n_dashboards)]

        def open_dashboards(label, **kwargs):
            index = FeatureIndex.load(out)
            times = []
            for layer, feature in picks:
                t = time.perf_counter()
                feature_dashboard(index, layer, feature, **kwargs)
                times.append(time.perf_counter() - t)
            cold = np.array(times) * 1000
            t = time.perf_counter()
            for layer, feature in picks:
                feature_dashboard(index, layer, feature, **kwargs)
            warm = (time.perf_counter() - t) / len(picks) * 1000
            print(f"dashboard open ({label}), {len(picks)} random features from a fresh load: "
                  f"mean {cold.mean():.1f} ms, median {np.median(cold):.1f} ms, max {cold.max():.1f} ms; "
                  f"reopened: {warm:.1f} ms per feature  (target < 100 ms)")
            recorder.add(f"dashboard open, {label}", f"{len(picks)} random features{width}",
                         f"{cold.mean():.1f} ms mean, {cold.max():.1f} ms max",
                         notes=f"{warm:.1f} ms reopened; target < 100 ms",
                         mean_ms=float(cold.mean()), median_ms=float(np.median(cold)), max_ms=float(cold.max()),
                         reopened_ms=float(warm), index_tokens=n_seq * args.seq_len)

        print()
        open_dashboards("index only", model=model)
        if args.on_the_fly:
            open_dashboards("weight sections computed on the fly", model=model, transcoders=transcoders)
        if args.views:
            sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
            with PeakMemory() as mem_views:
                t = time.perf_counter()
                add_weight_views(FeatureIndex.load(out), model, transcoders, chunk_size=args.views_chunk)
                sync()
                views_s = time.perf_counter() - t
            vdir = os.path.join(out, "weight_views")
            vsize = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(vdir) for f in fs)
            print(f"weight views (all {12 * args.d_sae} features; connections, logit effects, "
                  f"de-embeddings, OV): built in {views_s:.1f} s on {args.device}, "
                  f"{vsize / 2 ** 20:.0f} MiB of Parquet, peak RSS {gib(mem_views.peak)}")
            recorder.add("weight views (add_weight_views)", f"{12 * args.d_sae:,} features", f"{views_s:.1f} s",
                         peak_rss=gib(mem_views.peak), notes=f"{vsize / 2 ** 20:.0f} MiB of Parquet",
                         seconds=views_s, parquet_bytes=vsize, peak_rss_bytes=mem_views.peak,
                         chunk_size=args.views_chunk)
            open_dashboards("all sections, weight views stored", model=model, transcoders=transcoders)
        recorder.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
