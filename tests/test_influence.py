"""Influence, pruning and scores on small hand-made graphs whose answers are
worked out by hand (in the comments), plus the closed form on a random DAG."""
import pytest
import torch

from tc_explore import InvalidInputError
from tc_explore.circuits.influence import (coverage_threshold, cumulative_influence, graph_scores,
                                           node_influence, normalized_adjacency, prune_levels,
                                           prune_levels_from_cumulative, prune_masks)

# nodes: 0 feature f, 1 error e, 2 embedding x, 3 logit (weight 1)
#   logit <- f: 3, logit <- e: -1   => normalised 0.75, 0.25
#   f <- x: 2                        => normalised 1
A1 = torch.tensor([[0.0, 0.0, 2.0, 0.0],
                   [0.0, 0.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 0.0],
                   [3.0, -1.0, 0.0, 0.0]])
W1 = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
LEVELS1 = torch.tensor([1.0, -1.0, -1.0, float("inf")])


def test_hand_influence():
    # f: 0.75 directly; e: 0.25; x: through f, 0.75 x 1; the logit itself: 0
    expected = [0.75, 0.25, 0.75, 0.0]
    assert node_influence(A1, W1).tolist() == pytest.approx(expected)
    assert node_influence(A1, W1, LEVELS1).tolist() == pytest.approx(expected)
    assert normalized_adjacency(A1)[3].tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0])


def test_hand_cumulative_and_threshold():
    # sorted: f 0.75, x 0.75, e 0.25, logit 0 (total 1.75): 3/7, 6/7, 1, 1
    cum = cumulative_influence(torch.tensor([0.75, 0.25, 0.75, 0.0], dtype=torch.float64))
    assert cum.tolist() == pytest.approx([3 / 7, 1.0, 6 / 7, 1.0])
    # 0.8 of the total is reached at the second 0.75
    assert coverage_threshold(torch.tensor([0.75, 0.25, 0.75, 0.0]), 0.8) == 0.75
    assert coverage_threshold(torch.tensor([0.75, 0.25, 0.75, 0.0]), 0.9) == 0.25
    with pytest.raises(InvalidInputError):
        coverage_threshold(torch.tensor([1.0]), 1.5)


def test_hand_prune_levels_with_ties_and_zeros():
    # total 1: nodes more influential than each hold -, 0.5, 0.5 (a tie), 0.9; none for 0
    infl = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0], dtype=torch.float64)
    inf = float("inf")
    assert prune_levels(infl).tolist() == pytest.approx([-1.0, 0.5, 0.5, 0.9, inf])
    # levels < t is exactly the coverage rule (ties kept together), at every t
    gen = torch.Generator().manual_seed(0)
    for scores in (infl, torch.rand(200, generator=gen, dtype=torch.float64) ** 3,
                   torch.tensor([0.3, 0.3, 0.3, 0.1], dtype=torch.float64)):
        for t in torch.linspace(0, 1, 101).tolist() + [0.5, 0.9, 1.0]:
            old = (scores >= coverage_threshold(scores, t)) & (scores > 0)
            assert torch.equal(prune_levels(scores) < t, old), t
    # from a file's cumulative fractions alone (circuit-tracer's): the same levels without ties
    r = torch.rand(50, generator=gen, dtype=torch.float64)
    r[:5] = 0
    assert prune_levels_from_cumulative(cumulative_influence(r))[5:].tolist() == \
        pytest.approx(prune_levels(r)[5:].tolist(), abs=1e-12)
    # nodes without influence share the last node's fraction (1) and so its level
    last = int(torch.argmin(torch.where(r > 0, r, torch.ones_like(r))))
    assert prune_levels_from_cumulative(cumulative_influence(r))[:5].tolist() == \
        pytest.approx([float(prune_levels(r)[last])] * 5, abs=1e-12)
    nan = float("nan")
    assert prune_levels_from_cumulative(torch.tensor([0.3, nan, 0.6, 0.6, 1.0])).tolist() == \
        pytest.approx([-1.0, inf, 0.3, 0.3, 0.6])
    # a threshold of 1 keeps every positive entry, however the running sum rounds
    assert coverage_threshold(torch.tensor([1e-30, 1.0, 0.0]), 1.0) == pytest.approx(1e-30)


