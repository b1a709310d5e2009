"""Writes the three notebooks of this directory (outputs empty).

    python notebooks/make_notebooks.py

Edit the cells here, not in the .ipynb files, and re-run. Every notebook
runs on GPT-2 small with the ``gpt2-small`` transcoders by default, and on the
demo model ``tiny-years`` (offline, CPU, about a minute) with
``TC_EXPLORE_DEMO=1``. ``scripts/run_notebooks.py`` executes them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

DEMO_NOTE = """
**Which model.** By default this notebook loads GPT-2 small (`gpt2`) and the paper's
transcoders (`gpt2-small`, from the Hugging Face Hub — the first run downloads them).
Set the environment variable `TC_EXPLORE_DEMO=1` before starting Jupyter to run it instead
on the demo model `tiny-years` that ships with tc_explore: a 3-layer GPT-2-architecture
model trained on synthetic sentences, with its own transcoders. The demo runs offline on a
CPU in about a minute. Every number and figure below is computed by the run you are looking
at; none is written into the text, apart from the paper's published GPT-2 numbers, cited as
such.
"""

SETUP = """import os
import torch
import tc_explore as tcx
from tc_explore.ui.figures import use_offline_plotly

use_offline_plotly()   # figures also as self-contained HTML, so exported notebooks show them

