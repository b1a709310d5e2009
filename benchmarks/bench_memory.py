"""Peak memory of Gemma-2-2B with Gemma Scope transcoders loaded lazily in
bfloat16: a model of Gemma-2-2B's real shape (26 layers, d_model 2304, 8
heads / 4 key-value heads of 256, d_mlp 9216, vocab 256000; random weights,
saved with save_pretrained in bfloat16) and one Gemma Scope ``params.npz`` of
16384 features per layer (float32, the published layout, behind a
circuit-tracer ``config.yaml``), then: load the model, load every transcoder,
build a prompt context (all layers encoded) and decompose a logit target.

    flock /tmp/tc_bench.lock python benchmarks/bench_memory.py            # 4 layers (modest)
    flock /tmp/tc_bench.lock python benchmarks/bench_memory.py --full     # all 26 layers
    ... [--dtype bfloat16|float16|float32] [--device cpu|cuda] [--work DIR] [--keep] [--record]

The files are written by a child process (its own memory is not counted);
the measuring process prints its resident set size after each step and its
peak (``ru_maxrss``). Disk: about 5.3 GB for the full model in bfloat16 plus
0.3 GB per transcoder layer; ``--work DIR --keep`` reuses them across runs.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402

GEMMA_2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                  max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
D_SAE = 16384


def build(work: Path, n_layers: int, d_sae: int) -> None:
    """Write the model directory and the transcoder directory (run in a child)."""
    import numpy as np
    import torch
    import yaml
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tc_explore.testing import FIXTURE_WORDS
    from tc_explore.tokenization import word_tokenizer

    model_dir, tc_dir = work / "model", work / "transcoders"
    if not (model_dir / "config.json").is_file():
        tokenizer = word_tokenizer(FIXTURE_WORDS)
        bos = tokenizer.bos_token_id
        config = Gemma2Config(**{**GEMMA_2_2B, "num_hidden_layers": n_layers}, bos_token_id=bos,
                              eos_token_id=bos, pad_token_id=bos)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)           # never hold a float32 copy
        model = Gemma2ForCausalLM(config)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        gc.collect()
    rng = np.random.default_rng(0)
    d = GEMMA_2_2B["hidden_size"]
    uris = []
    for layer in range(n_layers):
        name = f"layer_{layer}/width_16k/average_l0_{50 + layer}/params.npz"
        uris.append(name)
        path = tc_dir / name
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(W_enc=(rng.standard_normal((d, d_sae), dtype=np.float32) / d ** 0.5),
                      W_dec=(rng.standard_normal((d_sae, d), dtype=np.float32) / d_sae ** 0.5),
                      b_enc=np.full(d_sae, -0.5, dtype=np.float32),   # realistic sparsity
                      b_dec=np.zeros(d, dtype=np.float32),
                      threshold=np.full(d_sae, 0.5, dtype=np.float32))
        np.savez(path, **arrays)
        del arrays
    (tc_dir / "config.yaml").write_text(yaml.safe_dump(dict(
        model_name="google/gemma-2-2b", model_kind="transcoder_set",
        feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
        transcoders=uris)))


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def measure(work: Path, dtype: str, device: str) -> dict:
    """Prints each step; returns the figures (seconds and GiB per step, peak)."""
    import torch

    from tc_explore import load_model, load_transcoders
    from tc_explore.circuits import decompose, logit_diff_target, prompt_context

    steps = {}

    def step(name, t0):
        seconds = time.perf_counter() - t0
        print(f"{name:<44s} {seconds:7.1f} s   RSS {rss_gb():6.2f} GB   "
              f"peak {peak_gb():6.2f} GB", flush=True)
        steps[name] = dict(seconds=round(seconds, 3), rss_gib=round(rss_gb(), 3))

    print(f"start (python + torch + tc_explore imported)          RSS {rss_gb():6.2f} GB")
    t0 = time.perf_counter()
    model = load_model(str(work / "model"), device=device, dtype=dtype)
    step(f"model loaded ({dtype}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)", t0)
    t0 = time.perf_counter()
    tcs = load_transcoders(str(work / "transcoders"), device=device, dtype=dtype)
    step(f"transcoder set opened ({len(tcs)} layers, lazy)", t0)
    t0 = time.perf_counter()
    for layer in tcs.layers:
        tcs[layer]
    step(f"all {len(tcs)} transcoders loaded", t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        ctx = prompt_context(model, tcs, "The war lasted from 1735 to 17")
    step("prompt context (all layers encoded)", t0)
    t0 = time.perf_counter()
    d = decompose(ctx, logit_diff_target(ctx, " war", " cat"))
    step(f"decompose a logit target (error {abs(d.total - d.target.value):.1e})", t0)
    cuda_peak = torch.cuda.max_memory_allocated() / 1024 ** 3 if device.startswith("cuda") else None
    if cuda_peak is not None:
        print(f"CUDA peak allocated {cuda_peak:.2f} GB")
    print(f"PEAK RSS {peak_gb():.2f} GB")
    return dict(steps=steps, peak_rss_gib=peak_gb(), peak_cuda_gib=cuda_peak)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="all 26 layers (default: 4)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--d-sae", type=int, default=D_SAE)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="directory for the files (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the files in --work")
    ap.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)
    records.add_arguments(ap)
    args = ap.parse_args(argv)
    n_layers = args.layers or (26 if args.full else 4)
    work = Path(args.work or tempfile.mkdtemp(prefix="tc_bench_memory_"))
    if args._build:
        build(work, n_layers, args.d_sae)
        return
    recorder = records.Recorder(args, argv)
    print(f"Gemma-2-2B shape, {n_layers} layers, {args.d_sae} features per transcoder, files in {work}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--_build", "--work", str(work), "--layers",
                    str(n_layers), "--d-sae", str(args.d_sae)], check=True)
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) / 1024 ** 3
    print(f"files written in {time.perf_counter() - t0:.0f} s ({size:.1f} GB on disk)", flush=True)
    try:
        figures = measure(work, args.dtype, args.device)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(s["seconds"] for s in figures["steps"].values())
    recorder.add(f"Gemma-2-2B shape in {args.dtype}: load model + transcoders, encode, decompose",
                 f"{n_layers} layers, {args.d_sae:,} features each", f"{total:.1f} s",
                 peak_rss=f"{figures['peak_rss_gib']:.2f} GiB",
                 notes=f"{size:.1f} GB of files" + (f"; peak CUDA {figures['peak_cuda_gib']:.2f} GiB"
                                                   if figures["peak_cuda_gib"] is not None else ""),
                 files_gb=size, layers=n_layers, d_sae=args.d_sae, dtype=args.dtype, **figures)
    recorder.save()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
