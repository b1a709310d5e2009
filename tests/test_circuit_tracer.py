"""Our attribution graphs against circuit-tracer 0.5.0's, on the same model and
transcoders: a tiny GPT-2 (every norm gain and bias randomised) served under
the Hub id ``gpt2`` and a transcoder set in circuit-tracer's own layout, in a
Hugging Face cache of its own (``build_circuit_tracer_hub``).

circuit-tracer needs TransformerLens 2 and transformers 4, so it lives in a
separate environment (``scripts/make_circuit_tracer_env.sh``, which ``make
test`` runs) and runs in a subprocess (``scripts/circuit_tracer_attribute.py``),
loading the model and transcoders through its own loaders from that cache; we
load the same files with ``load_model`` / ``load_transcoders``.

Nodes are matched between the two orderings by (kind, layer, position,
feature or token). Tolerance: float32 rounding (edges within 1e-6 of the
largest edge)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tc_explore import load_model, load_transcoders
from tc_explore.circuits import attribute

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "scripts" / "circuit_tracer_attribute.py"
CT_PYTHON = Path(os.environ.get("TC_EXPLORE_CIRCUIT_TRACER_PYTHON", ROOT / ".ctvenv" / "bin" / "python"))
REQUIRED = os.environ.get("TC_EXPLORE_REQUIRE_CIRCUIT_TRACER") == "1"
# Words of the fixture vocabulary: BOS, then "The war lasted from 17 ..." style prompt.
PROMPT = "The war lasted from the year it had been when the"
EDGE_RTOL = 1e-6          # float32 rounding, relative to the largest edge


def _check_environment() -> None:
    if CT_PYTHON.is_file():
        return
    reason = (f"circuit-tracer's environment {CT_PYTHON} is missing: build it with "
              "scripts/make_circuit_tracer_env.sh (make test does)")
    if REQUIRED:
        pytest.fail(reason + " [TC_EXPLORE_REQUIRE_CIRCUIT_TRACER=1]", pytrace=False)
    pytest.skip(reason)


def run_circuit_tracer(hub, tokens: list[int], out: Path, *extra: str) -> tuple[dict, dict]:
    """Run circuit-tracer on ``tokens`` against ``hub``'s cache; its tensors and info."""
    from safetensors.torch import load_file
    env = dict(os.environ, HF_HOME=str(hub.hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("HF_HUB_CACHE", None)
    cmd = [str(CT_PYTHON), str(RUNNER), "--model", hub.model_repo, "--transcoders", hub.transcoder_repo,
           "--tokens", ",".join(map(str, tokens)), "--out", str(out), "--threads", "2", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"circuit-tracer failed:\n{proc.stderr[-4000:]}"
    return load_file(str(out / "graph.safetensors")), json.loads((out / "info.json").read_text())


def circuit_tracer_keys(ct: dict, n_layers: int) -> list[tuple]:
    """circuit-tracer's node order as (kind, layer, pos, feature or token) keys:
    selected features, errors (layer-major), embeddings, logits."""
    tokens = ct["input_tokens"].tolist()
    P = len(tokens)
    feats = ct["active_features"][ct["selected_features"]].tolist()
    keys = [("feature", l, p, f) for l, p, f in feats]
    keys += [("error", l, p, -1) for l in range(n_layers) for p in range(P)]
    keys += [("embedding", -1, p, tokens[p]) for p in range(P)]
    keys += [("logit", n_layers, P - 1, t) for t in ct["logit_token_ids"].tolist()]
    return keys


def our_keys(graph) -> list[tuple]:
    n = graph.nodes
    return [(k, int(l) if k != "embedding" else -1, int(p), int(i) if k != "error" else -1)
            for k, l, p, i in n[["kind", "layer", "pos", "index"]].itertuples(index=False)]


def matched(graph, ct: dict, n_layers: int):
    """(index of each of our nodes in circuit-tracer's order, circuit-tracer's keys)."""
    keys = circuit_tracer_keys(ct, n_layers)
    where = {k: j for j, k in enumerate(keys)}
    ours = our_keys(graph)
    missing = [k for k in ours if k not in where]
    assert not missing, f"{len(missing)} of our nodes are not circuit-tracer nodes, e.g. {missing[:5]}"
    return torch.tensor([where[k] for k in ours]), keys


def compare_adjacency(graph, ct: dict, n_layers: int) -> dict:
    """Assert the two adjacency matrices agree on the matched nodes, and that
    circuit-tracer's nodes we leave out (the BOS position's errors, whose
    writes it zeroes) have no edges. Returns the measured differences."""
    idx, keys = matched(graph, ct, n_layers)
    A_ct = ct["adjacency"].double()
    ours = graph.adjacency.double()
    diff = (A_ct[idx][:, idx] - ours).abs()
    scale = float(ours.abs().max())
    rest = torch.ones(len(keys), dtype=torch.bool)
    rest[idx] = False
    assert {k[0] for k, r in zip(keys, rest.tolist()) if r} <= {"error"}
    assert all(k[2] == 0 for k, r in zip(keys, rest.tolist()) if r), "only BOS-position errors are left out"
    assert not rest.any() or float(A_ct[:, rest].abs().max()) == 0.0
    assert float(diff.max()) <= EDGE_RTOL * scale, (float(diff.max()), scale)
    return {"max_abs_diff": float(diff.max()), "max_abs_edge": scale}


# -- fixtures: a hub per (architecture, transcoder kind), circuit-tracer run once on each ---------
@dataclass
class Case:
    hub: object
    model: object
    transcoders: object
    tokens: list[int]


CASES = [("gpt2", "plt"), ("gpt2", "skip"), ("gpt2", "clt"), ("qwen3", "plt"), ("qwen3", "clt")]
_built: dict[tuple[str, str], Case] = {}


def _case(arch: str, kind: str, tmp_path_factory) -> Case:
    if (arch, kind) not in _built:
        _check_environment()
        from tc_explore.testing import build_circuit_tracer_hub
        hub = build_circuit_tracer_hub(tmp_path_factory.mktemp(f"ct_hf_{arch}_{kind}"), arch, kind)
        model = load_model(str(hub.model_dir), device="cpu", process_weights=False)
        transcoders = load_transcoders(str(hub.transcoder_dir))
        tokens = model.to_tokens(PROMPT, prepend_bos=True)[0].tolist()
        _built[arch, kind] = Case(hub, model, transcoders, tokens)
    return _built[arch, kind]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def case(request, tmp_path_factory) -> Case:
    return _case(*request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2_case(tmp_path_factory) -> Case:
    return _case("gpt2", "plt", tmp_path_factory)


@pytest.fixture(scope="module")
def full_run(case, tmp_path_factory):
    return run_circuit_tracer(case.hub, case.tokens, tmp_path_factory.mktemp("ct_full"), "--prune")


@pytest.fixture(scope="module")
def full_graph(case):
    return attribute(case.model, case.transcoders, case.tokens)


def test_fixture_is_realistically_sparse(full_run, case):
    ct, info = full_run
    n_pos = len(case.tokens) - 1                 # BOS excluded, as circuit-tracer does
    per_token_layer = info["n_active_features"] / (n_pos * case.hub.n_layers)
    assert 0.03 * case.hub.d_sae < per_token_layer < 0.25 * case.hub.d_sae


def test_same_nodes(full_graph, full_run, case):
    ct, info = full_run
    keys = circuit_tracer_keys(ct, case.hub.n_layers)
    ours = our_keys(full_graph)
    feats = lambda ks: {k for k in ks if k[0] == "feature"}  # noqa: E731
    assert feats(ours) == feats(keys)
    assert {k for k in ours if k[0] == "embedding"} == {k for k in keys if k[0] == "embedding"}
    assert {k for k in ours if k[0] == "error"} == {k for k in keys if k[0] == "error" and k[2] >= 1}
    # the same logits, in the same order, with the same probabilities
    assert [k for k in ours if k[0] == "logit"] == [k for k in keys if k[0] == "logit"]
    np.testing.assert_allclose(full_graph.nodes.loc[full_graph.nodes.kind == "logit", "weight"].to_numpy(),
                               ct["logit_probabilities"].double().numpy(), rtol=1e-5)
    # activations of the matched features
    idx, _ = matched(full_graph, ct, case.hub.n_layers)
    is_feat = (full_graph.nodes.kind == "feature").to_numpy()
    ct_act = ct["activation_values"][ct["selected_features"]].double()
    np.testing.assert_allclose(full_graph.nodes.activation.to_numpy()[is_feat],
                               ct_act[idx[torch.tensor(is_feat)]].numpy(), rtol=1e-5, atol=1e-6)


def test_same_adjacency(full_graph, full_run, case):
    ct, _ = full_run
    compare_adjacency(full_graph, ct, case.hub.n_layers)


def test_same_influence_pruning_and_scores(full_graph, full_run, case):
    ct, info = full_run
    idx, keys = matched(full_graph, ct, case.hub.n_layers)
    ours_infl = torch.tensor(full_graph.nodes.influence.to_numpy())
    np.testing.assert_allclose(ours_infl.numpy(), ct["node_influence"].double()[idx].numpy(),
                               rtol=1e-4, atol=1e-7)
    pruned = full_graph.prune()
    kept = set(our_keys(pruned))
    ct_kept = {keys[j] for j in torch.nonzero(ct["node_mask"]).flatten().tolist()}
    assert kept == ct_kept
    # edges kept: circuit-tracer's edge mask between kept nodes
    em = ct["edge_mask"] & ct["node_mask"][:, None] & ct["node_mask"][None, :]
    t, s = torch.nonzero(em, as_tuple=True)
    ct_edges = {(keys[a], keys[b]) for a, b in zip(s.tolist(), t.tolist())}
    pk = our_keys(pruned)
    t, s = torch.nonzero(pruned.adjacency, as_tuple=True)
    our_edges = {(pk[a], pk[b]) for a, b in zip(s.tolist(), t.tolist())}
    assert our_edges == ct_edges
    scores = full_graph.scores()
    assert scores["replacement"] == pytest.approx(info["replacement"], rel=1e-4)
    assert scores["completeness"] == pytest.approx(info["completeness"], rel=1e-4)


@pytest.mark.parametrize("cap", [60, 200])
def test_max_feature_nodes(gpt2_case, tmp_path_factory, cap):
    """A cap no larger than one batch: both rank every feature by its
    influence through the logit rows alone and keep the top ``cap``, so the
    graphs are the same. (With several batches circuit-tracer re-ranks every
    ``update_interval`` = 4 batches and we every batch.)"""
    model, transcoders, tokens = gpt2_case.model, gpt2_case.transcoders, gpt2_case.tokens
    ct, _ = run_circuit_tracer(gpt2_case.hub, tokens, tmp_path_factory.mktemp(f"ct_cap{cap}"),
                               "--max-feature-nodes", str(cap))
    graph = attribute(model, transcoders, tokens, max_feature_nodes=cap)
    assert int((graph.nodes.kind == "feature").sum()) == cap
    compare_adjacency(graph, ct, gpt2_case.hub.n_layers)


def test_logit_difference_target(gpt2_case, tmp_path_factory):
    """A custom target (circuit-tracer's CustomTarget with W_U[:, a] - W_U[:, b])
    against our logit_diff_target: the same edges."""
    from tc_explore.circuits import logit_diff_target, prompt_context
    model, transcoders, tokens = gpt2_case.model, gpt2_case.transcoders, gpt2_case.tokens
    a, b = model.to_single_token(" cat"), model.to_single_token(" dog")
    ct, _ = run_circuit_tracer(gpt2_case.hub, tokens, tmp_path_factory.mktemp("ct_diff"), "--logit-diff", f"{a},{b}")
    ctx = prompt_context(model, transcoders, tokens, prepend_bos=False)
    graph = attribute(model, transcoders, ctx, targets=[logit_diff_target(ctx, a, b)])
    # circuit-tracer indexes a custom target by a virtual id, as we do: match it by position
    ct = dict(ct, logit_token_ids=torch.tensor(graph.nodes.loc[graph.nodes.kind == "logit", "index"].to_numpy()))
    compare_adjacency(graph, ct, gpt2_case.hub.n_layers)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
