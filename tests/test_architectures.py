"""Gemma 2, Llama 3 and Qwen 3 (and GPT-2's block at the same size): tiny random
models built from transformers' own configs (3 layers, d_model 64, every norm
gain and bias randomised), saved with save_pretrained, served from the offline
Hugging Face cache under their real Hub ids and loaded through load_model; their
registry transcoder sets written in the exact published layouts. On each: the
registry resolves to the right files, conservation for every target kind,
brute-force frozen-forward checks of individual contributions (features and
grouped-query heads), recursion, and the replaced model with errors kept equal
to the original."""
import pytest
import torch

from tc_explore import load_model, load_transcoders, registry
from tc_explore.architecture import architecture
from tc_explore.circuits import (decompose, feature_target, logit_diff_target, logit_direction_target,
                                 next_target, prompt_context, residual_target)
from tc_explore.circuits.frozen import remove_feature_write_hook, remove_head_value_hook, run_frozen
from tc_explore.replacement import run_with_transcoders
from tc_explore.testing import ARCH_FIXTURES, build_architecture_hub

PROMPT = "The war lasted from 1735 to 17 when the cat sat on a mat"
TOL = 1e-4
ARCHS = sorted(ARCH_FIXTURES)


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, offline_hub):
    hub = build_architecture_hub(offline_hub.hf_home, request.param)
    model = load_model(hub.model_repo, device="cpu")
    tcs = load_transcoders(hub.set_name, layers=list(range(hub.n_layers)), device="cpu")
    ctx = prompt_context(model, tcs, PROMPT)
    return hub, model, tcs, ctx


def _unembed(cache):
    return cache["unembed.hook_out"][0]


def test_model_loads_with_its_architecture(setup):
    hub, model, _, _ = setup
    arch = architecture(model)
    assert int(model.cfg.n_layers) == hub.n_layers and int(model.cfg.d_model) == hub.d_model
    assert not arch.centred                                   # RMSNorm
    assert arch.n_kv_heads == 2 and arch.n_heads == 4         # grouped-query attention
    # Gains are the model's own (randomised, unfolded): not all ones.
    assert float((arch.ln2[1].gain - 1).abs().max()) > 0.1
    if hub.arch == "gemma2":
        assert arch.has_post_norms and arch.embed_scale == pytest.approx(8.0)
        assert arch.attn_softcap == 5.0 and arch.logit_softcap == 3.0
    else:
        assert not arch.has_post_norms and arch.embed_scale == pytest.approx(1.0)
    assert arch.qk_norm == (hub.arch == "qwen3")
    assert arch.tied_embeddings == (hub.arch != "llama")
    # Unprocessed: the logits are the Hugging Face model's own.
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hub.model_repo, dtype=torch.float32).eval()
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)


def test_registry_names_resolve_to_the_published_files(setup):
    hub, model, tcs, _ = setup
    entry = registry()[hub.set_name]
    assert tcs.repo_id == entry.repo_id and tcs.model_name == entry.model
    for layer, written in hub.transcoders.items():
        tc = tcs[layer]
        for name in ("W_enc", "W_dec", "b_enc", "b_dec_out"):
            assert torch.equal(getattr(tc, name), getattr(written, name)), (layer, name)
        assert (tc.threshold is None) == (written.threshold is None)
        assert (tc.W_skip is None) == (written.W_skip is None)
    expected_hooks = {"gemma2": ("ln2.hook_normalized", "hook_mlp_out"),
                      "llama": ("hook_resid_mid", "mlp.hook_out"),
                      "qwen3": ("mlp.hook_in", "mlp.hook_out")}[hub.arch]
    assert tcs.input_hook(1) == f"blocks.1.{expected_hooks[0]}"
    assert tcs.output_hook(1) == f"blocks.1.{expected_hooks[1]}"
    if hub.arch == "gemma2":
        assert hub.files[2] == "google/gemma-scope-2b-pt-transcoders:layer_2/width_16k/average_l0_54/params.npz"


def test_features_fire_on_the_published_input(setup):
    hub, model, tcs, ctx = setup
    _, cache = model.run_with_cache(ctx.tokens[None])
    for layer in range(hub.n_layers):
        x = cache[tcs.input_hook(layer)][0]
        acts = tcs[layer].encode(x)
        assert torch.equal(acts, ctx.feature_acts(layer))
        n = (acts[1:] > 0).sum(-1).float()
        assert 3 <= float(n.mean()) <= 0.6 * hub.d_sae          # a meaningful test: some fire


def _active(ctx, layer, token):
    return torch.nonzero(ctx.feature_acts(layer)[token] > 0).flatten().tolist()


