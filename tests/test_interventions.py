"""Interventions on transcoder features: exact in both modes, steered
generation, ablation curves, and clear errors for settings that cannot apply."""
import math

import pandas as pd
import pytest
import torch

from tc_explore.circuits import decompose, feature_target, logit_direction_target, prompt_context
from tc_explore.errors import InvalidInputError
from tc_explore.ablation import ablation_curve, ablation_curve_figure, ranking_from
from tc_explore.interventions import (Intervention, generate, intervene, intervention_hooks,
                                      logit_difference_metric)
from tc_explore.replacement import transcoder_hooks
from tc_explore.tasks import greater_than as gt
from tc_explore.tasks.greater_than import probability_difference_metric
from tc_explore.transcoder import TranscoderSet

PROMPT = "The war lasted from the year 1735 to the year 17"


@pytest.fixture(scope="module")
def ctx(demo_model, demo_transcoders):
    return prompt_context(demo_model, demo_transcoders, PROMPT)


@pytest.fixture(scope="module")
def target(ctx, demo_model):
    years = gt.year_token_ids(demo_model).tolist()
    return logit_direction_target(ctx, years[36:], years[:36])


def _top_features(ctx, target, n=6):
    df = decompose(ctx, target).to_pandas()
    df = df[df.kind == "feature"].head(n)
    return [(int(r.layer), int(r["index"]), int(r.token), float(r.value)) for _, r in df.iterrows()]


def _active(ctx, layer, token, n=3):
    acts = ctx.feature_acts(layer)[token]
    return torch.nonzero(acts > 0).flatten()[:n].tolist()


# -- nothing changes when nothing should --------------------------------------------------------
@pytest.mark.parametrize("constrained", [False, True])
def test_setting_a_feature_to_its_own_activation_changes_nothing(demo_model, demo_transcoders, ctx, constrained):
    ivs = []
    for layer in demo_transcoders.layers:
        for token in (3, ctx.n_pos - 1):
            for f in _active(ctx, layer, token, 2):
                ivs.append(Intervention(layer, token, f, float(ctx.feature_acts(layer)[token, f])))
    inactive = int(torch.nonzero(ctx.feature_acts(1)[5] == 0).flatten()[0])
    ivs.append(Intervention(1, 5, inactive, 0.0))
    ivs.append(Intervention(2, None, 7, 1.0, "scale"))
    ivs.append(Intervention(0, None, 9, 0.0, "add"))
    res = intervene(demo_model, demo_transcoders, ctx, ivs, constrained=constrained)
    assert len(res.interventions) == len(ivs) > 8
    assert (res.logits - res.clean_logits).abs().max() < 1e-6
    clean = demo_model(ctx.tokens[None])[0]
    assert (res.clean_logits - clean.float()).abs().max() < 1e-6


# -- constrained mode: exactly the linear world of the decomposition / graph --------------------
def test_constrained_zero_ablation_changes_targets_by_minus_the_contribution(demo_model, demo_transcoders,
                                                                            ctx, target):
    feats = _top_features(ctx, target)
    assert len(feats) >= 4
    downstream = feature_target(ctx, 2, _active(ctx, 2, ctx.n_pos - 1, 1)[0], -1)
    for tgt in (target, downstream):
        dec = decompose(ctx, tgt)
        for layer, f, token, _ in feats:
            if layer not in dec.features:
                continue
            res = intervene(demo_model, demo_transcoders, ctx, [Intervention.ablate(layer, f, token)],
                            constrained=True, freeze_values=True, metric=tgt)
            assert res.metric_before == pytest.approx(tgt.value, abs=1e-5)
            assert res.metric_change == pytest.approx(-float(dec.features[layer][f]), abs=1e-5)
    # A feature at another token reaches the target only through attention: zero change when values are frozen.
    layer, f = 0, _active(ctx, 0, 4, 1)[0]
    res = intervene(demo_model, demo_transcoders, ctx, [Intervention.ablate(layer, f, 4)], constrained=True,
                    freeze_values=True, metric=target)
    assert abs(res.metric_change) < 1e-6


