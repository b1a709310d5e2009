"""The shipped tiny-years demo: checked on the files in pretrained/, not retrained."""
import json
from pathlib import Path

import pytest
import torch

from tc_explore import demo
from tc_explore.hub import registry
from tc_explore.tasks import greater_than as gt

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"


@pytest.fixture(scope="module")
def metrics(demo_model, demo_transcoders):
    return demo.evaluate(demo_model, demo_transcoders)


def test_registry_entry_and_shapes(demo_model, demo_transcoders):
    entry = registry()["tiny-years"]
    assert entry.local_dir and entry.model_dir and entry.format == "gpt2-pickle"
    assert demo_transcoders.layers == list(range(demo_model.cfg.n_layers)) == [0, 1, 2]
    assert demo_model.cfg.d_model == 64 and demo_model.cfg.n_ctx == 64
    demo_transcoders.check_fits(demo_model)
    for layer in demo_transcoders.layers:
        tc = demo_transcoders[layer]
        assert tc.d_sae == 8 * demo_model.cfg.d_model
        assert tc.input_hook == f"blocks.{layer}.ln2.hook_normalized"
        assert tc.output_hook == f"blocks.{layer}.hook_mlp_out"
        assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(tc.d_sae), atol=1e-4)
        freq = demo_transcoders.log_feature_frequency(layer)
        assert freq.shape == (tc.d_sae,) and (freq <= 0).all()
        assert (freq > -10).float().mean() > 0.9          # almost every feature fires


def test_shipped_size_is_small():
    files = [p for p in (PRETRAINED / "tiny-years").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5e6


def test_greater_than_thresholds(metrics):
    assert metrics["n_prompts"] == 100
    assert metrics["prob_diff_original"] >= 0.6
    assert metrics["prob_diff_replaced"] >= 0.8 * metrics["prob_diff_original"]


def test_transcoder_quality_per_layer(metrics):
    for layer, m in metrics["layers"].items():
        assert m["fvu"] <= 0.2, (layer, m)
        assert 1 <= m["l0"] <= 64, (layer, m)        # sparse: at most 1/8 of 512 features


def test_reported_metrics_match_the_shipped_files(metrics):
    shipped = json.loads((PRETRAINED / "tiny-years" / "metrics.json").read_text())
    assert shipped["prob_diff_original"] == pytest.approx(metrics["prob_diff_original"], abs=1e-3)
    assert shipped["prob_diff_replaced"] == pytest.approx(metrics["prob_diff_replaced"], abs=1e-3)
    for layer, m in metrics["layers"].items():
        assert shipped["layers"][str(layer)]["fvu"] == pytest.approx(m["fvu"], abs=1e-3)
        assert shipped["layers"][str(layer)]["l0"] == pytest.approx(m["l0"], abs=0.05)


def test_prediction_depends_on_the_start_year(demo_model):
    """The model reads the start year (four tokens back), not just 'some year'."""
    prompts = demo.held_out_prompts(100)
    tp = gt.tokenize_prompts(demo_model, prompts)
    assert all(len(t) - 1 - pos == 4 for t, pos in zip(tp.tokens, tp.year_positions))
    probs = gt.year_probabilities(gt.final_logits(demo_model, tp), gt.year_token_ids(demo_model))
    right = gt.probability_difference_from_probs(probs, tp.start_years).mean()
    wrong = gt.probability_difference_from_probs(probs, 99 - tp.start_years).mean()
    assert right - wrong > 0.3
    # the predicted year rises with the start year
    expected = (probs / probs.sum(-1, keepdim=True)) @ torch.arange(100.0)
    corr = torch.corrcoef(torch.stack([expected, tp.start_years.float()]))[0, 1]
    assert corr > 0.8


def test_held_out_pairs_never_in_training_text():
    corpus = demo.SyntheticSentences(123)
    seen = 0
    for _ in range(3000):
        s = corpus.sentence()
        if "lasted from the year 17" in s:
            noun = s.split()[1]
            yy = int(s.split("the year 17")[1][:2])
            assert not demo.is_held_out(noun, yy), s
            seen += 1
    assert seen > 50
    for p in demo.held_out_prompts(100):
        assert demo.is_held_out(p.noun, p.start_year)


def test_corpus_is_deterministic_and_has_every_kind():
    tok = demo.tokenizer()
    a = demo.SyntheticSentences(5).windows(tok, 8, 64)
    b = demo.SyntheticSentences(5).windows(tok, 8, 64)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert (a[:, 0] == tok.bos_token_id).all() and (a[:, 1:] != tok.bos_token_id).all()
    corpus = demo.SyntheticSentences(5)
    text = " ".join(corpus.sentence() for _ in range(300))
    for marker in ("lasted from", " counted ", " gave a ", " is ", " in the "):
        assert marker in text


def test_build_command_writes_a_loadable_set(tmp_path):
    """A miniature build (a few steps) through the same code path as the real one."""
    from tc_explore import load_transcoders
    from tc_explore.model import load_model

    cfg = demo.DemoConfig(lm_steps=4, lm_batch=8, tc_steps=6, tc_batch=128, eval_prompts=4,
                          eval_windows=2)
    m = demo.build(tmp_path, cfg, log=lambda *a: None)
    entry = json.loads((tmp_path / "tiny-years.json").read_text())
    assert entry["local_dir"] == "tiny-years/transcoders" and entry["model_dir"] == "tiny-years/model"
    ts = load_transcoders(str(tmp_path / "tiny-years" / "transcoders"), device="cpu")
    model = load_model(str(tmp_path / "tiny-years" / "model"), device="cpu")
    ts.check_fits(model)
    assert set(m) >= {"prob_diff_original", "prob_diff_replaced", "layers", "build_seconds"}
    assert not (tmp_path / "tiny-years.building").exists()
