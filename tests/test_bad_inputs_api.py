"""More bad inputs across the public API (the second round of the probe in
``test_bad_inputs.py``): attribution arguments and targets, graph files,
interventions, generation, decompositions and path searches, ablation curves,
evaluation, loading arguments, transcoder sets. Each must raise one of our
errors with a message that names the input; the ``ACCEPTED`` cases are inputs
that are fine (numpy and tensor integers, dtype names) and must keep working.
Runs on the demo model ``tiny-years`` (3 layers, d_model 64, 512 features,
vocabulary 513, context 64)."""
import copy
import json
import types

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tc_explore import (Intervention, TranscoderSet, evaluate_transcoders, generate, intervene, load_model,
                        load_transcoders, run_with_ablated_mlps, run_with_transcoders)
from tc_explore.ablation import ablation_curve, ablation_curve_figure, ranking_from
from tc_explore.circuits import (AttributionGraph, CircuitGraph, PathGraphExpander, attribute, decompose,
                                 feature_connections, find_paths, logit_diff_target, next_target, prompt_context,
                                 residual_target)
from tc_explore.corpus import Corpus
from tc_explore.dashboard import dashboard_html, export_html, feature_dashboard, tokens_html
from tc_explore.errors import (IncompatibleTranscoderError, InvalidInputError, NonFiniteError, StorageError,
                               TcExploreError)
from tc_explore.formats import (read_circuit_tracer_config, read_circuit_tracer_safetensors,
                                read_gemma_scope_npz, read_gpt2_transcoder)
from tc_explore.formats.clt import write_clt
from tc_explore.index import FeatureIndex
from tc_explore.interventions import feature_scaling, logit_difference_metric
from tc_explore.prompt_features import run_prompt, top_features_per_token
from tc_explore.replacement import mean_mlp_outputs, transcoder_hooks
from tc_explore.search import search_features
from tc_explore.demo import SyntheticSentences
from tc_explore.testing import assert_our_error, random_clt, random_transcoder
from tc_explore.tasks import greater_than as gt
from tc_explore.training import TrainingConfig, save_transcoder_set, train_transcoders
from tc_explore.ui.explorer import explore
from tc_explore.ui.graph_widget import circuit_graph_widget
from tc_explore.weight_views import WeightViews

PROMPT = "The war lasted from 1735 to 17"


@pytest.fixture(scope="module")
def env(demo_model, demo_transcoders, tmp_path_factory):
    ctx = prompt_context(demo_model, demo_transcoders, PROMPT)
    graph = attribute(demo_model, demo_transcoders, ctx, max_n_logits=2)
    target = logit_diff_target(ctx, "40", "20")
    paths = find_paths(ctx, target, iterations=2, branches=3)
    return types.SimpleNamespace(model=demo_model, ts=demo_transcoders, ctx=ctx, graph=graph,
                                 graph_dict=graph.to_dict(), target=target, paths=paths,
                                 circuit=CircuitGraph.from_paths(paths, ctx).to_dict(),
                                 tmp=tmp_path_factory.mktemp("bad_inputs_api"))


def _attr(e, **kw):
    return attribute(e.model, e.ts, PROMPT, **kw)


def _graph_with(e, edit):
    data = copy.deepcopy(e.graph_dict)
    edit(data)
    return AttributionGraph.from_json(data)


def _circuit_with(e, edit):
    data = copy.deepcopy(e.circuit)
    edit(data)
    return CircuitGraph.from_json(data)


def _ours(data):
    return data["metadata"]["tc_explore"]


def _first_logit(data):
    return next(n for n in data["nodes"] if n.get("feature_type") == "logit")


def _iv(e, *ivs, **kw):
    return intervene(e.model, e.ts, PROMPT, list(ivs), **kw)


def _score(e):
    tokens = e.model.to_tokens(PROMPT)
    return lambda hooks: float(e.model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1, 5].detach())


