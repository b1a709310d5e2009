"""Per-feature dashboards: data (a plain dataclass) and renderers.

``feature_dashboard`` gathers everything about one feature: from a built
``FeatureIndex`` (top examples with their context activations, interval
samples, histogram, firing frequency) and from the weights alone through
``tc_explore.circuits.invariant`` (logit effects, de-embeddings direct and
through the top OV heads, OV norms per head, strongest connections to
earlier and later features). Nothing here runs the model, so opening a
dashboard is fast.

Renderers: plotly figures (``histogram_figure``, ``logit_figure``,
``ov_norms_figure``), an HTML fragment (``dashboard_html``, also used by the
explorer) and ``export_html``, a standalone page of one or many dashboards
with plotly's JavaScript inlined from the installed plotly package, which
opens in a browser offline with no Python running.

Stable CSS hooks for browser tests: ``.tcx-dashboard[data-layer][data-feature]``,
``.tcx-example``, ``.tcx-token[data-activation]``, ``.tcx-band``,
``.tcx-histogram``, ``.tcx-feature-link[data-layer][data-feature]``.
"""
from __future__ import annotations

import html
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import InvalidInputError, as_count, refuse_non_finite
from .integrity import write_text_atomic
from .index import FeatureIndex, TopExample
from .model import token_strings
from .transcoder import TranscoderSet
from .weight_views import DIRECTORY, LiveWeightViews, WeightViews
from .widgets import widget_asset


# -- data --------------------------------------------------------------------------------
@dataclass
class ContextWindow:
    """A token in its context, with the feature's activation on every token shown."""
    sequence: int
    position: int
    activation: float
    token_ids: list[int]
    tokens: list[str]
    activations: list[float]      # the feature's activation on each token of the window
    focus: int                    # index in the window of the indexed token


@dataclass
class IntervalBand:
    """Samples whose activation lies in one quantile band of the firing distribution."""
    q_low: float
    q_high: float
    act_low: float
    act_high: float
    examples: list[ContextWindow]


@dataclass
class FeatureDashboard:
    layer: int
    feature: int
    model: str
    transcoder_set: str
    n_tokens: int                                 # tokens the statistics count
    n_firing: int
    frequency: float
    max_activation: float
    mean_activation: float                        # over firing tokens
    histogram_edges: list[float]                  # bins: [<e0], [e0,e1), ..., [>=e_last]
    histogram_counts: list[int]
    top_examples: list[ContextWindow]
    interval_bands: list[IntervalBand]
    published_log_frequency: float | None = None  # from the transcoder set, if it ships one
    logits_boosted: pd.DataFrame | None = None    # token_id, token, score
    logits_suppressed: pd.DataFrame | None = None
    de_embeddings: pd.DataFrame | None = None     # token_id, token, score
    ov_de_embeddings: pd.DataFrame | None = None  # layer, head, token_id, token, score
    ov_norms: pd.DataFrame | None = None          # layer, head, norm
    upstream: pd.DataFrame | None = None          # layer, feature, score
    downstream: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"Layer {self.layer} · feature {self.feature}"


# -- building ----------------------------------------------------------------------------
class _Decoder:
    """Token id -> display string (``<id>`` without a model to decode with)."""

    def __init__(self, model):
        self.model = model if getattr(model, "tokenizer", None) is not None else None

    def __call__(self, ids: Iterable[int]) -> list[str]:
        if self.model is None:
            return [f"<{int(i)}>" for i in ids]
        return token_strings(self.model, ids)


def _window(index: FeatureIndex, ex: TopExample, decode: _Decoder) -> ContextWindow:
    seq = index.sequence_tokens(ex.sequence)
    lo = max(0, ex.window_start)
    hi = min(len(seq), ex.window_start + len(ex.window_acts))
    ids = seq[lo:hi].tolist()
    acts = ex.window_acts[lo - ex.window_start: hi - ex.window_start].astype(np.float32).tolist()
    focus = ex.position - lo
    acts[focus] = ex.activation        # exact value at the indexed token (window is float16)
    return ContextWindow(ex.sequence, ex.position, ex.activation, ids, decode(ids), acts, focus)


_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weight_views_of(index: FeatureIndex) -> WeightViews | None:
    """The weight views stored with ``index`` (opened once per index object), or None."""
    views = _VIEWS.get(index)
    if views is None:
        views = WeightViews.of_index(index)
        if views is not None:
            _VIEWS[index] = views
    return views


