"""Per-prompt feature activations equal encoding the cached MLP inputs directly."""
import numpy as np
import torch

from tc_explore.prompt_features import feature_activations, top_features_per_token

LAYERS = [2, 5, 8]
PROMPT = "The war lasted from 1735 to 17"


def test_prompt_feature_activations_equal_direct_encoding(tiny_model, tiny_transcoders):
    tokens = tiny_model.to_tokens(PROMPT)
    hooks = [tiny_transcoders.input_hook(layer) for layer in LAYERS]
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hooks)
    acts = {layer: tiny_transcoders[layer].encode(cache[h][0]).detach() for layer, h in zip(LAYERS, hooks)}
    df = feature_activations(tiny_model, tiny_transcoders, PROMPT, 5, 9)
    assert df["token_id"].tolist() == tokens[0].tolist()
    np.testing.assert_allclose(df["activation"], acts[5][:, 9].numpy(), rtol=1e-5, atol=1e-6)

    top = top_features_per_token(tiny_model, tiny_transcoders, PROMPT, k=3, layers=LAYERS)
    stacked = torch.cat([acts[layer] for layer in LAYERS], dim=-1)
    for pos in range(tokens.shape[1]):
        vals, idx = torch.topk(stacked[pos], 3)
        want = [(LAYERS[int(i) // 64], int(i) % 64) for v, i in zip(vals, idx) if v > 0]
        got = top[top["position"] == pos]
        assert list(zip(got["layer"], got["feature"])) == want
        assert got["rank"].tolist() == list(range(len(want)))
