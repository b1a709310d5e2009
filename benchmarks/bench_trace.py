"""Time a greedy path trace (3 iterations × 15 branches, the paper's settings)
on a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257,
n_ctx 1024; random weights) with 12 full-width (24576) random transcoders and a
10-token prompt, with and without the per-prompt encoding cache.

    python benchmarks/bench_trace.py [--device cpu|cuda] [--repeats 3] [--d-sae 24576] [--record]

A script that prints figures, not a test. Memory: the model (~0.5 GB) and the
transcoders (~1.8 GB at full width, float32) are built once; transcoders are
made one at a time so no second copy is held.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402


def build_model_dir(directory: str, seed: int = 0) -> str:
    """Random GPT-2-small-shaped weights with our word tokenizer, via save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tc_explore.testing import FIXTURE_WORDS
    from tc_explore.tokenization import word_tokenizer

    tokenizer = word_tokenizer(FIXTURE_WORDS)
    bos = tokenizer.bos_token_id
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=bos, eos_token_id=bos)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_transcoders(d_model: int, d_sae: int, n_layers: int, device: str):
    from tc_explore.testing import random_transcoder
    from tc_explore.transcoder import TranscoderSet

    tcs = {}
    for layer in range(n_layers):
        tc = random_transcoder(d_model, d_sae, layer, seed=0).requires_grad_(False).to(device)
        tcs[layer] = tc
        gc.collect()
    return TranscoderSet.from_transcoders(tcs, name=f"random-{d_sae}", device=device)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--branches", type=int, default=15)
    ap.add_argument("--keep-leaves", action="store_true",
                    help="let error/bias/embedding leaves into the search (it then stops early)")
    records.add_arguments(ap)
    args = ap.parse_args(argv)
    recorder = records.Recorder(args, argv)

    from tc_explore import load_model
    from tc_explore.circuits import find_paths, logit_diff_target, prompt_context

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="bench_trace_") as tmp:
        t0 = time.perf_counter()
        model = load_model(build_model_dir(tmp), device=args.device)
        t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    tcs = build_transcoders(768, args.d_sae, 12, args.device)
    t_tc = time.perf_counter() - t0
    prompt = "The war lasted from 1735 to 17 and"                    # 10 tokens with BOS
    n_tok = model.to_tokens(prompt).shape[1]
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"model: 12 layers, d_model 768, 12 heads, vocab {model.cfg.d_vocab}, n_ctx "
          f"{model.cfg.n_ctx}; built+loaded in {t_model:.1f} s")
    print(f"transcoders: 12 × d_sae {args.d_sae}; built in {t_tc:.1f} s; prompt {n_tok} tokens")

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # Random transcoders reconstruct nothing, so their error nodes (and biases)
    # dominate every target and a plain search would stop at these leaves after
    # one step. Excluding leaf kinds makes every iteration expand all 15
    # branches: the search's full cost, which is what is timed here.
    exclude = () if args.keep_leaves else ("error", "mlp", "embed", "pos_embed", "attn_bias",
                                           "dec_bias", "offset")
    warm = prompt_context(model, tcs, prompt)
    find_paths(warm, logit_diff_target(warm, "40", "20"), iterations=1, branches=2)
    del warm
    rows = []
    for cached in (True, False):
        times, ctx_times = [], []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            ctx = prompt_context(model, tcs, prompt, cache_encodings=cached)
            sync()
            t1 = time.perf_counter()
            target = logit_diff_target(ctx, "40", "20")
            res = find_paths(ctx, target, iterations=args.iterations, branches=args.branches,
                             exclude_kinds=exclude)
            sync()
            t2 = time.perf_counter()
            ctx_times.append(t1 - t0)
            times.append(t2 - t1)
        rows.append((cached, statistics.median(ctx_times), statistics.median(times),
                     res.n_decompositions, ctx.n_encodings, len(res.paths)))
        del ctx
        gc.collect()
    print(f"\ntrace {args.iterations} iterations × {args.branches} branches, median of {args.repeats}"
          f"{'' if args.keep_leaves else ' (leaf kinds excluded, so every branch is expanded)'}:")
    print(f"{'encoding cache':<16}{'context s':>11}{'trace s':>10}{'total s':>10}"
          f"{'decomps':>9}{'encodings':>11}{'paths':>7}")
    for cached, tc_, tt, nd, ne, npaths in rows:
        print(f"{'on' if cached else 'off':<16}{tc_:>11.3f}{tt:>10.3f}{tc_ + tt:>10.3f}"
              f"{nd:>9}{ne:>11}{npaths:>7}")
    on, off = rows[0], rows[1]
    print(f"\nspeed-up of the cache (context + trace): {(off[1] + off[2]) / (on[1] + on[2]):.1f}×")
    cuda_peak = torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else None
    print(f"peak RSS {rss_gb():.2f} GB" + (f", peak CUDA {cuda_peak:.2f} GB" if cuda_peak is not None else ""))
    recorder.add("find_paths trace",
                 f"{n_tok} tokens, {args.iterations} iterations × {args.branches} branches"
                 + ("" if args.d_sae == 24576 else f", d_sae {args.d_sae}"),
                 f"{on[1] + on[2]:.1f} s",
                 baseline=f"without the per-prompt encoding cache: {off[1] + off[2]:.1f} s",
                 ratio=records.speedup(off[1] + off[2], on[1] + on[2]),
                 peak_rss=f"{rss_gb():.2f} GiB",
                 notes=f"median of {args.repeats}" + (f"; peak CUDA {cuda_peak:.2f} GB" if cuda_peak else ""),
                 context_s=on[1], trace_s=on[2], uncached_context_s=off[1], uncached_trace_s=off[2],
                 decompositions=on[3], encodings=on[4], paths=on[5], peak_rss_gib=rss_gb(),
                 peak_cuda_gb=cuda_peak)
    recorder.save()


if __name__ == "__main__":
    sys.exit(main())