def test_constrained_mode_is_linear_in_the_interventions(demo_model, demo_transcoders, ctx, target):
    # Patterns, scales and every other feature frozen: effects add up, and scaling by s moves (s - 1)× as far
    # as ablating, also through attention (values not frozen) from earlier tokens.
    picks = [(0, _active(ctx, 0, 4, 1)[0], 4), (1, _active(ctx, 1, 8, 1)[0], 8),
             (2, _active(ctx, 2, ctx.n_pos - 1, 1)[0], ctx.n_pos - 1)]
    singles = []
    for layer, f, token in picks:
        res = intervene(demo_model, demo_transcoders, ctx, [Intervention.ablate(layer, f, token)],
                        constrained=True, metric=target)
        singles.append(res.metric_change)
        tripled = intervene(demo_model, demo_transcoders, ctx, [Intervention.scale(layer, f, 3.0, token)],
                            constrained=True, metric=target)
        assert tripled.metric_change == pytest.approx(-2 * res.metric_change, abs=1e-5)
    assert any(abs(s) > 1e-3 for s in singles[:2])  # earlier tokens do reach the target through attention
    together = intervene(demo_model, demo_transcoders, ctx,
                         [Intervention.ablate(l, f, t) for l, f, t in picks], constrained=True, metric=target)
    assert together.metric_change == pytest.approx(sum(singles), abs=1e-5)


# -- unconstrained mode: the model itself, with the change added ---------------------------------
def test_unconstrained_equals_a_hand_written_hook_pass(demo_model, demo_transcoders, ctx):
    f0 = _active(ctx, 0, 5, 1)[0]
    f2 = _active(ctx, 2, ctx.n_pos - 1, 1)[0]
    ivs = [Intervention(0, [5, 6], f0, 0.0), Intervention(1, None, 11, 4.0, "set"),
           Intervention(2, -1, f2, -2.0, "scale")]
    res = intervene(demo_model, demo_transcoders, PROMPT, ivs, metric=logit_difference_metric(demo_model, "36", "34"))

    def hand_hooks(layer, edit):
        tc, seen = demo_transcoders[layer], {}

        def read(x, hook):
            seen["x"] = x
            return x

        def write(out, hook):
            x = seen["x"]
            acts = tc.encode(x)                       # this input's activations: downstream features react
            error = out - tc.decode(acts, x)          # the error term kept
            new = acts.clone()
            edit(new)
            return tc.decode(new, x) + error
        return [(f"blocks.{layer}.ln2.hook_normalized", read), (f"blocks.{layer}.hook_mlp_out", write)]

    def e0(a): a[:, [5, 6], f0] = 0.0
    def e1(a): a[:, :, 11] = 4.0
    def e2(a): a[:, -1, f2] = -2.0 * a[:, -1, f2]
    hooks = hand_hooks(0, e0) + hand_hooks(1, e1) + hand_hooks(2, e2)
    with torch.no_grad():
        ref = demo_model.run_with_hooks(ctx.tokens[None], fwd_hooks=hooks)[0]
    assert (res.logits - ref.float()).abs().max() < 1e-4
    assert (res.logits - res.clean_logits).abs().max() > 1e-2
    top = res.top_tokens(5)
    assert list(top.columns[:3]) == ["rank", "token", "token_id"] and len(top) == 5
    assert top.prob.tolist() == pytest.approx(torch.softmax(ref[-1].double(), -1).topk(5).values.tolist(), abs=1e-5)
    years = gt.year_token_ids(demo_model)
    assert res.metric_after == pytest.approx(float(ref[-1, years[36]] - ref[-1, years[34]]), abs=1e-4)


def test_probability_difference_metric_matches_the_task(demo_model, demo_transcoders):
    prompt = gt.make_prompts(n=1, seed=3)[0]
    tp = gt.tokenize_prompts(demo_model, [prompt])
    res = intervene(demo_model, demo_transcoders, tp.tokens[0], [Intervention.ablate(2, 0)],
                    prepend_bos=False, metric=probability_difference_metric(demo_model, prompt.start_year))
    assert res.metric_before == pytest.approx(gt.probability_difference(demo_model, tp), abs=1e-5)
    hooks = intervention_hooks(demo_model, demo_transcoders, [Intervention.ablate(2, 0)])
    assert res.metric_after == pytest.approx(gt.probability_difference(demo_model, tp, hooks), abs=1e-5)