# (id, call, error type, text the message must contain: the input, named)
CASES = [
    # attribute(...): targets
    ("attr-target-float-tensor", lambda e: _attr(e, targets=[torch.tensor(3.7)]), InvalidInputError, "3.7"),
    ("attr-target-float", lambda e: _attr(e, targets=[3.0]), InvalidInputError, "3.0"),
    ("attr-target-bool", lambda e: _attr(e, targets=[True]), InvalidInputError, "True"),
    ("attr-target-none", lambda e: _attr(e, targets=[None]), InvalidInputError, "None"),
    ("attr-targets-dict", lambda e: _attr(e, targets={"a": 1}), InvalidInputError, "dict"),
    ("attr-targets-duplicate", lambda e: _attr(e, targets=[5, 5]), InvalidInputError, "[5]"),
    ("attr-target-weight-nan", lambda e: _attr(e, targets=[(e.target, float("nan"))]), InvalidInputError, "nan"),
    ("attr-target-weight-inf", lambda e: _attr(e, targets=[(e.target, float("inf"))]), InvalidInputError, "inf"),
    ("attr-target-weight-str", lambda e: _attr(e, targets=[(e.target, "x")]), InvalidInputError, "'x'"),
    ("attr-target-oov", lambda e: _attr(e, targets=[10 ** 6]), InvalidInputError, "1000000"),
    ("attr-target-negative", lambda e: _attr(e, targets=[-1]), InvalidInputError, "-1"),
    ("attr-target-whitespace", lambda e: _attr(e, targets=["   "]), InvalidInputError, "'   '"),
    ("attr-target-two-tokens", lambda e: _attr(e, targets=[" war lasted"]), InvalidInputError, "' war lasted'"),
    # attribute(...): settings
    ("attr-desired-prob-str", lambda e: _attr(e, desired_logit_prob="x"), InvalidInputError, "'x'"),
    ("attr-desired-prob-none", lambda e: _attr(e, desired_logit_prob=None), InvalidInputError, "None"),
    ("attr-desired-prob-nan", lambda e: _attr(e, desired_logit_prob=float("nan")), InvalidInputError, "nan"),
    ("attr-desired-prob-zero", lambda e: _attr(e, desired_logit_prob=0.0), InvalidInputError, "0.0"),
    ("attr-max-n-logits-float", lambda e: _attr(e, max_n_logits=2.5), InvalidInputError, "2.5"),
    ("attr-max-feature-nodes-negative", lambda e: _attr(e, max_feature_nodes=-1), InvalidInputError, "-1"),
    ("attr-max-feature-nodes-nan", lambda e: _attr(e, max_feature_nodes=float("nan")), InvalidInputError, "nan"),
    ("attr-batch-size-zero", lambda e: _attr(e, batch_size=0), InvalidInputError, "batch_size"),
    ("attr-dtype-int", lambda e: _attr(e, dtype=torch.int64), InvalidInputError, "int64"),
    ("attr-dtype-unknown", lambda e: _attr(e, dtype="float99"), InvalidInputError, "float99"),
    ("attr-device-unknown", lambda e: _attr(e, device="gpu7"), InvalidInputError, "gpu7"),
    ("attr-device-cuda-missing", lambda e: _attr(e, device="cuda:7"), InvalidInputError, "cuda:7"),
    ("attr-max-matrix-bytes-str", lambda e: _attr(e, max_matrix_bytes="1G"), InvalidInputError, "'1G'"),
    ("attr-keep-bos-str", lambda e: _attr(e, keep_bos="no"), InvalidInputError, "'no'"),
    ("attr-empty-prompt", lambda e: attribute(e.model, e.ts, ""), InvalidInputError, "after BOS"),
    ("attr-transcoders-none", lambda e: attribute(e.model, None, PROMPT), InvalidInputError, "NoneType"),
    ("attr-transcoders-name", lambda e: attribute(e.model, "tiny-years", PROMPT), InvalidInputError,
     "load_transcoders('tiny-years')"),
    ("attr-context-other-set", lambda e: attribute(e.model, load_transcoders("tiny-years", layers=[0]), e.ctx),
     InvalidInputError, "PromptContext"),
    # attribution graphs
    ("graph-edges-min-abs-nan", lambda e: e.graph.edges(float("nan")), InvalidInputError, "nan"),
    ("graph-edges-min-abs-str", lambda e: e.graph.edges("x"), InvalidInputError, "'x'"),
    ("graph-to-json-folder", lambda e: e.graph.to_json(e.tmp), InvalidInputError, "folder"),
    ("graph-to-json-indent-str", lambda e: e.graph.to_json(indent="x"), InvalidInputError, "'x'"),
    ("graph-to-json-slug-none", lambda e: e.graph.to_json(slug=None), InvalidInputError, "None"),
    ("graph-node-missing", lambda e: e.graph.node_index("nope"), InvalidInputError, "'nope'"),
    ("graph-prune-nan", lambda e: e.graph.prune(float("nan")), InvalidInputError, "nan"),
    # attribution graph files
    ("file-link-weight-missing", lambda e: _graph_with(e, lambda d: d["links"][0].pop("weight")),
     InvalidInputError, "links[0].weight"),
    ("file-ctx-idx-past-prompt", lambda e: _graph_with(e, lambda d: d["nodes"][0].__setitem__("ctx_idx", 10 ** 30)),
     InvalidInputError, "ctx_idx"),
    ("file-n-layers-str", lambda e: _graph_with(e, lambda d: _ours(d).__setitem__("n_layers", "three")),
     InvalidInputError, "n_layers"),
    ("file-constants-str", lambda e: _graph_with(e, lambda d: _ours(d).__setitem__("constants", "abc")),
     InvalidInputError, "constants"),
    ("file-token-ids-str", lambda e: _graph_with(e, lambda d: _ours(d).__setitem__("token_ids", "abc")),
     InvalidInputError, "token_ids"),
    ("file-tc-explore-list", lambda e: _graph_with(e, lambda d: d["metadata"].__setitem__("tc_explore", [1])),
     InvalidInputError, "tc_explore"),
    ("file-tc-weight-str", lambda e: _graph_with(e, lambda d: _first_logit(d).__setitem__("tc_weight", "x")),
     InvalidInputError, "tc_weight"),
    ("file-tc-influence-str", lambda e: _graph_with(e, lambda d: d["nodes"][0].__setitem__("tc_influence", "x")),
     InvalidInputError, "tc_influence"),
    ("file-token-prob-nan", lambda e: _graph_with(e, lambda d: _first_logit(d).__setitem__("token_prob", float("nan"))),
     InvalidInputError, "token_prob"),
    ("file-activation-inf", lambda e: _graph_with(e, lambda d: d["nodes"][0].__setitem__("activation", float("inf"))),
     InvalidInputError, "activation"),
    ("file-tc-pos-str", lambda e: _graph_with(e, lambda d: d["nodes"][0].__setitem__("tc_pos", "3")),
     InvalidInputError, "tc_pos"),
    ("file-tc-kind-unknown", lambda e: _graph_with(e, lambda d: d["nodes"][0].__setitem__("tc_kind", "weird")),
     InvalidInputError, "'weird'"),
    ("file-no-nodes", lambda e: _graph_with(e, lambda d: d.update(nodes=[], links=[])), InvalidInputError,
     "no nodes"),
    ("circuit-file-no-nodes", lambda e: _circuit_with(e, lambda d: d.update(nodes=[], links=[])),
     InvalidInputError, "no nodes"),
    ("file-truncated", lambda e: AttributionGraph.from_json(json.dumps(e.graph_dict)[:5000]), InvalidInputError,
     "not valid JSON"),
    ("file-duplicate-node", lambda e: _graph_with(e, lambda d: d["nodes"].append(dict(d["nodes"][0]))),
     InvalidInputError, "duplicate"),
    # circuit graphs
    ("circuit-tc-layer-str", lambda e: _circuit_with(e, lambda d: d["nodes"][1].__setitem__("tc_layer", "x")),
     InvalidInputError, "tc_layer"),
    ("circuit-tc-index-float", lambda e: _circuit_with(e, lambda d: d["nodes"][1].__setitem__("tc_index", 2.5)),
     InvalidInputError, "tc_index"),
    ("circuit-tc-attribution-str", lambda e: _circuit_with(
        e, lambda d: d["nodes"][1].__setitem__("tc_attribution", "x")), InvalidInputError, "tc_attribution"),
    ("circuit-link-weight-missing", lambda e: _circuit_with(e, lambda d: d["links"][0].pop("weight")),
     InvalidInputError, "weight"),
    ("circuit-to-json-folder", lambda e: CircuitGraph.from_json(e.circuit).to_json(e.tmp), InvalidInputError,
     "folder"),
    ("circuit-incoming-missing", lambda e: CircuitGraph.from_json(e.circuit).incoming("nope"),
     InvalidInputError, "'nope'"),
    ("circuit-from-paths-none", lambda e: CircuitGraph.from_paths(None, e.ctx), InvalidInputError, "NoneType"),
    # interventions
    ("iv-positions-float", lambda e: _iv(e, Intervention(1, 2.5, 3)), InvalidInputError, "2.5"),
    ("iv-positions-float-list", lambda e: _iv(e, Intervention(1, [1.7], 3)), InvalidInputError, "1.7"),
    ("iv-positions-str", lambda e: _iv(e, Intervention(1, "3", 3)), InvalidInputError, "'3'"),
    ("iv-positions-float-tensor", lambda e: _iv(e, Intervention(1, torch.tensor([1.5]), 3)), InvalidInputError,
     "1.5"),
    ("iv-positions-numpy-float", lambda e: _iv(e, Intervention(1, np.float64(2.0), 3)), InvalidInputError, "2.0"),
    ("iv-value-bool", lambda e: _iv(e, Intervention(1, None, 3, True, "scale")), InvalidInputError, "True"),
    ("iv-value-vector", lambda e: _iv(e, Intervention(1, None, 3, torch.tensor([1.0, 2.0]))), InvalidInputError,
     "value"),
    ("iv-feature-float-tensor", lambda e: _iv(e, Intervention(1, None, torch.tensor(3.0))), InvalidInputError,
     "3."),
    ("iv-none", lambda e: intervene(e.model, e.ts, PROMPT, None), InvalidInputError, "NoneType"),
    ("iv-transcoders-none", lambda e: intervene(e.model, None, PROMPT, [Intervention(1, None, 3)]),
     InvalidInputError, "NoneType"),
    ("iv-metric-vector", lambda e: _iv(e, Intervention(1, None, 3), metric=lambda logits: logits[-1]),
     InvalidInputError, "metric"),
    ("iv-metric-nan", lambda e: _iv(e, Intervention(1, None, 3), metric=lambda logits: float("nan")),
     InvalidInputError, "nan"),
    ("iv-top-tokens-position-float", lambda e: _iv(e, Intervention(1, None, 3)).top_tokens(position=1.5),
     InvalidInputError, "1.5"),
    ("iv-hooks-position-past-end", lambda e: ablation_curve(e.model, e.ts, [(1, 3)], _score(e), ks=(1,),
                                                            positions=[99]), InvalidInputError, "99"),
    ("scaling-pairs", lambda e: feature_scaling(e.model, e.ts, PROMPT)([(1, 3)], 0.0), InvalidInputError,
     "(1, 3)"),
    ("scaling-layer-float", lambda e: feature_scaling(e.model, e.ts, PROMPT)([(1.7, 3, None)], 0.0),
     InvalidInputError, "1.7"),
    ("scaling-feature-float", lambda e: feature_scaling(e.model, e.ts, PROMPT)([(1, 3.9, None)], 0.0),
     InvalidInputError, "3.9"),
    ("metric-token-float", lambda e: logit_difference_metric(e.model, 3.5, 1), InvalidInputError, "3.5"),
    # generation
    ("gen-seed-str", lambda e: generate(e.model, e.ts, PROMPT, seed="abc"), InvalidInputError, "'abc'"),
    ("gen-seed-float", lambda e: generate(e.model, e.ts, PROMPT, seed=1.5), InvalidInputError, "1.5"),
    ("gen-seed-negative", lambda e: generate(e.model, e.ts, PROMPT, seed=-1), InvalidInputError, "-1"),
    ("gen-temperature-nan", lambda e: generate(e.model, e.ts, PROMPT, temperature=float("nan")),
     InvalidInputError, "nan"),
    ("gen-top-k-zero", lambda e: generate(e.model, e.ts, PROMPT, temperature=1.0, top_k=0), InvalidInputError,
     "top_k"),
    # decompositions, targets, path searches
    ("decompose-target-none", lambda e: decompose(e.ctx, None), InvalidInputError, "NoneType"),
    ("decompose-target-str", lambda e: decompose(e.ctx, "40"), InvalidInputError, "'40'"),
    ("decompose-context-none", lambda e: decompose(None, e.target), InvalidInputError, "NoneType"),
    ("logit-diff-same-token", lambda e: logit_diff_target(e.ctx, "40", "40"), InvalidInputError, "same token"),
    ("logit-diff-float-id", lambda e: logit_diff_target(e.ctx, 3.7, 1), InvalidInputError, "3.7"),
    ("residual-target-complex", lambda e: residual_target(e.ctx, torch.zeros(64, dtype=torch.complex64), 1),
     InvalidInputError, "complex64"),
    ("paths-exclude-str", lambda e: find_paths(e.ctx, e.target, iterations=1, exclude_kinds="error"),
     InvalidInputError, "'error'"),
    ("paths-exclude-unknown", lambda e: find_paths(e.ctx, e.target, iterations=1, exclude_kinds=("errror",)),
     InvalidInputError, "errror"),
    ("paths-target-none", lambda e: find_paths(e.ctx, None), InvalidInputError, "NoneType"),
    ("paths-top-negative", lambda e: e.paths.top(-1), InvalidInputError, "-1"),
    ("paths-top-float", lambda e: e.paths.top(1.5), InvalidInputError, "1.5"),
    ("contributions-k-float", lambda e: decompose(e.ctx, e.target).contributions(k=1.5), InvalidInputError,
     "1.5"),
    # ablation curves
    ("ranking-float-pairs", lambda e: ranking_from([(1.7, 3.2)]), InvalidInputError, "1.7"),
    ("ranking-k-negative", lambda e: ranking_from([(1, 3), (1, 4)], k=-1), InvalidInputError, "-1"),
    ("ranking-frame-nan", lambda e: ranking_from(pd.DataFrame({"layer": [1, float("nan")], "feature": [3, 4]})),
     InvalidInputError, "nan"),
    ("ranking-frame-fraction", lambda e: ranking_from(pd.DataFrame({"layer": [1.5], "feature": [3]})),
     InvalidInputError, "1.5"),
    ("ranking-str", lambda e: ranking_from("13"), InvalidInputError, "str"),
    ("ranking-none", lambda e: ranking_from(None), InvalidInputError, "NoneType"),
    ("curve-ks-int", lambda e: ablation_curve(e.model, e.ts, [(1, 3)], _score(e), ks=1), InvalidInputError, "1"),
    ("curve-score-nan", lambda e: ablation_curve(e.model, e.ts, [(1, 3)], lambda h: float("nan"), ks=(1,)),
     InvalidInputError, "nan"),
    ("curve-score-str", lambda e: ablation_curve(e.model, e.ts, [(1, 3)], lambda h: "x", ks=(1,)),
     InvalidInputError, "'x'"),
    ("curve-figure-list", lambda e: ablation_curve_figure([1, 2]), InvalidInputError, "list"),
    # prompts, search, replacement, evaluation
    ("run-prompt-transcoders-none", lambda e: run_prompt(e.model, None, PROMPT), InvalidInputError, "NoneType"),
    ("run-prompt-prepend-bos-str", lambda e: run_prompt(e.model, e.ts, PROMPT, prepend_bos="no"),
     InvalidInputError, "'no'"),
    ("top-features-k-zero", lambda e: top_features_per_token(e.model, e.ts, PROMPT, k=0), InvalidInputError, "0"),
    ("search-k-zero", lambda e: search_features(e.model, e.ts, " war", k=0), InvalidInputError, "k"),
    ("search-k-negative", lambda e: search_features(e.model, e.ts, " war", k=-1), InvalidInputError, "-1"),
    ("search-k-float", lambda e: search_features(e.model, e.ts, " war", k=1.5), InvalidInputError, "1.5"),
    ("hooks-keep-float", lambda e: transcoder_hooks(e.model, e.ts, [1], keep_features={1: [2.5]}),
     InvalidInputError, "2.5"),
    ("hooks-keep-other-layer", lambda e: transcoder_hooks(e.model, e.ts, [1], keep_features={2: [3]}),
     InvalidInputError, "[2]"),
    ("hooks-keep-list", lambda e: transcoder_hooks(e.model, e.ts, [1], keep_features=[3]), InvalidInputError,
     "list"),
    ("connections-model-for-set", lambda e: feature_connections(e.model, 1, 0), InvalidInputError,
     "TransformerBridge"),
    ("mean-outputs-list", lambda e: mean_mlp_outputs(e.model, [[1.5, 2.0]]), InvalidInputError, "1.5"),
    ("eval-batch-zero", lambda e: evaluate_transcoders(e.model, e.ts, e.model.to_tokens(PROMPT), batch_size=0),
     InvalidInputError, "batch_size"),
    ("eval-batch-float", lambda e: evaluate_transcoders(e.model, e.ts, e.model.to_tokens(PROMPT), batch_size=1.5),
     InvalidInputError, "1.5"),
    ("eval-empty-list", lambda e: evaluate_transcoders(e.model, e.ts, []), InvalidInputError, "no next-token"),
    ("eval-one-token", lambda e: evaluate_transcoders(e.model, e.ts, [[5]]), InvalidInputError, "no next-token"),
    ("eval-bare-string", lambda e: evaluate_transcoders(e.model, e.ts, PROMPT), InvalidInputError,
     "wrap one text in a list"),
    ("eval-none", lambda e: evaluate_transcoders(e.model, e.ts, None), InvalidInputError, "NoneType"),
    ("eval-transcoders-dict", lambda e: evaluate_transcoders(e.model, {}, [PROMPT]), InvalidInputError, "dict"),
    # loading arguments and transcoder sets
    ("load-device-unknown", lambda e: load_transcoders("tiny-years", device="gpu7"), InvalidInputError, "gpu7"),
    ("load-device-cuda-missing", lambda e: load_transcoders("tiny-years", device="cuda:3"), InvalidInputError,
     "cuda:3"),
    ("load-dtype-int", lambda e: load_transcoders("tiny-years", dtype=torch.int64), InvalidInputError, "int64"),
    ("load-dtype-int-name", lambda e: load_transcoders("tiny-years", dtype="int8"), InvalidInputError, "int8"),
    ("model-device-unknown", lambda e: load_model("tiny-years", device="gpu7"), InvalidInputError, "gpu7"),
    ("model-dtype-int", lambda e: load_model("tiny-years", dtype=torch.int32), InvalidInputError, "int32"),
    ("set-to-dtype-unknown", lambda e: TranscoderSet.from_transcoders([random_transcoder(8, 16, 0)]).to(
        dtype="float99"), InvalidInputError, "float99"),
    ("set-to-device-unknown", lambda e: TranscoderSet.from_transcoders([random_transcoder(8, 16, 0)]).to(
        device="gpu7"), InvalidInputError, "gpu7"),
    ("set-two-for-one-layer", lambda e: TranscoderSet.from_transcoders(
        [random_transcoder(8, 16, 0), random_transcoder(8, 16, 0, seed=1)]), InvalidInputError, "layer 0"),
    ("set-from-nothing", lambda e: TranscoderSet.from_transcoders([]), InvalidInputError, "none"),
    ("set-from-strings", lambda e: TranscoderSet.from_transcoders({0: "x"}), InvalidInputError, "str"),
    ("set-layer-key-str", lambda e: TranscoderSet.from_transcoders({"0": random_transcoder(8, 16, 0)}),
     InvalidInputError, "'0'"),
    ("transcoder-encode-numpy", lambda e: random_transcoder(8, 16, 0).encode(np.zeros((2, 8), np.float32)),
     InvalidInputError, "ndarray"),
    ("transcoder-encode-int", lambda e: random_transcoder(8, 16, 0).encode(torch.zeros(2, 8, dtype=torch.long)),
     InvalidInputError, "int64"),
    ("transcoder-decode-width", lambda e: random_transcoder(8, 16, 0).decode(torch.zeros(2, 15)),
     InvalidInputError, "(2, 15)"),
    ("transcoder-no-features", lambda e: random_transcoder(8, 16, 0).__class__(
        torch.zeros(8, 0), torch.zeros(0), torch.zeros(0, 8)), IncompatibleTranscoderError, "(8, 0)"),
    # nodes, expansion, MLP ablation, greater-than, saving, the graph widget
    ("contribution-of-string", lambda e: decompose(e.ctx, e.target).contribution_of("L1F3"), InvalidInputError,
     "'L1F3'"),
    ("next-target-string", lambda e: next_target(e.ctx, e.target, "x"), InvalidInputError, "'x'"),
    ("expander-branches-zero", lambda e: PathGraphExpander(e.paths, branches=0), InvalidInputError, "branches"),
    ("expander-branches-float", lambda e: PathGraphExpander(e.paths, branches=1.5), InvalidInputError, "1.5"),
    ("mean-ablation-shape", lambda e: run_with_ablated_mlps(e.model, PROMPT, [1], mode="mean",
                                                            means={1: torch.zeros(3)}), InvalidInputError, "(3,)"),
    ("mean-ablation-nan", lambda e: run_with_ablated_mlps(e.model, PROMPT, [1], mode="mean",
                                                          means={1: torch.full((64,), float("nan"))}),
     InvalidInputError, "NaN"),
    ("replaced-run-float-tokens", lambda e: run_with_transcoders(e.model, e.model.to_tokens(PROMPT).float(), e.ts),
     InvalidInputError, "float32"),
    ("replaced-run-oov-tokens", lambda e: run_with_transcoders(e.model, e.model.to_tokens(PROMPT) + 1000, e.ts),
     InvalidInputError, "vocabulary"),
    ("greater-than-year-range", lambda e: gt.prompts_from_pairs([("war", 150)]), InvalidInputError, "150"),
    ("greater-than-year-str", lambda e: gt.prompts_from_pairs([("war", "35")]), InvalidInputError, "'35'"),
    ("greater-than-not-prompts", lambda e: gt.tokenize_prompts(e.model, ["a"]), InvalidInputError, "'a'"),
    ("greater-than-neuron-layer", lambda e: gt.neuron_variance(e.model, gt.make_prompts(3), 9), InvalidInputError,
     "9"),
    ("save-set-into-file", lambda e: save_transcoder_set({0: random_transcoder(64, 16, 0)}, _a_file(e), "x", "tiny"),
     InvalidInputError, "a_file.txt"),
    ("save-set-strings", lambda e: save_transcoder_set({0: "x"}, e.tmp / "save_strings", "x", "tiny"),
     InvalidInputError, "str"),
    ("save-set-name-none", lambda e: save_transcoder_set({0: random_transcoder(64, 16, 0)}, e.tmp / "save_none",
                                                         None, "tiny"), InvalidInputError, "None"),
    ("widget-prune-str", lambda e: circuit_graph_widget(e.paths).prune("x"), InvalidInputError, "'x'"),
    ("widget-prune-negative", lambda e: circuit_graph_widget(e.paths).prune(-1), InvalidInputError, "-1"),
    ("widget-select-int", lambda e: circuit_graph_widget(e.paths).select(5), InvalidInputError, "int"),
    ("widget-scale-str", lambda e: (lambda w: w.set_intervention([w.node_ids[0]], "x"))(
        circuit_graph_widget(e.paths)), InvalidInputError, "'x'"),
    ("widget-scale-node-str", lambda e: circuit_graph_widget(e.paths).set_intervention("nope", 0.0),
     InvalidInputError, "nope"),
    ("merge-one-string", lambda e: FeatureIndex.merge("abc", e.tmp / "merged"), InvalidInputError, "'abc'"),
    ("merge-none", lambda e: FeatureIndex.merge(None, e.tmp / "merged"), InvalidInputError, "NoneType"),
    ("tokens-html-lengths", lambda e: tokens_html(["a", "b"], [1.0], 1.0), InvalidInputError, "2 tokens"),
    ("tokens-html-nan", lambda e: tokens_html(["a", "b", "c"], [1.0, float("nan"), float("inf")], 1.0),
     NonFiniteError, "1 NaN and 1 infinite values, the first at token 1 ('b')"),
    ("context-prepend-bos-str", lambda e: prompt_context(e.model, e.ts, PROMPT, prepend_bos="no"),
     InvalidInputError, "'no'"),
    ("iv-constrained-str", lambda e: _iv(e, Intervention(1, None, 3), constrained="yes"), InvalidInputError,
     "'yes'"),
    ("iv-freeze-values-int", lambda e: _iv(e, Intervention(1, None, 3), freeze_values=2), InvalidInputError, "2"),
    ("gen-stop-at-eos-str", lambda e: generate(e.model, e.ts, PROMPT, max_new_tokens=1, stop_at_eos="no"),
     InvalidInputError, "'no'"),
    ("decoder-rows-range", lambda e: e.ts.decoder_rows(1, [9999]), InvalidInputError, "9999"),
    ("decoder-rows-float", lambda e: e.ts.decoder_rows(1, [2.5]), InvalidInputError, "2.5"),
    ("decoder-rows-float-tensor", lambda e: e.ts.decoder_rows(1, torch.tensor([1.5])), InvalidInputError, "1.5"),
    ("decoder-rows-negative-array", lambda e: e.ts.decoder_rows(1, np.array([-1])), InvalidInputError, "-1"),
    ("launch-world-size-junk", lambda e: _launch_with({"WORLD_SIZE": "abc"}), InvalidInputError, "'abc'"),
    ("launch-rank-outside", lambda e: _launch_with({"WORLD_SIZE": "2", "RANK": "5"}), InvalidInputError, "RANK=5"),
]