def test_hand_scores():
    # replacement: x / (x + e) = 0.75 / 1.0
    # completeness: rows' non-error share (logit 0.75, others 1) weighted by
    # influence + weight [0.75, 0.25, 0.75, 1]: (0.75 + 0.25 + 0.75 + 0.75) / 2.75
    r, c = graph_scores(A1, W1, torch.tensor([False, True, False, False]),
                        torch.tensor([False, False, True, False]))
    assert r == pytest.approx(0.75)
    assert c == pytest.approx(2.5 / 2.75)


def test_hand_prune_drops_low_influence_error():
    # node threshold 0.8 -> score 0.75: f and x kept, e (0.25) dropped; logit and x always kept.
    m = prune_masks(A1, W1, always_keep=torch.tensor([False, False, True, True]),
                    is_feature=torch.tensor([True, False, False, False]), node_threshold=0.8,
                    edge_threshold=0.98)
    assert m.node_mask.tolist() == [True, False, True, True]
    # both remaining edges carry influence 1 each: both kept
    assert torch.nonzero(m.edge_mask).tolist() == [[0, 2], [3, 0]]


def test_hand_prune_drops_feature_without_input():
    # nodes: 0 f (reads x), 1 h (reads nothing), 2 x, 3 logit
    #   logit <- f: 1, logit <- h: 3 => 0.25, 0.75;  f <- x: 1
    # influence h 0.75, f 0.25, x 0.25: all kept by the node threshold (0.7),
    # all edges kept; then h has no incoming edge and is dropped.
    A = torch.tensor([[0.0, 0.0, 1.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [1.0, 3.0, 0.0, 0.0]])
    m = prune_masks(A, W1, always_keep=torch.tensor([False, False, True, True]),
                    is_feature=torch.tensor([True, True, False, False]), node_threshold=0.7,
                    edge_threshold=0.98)
    assert m.influence.tolist() == pytest.approx([0.25, 0.75, 0.25, 0.0])
    assert m.node_mask.tolist() == [True, False, True, True]
    assert not m.edge_mask[:, 1].any() and not m.edge_mask[1].any()
    assert m.edge_mask[3, 0] and m.edge_mask[0, 2]


def test_hand_prune_drops_feature_without_output_chain():
    # 0 f0 <- x; 1 f1 <- f0 (f1 read by nobody); logit <- f0.
    # f1 has zero influence: dropped by the node threshold.
    A = torch.tensor([[0.0, 0.0, 1.0, 0.0],
                      [2.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [1.0, 0.0, 0.0, 0.0]])
    m = prune_masks(A, W1, torch.tensor([False, False, True, True]), torch.tensor([True, True, False, False]))
    assert m.node_mask.tolist() == [True, False, True, True]


def test_closed_form_and_levels_on_random_dag():
    g = torch.Generator().manual_seed(0)
    n = 30
    levels = torch.randint(0, 6, (n,), generator=g).double()
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A *= (levels[None, :] < levels[:, None]).double()                  # edges from lower levels only
    A *= torch.rand(n, n, generator=g, dtype=torch.float64) < 0.4
    w = torch.zeros(n, dtype=torch.float64)
    top = levels == levels.max()
    w[top] = torch.rand(int(top.sum()), generator=g, dtype=torch.float64)
    An = normalized_adjacency(A)
    closed = w @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - An) - torch.eye(n, dtype=torch.float64))
    assert node_influence(A, w).tolist() == pytest.approx(closed.tolist(), abs=1e-12)
    assert node_influence(A, w, levels).tolist() == pytest.approx(closed.tolist(), abs=1e-12)


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="square"):
        node_influence(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(InvalidInputError, match="cycle"):
        node_influence(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0]))
    with pytest.raises(InvalidInputError, match="node_threshold"):
        prune_masks(A1, W1, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool), node_threshold=2)
