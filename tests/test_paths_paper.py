"""find_paths(..., ranking="paper") against a re-implementation of the path
search in the paper's own code (``greedy_get_top_paths`` of Dunefsky et al.'s
``transcoder_circuits``), written here from a reading of that code, on the
gpt2-small fixture weights loaded from the paper's pickle file format.

The reference works from the model's cache and the raw transcoder tensors,
never from tc_explore's decomposition. It follows the paper's algorithm:
per MLP layer the top-k features by signed ``(W_dec · v) × activation``; per
attention layer the top ``min(k, n_heads)`` (head, source > 0) pairs by
signed ``pattern × (v_src W_O) · v``; the embedding ``resid_pre[0] · v``; the
best k of these; then the best ``branches`` paths of all parents by the signed
contribution; layer-0 heads and the embedding are not expanded; optionally
capped. Two switches model the paper code's LayerNorm reading: ``centred=True``
(ours, conserving) or the paper's ``w × (w · ln(x)) / (w · x)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tc_explore.circuits import decompose, feature_target, find_paths, prompt_context, residual_target
from tc_explore.model import model_weights

PROMPT = "The war lasted from 1735 to 17"


@dataclass
class RefVector:
    """The paper's FeatureVector, reduced to what its search uses."""
    vector: torch.Tensor        # [d_model] float64
    layer: int
    sublayer: str               # resid_pre | resid_mid | resid_post
    token: int
    contrib: float              # possibly capped
    raw: float
    ident: tuple                # ("feature", l, g, t) | ("head", l, h, t, s) | ("embed", t) | ("root",)
    is_feature: bool = False


class PaperReference:
    def __init__(self, model, transcoders, prompt: str, centred: bool = True, exclude=()):
        self.tokens = model.to_tokens(prompt)            # with BOS, as the paper's run_with_cache
        _, cache = model.run_with_cache(self.tokens)
        self.cache = {k: v[0].detach().double() for k, v in cache.items()}
        self.w = model_weights(model)
        self.tcs = transcoders
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        self.centred = centred
        self.exclude = set(exclude)          # the paper's ``filter``, by kind

    def ln_read(self, vec: torch.Tensor, layer: int, token: int, ln: str) -> torch.Tensor:
        site = "hook_resid_pre" if ln == "ln1" else "hook_resid_mid"
        x = self.cache[f"blocks.{layer}.{site}"][token]
        scale = self.cache[f"blocks.{layer}.{ln}.hook_scale"][token, 0]
        if self.centred:
            return (vec - vec.mean()) / scale
        y = (x - x.mean()) / scale                       # the LayerNorm's normalised output
        if float(vec @ x) == 0.0:
            return vec * 0.0
        return vec * (vec @ y) / (vec @ x)               # the paper's get_ln_constant

    def acts(self, layer: int, token: int) -> torch.Tensor:
        tc = self.tcs[layer]
        x = self.cache[f"blocks.{layer}.ln2.hook_normalized"][token]
        b_dec = tc.b_dec.double() if tc.b_dec is not None else 0.0
        return torch.relu((x - b_dec) @ tc.W_enc.double() + tc.b_enc.double())

    def candidates(self, fv: RefVector, k: int, cap: float | None) -> list[RefVector]:
        L, sub, t = fv.layer, fv.sublayer, fv.token
        out: list[RefVector] = []
        for l in range(L + (1 if sub == "resid_post" else 0)):                  # MLPs upstream
            tc = self.tcs[l]
            conn = tc.W_dec.double() @ fv.vector
            pulled = conn * self.acts(l, t)
            vals, idx = torch.topk(pulled, k)
            for c, g in zip(vals.tolist(), idx.tolist()):
                vec = self.ln_read(tc.W_enc[:, g].double() * conn[g], l, t, "ln2")
                out.append(RefVector(vec, l, "resid_mid", t, c, c, ("feature", l, g, t), True))
        for l in range(L + (1 if sub in ("resid_post", "resid_mid") else 0)):   # attention upstream
            pattern = self.cache[f"blocks.{l}.attn.hook_pattern"][:, t, :]      # [H, src]
            v = self.cache[f"blocks.{l}.attn.hook_v"]                           # [src, H, d_head]
            W_O = self.w.W_O[l].double()                                         # [H, d_head, d_model]
            contribs = torch.einsum("hs,shf,hfm,m->hs", pattern, v, W_O, fv.vector)[:, 1:]  # no BOS
            vals, idx = torch.topk(contribs.flatten(), min(k, contribs.shape[0]))
            for c, i in zip(vals.tolist(), idx.tolist()):
                h, s = divmod(i, contribs.shape[1])
                s += 1
                ov = self.w.W_V[l, h].double() @ (W_O[h] @ fv.vector)
                vec = self.ln_read(ov * pattern[h, s], l, s, "ln1")
                out.append(RefVector(vec, l, "resid_pre", s, c, c, ("head", l, h, t, s)))
        c = float(self.cache["blocks.0.hook_resid_pre"][t] @ fv.vector)
        out.append(RefVector(fv.vector, 0, "resid_pre", t, c, c, ("embed", t)))
        out = [x for x in out if x.raw != 0.0 and x.ident[0] not in self.exclude]  # no zeros (see paths.py)
        if cap is not None:
            for x in out:
                if x.contrib > cap:
                    x.contrib = cap
        out.sort(key=lambda x: (-x.contrib, -x.raw))
        return out[:k]

    def search(self, root: RefVector, iterations: int, branches: int, capped: bool) -> list[list[list[RefVector]]]:
        cur_paths, all_paths = [[root]], []
        for _ in range(iterations):
            new_paths = []
            for path in cur_paths:
                last = path[-1]
                if last.layer == 0 and last.sublayer == "resid_pre":
                    continue                                  # layer-0 heads and embeddings
                cap = None
                if capped:
                    for x in path:
                        if x.is_feature:
                            cap = x.contrib
                new_paths += [path + [c] for c in self.candidates(last, branches, cap)]
            new_paths.sort(key=lambda p: (-p[-1].contrib, -p[-1].raw))
            cur_paths = new_paths[:branches]
            all_paths.append(cur_paths)
        return all_paths


