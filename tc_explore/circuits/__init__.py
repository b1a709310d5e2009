"""Circuit analysis through transcoders: the exact decomposition of a target
into contributions (``contributions``) of targets (``targets``), input-invariant views of features
(``invariant``), greedy path search (``paths``), circuit graphs (``graph``)
grown one node at a time (``expansion``), attribution graphs (``attribution``,
``influence``, ``graph_json``),
and frozen forward passes for brute-force checks (``frozen``)."""
from .attribution import AttributionGraph, attribute
from .context import PromptContext, prompt_context
from .contributions import Contribution, Decomposition, Node, NodeKind, Target, decompose, next_target
from .expansion import PathGraphExpander
from .graph import CircuitGraph, GraphEdge, GraphNode
from .invariant import (de_embeddings, feature_connection_matrix, feature_connections, logit_effects,
                        ov_de_embeddings, ov_norms)
from .paths import Path, PathSearchResult, find_paths
from .targets import feature_target, logit_diff_target, logit_direction_target, residual_target

__all__ = [
    "attribute", "AttributionGraph",
    "PromptContext", "prompt_context", "Node", "NodeKind", "Target", "Contribution", "Decomposition",
    "decompose", "next_target", "feature_target", "logit_diff_target", "logit_direction_target",
    "residual_target", "Path", "PathSearchResult", "find_paths", "PathGraphExpander",
    "CircuitGraph", "GraphNode",
    "GraphEdge", "feature_connections", "feature_connection_matrix", "logit_effects",
    "de_embeddings", "ov_de_embeddings", "ov_norms",
]
