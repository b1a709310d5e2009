// Circuit graph view for tc_explore (anywidget ES module, plain SVG, no dependencies).
//
// The Python side (tc_explore/ui/graph_widget.py) sends a laid-out-ready
// description of the graph in the `graph_data` trait:
//   {tokens: [str], rows: [{row, label}], title: str,
//    nodes: [{id, kind, row, ctx, label, contribution, layer, feature,
//             is_root, expandable, tooltip: [[name, value], ...]}],
//    links: [{source, target, weight}]}
// and the dashboard of the selected node in `dashboard` ({node_id, layer,
// feature, html}).  Everything numeric is computed in Python by library
// functions; this module only draws, and reports clicks back:
//   - clicking a node sets `selected_node` (synced to Python),
//   - the prune slider sets `threshold`: on an attribution graph
//     (graph_data.prune.mode "influence") the node threshold of
//     AttributionGraph.prune (each node carries its `prune_level`), on a path
//     graph a fraction of the largest |value|,
//   - the expand button sends {type: "expand", node_id} to Python,
//   - the intervention controls send {type: "intervene_toggle", node_id} and
//     {type: "intervene_clear"} and set `intervention_scale`; Python runs the
//     library's intervention and sends the result back in `intervention`
//     ({interventions, metric, metric_before, metric_after, metric_change,
//       top_tokens: [{token, prob, prob_before}], nodes, scale}).
// The same module runs in a standalone exported HTML file, where `model` is a
// small in-page object with the same get/set/on/save_changes/send methods.

const SVG_NS = "http://www.w3.org/2000/svg";