def _launch_with(env):
    import os
    from unittest import mock
    from tc_explore.distributed import Launch
    with mock.patch.dict(os.environ, env):
        return Launch.from_env()


def _a_file(e):
    path = e.tmp / "a_file.txt"
    path.write_text("not a folder")
    return path


# -- files, indexes, dashboards, corpora, training, the explorer and the command line -------------
INDEX = dict(k=3, n_samples=3, batch_size=4, window=(2, 1), features_per_group=128)


@pytest.fixture(scope="module")
def built(env):
    """A small index of the demo model, and a folder for files written per case."""
    sentences = SyntheticSentences(0)
    corpus = Corpus.from_texts([sentences.sentence() for _ in range(120)], env.model, 16)
    index = FeatureIndex.build(env.model, env.ts, corpus, 16 * 16, env.tmp / "index", **INDEX)
    views = WeightViews.build(env.model, env.ts, env.tmp / "views", k=3, n_heads=2)
    return types.SimpleNamespace(index=index, corpus=corpus, views=views, tmp=env.tmp)


def _build(e, b, out, **kw):
    corpus = kw.pop("corpus", b.corpus)
    return FeatureIndex.build(e.model, e.ts, corpus, kw.pop("n_tokens", 16 * 8), b.tmp / out, **{**INDEX, **kw})


