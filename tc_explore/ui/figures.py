"""Plotly figures that survive a notebook's export to static HTML, offline.

A plotly figure shown in Jupyter normally carries only plotly's own mimetype
(``application/vnd.plotly.v1+json``), which JupyterLab draws but nbconvert's
HTML export cannot: the figure vanishes from the page. After
``use_offline_plotly()`` every figure carries that mimetype *and* a
``text/html`` rendering (a ``<div>`` drawn by plotly.js), and the first figure
shown in the kernel carries plotly.js itself, inlined from the installed
plotly package: once per notebook run top to bottom, and no network needed to
view the exported page. JupyterLab keeps drawing the plotly mimetype.

    from tc_explore.ui.figures import use_offline_plotly
    use_offline_plotly()
"""
from __future__ import annotations

import itertools

__all__ = ["use_offline_plotly", "RENDERER"]

RENDERER = "tc_explore_offline"


def _renderer_class():
    from plotly.io._base_renderers import MimetypeRenderer

    class OfflineHtmlRenderer(MimetypeRenderer):
        """``text/html``: the figure's div and script; plotly.js inlined into the
        first figure this kernel shows."""

        def __init__(self):
            # plotly shallow-copies a renderer for each figure: keep the state in
            # objects the copies share.
            self.state = {"inlined": False}
            self._ids = itertools.count()

        def to_mimebundle(self, fig_dict):
            from plotly.io import to_html
            from plotly.offline import get_plotlyjs

            div_id = f"tcx-plotly-{next(self._ids)}"
            body = to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                           div_id=div_id, default_width="100%", default_height=450,
                           config={"displaylogo": False}, validate=False)
            # Where plotly.js could not be loaded (a cell re-run out of order), say so
            # instead of leaving an empty box.
            check = (f'<script>if (!window.Plotly) {{ document.getElementById("{div_id}").textContent = '
                     '"(interactive figure: plotly.js is not on this page; run the notebook from the '
                     'top to include it)"; }</script>')
            head = ""
            if not self.state["inlined"]:
                self.state["inlined"] = True
                # Hide an AMD loader (require.js, which nbconvert pages load) while
                # plotly.js runs, so that it defines window.Plotly.
                head = ('<script>window.PlotlyConfig = {MathJaxConfig: "local"}; '
                        'window.__tcxDefine = window.define; window.define = undefined;</script>'
                        f'<script type="text/javascript">{get_plotlyjs()}</script>'
                        '<script>window.define = window.__tcxDefine;</script>')
            return {"text/html": head + body + check}

    return OfflineHtmlRenderer


def use_offline_plotly() -> None:
    """Show plotly figures from now on with both plotly's mimetype (for
    JupyterLab) and self-contained HTML (for exported notebooks)."""
    import plotly.io as pio

    if RENDERER not in pio.renderers:
        pio.renderers[RENDERER] = _renderer_class()()
    pio.renderers.default = f"plotly_mimetype+{RENDERER}"
