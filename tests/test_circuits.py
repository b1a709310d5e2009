"""The exact decomposition: conservation on every target kind, the factorised
contributions, brute-force checks with frozen LayerNorm scales and patterns,
and the per-prompt encoding cache. Tiny random-weight GPT-2 (12 layers)."""
import pytest
import torch

from tc_explore import InvalidInputError, TranscoderSet
from tc_explore.circuits import (Node, decompose, feature_target, find_paths, logit_diff_target,
                                 logit_direction_target, next_target, prompt_context, residual_target)
from tc_explore.circuits.frozen import remove_feature_write_hook, remove_head_value_hook, run_frozen
from tc_explore.testing import random_transcoder

PROMPT = "The war lasted from 1735 to 17"
TOL = 1e-4


@pytest.fixture(scope="module")
def ctx(tiny_model, tiny_transcoders):
    return prompt_context(tiny_model, tiny_transcoders, PROMPT)


def _active(ctx, layer, token):
    acts = ctx.feature_acts(layer)[token]
    return torch.nonzero(acts > 0).flatten().tolist()


@pytest.mark.parametrize("layer,token", [(0, -1), (3, 4), (7, -1), (11, 2), (11, -1)])
def test_feature_target_conservation(ctx, tiny_transcoders, layer, token):
    feats = _active(ctx, layer, token)
    for f in feats[:2] + [0]:
        t = feature_target(ctx, layer, f, token)
        # The target's value is the transcoder's own pre-activation on the cached input.
        expected = float(tiny_transcoders[layer].pre_activation(ctx.mlp_in[layer, token])[f])
        assert t.value == pytest.approx(expected, abs=1e-5)
        assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)


def test_logit_diff_conservation_matches_model(ctx, tiny_model):
    with torch.no_grad():
        logits = tiny_model(ctx.tokens[None])[0]
    for a, b, tok in [("40", "20", -1), (" war", "17", 3), ("99", "00", 0)]:
        t = logit_diff_target(ctx, a, b, tok)
        ia, ib = (tiny_model.to_tokens(s, prepend_bos=False)[0, 0] for s in (a, b))
        assert t.value == pytest.approx(float(logits[tok, ia] - logits[tok, ib]), abs=1e-5)
        assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)


def test_logit_direction_of_many_tokens(ctx, tiny_model):
    with torch.no_grad():
        logits = tiny_model(ctx.tokens[None])[0, -1]
    pos = [f"{y:02d}" for y in range(36, 100)]
    neg = [f"{y:02d}" for y in range(0, 36)]
    t = logit_direction_target(ctx, pos, neg)
    ids = lambda ss: [tiny_model.to_tokens(s, prepend_bos=False)[0, 0] for s in ss]  # noqa: E731
    expected = float(logits[ids(pos)].mean() - logits[ids(neg)].mean())
    assert t.value == pytest.approx(expected, abs=1e-5)
    assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post", "ln1", "ln2", "ln_final"])
def test_residual_direction_conservation(ctx, tiny_model, site):
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(tiny_model.cfg.d_model, generator=g)
    layer, tok = 5, 6
    names = {"resid_pre": "blocks.5.hook_resid_pre", "resid_mid": "blocks.5.hook_resid_mid",
             "resid_post": "blocks.5.hook_resid_post", "ln1": "blocks.5.ln1.hook_normalized",
             "ln2": "blocks.5.ln2.hook_normalized", "ln_final": "ln_final.hook_normalized"}
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ctx.tokens[None])
    expected = float(cache[names[site]][0, tok] @ vec)
    t = residual_target(ctx, vec, layer, site, tok)
    assert t.value == pytest.approx(expected, abs=1e-4)
    assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)


def test_contributions_are_factorised_and_materialised_in_order(ctx, tiny_transcoders):
    t = logit_diff_target(ctx, "40", "20")
    d = decompose(ctx, t)
    allc = d.contributions(targets=False)
    assert sum(c.value for c in allc) == pytest.approx(t.value, abs=TOL)
    top = d.contributions(k=12)
    assert [c.node for c in top] == [c.node for c in allc[:12]]
    assert all(abs(a.value) >= abs(b.value) for a, b in zip(allc, allc[1:]))
    feats = [c for c in allc if c.node.kind == "feature"][:5]
    heads = [c for c in allc if c.node.kind == "head"][:5]
    assert feats and heads
    for c in feats:
        tc = tiny_transcoders[c.node.layer]
        assert c.activation == pytest.approx(float(ctx.feature_acts(c.node.layer)[-1, c.node.index]))
        assert c.connection == pytest.approx(float(tc.W_dec[c.node.index].double() @ t.direction), rel=1e-5)
        assert c.value == pytest.approx(c.activation * c.connection, rel=1e-5)
    for c in heads:
        assert c.activation == pytest.approx(float(ctx.pattern[c.node.layer, c.node.index, -1, c.node.source]))
        assert c.value == pytest.approx(c.activation * c.connection, rel=1e-5)
    kinds = {c.node.kind for c in allc}
    assert {"embed", "pos_embed", "attn_bias", "dec_bias", "error", "feature", "head"} <= kinds


def test_next_targets_conserve_recursively(ctx):
    t = logit_diff_target(ctx, "40", "20")
    d = decompose(ctx, t)
    top = d.contributions(k=60)
    heads = [c for c in d.contributions(targets=False) if c.node.kind == "head"][:5]
    traced = [c for c in top if c.next_target is not None] + \
        [d.contribution_of(c.node) for c in heads]
    assert {"feature", "head"} <= {c.node.kind for c in traced}
    for c in traced:
        nt = c.next_target
        # The next target's value is the contribution, both from the cache and summed upstream.
        assert nt.value == pytest.approx(c.value, abs=1e-6 + 1e-6 * abs(c.value))
        assert nt.value_from_resid(ctx) == pytest.approx(c.value, abs=TOL)
        assert decompose(ctx, nt).total == pytest.approx(c.value, abs=TOL)
    leaves = [c for c in top if c.node.kind in ("embed", "error", "attn_bias", "dec_bias")]
    assert leaves and all(next_target(ctx, t, c.node) is None for c in leaves)


