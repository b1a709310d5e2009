"""Stored weight views equal the per-feature functions of circuits.invariant."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

from tc_explore.circuits import invariant
from tc_explore.corpus import Corpus
from tc_explore.dashboard import add_weight_views, feature_dashboard
from tc_explore.errors import IncompatibleTranscoderError, InvalidInputError
from tc_explore.index import FeatureIndex
from tc_explore.testing import fixture_texts
from tc_explore.transcoder import TranscoderSet
from tc_explore.weight_views import WeightViews, top_along_rows

K, N_HEADS = 6, 3


def test_top_along_rows_is_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 30, generator=g)
    rows[3] = 0.0                                    # all tied
    rows[4, :] = torch.randint(0, 3, (30,), generator=g).float()   # many ties at every place
    rows[5, 10:20] = rows[5].max()                   # ties at the top
    for largest in (True, False):
        for k in (1, 5, 29, 30, 50):
            idx, val = top_along_rows(rows, k, largest)
            for r in range(rows.shape[0]):
                ref_idx, ref_val = invariant._top(rows[r], k, largest)
                assert idx[r].tolist() == ref_idx
                assert val[r].double().tolist() == ref_val
            t_idx, _ = top_along_rows(rows.T, k, largest)     # down columns, a strided view
            for c in range(rows.shape[1]):
                assert t_idx[c].tolist() == invariant._top(rows[:, c], k, largest)[0]


def _same_ranking(stored: pd.DataFrame, ref: pd.DataFrame, keys: list[str]):
    """Equal keys in the same order, scores equal to float32 rounding; keys may
    swap only where their scores are equal to that precision (a near-tie
    decided by summation order)."""
    assert len(stored) == len(ref)
    np.testing.assert_allclose(stored["score"].to_numpy(float), ref["score"].to_numpy(float),
                               rtol=1e-5, atol=1e-6)
    ref_key = [tuple(r) for r in ref[keys].to_numpy().tolist()]
    for i, key in enumerate(tuple(r) for r in stored[keys].to_numpy().tolist()):
        if key != ref_key[i]:
            j = ref_key.index(key)
            assert abs(ref["score"].iloc[j] - stored["score"].iloc[i]) < 1e-5


@pytest.fixture(scope="module")
def views(tiny_model, tiny_transcoders, tmp_path_factory):
    # chunk_size 24 does not divide d_sae 64: several chunks per layer, one ragged.
    return WeightViews.build(tiny_model, tiny_transcoders, tmp_path_factory.mktemp("wv") / "views",
                             k=K, n_heads=N_HEADS, chunk_size=24, features_per_group=16)


def test_every_feature_matches_the_per_feature_functions(views, tiny_model, tiny_transcoders):
    for layer in (0, 1, 6, 11):
        for feature in range(tiny_transcoders.d_sae(layer)):
            for direction in ("upstream", "downstream"):
                _same_ranking(views.connections(layer, feature, direction, K),
                              invariant.feature_connections(tiny_transcoders, layer, feature, direction, k=K),
                              ["layer", "feature"])
            for got, ref in zip(views.logit_effects(tiny_model, layer, feature, K),
                                invariant.logit_effects(tiny_model, tiny_transcoders, layer, feature, k=K)):
                _same_ranking(got, ref, ["token_id", "token"])
            _same_ranking(views.de_embeddings(tiny_model, layer, feature, K),
                          invariant.de_embeddings(tiny_model, tiny_transcoders, layer, feature, k=K),
                          ["token_id", "token"])
            _same_ranking(views.ov_de_embeddings(tiny_model, layer, feature, K, N_HEADS),
                          invariant.ov_de_embeddings(tiny_model, tiny_transcoders, layer, feature,
                                                     k=K, n_heads=N_HEADS),
                          ["layer", "head", "token_id"])
            got, ref = views.ov_norms(layer, feature), invariant.ov_norms(tiny_model, tiny_transcoders,
                                                                         layer, feature)
            assert got[["layer", "head"]].values.tolist() == ref[["layer", "head"]].values.tolist()
            np.testing.assert_allclose(got["norm"], ref["norm"], rtol=1e-5, atol=1e-6)
    assert views.connections(0, 0, "upstream").empty            # nothing before layer 0
    assert views.connections(11, 0, "downstream").empty


def _with_dead_features(tiny_transcoders, dead: dict[int, list[int]]) -> TranscoderSet:
    tcs = {}
    for layer in tiny_transcoders.layers:
        tc = copy.deepcopy(tiny_transcoders[layer])
        with torch.no_grad():
            for f in dead.get(layer, []):
                tc.W_dec[f] = 0.0
                tc.W_enc[:, f] = 0.0
        tcs[layer] = tc
    return TranscoderSet.from_transcoders(tcs, name=tiny_transcoders.name)


def test_dead_features_tie_exactly_like_the_per_feature_functions(tiny_model, tiny_transcoders, tmp_path):
    # Zero rows make every score of a feature 0: the top lists are pure ties,
    # decided by lower index, and upstream lists elsewhere gain exact zeros.
    tcs = _with_dead_features(tiny_transcoders, {2: [5, 7], 3: list(range(60))})
    views = WeightViews.build(tiny_model, tcs, tmp_path / "v", k=K, n_heads=N_HEADS, chunk_size=20)
    for layer, feature in ((2, 5), (2, 7), (3, 0), (3, 59)):
        for direction in ("upstream", "downstream"):
            got = views.connections(layer, feature, direction)
            ref = invariant.feature_connections(tcs, layer, feature, direction, k=K)
            pd.testing.assert_frame_equal(got, ref)
        for got, ref in zip(views.logit_effects(tiny_model, layer, feature),
                            invariant.logit_effects(tiny_model, tcs, layer, feature, k=K)):
            pd.testing.assert_frame_equal(got, ref)
        pd.testing.assert_frame_equal(views.de_embeddings(tiny_model, layer, feature),
                                      invariant.de_embeddings(tiny_model, tcs, layer, feature, k=K))
    # layer 4's upstream candidates from layer 3 are mostly exact zeros
    _same_ranking(views.connections(4, 1, "upstream"),
                  invariant.feature_connections(tcs, 4, 1, "upstream", k=K), ["layer", "feature"])


@pytest.fixture(scope="module")
def index(tiny_model, tiny_transcoders, tmp_path_factory):
    corpus = Corpus.from_texts(fixture_texts(60, seed=2), tiny_model, 16, seed=0)
    return FeatureIndex.build(tiny_model, tiny_transcoders, corpus, 16 * 8,
                              tmp_path_factory.mktemp("wvi") / "idx", layers=[3, 7], k=4,
                              n_samples=6, batch_size=4, window=(3, 1))


def test_dashboard_reads_stored_views(index, tiny_model, tiny_transcoders):
    live = feature_dashboard(index, 7, 9, model=tiny_model, transcoders=tiny_transcoders, k=5)
    add_weight_views(index, tiny_model, tiny_transcoders, k=8)
    for kwargs in ({"model": tiny_model, "transcoders": tiny_transcoders}, {"model": tiny_model}):
        stored = feature_dashboard(FeatureIndex.load(index.directory), 7, 9, k=5, **kwargs)
        for name in ("upstream", "downstream"):
            _same_ranking(getattr(stored, name), getattr(live, name), ["layer", "feature"])
        for name in ("logits_boosted", "logits_suppressed", "de_embeddings"):
            _same_ranking(getattr(stored, name), getattr(live, name), ["token_id"])
        _same_ranking(stored.ov_de_embeddings, live.ov_de_embeddings, ["layer", "head", "token_id"])
        np.testing.assert_allclose(stored.ov_norms["norm"], live.ov_norms["norm"], rtol=1e-5)
        assert len(stored.upstream) == 5 and len(stored.de_embeddings) == 5
    # more than was stored: computed on the fly, same as without views
    wide = feature_dashboard(index, 7, 9, model=tiny_model, transcoders=tiny_transcoders, k=12)
    assert len(wide.de_embeddings) == 12


def test_views_refuse_other_weights_and_bad_input(index, tiny_model, tiny_transcoders, tmp_path):
    add_weight_views(index, tiny_model, tiny_transcoders, overwrite=True)
    other = _with_dead_features(tiny_transcoders, {7: [0]})
    with pytest.raises(IncompatibleTranscoderError, match="rebuild"):
        feature_dashboard(FeatureIndex.load(index.directory), 7, 9, model=tiny_model, transcoders=other)
    with pytest.raises(InvalidInputError, match="overwrite=True"):
        add_weight_views(index, tiny_model, tiny_transcoders)
    with pytest.raises(InvalidInputError, match="k must be a positive integer"):
        WeightViews.build(tiny_model, tiny_transcoders, tmp_path / "x", k=0)
    views = WeightViews.of_index(index)
    with pytest.raises(InvalidInputError, match="out of range"):
        views.connections(7, 64)
    with pytest.raises(InvalidInputError, match="no weight views"):
        WeightViews.load(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_built_on_cuda_equal_views_built_on_cpu(views, tiny_model, tiny_transcoders, tmp_path):
    on_gpu = WeightViews.build(tiny_model, tiny_transcoders, tmp_path / "cuda", k=K, n_heads=N_HEADS,
                               chunk_size=24, features_per_group=16, device="cuda")
    for layer in (0, 5, 11):
        for feature in range(0, tiny_transcoders.d_sae(layer), 7):
            for direction in ("upstream", "downstream"):
                _same_ranking(on_gpu.connections(layer, feature, direction),
                              views.connections(layer, feature, direction), ["layer", "feature"])
            for got, ref in zip(on_gpu.logit_effects(tiny_model, layer, feature),
                                views.logit_effects(tiny_model, layer, feature)):
                _same_ranking(got, ref, ["token_id"])
            _same_ranking(on_gpu.ov_de_embeddings(tiny_model, layer, feature),
                          views.ov_de_embeddings(tiny_model, layer, feature), ["layer", "head", "token_id"])