def add_weight_views(index: FeatureIndex, model, transcoders: TranscoderSet, k: int = 10,
                     n_heads: int = 3, overwrite: bool = False, **kwargs) -> WeightViews:
    """Precompute every feature's weight-based dashboard sections into
    ``<index>/weight_views`` (see ``tc_explore.weight_views``), so dashboards
    open from Parquet alone. Dashboards asking for more than ``k`` entries or
    ``n_heads`` heads fall back to computing on the fly."""
    index.check_transcoders(transcoders)
    views = WeightViews.build(model, transcoders, index.directory / DIRECTORY, k=k, n_heads=n_heads,
                              overwrite=overwrite, **kwargs)
    _VIEWS[index] = views
    return views


def _weight_source(index: FeatureIndex, model, transcoders: TranscoderSet | None, layer: int, k: int,
                   n_heads: int) -> "WeightViews | LiveWeightViews | None":
    """Stored views when the index has them (long enough, and checked against
    the weights given), else views computed from ``transcoders``, else None."""
    views = weight_views_of(index)
    if views is not None and views.covers(k, n_heads) and (model is not None or transcoders is not None):
        # Precomputed with the index: a few small Parquet reads instead of ~1 GB of weights.
        views.verify(model, transcoders, layer)
        return views
    return LiveWeightViews(transcoders) if transcoders is not None else None


def feature_dashboard(index: FeatureIndex, layer: int, feature: int, model=None,
                      transcoders: TranscoderSet | None = None, k: int = 10, n_bands: int = 5,
                      per_band: int = 5, n_heads: int = 3) -> FeatureDashboard:
    """Everything about one feature. ``model`` decodes tokens. The weight-based
    sections come from the index's stored ``WeightViews`` when it has them
    (``add_weight_views``; checked against ``model`` / ``transcoders`` if given),
    else are computed from ``transcoders`` (and ``model``) on the fly; with
    neither they are None."""
    if not isinstance(index, FeatureIndex):
        raise InvalidInputError(f"index must be a FeatureIndex (FeatureIndex.load(folder)), got "
                                f"{type(index).__name__} {index!r:.60}.")
    k, n_heads = as_count(k, "k"), as_count(n_heads, "n_heads")
    n_bands, per_band = as_count(n_bands, "n_bands"), as_count(per_band, "per_band", minimum=0)
    layer = index.check_layer(layer)
    feature = index.check_feature(layer, feature)
    index.check_transcoders(transcoders, layers=[layer])
    index.check_model(model)
    decode = _Decoder(model)
    stats = index.feature_stats(layer, feature)
    top = [_window(index, e, decode) for e in index.top_examples(layer, feature)]
    bands = []
    for q_low, q_high, items in index.interval_samples(layer, feature, n_bands=n_bands):
        acts = [e.activation for e in items]
        bands.append(IntervalBand(q_low, q_high, min(acts, default=0.0), max(acts, default=0.0),
                                  [_window(index, e, decode) for e in items[:per_band]]))
    dash = FeatureDashboard(
        layer, feature, index.manifest.model, index.manifest.transcoder_set, index.n_tokens,
        stats["n_firing"], stats["frequency"], stats["max"], stats["mean"],
        [float(e) for e in index.edges], stats["histogram"].tolist(), top, bands)
    if transcoders is not None:
        log_freq = transcoders.log_feature_frequency(layer)
        if log_freq is not None:
            dash.published_log_frequency = float(log_freq[feature])
    source = _weight_source(index, model, transcoders, layer, k, n_heads)
    if source is not None:
        for name, frame in source.sections(model, layer, feature, k, n_heads).items():
            setattr(dash, name, frame)
    if stats["n_firing"] == 0:
        dash.notes.append("This feature never fired on the indexed tokens.")
    return dash


# -- figures -------------------------------------------------------------------------------
def _bin_labels(edges: Sequence[float]) -> tuple[list[float], list[str]]:
    """A representative x (geometric centre) and a label for every bin."""
    e = list(edges)
    step = math.sqrt(e[1] / e[0]) if len(e) > 1 else 2.0        # half a bin, geometrically
    xs = [e[0] / step] + [math.sqrt(a * b) for a, b in zip(e, e[1:])] + [e[-1] * step]
    labels = [f"< {e[0]:.3g}"] + [f"{a:.3g} – {b:.3g}" for a, b in zip(e, e[1:])] + [f"≥ {e[-1]:.3g}"]
    return xs, labels


