"""Input-invariant views: each checked against the weights computed another way."""
import pytest
import torch

from tc_explore import InvalidInputError
from tc_explore.circuits import (de_embeddings, feature_connection_matrix, feature_connections,
                                 logit_effects, ov_de_embeddings, ov_norms)


def test_feature_connections_upstream_and_downstream(tiny_transcoders):
    layer, f, k = 5, 3, 7
    up = feature_connections(tiny_transcoders, layer, f, "upstream", k=k)
    assert list(up.columns) == ["layer", "feature", "score"] and len(up) == k
    every = torch.cat([tiny_transcoders[l].W_dec @ tiny_transcoders[layer].W_enc[:, f]
                       for l in range(layer)])
    assert up.score.tolist() == pytest.approx(torch.sort(every, descending=True).values[:k].tolist(), rel=1e-5)
    assert (up.layer < layer).all()
    for row in up.itertuples():
        w = float(tiny_transcoders[row.layer].W_dec[row.feature] @ tiny_transcoders[layer].W_enc[:, f])
        assert row.score == pytest.approx(w, rel=1e-5)
    down = feature_connections(tiny_transcoders, layer, f, "downstream", k=k)
    assert (down.layer > layer).all() and down.score.is_monotonic_decreasing
    for row in down.itertuples():
        w = float(tiny_transcoders[layer].W_dec[f] @ tiny_transcoders[row.layer].W_enc[:, row.feature])
        assert row.score == pytest.approx(w, rel=1e-5)
    assert feature_connections(tiny_transcoders, 0, f, "upstream").empty
    with pytest.raises(InvalidInputError, match="direction"):
        feature_connections(tiny_transcoders, layer, f, "sideways")
    with pytest.raises(InvalidInputError):
        feature_connections(tiny_transcoders, layer, 64)


def test_connection_matrix_chunks_and_subsets(tiny_transcoders):
    full = tiny_transcoders[2].W_dec @ tiny_transcoders[6].W_enc
    m = feature_connection_matrix(tiny_transcoders, 2, 6, chunk_size=5)
    assert torch.allclose(m, full, atol=1e-6)
    sub = feature_connection_matrix(tiny_transcoders, 2, 6, up_features=[4, 1], down_features=[0, 9, 3])
    assert torch.allclose(sub, full[[4, 1]][:, [0, 9, 3]], atol=1e-6)
    with pytest.raises(InvalidInputError, match="before"):
        feature_connection_matrix(tiny_transcoders, 6, 2)


def test_logit_effects_and_de_embeddings(tiny_model, tiny_transcoders):
    layer, f = 4, 10
    boosted, suppressed = logit_effects(tiny_model, tiny_transcoders, layer, f, k=5)
    scores = tiny_transcoders[layer].W_dec[f] @ tiny_model.W_U.detach()
    assert list(boosted.columns) == ["token_id", "token", "score"]
    assert boosted.token_id.tolist() == torch.argsort(scores, descending=True)[:5].tolist()
    assert suppressed.token_id.tolist() == torch.argsort(scores)[:5].tolist()
    assert boosted.token[0] == tiny_model.tokenizer.decode([boosted.token_id[0]])
    de = de_embeddings(tiny_model, tiny_transcoders, layer, f, k=4)
    direct = tiny_model.W_E.detach() @ tiny_transcoders[layer].W_enc[:, f]
    assert de.score.tolist() == pytest.approx(torch.sort(direct, descending=True).values[:4].tolist(), rel=1e-5)


def test_ov_views_use_the_models_ov_circuit(tiny_model, tiny_transcoders):
    layer, f = 3, 7
    w = tiny_transcoders[layer].W_enc[:, f]
    norms = ov_norms(tiny_model, tiny_transcoders, layer, f)
    n_heads = tiny_model.cfg.n_heads
    assert list(norms.columns) == ["layer", "head", "norm"] and len(norms) == (layer + 1) * n_heads
    OV = tiny_model.OV  # FactoredMatrix [n_layers, n_heads, d_model, d_model]
    for row in norms.itertuples():
        assert row.norm == pytest.approx(float((OV[row.layer, row.head].AB @ w).norm().detach()), rel=1e-4)
    ov = ov_de_embeddings(tiny_model, tiny_transcoders, layer, f, k=4, n_heads=2)
    assert list(ov.columns) == ["layer", "head", "token_id", "token", "score"] and len(ov) == 8
    best = norms.sort_values("norm", ascending=False).iloc[0]
    first = ov.iloc[0]
    assert (first["layer"], first["head"]) == (best["layer"], best["head"])
    scores = tiny_model.W_E.detach() @ (OV[int(best["layer"]), int(best["head"])].AB @ w)
    assert first["score"] == pytest.approx(float(scores.max()), rel=1e-4)
    assert int(first["token_id"]) == int(scores.argmax())