def test_feature_contribution_equals_removing_its_write(ctx, tiny_transcoders):
    """Brute force: with LN scales, patterns, values and other MLP outputs frozen,
    removing one feature's decoder write changes the target by its contribution."""
    L, tok = 9, -1
    f = int(ctx.feature_acts(L)[tok].argmax())
    name = f"blocks.{L}.ln2.hook_normalized"
    t = feature_target(ctx, L, f, tok)
    _, base = run_frozen(ctx, names={name}, values=True, mlps=True)
    base_val = float(tiny_transcoders[L].pre_activation(base[name][0, tok])[f])
    assert base_val == pytest.approx(t.value, abs=1e-5)
    feats = [c for c in decompose(ctx, t).contributions(k=40) if c.node.kind == "feature"][:4]
    assert len(feats) == 4
    for c in feats:
        hook = remove_feature_write_hook(ctx, c.node.layer, c.node.index, c.node.token)
        _, cache = run_frozen(ctx, [hook], {name}, values=True, mlps=True)
        new = float(tiny_transcoders[L].pre_activation(cache[name][0, tok])[f])
        assert base_val - new == pytest.approx(c.value, abs=1e-4)


def test_logit_contributions_match_brute_force(ctx, tiny_model):
    t = logit_diff_target(ctx, "40", "20")
    ia, ib = (int(tiny_model.to_tokens(s, prepend_bos=False)[0, 0]) for s in ("40", "20"))
    logits, _ = run_frozen(ctx, values=True, mlps=True)
    base = float(logits[0, -1, ia] - logits[0, -1, ib])
    cs = decompose(ctx, t).contributions(targets=False)
    checked = 0
    for c in [c for c in cs if c.node.kind == "feature"][:3] + [c for c in cs if c.node.kind == "head"][:3]:
        n = c.node
        hook = remove_feature_write_hook(ctx, n.layer, n.index, n.token) if n.kind == "feature" \
            else remove_head_value_hook(ctx, n.layer, n.index, n.source)
        new, _ = run_frozen(ctx, [hook], values=True, mlps=True)
        assert base - float(new[0, -1, ia] - new[0, -1, ib]) == pytest.approx(c.value, abs=1e-4)
        checked += 1
    assert checked == 6


def test_partial_jumprelu_and_skip_transcoders(tiny_model):
    d = tiny_model.cfg.d_model
    tcs = TranscoderSet.from_transcoders(
        {1: random_transcoder(d, 48, 1, seed=3, jumprelu=True),
         4: random_transcoder(d, 48, 4, seed=3, skip=True),
         6: random_transcoder(d, 48, 6, seed=3, centred=False)}, name="mixed")
    ctx = prompt_context(tiny_model, tcs, PROMPT)
    for t in [feature_target(ctx, 6, 5, -1), logit_diff_target(ctx, "40", "20"),
              feature_target(ctx, 4, 7, 3)]:
        d_ = decompose(ctx, t)
        assert d_.total == pytest.approx(t.value, abs=TOL)
        kinds = {c.node.kind for c in d_.contributions(targets=False)}
        assert "mlp" in kinds                     # layers without a transcoder: whole MLP outputs
    d_ = decompose(ctx, logit_diff_target(ctx, "40", "20"))
    skip = d_.contribution_of(Node("skip", layer=4, token=ctx.n_pos - 1))
    assert skip.next_target is not None
    assert decompose(ctx, skip.next_target).total == pytest.approx(skip.value, abs=TOL)


def test_encodings_are_computed_once_per_prompt(tiny_model, tiny_transcoders):
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    n_layers = len(tiny_transcoders.layers)
    assert ctx.n_encodings == n_layers
    find_paths(ctx, logit_diff_target(ctx, "40", "20"), iterations=3, branches=5)
    assert ctx.n_encodings == n_layers
    uncached = prompt_context(tiny_model, tiny_transcoders, PROMPT, cache_encodings=False)
    r1 = find_paths(uncached, logit_diff_target(uncached, "40", "20"), iterations=3, branches=5)
    r2 = find_paths(ctx, logit_diff_target(ctx, "40", "20"), iterations=3, branches=5)
    assert uncached.n_encodings > n_layers
    assert [p.key() for p in r1.paths] == [p.key() for p in r2.paths]


def test_bad_indices_raise_clear_errors(ctx):
    with pytest.raises(InvalidInputError, match="out of range"):
        feature_target(ctx, 3, 10_000)
    with pytest.raises(InvalidInputError, match="out of range"):
        feature_target(ctx, 12, 0)
    with pytest.raises(InvalidInputError, match="token position"):
        feature_target(ctx, 3, 0, token=9)
    with pytest.raises(InvalidInputError, match="not one"):
        logit_diff_target(ctx, " not-a-single-token-word", "20")
    with pytest.raises(InvalidInputError, match="site"):
        residual_target(ctx, torch.zeros(32), 1, "hook_nowhere")
    with pytest.raises(InvalidInputError, match="d_model"):
        residual_target(ctx, torch.zeros(7), 1)
    t = feature_target(ctx, 3, 0)
    with pytest.raises(InvalidInputError, match="not upstream"):
        decompose(ctx, t).contribution_of(Node("feature", layer=5, index=0, token=0))
