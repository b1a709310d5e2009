"""Feature index: what every transcoder feature does on a corpus, from one pass.

``FeatureIndex.build`` runs the model once per batch of token sequences (with
``run_with_cache`` restricted to the transcoders' input hooks), encodes every
selected layer's transcoder on it and folds the activations into per-layer
accumulators, vectorised over features:

* top-k examples per feature: (sequence, position, activation) plus the
  feature's activations on a context window around the token, so dashboards
  highlight context without running the model again;
* a uniform random sample of each feature's firing tokens (a bottom-k sketch
  over a hash of (token, feature)), from which quantile bands are drawn for
  interval views;
* an activation histogram over fixed log-spaced bins, firing count, sum, max.

The modules, in the direction data flows:

* ``accumulator``: the streaming, order-independent statistics;
* ``storage``: the on-disk format (``IndexManifest``, Parquet tables) and the
  storage layer shared with ``tc_explore.weight_views``;
* ``build``: build, resume and merge (``IndexSettings``);
* ``reader``: ``FeatureIndex``, the reader (and the entry point for build/merge).
"""
from ..errors import IndexIncompleteError
from .accumulator import _feature_hash, _LayerAccumulator, _nonzero_2d, _token_hash, histogram_edges
from .build import IndexSettings, _model_name
from .reader import FeatureIndex, TopExample
from .storage import FORMAT_VERSION, TABLES, IndexManifest

__all__ = ["FeatureIndex", "TopExample", "IndexSettings", "IndexManifest", "IndexIncompleteError",
           "histogram_edges", "FORMAT_VERSION", "TABLES"]
