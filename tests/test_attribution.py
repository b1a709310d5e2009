"""Attribution graphs: conservation for every target kind, every edge kind
against brute-force frozen forward passes (remove one source, rerun, measure),
agreement with ``decompose``, the capped (influence-ordered) graph, and the
JSON file against the schema kept in the repo. A 3-layer tiny GPT-2 with a
plain, a skip and a JumpReLU transcoder."""
import json

import pytest
import torch

from tc_explore import InvalidInputError, TranscoderSet, load_model
from tc_explore.circuits import (AttributionGraph, attribute, decompose, feature_target,
                                 logit_diff_target, next_target, prompt_context)
from tc_explore.circuits.contributions import Node
from tc_explore.circuits.frozen import frozen_hooks
from tc_explore.circuits.graph_json import schema_path
from tc_explore.model import hook_ln2_normalized, hook_mlp_out
from tc_explore.testing import build_tiny_gpt2, random_transcoder

PROMPT = "The war lasted from to and the"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_tiny_gpt2(tmp_path_factory.mktemp("attr_model"), n_layers=3, d_model=32, n_heads=4)
    return load_model(str(d), device="cpu")


def _set(layers=(0, 1, 2)):
    kinds = {0: {}, 1: {"skip": True}, 2: {"jumprelu": True}}
    return TranscoderSet.from_transcoders([random_transcoder(32, 64, l, seed=3, **kinds[l]) for l in layers],
                                          name="tiny-attr")


@pytest.fixture(scope="module")
def tcs():
    return _set()


@pytest.fixture(scope="module")
def ctx(model, tcs):
    return prompt_context(model, tcs, PROMPT)


@pytest.fixture(scope="module")
def graph(model, tcs, ctx):
    return attribute(model, tcs, ctx, dtype=torch.float64)


# -- brute force ------------------------------------------------------------------------------
def _frozen_reading(ctx, row, remove=(), keep_bos=False, remove_all=False):
    """Run the linearised model (frozen scales and patterns; MLP outputs fixed
    except the skip term) with sources removed; return what ``row`` reads.

    ``remove``: ("feature", layer, pos, f) | ("error", layer, pos) | ("embedding", pos);
    ``remove_all``: every source (embeddings, all features and errors, and with
    ``keep_bos=False`` the BOS position's too), leaving the constant C."""
    model, tcs = ctx.model, ctx.transcoders
    first = 0 if keep_bos else 1
    hooks = list(frozen_hooks(ctx))
    mlp_in = {}

    def embed_hook(x, hook):
        x = x.clone()
        for r in remove:
            if r[0] == "embedding":
                x[0, r[1]] = 0
        if remove_all:
            x[:] = 0
        return x
    hooks.append(("hook_embed", embed_hook))
    for l in range(ctx.n_layers):
        def grab(x, hook, l=l):
            mlp_in[l] = x[0].detach().double()
            return x
        hooks.append((hook_ln2_normalized(l), grab))

        def mlp_hook(out, hook, l=l):
            out = out.clone()
            if l not in tcs:
                return out                                     # frozen below by the caller's values
            tc = tcs[l]
            new = ctx.mlp_out[l].clone()
            if tc.W_skip is not None:                          # the skip term follows its input
                new += (mlp_in[l] - ctx.mlp_in[l].double()) @ tc.W_skip.double()
            acts = ctx.feature_acts(l).double()
            err = new - acts @ tc.W_dec.double() - tc.b_dec_out.double() - (
                ctx.mlp_in[l].double() @ tc.W_skip.double() if tc.W_skip is not None else 0)
            for r in remove:
                if r[0] == "feature" and r[1] == l:
                    new[r[2]] -= acts[r[2], r[3]] * tc.W_dec[r[3]].double()
                if r[0] == "error" and r[1] == l:
                    new[r[2]] -= ctx.transcoder_error(l)[r[2]]
            if remove_all:
                skip = mlp_in[l] @ tc.W_skip.double() if tc.W_skip is not None else 0
                new = tc.b_dec_out.double() + skip + torch.zeros_like(new)
                if not keep_bos:
                    new[0] += acts[0] @ tc.W_dec.double() + ctx.transcoder_error(l)[0]
            del err
            return new[None].to(out.dtype)
        hooks.append((hook_mlp_out(l), mlp_hook))
    names = {hook_ln2_normalized(l) for l in range(ctx.n_layers)}
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(ctx.tokens[None], names_filter=lambda n: n in names)
    kind, layer, pos, index = row
    if kind == "logit":
        lg = logits[0, -1].double()
        return float(lg[index] - lg.mean())
    if kind == "feature":
        tc = tcs[layer]
        x = cache[hook_ln2_normalized(layer)][0, pos].double()
        return float((x - tc.b_dec.double()) @ tc.W_enc[:, index].double())
    raise AssertionError(kind)


