"""Benchmark of ``tc_explore.circuits.attribute`` (a script, not a test).

    python benchmarks/bench_attribution.py [--lengths 16 64] [--caps none 4096 2048] [--device cuda] [--record]

On a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257;
random weights, saved with save_pretrained and loaded through
tc_explore.load_model) and 12 full-width (d_sae 24576) random transcoders
whose encoder biases are shifted so that about ``--l0`` features fire per token
(as trained GPT-2 transcoders do; zero-centred random biases would fire ~40%),
it times ``attribute`` on random-token prompts of each length, for the full
graph and for each ``max_feature_nodes`` cap, and prints: seconds, peak
resident memory of the process (the kernel's high-water mark, reset before
each run; the notes give the resident memory when the run starts: model,
transcoders and the process), peak CUDA memory, the number of active
features, nodes and non-zero edges. After the setup, the memory that making
the random weights freed is handed back to the system (glibc's
``malloc_trim``: 0.7 GiB of random-number buffers otherwise stay counted as
resident), so that the peak counts what a process that loaded the same model
and transcoders from files holds. A full graph whose dense
matrix would exceed ``--max-matrix-gib`` is refused by ``attribute`` with its
size; the refusal is printed.

``--circuit-tracer PYTHON`` also runs circuit-tracer 0.5.0's ``attribute``
on exactly the same model, transcoders, prompts, caps and batch size (the
model and transcoders exported to a Hugging Face cache, loaded by its own
loaders in a subprocess of its own environment) and prints its seconds and
its process's peak RSS beside ours, with the ratios.

The reference figures the issue gives (circuit-tracer 0.5.0 on the same
2-core CPU, 16-token prompt, 18,019 active features, batch size 256): full
graph 460.7 s / 5.95 GB peak RSS; max_feature_nodes=2048: 62.9 s / 4.9 GB.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # noqa: E402
from bench_index import PeakMemory, build_model, build_transcoders, gib  # noqa: E402

from tc_explore.memory import release_free_heap  # noqa: E402


@torch.no_grad()
def calibrate_l0(model, transcoders, vocab: int, l0: float, n_tokens: int = 64) -> None:
    """Shift each layer's encoder bias so that exactly ``l0`` features fire per
    token on average over a random calibration prompt (the unit-RMS estimate of
    bench_index.build_transcoders is off on this random model's activations)."""
    from tc_explore.circuits import prompt_context
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocab, (n_tokens,), generator=g)
    tokens[0] = model.tokenizer.bos_token_id
    ctx = prompt_context(model, transcoders, tokens, encode_now=False)
    for layer in transcoders.layers:
        tc = transcoders[layer]
        pre = tc.pre_activation(ctx.mlp_in[layer, 1:])                     # [P-1, d_sae]
        k = int(round(l0 * pre.shape[0]))
        threshold = torch.topk(pre.flatten(), k + 1).values[-2:].mean()      # between the k-th and k+1-th
        tc.b_enc.sub_(threshold)