def _circuit_tracer_set(b, name, cfg=None, tensors=None):
    """A circuit-tracer style folder: config.yaml + layer_0.safetensors (d_model 64, 32 features)."""
    folder = b.tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny", "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": ["layer_0.safetensors"], **(cfg or {})}))
    weights = {"W_enc": torch.randn(32, 64), "W_dec": torch.randn(32, 64), "b_enc": torch.zeros(32),
               "b_dec": torch.zeros(64), **(tensors or {})}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "layer_0.safetensors"))
    return folder


def _clt(b, name, replace=None, cfg=None):
    """A 3-layer cross-layer transcoder folder for the demo model, ``replace``
    = {file name: tensors} written over the good files."""
    folder = b.tmp / name
    write_clt(folder, **random_clt(64, 20, 3))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg or {
        "model_name": "tiny", "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out"}))
    for fname, tensors in (replace or {}).items():
        save_file(tensors, str(folder / fname))
    return folder


def _npz(b, name, **changes):
    arrays = dict(W_enc=np.zeros((64, 32), np.float32), W_dec=np.zeros((32, 64), np.float32),
                  b_enc=np.zeros(32, np.float32), b_dec=np.zeros(64, np.float32), threshold=np.zeros(32, np.float32))
    np.savez(b.tmp / name, **{**arrays, **changes})
    return b.tmp / name