def _nonempty_range(counts: Sequence[int]) -> tuple[int, int]:
    nz = [i for i, c in enumerate(counts) if c]
    return (nz[0], nz[-1] + 1) if nz else (0, 0)


def histogram_figure(d: FeatureDashboard):
    """Activation histogram of firing tokens (log-spaced bins, log x axis)."""
    import plotly.graph_objects as go
    xs, labels = _bin_labels(d.histogram_edges)
    lo, hi = _nonempty_range(d.histogram_counts)
    fig = go.Figure(go.Bar(x=xs[lo:hi], y=d.histogram_counts[lo:hi], customdata=labels[lo:hi],
                           hovertemplate="%{customdata}: %{y}<extra></extra>", marker_color="#e07b28"))
    fig.update_layout(title=f"Activations when firing · frequency {d.frequency:.3%} "
                            f"({d.n_firing} of {d.n_tokens} tokens)",
                      xaxis=dict(type="log", title="activation"), yaxis_title="tokens",
                      bargap=0.05, height=260, margin=dict(l=40, r=10, t=40, b=40))
    return fig


def logit_figure(d: FeatureDashboard):
    """Most boosted and most suppressed tokens (``W_dec[f] @ W_U``)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    _require(d.logits_boosted, "logit effects", "model and transcoders")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("suppressed", "boosted"))
    for col, df, colour in ((1, d.logits_suppressed, "#3b6fb6"), (2, d.logits_boosted, "#c0392b")):
        fig.add_trace(go.Bar(x=df["score"], y=[repr(t) for t in df["token"]], orientation="h",
                             marker_color=colour, showlegend=False), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title="Logit effects", height=320, margin=dict(l=80, r=10, t=50, b=30))
    return fig


def ov_norms_figure(d: FeatureDashboard):
    """``||OV_h @ W_enc[:, f]||`` per (layer, head) as a heatmap."""
    import plotly.graph_objects as go
    _require(d.ov_norms, "OV norms", "model and transcoders")
    grid = d.ov_norms.pivot(index="layer", columns="head", values="norm")
    fig = go.Figure(go.Heatmap(z=grid.values, x=[f"H{h}" for h in grid.columns],
                               y=[f"L{layer}" for layer in grid.index], colorscale="Oranges",
                               hovertemplate="%{y} %{x}: %{z:.3g}<extra></extra>"))
    fig.update_layout(title="OV-circuit norms per head", height=300, margin=dict(l=50, r=10, t=40, b=30))
    return fig


def _require(value, what: str, needs: str) -> None:
    if value is None:
        raise InvalidInputError(f"This dashboard has no {what}: build it with {needs}.")


# -- HTML --------------------------------------------------------------------------------
def widget_css() -> str:
    """The dashboards' and explorer's stylesheet (package data tc_explore.widgets)."""
    return widget_asset("explorer.css")


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _shown(token: str) -> str:
    return token.replace("\n", "↵").replace("\t", "→") or "∅"


def _colour(a: float, vmax: float) -> str:
    alpha = 0.0 if vmax <= 0 or a <= 0 else min(1.0, a / vmax)
    return f"rgba(224,123,40,{alpha:.3f})"


def tokens_html(tokens: Sequence[str], activations: Sequence[float], vmax: float,
                focus: int | None = None, positions: Sequence[int] | None = None) -> str:
    """Tokens as ``span.tcx-token`` shaded by activation (shared by the
    dashboard's examples and the explorer's prompt view)."""
    if len(tokens) != len(activations):
        raise InvalidInputError(f"tokens_html got {len(tokens)} tokens but {len(activations)} activations; "
                                "give one activation per token.")
    # NaN would show as an unshaded token whose activation reads "nan", as if it were a value
    refuse_non_finite(torch.as_tensor(np.asarray(activations, dtype=np.float64)), "tokens_html's activations",
                      ("token",), {"token": list(tokens)})
    parts = []
    for i, (t, a) in enumerate(zip(tokens, activations)):
        cls = "tcx-token tcx-focus" if i == focus else "tcx-token"
        pos = "" if positions is None else f' data-position="{positions[i]}"'
        parts.append(f'<span class="{cls}"{pos} data-activation="{a:.4g}" title="{_esc(repr(t))}: '
                     f'{a:.4g}" style="background:{_colour(a, vmax)}">{_esc(_shown(t))}</span>')
    return "".join(parts)


def _example_html(w: ContextWindow, vmax: float) -> str:
    positions = list(range(w.position - w.focus, w.position - w.focus + len(w.tokens)))
    return (f'<div class="tcx-example" data-sequence="{w.sequence}" data-position="{w.position}">'
            f'<span class="tcx-act">{w.activation:.3f}</span>'
            f'<span class="tcx-context">{tokens_html(w.tokens, w.activations, vmax, w.focus, positions)}'
            f'</span></div>')


def _histogram_svg(d: FeatureDashboard, width: int = 360, height: int = 90) -> str:
    """A dependency-free histogram (the explorer's HTML widget runs no scripts)."""
    lo, hi = _nonempty_range(d.histogram_counts)
    counts = d.histogram_counts[lo:hi]
    if not counts:
        return '<div class="tcx-histogram tcx-empty">never fires</div>'
    _, labels = _bin_labels(d.histogram_edges)
    top = max(counts)
    bw = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - c / top * height:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{c / top * height:.1f}"><title>{_esc(labels[lo + i])}: {c}</title></rect>'
        for i, c in enumerate(counts))
    return (f'<svg class="tcx-histogram" width="{width}" height="{height + 14}" '
            f'viewBox="0 0 {width} {height + 14}">{bars}'
            f'<text x="0" y="{height + 12}">{_esc(labels[lo].split(" ")[0])}</text>'
            f'<text x="{width}" y="{height + 12}" text-anchor="end">{_esc(labels[hi - 1].split(" ")[-1])}</text>'
            f'</svg>')


