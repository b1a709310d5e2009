"""Run circuit-tracer 0.5.0's attribution and write what it computed, for
tc_explore's cross-check tests and benchmark. Runs in circuit-tracer's own
environment (``scripts/make_circuit_tracer_env.sh``), never imports tc_explore.

    .ctvenv/bin/python scripts/circuit_tracer_attribute.py --model gpt2 \\
        --transcoders OWNER/NAME --tokens 0,5,7,9 --out DIR [--max-feature-nodes N]
        [--batch-size B] [--prune] [--graph-files SLUG] [--logit-diff A,B]

The model and transcoders are loaded the way circuit-tracer's users load them
(``ReplacementModel.from_pretrained(model, transcoders)``: TransformerLens
``HookedTransformer.from_pretrained`` and ``load_transcoder_from_hub``), so
with ``HF_HUB_OFFLINE=1`` they come from the Hugging Face cache under
``HF_HOME``.

Writes into ``--out``:

* ``graph.safetensors``: ``adjacency`` [n, n] (rows targets, columns
  sources, circuit-tracer's node order), ``active_features`` [N, 3] (layer,
  pos, feature), ``activation_values`` [N], ``selected_features``,
  ``input_tokens``, ``logit_token_ids``, ``logit_probabilities``; with
  ``--prune`` also ``node_mask``, ``edge_mask``, ``cumulative_scores`` and
  ``node_influence`` (at the default thresholds);
* ``info.json``: seconds spent in ``attribute``, the process's peak resident
  memory, n_layers, the logit targets' strings, and with ``--prune`` the
  replacement and completeness scores;
* with ``--graph-files SLUG``: ``SLUG.json`` (and ``graph-metadata.json``)
  written by circuit-tracer's own ``create_graph_files``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--transcoders", required=True, help="Hub repo id of a circuit-tracer transcoder set")
    p.add_argument("--tokens", required=True, help="comma-separated token ids (BOS first)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--logit-diff", default=None,
                   help="'A,B': one custom target, logit(A) - logit(B) (token ids), weight 1")
    p.add_argument("--prune", action="store_true")
    p.add_argument("--graph-files", default=None, metavar="SLUG")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    if args.threads:
        torch.set_num_threads(args.threads)
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores, compute_node_influence, prune_graph

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    model = ReplacementModel.from_pretrained(args.model, args.transcoders, device=torch.device(args.device),
                                             dtype=torch.float32)
    load_seconds = time.perf_counter() - t_load
    tokens = torch.tensor([int(t) for t in args.tokens.split(",")], dtype=torch.long)
    targets = None
    if args.logit_diff:
        from circuit_tracer.attribution.targets import CustomTarget
        a, b = (int(t) for t in args.logit_diff.split(","))
        W_U = model.unembed.W_U
        targets = [CustomTarget(f"logit({a})-logit({b})", 1.0, (W_U[:, a] - W_U[:, b]).detach())]
    t0 = time.perf_counter()
    graph = attribute(tokens, model, attribution_targets=targets, max_n_logits=args.max_n_logits,
                      desired_logit_prob=args.desired_logit_prob, batch_size=args.batch_size,
                      max_feature_nodes=args.max_feature_nodes)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    tensors = {
        "adjacency": graph.adjacency_matrix.float().contiguous(),
        "active_features": graph.active_features.long().contiguous(),
        "activation_values": graph.activation_values.float().contiguous(),
        "selected_features": graph.selected_features.long().contiguous(),
        "input_tokens": graph.input_tokens.long().cpu().contiguous(),
        "logit_token_ids": graph.logit_token_ids.long().cpu(),
        "logit_probabilities": graph.logit_probabilities.float().cpu().contiguous(),
    }
    info = {"seconds": seconds, "load_seconds": load_seconds, "peak_rss_bytes": peak,
            "n_layers": int(model.cfg.n_layers), "d_vocab": int(model.cfg.d_vocab),
            "logit_targets": [t.token_str for t in graph.logit_targets],
            "n_active_features": int(graph.active_features.shape[0]),
            "n_edges": int(torch.count_nonzero(graph.adjacency_matrix))}
    if args.prune:
        node_mask, edge_mask, cumulative = prune_graph(graph)
        n_logits = len(graph.logit_targets)
        weights = torch.zeros(graph.adjacency_matrix.shape[0])
        weights[-n_logits:] = graph.logit_probabilities
        tensors.update(node_mask=node_mask.contiguous(), edge_mask=edge_mask.contiguous(),
                       cumulative_scores=cumulative.float().contiguous(),
                       node_influence=compute_node_influence(graph.adjacency_matrix, weights).float())
        replacement, completeness = compute_graph_scores(graph)
        info.update(replacement=replacement, completeness=completeness)
    save_file(tensors, str(out / "graph.safetensors"))
    if args.graph_files:
        from circuit_tracer.utils.create_graph_files import create_graph_files
        create_graph_files(graph, slug=args.graph_files, output_path=str(out),
                           scan=graph.scan or args.transcoders)
    (out / "info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(json.dumps({k: info[k] for k in ("seconds", "peak_rss_bytes", "n_active_features", "n_edges")}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
