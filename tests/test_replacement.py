"""Replacing and ablating MLPs through hooks changes exactly what it should."""
import pytest
import torch

from tc_explore import (ablate_mlps, evaluate_transcoders, mean_mlp_outputs, replace_mlps,
                        run_with_ablated_mlps, run_with_transcoders)
from tc_explore.errors import IncompatibleTranscoderError, InvalidInputError
from tc_explore.model import to_tokens
from tc_explore.testing import mlp_io as _mlp_io, random_transcoder
from tc_explore.transcoder import TranscoderSet

PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return to_tokens(tiny_model, PROMPT)


def test_processed_model_matches_hf_and_is_centred(tiny_model, tokens, offline_hub):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained("gpt2").eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    ours = tiny_model(tokens)
    assert torch.allclose(ours.log_softmax(-1), ref.log_softmax(-1), atol=1e-4)
    x, _ = _mlp_io(tiny_model, tokens, 3)
    assert x.mean(-1).abs().max() < 1e-5  # LayerNorm folded: hook_normalized is centred


def test_replacement_reproduces_transcoder_output(tiny_model, tiny_transcoders, tokens):
    tc = tiny_transcoders[4]
    x_clean, _ = _mlp_io(tiny_model, tokens, 4)
    with replace_mlps(tiny_model, tiny_transcoders, layers=[4]):
        x, y = _mlp_io(tiny_model, tokens, 4)
    assert torch.allclose(x, x_clean)  # upstream of the replaced layer nothing changed
    assert torch.allclose(y, tc(x)[0], atol=1e-6)
    # Hooks are gone after the context.
    _, y_after = _mlp_io(tiny_model, tokens, 4)
    assert not torch.allclose(y_after, y)


def test_all_layers_replaced_each_sees_replaced_inputs(tiny_model, tiny_transcoders, tokens):
    captured = {}
    hooks = [(f"blocks.{l}.hook_mlp_out", (lambda y, hook, l=l: captured.__setitem__(l, y)))
             for l in (0, 5)]
    from tc_explore.replacement import transcoder_hooks
    x_hooks = [(f"blocks.{l}.ln2.hook_normalized", (lambda x, hook, l=l: captured.__setitem__(("x", l), x)))
               for l in (0, 5)]
    tiny_model.run_with_hooks(tokens, fwd_hooks=x_hooks + transcoder_hooks(tiny_model, tiny_transcoders) + hooks)
    for l in (0, 5):
        assert torch.allclose(captured[l], tiny_transcoders[l](captured[("x", l)])[0], atol=1e-6)


def test_keep_and_ablate_features(tiny_model, tiny_transcoders, tokens):
    tc = tiny_transcoders[2]
    keep = [1, 7, 30]
    with replace_mlps(tiny_model, tiny_transcoders, layers=2, keep_features={2: keep}):
        x, y = _mlp_io(tiny_model, tokens, 2)
    acts = tc.encode(x)
    mask = torch.zeros(tc.d_sae)
    mask[keep] = 1
    assert torch.allclose(y, (acts * mask) @ tc.W_dec + tc.b_dec_out, atol=1e-6)
    with replace_mlps(tiny_model, tiny_transcoders, layers=2, ablate_features={2: keep}):
        x, y = _mlp_io(tiny_model, tokens, 2)
    assert torch.allclose(y, (tc.encode(x) * (1 - mask)) @ tc.W_dec + tc.b_dec_out, atol=1e-6)


def test_keep_error_leaves_model_unchanged(tiny_model, tiny_transcoders, tokens):
    clean = tiny_model(tokens)
    patched = run_with_transcoders(tiny_model, tokens, tiny_transcoders, keep_error=True)
    assert torch.allclose(clean, patched, atol=1e-4)
    assert not torch.allclose(clean, run_with_transcoders(tiny_model, tokens, tiny_transcoders), atol=1e-3)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_changes_exactly_the_intended_layer(tiny_model, tokens, mode):
    layer = 6
    names = [f"blocks.{l}.hook_mlp_out" for l in range(12)] + \
            [f"blocks.{l}.hook_resid_pre" for l in range(12)]
    _, clean = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in names)
    means = mean_mlp_outputs(tiny_model, tokens, [layer]) if mode == "mean" else None
    with ablate_mlps(tiny_model, [layer], mode=mode, means=means):
        _, abl = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in names)
    expected = torch.zeros_like(clean[f"blocks.{layer}.hook_mlp_out"]) if mode == "zero" else \
        means[layer].expand_as(clean[f"blocks.{layer}.hook_mlp_out"])
    assert torch.allclose(abl[f"blocks.{layer}.hook_mlp_out"], expected, atol=1e-6)
    for l in range(layer + 1):  # upstream untouched
        assert torch.equal(abl[f"blocks.{l}.hook_resid_pre"], clean[f"blocks.{l}.hook_resid_pre"])
    for l in range(layer):
        assert torch.equal(abl[f"blocks.{l}.hook_mlp_out"], clean[f"blocks.{l}.hook_mlp_out"])
    assert not torch.allclose(abl[f"blocks.{layer + 1}.hook_resid_pre"], clean[f"blocks.{layer + 1}.hook_resid_pre"])
    logits = run_with_ablated_mlps(tiny_model, tokens, [layer], mode=mode, means=means)
    assert not torch.allclose(logits, tiny_model(tokens))


def test_mean_ablation_needs_means(tiny_model, tokens):
    with pytest.raises(InvalidInputError, match="mean_mlp_outputs"):
        run_with_ablated_mlps(tiny_model, tokens, [1], mode="mean")


def test_wrong_sized_transcoder_is_refused(tiny_model):
    ts = TranscoderSet.from_transcoders([random_transcoder(16, 8, layer=0)], name="other-model")
    with pytest.raises(IncompatibleTranscoderError, match="d_model is 32"):
        run_with_transcoders(tiny_model, "The cat", ts)


def test_bad_layer_and_feature(tiny_model, tiny_transcoders):
    with pytest.raises(InvalidInputError, match="Layer 12 has no transcoder"):
        tiny_transcoders[12]
    with pytest.raises(InvalidInputError, match="feature 64 is out of range.*64 features"):
        run_with_transcoders(tiny_model, "The cat", tiny_transcoders, layers=[0], keep_features={0: [64]})
    with pytest.raises(InvalidInputError, match="out of range: the model has 12 layers"):
        run_with_ablated_mlps(tiny_model, "The cat", [12])
    with pytest.raises(InvalidInputError, match="out of range"):
        tiny_transcoders.check_feature(0, -1)


def test_prompt_longer_than_context(tiny_model):
    long_prompt = " ".join(["cat"] * 40)
    with pytest.raises(InvalidInputError, match="41 tokens long but the model's context is 32"):
        to_tokens(tiny_model, long_prompt)
    with pytest.raises(InvalidInputError, match="context"):
        evaluate_transcoders(tiny_model, None or __import__("tc_explore").load_transcoders("gpt2-small", layers=[0]),
                             [long_prompt])