def _cli(*argv):
    from tc_explore.cli import main
    return main(list(argv))


def _cli_error(capsys, *argv):
    """Run the command line; an error of ours is reported (exit 2, stderr), never a traceback."""
    rc = _cli(*argv)
    err = capsys.readouterr().err
    if rc == 2 and err.startswith("tc-explore: error: "):
        raise TcExploreError(err)
    raise AssertionError(f"exit {rc}: {err}")


def _manifest_folder(b, name, text):
    folder = b.tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(text)
    return folder


def _train(e, b, tokens=None, **cfg):
    config = TrainingConfig(n_steps=2, batch_size=16, buffer_batches=2, model_batch_size=2,
                            **{"layers": [0], "d_sae": 16, **cfg})
    return train_transcoders(e.model, b.corpus.take(4) if tokens is None else tokens, config)


BUILT_CASES = [
    # loading: layers, names, config.yaml
    ("load-layers-bool", lambda e, b: load_transcoders("tiny-years", layers=[True]), InvalidInputError, "True"),
    ("load-layers-float", lambda e, b: load_transcoders("tiny-years", layers=[1.0]), InvalidInputError, "1.0"),
    ("load-layers-empty", lambda e, b: load_transcoders("tiny-years", layers=[]), InvalidInputError, "empty"),
    ("load-layers-str", lambda e, b: load_transcoders("tiny-years", layers="1"), InvalidInputError, "'1'"),
    ("config-hook-int", lambda e, b: load_transcoders(_circuit_tracer_set(b, "hook_int", {"feature_input_hook": 5})),
     IncompatibleTranscoderError, "feature_input_hook"),
    ("safetensors-bare-threshold", lambda e, b: run_prompt(e.model, load_transcoders(_circuit_tracer_set(
        b, "bare_threshold", tensors={"threshold": torch.ones(32)})), "a b"), IncompatibleTranscoderError,
     "activation_function.threshold"),
    ("safetensors-unknown-key", lambda e, b: run_prompt(e.model, load_transcoders(_circuit_tracer_set(
        b, "unknown_key", tensors={"W_gate": torch.ones(32, 64)})), "a b"), IncompatibleTranscoderError,
     "W_gate"),
    ("views-lock-folder-unmakeable", lambda e, b: WeightViews.build(e.model, e.ts, "/proc/no_such/views", k=3),
     StorageError, "/proc/no_such"),
    ("config-hook-unknown", lambda e, b: run_prompt(e.model, load_transcoders(_circuit_tracer_set(
        b, "hook_unknown", {"feature_input_hook": "hook_nonsense"})), "a b"), IncompatibleTranscoderError,
     "blocks.0.hook_nonsense"),
    ("clt-hook-int", lambda e, b: load_transcoders(_clt(b, "clt_hook", cfg={
        "model_kind": "cross_layer_transcoder", "feature_input_hook": 3, "feature_output_hook": "hook_mlp_out"})),
     IncompatibleTranscoderError, "feature_input_hook"),
    # cross-layer decoders of the wrong shape
    ("clt-decoder-targets", lambda e, b: run_prompt(e.model, load_transcoders(_clt(
        b, "clt_targets", {"W_dec_0.safetensors": {"W_dec_0": torch.zeros(20, 2, 64)}})), "a b"),
     IncompatibleTranscoderError, "W_dec_0"),
    ("clt-decoder-2d", lambda e, b: run_prompt(e.model, load_transcoders(_clt(
        b, "clt_2d", {"W_dec_2.safetensors": {"W_dec_2": torch.zeros(20, 64)}})), "a b"),
     IncompatibleTranscoderError, "W_dec_2"),
    ("clt-decoder-key", lambda e, b: run_prompt(e.model, load_transcoders(_clt(
        b, "clt_key", {"W_dec_1.safetensors": {"other": torch.zeros(20, 2, 64)}})), "a b"),
     IncompatibleTranscoderError, "W_dec_1"),
    ("clt-decoder-d-sae", lambda e, b: run_prompt(e.model, load_transcoders(_clt(
        b, "clt_dsae", {"W_dec_1.safetensors": {"W_dec_1": torch.zeros(19, 2, 64)}})), "a b"),
     IncompatibleTranscoderError, "W_dec_1"),
    # files that are not there
    ("npz-missing", lambda e, b: read_gemma_scope_npz(b.tmp / "nothere.npz"), InvalidInputError, "nothere.npz"),
    ("pt-missing", lambda e, b: read_gpt2_transcoder(b.tmp / "nothere.pt"), InvalidInputError, "nothere.pt"),
    ("pt-folder", lambda e, b: read_gpt2_transcoder(b.tmp), InvalidInputError, "folder"),
    ("safetensors-missing", lambda e, b: read_circuit_tracer_safetensors(b.tmp / "nothere.safetensors"),
     InvalidInputError, "nothere.safetensors"),
    ("config-missing", lambda e, b: read_circuit_tracer_config(b.tmp / "nothere.yaml"), InvalidInputError,
     "nothere.yaml"),
    # weights stored as integers, bools or complex numbers are not cast
    ("safetensors-int-weights", lambda e, b: load_transcoders(_circuit_tracer_set(
        b, "int_weights", tensors={"W_enc": torch.zeros(32, 64, dtype=torch.int32)}))[0], IncompatibleTranscoderError,
     "torch.int32"),
    ("safetensors-bool-bias", lambda e, b: load_transcoders(_circuit_tracer_set(
        b, "bool_bias", tensors={"b_enc": torch.zeros(32, dtype=torch.bool)}))[0], IncompatibleTranscoderError,
     "torch.bool"),
    ("npz-complex-weights", lambda e, b: read_gemma_scope_npz(_npz(b, "complex.npz", W_dec=np.zeros((32, 64), np.complex64))),
     IncompatibleTranscoderError, "complex64"),
    ("npz-int-weights", lambda e, b: read_gemma_scope_npz(_npz(b, "int.npz", W_enc=np.zeros((64, 32), np.int64))),
     IncompatibleTranscoderError, "int64"),
    ("clt-encoder-int", lambda e, b: run_prompt(e.model, load_transcoders(_clt(b, "clt_int", {"W_enc_0.safetensors": {
        "W_enc_0": torch.zeros(20, 64, dtype=torch.int32), "b_enc_0": torch.zeros(20), "b_dec_0": torch.zeros(64)}})),
        "a b"), IncompatibleTranscoderError, "W_enc_0"),
    ("clt-decoder-int", lambda e, b: run_prompt(e.model, load_transcoders(_clt(b, "clt_dec_int", {
        "W_dec_1.safetensors": {"W_dec_1": torch.zeros(20, 2, 64, dtype=torch.int64)}})), "a b"),
     IncompatibleTranscoderError, "W_dec_1.safetensors: weight W_dec_1 is stored as torch.int64"),
    # switches given as strings: "no" is truthy
    ("build-overwrite-str", lambda e, b: _build(e, b, "overwrite_str", overwrite="no"), InvalidInputError, "'no'"),
    ("build-progress-str", lambda e, b: _build(e, b, "progress_str", progress="off"), InvalidInputError, "'off'"),
    ("merge-overwrite-str", lambda e, b: FeatureIndex.merge([b.index.directory], b.tmp / "merge_str", overwrite="no"),
     InvalidInputError, "'no'"),
    ("views-overwrite-str", lambda e, b: WeightViews.build(e.model, e.ts, b.tmp / "views", k=3, overwrite="no"),
     InvalidInputError, "'no'"),
    # index reading
    ("index-bands-float", lambda e, b: b.index.interval_samples(1, 3, n_bands=2.5), InvalidInputError, "2.5"),
    ("index-bands-none", lambda e, b: b.index.interval_samples(1, 3, n_bands=None), InvalidInputError, "None"),
    ("index-per-band-negative", lambda e, b: b.index.interval_samples(1, 3, per_band=-1), InvalidInputError,
     "-1"),
    ("index-sequence-float", lambda e, b: b.index.sequence_tokens(2.5), InvalidInputError, "2.5"),
    ("index-sequence-bool", lambda e, b: b.index.sequence_tokens(True), InvalidInputError, "True"),
    ("index-sequence-str", lambda e, b: b.index.sequence_tokens("2"), InvalidInputError, "'2'"),
    ("index-by-token-float", lambda e, b: b.index.features_by_token(1, 3.5), InvalidInputError, "3.5"),
    ("index-by-token-negative", lambda e, b: b.index.features_by_token(1, -5), InvalidInputError, "-5"),
    ("index-by-token-limit", lambda e, b: b.index.features_by_token(1, 5, limit=-1), InvalidInputError, "-1"),
    ("index-by-token-str", lambda e, b: b.index.features_by_token(1, " war"), InvalidInputError, "' war'"),
    ("index-feature-float-tensor", lambda e, b: b.index.top_examples(1, torch.tensor(3.0)), InvalidInputError,
     "tensor(3.)"),
    ("index-feature-numpy-float", lambda e, b: b.index.top_examples(1, np.float32(3)), InvalidInputError, "3.0"),
    ("index-layer-bool", lambda e, b: b.index.top_examples(True, 3), InvalidInputError, "True"),
    ("index-open-none", lambda e, b: FeatureIndex(None), InvalidInputError, "NoneType"),
    ("index-open-int", lambda e, b: FeatureIndex(5), InvalidInputError, "int"),
    # index building
    ("build-k-huge", lambda e, b: _build(e, b, "k_huge", k=10 ** 9), InvalidInputError, "1000000000"),
    ("build-seed-str", lambda e, b: _build(e, b, "seed_str", seed="x"), InvalidInputError, "'x'"),
    ("build-out-file", lambda e, b: _build(e, b, "index/manifest.json"), InvalidInputError, "manifest.json"),
    ("build-out-none", lambda e, b: FeatureIndex.build(e.model, e.ts, b.corpus, 128, None, **INDEX),
     InvalidInputError, "NoneType"),
    ("build-transcoders-none", lambda e, b: FeatureIndex.build(e.model, None, b.corpus, 128, b.tmp / "tn", **INDEX),
     InvalidInputError, "NoneType"),
    # dashboards and search
    ("build-shard-float", lambda e, b: _build(e, b, "shard_float", shard=(0.0, 2.0)), InvalidInputError, "0.0"),
    ("dash-k-zero", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, e.ts, k=0), InvalidInputError, "k"),
    ("dash-k-float", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, e.ts, k=2.5), InvalidInputError, "2.5"),
    ("dash-bands-zero", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, e.ts, n_bands=0),
     InvalidInputError, "n_bands"),
    ("dash-per-band-negative", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, e.ts, per_band=-1),
     InvalidInputError, "-1"),
    ("dash-heads-zero", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, e.ts, n_heads=0),
     InvalidInputError, "n_heads"),
    ("dash-model-name", lambda e, b: feature_dashboard(b.index, 1, 3, "gpt2", e.ts), InvalidInputError, "str"),
    ("dash-transcoders-name", lambda e, b: feature_dashboard(b.index, 1, 3, e.model, "tiny-years"),
     InvalidInputError, "load_transcoders('tiny-years')"),
    ("dash-index-path", lambda e, b: feature_dashboard(str(b.index.directory), 1, 3, e.model, e.ts),
     InvalidInputError, "FeatureIndex.load"),
    ("dash-export-folder", lambda e, b: export_html(feature_dashboard(b.index, 1, 3, e.model, e.ts), b.tmp),
     InvalidInputError, "folder"),
    ("dash-export-unwritable", lambda e, b: export_html(feature_dashboard(b.index, 1, 3, e.model, e.ts),
                                                        "/proc/nope/x.html"), StorageError, "/proc/nope"),
    ("views-numpy-k-built", lambda e, b: WeightViews.build(e.model, e.ts, b.tmp / "views_np", k=np.int64(2),
                                                            n_heads=1).logit_effects(e.model, 1, 3, k=3),
     InvalidInputError, "k=3"),
    ("train-checkpoint-file", lambda e, b: train_transcoders(e.model, b.corpus.take(4), TrainingConfig(
        n_steps=2, batch_size=16, buffer_batches=2, model_batch_size=2, layers=[0], d_sae=16, checkpoint_every=1),
        checkpoint_dir=b.index.directory / "manifest.json"), InvalidInputError, "manifest.json"),
    ("dash-export-not-dashboards", lambda e, b: export_html([1, 2], b.tmp / "d.html"), InvalidInputError, "int"),
    ("dash-html-not-dashboard", lambda e, b: dashboard_html(5), InvalidInputError, "int"),
    ("search-index-path", lambda e, b: search_features(e.model, e.ts, " war", by="examples",
                                                       index=str(b.index.directory)), InvalidInputError, "str"),
    # weight views
    ("views-k-float", lambda e, b: WeightViews.build(e.model, e.ts, b.tmp / "wv_float", k=1.5),
     InvalidInputError, "1.5"),
    ("views-k-beyond-stored", lambda e, b: b.views.logit_effects(e.model, 1, 3, k=99), InvalidInputError, "99"),
    ("views-k-negative", lambda e, b: b.views.connections(1, 3, k=-1), InvalidInputError, "-1"),
    ("views-heads-beyond-stored", lambda e, b: b.views.ov_de_embeddings(e.model, 1, 3, n_heads=5),
     InvalidInputError, "n_heads=5"),
    # corpora
    ("corpus-one-string", lambda e, b: Corpus.from_texts("hello world", e.model, 8), InvalidInputError,
     "'hello world'"),
    ("corpus-seq-len-float", lambda e, b: Corpus.from_texts(["a b"], e.model, 8.5), InvalidInputError, "8.5"),
    ("corpus-take-zero", lambda e, b: b.corpus.take(0), InvalidInputError, "n_sequences"),
    ("corpus-take-float", lambda e, b: b.corpus.take(1.5), InvalidInputError, "1.5"),
    ("corpus-take-start-negative", lambda e, b: b.corpus.take(1, start=-1), InvalidInputError, "-1"),
    ("corpus-batches-zero", lambda e, b: next(b.corpus.batches(0, 2)), InvalidInputError, "batch_size"),
    ("corpus-seed-str", lambda e, b: Corpus.from_texts(["a b"] * 3, e.model, 8, seed="x"), InvalidInputError,
     "'x'"),
    ("corpus-dataset-list", lambda e, b: Corpus.from_dataset([{"text": "a"}], e.model, 8), InvalidInputError,
     "list"),
    # training
    ("train-config-dict", lambda e, b: train_transcoders(e.model, b.corpus.take(4), {"n_steps": 2}),
     InvalidInputError, "dict"),
    ("train-d-sae-bool", lambda e, b: _train(e, b, d_sae=True), InvalidInputError, "True"),
    ("train-lr-str", lambda e, b: _train(e, b, lr="x"), InvalidInputError, "'x'"),
    ("train-warmup-float", lambda e, b: _train(e, b, warmup_steps=1.5), InvalidInputError, "1.5"),
    ("train-warmup-nan", lambda e, b: _train(e, b, warmup_steps=float("nan")), InvalidInputError, "nan"),
    ("train-betas", lambda e, b: _train(e, b, adam_betas=(1.5, 0.9)), InvalidInputError, "adam_betas"),
    ("train-betas-short", lambda e, b: _train(e, b, adam_betas=(0.9,)), InvalidInputError, "(0.9,)"),
    ("train-resample-scale-nan", lambda e, b: _train(e, b, resample_scale=float("nan")), InvalidInputError, "nan"),
    ("train-resample-until", lambda e, b: _train(e, b, resample_until=2.0), InvalidInputError, "2.0"),
    ("train-seed-str", lambda e, b: _train(e, b, seed="x"), InvalidInputError, "'x'"),
    ("train-hook-int", lambda e, b: _train(e, b, input_hook=5), InvalidInputError, "5"),
    ("train-hook-unknown", lambda e, b: _train(e, b, input_hook="blocks.{L}.hook_nothing"), InvalidInputError,
     "blocks.0.hook_nothing"),
    ("train-tokens-oov", lambda e, b: _train(e, b, tokens=b.corpus.take(4) + 10_000), InvalidInputError,
     "vocabulary"),
    ("train-tokens-float", lambda e, b: _train(e, b, tokens=[b.corpus.take(4).float()]), InvalidInputError,
     "float32"),
    ("train-tokens-str", lambda e, b: _train(e, b, tokens="hello"), InvalidInputError, "'hello'"),
    ("train-tokens-empty", lambda e, b: _train(e, b, tokens=b.corpus.take(4)[:0]), InvalidInputError, "empty"),
    # the explorer's Python side
    ("explore-option", lambda e, b: explore(b.index, e.model, e.ts, colour="red"), InvalidInputError, "colour"),
    ("explore-step-str", lambda e, b: explore(b.index, e.model, e.ts).step("1"), InvalidInputError, "'1'"),
    ("explore-top-k", lambda e, b: explore(b.index, e.model, e.ts, top_k=0), InvalidInputError, "top_k"),
    # the command line
    ("cli-info-broken-manifest", lambda e, b: _cli_error(b.capsys, "index", "info", str(_manifest_folder(
        b, "broken_manifest", "{not json"))), TcExploreError, "manifest.json"),
    ("cli-info-list-manifest", lambda e, b: _cli_error(b.capsys, "index", "info", str(_manifest_folder(
        b, "list_manifest", "[1]"))), TcExploreError, "list"),
    ("cli-info-json-broken", lambda e, b: _cli_error(b.capsys, "index", "info", "--json", str(_manifest_folder(
        b, "broken_manifest_json", "{not json"))), TcExploreError, "manifest.json"),
]


