"""Benchmark of FeatureIndex.build and dashboard opening (a script, not a test).

    python benchmarks/bench_index.py --tokens 8192 --no-views --no-on-the-fly     # CPU, <= 25 %
    python benchmarks/bench_index.py --tokens 65536 --no-views --no-on-the-fly    # CPU, <= 15 %
    python benchmarks/bench_index.py --device cuda --threads 16 --tokens 1048576 --batch-size 32 --no-on-the-fly

On a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257,
n_ctx 1024; random weights, saved with save_pretrained and loaded through
tc_explore.load_model) and 12 full-width (d_sae 24576) random transcoders
(written in the gpt2-small files' layout and loaded through
tc_explore.load_transcoders; both written by another process), it prints:

* the bare pass: the build's own forward and encodings
  (``tc_explore.index.forward.stream_encodings``: the forward stopped after
  the last transcoder input, every layer encoded as the build does: on a CPU
  into one reused buffer, on a GPU into fresh memory on the build's own
  thread and CUDA stream, ``EncodeWorker``) with nothing kept, over the same
  tokens: the work a build cannot avoid; and for reference, one plain pass
  encoding every layer in the model's thread into fresh memory
  (``Transcoder.encode`` alone, as a user's own loop would);
* bare and build runs alternated (bare, build, bare, ... --repeats builds, a
  bare run before and after each), every run's wall time, CPU time of the
  process and the load average, then medians (the shared machine's load
  drifts; the overhead is the median build against the median bare run, and
  each build against the mean of the bare runs beside it);
* FeatureIndex.build time, its overhead (targets: CPU <= 25 % at >= 8,192
  tokens, <= 15 % at >= 65,536; GPU <= 15 % and >= 30k tokens/s at 1M tokens)
  and tokens/s;
* peak resident memory of each run (sampled every 20 ms) against the process
  before any weights were loaded, and on CUDA peak GPU memory allocated,
  against the target: a build's peak <= model + transcoders + 2 GiB;
* dashboard open time from the saved index, per feature (target: under 100 ms on
  CPU), cold (fresh FeatureIndex.load) and warm: index sections only; with the
  weight-based sections (logit effects, de-embeddings, OV, connections)
  computed per feature; and with them read from weight views precomputed into
  the index (``add_weight_views``), whose build time is printed too.

Random transcoders are given a realistic sparsity (about --l0 features firing
per token, as trained transcoders do) by shifting the encoder bias; the
measured L0 is printed. Dense firing would make every accumulator (and any
top-k over real data) slower; it is not what real transcoders do.
Run it under ``flock /tmp/tc_bench.lock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402


class PeakMemory:
    """Peak resident set size of this process while the block runs, sampled
    every ``interval`` s. ``exact=True`` (Linux) also resets the kernel's
    high-water mark on entry (``/proc/self/clear_refs``) and reads it on exit
    (``VmHWM``), so short spikes between samples count too."""

    def __init__(self, interval: float = 0.02, exact: bool = False):
        self.interval = interval
        self.exact = exact
        self.peak = 0

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def high_water_mark() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._hwm = self.exact and self._reset_high_water_mark()
        self.start = self.rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss(), self.high_water_mark() if self._hwm else 0)


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def build_model(directory: str) -> int:
    """The GPT-2-small-shaped model and its tokenizer saved to ``directory``;
    returns the vocabulary size."""
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
    """Random transcoders firing about ``l0`` features a token, in memory."""
    from tc_explore.testing import random_transcoder
    from tc_explore.transcoder import TranscoderSet

    tcs = {layer: random_transcoder(d_model, d_sae, layer, seed=1, l0=l0) for layer in range(n_layers)}
    return TranscoderSet.from_transcoders(tcs, name=f"bench-random-{d_sae}")


def write_weights(work: str, d_sae: int, l0: float) -> None:
    """The model, and the same random transcoders as ``build_transcoders`` in
    the gpt2-small files' layout (``pchlenski/gpt2-transcoders``' names and
    pickles), which the benchmark loads through ``load_transcoders``, as a
    user loads the real set."""
    from pathlib import Path
    from tc_explore.registry import registry
    from tc_explore.testing import write_gpt2_small_transcoders

    build_model(os.path.join(work, "model"))
    directory = Path(work, "transcoders")
    directory.mkdir(parents=True, exist_ok=True)
    write_gpt2_small_transcoders(registry()["gpt2-small"], directory, 12, 768, d_sae, seed=1, l0=l0)


def write_weights_elsewhere(work: str, d_sae: int, l0: float) -> None:
    """``write_weights`` in a process of its own: what making the random
    weights leaves in memory does not count as this process's."""
    import multiprocessing
    p = multiprocessing.get_context("spawn").Process(target=write_weights, args=(work, d_sae, l0))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"writing the model and transcoder files failed (exit code {p.exitcode})")