def _first(mask) -> int:
    return int(mask.to_numpy().nonzero()[0][0])


def _row(graph, i):
    r = graph.nodes.iloc[i]
    return (r.kind, int(r.layer), int(r.pos), int(r["index"]))


def _src(graph, j):
    r = graph.nodes.iloc[j]
    if r.kind == "feature":
        return ("feature", int(r.layer), int(r.pos), int(r["index"]))
    if r.kind == "error":
        return ("error", int(r.layer), int(r.pos))
    return ("embedding", int(r.pos))


def test_nodes_and_targets(graph, ctx, tcs):
    n = graph.nodes
    assert list(n.kind.unique()) == ["feature", "error", "embedding", "logit"]
    feats = n[n.kind == "feature"]
    # every active feature at positions >= 1, and nothing else
    expected = sum(int((ctx.feature_acts(l)[1:] != 0).sum()) for l in tcs.layers)
    assert len(feats) == expected and (feats.pos >= 1).all()
    for r in feats.sample(10, random_state=0).itertuples():
        assert r.activation == pytest.approx(float(ctx.feature_acts(r.layer)[r.pos, r.index]))
    assert len(n[n.kind == "error"]) == 3 * (ctx.n_pos - 1)
    emb = n[n.kind == "embedding"]
    assert emb["index"].tolist() == ctx.tokens.tolist() and emb.pos.tolist() == list(range(ctx.n_pos))
    logits = n[n.kind == "logit"]
    assert 1 <= len(logits) <= 10
    w = logits.weight.to_numpy()
    assert (w[:-1] >= w[1:]).all() and (w.sum() >= 0.95 or len(logits) == 10)
    assert graph.adjacency.shape == (len(n), len(n))
    assert n.node_id.is_unique


def test_conservation_every_row(graph):
    c = graph.constants
    assert len(c) == int((graph.nodes.kind.isin(["feature", "logit"])).sum())
    scale = c[["edge_sum", "constant"]].abs().max(axis=1).clip(lower=1.0)
    assert ((c.value - c.edge_sum - c.constant).abs() / scale).max() < 1e-5
    # edge sums in the table are the adjacency's row sums
    i = graph.node_index(c.node_id.iloc[-1])
    assert float(graph.adjacency[i].sum()) == pytest.approx(c.edge_sum.iloc[-1], abs=1e-9)


def test_values_are_the_model_quantities(graph, ctx, model, tcs):
    with torch.no_grad():
        logits = model(ctx.tokens[None])[0, -1].double()
    c = graph.constants.set_index("node_id")
    for r in graph.nodes[graph.nodes.kind == "logit"].itertuples():
        assert c.loc[r.node_id, "value"] == pytest.approx(float(logits[r.index] - logits.mean()), abs=1e-4)
        assert r.weight == pytest.approx(float(torch.softmax(logits, -1)[r.index]), abs=1e-5)
    for r in graph.nodes[graph.nodes.kind == "feature"].iloc[::37].itertuples():
        pre = float(tcs[r.layer].pre_activation(ctx.mlp_in[r.layer, r.pos])[r.index])
        assert c.loc[r.node_id, "value"] == pytest.approx(pre - float(tcs[r.layer].b_enc[r.index]), abs=1e-4)


def test_constant_is_the_frozen_pass_with_every_source_removed(graph, ctx):
    c = graph.constants.set_index("node_id")
    rows = [i for i, k in enumerate(graph.nodes.kind) if k == "logit"][:2]
    rows += [i for i, r in enumerate(graph.nodes.itertuples()) if r.kind == "feature" and r.layer == 2][:2]
    rows += [i for i, r in enumerate(graph.nodes.itertuples()) if r.kind == "feature" and r.layer == 1][:2]
    for i in rows:
        row = _row(graph, i)
        expected = _frozen_reading(ctx, row, remove_all=True)
        assert c.loc[graph.nodes.node_id[i], "constant"] == pytest.approx(expected, abs=2e-4)


