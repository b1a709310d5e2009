import pytest
import torch

from tc_explore.errors import InvalidInputError
from tc_explore.tasks import greater_than as gt


def test_year_tokens_are_the_100_two_digit_years(demo_model):
    ids = gt.year_token_ids(demo_model)
    assert ids.shape == (100,) and len(set(ids.tolist())) == 100
    assert [demo_model.tokenizer.decode([i]) for i in ids.tolist()] == [f"{y:02d}" for y in range(100)]


class _CharTokenizer:
    """A tokenizer with one token per character: no two-digit tokens."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_tokenizer_without_two_digit_tokens_is_refused():
    with pytest.raises(InvalidInputError, match="two-digit"):
        gt.year_token_ids(_CharTokenizer())
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        gt.year_token_ids(object())


def test_make_prompts_is_deterministic_and_spreads_start_years():
    a, b = gt.make_prompts(100, seed=3), gt.make_prompts(100, seed=3)
    assert a == b and len(a) == 100
    years = [p.start_year for p in a]
    assert set(years) == set(gt.DEFAULT_START_YEARS)      # 97 years, each at least once
    assert all(p.text == gt.TEMPLATE.format(noun=p.noun, yy=p.start_year, century=17) for p in a)
    assert gt.make_prompts(100, seed=4) != a
    for bad in (dict(n=0), dict(start_years=[120]), dict(century=7), dict(nouns=[]),
                dict(template="The {noun} in {century}{yy:02d}.")):
        with pytest.raises(InvalidInputError):
            gt.make_prompts(**bad)


def test_tokenize_prompts_locates_the_start_year(demo_model):
    tp = gt.tokenize_prompts(demo_model, gt.make_prompts(20, seed=0))
    years = gt.year_token_ids(demo_model)
    century = demo_model.to_tokens(" 17", prepend_bos=False)[0].item()
    for p, t, pos in zip(tp.prompts, tp.tokens, tp.year_positions):
        assert t[pos].item() == years[p.start_year].item()
        assert t[-1].item() == century
        assert len(t) - 1 - pos == 4          # four tokens between start year and prediction
    assert tp.stacked().shape == (20, len(tp.tokens[0]))


def test_unknown_word_and_bad_template_give_clear_errors(demo_model):
    with pytest.raises(InvalidInputError, match="unknown"):
        gt.tokenize_prompts(demo_model, gt.prompts_from_pairs([("zebra", 30)]))
    bad = [gt.GreaterThanPrompt("The war lasted from the year 1730 to the year 17 and", "war", 30)]
    with pytest.raises(InvalidInputError, match="does not end"):
        gt.tokenize_prompts(demo_model, bad)
    with pytest.raises(InvalidInputError):
        gt.tokenize_prompts(demo_model, [])


def test_probability_difference_by_hand():
    probs = torch.zeros(3, 100)
    probs[0, 50] = 1.0                       # all mass on 50
    probs[1, 50] = 1.0
    probs[2] = 1.0 / 100                      # uniform over the years
    diff = gt.probability_difference_from_probs(probs, torch.tensor([30, 60, 30]))
    assert diff.tolist() == pytest.approx([1.0, -1.0, (69 - 31) / 100])
    # YY itself counts as "not greater"
    one = torch.zeros(1, 100)
    one[0, 30] = 1.0
    assert gt.probability_difference_from_probs(one, torch.tensor([30])).item() == -1.0
    with pytest.raises(InvalidInputError):
        gt.probability_difference_from_probs(torch.zeros(2, 99), torch.tensor([1, 2]))
    with pytest.raises(InvalidInputError):
        gt.probability_difference_from_probs(torch.zeros(2, 100), torch.tensor([1]))


def test_probability_difference_matches_manual_softmax(demo_model):
    prompts = gt.make_prompts(8, seed=1)
    per = gt.probability_difference(demo_model, prompts, per_prompt=True)
    tokens = gt.tokenize_prompts(demo_model, prompts).stacked()
    with torch.no_grad():
        probs = torch.softmax(demo_model(tokens)[:, -1].float(), -1)
    years = gt.year_token_ids(demo_model)
    for i, p in enumerate(prompts):
        py = probs[i, years]
        expected = py[p.start_year + 1:].sum() - py[:p.start_year + 1].sum()
        assert per[i].item() == pytest.approx(expected.item(), abs=1e-5)


def test_rank_features_by_variance(demo_model, demo_transcoders):
    prompts = gt.make_prompts(100, seed=0)
    df = gt.rank_features_by_variance(demo_model, demo_transcoders, prompts, top_k=5)
    assert list(df.columns) == ["layer", "rank", "feature", "variance", "mean", "max", "frac_active"]
    assert sorted(df.layer.unique()) == demo_transcoders.layers
    assert (df.groupby("layer").size() == 5).all()
    for _, group in df.groupby("layer"):
        assert group.variance.is_monotonic_decreasing
    acts = gt.feature_activations(demo_model, demo_transcoders, prompts, layers=[2])[2]
    assert acts.shape == (100, demo_transcoders.d_sae(2))
    top = df[df.layer == 2].iloc[0]
    assert acts.var(0, unbiased=False).max().item() == pytest.approx(top.variance, rel=1e-5)
    assert acts[:, int(top.feature)].var(unbiased=False).item() == pytest.approx(top.variance, rel=1e-5)
    assert top.variance > 0
    with pytest.raises(InvalidInputError):
        gt.rank_features_by_variance(demo_model, demo_transcoders, prompts, top_k=0)


def test_works_on_the_gpt2_fixture(tiny_model, tiny_transcoders):
    prompts = gt.prompts_from_pairs([("war", yy) for yy in (5, 40, 90)])
    value = gt.probability_difference(tiny_model, prompts)
    assert -1.0 <= value <= 1.0
    df = gt.rank_features_by_variance(tiny_model, tiny_transcoders, prompts, layers=[0, 11], top_k=3)
    assert sorted(df.layer.unique()) == [0, 11] and len(df) == 6
