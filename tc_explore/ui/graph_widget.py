"""Interactive circuit graph: an anywidget view of an attribution graph.

    w = CircuitGraphWidget(graph, dashboard=..., expand=...)
    w                          # in JupyterLab / VS Code: the graph and a dashboard panel
    w.selected_node            # the node clicked in the browser ("" for none)
    w.threshold = 0.1          # prune: hide what is below 10% of the largest value
    w.expand_node(node_id)     # what the "expand selected" button does
    w.to_html("graph.html")    # standalone file: graph + pre-rendered dashboards, no Python

``graph`` is an attribution graph in the JSON layout of FORMATS.md §4 (a dict,
a JSON string, a path to a ``.json`` file, or any object with ``to_json()``
/ ``to_dict()`` such as :class:`tc_explore.circuits.graph.CircuitGraph`). This
module computes nothing about the model: it turns the graph into what the
browser draws (rows, columns, labels, tooltip fields) and calls the functions
it was given — ``dashboard(layer, feature) -> html`` for a feature's dashboard
and ``expand(node_id) -> graph`` to trace a node one step further — which are
library functions (see :func:`circuit_graph_widget` for the wiring to
``tc_explore.dashboard`` and ``tc_explore.circuits``).

The browser side is ``widgets/circuit_graph.js`` and ``.css`` (package data
``tc_explore.widgets``), plain SVG with no network access.
"""
from __future__ import annotations

import html as _html
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import anywidget
import traitlets

from ..errors import InvalidInputError

__all__ = ["CircuitGraphWidget", "PathGraphExpander", "circuit_graph_widget",
           "feature_dashboard_html", "graph_view_data", "visible_elements", "export_html",
           "widget_asset", "node_kind", "parse_feature_node"]