@pytest.mark.parametrize("call,error,names", [pytest.param(c, err, n, id=i) for i, c, err, n in BUILT_CASES])
def test_bad_input_with_files_raises_our_error(env, built, capsys, call, error, names):
    built.capsys = capsys
    assert_our_error(lambda: call(env, built), error, names)


def test_overwrite_given_as_a_string_deletes_nothing(env, built):
    """``overwrite="no"`` is truthy: it must be refused, and the index it names kept whole."""
    before = sorted(p.relative_to(built.index.directory) for p in built.index.directory.rglob("*"))
    with pytest.raises(InvalidInputError, match="overwrite"):
        FeatureIndex.build(env.model, env.ts, built.corpus, 16 * 16, built.index.directory,
                           **{**INDEX, "k": 4}, overwrite="no")
    after = sorted(p.relative_to(built.index.directory) for p in built.index.directory.rglob("*"))
    assert before == after
    assert FeatureIndex(built.index.directory).k == 3


def test_token_budget_of_part_sequences_is_rounded_down_with_a_warning(env, built):
    """An index holds whole sequences: a budget that isn't a multiple of the
    sequence length says what it indexes instead of rounding down silently."""
    with pytest.warns(UserWarning, match=r"n_tokens=131 is not a whole number of 16-token sequences: "
                                         r"indexing 128 tokens"):
        index = _build(env, built, "rounded", n_tokens=16 * 8 + 3)
    assert index.manifest.n_tokens == 128