def test_every_edge_kind_against_brute_force(graph, ctx):
    A = graph.adjacency
    n = graph.nodes
    targets = [i for i, k in enumerate(n.kind) if k == "logit"][:1]
    targets += [_first((n.kind == "feature") & (n.layer == 2)), _first((n.kind == "feature") & (n.layer == 1))]
    checked = set()
    for t in targets:
        row = _row(graph, t)
        base = _frozen_reading(ctx, row)
        for kind in ("feature", "error", "embedding"):
            cand = [j for j in range(len(n)) if n.kind[j] == kind and float(A[t, j].abs()) > 1e-3]
            cand.sort(key=lambda j: -float(A[t, j].abs()))
            for j in cand[:3]:
                removed = _frozen_reading(ctx, row, remove=[_src(graph, j)])
                assert float(A[t, j]) == pytest.approx(base - removed, abs=2e-4, rel=1e-3), (row, _src(graph, j))
                checked.add((n.kind[t], kind))
    # feature/error/embedding into logit and into feature rows all seen
    assert {("logit", k) for k in ("feature", "error", "embedding")} <= checked
    assert {("feature", k) for k in ("feature", "error", "embedding")} <= checked


def test_zero_edges_where_nothing_flows(graph):
    n, A = graph.nodes, graph.adjacency
    f2 = (n.kind == "feature") & (n.layer == 2)
    f0 = (n.kind == "feature") & (n.layer == 0)
    # a feature reads nothing from its own or later layers, and nothing from later positions
    i = _first(f0)
    assert float(A[i][torch.tensor(f2.to_numpy())].abs().sum()) == 0.0
    later = torch.tensor(((n.pos > n.pos[i]) & n.kind.isin(["feature", "error", "embedding"])).to_numpy())
    assert float(A[i][later].abs().sum()) == 0.0
    assert float(A[:, torch.tensor((n.kind == "logit").to_numpy())].abs().sum()) == 0.0


def _expand(ctx, target, acc, depth=0):
    """Sum of decompose's contributions of every source over every path of
    heads and skip terms (the edges of an attribution graph)."""
    d = decompose(ctx, target)
    t = target.token
    for l, f in d.features.items():
        for g in torch.nonzero(f).flatten().tolist():
            acc[("feature", l, t, g)] = acc.get(("feature", l, t, g), 0.0) + float(f[g])
    for l, e in d.error.items():
        acc[("error", l, t)] = acc.get(("error", l, t), 0.0) + e
    acc[("embedding", t)] = acc.get(("embedding", t), 0.0) + d.embed
    for l, s in d.skip.items():
        _expand(ctx, next_target(ctx, target, Node("skip", layer=l, token=t)), acc, depth + 1)
    L, H, P = d.heads.shape
    for l in range(L):
        for h in range(H):
            for s in range(P):
                if float(ctx.pattern[l, h, t, s]) != 0.0:
                    node = Node("head", layer=l, index=h, token=t, source=s)
                    _expand(ctx, next_target(ctx, target, node), acc, depth + 1)


def test_agrees_with_decompose_over_all_paths(model, tcs):
    ctx = prompt_context(model, tcs, "The war lasted")
    g = attribute(model, tcs, ctx, dtype=torch.float64, targets=[feature_target(ctx, 1, 0, -1)])
    # the custom feature target reads pre-activation (b_enc included in its offset)
    acc = {}
    target = next(iter([feature_target(ctx, 1, 0, -1)]))
    _expand(ctx, target, acc)
    row = len(g) - 1
    # decompose runs in the model's float32: a ~15-unit path sum is exact to ~1e-6 relative,
    # and the last float32 bit differs between CPUs and thread counts (seen on a 16-core machine)
    n = g.nodes
    for j in range(len(n) - 1):
        key = _src(g, j)
        assert float(g.adjacency[row, j]) == pytest.approx(acc.get(key, 0.0), rel=1e-6, abs=1e-6), key


