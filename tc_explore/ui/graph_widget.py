"""Interactive circuit graph: an anywidget view of an attribution graph.

    w = CircuitGraphWidget(graph, dashboard=..., expand=...)
    w                          # in JupyterLab / VS Code: the graph and a dashboard panel
    w.selected_node            # the node clicked in the browser ("" for none)
    w.threshold = 0.5          # prune: an attribution graph's node threshold (the nodes
                               # holding 50% of the influence, as graph.prune(node_threshold=0.5));
                               # a path graph's: hide what is below 50% of the largest value
    w.expand_node(node_id)     # what the "expand selected" button does
    w.set_intervention([node_id], 0.0)   # what the intervention controls do (needs intervene=...)
    w.to_html("graph.html")    # standalone file: graph + pre-rendered dashboards, no Python

``graph`` is an attribution graph in the graph JSON layout (``docs/graph_json.md``;
a dict, a JSON string, a path to a ``.json`` file, or any object with
``to_json()`` / ``to_dict()`` such as :class:`tc_explore.circuits.CircuitGraph`).
The widget computes nothing: the view model (``graph_view``) turns the graph
into what the browser draws, and the widget calls the functions it was given —
``dashboard(layer, feature) -> html`` and ``expand(node_id) -> graph`` —
which are library functions (:func:`circuit_graph_widget` wires them to
``tc_explore.dashboard`` and :class:`tc_explore.circuits.PathGraphExpander`),
and ``intervene(features, factor) -> summary`` for the intervention controls
(:func:`tc_explore.interventions.feature_scaling`): pick feature nodes, scale
them with a slider (0 ablates), and the top tokens and the metric beside the
graph update.

The browser side is ``widgets/circuit_graph.js`` and ``.css``, and the
standalone page ``widgets/circuit_graph_page.html`` (package data
``tc_explore.widgets``): plain SVG with no network access.
"""
from __future__ import annotations

import html as _html
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import anywidget
import traitlets

from ..errors import InvalidInputError, as_number
from ..widgets import widget_asset
from .graph_view import (_as_graph_dict, _check_threshold, _node_summary_html, _resolve_threshold, graph_view_data,
                         visible_elements)

__all__ = ["CircuitGraphWidget", "circuit_graph_widget", "feature_dashboard_html", "export_html",
           "graph_page_html", "embed_html"]


def _widget_css() -> str:
    """The graph's stylesheet, plus the dashboards' (``explorer.css``, shared with
    the explorer), so dashboard HTML in the panel is styled."""
    return widget_asset("circuit_graph.css") + "\n" + widget_asset("explorer.css")


# -- the widget ---------------------------------------------------------------------------
DashboardFn = Callable[[int, int], str]
ExpandFn = Callable[[str], Any]
# ([(layer, feature, position or None)], factor) -> summary dict (InterventionResult.summary)
InterveneFn = Callable[[list, float], Mapping]