DEMO = os.environ.get("TC_EXPLORE_DEMO", "0") == "1"
MODEL_NAME = "tiny-years" if DEMO else "gpt2"
TRANSCODER_SET = "tiny-years" if DEMO else "gpt2-small"
DEVICE = "cpu" if DEMO else ("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)

model = tcx.load_model(MODEL_NAME, device=DEVICE)
transcoders = tcx.load_transcoders(TRANSCODER_SET, device=DEVICE)
N_LAYERS = int(model.cfg.n_layers)
print(f"model {MODEL_NAME!r}: {N_LAYERS} layers, d_model {model.cfg.d_model}")
print(transcoders)"""

CORPUS = """# Text to evaluate on and to index: the demo's own held-out corpus, or OpenWebText for GPT-2.
if DEMO:
    from tc_explore.demo import SyntheticSentences
    corpus_tokens = SyntheticSentences(seed=1000).windows(model.tokenizer, 48, int(model.cfg.n_ctx))
else:
    from tc_explore.corpus import Corpus
    # The first 2000 OpenWebText documents, downloaded once and then read from the cache.
    corpus_tokens = Corpus.from_hub("Skylion007/openwebtext", model, seq_len=128,
                                    n_documents=2000).take(256)
print("corpus:", tuple(corpus_tokens.shape), "(sequences, tokens)")"""


def walkthrough():
    cells = [
        new_markdown_cell("# tc_explore walkthrough\n\nLoad a model and its transcoders, look at "
                          "which transcoder features fire on a prompt, open one feature's dashboard, "
                          "replace the MLPs by their transcoders and measure what that costs, and "
                          "trace a first circuit.\n" + DEMO_NOTE),
        new_code_cell(SETUP),
        new_markdown_cell("## Feature activations, token by token\n\n`run_prompt` runs the model "
                          "once, encodes every layer's MLP input with its transcoder, and keeps the "
                          "activations. The table lists, for each token of the prompt, the features "
                          "with the largest activations (layer, feature index, activation)."),
        new_code_cell('PROMPT = "The war lasted from 1735 to 17"\n'
                      "from tc_explore.prompt_features import run_prompt\n\n"
                      "acts = run_prompt(model, transcoders, PROMPT)\n"
                      "top = acts.top_features(k=3)\n"
                      "top"),
        new_markdown_cell("Pick the most active feature at the last token (where the model predicts "
                          "the end year) and show its activation on every token of the prompt."),
        new_code_cell("last = top[top.position == top.position.max()].iloc[0]\n"
                      "LAYER, FEATURE = int(last.layer), int(last.feature)\n"
                      "print(f'layer {LAYER}, feature {FEATURE}')\n"
                      "acts.feature(LAYER, FEATURE)"),
        new_markdown_cell("## A feature dashboard\n\nA dashboard needs a `FeatureIndex`: one pass "
                          "over a corpus that records each feature's top activating examples, a "
                          "sample of its activations at every quantile and its activation "
                          "histogram. The weight-based sections (boosted and suppressed logits, "
                          "de-embeddings, connections to other features) come from the weights "
                          "alone. Below, a small index is built on the corpus and the dashboard of "
                          "the feature chosen above is shown."),
        new_code_cell(CORPUS),
        new_code_cell("import tempfile\n"
                      "from IPython.display import HTML\n"
                      "from tc_explore.index import FeatureIndex\n"
                      "from tc_explore.dashboard import dashboard_html, feature_dashboard, widget_css\n\n"
                      "index_dir = os.path.join(tempfile.mkdtemp(prefix='tcx_index_'), 'index')\n"
                      "index = FeatureIndex.build(model, transcoders, corpus_tokens, "
                      "n_tokens=corpus_tokens.numel(), out_dir=index_dir, k=10)\n"
                      "dash = feature_dashboard(index, LAYER, FEATURE, model=model, transcoders=transcoders)\n"
                      "HTML(f'<style>{widget_css()}</style>' + dashboard_html(dash))"),
        new_markdown_cell("## Replacing the MLPs by transcoders\n\n`evaluate_transcoders` "
                          "replaces each layer's MLP by its transcoder (one at a time, and all at "
                          "once in the row `all`) and reports the next-token cross-entropy of the "
                          "original model (`ce_clean`), with the transcoder (`ce_replaced`) and with "
                          "the MLP zero-ablated (`ce_zero_ablated`), the fraction of the loss "
                          "recovered, the KL divergence from the original model's predictions, the "
                          "mean number of active features per token (`l0`) and the fraction of "
                          "the MLP output's variance left unexplained (`fvu`)."),
        new_code_cell("metrics = tcx.evaluate_transcoders(model, transcoders, corpus_tokens[:16])\n"
                      "metrics[['ce_clean', 'ce_replaced', 'ce_zero_ablated', 'ce_recovered', 'kl', 'l0', 'fvu']]"),
        new_markdown_cell("## A first circuit trace\n\nThe target is the logit difference between "
                          "the year tokens after the start year and those up to it, at the last "
                          "token. With LayerNorm scales and attention patterns frozen at their "
                          "values on this prompt, the target is an exact sum of contributions "
                          "(features, attention heads, embeddings, transcoder errors, biases). The "
                          "first table sums them by kind; their total equals the target's value. "
                          "The kinds:\n\n"
                          "- `feature`: a transcoder feature, activation × connection (its decoder "
                          "row read along the target direction);\n"
                          "- `head`: an attention head, for one (destination, source) pair of "
                          "tokens, attention weight × the source's value vector read through W_O;\n"
                          "- `embed` / `pos_embed`: the token and the position embedding;\n"
                          "- `error`: a transcoder's error, the true MLP output minus the "
                          "transcoder's output (what the transcoder misses);\n"
                          "- `attn_bias`: an attention layer's output bias b_O; `dec_bias`: a "
                          "transcoder's output bias;\n"
                          "- `offset`: the constant of the quantity traced, which no upstream "
                          "node writes (for logits, the unembedding bias; for a feature's "
                          "pre-activation, its encoder bias).\n\n"
                          "The graph below adds one more: a *pruned remainder*, the sum of a "
                          "node's contributors that the search did not keep, so that each "
                          "expanded node's inputs still add up to its value."),
        new_code_cell("from tc_explore.circuits import decompose, find_paths, logit_direction_target, prompt_context\n"
                      "from tc_explore.tasks import greater_than as gt\n\n"
                      "ctx = prompt_context(model, transcoders, PROMPT)\n"
                      "years = gt.year_token_ids(model).tolist()\n"
                      "target = logit_direction_target(ctx, years[36:], years[:36])\n"
                      "dec = decompose(ctx, target)\n"
                      "print(f'target {target.label}: {target.value:.4f}')\n"
                      "by_kind = dec.by_kind()\n"
                      "print(f'sum of contributions: {sum(by_kind.values()):.4f}')\n"
                      "import pandas as pd\n"
                      "pd.Series(by_kind, name='contribution').rename_axis('kind').to_frame()"),
        new_markdown_cell("The greedy path search follows the largest contributions upstream for "
                          "two steps. In the graph, rows are layers (embeddings at the bottom, the "
                          "target at the top) and columns are token positions; node size is the "
                          "size of a node's contribution to the target, edge colour its sign. Hover "
                          "a node for its contribution and factors; click a feature to see its "
                          "dashboard beside the graph; *expand selected* traces the selected node "
                          "one more step and the slider prunes small nodes and edges."),
        new_code_cell("from tc_explore.ui.graph_widget import circuit_graph_widget, feature_dashboard_html\n\n"
                      "paths = find_paths(ctx, target, iterations=2, branches=8)\n"
                      "table = paths.to_pandas()[['iteration', 'attribution', 'path']].head(10)\n"
                      "display(table.style.hide(axis='index').format(escape='html').set_properties(subset=['path'], **{'text-align': 'left'}))\n"
                      "graph_view = circuit_graph_widget(paths, dashboard=feature_dashboard_html(index, model, transcoders))\n"
                      "graph_view"),
    ]
    return cells


VIEWS_COST = ("27 s on an H200 GPU and 41 minutes on 2 CPU cores (measured by "
              "`benchmarks/bench_index.py` on GPT-2-small-shaped random weights)")


def feature_dashboards():
    cells = [
        new_markdown_cell("# Feature dashboards and the explorer\n\nBuild a feature index over a "
                          "corpus (or load one you built before), open dashboards for a few "
                          "features, and browse them with the interactive explorer.\n" + DEMO_NOTE),
        new_code_cell(SETUP),
        new_markdown_cell("## Build or load the index\n\n`FeatureIndex.build` runs the model once "
                          "per batch and folds every layer's feature activations into per-feature "
                          "statistics, written as Parquet. Set `INDEX_DIR` to a directory you built "
                          "earlier to load it instead."),
        new_code_cell(CORPUS),
        new_code_cell("import tempfile\n"
                      "from tc_explore.index import FeatureIndex\n\n"
                      "INDEX_DIR = os.environ.get('TC_EXPLORE_INDEX')\n"
                      "if INDEX_DIR and os.path.isdir(INDEX_DIR):\n"
                      "    index = FeatureIndex.load(INDEX_DIR)\n"
                      "else:\n"
                      "    INDEX_DIR = os.path.join(tempfile.mkdtemp(prefix='tcx_index_'), 'index')\n"
                      "    index = FeatureIndex.build(model, transcoders, corpus_tokens,\n"
                      "                               n_tokens=corpus_tokens.numel(), out_dir=INDEX_DIR, k=10)\n"
                      "index"),
        new_markdown_cell("## Precompute the weight views\n\nThe weight-based sections of a dashboard "
                          "(strongest connections to earlier and later features, logit effects, "
                          "de-embeddings, OV views) depend on the weights alone. Computed per feature "
                          "they read every layer's weights; `add_weight_views` computes them once for "
                          "every feature, as blocked matrix products, and stores them with the index, "
                          "so each dashboard opens from a few small Parquet reads. For GPT-2 small "
                          "(12 × 24576 features) this is " + VIEWS_COST + "; pass `device='cuda'` to "
                          "build on a GPU."),
        new_code_cell("import time\n"
                      "import torch\n"
                      "from tc_explore.dashboard import add_weight_views, weight_views_of\n\n"
                      "if weight_views_of(index) is None:\n"
                      "    t = time.perf_counter()\n"
                      "    add_weight_views(index, model, transcoders,\n"
                      "                     device='cuda' if torch.cuda.is_available() else None)\n"
                      "    n = sum(transcoders.d_sae(l) for l in transcoders.layers)\n"
                      "    print(f'weight views of {n} features built in {time.perf_counter() - t:.1f} s')\n"
                      "weight_views_of(index)"),
        new_markdown_cell("## Which feature to look at\n\nA feature that does something we can "
                          "check: on *The war lasted from 1735 to 17*, the transcoder feature with the "
                          "largest contribution to the greater-than direction (mean logit of the "
                          "years after 35 minus that of the years up to 35, at the last token). On the "
                          "demo model its boosted logits are years after 35. For comparison, the features that "
                          "fire most often in its layer: frequent features tend to be weak, generic "
                          "ones (punctuation, common words)."),
        new_code_cell("from tc_explore.circuits import decompose, logit_direction_target, prompt_context\n"
                      "from tc_explore.tasks import greater_than as gt\n\n"
                      "ctx = prompt_context(model, transcoders, 'The war lasted from 1735 to 17')\n"
                      "years = gt.year_token_ids(model).tolist()\n"
                      "contrib = decompose(ctx, logit_direction_target(ctx, years[36:], years[:36])).to_pandas()\n"
                      "top = contrib[contrib.kind == 'feature'].iloc[0]\n"
                      "LAYER, FEATURE = int(top.layer), int(top['index'])\n"
                      "print(f'layer {LAYER} feature {FEATURE}: contribution {top.value:.3f} '\n"
                      "      f'= activation {top.activation:.3f} x connection {top.connection:.3f}')\n"
                      "stats = index.table(LAYER, 'stats')\n"
                      "busiest = stats.sort_values(['n_firing', 'feature'], ascending=[False, True]).head(5)\n"
                      "display(stats[stats.feature == FEATURE][['feature', 'n_firing', 'max']])\n"
                      "busiest[['feature', 'n_firing', 'max']]"),
        new_markdown_cell("## One dashboard\n\nThe dashboard of that feature: firing frequency, "
                          "activation histogram, top examples with the context highlighted by "
                          "activation, samples from every activation quantile, and the "
                          "weight-based views."),
        new_code_cell("from IPython.display import HTML\n"
                      "from tc_explore.dashboard import dashboard_html, feature_dashboard, widget_css\n\n"
                      "dash = feature_dashboard(index, LAYER, FEATURE, model=model, transcoders=transcoders)\n"
                      "HTML(f'<style>{widget_css()}</style>' + dashboard_html(dash))"),
        new_markdown_cell("## The explorer\n\nType a prompt: the explorer highlights each token by "
                          "the activation of the selected feature and lists the most active "
                          "features per token; click a token or a feature to open its dashboard."),
        new_code_cell(EXPLORER_CELL),
    ]
    return cells


EXPLORER_CELL = """from tc_explore.ui.explorer import FeatureExplorer

explorer = FeatureExplorer(index, model, transcoders, layer=LAYER, feature=FEATURE,
                           prompt="The war lasted from 1735 to 17")
explorer"""


def greater_than():
    cells = [
        new_markdown_cell("# Greater-than, redone with transcoders\n\nHanna et al. (2023) found how "
                          "GPT-2 small completes prompts such as *The war lasted from 1735 to 17*: "
                          "it puts its probability on end years greater than the start year. "
                          "Dunefsky, Chlenski & Nanda (2024) redid the study with transcoders. "
                          "Here: the logit difference traced into contributions, the features of "
                          "the last MLP layers, the attention head that moves the start year to the "
                          "last token, how the probability difference grows with the number of "
                          "features kept, each feature's logit lens, and interventions: ablating the "
                          "circuit's features and steering generation with a clamped feature.\n" + DEMO_NOTE),
        new_code_cell(SETUP),
        new_markdown_cell("## The task and the metric\n\nFor a prompt with start year YY the "
                          "probability difference is P(end year > YY) − P(end year ≤ YY), over the "
                          "100 two-digit year tokens. Below: the mean over a set of prompts for "
                          "the original model and with every MLP replaced by its transcoder."),
        new_code_cell("from tc_explore.tasks import greater_than as gt\n\n"
                      "prompts = gt.tokenize_prompts(model, gt.make_prompts(n=48, seed=0))\n"
                      "pd_original = gt.probability_difference(model, prompts)\n"
                      "pd_replaced = gt.probability_difference(model, prompts, fwd_hooks=tcx.transcoder_hooks(model, transcoders))\n"
                      "print(f'probability difference, original model:      {pd_original:.3f}')\n"
                      "print(f'probability difference, all MLPs replaced:  {pd_replaced:.3f}')"),
        new_markdown_cell("## Tracing the logit difference\n\nThe target is the mean logit of the "
                          "years after 35 minus the mean logit of the years up to 35, at the last "
                          "token of *The war lasted from 1735 to 17*. The table lists the largest "
                          "contributions; they and all the others sum exactly to the target. Kinds: "
                          "`feature` (a transcoder feature: activation × connection), `head` (an "
                          "attention head, for one destination ← source pair of tokens), `embed` / "
                          "`pos_embed` (token and position embedding), `error` (a transcoder's "
                          "error: true MLP output minus transcoder output), `attn_bias` and "
                          "`dec_bias` (an attention layer's and a transcoder's output bias) and "
                          "`offset` (the target's own constant, here the unembedding bias, which "
                          "no upstream node writes)."),
        new_code_cell("from tc_explore.circuits import decompose, logit_direction_target, prompt_context\n\n"
                      "PROMPT = 'The war lasted from 1735 to 17'\n"
                      "ctx = prompt_context(model, transcoders, PROMPT)\n"
                      "years = gt.year_token_ids(model).tolist()\n"
                      "target = logit_direction_target(ctx, years[36:], years[:36])\n"
                      "dec = decompose(ctx, target)\n"
                      "print(f'{target.label} = {target.value:.4f}; tokens: {ctx.token_strs}')\n"
                      "contrib = dec.to_pandas()\n"
                      "contrib.head(15)"),
        new_markdown_cell("## Features of the last MLP layers\n\nThe transcoder features of the "
                          "last two layers with the largest contributions, with each contribution "
                          "split into its input-dependent factor (the activation) and its "
                          "input-invariant factor (the connection: the feature's decoder row read "
                          "along the target direction)."),
        new_code_cell("last_layers = sorted(transcoders.layers)[-2:]\n"
                      "feats = contrib[(contrib.kind == 'feature') & contrib.layer.isin(last_layers)]\n"
                      "feats = feats.head(10)\n"
                      "feats[['layer', 'index', 'token', 'value', 'activation', 'connection']]"),
        new_markdown_cell("## The attention head that moves the start year\n\nHeads contribute "
                          "through a (destination, source) pair of tokens. The largest head "
                          "contribution whose source is the start year's token `35`: the head "
                          "reads the year there and writes it to the last token. Decomposing that "
                          "head's contribution one step further shows what it reads at the source."),
        new_code_cell("from tc_explore.circuits import Node\n\n"
                      "year_pos = max(i for i, t in enumerate(ctx.token_strs) if t.strip() == '35')\n"
                      "heads = contrib[(contrib.kind == 'head') & (contrib.source == year_pos)]\n"
                      "display(heads.head(5)[['layer', 'index', 'token', 'source', 'value']])\n"
                      "h = heads.iloc[0]\n"
                      "head = dec.contribution_of(Node('head', layer=int(h.layer), index=int(h['index']), "
                      "token=int(h.token), source=int(h.source)))\n"
                      "print(f'head L{int(h.layer)}H{int(h[\"index\"])}: contribution {head.value:.4f}')\n"
                      "decompose(ctx, head.next_target).to_pandas().head(8)"),
        new_markdown_cell("## Probability difference versus the number of features\n\nThe paper's "
                          "figure: replace one MLP by its transcoder keeping only its *k* features "
                          "whose activations vary most across the prompts at the last token (all "
                          "others zeroed, no error term), and compare with keeping only the MLP's "
                          "*k* most varying neurons. On GPT-2 the layer is MLP10, as in the paper; on "
                          "the demo model it is the MLP whose zero-ablation lowers the probability "
                          "difference most (computed below). The replacement acts at the last token, "
                          "where the units were ranked; the MLP runs unchanged at the other tokens "
                          "(`positions='ranked'`). Dashed lines: the original model and the full "
                          "transcoder."),
        new_code_cell("import pandas as pd\n"
                      "import plotly.graph_objects as go\n"
                      "from tc_explore.tasks.greater_than import feature_count_curve\n"
                      "from tc_explore.ablation import ablation_curve_figure\n\n"
                      "if DEMO:\n"
                      "    ablated = {l: gt.probability_difference(model, prompts, fwd_hooks=tcx.mlp_ablation_hooks(model, [l]))\n"
                      "               for l in range(model.cfg.n_layers)}\n"
                      "    print('probability difference with one MLP zero-ablated:', {l: round(v, 3) for l, v in ablated.items()})\n"
                      "    CURVE_LAYER = min(ablated, key=ablated.get)\n"
                      "else:\n"
                      "    CURVE_LAYER = 10\n"
                      "KS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)\n"
                      "curve = feature_count_curve(model, transcoders, prompts, CURVE_LAYER, ks=KS)\n"
                      "curve_all = feature_count_curve(model, transcoders, prompts, CURVE_LAYER, ks=KS, positions='all')\n"
                      "names = {'transcoder': 'features', 'neurons': 'neurons'}\n"
                      "label = lambda data, where: data.assign(kind=[f'MLP{CURVE_LAYER}: top-k {names[k]}, {where}' if k in names else k\n"
                      "                                              for k in data.kind])\n"
                      "both = pd.concat([label(curve, 'last token'), label(curve_all[curve_all.kind.isin(names)], 'every token')])\n"
                      "display(curve.pivot_table(index='k', columns='kind', values='prob_diff'))\n"
                      "ablation_curve_figure(both, dash={k: 'dot' for k in both.kind if k.endswith('every token')},\n"
                      "                      height=420).update_layout(xaxis_title='units kept (k)')"),
        new_markdown_cell("**What the paper reports, and what this run shows.** On GPT-2 small, the "
                          "paper (Dunefsky, Chlenski & Nanda 2024, §4.3, its numbers) measures a "
                          "probability difference of 0.883 for the original model and 0.798 with "
                          "MLP10 replaced by its transcoder; the top-k MLP10 transcoder features "
                          "recover more of the original than the top-k neurons; and one feature, "
                          "5315 (the 23rd by variance, whose logit lens is off), makes the curve "
                          "dip: leaving it out gives 0.845.\n\n"
                          "On the demo model the same comparison at the last token (solid lines) "
                          "shows the paper's shape: a handful of MLP0 features reach the full "
                          "transcoder's value, which the neurons reach only with many times more "
                          "units (the cell below prints where). The dotted lines mask every token, "
                          "as the paper's code does: there the neurons win. The demo's MLP0 also "
                          "encodes the start year at the year's own token, for later layers to "
                          "move and read; those features never fire at the last token, so a "
                          "ranking by variance there puts them last and the masking removes them, "
                          "while dense neurons that vary at the last token fire at the year's token "
                          "too and survive. On GPT-2 (this notebook's default) the figure draws both "
                          "maskings for MLP10. The demo's numbers differ from GPT-2's "
                          "(a 3-layer model trained on templates, on our own prompt template and "
                          "with the softmax over the whole vocabulary); the comparison, not the "
                          "values, is what carries over."),
        new_code_cell("def first_k(data, kind, level):\n"
                      "    part = data[(data.kind == kind) & (data.prob_diff >= level)]\n"
                      "    return int(part.k.min()) if len(part) else None\n\n"
                      "print(f'original model {float(curve[curve.kind == \"original\"].prob_diff.iloc[0]):.3f}')\n"
                      "for data, where in ((curve, 'last token'), (curve_all, 'every token')):\n"
                      "    full = float(data[data.kind == 'full transcoder'].prob_diff.iloc[0])\n"
                      "    level = 0.95 * full\n"
                      "    print(f'{where}: full transcoder {full:.3f}; 95% of it ({level:.3f}) reached with '\n"
                      "          f'{first_k(data, \"transcoder\", level)} features, {first_k(data, \"neurons\", level)} neurons '\n"
                      "          '(None: not within the k tried)')"),
        new_markdown_cell("## Per-feature logit lens\n\nEach feature's decoder row times the "
                          "unembedding: the tokens whose logits it raises most. Then, over the 100 "
                          "two-digit year tokens, each top feature's logit lens (decoder row · "
                          "unembedding of the year) and its de-embedding score (embedding of the "
                          "year · encoder column): the first tells which years a feature promotes, "
                          "the second which start years excite an upstream feature directly."),
        new_code_cell("from tc_explore.circuits import logit_effects\n"
                      "from tc_explore.tasks.greater_than import year_profile\n\n"
                      "for _, row in feats.head(3).iterrows():\n"
                      "    boosted, suppressed = logit_effects(model, transcoders, int(row.layer), int(row['index']), k=8)\n"
                      "    print(f'layer {int(row.layer)} feature {int(row[\"index\"])}: boosts', boosted.token.tolist(),\n"
                      "          '| suppresses', suppressed.token.tolist())\n"
                      "profile = year_profile(model, transcoders, [(int(r.layer), int(r['index'])) for _, r in feats.head(4).iterrows()])\n"
                      "fig = go.Figure()\n"
                      "for (layer, feature), part in profile.groupby(['layer', 'feature']):\n"
                      "    fig.add_trace(go.Scatter(x=part.year, y=part.logit_lens, mode='lines', name=f'L{layer} F{feature} logit lens'))\n"
                      "    fig.add_trace(go.Scatter(x=part.year, y=part.de_embedding, mode='lines', line_dash='dot',\n"
                      "                             name=f'L{layer} F{feature} de-embedding'))\n"
                      "fig.update_layout(xaxis_title='year token YY', yaxis_title='score', height=380)\n"
                      "fig"),
        new_markdown_cell("## Two rankings of the paths\n\n`find_paths` follows the largest "
                          "contributions upstream, three steps, keeping the best 10 paths at each. By "
                          "default it ranks paths by the size of their attribution, either sign, and "
                          "offers every kind of node: features, heads (a destination ← source pair), "
                          "the token (`embed`) and position (`pos_embed`) embeddings, each "
                          "transcoder's `error` (true MLP output minus the transcoder's), the "
                          "biases (`attn_bias`: an attention layer's output bias; `dec_bias`: a "
                          "transcoder's output bias) and `offset` (the constant of the quantity "
                          "traced: for a feature its encoder bias, for logits their bias). "
                          "`ranking='paper'` reproduces the paper's own code instead: it ranks by "
                          "signed attribution (the paths that raise the target), offers only "
                          "features, heads and the embedding (token + position), never takes the "
                          "BOS token as a head's source, does not trace layer-0 heads further, and "
                          "lets at most `n_heads` (head, source) pairs of one layer compete. Its "
                          "logit target reads the last layer's residual stream without the final "
                          "LayerNorm, which `residual_target(..., 'resid_post')` reproduces."),
        new_code_cell("from tc_explore.circuits import find_paths, residual_target\n\n"
                      "W_U = model.W_U.detach()\n"
                      "u = W_U[:, years[36:]].mean(1) - W_U[:, years[:36]].mean(1)\n"
                      "paper_target = residual_target(ctx, u, N_LAYERS - 1, 'resid_post', label='years > 35 − years ≤ 35 (resid_post)')\n"
                      "ours = find_paths(ctx, target, iterations=3, branches=10)\n"
                      "paper = find_paths(ctx, paper_target, iterations=3, branches=10, ranking='paper')\n"
                      "show = ['iteration', 'attribution', 'path']\n"
                      "print('default ranking (|attribution|, every node kind):')\n"
                      "display(ours.to_pandas()[show].head(10).style.hide(axis='index').format(escape='html'))\n"
                      "print(\"ranking='paper' (signed; features, heads, embedding):\")\n"
                      "display(paper.to_pandas()[show].head(10).style.hide(axis='index').format(escape='html'))"),
        new_markdown_cell("## The circuit as a graph\n\nThe default path search from the same target, "
                          "drawn as an interactive graph: click a node for its factors, *expand "
                          "selected* to trace it further, the slider to prune. A *pruned remainder* "
                          "node carries what an expanded node's contributors left out of the graph "
                          "add up to, so its inputs still sum to its value. To intervene, select a "
                          "feature node, press *ablate / scale selected* (repeat for more nodes) and move "
                          "the × slider (0 ablates, 2 doubles, −1 inverts): the panel beside the graph "
                          "shows the traced target before and after and the most probable next tokens, "
                          "computed by the library's `intervene`. The graph is also "
                          "saved as a standalone HTML file."),
        new_code_cell("from tc_explore.circuits import find_paths\n"
                      "from tc_explore.ui.graph_widget import circuit_graph_widget\n\n"
                      "graph_view = circuit_graph_widget(ours, slug='greater-than')\n"
                      "out_dir = os.environ.get('TC_EXPLORE_OUT', '.')\n"
                      "graph_view.to_html(os.path.join(out_dir, 'greater_than_graph.html'))\n"
                      "graph_view"),
        new_markdown_cell("## The attribution graph\n\nThe field's standard picture of a circuit "
                          "(Ameisen et al. 2025, circuit-tracer, Neuronpedia): every active transcoder "
                          "feature, every error and token embedding as a node, every direct effect "
                          "between them as an edge, in the prompt's linearised model (attention patterns "
                          "and norm scales frozen, each MLP replaced by its transcoder plus its error). "
                          "The target is the greater-than direction traced above. For every row the "
                          "edges plus a constant (position embeddings, biases, the BOS position's MLP "
                          "outputs) sum exactly to the row's value. Pruning keeps the nodes that carry "
                          "80% of the influence on the target and the edges that carry 98%. On GPT-2 "
                          "the graph keeps the 2048 most influential features "
                          "(`max_feature_nodes`), computed in order of influence."),
        new_code_cell("from tc_explore.circuits import attribute\n\n"
                      "ag = attribute(model, transcoders, ctx, targets=[target], max_feature_nodes=None if DEMO else 2048)\n"
                      "pruned = ag.prune(node_threshold=0.8, edge_threshold=0.98)\n"
                      "print(f'{len(ag)} nodes, {ag.n_edges} edges ({ag.metadata[\"n_active_features\"]} active features); '\n"
                      "      f'pruned: {len(pruned)} nodes, {pruned.n_edges} edges')\n"
                      "print('scores:', {k: round(v, 3) for k, v in ag.scores().items()})\n"
                      "row = ag.constants.set_index('node_id').loc[ag.nodes.node_id.iloc[-1]]\n"
                      "print(f'{target.label}: edges {row.edge_sum:+.4f} + constant {row.constant:+.4f} = {row.value:.4f}')\n"
                      "top_features = pruned.nodes[pruned.nodes.kind == 'feature'].sort_values('influence', ascending=False)\n"
                      "if not DEMO:\n"
                      "    found = ((top_features.layer == 10) & (top_features['index'] == 5315)).any()\n"
                      "    print(\"the paper's MLP10 feature 5315 in the pruned graph:\", found)\n"
                      "top_features.head(10)[['node_id', 'layer', 'pos', 'index', 'activation', 'influence']]"),
        new_markdown_cell("The pruned graph in the widget: layer rows × token columns, hover a node for "
                          "its incoming and outgoing edges, click it for its details, pin nodes "
                          "(*pin selected*) and group the pinned ones into a named supernode. The same "
                          "graph is saved as JSON that circuit-tracer's viewer and Neuronpedia open."),
        new_code_cell("attribution_view = circuit_graph_widget(pruned)\n"
                      "attribution_view.to_html(os.path.join(out_dir, 'greater_than_attribution.html'))\n"
                      "pruned.to_json(os.path.join(out_dir, 'greater_than_attribution.json'), slug='greater-than')\n"
                      "attribution_view"),
        new_markdown_cell("## Interventions on one prompt\n\nA circuit is a hypothesis until you "
                          "intervene on it. Zero-ablate the feature below the last layer with the largest "
                          "contribution and rerun: *unconstrained*, the whole model runs forward (the "
                          "transcoders' error terms kept, downstream features free to react); "
                          "*constrained*, attention patterns, norm scales and every other feature stay "
                          "at their clean values: the linear world of attribution graphs. With "
                          "attention value vectors frozen too (`freeze_values=True`) it is the world of "
                          "the decomposition, where the target moves by exactly minus the feature's "
                          "contribution."),
        new_code_cell("from tc_explore.interventions import Intervention, intervene\n"
                      "from tc_explore.tasks.greater_than import probability_difference_metric\n\n"
                      "# the largest contribution of a feature below the last layer: later attention layers read what it writes\n"
                      "top = contrib[(contrib.kind == 'feature') & (contrib.layer < max(transcoders.layers))].iloc[0]\n"
                      "ablate = [Intervention.ablate(int(top.layer), int(top['index']), positions=int(top.token))]\n"
                      "res = intervene(model, transcoders, ctx, ablate, metric=probability_difference_metric(model, 35))\n"
                      "print(f'{ablate[0].label()}: probability difference {res.metric_before:.4f} -> {res.metric_after:.4f}')\n"
                      "print(f'{target.label}: the feature contributes {top.value:+.6f}; ablating it changes the target by')\n"
                      "for name, kw in (('constrained, values frozen', dict(constrained=True, freeze_values=True)),\n"
                      "                 ('constrained', dict(constrained=True)), ('unconstrained', {})):\n"
                      "    print(f'  {name:28s} {intervene(model, transcoders, ctx, ablate, metric=target, **kw).metric_change:+.6f}')\n"
                      "res.top_tokens(8)"),
        new_markdown_cell("## Ablating the circuit's features\n\nThe paper tests its circuit by "
                          "zero-ablating transcoder features (its GPT-2 numbers are quoted above). The "
                          "cell below first zero-ablates one feature with its MLP replaced by the "
                          "transcoder: on GPT-2 the paper's feature 5315 of MLP10; on the demo model the "
                          "feature of the MLP chosen above with the largest contribution to the traced "
                          "direction. Then the probability difference as the top-*k* features of three "
                          "rankings are zero-ablated at every position, the rest of the model intact "
                          "(error terms kept): by attribution (the decomposition above), by the path "
                          "search, and by activation variance across the prompts."),
        new_code_cell("import pandas as pd\n"
                      "from tc_explore.ablation import ablation_curve\n\n"
                      "if DEMO:\n"
                      "    in_layer = contrib[(contrib.kind == 'feature') & (contrib.layer == CURVE_LAYER)]\n"
                      "    PAPER_FEATURE = int(in_layer['index'].iloc[0])\n"
                      "else:\n"
                      "    PAPER_FEATURE = 5315\n"
                      "replaced = tcx.transcoder_hooks(model, transcoders, [CURVE_LAYER])\n"
                      "without = tcx.transcoder_hooks(model, transcoders, [CURVE_LAYER], ablate_features={CURVE_LAYER: [PAPER_FEATURE]})\n"
                      "display(pd.DataFrame({'probability difference': {\n"
                      "    'original model': pd_original,\n"
                      "    f'MLP{CURVE_LAYER} replaced by its transcoder (every token)': gt.probability_difference(model, prompts, fwd_hooks=replaced),\n"
                      "    f'... and feature {PAPER_FEATURE} zero-ablated': gt.probability_difference(model, prompts, fwd_hooks=without)}}))\n\n"
                      "score = lambda hooks: gt.probability_difference(model, prompts, fwd_hooks=hooks)\n"
                      "by_variance = gt.rank_features_by_variance(model, transcoders, prompts, top_k=32).sort_values('variance', ascending=False)\n"
                      "rankings = {'by attribution': dec, 'by path search': ours, 'by activation variance': by_variance}\n"
                      "KS = [0, 1, 2, 4, 8, 16, 32]\n"
                      "curves = pd.concat([ablation_curve(model, transcoders, r, score, KS, kind=name, value_name='prob_diff')\n"
                      "                    for name, r in rankings.items()]\n"
                      "                   + [pd.DataFrame([dict(kind='original', k=0, prob_diff=pd_original)])])\n"
                      "display(curves.pivot_table(index='k', columns='kind', values='prob_diff'))\n"
                      "ablation_curve_figure(curves, log_x=False).update_layout(xaxis_title='top-k features zero-ablated')"),
        new_markdown_cell("## Steering generation\n\nFind the feature that pushes a colour prompt most "
                          "towards *red* rather than *yellow* (its activation times its decoder row read "
                          "along the red − yellow unembedding), then clamp it at four times that "
                          "activation at every position while the model continues *The banana is*."),
        new_code_cell("from tc_explore.interventions import generate\n"
                      "from tc_explore.model import single_token_id\n\n"
                      "colour_ctx = prompt_context(model, transcoders, 'The apple is red. The rose is red. The cherry is')\n"
                      "red_minus_yellow = (model.W_U[:, single_token_id(model, ' red')] - model.W_U[:, single_token_id(model, ' yellow')]).detach()\n"
                      "best = max((float(colour_ctx.feature_acts(l)[-1, f]) * float(transcoders[l].W_dec[f] @ red_minus_yellow), l, f)\n"
                      "           for l in transcoders.layers\n"
                      "           for f in torch.nonzero(colour_ctx.feature_acts(l)[-1]).flatten().tolist())\n"
                      "_, STEER_LAYER, STEER_FEATURE = best\n"
                      "clamp = 4 * float(colour_ctx.feature_acts(STEER_LAYER)[-1, STEER_FEATURE])\n"
                      "steer = [Intervention(STEER_LAYER, None, STEER_FEATURE, clamp)]\n"
                      "print('unsteered:       ', repr(generate(model, transcoders, 'The banana is', [], max_new_tokens=10).text))\n"
                      "print(f'{steer[0].label()}:', repr(generate(model, transcoders, 'The banana is', steer, max_new_tokens=10).text))"),
    ]
    return cells


ANOTHER_MODEL_SETUP = """import os
import tempfile
import torch
import tc_explore as tcx
from tc_explore.architecture import architecture
from tc_explore.circuits import attribute, decompose, find_paths, logit_diff_target, prompt_context

DEMO = os.environ.get("TC_EXPLORE_DEMO", "0") == "1"
DEVICE = "cpu" if DEMO else ("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
if DEMO:
    # Gemma 2's architecture at toy size (random weights): 3 layers, d_model 64, pre- and
    # post-norms, scaled embeddings, softcapping, grouped-query attention; JumpReLU
    # transcoders reading ln2.hook_normalized and writing hook_mlp_out, as the gemma set does.
    from tc_explore.testing import build_tiny_model, random_transcoder
    model = tcx.load_model(str(build_tiny_model(tempfile.mkdtemp(), "gemma2", n_layers=3)), device=DEVICE)
    transcoders = tcx.TranscoderSet.from_transcoders(
        {l: random_transcoder(64, 256, l, seed=1, jumprelu=True, centred=False) for l in range(3)},
        name="toy-gemma-scope")
else:
    # bfloat16 halves the memory (about 10 GiB of CPU RAM at peak, see the README);
    # exact conservation to 1e-4 needs float32.
    dtype = "float32" if DEVICE == "cuda" else "bfloat16"
    model = tcx.load_model("google/gemma-2-2b", device=DEVICE, dtype=dtype)
    transcoders = tcx.load_transcoders("gemma-scope-2b", device=DEVICE, dtype=dtype)
arch = architecture(model)
print(arch.name, "| RMSNorm:", not arch.centred, "| post-norms:", arch.has_post_norms,
      "| embedding scale:", round(arch.embed_scale, 3), "| query / key-value heads:",
      arch.n_heads, "/", arch.n_kv_heads, "| logit softcap:", arch.logit_softcap)
print(transcoders)"""


def another_model():
    return [
        new_markdown_cell(
            "# Another model: Gemma-2-2B with the Gemma Scope transcoders\n\n"
            "The same analyses as the walkthrough on Gemma 2 (registry set `gemma-scope-2b`: "
            "circuit-tracer's `gemma` preset, 26 JumpReLU transcoders of 16,384 features). "
            "What differs from GPT-2 is read off the loaded model (`tc_explore.architecture.architecture`) and the "
            "decomposition stays exact: RMSNorm scales frozen (no centring), the norms after "
            "attention and the MLP frozen too, the embedding's sqrt(d_model) scale, one OV "
            "circuit per query head under grouped-query attention. A logit target is the logit "
            "*before* Gemma's final softcap; probabilities use the capped logits.\n\n"
            "**Sizes.** The model has 2.61 B parameters (5.2 GB in bfloat16; its download size "
            "depends on the dtype of the Hub files). The 26 transcoders are `layer_{L}.safetensors` "
            "files of about 302 MB each in float32 (7.9 GB), downloaded as each layer is first used and held in "
            "the dtype you ask for. `benchmarks/bench_memory.py --full` measured a peak of "
            "10.4 GiB of CPU RAM for the model and all 26 transcoders in bfloat16 with a prompt "
            "context and a decomposition (random weights of the real shape, on this project's "
            "2-core CPU, where the prompt context took about 9 minutes). On a GPU use float32 "
            "(about 10.5 GB for the model, 7.9 GB for the transcoders).\n\n"
            "**What ran here.** With `TC_EXPLORE_DEMO=1` (how the tests run it, offline) the "
            "cells below run on a toy model of Gemma 2's architecture with random weights and "
            "random transcoders in the same hooks, so the numbers illustrate the calls, not "
            "Gemma. Without it they load `google/gemma-2-2b` and the `gemma-scope-2b` set from "
            "the Hub (gated: accept the licence and `hf auth login` first)."),
        new_code_cell(ANOTHER_MODEL_SETUP),
        new_markdown_cell("Per-token feature activations and an exact decomposition of a logit "
                          "difference: the contributions sum to the target."),
        new_code_cell("prompt = 'The war lasted from 1735 to 17'\n"
                      "ctx = prompt_context(model, transcoders, prompt)\n"
                      "print('active features per token, layer 1:', (ctx.feature_acts(1) > 0).sum(-1).tolist())\n"
                      "target = logit_diff_target(ctx, ' war', ' cat')\n"
                      "dec = decompose(ctx, target)\n"
                      "print(f'target {target.label}: {target.value:.4f}; sum of contributions {dec.total:.4f}')\n"
                      "dec.to_pandas(k=8)"),
        new_markdown_cell("Path search and an attribution graph, as on GPT-2."),
        new_code_cell("paths = find_paths(ctx, target, iterations=2, branches=6)\n"
                      "print(paths.to_pandas()[['iteration', 'attribution', 'path']].head(6).to_string(index=False))\n"
                      "graph = attribute(model, transcoders, ctx, max_n_logits=3)\n"
                      "c = graph.constants\n"
                      "print(len(graph.nodes), 'nodes; largest conservation error',\n"
                      "      float((c.value - c.edge_sum - c.constant).abs().max()))"),
        new_markdown_cell("The attribution graph, pruned to the nodes and edges that carry 80% and 98% "
                          "of the influence on the logits, in the same interactive view as GPT-2's."),
        new_code_cell("from tc_explore.ui.graph_widget import circuit_graph_widget\n\n"
                      "circuit_graph_widget(graph.prune(node_threshold=0.8, edge_threshold=0.98))"),
    ]


NOTEBOOKS = {"walkthrough.ipynb": walkthrough, "feature_dashboards.ipynb": feature_dashboards,
             "greater_than.ipynb": greater_than, "another_model.ipynb": another_model}


def cell_id(cell, seen: set[str]) -> str:
    """A cell id that depends only on the cell's kind and text (nbformat's are
    random): regenerating unchanged notebooks changes nothing, and editing one
    cell changes that cell's id alone."""
    digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()
    base, n = digest[:12], 0
    while (cid := base if n == 0 else f"{base}-{n}") in seen:      # the same cell twice
        n += 1
    seen.add(cid)
    return cid


def build(name: str):
    """The notebook ``name`` as the generator writes it (an nbformat node)."""
    cells = NOTEBOOKS[name]()
    seen: set[str] = set()
    for cell in cells:
        cell.id = cell_id(cell, seen)
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def write(name: str) -> Path:
    path = HERE / name
    nbformat.write(build(name), path)
    return path


def main() -> None:
    for name in NOTEBOOKS:
        print("wrote", write(name))


if __name__ == "__main__":
    main()
