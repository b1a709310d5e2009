"""evaluate_transcoders: every metric equals its direct computation."""
import pytest
import torch
import torch.nn.functional as F

from tc_explore import evaluate_transcoders, run_with_ablated_mlps, run_with_transcoders
from tc_explore.model import to_tokens
from tc_explore.testing import mlp_io as _mlp_io


@torch.no_grad()
def test_metrics_agree_with_direct_computation(tiny_model, tiny_transcoders):
    prompts = ["The war lasted from 1735 to 1789.", "The cat sat on the mat and the dog ran fast."]
    df = evaluate_transcoders(tiny_model, tiny_transcoders, prompts, layers=[3, 7])
    assert list(df.index) == [3, 7, "all"]
    toks = [to_tokens(tiny_model, p) for p in prompts]

    def ce(logits_list):
        total = sum(F.cross_entropy(lg[0, :-1], t[0, 1:], reduction="sum") for lg, t in zip(logits_list, toks))
        return float(total) / sum(t.shape[1] - 1 for t in toks)

    clean = [tiny_model(t) for t in toks]
    rep = [run_with_transcoders(tiny_model, t, tiny_transcoders, layers=[3]) for t in toks]
    zero = [run_with_ablated_mlps(tiny_model, t, [3]) for t in toks]
    row = df.loc[3]
    assert row.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert row.ce_replaced == pytest.approx(ce(rep), rel=1e-5)
    assert row.ce_zero_ablated == pytest.approx(ce(zero), rel=1e-5)
    assert row.ce_recovered == pytest.approx(
        (row.ce_zero_ablated - row.ce_replaced) / (row.ce_zero_ablated - row.ce_clean), rel=1e-9)
    assert row.ce_recovered == pytest.approx((ce(zero) - ce(rep)) / (ce(zero) - ce(clean)), rel=1e-3)
    kl = sum(float((c[0, :-1].log_softmax(-1).exp() * (c[0, :-1].log_softmax(-1) - r[0, :-1].log_softmax(-1))).sum())
             for c, r in zip(clean, rep)) / sum(t.shape[1] - 1 for t in toks)
    assert row.kl == pytest.approx(kl, rel=1e-4)
    xs, ys = zip(*[_mlp_io(tiny_model, t, 3) for t in toks])
    x, y = torch.cat(xs, 1)[0], torch.cat(ys, 1)[0]
    y_hat, acts = tiny_transcoders[3](x)
    assert row.l0 == pytest.approx(float((acts > 0).sum(-1).float().mean()), rel=1e-6)
    fvu = float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert row.fvu == pytest.approx(fvu, rel=1e-4)
    assert row.dead_features == int((acts.max(0).values <= 0).sum())
    all_rep = [run_with_transcoders(tiny_model, t, tiny_transcoders, layers=[3, 7]) for t in toks]
    assert df.loc["all"].ce_replaced == pytest.approx(ce(all_rep), rel=1e-5)