def written_weights(weights_dir: str, d_sae: int, l0: float) -> str:
    """``weights_dir``, holding the model and transcoder files (written there
    by ``write_weights_elsewhere`` unless an earlier run did, with the same settings)."""
    marker, settings = os.path.join(weights_dir, "written"), f"d_sae {d_sae}, l0 {l0}\n"
    if not os.path.isfile(marker):
        write_weights_elsewhere(weights_dir, d_sae, l0)
        with open(marker, "w") as f:
            f.write(settings)
    else:
        with open(marker) as f:
            if f.read() != settings:
                raise SystemExit(f"{weights_dir} holds weights of other settings: give another --weights-dir")
    return weights_dir


def load_weights(weights_dir: str, device):
    """The model and transcoders of ``weights_dir``, loaded as a user loads
    them (``load_model``, ``load_transcoders``), every layer read now rather
    than during the first run."""
    from tc_explore import load_model, load_transcoders
    model = load_model(os.path.join(weights_dir, "model"), device=device)
    transcoders = load_transcoders(os.path.join(weights_dir, "transcoders"), device=device)
    for layer in transcoders.layers:
        transcoders[layer]
    return model, transcoders


def random_tokens(model, n_seq: int, seq_len: int) -> torch.Tensor:
    """``[n_seq, seq_len]`` random token ids of the model's vocabulary (seed
    0), each sequence starting with BOS."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, len(model.tokenizer), (n_seq, seq_len), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


def bare_pass(model, transcoders, batches, build_like: bool = True) -> float:
    """The build's forward and encodings (``stream_encodings``, the same
    function FeatureIndex.build runs, as the build runs it: on a CPU into one
    reused output buffer, on a GPU into fresh memory on the build's
    ``EncodeWorker``, its own thread and CUDA stream) with nothing kept:
    seconds (the device synchronised at the end). ``build_like=False``: in the model's thread,
    every layer encoded into fresh memory, as ``Transcoder.encode`` alone
    does (the plain pass a user would write)."""
    from tc_explore.index.forward import EncodeWorker, reuses_buffers, stream_encodings

    def discard(layer, chunks):
        for _, acts in chunks:
            del acts
    gpu = transcoders.device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    buffers = {} if build_like and reuses_buffers(transcoders.device) else None
    sync()
    t0 = time.perf_counter()
    worker = EncodeWorker(transcoders.device, len(transcoders.layers)) if gpu and build_like else None
    try:
        with torch.inference_mode():
            for toks in batches:
                stream_encodings(model, transcoders, transcoders.layers, toks, discard, buffers=buffers,
                                 worker=worker)
    finally:
        if worker is not None:
            worker.close()
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
    p.add_argument("--tokens", "--n-tokens", dest="n_tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2,
                   help="builds, alternated with bare runs (one before and after each)")
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
    p.add_argument("--no-plain", dest="plain", action="store_false",
                   help="skip the reference pass encoding into fresh memory, in the model's thread")
    p.add_argument("--fuse-layers", type=int, default=None,
                   help="layers per accumulator update (FeatureIndex.build's fuse_layers; default: the device's)")
    p.add_argument("--pipeline", default=None, action=argparse.BooleanOptionalAction,
                   help="FeatureIndex.build's pipeline (default: the device's)")
    p.add_argument("--weights-dir", default=None,
                   help="write the model and transcoder files here once and reuse them in later runs")
    records.add_arguments(p)
    args = p.parse_args(argv)
    recorder = records.Recorder(args, argv)
    torch.set_num_threads(args.threads)

    from tc_explore.corpus import Corpus
    from tc_explore.dashboard import add_weight_views, feature_dashboard
    from tc_explore.index import FeatureIndex

    work = tempfile.mkdtemp(prefix="tc_bench_")
    try:
        import gc
        t = time.perf_counter()
        weights_dir = written_weights(args.weights_dir or work, args.d_sae, args.l0)
        written = time.perf_counter() - t
        gc.collect()
        rss_before_weights = PeakMemory.rss()
        t = time.perf_counter()
        model, transcoders = load_weights(weights_dir, args.device)
        gc.collect()
        rss_with_weights = PeakMemory.rss()
        # GPU memory held once loaded: the parameters and whatever else the model keeps.
        gpu_loaded = torch.cuda.memory_allocated() if str(args.device).startswith("cuda") else 0
        vocab = len(model.tokenizer)
        print(f"setup: GPT-2-small-shaped model (vocab {model.cfg.d_vocab}, tokenizer {vocab}) and "
              f"12 x d_sae {args.d_sae} transcoders written in {written:.1f} s (another process), "
              f"loaded in {time.perf_counter() - t:.1f} s; {args.threads} threads, device {args.device}")

        n_seq = args.n_tokens // args.seq_len
        tokens = random_tokens(model, n_seq, args.seq_len)
        corpus = Corpus.from_token_ids(tokens, model, name="random-ids")
        batches = [tokens[i:i + args.batch_size].to(args.device) for i in range(0, n_seq, args.batch_size)]
        print(f"tokens: {n_seq} sequences x {args.seq_len} = {n_seq * args.seq_len}, "
              f"{len(batches)} batches of {args.batch_size}")

        bare_pass(model, transcoders, batches[:1])                    # warm-up
        print(f"measured L0: {measured_l0(model, transcoders, batches[0]):.1f} features per token per layer")
        gpu = str(args.device).startswith("cuda")
        n_tok = n_seq * args.seq_len
        # Diagnostic only: when the build's final Parquet writes start and end.
        import tc_explore.index.build as index_module
        write_span = []
        real_write = index_module.write_layer

        def timed_write(*a, **kw):
            write_span.append(time.perf_counter())
            real_write(*a, **kw)
            write_span.append(time.perf_counter())
        index_module.write_layer = timed_write

        runs = []                                   # dicts: kind, wall, cpu, load, rss, gpu
        build_options = {name: getattr(args, name) for name in ("fuse_layers", "pipeline")
                         if getattr(args, name) is not None}

        def run(kind):
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            load = os.getloadavg()[0]
            cpu0 = time.process_time()
            with PeakMemory() as mem:
                if kind in ("bare", "plain"):
                    wall = bare_pass(model, transcoders, batches, build_like=kind == "bare")
                else:
                    write_span.clear()
                    out = os.path.join(work, f"index{len(runs)}")
                    t = time.perf_counter()
                    FeatureIndex.build(model, transcoders, corpus, n_tok, out, k=args.k,
                                       n_samples=args.n_samples, batch_size=args.batch_size,
                                       checkpoint_every=10 ** 9, progress=False, **build_options)
                    wall = time.perf_counter() - t
            r = dict(kind=kind, out=out if kind == "build" else None, wall=wall,
                     cpu=time.process_time() - cpu0, load=load, load_after=os.getloadavg()[0], rss=mem.peak,
                     gpu=torch.cuda.max_memory_allocated() if gpu else 0,
                     writing=(max(write_span) - min(write_span)) if kind == "build" else 0.0)
            runs.append(r)
            print(f"  run {len(runs)}: {kind:5s} {wall:8.1f} s wall, {r['cpu']:8.1f} s CPU, "
                  f"load {load:.1f} -> {r['load_after']:.1f}, peak RSS {gib(mem.peak)}"
                  + (f", peak GPU {gib(r['gpu'])}" if gpu else "")
                  + (f" (writing the layer tables {r['writing']:.1f} s)" if kind == "build" else ""),
                  flush=True)
            return r

        print(f"\nruns (bare and build alternated, {args.repeats} build(s)):")
        run("bare")
        for _ in range(args.repeats):
            run("build")
            run("bare")
        if args.plain:
            run("plain")                            # for reference: not the overhead's baseline
        index_module.write_layer = real_write
        out = [r["out"] for r in runs if r["kind"] == "build"][-1]    # the last build's index
        bares = [r for r in runs if r["kind"] == "bare"]
        builds = [r for r in runs if r["kind"] == "build"]
        bare, build = (float(np.median([r["wall"] for r in rs])) for rs in (bares, builds))
        bare_cpu, build_cpu = (float(np.median([r["cpu"] for r in rs])) for rs in (bares, builds))
        plains = [r for r in runs if r["kind"] == "plain"]
        beside = [100 * (runs[i]["wall"] / ((runs[i - 1]["wall"] + runs[i + 1]["wall"]) / 2) - 1)
                  for i in range(1, len(runs) - len(plains), 2)]
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)

        def walls(rs):
            return ", ".join(f"{r['wall']:.1f}" for r in rs)
        target = 15 if (gpu or n_tok >= 65536) else 25
        print()
        print(f"bare forwards + encodings: median {bare:.1f} s of {len(bares)} "
              f"({walls(bares)} s)")
        print(f"FeatureIndex.build:        median {build:.1f} s of {len(builds)} "
              f"({walls(builds)} s), "
              f"writing {size / 2 ** 20:.0f} MiB of Parquet in {np.median([r['writing'] for r in builds]):.1f} s")
        print(f"overhead over bare:        {100 * (build / bare - 1):+.1f} % (median build / median bare; "
              f"each build against the bare runs beside it: "
              f"{', '.join(f'{o:+.1f} %' for o in beside)})  (target <= {target} %)")
        plain = float(np.median([r["wall"] for r in plains])) if plains else None
        if plains:
            print(f"plain forwards + encodings (each layer encoded in the model's thread into fresh memory, "
                  f"as Transcoder.encode alone does): {walls(plains)} s; the build against it: "
                  f"{100 * (build / plain - 1):+.1f} % (for reference; the target is against the bare pass)")
        print(f"CPU time (all threads):    bare {bare_cpu:.1f} s, build {build_cpu:.1f} s: "
              f"{100 * (build_cpu / bare_cpu - 1):+.1f} % (medians; steadier than wall time on a shared machine)")
        print(f"throughput:                {n_tok / build:.0f} tokens/s (bare {n_tok / bare:.0f} tokens/s)")
        print(f"load average (1 min) during the runs: {min(r['load'] for r in runs):.1f} to "
              f"{max(max(r['load'], r['load_after']) for r in runs):.1f} on {os.cpu_count()} cores")
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        tc_bytes = sum(p.numel() * p.element_size() for l in transcoders.layers
                       for p in transcoders[l].parameters())
        weights = model_bytes + tc_bytes
        build_rss = max(r["rss"] for r in builds)
        print(f"weights: model {gib(model_bytes)} + transcoders {gib(tc_bytes)} = {gib(weights)}")
        print(f"peak RSS: bare {gib(max(r['rss'] for r in bares))}, build {gib(build_rss)}; "
              f"the process held {gib(rss_before_weights)} before loading any weights and "
              f"{gib(rss_with_weights)} after")
        print(f"  build peak above the process before weights: {gib(build_rss - rss_before_weights)} "
              f"(target <= weights + 2 GiB = {gib(weights + 2 ** 31)}); above the loaded process: "
              f"{gib(build_rss - rss_with_weights)} (target <= 2 GiB)")
        if gpu:
            gpu_bare, gpu_build = (max(r["gpu"] for r in rs) for rs in (bares, builds))
            print(f"peak GPU memory allocated: bare {gib(gpu_bare)}, build {gib(gpu_build)} "
                  f"(weights {gib(weights)}; target: build <= weights + 2 GiB = {gib(weights + 2 ** 31)}: "
                  f"{'met' if gpu_build <= weights + 2 ** 31 else 'NOT met'}); allocated once loaded "
                  f"{gib(gpu_loaded)}, the build's peak {gib(gpu_build - gpu_loaded)} above it, the bare "
                  f"pass's {gib(gpu_bare - gpu_loaded)}")

        width = "" if args.d_sae == 24576 else f", d_sae {args.d_sae}"
        writing = float(np.median([r["writing"] for r in builds]))
        gpu_build = max(r["gpu"] for r in builds) if gpu else None
        recorder.add(
            "FeatureIndex.build", f"{n_tok:,} tokens, batch {args.batch_size}{width}", f"{build:.1f} s",
            baseline=f"bare pass {bare:.1f} s (runs {walls(bares)} s)",
            ratio=f"{100 * (build / bare - 1):+.1f} %", peak_rss=gib(build_rss),
            notes=f"{n_tok / build:,.0f} tokens/s; medians of {len(builds)} builds ({walls(builds)} s) "
                  f"alternated with bare runs; CPU time {100 * (build_cpu / bare_cpu - 1):+.1f} %; "
                  f"{writing:.1f} s writing {size / 2 ** 20:.0f} MiB; peak above the loaded process "
                  f"{gib(build_rss - rss_with_weights)}"
                  + (f"; peak GPU {gib(gpu_build)} (weights {gib(weights)})" if gpu else "")
                  + (f"; plain forward + encode (model's thread, fresh memory each layer) {walls(plains)} s, build "
                     f"{100 * (build / plain - 1):+.1f} % against it"
                     if plains else "")
                  + f"; target ≤ {target} %",
            tokens=n_tok, build_s=build, bare_s=bare, builds_s=[r["wall"] for r in builds],
            bares_s=[r["wall"] for r in bares], plain_bares_s=[r["wall"] for r in plains],
            builds_cpu_s=[r["cpu"] for r in builds], bares_cpu_s=[r["cpu"] for r in bares],
            overhead_beside_pct=beside, writing_s=writing,
            load_1min=[r["load"] for r in runs], index_bytes=size, weights_bytes=weights,
            rss_before_weights_bytes=rss_before_weights, rss_with_weights_bytes=rss_with_weights,
            peak_rss_bare_bytes=max(r["rss"] for r in bares), peak_rss_build_bytes=build_rss,
            peak_gpu_bare_bytes=max(r["gpu"] for r in bares) if gpu else None,
            peak_gpu_build_bytes=gpu_build, gpu_loaded_bytes=gpu_loaded if gpu else None, d_sae=args.d_sae,
            l0=args.l0, k=args.k, n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size)

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