def test_conservation_for_every_target_kind(setup):
    hub, model, tcs, ctx = setup
    _, cache = model.run_with_cache(ctx.tokens[None])
    checked = 0
    for layer in range(hub.n_layers):
        for token in (2, -1):
            for f in _active(ctx, layer, token)[:2]:
                t = feature_target(ctx, layer, f, token)
                assert t.value == pytest.approx(float(tcs[layer].pre_activation(ctx.mlp_in[layer, token])[f]),
                                                abs=1e-5)
                assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)
                checked += 1
    assert checked >= 8
    raw = _unembed(cache)                                     # logits before any softcap
    for a, b, tok in [(" war", " cat", -1), (" mat", "17", 4), ("35", " the", 0)]:
        t = logit_diff_target(ctx, a, b, tok)
        ia, ib = (int(model.to_tokens(s, prepend_bos=False)[0, 0]) for s in (a, b))
        assert t.value == pytest.approx(float(raw[tok, ia] - raw[tok, ib]), abs=1e-5)
        assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)
    pos, neg = [" war", " cat", " mat"], [" dog", " tree"]
    t = logit_direction_target(ctx, pos, neg)
    ids = lambda ss: [int(model.to_tokens(s, prepend_bos=False)[0, 0]) for s in ss]  # noqa: E731
    assert t.value == pytest.approx(float(raw[-1, ids(pos)].mean() - raw[-1, ids(neg)].mean()), abs=1e-5)
    assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)
    g = torch.Generator().manual_seed(1)
    names = {"resid_pre": "blocks.1.hook_resid_pre", "resid_mid": "blocks.1.hook_resid_mid",
             "resid_post": "blocks.1.hook_resid_post", "ln1": "blocks.1.ln1.hook_normalized",
             "ln2": "blocks.1.ln2.hook_normalized", "ln_final": "ln_final.hook_normalized"}
    for site, hook in names.items():
        vec = torch.randn(hub.d_model, generator=g)
        t = residual_target(ctx, vec, 1, site, 5)
        assert t.value == pytest.approx(float(cache[hook][0, 5] @ vec), rel=1e-5, abs=1e-4)
        assert decompose(ctx, t).total == pytest.approx(t.value, abs=TOL)


def test_next_targets_conserve_recursively(setup):
    _, _, _, ctx = setup
    t = logit_diff_target(ctx, " war", " cat")
    d = decompose(ctx, t)
    allc = d.contributions(targets=False)
    picked = [c for c in allc if c.node.kind == "feature"][:4] + \
        [c for c in allc if c.node.kind == "head"][:4] + [c for c in allc if c.node.kind == "skip"][:1]
    assert {"feature", "head"} <= {c.node.kind for c in picked}
    for c in picked:
        nt = d.contribution_of(c.node).next_target
        assert nt.value == pytest.approx(c.value, abs=1e-6 + 1e-6 * abs(c.value))
        assert nt.value_from_resid(ctx) == pytest.approx(c.value, abs=TOL)
        assert decompose(ctx, nt).total == pytest.approx(c.value, abs=TOL)
        # and one more step up, through a feature or head of the next target
        up = [u for u in decompose(ctx, nt).contributions(k=5) if u.next_target is not None][:1]
        for u in up:
            assert decompose(ctx, u.next_target).total == pytest.approx(u.value, abs=TOL)
    leaves = [c for c in allc if c.node.kind in ("embed", "error")]
    assert leaves and all(next_target(ctx, t, c.node) is None for c in leaves)


def _run_without(ctx, n, names):
    """The frozen forward (values and MLP outputs frozen too) without one
    feature's write or one head's move from one source; returns its cache."""
    hook = remove_feature_write_hook(ctx, n.layer, n.index, n.token) if n.kind == "feature" \
        else remove_head_value_hook(ctx, n.layer, n.index, n.source)
    return run_frozen(ctx, [hook], names, values=True, mlps=True)[1]


def test_logit_contributions_match_brute_force(setup):
    """With norm scales (post-norms too), patterns, values and MLP outputs frozen,
    removing one feature's write or one head's move from one source changes the
    pre-softcap logit difference by exactly its contribution. Heads share
    key/value heads (grouped-query attention): the removal acts on one query head."""
    _, model, _, ctx = setup
    ia, ib = (int(model.to_tokens(s, prepend_bos=False)[0, 0]) for s in (" war", " cat"))
    names = {"unembed.hook_out"}
    _, base_cache = run_frozen(ctx, names=names, values=True, mlps=True)
    base = float(_unembed(base_cache)[-1, ia] - _unembed(base_cache)[-1, ib])
    t = logit_diff_target(ctx, " war", " cat")
    assert base == pytest.approx(t.value, abs=1e-5)
    cs = decompose(ctx, t).contributions(targets=False)
    picked = [c for c in cs if c.node.kind == "feature"][:3] + [c for c in cs if c.node.kind == "head"][:4]
    assert len(picked) == 7
    for c in picked:
        cache = _run_without(ctx, c.node, names)
        new = float(_unembed(cache)[-1, ia] - _unembed(cache)[-1, ib])
        assert base - new == pytest.approx(c.value, abs=1e-4), c.node


def test_feature_target_contributions_match_brute_force(setup):
    hub, _, tcs, ctx = setup
    L, tok = hub.n_layers - 1, -1
    f = int(ctx.feature_acts(L)[tok].argmax())
    name = tcs.input_hook(L)
    t = feature_target(ctx, L, f, tok)
    _, base = run_frozen(ctx, names={name}, values=True, mlps=True)
    base_val = float(tcs[L].pre_activation(base[name][0, tok])[f])
    assert base_val == pytest.approx(t.value, abs=1e-5)
    cs = decompose(ctx, t).contributions(targets=False)
    picked = [c for c in cs if c.node.kind == "feature"][:3] + [c for c in cs if c.node.kind == "head"][:2]
    assert len(picked) == 5
    for c in picked:
        cache = _run_without(ctx, c.node, {name})
        new = float(tcs[L].pre_activation(cache[name][0, tok])[f])
        assert base_val - new == pytest.approx(c.value, abs=1e-4), c.node


def test_replaced_model_with_errors_equals_the_original(setup):
    _, model, tcs, ctx = setup
    tokens = ctx.tokens[None]
    with torch.no_grad():
        clean = model(tokens)
        kept = run_with_transcoders(model, tokens, tcs, keep_error=True)
        replaced = run_with_transcoders(model, tokens, tcs)
    assert torch.allclose(kept, clean, atol=1e-4)
    assert not torch.allclose(replaced, clean, atol=1e-2)     # the transcoders do change it
