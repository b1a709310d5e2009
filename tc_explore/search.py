"""Finding features related to a token: by how much each feature's write
boosts the token's logit (from the weights alone), or by how many of its top
indexed examples sit on the token (from a ``FeatureIndex``)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from .errors import InvalidInputError, as_count, as_integer
from .index import FeatureIndex
from .model import model_weights, single_token_id
from .transcoder import TranscoderSet, as_transcoder_set


def search_features(model, transcoders: TranscoderSet, token: str | int, by: str = "logits",
                    layers: Sequence[int] | None = None, k: int = 10,
                    index: FeatureIndex | None = None) -> pd.DataFrame:
    """Features related to a token: ``by="logits"`` ranks every feature of
    ``layers`` by how much its write boosts the token's logit
    (``W_dec @ W_U[:, token]``, the logit-effect score, over all features at
    once); ``by="examples"`` by how many of its top indexed examples sit on
    the token (needs ``index``). DataFrame[layer, feature, score]."""
    k = as_count(k, "k")
    if by == "logits":
        as_transcoder_set(transcoders).check_fits(model, layers)
    if isinstance(token, str):
        token_id = single_token_id(model, token)
    else:
        token_id = as_integer(token, "token")
    if not 0 <= token_id < int(model.cfg.d_vocab):
        raise InvalidInputError(f"token id {token_id} is outside the vocabulary (0..{model.cfg.d_vocab - 1}).")
    if by == "logits":
        layers = transcoders.select_layers(layers)
        u = model_weights(model).W_U[:, token_id].to(transcoders.dtype)           # [d_model]
        rows = []
        with torch.no_grad():
            for layer in layers:
                scores = (transcoders[layer].W_dec @ u.to(transcoders[layer].device)).cpu()  # [d_sae]
                vals, idx = torch.topk(scores, min(k, scores.numel()))
                rows += [(layer, int(i), float(v)) for v, i in zip(vals, idx)]
        rows.sort(key=lambda r: (-r[2], r[0], r[1]))
        return pd.DataFrame(rows[:k], columns=["layer", "feature", "score"])
    if by == "examples":
        if index is None:
            raise InvalidInputError("search by='examples' needs the feature index (index=).")
        if not isinstance(index, FeatureIndex):
            raise InvalidInputError(f"index must be a FeatureIndex (FeatureIndex.load(folder)), got "
                                    f"{type(index).__name__}.")
        layers = index.layers if layers is None else [index.check_layer(x) for x in layers]
        frames = []
        for layer in layers:
            found = index.features_by_token(layer, token_id, limit=k)
            frames.append(pd.DataFrame({"layer": layer, "feature": found["feature"].astype(int),
                                        "score": found["count"].astype(float)}))
        out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["layer", "feature", "score"])
        return out.sort_values(["score", "layer", "feature"], ascending=[False, True, True]) \
            .head(k).reset_index(drop=True)
    raise InvalidInputError(f"by must be 'logits' or 'examples', got {by!r}.")


# -- plotly figures ----------------------------------------------------------------------