# -- steered generation --------------------------------------------------------------------------
def _greedy(model, tokens, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(tokens)[0, -1].argmax()
            tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0]


def test_generation_without_interventions_is_greedy_generation(demo_model, demo_transcoders):
    prompt = "The siege lasted from the year 1642 to the year"
    out = generate(demo_model, demo_transcoders, prompt, [], max_new_tokens=8, stop_at_eos=False)
    tokens = demo_model.to_tokens(prompt)
    assert out.tokens.tolist() == _greedy(demo_model, tokens, 8).tolist()
    ref = demo_model.generate(tokens, max_new_tokens=8, do_sample=False, use_past_kv_cache=False,
                              stop_at_eos=False, verbose=False)
    assert out.tokens.tolist() == ref[0].tolist()
    assert out.text == demo_model.tokenizer.decode(ref[0].tolist()) and out.new_tokens.shape == (8,)


def test_steered_generation_changes_text_and_is_reproducible(demo_model, demo_transcoders):
    prompt = "The dog"
    plain = generate(demo_model, demo_transcoders, prompt, [], max_new_tokens=6)
    steer = [Intervention(2, None, 1, 12.0, "add")]
    steered = generate(demo_model, demo_transcoders, prompt, steer, max_new_tokens=6)
    assert steered.new_text != plain.new_text
    a = generate(demo_model, demo_transcoders, prompt, steer, 6, temperature=1.0, seed=7)
    b = generate(demo_model, demo_transcoders, prompt, steer, 6, temperature=1.0, seed=7)
    assert a.tokens.tolist() == b.tokens.tolist()
    samples = {tuple(generate(demo_model, demo_transcoders, prompt, [], 6, temperature=2.0, seed=s).tokens.tolist())
               for s in range(4)}
    assert len(samples) > 1            # the seed matters
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        generate(demo_model, demo_transcoders, prompt, [], 0)
    with pytest.raises(InvalidInputError, match="context"):
        generate(demo_model, demo_transcoders, prompt, [], 500)


# -- ablation curves ---------------------------------------------------------------------------------
def test_ablation_curve_and_figure(demo_model, demo_transcoders, ctx, target):
    tp = gt.tokenize_prompts(demo_model, gt.make_prompts(n=8, seed=1))
    score = lambda hooks: gt.probability_difference(demo_model, tp, hooks)  # noqa: E731
    dec = decompose(ctx, target)
    ranking = ranking_from(dec)
    assert ranking[:3] == [(l, f) for l, f, _, _ in _top_features(ctx, target, 3)]
    curve = ablation_curve(demo_model, demo_transcoders, dec, score, ks=[0, 1, 4])
    assert list(curve.columns) == ["kind", "k", "metric"] and curve.k.tolist() == [0, 1, 4]
    assert curve.metric.iloc[0] == pytest.approx(gt.probability_difference(demo_model, tp), abs=1e-6)
    one = intervention_hooks(demo_model, demo_transcoders, [Intervention.ablate(*ranking[0])])
    assert curve.metric.iloc[1] == pytest.approx(score(one), abs=1e-6)
    # keep=True with every feature of the layer kept is the full transcoder replacement
    d = demo_transcoders.d_sae(1)
    kept = ablation_curve(demo_model, demo_transcoders, [(1, f) for f in range(d)], score, ks=[d], keep=True)
    assert kept.metric.iloc[0] == pytest.approx(score(transcoder_hooks(demo_model, demo_transcoders, [1])), abs=1e-6)
    both = pd.concat([curve, kept, pd.DataFrame([dict(kind="original", k=0, metric=score([]))])])
    fig = ablation_curve_figure(both)
    assert [t.name for t in fig.data] == ["top-k features ablated", "top-k features kept"]
    assert fig.layout.shapes and fig.layout.shapes[0].y0 == pytest.approx(score([]))
    with pytest.raises(InvalidInputError, match="empty"):
        ablation_curve(demo_model, demo_transcoders, [], score)