class CircuitGraphWidget(anywidget.AnyWidget):
    """The circuit graph with a dashboard panel, prune slider and expand button.

    Parameters
    ----------
    graph : an attribution graph (dict / JSON / path / CircuitGraph).
    dashboard : ``(layer, feature) -> str`` returning a feature dashboard's HTML
        (e.g. built with ``tc_explore.dashboard``); without it the panel lists
        the node's fields.
    expand : ``(node_id) -> graph`` returning the graph with ``node_id`` traced one
        step further (e.g. wrapping ``tc_explore.circuits``' path search);
        without it the expand button is disabled.
    threshold : initial prune threshold in [0, 1]. For an attribution graph the
        node threshold of ``AttributionGraph.prune`` (the slider shows the
        nodes ``prune(node_threshold=...)`` keeps; default: the file's
        ``node_threshold``, else 1, everything); for a path graph a fraction of
        the largest |value| (default 0, everything).
    intervene : ``(features, factor) -> summary`` scaling the given
        ``(layer, feature, position)`` triples by ``factor`` and returning the
        result (:func:`tc_explore.interventions.feature_scaling`); without it the
        intervention controls are disabled.
    """
    _esm = widget_asset("circuit_graph.js")
    _css = _widget_css()

    graph_data = traitlets.Dict().tag(sync=True)
    selected_node = traitlets.Unicode("").tag(sync=True)
    dashboard = traitlets.Dict().tag(sync=True)
    threshold = traitlets.Float(0.0).tag(sync=True)
    can_expand = traitlets.Bool(False).tag(sync=True)
    has_dashboards = traitlets.Bool(False).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)
    intervention_nodes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    intervention_scale = traitlets.Float(0.0).tag(sync=True)
    intervention = traitlets.Dict().tag(sync=True)
    can_intervene = traitlets.Bool(False).tag(sync=True)
    # Neuronpedia's subgraph state: pinned node ids, and supernodes [name, *node_ids]
    pinned_nodes = traitlets.List(traitlets.Unicode()).tag(sync=True)
    pinned_only = traitlets.Bool(False).tag(sync=True)
    supernodes = traitlets.List(traitlets.List(traitlets.Unicode())).tag(sync=True)

    def __init__(self, graph: Any, dashboard: DashboardFn | None = None,
                 expand: ExpandFn | None = None, threshold: float | None = None,
                 expandable: Callable[[Mapping], bool] | None = None,
                 intervene: InterveneFn | None = None, **kwargs):
        if dashboard is not None and not callable(dashboard):
            raise InvalidInputError("dashboard must be a function (layer, feature) -> HTML string.")
        if expand is not None and not callable(expand):
            raise InvalidInputError("expand must be a function (node_id) -> graph.")
        if intervene is not None and not callable(intervene):
            raise InvalidInputError("intervene must be a function (features, factor) -> summary, "
                                    "e.g. tc_explore.interventions.feature_scaling(model, transcoders, prompt).")
        self._intervene_fn = intervene
        self._dashboard_fn = dashboard
        self._expand_fn = expand
        self._expandable_fn = expandable
        self._expanded: set[str] = set()
        self._dashboard_cache: dict[tuple[int, int], str] = {}
        self._graph = _as_graph_dict(graph)
        view = self._view()
        super().__init__(graph_data=view, threshold=_resolve_threshold(view, threshold),
                         can_expand=expand is not None, has_dashboards=dashboard is not None,
                         can_intervene=intervene is not None, **kwargs)
        self.on_msg(self._handle_message)
        # a file saved with a subgraph (Neuronpedia's qParams) opens with it
        q = self._graph.get("qParams") or {}
        if isinstance(q, Mapping):
            pins = [p for p in q.get("pinnedIds") or [] if isinstance(p, str) and self.node(p) is not None]
            groups = [[str(g[0]), *[m for m in g[1:] if isinstance(m, str) and self.node(m) is not None]]
                      for g in q.get("supernodes") or [] if isinstance(g, list) and g]
            self.pinned_nodes = pins
            self.supernodes = [g for g in groups if len(g) > 1 and g[0].strip()]

    # -- graph ---------------------------------------------------------------------
    @property
    def graph(self) -> dict:
        """The graph (graph JSON dict) currently shown."""
        return self._graph

    def set_graph(self, graph: Any) -> None:
        """Show another graph (keeps the selection if the node is still there)."""
        self._graph = _as_graph_dict(graph)
        self.graph_data = self._view()
        if self.selected_node and self.node(self.selected_node) is None:
            self.selected_node = ""
        kept = [n for n in self.intervention_nodes if self.node(n) is not None]
        if kept != list(self.intervention_nodes):
            self.intervention_nodes = kept

    def _view(self) -> dict:
        return graph_view_data(self._graph, expanded=self._expanded, expandable=self._expandable_fn)

    # -- pinned subgraph and supernodes ------------------------------------------------
    @traitlets.validate("pinned_nodes")
    def _valid_pins(self, proposal):
        ids = list(dict.fromkeys(proposal["value"]))
        for nid in ids:
            if self.node(nid) is None:
                raise InvalidInputError(f"Cannot pin {nid!r}: no node with that id in this graph.")
        return ids

    @traitlets.validate("supernodes")
    def _valid_supernodes(self, proposal):
        groups = []
        for g in proposal["value"]:
            if len(g) < 2 or not str(g[0]).strip():
                raise InvalidInputError(f"A supernode is [name, node_id, ...] with a non-empty name and at "
                                        f"least one node, got {list(g)!r}.")
            for nid in g[1:]:
                if self.node(nid) is None:
                    raise InvalidInputError(f"Supernode {g[0]!r}: no node {nid!r} in this graph.")
            groups.append([str(g[0]).strip(), *dict.fromkeys(g[1:])])
        return groups

    def pin(self, *node_ids: str) -> list[str]:
        """Pin nodes (into the subgraph shown with *pinned only*); returns the pinned ids."""
        self.pinned_nodes = list(self.pinned_nodes) + list(node_ids)
        return list(self.pinned_nodes)

    def unpin(self, *node_ids: str) -> list[str]:
        drop = set(node_ids)
        self.pinned_nodes = [n for n in self.pinned_nodes if n not in drop]
        return list(self.pinned_nodes)

    def group(self, name: str, node_ids=None) -> list[list[str]]:
        """Group ``node_ids`` (default: the pinned nodes) into a supernode called
        ``name`` (replacing a group of that name); the members are pinned too."""
        members = list(node_ids) if node_ids is not None else list(self.pinned_nodes)
        if not members:
            raise InvalidInputError("Nothing to group: pin nodes first or pass node_ids.")
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(f"A supernode needs a non-empty name, got {name!r}.")
        self.supernodes = [g for g in self.supernodes if g[0] != name.strip()] + [[name.strip(), *members]]
        self.pin(*members)
        return [list(g) for g in self.supernodes]

    def graph_json(self) -> dict:
        """The graph file as shown, with the pinned nodes and supernodes in
        ``qParams`` (``pinnedIds``, ``supernodes``) as Neuronpedia saves a subgraph."""
        data = dict(self._graph)
        q = dict(data.get("qParams") or {})
        q.update(pinnedIds=list(self.pinned_nodes), supernodes=[list(g) for g in self.supernodes])
        q.setdefault("linkType", "both")
        q.setdefault("clickedId", self.selected_node or "")
        q.setdefault("sg_pos", "")
        data["qParams"] = q
        return data

    def node(self, node_id: str) -> dict | None:
        """The view of one node (kind, row, ctx, label, contribution, ...), or None."""
        for n in self.graph_data.get("nodes", []):
            if n["id"] == node_id:
                return n
        return None

    @property
    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.graph_data.get("nodes", [])]

    # -- prune ---------------------------------------------------------------------
    @traitlets.validate("threshold")
    def _valid_threshold(self, proposal):
        return _check_threshold(proposal["value"])

    def visible(self) -> tuple[set[str], list[dict]]:
        """(node ids, links) shown at the current prune threshold."""
        nodes, idx = visible_elements(self.graph_data, self.threshold)
        links = self.graph_data.get("links", [])
        return nodes, [links[i] for i in idx]

    def prune(self, threshold: float) -> set[str]:
        """Set the prune threshold (what the slider does); returns the node ids
        still shown. On an attribution graph these are the nodes
        ``graph.prune(node_threshold=threshold)`` keeps among those in the file."""
        self.threshold = as_number(threshold, "The prune threshold", 0.0, 1.0)
        return self.visible()[0]

    # -- selection and dashboards --------------------------------------------------
    @traitlets.validate("selected_node")
    def _valid_selection(self, proposal):
        value = proposal["value"] or ""
        if value and self.node(value) is None:
            raise InvalidInputError(f"No node {value!r} in this graph.")
        return value

    @traitlets.observe("selected_node")
    def _on_select(self, change) -> None:
        node_id = change["new"]
        if not node_id:
            self.dashboard = {}
            return
        self.dashboard = self.dashboard_for(node_id)

    def select(self, node_id: str) -> dict:
        """Select a node as a click would; returns the dashboard shown."""
        if not isinstance(node_id, str):
            raise InvalidInputError(f"A node id is a string such as '1_23_4', got {type(node_id).__name__} "
                                    f"{node_id!r:.40}.")
        self.selected_node = node_id
        return self.dashboard

    def dashboard_for(self, node_id: str) -> dict:
        """``{node_id, layer, feature, html}`` for the panel: the feature's dashboard
        for a transcoder-feature node (when a dashboard function was given), else a
        table of the node's fields."""
        node = self.node(node_id)
        if node is None:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        layer, feature = node["layer"], node["feature"]
        if node["kind"] == "feature" and feature is not None and self._dashboard_fn is not None:
            key = (int(layer), int(feature))
            if key not in self._dashboard_cache:
                try:
                    self._dashboard_cache[key] = str(self._dashboard_fn(*key))
                except Exception as err:  # shown in the panel, and re-raised in Python use
                    self.status = f"dashboard of layer {layer} feature {feature} failed: {err}"
                    return dict(node_id=node_id, layer=layer, feature=feature,
                                html=f'<p class="tcx-error">{_html.escape(str(err))}</p>')
            body = self._dashboard_cache[key]
        else:
            body = _node_summary_html(node)
        return dict(node_id=node_id, layer=layer, feature=feature, html=body)

    # -- expand --------------------------------------------------------------------
    def expand_node(self, node_id: str | None = None) -> dict:
        """Trace ``node_id`` (default: the selected node) one step further with the
        ``expand`` function and show the result; returns the new graph."""
        node_id = node_id or self.selected_node
        if not node_id:
            raise InvalidInputError("Select a node to expand first.")
        node = self.node(node_id)
        if node is None:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        if self._expand_fn is None:
            raise InvalidInputError("This widget was made without an expand function, "
                                    "so it cannot trace further.")
        if not node["expandable"]:
            raise InvalidInputError(f"{node['label']} cannot be traced further "
                                    f"(a {node['kind']} node, or already expanded).")
        before = set(self.node_ids)
        new_graph = self._expand_fn(node_id)
        self._expanded.add(node_id)
        self.set_graph(new_graph)
        added = len(set(self.node_ids) - before)
        self.status = f"expanded {node['label']}: {added} new node{'s' if added != 1 else ''}"
        return self._graph

    # -- interventions -------------------------------------------------------------
    def _intervention_target(self, node_id: str) -> tuple[int, int, int | None]:
        """(layer, feature, position) of a feature node; position None for a node
        summed over tokens (it stands for the feature at every position)."""
        node = self.node(node_id)
        if node is None:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        if node["kind"] != "feature" or node["layer"] is None or node["feature"] is None:
            raise InvalidInputError(f"{node['label']} is not a transcoder feature: only features "
                                    "can be ablated or scaled.")
        raw = next((n for n in self._graph["nodes"] if str(n["node_id"]) == node_id), {})
        summed = "tc_token" in raw and raw["tc_token"] is None or str(node_id).endswith("_all")
        return int(node["layer"]), int(node["feature"]), None if summed else int(node["ctx"])

    @traitlets.validate("intervention_nodes")
    def _valid_intervention_nodes(self, proposal):
        nodes = list(dict.fromkeys(proposal["value"]))
        for node_id in nodes:
            self._intervention_target(node_id)
        return nodes

    @traitlets.observe("intervention_nodes", "intervention_scale")
    def _on_intervention(self, change) -> None:
        self.intervention = self._run_intervention()

    def _run_intervention(self) -> dict:
        if not self.intervention_nodes:
            return {}
        if self._intervene_fn is None:
            raise InvalidInputError("This widget was made without an intervene function, so it cannot "
                                    "intervene; pass intervene=feature_scaling(model, transcoders, prompt).")
        features = [self._intervention_target(n) for n in self.intervention_nodes]
        try:
            result = dict(self._intervene_fn(features, float(self.intervention_scale)))
        except Exception as err:  # shown in the widget; re-raised in Python use
            self.status = f"intervention failed: {err}"
            raise
        result["nodes"] = list(self.intervention_nodes)
        result["scale"] = float(self.intervention_scale)
        return result

    def set_intervention(self, node_ids, scale: float | None = None) -> dict:
        """Scale the feature nodes ``node_ids`` by ``scale`` (0 ablates; default:
        the slider's value) as the controls do; returns the result shown."""
        if scale is not None:
            self.intervention_scale = as_number(scale, "scale")
        if isinstance(node_ids, str):
            node_ids = [node_ids]
        self.intervention_nodes = [str(n) for n in node_ids]
        return self.intervention

    def toggle_intervention(self, node_id: str | None = None) -> dict:
        """Add ``node_id`` (default: the selected node) to the intervened nodes,
        or remove it if it is there; returns the result shown."""
        node_id = node_id or self.selected_node
        if not node_id:
            raise InvalidInputError("Select a feature node first.")
        nodes = list(self.intervention_nodes)
        self.intervention_nodes = [n for n in nodes if n != node_id] if node_id in nodes else nodes + [node_id]
        return self.intervention

    def clear_interventions(self) -> None:
        self.intervention_nodes = []

    def _handle_message(self, _widget, content, _buffers) -> None:
        if not isinstance(content, dict):
            return
        actions = {"expand": lambda: self.expand_node(str(content.get("node_id") or "")),
                   "intervene_toggle": lambda: self.toggle_intervention(str(content.get("node_id") or "")),
                   "intervene_clear": self.clear_interventions}
        action = actions.get(content.get("type"))
        if action is None:
            return
        self.status = ""
        try:
            action()
        except Exception as err:  # reported in the widget; the kernel keeps running
            self.status = f"{content.get('type').replace('_', ' ')} failed: {err}"

    # -- export --------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        """The widget for a live kernel, plus ``text/html``: the graph and every
        feature's dashboard as a self-contained fragment (:func:`embed_html`),
        which static HTML exports of the notebook show offline."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, None)
        if data is None:
            return bundle
        data = dict(data)
        data["text/html"] = self.embed_html()
        return (data, metadata) if metadata is not None else data

    def embed_html(self) -> str:
        """The current graph, selection and prune threshold, with the
        dashboards of every node pre-rendered, as a self-contained HTML fragment."""
        dashboards = {nid: self.dashboard_for(nid) for nid in self.node_ids}
        return embed_html(self.graph_data, dashboards, threshold=self.threshold,
                          selected=self.selected_node, has_dashboards=self._dashboard_fn is not None,
                          pinned=self.pinned_nodes, supernodes=self.supernodes)

    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None) -> str:
        """A standalone HTML page with the graph, the browser module inlined and
        the dashboards of every feature node pre-rendered; works with no Python.
        Writes it to ``path`` when given; returns the HTML."""
        dashboards = {nid: self.dashboard_for(nid) for nid in self.node_ids}
        page = graph_page_html(self.graph_data, dashboards, threshold=self.threshold,
                               selected=self.selected_node, has_dashboards=self._dashboard_fn is not None,
                               title=title or self.graph_data.get("title") or "circuit graph",
                               pinned=self.pinned_nodes, supernodes=self.supernodes)
        if path is not None:
            _write_page(path, page)
        return page