def ident(node) -> tuple:
    if node.kind == "feature":
        return ("feature", node.layer, node.index, node.token)
    if node.kind == "head":
        return ("head", node.layer, node.index, node.token, node.source)
    return (node.kind, node.token)


def assert_same_paths(result, reference, capped: bool):
    for it, ref_paths in enumerate(reference, start=1):
        ours = [p for p in result.paths if p.iteration == it]
        assert [tuple(ident(c.node) for c in p.contributions) for p in ours] == \
            [tuple(x.ident for x in path[1:]) for path in ref_paths], f"iteration {it}"
        for p, ref in zip(ours, ref_paths):
            assert p.attribution == pytest.approx(ref[-1].raw, rel=1e-5, abs=1e-7)
            assert result.score_of(p) == pytest.approx(ref[-1].contrib, rel=1e-5, abs=1e-7)
    assert len(result.paths) == sum(len(r) for r in reference)


@pytest.fixture(scope="module")
def setting(tiny_model, tiny_transcoders):
    ctx = prompt_context(tiny_model, tiny_transcoders, PROMPT)
    ref = PaperReference(tiny_model, tiny_transcoders, PROMPT)
    return ctx, ref


def logit_roots(ctx, ref, a: str = "40", b: str = "20"):
    W_U = model_weights(ctx.model).W_U.double()
    ids = [int(ctx.model.to_single_token(s)) for s in (a, b)]
    u = W_U[:, ids[0]] - W_U[:, ids[1]]
    last = ctx.n_layers - 1
    ours = residual_target(ctx, u, last, "resid_post")
    root = RefVector(u, last, "resid_post", ctx.n_pos - 1, 0.0, 0.0, ("root",))
    return ours, root


@pytest.mark.parametrize("mode", ["raw", "capped"])
def test_paper_ranking_reproduces_the_paper_code_on_a_logit_target(setting, mode):
    ctx, ref = setting
    target, root = logit_roots(ctx, ref)
    ours = find_paths(ctx, target, iterations=3, branches=15, mode=mode, ranking="paper")
    expected = ref.search(root, 3, 15, capped=mode == "capped")
    assert_same_paths(ours, expected, mode == "capped")
    # The paper's regime: enough positive candidates at every step, so no zero
    # contribution would have been picked by its code either.
    assert all(path[-1].raw > 0 for paths in expected for path in paths)
    assert {c.node.kind for p in ours.paths for c in p.contributions} <= {"feature", "head", "embed"}
    for it in (1, 2, 3):     # signed ranking
        scores = [ours.score_of(p) for p in ours.paths if p.iteration == it]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("mode", ["raw", "capped"])
def test_paper_ranking_reproduces_the_paper_code_on_a_feature_target(setting, tiny_transcoders, mode):
    ctx, ref = setting
    layer, token = 1, ctx.n_pos - 1          # low enough for heads and embeddings to compete
    feature = int(ctx.feature_acts(layer)[token].argmax())
    target = feature_target(ctx, layer, feature, token)
    act = float(ctx.feature_acts(layer)[token, feature])
    assert act > 0
    root = RefVector(ref.ln_read(tiny_transcoders[layer].W_enc[:, feature].double(), layer, token, "ln2"),
                     layer, "resid_mid", token, act, act, ("root",), True)
    ours = find_paths(ctx, target, iterations=3, branches=10, mode=mode, ranking="paper")
    assert ours.root_cap == pytest.approx(act)
    expected = ref.search(root, 3, 10, capped=mode == "capped")
    assert_same_paths(ours, expected, mode == "capped")
    assert all(path[-1].raw > 0 for paths in expected for path in paths)
    assert {c.node.kind for p in ours.paths for c in p.contributions} == {"feature", "head", "embed"}
    if mode == "capped":     # the activation caps every path
        assert all(ours.score_of(p) <= act + 1e-12 for p in ours.paths)