# -- clear errors ----------------------------------------------------------------------------------
def test_bad_settings_give_clear_errors(demo_model, demo_transcoders, ctx):
    run = lambda ivs, **kw: intervene(demo_model, demo_transcoders, ctx, ivs, **kw)  # noqa: E731
    n = ctx.n_pos
    cases = [
        (Intervention(7, 0, 1, 0.0), "out of range: the model has 3 layers"),
        (Intervention(1, 0, 10_000, 0.0), "feature 10000 is out of range"),
        (Intervention(1, n, 1, 0.0), f"position {n} is out of range"),
        (Intervention(1, [0, -n - 1], 1, 0.0), "out of range"),
        (Intervention(1, 0, 1, float("nan")), "finite"),
        (Intervention(1, 0, 1, math.inf, "scale"), "finite"),
        (Intervention(1, 0, 1, 0.0, "double"), "mode must be one of"),
        (Intervention(1, [], 1, 0.0), "positions is empty"),
        (Intervention(1, 0, 1, "x"), "value must be a number"),
    ]
    for iv, msg in cases:
        with pytest.raises(InvalidInputError, match=msg):
            run([iv])
    with pytest.raises(InvalidInputError, match="same position"):
        run([Intervention(1, [2, 3], 1, 0.0), Intervention(1, 3, 1, 5.0)])
    with pytest.raises(InvalidInputError, match="Intervention objects"):
        run([(1, 0, 1, 0.0)])
    with pytest.raises(InvalidInputError, match="constrained=True"):
        run([Intervention(1, 0, 1, 0.0)], freeze_values=True)
    with pytest.raises(InvalidInputError, match="metric must be"):
        run([Intervention(1, 0, 1, 0.0)], metric="logit diff")
    partial = TranscoderSet.from_transcoders({0: demo_transcoders[0], 2: demo_transcoders[2]}, name="partial")
    with pytest.raises(InvalidInputError, match="layer 1: it has no transcoder in set 'partial'"):
        intervene(demo_model, partial, PROMPT, [Intervention(1, 0, 1, 0.0)])
    with pytest.raises(InvalidInputError, match="another model or transcoder set"):
        intervene(demo_model, partial, ctx, [Intervention(0, 0, 1, 0.0)])
    with pytest.raises(InvalidInputError, match="position 40 is out of range"):
        generate(demo_model, demo_transcoders, "The dog", [Intervention(0, 40, 1, 0.0)], 3)


def test_constrained_zero_ablation_changes_targets_by_minus_the_attribution_edge(demo_model, demo_transcoders,
                                                                                ctx, target):
    from tc_explore.circuits.attribution import attribute

    graph = attribute(demo_model, demo_transcoders, ctx, targets=[target], dtype=torch.float64, progress=False)
    nodes = graph.nodes
    feats = nodes[nodes.kind == "feature"]
    # rows: the logit-direction target and one layer-2 feature at the last position (its pre-activation)
    last = feats[(feats.layer == 2) & (feats.pos == ctx.n_pos - 1)].iloc[0]
    rows = [(graph.node_index(nodes[nodes.kind == "logit"].node_id.iloc[0]), target),
            (graph.node_index(last.node_id), feature_target(ctx, 2, int(last["index"]), ctx.n_pos - 1))]
    checked, through_attention = 0, 0
    for row, tgt in rows:
        weights = graph.adjacency[row].double()
        sources = [i for i in torch.argsort(weights.abs(), descending=True).tolist()
                   if nodes.kind.iloc[i] == "feature"][:6]
        for i in sources:
            src = nodes.iloc[i]
            res = intervene(demo_model, demo_transcoders, ctx,
                            [Intervention.ablate(int(src.layer), int(src["index"]), int(src.pos))],
                            constrained=True, metric=tgt)
            assert res.metric_change == pytest.approx(-float(weights[i]), abs=1e-5), src.node_id
            checked += 1
            through_attention += int(src.pos) != tgt.token
    assert checked == 12 and through_attention > 0   # some edges run through attention's OV circuits