def _script_json(obj) -> str:
    """JSON safe to embed inside a <script> element."""
    return (json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def export_html(view: Mapping, path: str | os.PathLike, dashboards: Mapping[str, Mapping] | None = None,
                threshold: float | None = None, selected: str = "", title: str = "circuit graph",
                has_dashboards: bool = False) -> Path:
    """Write the standalone page of :func:`graph_page_html` to ``path`` (as
    ``tc_explore.dashboard.export_html`` does for dashboards); returns the path."""
    return _write_page(path, graph_page_html(view, dashboards, threshold, selected, title, has_dashboards))


def _write_page(path: str | os.PathLike, page: str) -> Path:
    from ..integrity import write_text_atomic
    return write_text_atomic(path, page)


def embed_html(view: Mapping, dashboards: Mapping[str, Mapping] | None = None,
               threshold: float | None = None, selected: str = "", has_dashboards: bool = False,
               element_id: str | None = None, pinned=(), supernodes=()) -> str:
    """The graph as a self-contained HTML fragment: its CSS, the browser module
    inlined, and a stand-in for the widget model that serves the given per-node
    dashboards ``{node_id: {node_id, layer, feature, html}}``. It needs no
    Python and no network, and several fit in one page (each under its own
    ``element_id``): ``widgets/circuit_graph_embed.html`` with its slots filled.
    ``has_dashboards``: the entries include feature dashboards (the panel's hint
    says so), not only the nodes' fields."""
    dashboards = dict(dashboards or {})
    state = dict(graph_data=dict(view), selected_node=selected or "",
                 dashboard=dashboards.get(selected, {}) if selected else {},
                 threshold=_resolve_threshold(view, threshold), can_expand=False, status="",
                 has_dashboards=bool(has_dashboards),
                 intervention_nodes=[], intervention_scale=0.0, intervention={}, can_intervene=False,
                 pinned_nodes=list(pinned), pinned_only=False, supernodes=[list(g) for g in supernodes])
    module = widget_asset("circuit_graph.js")
    if "</script" in module.lower():
        raise InvalidInputError("The widget module contains '</script' and cannot be inlined.")
    slots = dict(id=element_id or f"tcx-graph-{os.getpid()}-{next(_EMBED_IDS)}", css=_widget_css(),
                 state=_script_json(state), dashboards=_script_json(dashboards), module=module)
    # one pass: text put into a slot is never searched for slots itself
    return re.sub(r"@@(\w+)@@", lambda m: slots[m.group(1)], widget_asset("circuit_graph_embed.html"))


_EMBED_IDS = itertools.count()


def graph_page_html(view: Mapping, dashboards: Mapping[str, Mapping] | None = None,
                    threshold: float | None = None, selected: str = "", title: str = "circuit graph",
                    has_dashboards: bool = False, pinned=(), supernodes=()) -> str:
    """A standalone page for ``view`` (from :func:`graph_view_data`): the
    :func:`embed_html` fragment in ``widgets/circuit_graph_page.html``."""
    slots = dict(title=_html.escape(title),
                 embed=embed_html(view, dashboards, threshold, selected, has_dashboards,
                                  element_id="tcx-graph", pinned=pinned, supernodes=supernodes))
    return re.sub(r"@@(\w+)@@", lambda m: slots[m.group(1)], widget_asset("circuit_graph_page.html"))


def feature_dashboard_html(index, model=None, transcoders=None, **options) -> DashboardFn:
    """``(layer, feature) -> HTML`` for the widget's dashboard panel: the
    library's :func:`tc_explore.dashboard.feature_dashboard` over a built
    :class:`~tc_explore.index.FeatureIndex`, rendered by
    :func:`tc_explore.dashboard.dashboard_html` (static HTML, no JavaScript)."""
    from ..dashboard import dashboard_html, feature_dashboard
    if index is None:
        raise InvalidInputError("Feature dashboards need a FeatureIndex (FeatureIndex.build / .load).")

    def fn(layer: int, feature: int) -> str:
        return dashboard_html(feature_dashboard(index, layer, feature, model=model,
                                                transcoders=transcoders, **options))
    return fn


def circuit_graph_widget(result, dashboard: DashboardFn | None = None, branches: int | None = None,
                         threshold: float | None = None, slug: str = "tc-explore-graph", metric=None,
                         constrained: bool = False, intervene: InterveneFn | None = None
                         ) -> CircuitGraphWidget:
    """A :class:`CircuitGraphWidget` over a path search (``find_paths``) whose
    expand button traces further with :class:`tc_explore.circuits.PathGraphExpander`
    and whose intervention controls scale features on the search's prompt with
    :func:`tc_explore.interventions.feature_scaling` (``metric``: shown before and
    after; default the search's target).

    ``result`` may also be a graph already built or loaded: an
    :class:`~tc_explore.circuits.AttributionGraph` (prune it first), a
    :class:`~tc_explore.circuits.CircuitGraph`, a graph JSON dict, JSON text or a
    ``.json`` path (e.g. a file from circuit-tracer); it is drawn as it is, with
    no expand controls, and with intervention controls when ``intervene`` is
    given (e.g. ``feature_scaling(model, transcoders, prompt)`` for the graph's
    prompt)."""
    from ..circuits import PathGraphExpander
    from ..circuits.paths import PathSearchResult
    from ..interventions import feature_scaling
    if not isinstance(result, PathSearchResult):
        return CircuitGraphWidget(result, dashboard=dashboard, threshold=threshold, intervene=intervene)
    expander = PathGraphExpander(result, branches=branches, slug=slug)
    ctx = result.ctx
    scaling = intervene if intervene is not None or ctx is None else feature_scaling(
        ctx.model, ctx.transcoders, ctx, metric=result.target if metric is None else metric,
        constrained=constrained)
    w = CircuitGraphWidget(expander.graph(), dashboard=dashboard, expand=expander.expand,
                           expandable=expander.expandable, threshold=threshold, intervene=scaling)
    w.expander = expander
    return w
