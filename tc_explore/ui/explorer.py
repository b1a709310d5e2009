"""A notebook explorer of transcoder features (ipywidgets).

    from tc_explore.ui.explorer import FeatureExplorer
    FeatureExplorer(index, model, transcoders)        # displays itself in Jupyter

Pick a layer and feature (next / previous, or search by token), read its
dashboard; type a prompt to see the current feature's activation on every
token and the top features at each token, and click any of those (or a
connected feature) to open its dashboard. The explorer only lays out
widgets: every number comes from library functions (``feature_dashboard``,
``search_features``, ``run_prompt``) that notebooks and tests call directly.

Stable CSS classes for browser tests: ``tcx-explorer`` (root),
``tcx-layer-select``, ``tcx-feature-input``, ``tcx-prev``, ``tcx-next``,
``tcx-search-input``, ``tcx-search-by``, ``tcx-search-button``,
``tcx-search-result``, ``tcx-dashboard-view`` (holding
``div.tcx-dashboard[data-layer][data-feature]``), ``tcx-prompt-input``,
``tcx-prompt-run``, ``tcx-prompt-tokens`` (``span.tcx-token[data-position]``),
``tcx-top-features``, ``tcx-feature-button``, ``tcx-status``.
"""
from __future__ import annotations

import html

import ipywidgets as widgets

from ..dashboard import dashboard_html, feature_dashboard, tokens_html, widget_css
from ..errors import InvalidInputError, TcExploreError, as_count, as_integer
from ..index import FeatureIndex
from ..prompt_features import PromptActivations, run_prompt
from ..search import search_features
from ..transcoder import TranscoderSet


def _feature_button(layer: int, feature: int, label: str, on_click) -> widgets.Button:
    b = widgets.Button(description=label, tooltip=f"open layer {layer} feature {feature}",
                       layout=widgets.Layout(width="auto"))
    b.add_class("tcx-feature-button")
    b.add_class(f"tcx-L{layer}-F{feature}")
    b.on_click(lambda _: on_click(layer, feature))
    return b


