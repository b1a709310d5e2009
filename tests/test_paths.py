"""find_paths: deterministic, ranked per iteration, and capped mode's bound."""
import pytest

from tc_explore.circuits import find_paths, logit_diff_target, prompt_context

PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def search(tiny_model, tiny_transcoders):
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    return find_paths(ctx, logit_diff_target(ctx, "40", "20"), iterations=3, branches=8)


def test_path_search_is_deterministic_and_ranked(search, tiny_model, tiny_transcoders):
    ctx = search.ctx
    again = find_paths(ctx, search.target, iterations=3, branches=8)
    assert [p.key() for p in again.paths] == [p.key() for p in search.paths]
    assert [p.attribution for p in again.paths] == [p.attribution for p in search.paths]
    assert {p.iteration for p in search.paths} == {1, 2, 3}
    for it in (1, 2, 3):
        scores = [abs(p.attribution) for p in search.paths if p.iteration == it]
        assert len(scores) <= 8 and scores == sorted(scores, reverse=True)
    capped = find_paths(ctx, search.target, iterations=3, branches=8, mode="capped")
    for p in capped.paths:
        feats = [abs(c.value) for c in p.contributions[:-1] if c.node.kind == "feature"]
        assert abs(p.capped) <= abs(p.attribution) + 1e-12
        assert abs(p.capped) == pytest.approx(min([abs(p.attribution)] + feats))