def test_paper_ranking_through_heads_only(setting, tiny_model, tiny_transcoders):
    """Features excluded (the paper's ``filter``): heads and embeddings only.
    More branches than heads: at most n_heads (head, source) pairs per layer
    for each target; no BOS source; layer-0 heads end their paths."""
    ctx, _ = setting
    ref = PaperReference(tiny_model, tiny_transcoders, PROMPT, exclude=("feature",))
    target, root = logit_roots(ctx, ref)
    ours = find_paths(ctx, target, iterations=3, branches=20, exclude_kinds=("feature",), ranking="paper")
    assert_same_paths(ours, ref.search(root, 3, 20, capped=False), False)
    heads = [c.node for p in ours.paths for c in p.contributions if c.node.kind == "head"]
    assert heads and all(n.source != 0 for n in heads)
    first = [p.head.node for p in ours.paths if p.iteration == 1 and p.head.node.kind == "head"]
    per_layer = {}
    for n in first:
        per_layer[n.layer] = per_layer.get(n.layer, 0) + 1
    assert max(per_layer.values()) <= ctx.n_heads < 20
    assert any(p.head.node.kind == "head" and p.head.node.layer == 0 for p in ours.paths)
    for p in ours.paths:     # layer-0 heads are never expanded
        assert all(c.node.layer > 0 for c in p.contributions[:-1] if c.node.kind == "head")


def test_paper_and_magnitude_rankings_differ_and_the_paper_reading_does_not_conserve(setting, tiny_transcoders):
    ctx, _ = setting
    target, _ = logit_roots(ctx, None)
    paper = find_paths(ctx, target, iterations=2, branches=8, ranking="paper")
    ours = find_paths(ctx, target, iterations=2, branches=8)
    assert [p.key() for p in paper.paths] != [p.key() for p in ours.paths]
    assert any(p.attribution < 0 for p in ours.paths)           # |value| ranking keeps negative paths
    # The resid_post logit readout is the paper's: plain dot products with W_U[:, a] - W_U[:, b].
    resid = ctx.resid[ctx.final_stage, -1]
    assert target.value == pytest.approx(float(target.direction @ resid))
    # A feature target read through LayerNorm without centring (the paper's
    # reading) splits into parts that do not sum to w · ln2(x); ours do.
    uncentred = PaperReference(ctx.model, tiny_transcoders, PROMPT, centred=False)
    layer, token = 6, ctx.n_pos - 1
    f = int(ctx.feature_acts(layer)[token].argmax())
    w = tiny_transcoders[layer].W_enc[:, f].double()
    v = uncentred.ln_read(w, layer, token, "ln2")
    resid_mid = uncentred.cache[f"blocks.{layer}.hook_resid_mid"][token]
    parts = ctx.embed[token] + ctx.pos_embed[token] + sum(ctx.mlp_out[l, token] for l in range(layer))
    attn = sum(uncentred.cache[f"blocks.{l}.hook_attn_out"][token] for l in range(layer + 1))
    assert float((parts + attn) @ v) == pytest.approx(float(resid_mid @ v), rel=1e-6)
    normalised = uncentred.cache[f"blocks.{layer}.ln2.hook_normalized"][token]
    assert float(resid_mid @ v) == pytest.approx(float(normalised @ w), rel=1e-6)
    # ... but part by part it is not what the part adds with the LayerNorm scale
    # frozen (centre(w) · part / scale, ours): a transcoder feature's decoder row
    # is not mean-zero, unlike the model's centred writing weights.
    centred = feature_target(ctx, layer, f, token).direction
    g = int(ctx.feature_acts(0)[token].argmax())
    part = ctx.feature_acts(0)[token, g].double() * tiny_transcoders[0].W_dec[g].double()
    assert float(part @ v) != pytest.approx(float(part @ centred), rel=1e-3)
    emb = ctx.embed[token] + ctx.pos_embed[token]     # centred weights: the two readings agree
    assert float(emb @ v) == pytest.approx(float(emb @ centred), rel=1e-6, abs=1e-9)
    dec = decompose(ctx, feature_target(ctx, layer, f, token))
    assert dec.total == pytest.approx(dec.target.value, abs=1e-4)


def test_graph_expansion_keeps_the_paper_ranking(setting):
    from tc_explore.circuits import PathGraphExpander
    ctx, _ = setting
    layer, token = 1, ctx.n_pos - 1
    f = int(ctx.feature_acts(layer)[token].argmax())
    result = find_paths(ctx, feature_target(ctx, layer, f, token), iterations=1, branches=6, ranking="paper")
    expander = PathGraphExpander(result)
    graph = expander.graph()
    node_id = next(nid for nid, n in graph.nodes.items()
                   if not n.is_target and expander.expandable({"node_id": nid}))
    before = len(expander.paths)
    expander.expand(node_id)
    new = expander.paths[before:]
    assert new and all(c.node.kind in ("feature", "head", "embed") for p in new for c in p.contributions)
    assert expander._result_for_graph().ranking == "paper"