def _table(df: pd.DataFrame | None, cls: str, link: bool = False) -> str:
    if df is None:
        return '<p class="tcx-missing">needs the model and transcoders</p>'
    if df.empty:
        return '<p class="tcx-missing">none</p>'
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)
    rows = []
    for r in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, r):
            text = repr(v) if c == "token" else (f"{v:.4g}" if isinstance(v, float) else v)
            cells.append(f"<td>{_esc(text)}</td>")
        attrs = ""
        if link:
            attrs = (f' class="tcx-feature-link" data-layer="{int(r.layer)}" '
                     f'data-feature="{int(r.feature)}"')
        rows.append(f"<tr{attrs}>{''.join(cells)}</tr>")
    return f'<table class="tcx-table {cls}"><tr>{head}</tr>{"".join(rows)}</table>'


def dashboard_html(d: FeatureDashboard, plotly_figures: bool = False) -> str:
    """One dashboard as an HTML fragment (``div.tcx-dashboard``). With
    ``plotly_figures`` the histogram, logit and OV plots are plotly divs (their
    script must be on the page, as ``export_html`` does); without, the page needs
    no JavaScript at all."""
    _check_dashboard(d)
    vmax = d.max_activation
    published = "" if d.published_log_frequency is None else \
        f" · published frequency {10 ** d.published_log_frequency:.3%}"
    header = (f'<div class="tcx-header"><h2>{_esc(d.title)}</h2><div class="tcx-stats">'
              f'{_esc(d.transcoder_set)} on {_esc(d.model)} · fires on '
              f'<span class="tcx-frequency">{d.frequency:.3%}</span> of {d.n_tokens} tokens '
              f'· max <span class="tcx-max">{d.max_activation:.3f}</span> · mean when firing '
              f'{d.mean_activation:.3f}{published}</div>'
              + "".join(f'<p class="tcx-note">{_esc(n)}</p>' for n in d.notes) + "</div>")
    hist = _plotly_div(histogram_figure(d)) if plotly_figures else _histogram_svg(d)
    top = "".join(_example_html(w, vmax) for w in d.top_examples) or '<p class="tcx-missing">none</p>'
    bands = "".join(
        f'<div class="tcx-band" data-q-low="{b.q_low:.2f}" data-q-high="{b.q_high:.2f}">'
        f'<h4>quantiles {b.q_low:.0%}–{b.q_high:.0%} (activation {b.act_low:.3g}–{b.act_high:.3g})</h4>'
        + "".join(_example_html(w, vmax) for w in b.examples) + "</div>"
        for b in d.interval_bands if b.examples)
    weights = ""
    if d.logits_boosted is not None and plotly_figures:
        weights += _plotly_div(logit_figure(d))
    weights += (f'<div class="tcx-row">'
                f'<div><h4>boosted logits</h4>{_table(d.logits_boosted, "tcx-logits-boosted")}</div>'
                f'<div><h4>suppressed logits</h4>{_table(d.logits_suppressed, "tcx-logits-suppressed")}</div>'
                f'<div><h4>de-embeddings</h4>{_table(d.de_embeddings, "tcx-de-embeddings")}</div></div>'
                f'<h4>de-embeddings through top OV heads</h4>{_table(d.ov_de_embeddings, "tcx-ov-de-embeddings")}')
    if d.ov_norms is not None:
        weights += _plotly_div(ov_norms_figure(d)) if plotly_figures else \
            f'<h4>OV norms per head</h4>{_ov_grid(d.ov_norms)}'
    conns = (f'<div class="tcx-row"><div><h4>upstream (earlier layers)</h4>'
             f'{_table(d.upstream, "tcx-upstream", link=True)}</div>'
             f'<div><h4>downstream (later layers)</h4>{_table(d.downstream, "tcx-downstream", link=True)}'
             f'</div></div>')
    return (f'<div class="tcx-dashboard" id="tcx-L{d.layer}-F{d.feature}" data-layer="{d.layer}" '
            f'data-feature="{d.feature}">{header}'
            f'<section class="tcx-section tcx-activations"><h3>Activation density</h3>{hist}</section>'
            f'<section class="tcx-section tcx-top"><h3>Top activations</h3>{top}</section>'
            f'<section class="tcx-section tcx-intervals"><h3>Interval samples</h3>{bands}</section>'
            f'<section class="tcx-section tcx-weights"><h3>Input-invariant views</h3>{weights}</section>'
            f'<section class="tcx-section tcx-connections"><h3>Strongest feature connections</h3>{conns}</section>'
            f'</div>')