def test_numpy_shard_builds_like_python_ints(env, built):
    a = _build(env, built, "shard_numpy", shard=(np.int64(0), np.int64(2)))
    b = _build(env, built, "shard_python", shard=(0, 2))
    assert a.manifest.shard == b.manifest.shard == [0, 2]
    assert (a.tokens() == b.tokens()).all()


def test_cli_info_of_a_half_written_manifest(built, capsys):
    """A manifest with only some fields (a build that died early) is described, not a traceback."""
    folder = _manifest_folder(built, "partial_manifest", json.dumps({"complete": False}))
    assert _cli("index", "info", str(folder)) == 0
    assert "tokens       ? (? sequences" in capsys.readouterr().out


def test_cli_huge_token_count_is_refused(capsys):
    from tc_explore.cli import main
    with pytest.raises(SystemExit):
        main(["index", "build", "--model", "tiny-years", "--transcoders", "tiny-years", "--text-files", "x.txt",
              "--tokens", "99999999999999999999G", "--out", "x"])
    assert "too large" in capsys.readouterr().err


@pytest.mark.parametrize("call,error,names", [pytest.param(c, err, n, id=i) for i, c, err, n in CASES])
def test_bad_input_raises_our_error(env, call, error, names):
    assert_our_error(lambda: call(env), error, names)