const KIND_LABELS = {
  feature: "transcoder feature",
  head: "attention head",
  embed: "embedding",
  error: "MLP error",
  bias: "bias / remainder",
  logit: "logit / target",
  other: "other",
};

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function html(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// A labelled range input with a span for its value: {label, input, value}
// (classes `${prefix}-label`, inputCls and `${prefix}-value`).
function rangeControl(prefix, inputCls, labelText, min, max, step, title) {
  const label = html("label", `${prefix}-label`, labelText);
  const input = html("input", inputCls);
  input.type = "range";
  input.min = min;
  input.max = max;
  input.step = step;
  input.title = title;
  const value = html("span", `${prefix}-value`);
  label.append(input, value);
  return { label, input, value };
}

function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (!isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return String(Number(v.toPrecision(5)));
}

// Which nodes and links stay visible at a prune threshold. Mirrors
// graph_view.visible_elements (CircuitGraphWidget.visible()) rule for rule.
export function visibility(data, threshold) {
  const nodes = data.nodes || [];
  const links = data.links || [];
  if ((data.prune || {}).mode === "influence") return visibilityByInfluence(nodes, links, Number(threshold));
  const maxC = Math.max(0, ...nodes.filter((n) => !n.is_root).map((n) => Math.abs(n.contribution || 0)));
  const maxW = Math.max(0, ...links.map((l) => Math.abs(l.weight || 0)));
  const t = Math.max(0, Math.min(1, Number(threshold) || 0));
  const shown = new Set();
  for (const n of nodes) {
    if (n.is_root || Math.abs(n.contribution || 0) >= t * maxC) shown.add(n.id);
  }
  const shownLinks = new Set();
  links.forEach((l, i) => {
    if (shown.has(l.source) && shown.has(l.target) && Math.abs(l.weight || 0) >= t * maxW) shownLinks.add(i);
  });
  return { nodes: shown, links: shownLinks };
}

// Attribution graphs: the node threshold of AttributionGraph.prune. Logits and
// embeddings always show; other nodes when prune_level < threshold; then
// features and errors without a link to a shown node, and features without a
// link from one, are hidden until nothing changes (as prune does).
const ALWAYS_SHOWN = new Set(["logit", "embed"]);
function visibilityByInfluence(nodes, links, t) {
  const kind = new Map(nodes.map((n) => [n.id, n.kind]));
  let shown = new Set(nodes.filter((n) => ALWAYS_SHOWN.has(n.kind)
    || (n.prune_level !== null && n.prune_level !== undefined && n.prune_level < t)).map((n) => n.id));
  for (;;) {
    const hasOut = new Set();
    const hasIn = new Set();
    for (const l of links) {
      if (l.weight !== 0 && shown.has(l.source) && shown.has(l.target)) {
        hasOut.add(l.source);
        hasIn.add(l.target);
      }
    }
    const keep = new Set([...shown].filter((id) => ALWAYS_SHOWN.has(kind.get(id))
      || (hasOut.has(id) && (kind.get(id) !== "feature" || hasIn.has(id)))));
    if (keep.size === shown.size) break;
    shown = keep;
  }
  const shownLinks = new Set();
  links.forEach((l, i) => { if (shown.has(l.source) && shown.has(l.target)) shownLinks.add(i); });
  return { nodes: shown, links: shownLinks };
}

const PRUNE_TEXT = {
  influence: ["node threshold ", "Show the nodes that hold this fraction of the influence on the targets, "
    + "as AttributionGraph.prune(node_threshold=...) keeps them; logits and embeddings always show"],
  contribution: ["prune below ", "Hide nodes and edges whose |contribution| or |weight| is below this "
    + "fraction of the largest"],
};

// Layer rows x token columns. Nodes of one (row, column) cell sit on a grid of
// fixed slots (at most PER_LINE a line, as many lines as the fullest cell of the
// row needs) so that no two overlap however many a cell holds; node radii stay
// under half a slot.
const SLOT = 20;
const PER_LINE = 8;
const LABEL_W = 64;

function layout(data) {
  const tokens = data.tokens || [];
  const rows = data.rows || [];
  const nodes = data.nodes || [];
  const nCols = Math.max(1, tokens.length, ...nodes.map((n) => (n.ctx ?? 0) + 1));
  const rowIndex = new Map(rows.map((r, i) => [r.row, i]));
  for (const n of nodes) {
    if (!rowIndex.has(n.row)) rowIndex.set(n.row, rowIndex.size);
  }
  const nRows = Math.max(1, rowIndex.size);
  const cells = new Map();
  for (const n of nodes) {
    const key = `${n.row}|${n.ctx ?? 0}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const maxInCell = Math.max(1, ...[...cells.values()].map((c) => c.length));
  const perLine = Math.max(1, Math.min(PER_LINE, maxInCell));
  const colW = Math.max(84, perLine * SLOT + 16);
  const lines = new Map();
  for (const cell of cells.values()) {
    const r = rowIndex.get(cell[0].row);
    lines.set(r, Math.max(lines.get(r) || 1, Math.ceil(cell.length / perLine)));
  }
  const left = 8;
  const top = 24;
  const bottom = 56;
  const rowY = new Array(nRows);
  const rowH = new Array(nRows);
  let y = top;
  for (let i = nRows - 1; i >= 0; i--) {        // embeddings at the bottom, targets at the top
    rowH[i] = Math.max(58, (lines.get(i) || 1) * SLOT + 18);
    rowY[i] = y;
    y += rowH[i];
  }
  const width = left + nCols * colW + 12;
  const height = y + bottom;
  const pos = new Map();
  for (const cell of cells.values()) {
    cell.sort((a, b) => Math.abs(b.contribution || 0) - Math.abs(a.contribution || 0) || (a.id < b.id ? -1 : 1));
    const k = cell.length;
    const nLines = Math.ceil(k / perLine);
    cell.forEach((n, i) => {
      const col = n.ctx ?? 0;
      const r = rowIndex.get(n.row);
      const line = Math.floor(i / perLine);
      const inLine = Math.min(perLine, k - line * perLine);
      const cx = left + col * colW + colW / 2 + ((i % perLine) - (inLine - 1) / 2) * SLOT;
      const cy = rowY[r] + rowH[r] / 2 + (line - (nLines - 1) / 2) * SLOT;
      pos.set(n.id, { x: cx, y: cy });
    });
  }
  return { pos, width, height, colW, rowY, rowH, left, top, nRows, nCols, rowIndex };
}

// Intervention controls: toggle the selected feature node in or out of the
// intervened set, a slider for the factor every intervened feature is scaled
// by (0 ablates, 1 leaves it, negative inverts), and the result beside the
// graph: the metric before -> after and the top next tokens.
function interventionControls(model) {
  const controls = html("span", "tcx-intervene-controls");
  const toggle = html("button", "tcx-intervene-toggle", "ablate / scale selected");
  toggle.type = "button";
  const { label: scaleLabel, input: scale, value: scaleValue } = rangeControl(
    "tcx-intervene", "tcx-intervene-scale", "× ", "-2", "3", "0.05",
    "Scale the intervened features' activations by this factor (0 ablates them)");
  const clear = html("button", "tcx-intervene-clear", "clear");
  clear.type = "button";
  controls.append(toggle, scaleLabel, clear);
  const result = html("div", "tcx-intervention");

  toggle.addEventListener("click", () => {
    const sel = model.get("selected_node");
    if (sel) model.send({ type: "intervene_toggle", node_id: sel });
  });
  clear.addEventListener("click", () => model.send({ type: "intervene_clear" }));
  scale.addEventListener("input", () => { scaleValue.textContent = Number(scale.value).toFixed(2); });
  scale.addEventListener("change", () => {
    model.set("intervention_scale", Number(scale.value));
    model.save_changes();
  });

  function update(node) {
    const can = Boolean(model.get("can_intervene"));
    const marked = model.get("intervention_nodes") || [];
    toggle.disabled = !(can && node && node.kind === "feature");
    toggle.textContent = node && marked.includes(node.id) ? "release selected" : "ablate / scale selected";
    toggle.title = can ? "Add the selected feature to the intervened set (or remove it)"
      : "Interventions need the Python kernel and an intervene function";
    scale.disabled = !can;
    clear.disabled = !(can && marked.length);
  }

  function showScale() {
    const v = Number(model.get("intervention_scale")) || 0;
    scale.value = String(v);
    scaleValue.textContent = v.toFixed(2);
  }

  function showResult() {
    const r = model.get("intervention") || {};
    result.innerHTML = "";
    result.dataset.nodes = (r.nodes || []).join(" ");
    if (!r.nodes || !r.nodes.length) {
      result.style.display = "none";
      return;
    }
    result.style.display = "block";
    result.appendChild(html("div", "tcx-intervention-title",
      `${(r.interventions || []).join(", ")}${r.constrained ? " (constrained)" : ""}`));
    if (r.metric_before !== null && r.metric_before !== undefined) {
      const m = html("div", "tcx-intervention-metric",
        `${r.metric || "metric"}: ${fmt(r.metric_before)} → ${fmt(r.metric_after)} (${r.metric_change >= 0 ? "+" : ""}${fmt(r.metric_change)})`);
      m.dataset.metricAfter = String(r.metric_after);
      result.appendChild(m);
    }
    const table = html("table", "tcx-intervention-tokens");
    const head = html("tr");
    head.append(html("th", "", "next token"), html("th", "", "p before"), html("th", "", "p after"));
    table.appendChild(head);
    for (const t of r.top_tokens || []) {
      const tr = html("tr");
      tr.append(html("td", "", JSON.stringify(t.token)), html("td", "", fmt(t.prob_before)), html("td", "", fmt(t.prob)));
      table.appendChild(tr);
    }
    result.appendChild(table);
  }

  return { controls, result, update, showScale, showResult };
}

function render({ model, el }) {
  el.classList.add("tcx-circuit-graph");
  el.innerHTML = "";
  const toolbar = html("div", "tcx-graph-toolbar");
  const { label: pruneLabel, input: prune, value: pruneValue } = rangeControl(
    "tcx-prune", "tcx-prune", "prune below ", "0", "1", "0.01",
    "Hide nodes and edges whose |contribution| or |weight| is below this fraction of the largest");
  const expand = html("button", "tcx-expand", "expand selected");
  expand.type = "button";
  const status = html("span", "tcx-graph-status");
  const iv = interventionControls(model);
  // Pin nodes into a subgraph and group pinned nodes into named supernodes
  // (Neuronpedia's pinnedIds / supernodes; Python: pin(), group(), graph_json()).
  const pins = html("span", "tcx-pin-controls");
  const pinButton = html("button", "tcx-pin", "pin selected");
  pinButton.type = "button";
  const groupName = html("input", "tcx-group-name");
  groupName.type = "text";
  groupName.placeholder = "supernode name";
  const groupButton = html("button", "tcx-group", "group pinned");
  groupButton.type = "button";
  const onlyLabel = html("label", "tcx-pinned-only-label", " pinned only");
  const onlyBox = html("input", "tcx-pinned-only");
  onlyBox.type = "checkbox";
  onlyLabel.prepend(onlyBox);
  pins.append(pinButton, groupName, groupButton, onlyLabel);
  toolbar.append(pruneLabel, expand, pins, iv.controls, status);

  const legend = html("div", "tcx-legend");
  for (const [kind, name] of Object.entries(KIND_LABELS)) {
    if (kind === "other") continue;
    const item = html("span", "tcx-legend-item");
    item.append(html("span", `tcx-swatch tcx-kind-${kind}`), document.createTextNode(name));
    legend.appendChild(item);
  }
  const edgeItem = html("span", "tcx-legend-item");
  edgeItem.append(html("span", "tcx-swatch-edge tcx-edge-pos"), document.createTextNode("+ edge"),
    html("span", "tcx-swatch-edge tcx-edge-neg"), document.createTextNode("− edge"));
  legend.appendChild(edgeItem);

  const body = html("div", "tcx-graph-body");
  const canvas = html("div", "tcx-graph-canvas");
  const panel = html("div", "tcx-dashboard-panel");
  // Promise a dashboard only when dashboards are attached; otherwise the panel lists the node's fields.
  const panelHint = () => (model.get("has_dashboards")
    ? "Click a node to see its dashboard" : "Click a node to see its details");
  const panelTitle = html("div", "tcx-dashboard-title", panelHint());
  const panelContent = html("div", "tcx-dashboard-content");
  panel.append(iv.result, panelTitle, panelContent);
  body.append(canvas, panel);
  const tooltip = html("div", "tcx-tooltip");
  tooltip.style.display = "none";
  const title = html("div", "tcx-graph-title");
  el.append(title, toolbar, legend, body, tooltip);

  let nodeEls = new Map();
  let linkEls = [];
  let byId = new Map();
  let groupLayer = null;
  let lastLayout = null;

  function showTooltip(n, evt) {
    tooltip.innerHTML = "";
    tooltip.appendChild(html("div", "tcx-tooltip-title", n.label));
    const table = html("table", "tcx-tooltip-table");
    for (const [k, v] of n.tooltip || []) {
      const tr = html("tr");
      tr.append(html("th", "", k), html("td", "", fmt(v)));
      table.appendChild(tr);
    }
    tooltip.appendChild(table);
    tooltip.style.display = "block";
    tooltip.dataset.nodeId = n.id;
    const box = el.getBoundingClientRect();
    tooltip.style.left = `${evt.clientX - box.left + 14}px`;
    tooltip.style.top = `${evt.clientY - box.top + 10}px`;
  }

  function hideTooltip() {
    tooltip.style.display = "none";
  }

  function applySelection() {
    const sel = model.get("selected_node") || "";
    for (const [id, g] of nodeEls) g.classList.toggle("tcx-selected", id === sel);
    for (const p of linkEls) {
      const on = sel && (p.dataset.source === sel || p.dataset.target === sel);
      p.classList.toggle("tcx-edge-highlight", Boolean(on));
    }
    const n = byId.get(sel);
    iv.update(n);
    const marked = new Set(model.get("intervention_nodes") || []);
    for (const [id, g] of nodeEls) g.classList.toggle("tcx-intervened", marked.has(id));
    expand.disabled = !(n && n.expandable && model.get("can_expand"));
    expand.title = model.get("can_expand")
      ? (n ? (n.expandable ? `Trace ${n.label} one step further` : `${n.label} cannot be traced further`) : "Select a node first")
      : "Expanding needs the Python kernel (not available in an exported file)";
  }

  function applyPrune() {
    const t = Number(model.get("threshold")) || 0;
    const data = model.get("graph_data") || {};
    const byInfluence = (data.prune || {}).mode === "influence";
    const [text, title] = PRUNE_TEXT[byInfluence ? "influence" : "contribution"];
    pruneLabel.firstChild.textContent = text;
    prune.title = title;
    // node thresholds that matter crowd towards 1 (0.9, 0.99, 0.995): a finer step
    prune.step = byInfluence ? "0.001" : "0.01";
    prune.value = String(t);
    pruneValue.textContent = ` ${t.toFixed(byInfluence ? 3 : 2)}`;
    const vis = visibility(data, t);
    const pinned = new Set(model.get("pinned_nodes") || []);
    const only = Boolean(model.get("pinned_only")) && pinned.size > 0;
    onlyBox.checked = Boolean(model.get("pinned_only"));
    if (only) {
      for (const id of [...vis.nodes]) if (!pinned.has(id)) vis.nodes.delete(id);
      for (const i of [...vis.links]) {
        const p = linkEls[i];
        if (p && !(pinned.has(p.dataset.source) && pinned.has(p.dataset.target))) vis.links.delete(i);
      }
    }
    for (const [id, g] of nodeEls) {
      g.classList.toggle("tcx-hidden", !vis.nodes.has(id));
      g.classList.toggle("tcx-pinned", pinned.has(id));
    }
    linkEls.forEach((p, i) => p.classList.toggle("tcx-hidden", !vis.links.has(i)));
    drawGroups();
    canvas.dataset.visibleNodes = String(vis.nodes.size);
    canvas.dataset.visibleLinks = String(vis.links.size);
  }

  function drawGroups() {
    if (!groupLayer || !lastLayout) return;
    groupLayer.innerHTML = "";
    for (const group of model.get("supernodes") || []) {
      const [name, ...members] = group;
      const pts = members.map((id) => lastLayout.pos.get(id)).filter(Boolean);
      if (!pts.length) continue;
      const pad = SLOT / 2 + 3;
      const x0 = Math.min(...pts.map((p) => p.x)) - pad;
      const x1 = Math.max(...pts.map((p) => p.x)) + pad;
      const y0 = Math.min(...pts.map((p) => p.y)) - pad;
      const y1 = Math.max(...pts.map((p) => p.y)) + pad;
      const g = svg("g", { class: "tcx-supernode", "data-name": name, "data-members": members.join(" ") });
      g.appendChild(svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, rx: 6 }));
      const t = svg("text", { class: "tcx-supernode-label", x: x0 + 3, y: y0 - 3 });
      t.textContent = name;
      g.appendChild(t);
      groupLayer.appendChild(g);
    }
  }

  function hover(id, on) {
    canvas.classList.toggle("tcx-hovering", on);
    for (const p of linkEls) {
      p.classList.toggle("tcx-edge-hover", on && (p.dataset.source === id || p.dataset.target === id));
    }
    const g = nodeEls.get(id);
    if (g) g.classList.toggle("tcx-hovered", on);
  }

  function applyDashboard() {
    const d = model.get("dashboard") || {};
    panel.dataset.nodeId = d.node_id || "";
    if (d.layer !== undefined && d.layer !== null) panel.dataset.layer = String(d.layer);
    else delete panel.dataset.layer;
    if (d.feature !== undefined && d.feature !== null) panel.dataset.feature = String(d.feature);
    else delete panel.dataset.feature;
    const n = byId.get(d.node_id);
    panelTitle.textContent = d.node_id ? (n ? n.label : d.node_id) : panelHint();
    panelContent.innerHTML = d.html || "";
  }

  function draw() {
    const data = model.get("graph_data") || {};
    title.textContent = data.title || "";
    canvas.innerHTML = "";
    nodeEls = new Map();
    linkEls = [];
    byId = new Map((data.nodes || []).map((n) => [n.id, n]));
    const L = layout(data);
    lastLayout = L;
    const root = svg("svg", { class: "tcx-graph-svg", width: L.width, height: L.height,
      viewBox: `0 0 ${L.width} ${L.height}` });
    // Row labels live in their own column that stays in view when the graph scrolls sideways.
    const labels = svg("svg", { class: "tcx-row-labels", width: LABEL_W, height: L.height,
      viewBox: `0 0 ${LABEL_W} ${L.height}` });
    const rows = data.rows || [];
    for (const r of rows) {
      const i = L.rowIndex.get(r.row);
      const y = L.rowY[i];
      root.appendChild(svg("rect", { class: `tcx-row-band tcx-row-${i % 2}`, x: L.left, y,
        width: L.nCols * L.colW, height: L.rowH[i] }));
      const t = svg("text", { class: "tcx-row-label", x: LABEL_W - 6, y: y + L.rowH[i] / 2 + 4, "text-anchor": "end" });
      t.textContent = r.label;
      labels.appendChild(t);
    }
    // token labels
    const base = L.height - 56;
    (data.tokens || []).forEach((tok, c) => {
      const x = L.left + c * L.colW + L.colW / 2;
      const t = svg("text", { class: "tcx-token-label", x, y: base + 16,
        "text-anchor": "middle", "data-ctx": c });
      t.textContent = JSON.stringify(tok).slice(1, -1);
      root.appendChild(t);
      const i = svg("text", { class: "tcx-token-index", x, y: base + 32, "text-anchor": "middle" });
      i.textContent = String(c);
      root.appendChild(i);
    });
    groupLayer = svg("g", { class: "tcx-supernodes" });
    root.appendChild(groupLayer);
    // edges
    const links = data.links || [];
    const maxW = Math.max(1e-12, ...links.map((l) => Math.abs(l.weight || 0)));
    const edgeLayer = svg("g", { class: "tcx-edges" });
    links.forEach((l) => {
      const a = L.pos.get(l.source);
      const b = L.pos.get(l.target);
      if (!a || !b) return;
      const midY = (a.y + b.y) / 2;
      const p = svg("path", {
        class: `tcx-edge ${l.weight >= 0 ? "tcx-edge-pos" : "tcx-edge-neg"}`,
        d: `M${a.x},${a.y} C${a.x},${midY} ${b.x},${midY} ${b.x},${b.y}`,
        "stroke-width": (0.6 + 5 * Math.abs(l.weight || 0) / maxW).toFixed(2),
        "data-source": l.source, "data-target": l.target, "data-weight": l.weight,
      });
      const tt = svg("title");
      tt.textContent = `${(byId.get(l.source) || {}).label || l.source} → ${(byId.get(l.target) || {}).label || l.target}: ${fmt(l.weight)}`;
      p.appendChild(tt);
      edgeLayer.appendChild(p);
      linkEls.push(p);
    });
    root.appendChild(edgeLayer);
    // nodes
    const nodes = data.nodes || [];
    const maxC = Math.max(1e-12, ...nodes.map((n) => Math.abs(n.contribution || 0)));
    const nodeLayer = svg("g", { class: "tcx-nodes" });
    for (const n of nodes) {
      const p = L.pos.get(n.id);
      const r = 3 + (SLOT / 2 - 4) * Math.sqrt(Math.abs(n.contribution || 0) / maxC);   // < SLOT / 2
      const g = svg("g", { class: `tcx-node tcx-kind-${n.kind}${n.is_root ? " tcx-root" : ""}`,
        transform: `translate(${p.x.toFixed(2)},${p.y.toFixed(2)})`, "data-node-id": n.id,
        "data-kind": n.kind, "data-contribution": n.contribution,
        "data-expandable": n.expandable ? "true" : "false" });
      if (n.layer !== null && n.layer !== undefined) g.setAttribute("data-layer", n.layer);
      if (n.feature !== null && n.feature !== undefined) g.setAttribute("data-feature", n.feature);
      let shape;
      if (n.kind === "head") {
        shape = svg("rect", { x: -r, y: -r, width: 2 * r, height: 2 * r, rx: 2 });
      } else if (n.kind === "logit") {
        shape = svg("polygon", { points: `0,${-r - 2} ${r + 2},0 0,${r + 2} ${-r - 2},0` });
      } else {
        shape = svg("circle", { r });
      }
      shape.setAttribute("class", `tcx-node-shape${(n.contribution || 0) < 0 ? " tcx-negative" : ""}`);
      g.appendChild(shape);
      g.addEventListener("mouseenter", (evt) => { showTooltip(n, evt); hover(n.id, true); });
      g.addEventListener("mousemove", (evt) => showTooltip(n, evt));
      g.addEventListener("mouseleave", () => { hideTooltip(); hover(n.id, false); });
      g.addEventListener("click", (evt) => {
        evt.stopPropagation();
        model.set("selected_node", n.id);
        model.save_changes();
        applySelection();
      });
      nodeLayer.appendChild(g);
      nodeEls.set(n.id, g);
    }
    root.appendChild(nodeLayer);
    const inner = html("div", "tcx-graph-inner");
    inner.append(labels, root);
    canvas.appendChild(inner);
    canvas.dataset.nodeCount = String(nodes.length);
    // Open centred on the target (the root), the row labels in view.
    const target = nodes.find((n) => n.is_root);
    const centre = () => {
      const p = target && L.pos.get(target.id);
      if (p && canvas.clientWidth) {
        canvas.scrollLeft = Math.max(0, LABEL_W + p.x - canvas.clientWidth / 2);
        canvas.dataset.centredOn = target.id;
      }
    };
    centre();
    if (typeof requestAnimationFrame === "function") requestAnimationFrame(centre);
    applyPrune();
    applySelection();
    applyDashboard();
  }

  prune.addEventListener("input", () => {
    model.set("threshold", Number(prune.value));
    model.save_changes();
    applyPrune();
  });
  pinButton.addEventListener("click", () => {
    const sel = model.get("selected_node");
    if (!sel) return;
    const pinned = [...(model.get("pinned_nodes") || [])];
    const i = pinned.indexOf(sel);
    if (i >= 0) pinned.splice(i, 1);
    else pinned.push(sel);
    model.set("pinned_nodes", pinned);
    model.save_changes();
    applyPrune();
  });
  groupButton.addEventListener("click", () => {
    const name = groupName.value.trim();
    const pinned = model.get("pinned_nodes") || [];
    if (!name || !pinned.length) return;
    const groups = (model.get("supernodes") || []).filter((g) => g[0] !== name);
    groups.push([name, ...pinned]);
    model.set("supernodes", groups);
    model.save_changes();
    groupName.value = "";
    drawGroups();
  });
  onlyBox.addEventListener("change", () => {
    model.set("pinned_only", onlyBox.checked);
    model.save_changes();
    applyPrune();
  });
  expand.addEventListener("click", () => {
    const sel = model.get("selected_node");
    if (!sel) return;
    status.textContent = "expanding…";
    model.send({ type: "expand", node_id: sel });
  });

  // Python-side trait -> what to redraw when it changes.
  const handlers = {
    "change:graph_data": () => draw(),
    "change:selected_node": () => applySelection(),
    "change:threshold": () => applyPrune(),
    "change:dashboard": () => applyDashboard(),
    "change:pinned_nodes": () => applyPrune(),
    "change:pinned_only": () => applyPrune(),
    "change:supernodes": () => drawGroups(),
    "change:has_dashboards": () => applyDashboard(),
    "change:status": () => { status.textContent = model.get("status") || ""; },
    "change:can_expand": () => applySelection(),
    "change:intervention_nodes": () => applySelection(),
    "change:can_intervene": () => applySelection(),
    "change:intervention_scale": () => iv.showScale(),
    "change:intervention": () => iv.showResult(),
  };
  for (const [event, fn] of Object.entries(handlers)) model.on(event, fn);
  draw();
  iv.showScale();
  iv.showResult();
  handlers["change:status"]();
  return () => {
    for (const [event, fn] of Object.entries(handlers)) model.off(event, fn);
  };
}

export default { render };