# -- assets ----------------------------------------------------------------------------
def widget_asset(name: str) -> str:
    """Text of a browser-side file shipped in the ``tc_explore.widgets`` package."""
    try:
        return resources.files("tc_explore.widgets").joinpath(name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise FileNotFoundError(
            f"Browser-side file {name!r} is missing from the tc_explore.widgets package; "
            "reinstall tc_explore (pip install -e .) so its package data is present.") from err


def _widget_css() -> str:
    """The graph's stylesheet, plus the dashboards' (``explorer.css``, shared with
    the explorer), so dashboard HTML in the panel is styled."""
    return widget_asset("circuit_graph.css") + "\n" + widget_asset("explorer.css")


# -- from FORMATS.md §4 to what the browser draws ------------------------------------------
_FEATURE_TYPES = {"cross layer transcoder", "transcoder", "transcoder feature", "feature",
                  "per layer transcoder"}
_ERROR_TYPES = {"mlp reconstruction error", "transcoder error", "error"}
_EMBED_TYPES = {"embedding", "position embedding", "positional embedding", "pos embedding"}
_BIAS_WORDS = ("bias", "remainder", "offset", "constant", "skip")
# Fields of §4 that the tooltip does not repeat (they are boilerplate or shown otherwise).
_BOILERPLATE = {"node_id", "jsNodeId", "feature", "layer", "ctx_idx", "feature_type", "run_idx",
                "reverse_ctx_idx", "clerp", "token_prob", "is_target_logit"}


# tc_explore's own node kinds (the ``tc_kind`` field CircuitGraph writes) -> drawing kind
_TC_KINDS = {"feature": "feature", "head": "head", "embed": "embed", "pos_embed": "embed",
             "error": "error", "mlp": "other", "skip": "bias", "attn_bias": "bias",
             "dec_bias": "bias", "offset": "bias", "remainder": "bias", "logit": "logit",
             "direction": "logit"}


def node_kind(node: Mapping) -> str:
    """The drawing kind of a §4 node: feature, head, embed, error, bias, logit or other."""
    if node.get("tc_kind") in _TC_KINDS:
        return _TC_KINDS[node["tc_kind"]]
    ftype = str(node.get("feature_type", "")).strip().lower()
    if ftype in _FEATURE_TYPES:
        return "feature"
    if ftype == "attention head" or ftype.startswith("attention"):
        return "head"
    if ftype in _EMBED_TYPES or ftype.endswith("embedding"):
        return "embed"
    if ftype in _ERROR_TYPES or "error" in ftype:
        return "error"
    if ftype == "logit" or ftype.endswith("target"):
        return "logit"
    if any(w in ftype for w in _BIAS_WORDS):
        return "bias"
    return "other"


def parse_feature_node(node: Mapping) -> tuple[int, int] | None:
    """(layer, feature index) of a transcoder-feature node. §4's ``feature``
    field is a pairing of (layer, feature), so the index is read from our
    extra field ``feature_index`` when present, else from ``node_id``
    ``"{layer}_{feature}_{pos}"``."""
    if node_kind(node) != "feature":
        return None
    if isinstance(node.get("tc_layer"), int) and isinstance(node.get("tc_index"), int):
        return node["tc_layer"], node["tc_index"]
    try:
        layer = int(node["layer"])
    except (KeyError, TypeError, ValueError):
        return None
    for key in ("feature_index", "feature_idx", "index"):
        if isinstance(node.get(key), (int, float)) and not isinstance(node.get(key), bool):
            return layer, int(node[key])
    parts = str(node.get("node_id", "")).split("_")
    if len(parts) == 3 and all(p.lstrip("-").isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _head_layer(node: Mapping) -> int | None:
    for key in ("tc_layer", "attn_layer", "layer"):
        try:
            return int(node[key])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _number(v) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


def _as_graph_dict(graph: Any) -> dict:
    """Accept a §4 dict, a JSON string, a path, or an object with to_json()/to_dict()."""
    if isinstance(graph, Mapping):
        data = dict(graph)
    elif isinstance(graph, (str, os.PathLike)):
        text = str(graph)
        if isinstance(graph, os.PathLike) or (not text.lstrip().startswith("{") and
                                              Path(text).suffix == ".json"):
            path = Path(text)
            if not path.is_file():
                raise InvalidInputError(f"No graph file at {path}.")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"The graph is not valid JSON: {err}.") from None
    elif hasattr(graph, "to_dict"):
        data = graph.to_dict()
    elif hasattr(graph, "to_json"):
        out = graph.to_json()
        data = json.loads(out) if isinstance(out, str) else dict(out)
    else:
        raise InvalidInputError(
            f"Expected an attribution graph (a dict in the FORMATS.md §4 layout, JSON text, a "
            f".json path, or a CircuitGraph), got {type(graph).__name__}.")
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or \
            not isinstance(data.get("links", []), list):
        raise InvalidInputError("An attribution graph needs a 'nodes' list and a 'links' list "
                                "(FORMATS.md §4).")
    for i, n in enumerate(data["nodes"]):
        if not isinstance(n, Mapping) or "node_id" not in n:
            raise InvalidInputError(f"Graph node {i} has no 'node_id'.")
    ids = {str(n["node_id"]) for n in data["nodes"]}
    if len(ids) != len(data["nodes"]):
        raise InvalidInputError("The graph has two nodes with the same node_id.")
    for l in data.get("links", []):
        if not isinstance(l, Mapping) or "source" not in l or "target" not in l:
            raise InvalidInputError(f"Graph link {l!r} needs 'source' and 'target'.")
        for end in ("source", "target"):
            if str(l[end]) not in ids:
                raise InvalidInputError(f"Graph link {l!r} refers to an unknown node {l[end]!r}.")
    return data


def _contribution(node: Mapping) -> float:
    for key in ("contribution", "value", "influence", "activation"):
        v = _number(node.get(key))
        if v is not None:
            return v
    return 0.0


def graph_view_data(graph: Any, expanded: set[str] | frozenset = frozenset(),
                    expandable: Callable[[Mapping], bool] | None = None) -> dict:
    """What the browser draws, from a §4 graph: rows (embedding, attention and
    MLP of each layer, output), one column per prompt token, every node with
    its kind, row, column, label, signed value (``contribution``, else
    ``influence``/``activation``), tooltip fields and whether it is the root
    (a target: ``is_target_logit`` / ``is_target``, or a node nothing reads)."""
    data = _as_graph_dict(graph)
    meta = data.get("metadata", {}) or {}
    nodes, links = data["nodes"], data.get("links", [])
    tokens = [str(t) for t in meta.get("prompt_tokens", []) or []]

    layers = []
    for n in nodes:
        try:
            layers.append(int(n.get("layer")))
        except (TypeError, ValueError):
            pass
    logit_layers = [int(n["layer"]) for n in nodes if node_kind(n) == "logit"
                    and str(n.get("layer", "")).lstrip("-").isdigit()]
    n_layers = meta.get("n_layers")
    if not isinstance(n_layers, int):
        n_layers = (max(logit_layers) - 1) if logit_layers else (max(layers) + 1 if layers else 0)

    sources = {str(l["source"]) for l in links}
    def flagged(n):
        return bool(n.get("tc_is_target") or n.get("is_target_logit") or n.get("is_target"))
    has_target_flag = any(flagged(n) for n in nodes)
    parent_of = {}
    for l in links:
        parent_of.setdefault(str(l["source"]), str(l["target"]))
    by_id = {str(n["node_id"]): n for n in nodes}

    def row_of(n: Mapping, kind: str, depth: int = 0) -> int:
        tc = n.get("tc_kind")
        if tc == "remainder" and depth < 3 and str(n["node_id"]) in parent_of:
            return row_of(by_id[parent_of[str(n["node_id"])]], node_kind(
                by_id[parent_of[str(n["node_id"])]]), depth + 1)   # beside what it belongs to
        if kind == "embed" or str(n.get("layer")) == "E":
            return 0
        if kind == "logit":
            return 2 * n_layers + 1
        if tc == "attn_bias" and isinstance(n.get("tc_layer"), int):
            return 2 * n["tc_layer"] + 1
        if kind == "head":
            l = _head_layer(n)
            return 2 * l + 1 if l is not None else 2 * n_layers + 1
        try:
            l = int(n.get("layer"))
        except (TypeError, ValueError):
            return 2 * n_layers + 1
        if l > n_layers - 1:                 # a §4 logit-layer number on a non-logit node
            return 2 * n_layers + 1
        return 2 * l + 2

    def row_label(r: int) -> str:
        if r == 0:
            return "emb"
        if r == 2 * n_layers + 1:
            return "out"
        return f"attn {(r - 1) // 2}" if r % 2 == 1 else f"mlp {(r - 2) // 2}"

    out_nodes = []
    for n in nodes:
        kind = node_kind(n)
        nid = str(n["node_id"])
        ctx = n.get("ctx_idx")
        ctx = int(ctx) if isinstance(ctx, (int, float)) and not isinstance(ctx, bool) else 0
        is_root = flagged(n) if has_target_flag else (nid not in sources)
        parsed = parse_feature_node(n)
        layer = parsed[0] if parsed else (_head_layer(n) if kind in ("head", "error") else None)
        feature = parsed[1] if parsed else None
        contribution = _contribution(n)
        label = str(n.get("clerp") or "").strip() or _default_label(n, kind, parsed, tokens, ctx)
        tip: list[list] = [["kind", str(n.get("feature_type", kind))]]
        if 0 <= ctx < len(tokens):
            tip.append(["token", f"{ctx} {tokens[ctx]!r}"])
        tip.append(["contribution" if not is_root else "value", contribution])
        act = _number(n.get("activation"))
        if act is not None and not is_root and kind in ("feature", "head") and act != 0:
            # contribution = activation × gain: the input-dependent and the input-invariant factor
            tip.append(["attention weight" if kind == "head" else "activation", act])
            tip.append(["gain (contribution / " + ("weight)" if kind == "head" else "activation)"),
                        contribution / act])
        for key, v in n.items():
            if key in _BOILERPLATE or key in ("contribution", "activation") or v is None \
                    or key.startswith("tc_") or (key == "influence" and "contribution" not in n):
                continue
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                tip.append([key, v])
        if parsed:
            tip.append(["feature", f"layer {parsed[0]}, #{parsed[1]}"])
        can = nid not in expanded and (expandable(n) if expandable else kind in ("feature", "head"))
        out_nodes.append(dict(id=nid, kind=kind, row=row_of(n, kind), ctx=ctx, label=label,
                              contribution=contribution, layer=layer, feature=feature,
                              is_root=is_root, expandable=bool(can), tooltip=tip))
    rows = sorted({n["row"] for n in out_nodes})
    out_links = [dict(source=str(l["source"]), target=str(l["target"]),
                      weight=_number(l.get("weight")) or 0.0) for l in links]
    title = str(meta.get("prompt") or "")
    if meta.get("slug"):
        title = f"{meta['slug']}: {title}" if title else str(meta["slug"])
    return dict(tokens=tokens, rows=[dict(row=r, label=row_label(r)) for r in rows],
                nodes=out_nodes, links=out_links, title=title)


def _default_label(n: Mapping, kind: str, parsed, tokens, ctx) -> str:
    tok = f" {tokens[ctx]!r}" if 0 <= ctx < len(tokens) else ""
    if parsed:
        return f"L{parsed[0]} feature {parsed[1]} @{ctx}{tok}"
    if kind == "head":
        h = n.get("head")
        return f"L{_head_layer(n)} head {h} @{ctx}{tok}"
    if kind == "embed":
        return f"embedding @{ctx}{tok}"
    if kind == "error":
        return f"L{n.get('layer')} MLP error @{ctx}{tok}"
    return f"{n.get('feature_type', kind)} {n.get('node_id')}"


def visible_elements(view: Mapping, threshold: float) -> tuple[set[str], list[int]]:
    """Node ids and link indices shown at prune ``threshold`` (a fraction of
    the largest |contribution| among non-root nodes / of the largest |weight|);
    the same rule as ``visibility`` in circuit_graph.js. Roots always show;
    a link shows when both ends show and its |weight| reaches the threshold."""
    t = _check_threshold(threshold)
    nodes, links = view.get("nodes", []), view.get("links", [])
    max_c = max([abs(n["contribution"]) for n in nodes if not n["is_root"]], default=0.0)
    max_w = max([abs(l["weight"]) for l in links], default=0.0)
    shown = {n["id"] for n in nodes if n["is_root"] or abs(n["contribution"]) >= t * max_c}
    shown_links = [i for i, l in enumerate(links)
                   if l["source"] in shown and l["target"] in shown and abs(l["weight"]) >= t * max_w]
    return shown, shown_links


def _check_threshold(t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise InvalidInputError(f"The prune threshold must be a number in [0, 1], got {t!r}.") from None
    if not 0.0 <= t <= 1.0:
        raise InvalidInputError(
            f"The prune threshold is a fraction of the largest value, in [0, 1]; got {t}.")
    return t


def _node_summary_html(node: Mapping) -> str:
    """The panel's content for a node that has no feature dashboard: its fields."""
    rows = "".join(f"<tr><th>{_html.escape(str(k))}</th><td>{_html.escape(_fmt(v))}</td></tr>"
                   for k, v in node.get("tooltip", []))
    return (f'<div class="tcx-node-summary" data-node-id="{_html.escape(node["id"])}">'
            f"<p>{_html.escape(node['label'])}</p><table>{rows}</table></div>")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


# -- the widget ---------------------------------------------------------------------------
DashboardFn = Callable[[int, int], str]
ExpandFn = Callable[[str], Any]


class CircuitGraphWidget(anywidget.AnyWidget):
    """The circuit graph with a dashboard panel, prune slider and expand button.

    Parameters
    ----------
    graph : a §4 attribution graph (dict / JSON / path / CircuitGraph).
    dashboard : ``(layer, feature) -> str`` returning a feature dashboard's HTML
        (e.g. built with ``tc_explore.dashboard``); without it the panel lists
        the node's fields.
    expand : ``(node_id) -> graph`` returning the graph with ``node_id`` traced one
        step further (e.g. wrapping ``tc_explore.circuits``' path search);
        without it the expand button is disabled.
    threshold : initial prune threshold, a fraction in [0, 1].
    """
    _esm = widget_asset("circuit_graph.js")
    _css = _widget_css()

    graph_data = traitlets.Dict().tag(sync=True)
    selected_node = traitlets.Unicode("").tag(sync=True)
    dashboard = traitlets.Dict().tag(sync=True)
    threshold = traitlets.Float(0.0).tag(sync=True)
    can_expand = traitlets.Bool(False).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)

    def __init__(self, graph: Any, dashboard: DashboardFn | None = None,
                 expand: ExpandFn | None = None, threshold: float = 0.0,
                 expandable: Callable[[Mapping], bool] | None = None, **kwargs):
        if dashboard is not None and not callable(dashboard):
            raise InvalidInputError("dashboard must be a function (layer, feature) -> HTML string.")
        if expand is not None and not callable(expand):
            raise InvalidInputError("expand must be a function (node_id) -> graph.")
        self._dashboard_fn = dashboard
        self._expand_fn = expand
        self._expandable_fn = expandable
        self._expanded: set[str] = set()
        self._dashboard_cache: dict[tuple[int, int], str] = {}
        self._graph = _as_graph_dict(graph)
        super().__init__(graph_data=self._view(), threshold=_check_threshold(threshold),
                         can_expand=expand is not None, **kwargs)
        self.on_msg(self._handle_message)

    # -- graph ---------------------------------------------------------------------
    @property
    def graph(self) -> dict:
        """The §4 graph currently shown."""
        return self._graph

    def set_graph(self, graph: Any) -> None:
        """Show another graph (keeps the selection if the node is still there)."""
        self._graph = _as_graph_dict(graph)
        self.graph_data = self._view()
        if self.selected_node and self.node(self.selected_node) is None:
            self.selected_node = ""

    def _view(self) -> dict:
        return graph_view_data(self._graph, expanded=self._expanded, expandable=self._expandable_fn)

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
        """Set the prune threshold; returns the node ids still shown."""
        self.threshold = threshold
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
        ``expand`` function and show the result; returns the new §4 graph."""
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

    def _handle_message(self, _widget, content, _buffers) -> None:
        if not isinstance(content, dict) or content.get("type") != "expand":
            return
        self.status = ""
        try:
            self.expand_node(str(content.get("node_id") or ""))
        except Exception as err:  # reported in the widget; the kernel keeps running
            self.status = f"expand failed: {err}"

    # -- export --------------------------------------------------------------------
    def to_html(self, path: str | os.PathLike | None = None, title: str | None = None) -> str:
        """A standalone HTML page with the graph, the browser module inlined and
        the dashboards of every feature node pre-rendered; works with no Python.
        Writes it to ``path`` when given; returns the HTML."""
        dashboards = {nid: self.dashboard_for(nid) for nid in self.node_ids}
        page = export_html(self.graph_data, dashboards, threshold=self.threshold,
                           selected=self.selected_node,
                           title=title or self.graph_data.get("title") or "circuit graph")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(page, encoding="utf-8")
        return page


def _script_json(obj) -> str:
    """JSON safe to embed inside a <script> element."""
    return (json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>body {{ margin: 12px; background: #fff; }}
{css}</style></head>
<body>
<div id="tcx-root"></div>
<script type="application/json" id="tcx-state">{state}</script>
<script type="application/json" id="tcx-dashboards">{dashboards}</script>
<script type="text/plain" id="tcx-module">{module}</script>
<script type="module">
// A stand-in for the widget model: the same get/set/on/save_changes/send that
// anywidget gives the module, with the dashboards looked up from this page.
const state = JSON.parse(document.getElementById("tcx-state").textContent);
const dashboards = JSON.parse(document.getElementById("tcx-dashboards").textContent);
const listeners = {{}};
const model = {{
  get: (k) => state[k],
  set: (k, v) => {{
    const old = state[k];
    state[k] = v;
    if (old !== v) (listeners["change:" + k] || []).slice().forEach((cb) => cb());
    if (k === "selected_node") model.set("dashboard", dashboards[v] || {{}});
  }},
  on: (ev, cb) => {{ (listeners[ev] = listeners[ev] || []).push(cb); }},
  off: (ev, cb) => {{ listeners[ev] = (listeners[ev] || []).filter((x) => x !== cb); }},
  save_changes: () => {{}},
  send: () => {{ model.set("status", "expand needs the Python kernel"); }},
}};
const source = document.getElementById("tcx-module").textContent;
const url = URL.createObjectURL(new Blob([source], {{ type: "text/javascript" }}));
const mod = await import(url);
mod.default.render({{ model, el: document.getElementById("tcx-root") }});
document.body.dataset.ready = "1";
</script>
</body></html>
"""


def export_html(view: Mapping, dashboards: Mapping[str, Mapping] | None = None,
                threshold: float = 0.0, selected: str = "", title: str = "circuit graph") -> str:
    """A standalone page for ``view`` (from :func:`graph_view_data`) with the
    given per-node dashboards ``{node_id: {node_id, layer, feature, html}}``."""
    dashboards = dict(dashboards or {})
    state = dict(graph_data=dict(view), selected_node=selected or "",
                 dashboard=dashboards.get(selected, {}) if selected else {},
                 threshold=_check_threshold(threshold), can_expand=False, status="")
    module = widget_asset("circuit_graph.js")
    if "</script" in module.lower():
        raise InvalidInputError("The widget module contains '</script' and cannot be inlined.")
    return _PAGE.format(title=_html.escape(title), css=_widget_css(),
                        state=_script_json(state), dashboards=_script_json(dashboards),
                        module=module)


# -- wiring to the library: path search, expansion, dashboards ------------------------------
class PathGraphExpander:
    """Thin adapter over ``tc_explore.circuits``: keeps a path search's paths
    and grows them when a node is expanded.

    ``expand(node_id)`` takes every kept path that ends at that node and runs
    the library's path search (:func:`tc_explore.circuits.find_paths`, one
    iteration, ``branches`` contributors) from the node's next target — the
    target one step upstream whose value is the node's contribution — then
    appends the found contributors to the path. The graph is rebuilt with
    :meth:`CircuitGraph.from_paths`, on a copy of the search result whose
    iteration numbers mark exactly the expanded paths (so that "pruned
    remainder" nodes appear for expanded nodes only, as in a plain search).
    """

    def __init__(self, result, branches: int | None = None, sum_over_tokens: bool = False,
                 slug: str = "tc-explore-graph"):
        from ..circuits import PathSearchResult
        if not isinstance(result, PathSearchResult):
            raise InvalidInputError(f"Expected a PathSearchResult from tc_explore.circuits.find_paths, "
                                    f"got {type(result).__name__}.")
        if result.ctx is None:
            raise InvalidInputError("This PathSearchResult has no PromptContext (ctx); run "
                                    "find_paths with a context from prompt_context.")
        if sum_over_tokens:
            raise InvalidInputError("Expanding nodes needs per-token nodes; use sum_over_tokens=False.")
        self.result = result
        self.branches = int(branches or result.branches)
        if self.branches < 1:
            raise InvalidInputError(f"branches must be a positive integer, got {branches!r}.")
        self.slug = slug
        self.paths = list(result.paths)
        # paths whose head node was decomposed: by the search (every iteration but the last) ...
        self._expanded_keys = {p.key() for p in self.paths
                               if p.iteration < result.iterations and p.head.next_target is not None}
        self._graph = None

    def _result_for_graph(self):
        from ..circuits import Path, PathSearchResult
        big = 1 << 30
        paths = [Path(p.target, p.contributions, 0 if p.key() in self._expanded_keys else big)
                 for p in self.paths]
        r = self.result
        return PathSearchResult(r.target, paths, big, r.branches, r.mode,
                                n_decompositions=r.n_decompositions, ctx=r.ctx)

    def graph(self):
        """The current :class:`CircuitGraph`."""
        if self._graph is None:
            from ..circuits import CircuitGraph
            self._graph = CircuitGraph.from_paths(self._result_for_graph(), slug=self.slug)
        return self._graph

    def _paths_ending_at(self, node_id: str) -> list:
        graph = self.graph()
        if node_id not in graph.nodes:
            raise InvalidInputError(f"No node {node_id!r} in this graph.")
        node = graph.nodes[node_id].node
        return [p for p in self.paths if p.head.node == node]

    def expandable(self, record: Mapping) -> bool:
        """True if the node has a kept path that ends at it, can be traced
        (a feature, head or skip term) and was not decomposed yet."""
        nid = str(record.get("node_id"))
        if nid not in self.graph().nodes:
            return False
        return any(p.head.next_target is not None and p.key() not in self._expanded_keys
                   for p in self._paths_ending_at(nid))

    def expand(self, node_id: str):
        """Trace ``node_id`` one step further; returns the new CircuitGraph."""
        from ..circuits import Path, find_paths
        todo = [p for p in self._paths_ending_at(node_id)
                if p.head.next_target is not None and p.key() not in self._expanded_keys]
        if not todo:
            raise InvalidInputError(f"Node {node_id!r} cannot be traced further (a leaf such as an "
                                    "embedding, error or bias, or already expanded).")
        ctx = self.result.ctx
        for p in todo:
            sub = find_paths(ctx, p.head.next_target, iterations=1, branches=self.branches,
                             mode=self.result.mode)
            for q in sub.top():
                self.paths.append(Path(p.target, p.contributions + q.contributions, p.iteration + 1))
            self._expanded_keys.add(p.key())
        self._graph = None
        return self.graph()


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
                         threshold: float = 0.0, slug: str = "tc-explore-graph") -> CircuitGraphWidget:
    """A :class:`CircuitGraphWidget` over a path search (``find_paths``) whose
    expand button traces further with :class:`PathGraphExpander`."""
    expander = PathGraphExpander(result, branches=branches, slug=slug)
    w = CircuitGraphWidget(expander.graph(), dashboard=dashboard, expand=expander.expand,
                           expandable=expander.expandable, threshold=threshold)
    w.expander = expander
    return w