def test_custom_targets_logit_difference_and_feature(model, tcs, ctx, graph):
    t1 = logit_diff_target(ctx, "40", "20")
    fi = _first((graph.nodes.kind == "feature") & (graph.nodes.layer == 2))
    r = graph.nodes.iloc[fi]
    t2 = feature_target(ctx, 2, int(r["index"]), int(r.pos))
    g = attribute(model, tcs, ctx, targets=[t1, (t2, 0.5)], dtype=torch.float64)
    c = g.constants.set_index("node_id")
    logits = g.nodes[g.nodes.kind == "logit"]
    assert len(logits) == 2 and logits.weight.tolist() == [1.0, 0.5]
    assert (logits["index"] >= g.metadata["d_vocab"]).all()          # virtual ids, as circuit-tracer writes
    assert c.loc[logits.node_id.iloc[0], "value"] == pytest.approx(t1.value, abs=1e-6)
    assert c.loc[logits.node_id.iloc[1], "value"] == pytest.approx(t2.value, abs=1e-6)
    for nid in logits.node_id:
        row = c.loc[nid]
        assert row.value == pytest.approx(row.edge_sum + row.constant, abs=1e-4)
    # the feature target's row equals that feature's row in the full graph
    j = len(g) - 1
    gi = graph.node_index(r.node_id)
    ids = graph.nodes.node_id.tolist()
    common = [k for k, nid in enumerate(g.nodes.node_id[:-2]) if nid in set(ids)]
    for k in common[::7]:
        assert float(g.adjacency[j, k]) == pytest.approx(
            float(graph.adjacency[gi, graph.node_index(g.nodes.node_id[k])]), abs=1e-9)
    # a logit target as a token id or string gives the same row as the automatic one
    top = graph.nodes[graph.nodes.kind == "logit"].iloc[0]
    g2 = attribute(model, tcs, ctx, targets=[int(top["index"])], dtype=torch.float64)
    assert torch.allclose(g2.adjacency[-1, :-1], graph.adjacency[graph.node_index(top.node_id)][
        :len(g2) - 1], atol=1e-9)


def test_keep_bos_and_layers_without_transcoder(model, ctx):
    tcs = _set((0, 2))
    g = attribute(model, tcs, PROMPT, dtype=torch.float64, keep_bos=True)
    n = g.nodes
    assert (n[n.kind == "feature"].pos == 0).any() and set(n[n.kind == "error"].layer) == {0, 2}
    c = g.constants
    assert (c.bos_mlp == 0).all() and (c.mlp != 0).any()
    scale = c[["edge_sum", "constant"]].abs().max(axis=1).clip(lower=1.0)
    assert ((c.value - c.edge_sum - c.constant).abs() / scale).max() < 1e-5


def test_float32_matches_float64(model, tcs, ctx, graph):
    g32 = attribute(model, tcs, ctx)
    assert g32.adjacency.dtype == torch.float32
    assert torch.allclose(g32.adjacency.double(), graph.adjacency, atol=1e-4, rtol=1e-4)


def test_max_feature_nodes_orders_by_influence(model, tcs, ctx, graph):
    k = 24
    g = attribute(model, tcs, ctx, max_feature_nodes=k, batch_size=8, dtype=torch.float64)
    n = g.nodes
    assert (n.kind == "feature").sum() == k
    # kept features are among the most influential of the full graph
    full_infl = graph.nodes.set_index("node_id").influence
    kept = full_infl[n[n.kind == "feature"].node_id]
    top = full_infl[graph.nodes.kind.to_numpy() == "feature"].sort_values(ascending=False)
    assert kept.min() >= top.iloc[4 * k]
    assert top.index[0] in set(kept.index)
    # rows of kept nodes equal the full graph's, restricted to kept columns
    idx = [graph.node_index(i) for i in n.node_id]
    sub = graph.adjacency[idx][:, idx]
    assert torch.allclose(g.adjacency, sub, atol=1e-9)
    # conservation still holds: the features left out go into the constant
    c = g.constants
    assert (c.left_out != 0).any()
    assert ((c.value - c.edge_sum - c.constant).abs()).max() < 1e-4 * max(1.0, c.edge_sum.abs().max())


def test_bad_arguments(model, tcs, ctx):
    for kw in (dict(batch_size=0), dict(max_feature_nodes=-1), dict(max_n_logits=0),
               dict(desired_logit_prob=1.5), dict(targets=[]), dict(targets=[10 ** 9]),
               dict(targets=[1.5])):
        with pytest.raises(InvalidInputError):
            attribute(model, tcs, ctx, **kw)
    with pytest.raises(InvalidInputError, match="max_feature_nodes"):
        attribute(model, tcs, ctx, max_matrix_bytes=1000)


