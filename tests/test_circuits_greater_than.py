"""Circuits on the trained tiny-years demo model: conservation, brute force,
the greater-than trace through the start-year token, and the feature-count curve."""
import pytest
import torch

from tc_explore.circuits import decompose, feature_target
from tc_explore.circuits.frozen import remove_feature_write_hook, run_frozen
from tc_explore.tasks.greater_than import feature_count_curve, trace_greater_than, year_profile
from tc_explore.tasks import greater_than as gt

TOL = 1e-4


@pytest.fixture(scope="module")
def prompts():
    return gt.make_prompts(40, seed=0)


@pytest.fixture(scope="module")
def traced(demo_model, demo_transcoders, prompts):
    return trace_greater_than(demo_model, demo_transcoders, prompts[0])


def test_demo_conservation_on_every_target_kind(demo_model, demo_transcoders, traced, prompts):
    ctx, res, _ = traced
    years = gt.year_token_ids(demo_model)
    with torch.no_grad():
        logits = demo_model(ctx.tokens[None])[0, -1]
    yy = prompts[0].start_year
    expected = float(logits[years[yy + 1:]].mean() - logits[years[:yy + 1]].mean())
    assert res.target.value == pytest.approx(expected, abs=1e-5)
    assert decompose(ctx, res.target).total == pytest.approx(res.target.value, abs=TOL)
    for layer in demo_transcoders.layers:
        for tok in (-1, 4):
            f = int(ctx.feature_acts(layer)[tok].argmax())
            t = feature_target(ctx, layer, f, tok)
            assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)
    for p in res.paths:
        if p.head.next_target is not None:
            assert decompose(ctx, p.head.next_target).total == pytest.approx(p.attribution, abs=TOL)


def test_demo_feature_contribution_equals_brute_force(demo_transcoders, traced):
    ctx, _, _ = traced
    L = 2
    f = int(ctx.feature_acts(L)[-1].argmax())
    t = feature_target(ctx, L, f)
    name = f"blocks.{L}.ln2.hook_normalized"
    _, base = run_frozen(ctx, names={name}, values=True, mlps=True)
    base_val = float(demo_transcoders[L].pre_activation(base[name][0, -1])[f])
    feats = [c for c in decompose(ctx, t).contributions(k=30) if c.node.kind == "feature"][:3]
    assert feats
    for c in feats:
        hook = remove_feature_write_hook(ctx, c.node.layer, c.node.index, c.node.token)
        _, cache = run_frozen(ctx, [hook], {name}, values=True, mlps=True)
        new = float(demo_transcoders[L].pre_activation(cache[name][0, -1])[f])
        assert base_val - new == pytest.approx(c.value, abs=1e-4)


def test_greater_than_trace_goes_through_a_head_reading_the_start_year(traced, prompts):
    ctx, res, year_pos = traced
    yy = f"{prompts[0].start_year:02d}"
    assert ctx.token_strs[year_pos] == yy and res.target.label == f"years > {yy} − years ≤ {yy}"
    through_year = [p for p in res.paths
                    if any(c.node.kind == "head" and c.node.source == year_pos for c in p.contributions)]
    assert through_year, res.to_pandas().path.tolist()
    assert any(abs(p.attribution) > 0.01 for p in through_year)


def test_feature_count_curve_rises_to_the_full_transcoder(demo_model, demo_transcoders, prompts):
    d_sae = demo_transcoders.d_sae(0)
    curve = feature_count_curve(demo_model, demo_transcoders, prompts, 0, ks=(1, 8, d_sae),
                                neurons=True)
    full = float(curve[curve.kind == "full transcoder"].prob_diff.iloc[0])
    tc = curve[curve.kind == "transcoder"].set_index("k").prob_diff
    assert tc[d_sae] == pytest.approx(full, abs=1e-6)
    assert tc[1] < full - 0.1                    # few features fall well short of the full transcoder
    neurons = curve[curve.kind == "neurons"].set_index("k").prob_diff
    original = float(curve[curve.kind == "original"].prob_diff.iloc[0])
    assert neurons.iloc[-1] == pytest.approx(original, abs=1e-6)   # all neurons kept: the model itself


def test_year_profile_matches_weights(demo_model, demo_transcoders):
    df = year_profile(demo_model, demo_transcoders, [(2, 5), (0, 7)])
    assert len(df) == 200 and list(df.year[:3]) == [0, 1, 2]
    years = gt.year_token_ids(demo_model)
    lens = demo_transcoders[2].W_dec[5] @ demo_model.W_U.detach()[:, years]
    de = demo_model.W_E.detach()[years] @ demo_transcoders[0].W_enc[:, 7]
    assert df[df.layer == 2].logit_lens.tolist() == pytest.approx(lens.tolist(), rel=1e-5)
    assert df[df.layer == 0].de_embedding.tolist() == pytest.approx(de.tolist(), rel=1e-5)
    with pytest.raises(Exception, match="out of range"):
        year_profile(demo_model, demo_transcoders, [(2, 10_000)])


def test_feature_count_curve_features_beat_neurons_where_they_are_ranked(demo_model, demo_transcoders,
                                                                         prompts):
    """The paper's point on the demo: at the prediction position, a handful of
    features does what the MLP does there, where neurons need many more. Applied
    at every position (the paper code's literal masking), the curve drops the
    start-year token's features, which have no variance at the last token."""
    ks = (8, 64)
    ranked = feature_count_curve(demo_model, demo_transcoders, prompts, 0, ks=ks)
    full = float(ranked[ranked.kind == "full transcoder"].prob_diff.iloc[0])
    tc = ranked[ranked.kind == "transcoder"].set_index("k").prob_diff
    neurons = ranked[ranked.kind == "neurons"].set_index("k").prob_diff
    assert tc[8] == pytest.approx(full, abs=0.02)
    assert tc[8] > neurons[8] + 0.05
    everywhere = feature_count_curve(demo_model, demo_transcoders, prompts, 0, ks=ks, positions="all")
    tc_all = everywhere[everywhere.kind == "transcoder"].set_index("k").prob_diff
    full_all = float(everywhere[everywhere.kind == "full transcoder"].prob_diff.iloc[0])
    assert tc_all[64] < full_all - 0.1
    with pytest.raises(Exception, match="positions must be"):
        feature_count_curve(demo_model, demo_transcoders, prompts, 0, ks=ks, positions="last")