class FeatureExplorer:
    def __init__(self, index: FeatureIndex, model, transcoders: TranscoderSet,
                 layer: int | None = None, feature: int = 0, top_k: int = 5, prompt: str = ""):
        index.check_transcoders(transcoders)
        self.index, self.model, self.transcoders = index, model, transcoders
        self.top_k = as_count(top_k, "top_k")
        self.prompt: PromptActivations | None = None
        self.dashboard = None
        layer = index.layers[0] if layer is None else index.check_layer(layer)

        self.style = widgets.HTML(f"<style>{widget_css()}</style>")
        self.layer_select = widgets.Dropdown(options=index.layers, value=layer, description="layer")
        self.feature_input = widgets.BoundedIntText(value=0, min=0, max=index.d_sae(layer) - 1,
                                                    description="feature")
        self.prev_button = widgets.Button(description="◀ previous")
        self.next_button = widgets.Button(description="next ▶")
        self.search_input = widgets.Text(placeholder="a token, e.g. ' war'", description="search")
        self.search_by = widgets.ToggleButtons(options=["logits", "examples"], value="logits")
        self.search_button = widgets.Button(description="find features")
        self.search_results = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.status = widgets.HTML()
        self.dashboard_view = widgets.HTML()
        self.connections = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.prompt_input = widgets.Text(value=prompt, placeholder="type a prompt, press Enter",
                                         description="prompt", layout=widgets.Layout(width="90%"))
        self.prompt_run = widgets.Button(description="run")
        self.prompt_tokens = widgets.HTML()
        self.top_features = widgets.VBox()

        for w, cls in ((self.layer_select, "tcx-layer-select"), (self.feature_input, "tcx-feature-input"),
                       (self.prev_button, "tcx-prev"), (self.next_button, "tcx-next"),
                       (self.search_input, "tcx-search-input"), (self.search_by, "tcx-search-by"),
                       (self.search_button, "tcx-search-button"), (self.status, "tcx-status"),
                       (self.dashboard_view, "tcx-dashboard-view"),
                       (self.connections, "tcx-connections-buttons"),
                       (self.prompt_input, "tcx-prompt-input"), (self.prompt_run, "tcx-prompt-run"),
                       (self.prompt_tokens, "tcx-prompt-tokens"), (self.top_features, "tcx-top-features")):
            w.add_class(cls)

        self.prev_button.on_click(lambda _: self.step(-1))
        self.next_button.on_click(lambda _: self.step(+1))
        self.layer_select.observe(self._on_layer, names="value")
        self.feature_input.observe(self._on_feature, names="value")
        self.search_button.on_click(lambda _: self.search(self.search_input.value))
        self.search_input.continuous_update = False
        self.prompt_input.continuous_update = False
        self.prompt_input.observe(lambda change: self.run_prompt(change["new"]), names="value")
        self.prompt_run.on_click(lambda _: self.run_prompt(self.prompt_input.value))

        self.widget = widgets.VBox([
            self.style,
            widgets.HBox([self.layer_select, self.feature_input, self.prev_button, self.next_button]),
            widgets.HBox([self.search_input, self.search_by, self.search_button]),
            self.search_results, self.status,
            widgets.HBox([self.prompt_input, self.prompt_run]),
            self.prompt_tokens, self.top_features,
            self.dashboard_view, self.connections])
        self.widget.add_class("tcx-explorer")
        self._updating = False
        self.show(layer, feature)
        if prompt:
            self.run_prompt(prompt)

    # -- state ---------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return int(self.layer_select.value)

    @property
    def feature(self) -> int:
        return int(self.feature_input.value)

    def show(self, layer: int, feature: int) -> None:
        """Open the dashboard of (layer, feature) and refresh the prompt view."""
        try:
            dash = feature_dashboard(self.index, layer, feature, self.model, self.transcoders)
        except TcExploreError as err:
            self._error(err)
            return
        self.dashboard = dash
        self._updating = True          # set both inputs without re-entering show()
        try:
            self.layer_select.value = dash.layer
            self.feature_input.max = self.index.d_sae(dash.layer) - 1
            self.feature_input.value = dash.feature
        finally:
            self._updating = False
        self.status.value = ""
        self.dashboard_view.value = dashboard_html(dash)
        self.connections.children = [widgets.Label("connected:")] + [
            _feature_button(int(r.layer), int(r.feature), f"{arrow} L{int(r.layer)}/{int(r.feature)}",
                            self.show)
            for arrow, df in (("↑", dash.upstream), ("↓", dash.downstream)) if df is not None
            for r in df.head(5).itertuples()]
        self._render_prompt()

    def step(self, delta: int) -> None:
        delta = as_integer(delta, "step")
        d = self.index.d_sae(self.layer)
        self.show(self.layer, (self.feature + delta) % d)

    def _on_layer(self, change) -> None:
        if not self._updating:
            self.show(change["new"], min(self.feature, self.index.d_sae(change["new"]) - 1))

    def _on_feature(self, change) -> None:
        if not self._updating:
            self.show(self.layer, change["new"])

    # -- search --------------------------------------------------------------------------
    def search(self, token: str) -> None:
        """List features related to ``token`` (see ``search_features``) as buttons."""
        if not token:
            return
        try:
            found = search_features(self.model, self.transcoders, token, by=self.search_by.value,
                                    layers=self.index.layers, index=self.index)
        except TcExploreError as err:
            self._error(err)
            return
        buttons = []
        for r in found.itertuples():
            b = _feature_button(int(r.layer), int(r.feature),
                                f"L{int(r.layer)}/{int(r.feature)} ({r.score:.3g})", self.show)
            b.add_class("tcx-search-result")
            buttons.append(b)
        self.search_results.children = buttons or [widgets.Label("no features found")]
        self.status.value = ""

    # -- prompt --------------------------------------------------------------------------
    def run_prompt(self, text: str) -> None:
        """Run the model on ``text`` once; show the current feature per token
        and the top features at each token."""
        if not text:
            return
        try:
            self.prompt = run_prompt(self.model, self.transcoders, text, layers=self.index.layers)
        except TcExploreError as err:
            self._error(err)
            return
        self.status.value = ""
        top = self.prompt.top_features(self.top_k)
        rows = []
        for pos, tok in enumerate(self.prompt.token_strs):
            label = widgets.HTML(f'<span class="tcx-token-label" data-position="{pos}">'
                                 f'{html.escape(repr(tok))}</span>')
            buttons = [_feature_button(int(r.layer), int(r.feature),
                                       f"L{int(r.layer)}/{int(r.feature)} {r.activation:.2f}", self.show)
                       for r in top[top["position"] == pos].itertuples()]
            row = widgets.HBox([label] + buttons)
            row.add_class("tcx-token-row")
            rows.append(row)
        self.top_features.children = rows
        self._render_prompt()

    def _render_prompt(self) -> None:
        if self.prompt is None or self.layer not in self.prompt.acts:
            self.prompt_tokens.value = ""
            return
        df = self.prompt.feature(self.layer, self.feature)
        vmax = max(float(df["activation"].max()), self.dashboard.max_activation if self.dashboard else 0.0)
        self.prompt_tokens.value = (
            f'<div class="tcx-prompt-view" data-layer="{self.layer}" data-feature="{self.feature}">'
            f'<b>L{self.layer}/{self.feature} on the prompt</b> (max {df["activation"].max():.3f}):<br>'
            + tokens_html(df["token"].tolist(), df["activation"].tolist(), vmax,
                          positions=df["position"].tolist()) + "</div>")

    def _error(self, err: Exception) -> None:
        self.status.value = f'<span class="tcx-error">{html.escape(str(err))}</span>'

    # -- display -------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        """The widgets for a live kernel, plus ``text/html``: what the explorer
        shows now (prompt view, top features per token, the open dashboard) as
        static HTML, which exports of the notebook show offline."""
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, None)
        data = dict(data or {})
        data["text/html"] = self.static_html()
        return (data, metadata) if metadata is not None else data

    def static_html(self) -> str:
        """The explorer's current content as self-contained HTML (no widgets, no
        JavaScript): the layer and feature, the prompt's tokens shaded by the
        feature, the top features per token, and the feature's dashboard."""
        parts = [f"<style>{widget_css()}</style>",
                 '<div class="tcx-explorer tcx-explorer-static">',
                 f'<p class="tcx-static-note">Feature explorer, layer {self.layer} feature '
                 f"{self.feature} (a static copy: run the notebook to browse).</p>"]
        if self.prompt is not None:
            parts.append(f'<div class="tcx-prompt-tokens">{self.prompt_tokens.value}</div>')
            top = self.prompt.top_features(self.top_k)
            rows = []
            for pos, tok in enumerate(self.prompt.token_strs):
                feats = ", ".join(f"L{int(r.layer)}/{int(r.feature)} {r.activation:.2f}"
                                  for r in top[top["position"] == pos].itertuples())
                rows.append(f"<tr><td>{html.escape(repr(tok))}</td><td>{html.escape(feats)}</td></tr>")
            parts.append('<table class="tcx-top-features"><tr><th>token</th><th>top features</th></tr>'
                         + "".join(rows) + "</table>")
        if self.dashboard is not None:
            parts.append(f'<div class="tcx-dashboard-view">{dashboard_html(self.dashboard)}</div>')
        parts.append("</div>")
        return "".join(parts)


def explore(index: FeatureIndex | str, model, transcoders: TranscoderSet, **kwargs) -> FeatureExplorer:
    """Open an explorer on an index (a FeatureIndex or its directory)."""
    if not isinstance(index, FeatureIndex):
        index = FeatureIndex.load(index)
    known = ("layer", "feature", "top_k", "prompt")
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise InvalidInputError(f"explore got unknown option(s) {unknown}; its options are {list(known)}.")
    return FeatureExplorer(index, model, transcoders, **kwargs)