# -- JSON ------------------------------------------------------------------------------------
def test_json_matches_schema_and_round_trips(graph, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schema_path().read_text())
    pruned = graph.prune()
    path = tmp_path / "g.json"
    pruned.to_json(path)
    data = json.loads(path.read_text())
    jsonschema.validate(data, schema)
    ids = [nd["node_id"] for nd in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert len({(nd["layer"], nd["feature"], nd["ctx_idx"]) for nd in data["nodes"]}) == len(ids)
    for nd in data["nodes"]:
        assert nd["layer"] != ""
        if nd["feature_type"] == "embedding":
            assert nd["feature"] == nd["ctx_idx"]
        if nd["feature_type"] == "logit":
            assert nd["clerp"].startswith('Output "') and "(p=" in nd["clerp"]
        assert 0.0 <= nd["influence"] <= 1.0 + 1e-9
    back = AttributionGraph.from_json(path)
    assert back.nodes.node_id.tolist() == pruned.nodes.node_id.tolist()
    assert back.nodes["index"].tolist() == pruned.nodes["index"].tolist()
    assert torch.allclose(back.adjacency, pruned.adjacency.float(), atol=1e-6)
    assert back.nodes.cumulative.to_numpy() == pytest.approx(pruned.nodes.cumulative.to_numpy())
    assert len(back.constants) == int(pruned.nodes.kind.isin(["feature", "logit"]).sum())


def test_to_json_refuses_a_graph_too_large_to_open(graph, tmp_path):
    """Over ``max_links`` edges (default MAX_JSON_LINKS) nothing is written and
    the error says to prune or pass max_links=None; None writes it anyway."""
    from tc_explore.circuits.graph_json import MAX_JSON_LINKS
    assert MAX_JSON_LINKS == 1_000_000 and graph.n_edges < MAX_JSON_LINKS
    path = tmp_path / "full.json"
    limit = graph.n_edges - 1
    with pytest.raises(InvalidInputError, match=r"prune.*max_links=None") as err:
        graph.to_json(path, max_links=limit)
    assert f"{graph.n_edges:,} edges" in str(err.value) and f"max_links={limit:,}" in str(err.value)
    assert not path.exists()
    with pytest.raises(InvalidInputError, match="max_links"):
        graph.to_dict(max_links=limit)
    with pytest.raises(InvalidInputError, match="max_links must be"):
        graph.to_json(max_links=-1)
    graph.to_json(path, max_links=graph.n_edges)
    assert len(json.loads(path.read_text())["links"]) == graph.n_edges
    assert len(json.loads(graph.to_json(max_links=None))["links"]) == graph.n_edges


def test_scores_and_networkx(graph):
    s = graph.scores()
    assert 0.0 < s["replacement"] < 1.0 and 0.0 < s["completeness"] <= 1.0
    g = graph.prune().to_networkx()
    assert g.number_of_nodes() == len(graph.prune())


def test_from_json_reads_circuit_tracer_files():
    from test_graph import CT_FILE
    g = AttributionGraph.from_json(json.dumps(CT_FILE))
    n = g.nodes.set_index("node_id")
    assert (n.loc["E_50_1", "kind"], n.loc["E_50_1", "index"], n.loc["E_50_1", "pos"]) == ("embedding", 50, 1)
    assert (n.loc["0_7_2", "layer"], n.loc["0_7_2", "index"], n.loc["0_7_2", "activation"]) == (0, 7, 1.5)
    assert (n.loc["0_1_2", "kind"], n.loc["0_1_2", "layer"]) == ("error", 1)
    assert (n.loc["3_9_2", "kind"], n.loc["3_9_2", "index"], n.loc["3_9_2", "weight"]) == ("logit", 9, 0.7)
    assert n.loc["0_7_2", "cumulative"] == 0.3 and g.n_layers == 2
    assert float(g.adjacency[g.node_index("0_7_2"), g.node_index("E_50_1")]) == 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_equals_cpu_graph(model, tcs, ctx, graph):
    """The full and the capped graph computed on CUDA equal the CPU ones."""
    g = attribute(model, tcs, ctx, device="cuda", dtype=torch.float64)
    assert g.nodes[["kind", "layer", "pos", "index"]].equals(graph.nodes[["kind", "layer", "pos", "index"]])
    assert torch.allclose(g.adjacency.cpu(), graph.adjacency, atol=1e-9, rtol=1e-9)
    cpu_cap = attribute(model, tcs, ctx, max_feature_nodes=8, dtype=torch.float64)
    cuda_cap = attribute(model, tcs, ctx, max_feature_nodes=8, device="cuda", dtype=torch.float64)
    assert cuda_cap.nodes[["kind", "layer", "pos", "index"]].equals(cpu_cap.nodes[["kind", "layer", "pos", "index"]])
    assert torch.allclose(cuda_cap.adjacency.cpu(), cpu_cap.adjacency, atol=1e-9, rtol=1e-9)