def export_for_circuit_tracer(model_dir: str, transcoders, hf_home: str) -> str:
    """Put the benchmark's model (under the Hub id ``gpt2``) and its calibrated
    transcoders (circuit-tracer's layout: config.yaml + layer_{L}.safetensors,
    read at ``ln2.hook_normalized``, written at ``hook_mlp_out``) into a Hugging
    Face cache under ``hf_home``, for circuit-tracer to load by Hub id. The
    model's norms have unit gains and zero biases, so circuit-tracer's
    ``ln2.hook_normalized`` (after the gain and bias) reads what ours does.
    Returns the transcoder set's repo id."""
    import yaml
    from tc_explore.formats import write_circuit_tracer_safetensors
    from tc_explore.testing import as_published_config, install_in_hf_cache
    from tc_explore.transcoder import Transcoder
    as_published_config(model_dir)
    install_in_hf_cache(hf_home, "gpt2", {n: os.path.join(model_dir, n) for n in os.listdir(model_dir)})
    repo = "tc-explore-bench/gpt2-random-24576"
    staging = os.path.join(hf_home, "staging")
    os.makedirs(staging)
    config = os.path.join(staging, "config.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(dict(model_name="gpt2", model_kind="transcoder_set",
                            feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out"), f)
    files = {"config.yaml": config}
    for layer in transcoders.layers:
        tc = transcoders[layer]
        # circuit-tracer's files have no input centring: fold b_dec into b_enc (the
        # same pre-activations, so the same features fire with the same values)
        folded = Transcoder(tc.W_enc.cpu(), (tc.b_enc - tc.b_dec @ tc.W_enc).cpu(), tc.W_dec.cpu(),
                            None, tc.b_dec_out.cpu(), threshold=None if tc.threshold is None
                            else tc.threshold.cpu(), layer=layer)
        name = f"layer_{layer}.safetensors"
        files[name] = write_circuit_tracer_safetensors(folded, os.path.join(staging, name))
        install_in_hf_cache(hf_home, repo, {name: files.pop(name)})    # one file in memory at a time
        os.remove(os.path.join(staging, name))
    install_in_hf_cache(hf_home, repo, files)
    return repo


def run_circuit_tracer(python: str, hf_home: str, repo: str, tokens: torch.Tensor, cap: int | None,
                       args) -> dict:
    """circuit-tracer's ``attribute`` on ``tokens`` in a subprocess (its own
    environment): its seconds and its process's peak RSS, as the runner reports."""
    import json
    import subprocess
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts",
                          "circuit_tracer_attribute.py")
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = os.path.join(hf_home, "ct_out")
    cmd = [python, runner, "--model", "gpt2", "--transcoders", repo, "--out", out,
           "--tokens", ",".join(map(str, tokens.tolist())), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--device", args.device]
    if cap is not None:
        cmd += ["--max-feature-nodes", str(cap)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"circuit-tracer failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    p.add_argument("--caps", nargs="+", default=["none", "4096", "2048"],
                   help="max_feature_nodes values; 'none' for the full graph")
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--l0", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-matrix-gib", type=float, default=8.0)
    p.add_argument("--prune", action="store_true", help="also time prune() + scores() on each graph")
    p.add_argument("--circuit-tracer", metavar="PYTHON", default=None,
                   help="also time circuit-tracer 0.5.0's attribute on the same model, transcoders, "
                        "prompts and caps, with this interpreter (its environment, e.g. .ctvenv/bin/python "
                        "from scripts/make_circuit_tracer_env.sh), in a subprocess")
    records.add_arguments(p)
    args = p.parse_args(argv)
    recorder = records.Recorder(args, argv)
    torch.set_num_threads(args.threads)

    from tc_explore import load_model
    from tc_explore.circuits import attribute, prompt_context
    from tc_explore.errors import InvalidInputError

    work = tempfile.mkdtemp(prefix="tc_bench_attr_")
    try:
        t = time.perf_counter()
        vocab = build_model(os.path.join(work, "model"))
        model = load_model(os.path.join(work, "model"), device=args.device)
        transcoders = build_transcoders(768, args.d_sae, 12, args.l0).to(device=args.device)
        calibrate_l0(model, transcoders, vocab, args.l0)
        if args.circuit_tracer:
            ct_home = os.path.join(work, "hf")
            ct_repo = export_for_circuit_tracer(os.path.join(work, "model"), transcoders, ct_home)
        release_free_heap()
        print(f"setup: GPT-2-small-shaped model (vocab {model.cfg.d_vocab}), 12 x d_sae {args.d_sae} "
              f"transcoders, {time.perf_counter() - t:.1f} s; {args.threads} threads, device {args.device}; "
              f"batch_size {args.batch_size}; resident {gib(PeakMemory.rss())}")
        cuda = args.device.startswith("cuda")
        g = torch.Generator().manual_seed(0)
        print(f"{'tokens':>6} {'cap':>6} {'active':>7} {'nodes':>7} {'edges':>11} {'seconds':>8} "
              f"{'peak RSS':>10} {'peak CUDA':>10}  notes")
        for n in args.lengths:
            tokens = torch.randint(1, vocab, (n,), generator=g)
            tokens[0] = model.tokenizer.bos_token_id
            ctx = prompt_context(model, transcoders, tokens, prepend_bos=False)     # warm-up and L0
            active = sum(int((ctx.feature_acts(l)[1:] != 0).sum()) for l in transcoders.layers)
            del ctx
            for cap in args.caps:
                mfn = None if cap == "none" else int(cap)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                note = ""
                release_free_heap()
                with PeakMemory(exact=True) as mem:
                    t = time.perf_counter()
                    try:
                        graph = attribute(model, transcoders, tokens, max_feature_nodes=mfn,
                                          batch_size=args.batch_size,
                                          max_matrix_bytes=int(args.max_matrix_gib * 2 ** 30))
                    except InvalidInputError as err:
                        graph, note = None, f"refused: {err}"
                    if cuda:
                        torch.cuda.synchronize()
                    secs = time.perf_counter() - t
                cuda_peak = gib(torch.cuda.max_memory_allocated()) if cuda else "-"
                size = (f"{n} tokens, " + ("full graph" if mfn is None else f"max_feature_nodes {mfn}")
                        + ("" if args.d_sae == 24576 else f", d_sae {args.d_sae}"))
                figures = dict(tokens=n, max_feature_nodes=mfn, active_features=active, seconds=secs,
                               peak_rss_bytes=mem.peak, d_sae=args.d_sae, l0=args.l0,
                               batch_size=args.batch_size,
                               peak_cuda_bytes=torch.cuda.max_memory_allocated() if cuda else None)
                if graph is None:
                    print(f"{n:>6} {cap:>6} {active:>7} {'-':>7} {'-':>11} {secs:>8.1f} {gib(mem.peak):>10} "
                          f"{cuda_peak:>10}  {note}")
                    recorder.add("attribute (attribution graph)", size, "-", notes=note, **figures)
                    continue
                note = f"RSS at start {gib(mem.start)}"
                if args.prune:
                    t = time.perf_counter()
                    pruned = graph.prune()
                    scores = graph.scores()
                    note += (f"; prune+scores {time.perf_counter() - t:.1f} s -> {len(pruned)} nodes, "
                            f"{pruned.n_edges} edges; replacement {scores['replacement']:.3f}, "
                            f"completeness {scores['completeness']:.3f}")
                print(f"{n:>6} {cap:>6} {active:>7} {len(graph):>7} {graph.n_edges:>11} {secs:>8.1f} "
                      f"{gib(mem.peak):>10} {cuda_peak:>10}  {note}", flush=True)
                recorder.add("attribute (attribution graph)", size, f"{secs:.1f} s", peak_rss=gib(mem.peak),
                             notes="; ".join(x for x in ((f"peak CUDA {cuda_peak}" if cuda else ""),
                                                         f"{active:,} active; {len(graph):,} nodes, "
                                                         f"{graph.n_edges:,} edges", note) if x),
                             nodes=len(graph), edges=graph.n_edges, **figures)
                del graph
                if args.circuit_tracer:
                    ct = run_circuit_tracer(args.circuit_tracer, ct_home, ct_repo, tokens, mfn, args)
                    print(f"{n:>6} {cap:>6} {ct['n_active_features']:>7} {'-':>7} {ct['n_edges']:>11} "
                          f"{ct['seconds']:>8.1f} {gib(ct['peak_rss_bytes']):>10} {'-':>10}  circuit-tracer "
                          f"0.5.0 (subprocess); tc_explore {ct['seconds'] / secs:.1f}x faster, peak RSS "
                          f"{mem.peak / ct['peak_rss_bytes']:.2f}x", flush=True)
                    recorder.add("circuit-tracer 0.5.0 attribute (same setup)", size, f"{ct['seconds']:.1f} s",
                                 peak_rss=gib(ct["peak_rss_bytes"]),
                                 notes=f"{ct['n_active_features']:,} active; {ct['n_edges']:,} edges; "
                                       f"tc_explore {ct['seconds'] / secs:.1f}x faster in the same run",
                                 tokens=n, max_feature_nodes=mfn, seconds=ct["seconds"],
                                 peak_rss_bytes=ct["peak_rss_bytes"], active_features=ct["n_active_features"],
                                 edges=ct["n_edges"], batch_size=args.batch_size,
                                 tc_explore_seconds=secs, tc_explore_peak_rss_bytes=mem.peak)
        recorder.save()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