# (id, call, check of the result): inputs that are fine and must keep working
ACCEPTED = [
    ("attr-target-numpy-int", lambda e: _attr(e, targets=[np.int64(5)]),
     lambda g: g.metadata["targets"][0]["index"] == 5),
    ("attr-target-int-tensor", lambda e: _attr(e, targets=[torch.tensor(5)]),
     lambda g: g.metadata["targets"][0]["index"] == 5),
    ("attr-numpy-counts", lambda e: _attr(e, max_n_logits=np.int64(2), max_feature_nodes=np.int64(5),
                                          batch_size=np.int32(4)),
     lambda g: int((g.nodes["kind"] == "feature").sum()) == 5),
    ("attr-dtype-name", lambda e: _attr(e, max_n_logits=1, dtype="float64"), lambda g: g.adjacency.dtype == torch.float64),
    ("generate-numpy-count", lambda e: generate(e.model, e.ts, PROMPT, max_new_tokens=np.int64(2),
                                               temperature=np.float64(0.0)),
     lambda g: len(g.new_tokens) == 2),
    ("paths-numpy-iterations", lambda e: find_paths(e.ctx, e.target, iterations=np.int64(1), branches=np.int8(2)),
     lambda r: len(r.paths) == 2),
    ("top-features-numpy-k", lambda e: top_features_per_token(e.model, e.ts, PROMPT, k=np.int64(2)),
     lambda df: len(df) > 0),
    ("run-prompt-numpy-layer", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=np.int64(1)),
     lambda acts: acts.layers == [1]),
    ("run-prompt-duplicate-layers", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=[1, 1]),
     lambda acts: acts.layers == [1]),
    ("search-numpy-layer", lambda e: search_features(e.model, e.ts, " war", layers=np.int64(1), k=np.int64(3)),
     lambda df: list(df.layer) == [1, 1, 1]),
    ("curve-numpy-k", lambda e: ablation_curve(e.model, e.ts, [(1, 3)], _score(e), ks=(np.int64(1),)),
     lambda df: list(df.k) == [1]),
    ("ranking-float-frame", lambda e: ranking_from(pd.DataFrame({"layer": [1.0, None], "feature": [3, 4]}).iloc[:1]),
     lambda r: r == [(1, 3)]),
    ("decoder-rows-numpy", lambda e: e.ts.decoder_rows(1, np.array([3, 4])), lambda r: r.shape == (2, 1, 64)),
    ("circuit-graph-reads-attribution-file", lambda e: CircuitGraph.from_json(e.graph.prune(0.5, 0.5).to_dict()),
     lambda g: {n.node.kind for n in g.nodes.values()} >= {"feature", "embed", "logit"}),
    ("iv-positions-numpy", lambda e: _iv(e, Intervention(np.int64(1), np.array([1, 2]), np.int32(3))),
     lambda r: r.interventions[0].feature == 3 and type(r.interventions[0].feature) is int),
]


@pytest.mark.parametrize("call,check", [pytest.param(c, ok, id=i) for i, c, ok in ACCEPTED])
def test_good_input_is_accepted(env, call, check):
    assert check(call(env))


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES] + [c[0] for c in BUILT_CASES] + [c[0] for c in ACCEPTED]
    assert len(ids) == len(set(ids))