def _ov_grid(df: pd.DataFrame) -> str:
    grid = df.pivot(index="layer", columns="head", values="norm")
    vmax = float(np.nanmax(grid.values)) if grid.size else 0.0
    head = "<tr><th></th>" + "".join(f"<th>H{h}</th>" for h in grid.columns) + "</tr>"
    rows = "".join(
        f"<tr><th>L{layer}</th>" + "".join(
            f'<td style="background:{_colour(v, vmax)}" title="L{layer} H{h}: {v:.4g}">{v:.2g}</td>'
            for h, v in zip(grid.columns, grid.loc[layer])) + "</tr>"
        for layer in grid.index)
    return f'<table class="tcx-table tcx-ov-norms">{head}{rows}</table>'


def _plotly_div(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def export_html(dashboards: FeatureDashboard | Sequence[FeatureDashboard], path: str | Path,
                title: str = "tc_explore feature dashboards") -> Path:
    """Write a standalone HTML page of one or many dashboards. Plotly's
    JavaScript is inlined from the installed plotly package (no network), so
    the page opens in any browser with no Python running."""
    from plotly.offline import get_plotlyjs

    if isinstance(dashboards, FeatureDashboard):
        dashboards = [dashboards]
    dashboards = list(dashboards)
    if not dashboards:
        raise InvalidInputError("export_html needs at least one dashboard.")
    for d in dashboards:
        _check_dashboard(d)
    nav = "".join(f'<li><a href="#tcx-L{d.layer}-F{d.feature}">{_esc(d.title)}</a></li>'
                  for d in dashboards)
    body = "".join(dashboard_html(d, plotly_figures=True) for d in dashboards)
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<style>{widget_css()}</style><script type="text/javascript">{get_plotlyjs()}</script>'
            f'</head><body class="tcx-page"><h1>{_esc(title)}</h1>'
            f'<nav class="tcx-nav"><ul>{nav}</ul></nav>{body}</body></html>')
    return write_text_atomic(path, page)


def _check_dashboard(d) -> None:
    if not isinstance(d, FeatureDashboard):
        raise InvalidInputError(f"Expected a FeatureDashboard (from feature_dashboard), got "
                                f"{type(d).__name__} {d!r:.60}.")
