"""Ablation curves: a metric as the top-k features of a ranking are ablated (or
kept, every other feature zeroed), the way the paper compares transcoder
features with MLP neurons; one plotly figure for them.

Rankings come from pairs, DataFrames, a decomposition or a path search
(:func:`ranking_from`); the ablations are :mod:`tc_explore.interventions`
hooks, so a curve runs on every model and transcoder set interventions do.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import pandas as pd

from .errors import InvalidInputError, as_count, as_integer, as_number
from .interventions import Hook, Intervention, Positions, intervention_hooks
from .transcoder import TranscoderSet

__all__ = ["ranking_from", "ablation_curve", "ablation_curve_figure"]


def ranking_from(source, k: int | None = None) -> list[tuple[int, int]]:
    """(layer, feature) pairs in ranked order, first occurrence kept, from: a
    list of pairs, a DataFrame with ``layer`` and ``feature`` (or ``index`` plus
    ``kind``) columns (e.g. ``rank_features_by_variance``, ``Decomposition.to_pandas``),
    a :class:`~tc_explore.circuits.Decomposition` (features by |contribution|), or
    a :class:`~tc_explore.circuits.PathSearchResult` (features in the order the
    best paths reach them)."""
    from .circuits.contributions import Decomposition
    from .circuits.paths import PathSearchResult

    if isinstance(source, Decomposition):
        source = source.to_pandas()
    if isinstance(source, PathSearchResult):
        pairs = [(n.layer, n.index) for p in sorted(source.paths, key=lambda p: -abs(p.attribution))
                 for n in p.nodes if n.kind == "feature"]
    elif isinstance(source, pd.DataFrame):
        frame = source
        if "kind" in frame.columns:
            frame = frame[frame.kind == "feature"]
        col = "feature" if "feature" in frame.columns else "index"
        if "layer" not in frame.columns or col not in frame.columns:
            raise InvalidInputError("A ranking DataFrame needs 'layer' and 'feature' (or 'index') columns.")
        # Columns with gaps (NaN for other node kinds) hold whole numbers as floats.
        whole = lambda v: int(v) if isinstance(v, float) and v.is_integer() else v  # noqa: E731
        source = [(whole(l), whole(f)) for l, f in zip(frame.layer.tolist(), frame[col].tolist())]
    if isinstance(source, PathSearchResult):
        pass
    elif isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise InvalidInputError("A ranking is a list of (layer, feature) pairs, a DataFrame, a "
                                f"Decomposition or a PathSearchResult; got {type(source).__name__}.")
    else:
        pairs = []
        for item in source:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InvalidInputError(f"A ranking is a list of (layer, feature) pairs; got the item {item!r:.60}.")
            pairs.append((as_integer(item[0], "a ranking's layer"), as_integer(item[1], "a ranking's feature")))
    out = list(dict.fromkeys(pairs))
    return out if k is None else out[:as_count(k, "k", minimum=0)]


def ablation_curve(model, transcoders: TranscoderSet, ranking, score: Callable[[list[Hook]], float],
                   ks: Sequence[int] = (0, 1, 2, 4, 8, 16, 32), *, keep: bool = False,
                   positions: Positions = None, kind: str | None = None,
                   value_name: str = "metric") -> pd.DataFrame:
    """The metric as the top-k features of ``ranking`` are ablated, for each k in ``ks``.

    ``score(fwd_hooks) -> float`` runs the model with the given hooks and
    returns the metric (e.g. ``lambda hooks: gt.probability_difference(model,
    prompts, fwd_hooks=hooks)``), so one curve can average over many prompts.

    ``keep=False``: zero-ablate the top-k features at ``positions`` (None: all),
    the model otherwise intact (unconstrained: error terms kept). ``keep=True``:
    the paper's comparison of features with neurons, the ranked layers' MLPs
    replaced by their transcoders with only the top-k features kept (every
    other feature zeroed, no error term).

    Returns a DataFrame with columns kind, k, ``value_name``.
    """
    from .replacement import transcoder_hooks

    pairs = ranking_from(ranking)
    if not pairs:
        raise InvalidInputError("The ranking is empty: no features to ablate.")
    kind = kind or ("top-k features kept" if keep else "top-k features ablated")
    if keep and positions is not None:
        raise InvalidInputError("keep=True replaces whole MLP layers: positions must be None.")
    layers = sorted({l for l, _ in pairs})
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise InvalidInputError(f"ks must be a list of feature counts such as (0, 1, 2, 4), got {ks!r:.60}.")
    rows = []
    for k in ks:
        k = as_count(k, "each k", minimum=0)
        top = pairs[:k]
        if keep:
            kept = {l: [f for ll, f in top if ll == l] for l in layers}
            hooks = transcoder_hooks(model, transcoders, layers, keep_features=kept)
        else:
            hooks = intervention_hooks(model, transcoders, [Intervention.ablate(l, f, positions) for l, f in top])
        rows.append({"kind": kind, "k": min(k, len(pairs)),
                     value_name: as_number(score(hooks), f"score's value (k={k})")})
    return pd.DataFrame(rows, columns=["kind", "k", value_name])


def ablation_curve_figure(curve: pd.DataFrame, references: Sequence[str] = ("original", "full transcoder"),
                          title: str | None = None, log_x: bool | None = None, height: int = 380,
                          dash: dict[str, str] | None = None):
    """One plotly figure of a curve (columns kind, k and one value column):
    a line per kind (``dash[kind]`` sets its plotly dash style), and a dashed
    horizontal line for each reference kind present (e.g. the original model)."""
    import plotly.graph_objects as go

    if not isinstance(curve, pd.DataFrame):
        raise InvalidInputError(f"curve must be the DataFrame of ablation_curve, got {type(curve).__name__}.")
    value = [c for c in curve.columns if c not in ("kind", "k")]
    if len(value) != 1 or not {"kind", "k"} <= set(curve.columns):
        raise InvalidInputError("The curve needs columns kind, k and exactly one value column.")
    value = value[0]
    fig = go.Figure()
    for kind, part in curve.groupby("kind", sort=False):
        if kind in references:
            continue
        part = part.sort_values("k")
        fig.add_trace(go.Scatter(x=part.k, y=part[value], mode="lines+markers", name=str(kind),
                                 line_dash=(dash or {}).get(kind, "solid")))
    for dash, kind in zip(("dash", "dot", "dashdot", "longdash"), [r for r in references if r in set(curve.kind)]):
        fig.add_hline(y=float(curve[curve.kind == kind][value].iloc[0]), line_dash=dash, annotation_text=kind)
    if log_x is None:
        ks = curve[~curve.kind.isin(references)].k
        log_x = bool(len(ks)) and ks.min() >= 1 and ks.max() / max(ks.min(), 1) >= 16
    fig.update_layout(xaxis_title="features (k)", yaxis_title=value.replace("_", " "), height=height,
                      title=title, xaxis_type="log" if log_x else "linear")
    return fig
