import re

import numpy as np
import pandas as pd
import pytest

from tc_explore.circuits import invariant
from tc_explore.corpus import Corpus
from tc_explore.dashboard import (dashboard_html, export_html, feature_dashboard, histogram_figure,
                                  logit_figure, ov_norms_figure)
from tc_explore.errors import IncompatibleTranscoderError, InvalidInputError
from tc_explore.index import FeatureIndex
from tc_explore.prompt_features import feature_activations, run_prompt, top_features_per_token
from tc_explore.search import search_features
from tc_explore.testing import fixture_texts
from tc_explore.transcoder import TranscoderSet

LAYERS = [2, 5, 8]
PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def index(tiny_model, tiny_transcoders, tmp_path_factory):
    corpus = Corpus.from_texts(fixture_texts(100, seed=1), tiny_model, 16, seed=0)
    return FeatureIndex.build(tiny_model, tiny_transcoders, corpus, 16 * 16,
                              tmp_path_factory.mktemp("dash") / "idx", layers=LAYERS, k=6,
                              n_samples=10, batch_size=8, window=(4, 2))


def _busy_feature(index, layer):
    stats = index.table(layer, "stats")
    return int(stats.sort_values("n_firing", ascending=False)["feature"].iloc[0])


def test_dashboard_data_comes_from_index_and_invariant_views(index, tiny_model, tiny_transcoders):
    f = _busy_feature(index, 5)
    d = feature_dashboard(index, 5, f, tiny_model, tiny_transcoders, k=4)
    stats = index.feature_stats(5, f)
    assert (d.layer, d.feature, d.n_firing) == (5, f, stats["n_firing"])
    assert sum(d.histogram_counts) == d.n_firing > 0
    assert d.max_activation == d.top_examples[0].activation
    tops = index.top_examples(5, f)
    assert [(w.sequence, w.position) for w in d.top_examples] == [(e.sequence, e.position) for e in tops]
    for w in d.top_examples:
        seq = index.sequence_tokens(w.sequence)
        start = w.position - w.focus
        assert w.token_ids == seq[start:start + len(w.token_ids)].tolist()
        assert w.tokens[w.focus] == tiny_model.tokenizer.decode([int(seq[w.position])])
        assert w.activations[w.focus] == w.activation
    band_acts = [[w.activation for w in b.examples] for b in d.interval_bands]
    flat = [a for acts in band_acts for a in acts]
    assert flat == sorted(flat, reverse=True) and len(flat) == min(10, d.n_firing)
    pd.testing.assert_frame_equal(d.upstream, invariant.feature_connections(tiny_transcoders, 5, f, "upstream", k=4))
    pd.testing.assert_frame_equal(d.downstream,
                                  invariant.feature_connections(tiny_transcoders, 5, f, "downstream", k=4))
    boosted, suppressed = invariant.logit_effects(tiny_model, tiny_transcoders, 5, f, k=4)
    pd.testing.assert_frame_equal(d.logits_boosted, boosted)
    pd.testing.assert_frame_equal(d.logits_suppressed, suppressed)
    assert len(d.ov_norms) == 6 * tiny_model.cfg.n_heads
    assert set(d.ov_de_embeddings.columns) == {"layer", "head", "token_id", "token", "score"}
    assert d.published_log_frequency == pytest.approx(float(tiny_transcoders.log_feature_frequency(5)[f]))


def test_index_only_dashboard_has_no_weight_sections(index):
    d = feature_dashboard(index, 2, _busy_feature(index, 2))
    assert d.logits_boosted is None and d.upstream is None
    assert d.top_examples[0].tokens[0].startswith("<")       # ids shown without a tokenizer
    with pytest.raises(InvalidInputError, match="no logit effects"):
        logit_figure(d)


def test_html_has_stable_hooks_and_escapes_tokens(index, tiny_model, tiny_transcoders):
    f = _busy_feature(index, 8)
    d = feature_dashboard(index, 8, f, tiny_model, tiny_transcoders)
    page = dashboard_html(d)
    assert f'class="tcx-dashboard" id="tcx-L8-F{f}" data-layer="8" data-feature="{f}"' in page
    n_examples = len(d.top_examples) + sum(len(b.examples) for b in d.interval_bands)
    assert page.count('<div class="tcx-example"') == n_examples
    assert page.count("tcx-focus") == n_examples
    assert "<|endoftext|>" not in page and "&lt;|endoftext|&gt;" in page
    for r in d.upstream.itertuples():
        assert f'data-layer="{r.layer}" data-feature="{r.feature}"' in page
    assert "<script" not in page                               # the explorer's HTML runs no JS
    assert 'class="tcx-histogram"' in page


def test_standalone_export_inlines_plotly(index, tiny_model, tiny_transcoders, tmp_path):
    dashes = [feature_dashboard(index, layer, _busy_feature(index, layer), tiny_model, tiny_transcoders)
              for layer in LAYERS]
    path = export_html(dashes, tmp_path / "dash.html")
    text = path.read_text()
    for d in dashes:
        assert f'href="#tcx-L{d.layer}-F{d.feature}"' in text and f'id="tcx-L{d.layer}-F{d.feature}"' in text
    assert "Plotly.newPlot" in text and len(text) > 1_000_000    # plotly.js itself is in the page
    assert not re.search(r'<script[^>]+src=', text)            # nothing fetched from the network
    for fig in (histogram_figure(dashes[0]), logit_figure(dashes[0]), ov_norms_figure(dashes[0])):
        assert fig.data
    with pytest.raises(InvalidInputError):
        export_html([], tmp_path / "empty.html")


def test_search_by_logits_and_examples(index, tiny_model, tiny_transcoders):
    tok = tiny_model.to_tokens(" war", prepend_bos=False)[0, 0]
    found = search_features(tiny_model, tiny_transcoders, " war", layers=LAYERS, k=5)
    scores = {(layer, f): float((tiny_transcoders[layer].W_dec[f] @ tiny_model.W_U[:, tok]).detach())
              for layer in LAYERS for f in range(64)}
    best = sorted(scores, key=lambda key: -scores[key])[:5]
    assert list(zip(found["layer"], found["feature"])) == best
    by_examples = search_features(tiny_model, tiny_transcoders, int(tok), by="examples", index=index)
    assert (by_examples["score"].diff().dropna() <= 0).all()
    with pytest.raises(InvalidInputError, match="not one"):
        search_features(tiny_model, tiny_transcoders, " war lasted")
    with pytest.raises(InvalidInputError, match="needs the feature index"):
        search_features(tiny_model, tiny_transcoders, " war", by="examples")


def test_clear_errors_for_bad_layer_or_feature(index, tiny_model, tiny_transcoders):
    with pytest.raises(InvalidInputError, match="not in this index"):
        feature_dashboard(index, 3, 0, tiny_model, tiny_transcoders)
    with pytest.raises(InvalidInputError, match="out of range"):
        feature_dashboard(index, 2, 64, tiny_model, tiny_transcoders)
    with pytest.raises(InvalidInputError, match="out of range"):
        feature_activations(tiny_model, tiny_transcoders, PROMPT, 2, 99)
    with pytest.raises(InvalidInputError, match="not run on this prompt"):
        run_prompt(tiny_model, tiny_transcoders, PROMPT, layers=[2]).feature(5, 0)
    other = TranscoderSet.from_transcoders({layer: tiny_transcoders[layer] for layer in LAYERS},
                                           name="someone-else")
    with pytest.raises(IncompatibleTranscoderError, match="built with transcoder set"):
        feature_dashboard(index, 2, 0, tiny_model, other)


def test_explorer_navigation_prompt_and_click_through(index, tiny_model, tiny_transcoders):
    from tc_explore.ui.explorer import FeatureExplorer

    ex = FeatureExplorer(index, tiny_model, tiny_transcoders, layer=5, feature=3)
    assert 'data-layer="5" data-feature="3"' in ex.dashboard_view.value
    assert "tcx-explorer" in ex.widget._dom_classes
    assert "tcx-prompt-input" in ex.prompt_input._dom_classes
    ex.next_button.click()
    assert ex.feature == 4 and 'data-feature="4"' in ex.dashboard_view.value
    ex.prev_button.click()
    ex.prev_button.click()
    assert ex.feature == 2
    ex.layer_select.value = 8
    assert 'data-layer="8" data-feature="2"' in ex.dashboard_view.value

    ex.prompt_input.value = PROMPT                              # typing runs the prompt
    n_tok = tiny_model.to_tokens(PROMPT).shape[1]
    assert ex.prompt_tokens.value.count('class="tcx-token') == n_tok
    assert len(ex.top_features.children) == n_tok
    want = feature_activations(tiny_model, tiny_transcoders, PROMPT, 8, 2)["activation"]
    shown = [float(x) for x in re.findall(r'data-activation="([^"]+)"', ex.prompt_tokens.value)]
    np.testing.assert_allclose(shown, want, rtol=1e-3, atol=1e-4)

    button = ex.top_features.children[2].children[1]             # a top feature at token 2
    layer, feature = map(int, re.match(r"L(\d+)/(\d+)", button.description).groups())
    button.click()
    assert (ex.layer, ex.feature) == (layer, feature)
    assert f'data-layer="{layer}" data-feature="{feature}"' in ex.dashboard_view.value
    assert f'data-layer="{layer}" data-feature="{feature}"' in ex.prompt_tokens.value

    ex.search_input.value = " war"
    ex.search_button.click()
    assert ex.search_results.children and "tcx-search-result" in ex.search_results.children[0]._dom_classes
    ex.search_input.value = " war lasted"
    ex.search_button.click()
    assert "not one" in ex.status.value

    ex.run_prompt(" war" * 40)                                   # longer than the context
    assert "context" in ex.status.value
