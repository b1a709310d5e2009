"""Feature activations on one prompt: the library side of the explorer's
prompt box, usable directly from notebooks and tests.

    acts = run_prompt(model, transcoders, "The war lasted from 1735 to 17")
    acts.feature(10, 123)          # DataFrame[position, token_id, token, activation]
    acts.top_features(k=5)         # DataFrame[position, token_id, token, rank, layer, feature, activation]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from .errors import InvalidInputError, as_count, as_integer, check_feature, refuse_non_finite
from .model import Prompt, to_tokens, token_strings
from .transcoder import TranscoderSet, as_transcoder_set


@dataclass
class PromptActivations:
    """Every selected layer's feature activations on one prompt (one forward)."""
    tokens: torch.Tensor                  # [pos] token ids
    token_strs: list[str]                 # [pos]
    acts: dict[int, torch.Tensor]         # layer -> [pos, d_sae] (cpu, float32)

    @property
    def layers(self) -> list[int]:
        return list(self.acts)

    def _layer(self, layer) -> torch.Tensor:
        try:
            return self.acts[as_integer(layer, "layer")]
        except KeyError:
            raise InvalidInputError(
                f"Layer {layer!r} was not run on this prompt; it has layers {self.layers}.") from None

    def feature(self, layer: int, feature: int) -> pd.DataFrame:
        """Per-token activations of one feature: DataFrame[position, token_id, token, activation]."""
        acts = self._layer(layer)
        feature = check_feature(feature, acts.shape[-1], f"layer {layer}")
        return pd.DataFrame({"position": range(len(self.token_strs)),
                             "token_id": self.tokens.tolist(), "token": self.token_strs,
                             "activation": acts[:, feature].tolist()})

    def top_features(self, k: int = 5, layers: Sequence[int] | None = None) -> pd.DataFrame:
        """The k most active features at each token across ``layers`` (all run
        layers by default), ranked by activation: DataFrame[position, token_id,
        token, rank, layer, feature, activation]; tokens where fewer than k
        features fire have fewer rows."""
        k = as_count(k, "k")
        layers = self.layers if layers is None else [as_integer(layer, "layer") for layer in layers]
        blocks = [self._layer(layer) for layer in layers]             # each [pos, d_sae_l]
        widths = torch.tensor([b.shape[-1] for b in blocks])
        starts = torch.cumsum(widths, 0) - widths
        stacked = torch.cat(blocks, dim=-1)                           # [pos, sum d_sae]
        vals, idx = torch.topk(stacked, min(k, stacked.shape[-1]), dim=-1)   # [pos, k]
        which = torch.searchsorted(starts, idx, right=True) - 1       # [pos, k] block of each
        rows = []
        for pos in range(stacked.shape[0]):
            for rank in range(vals.shape[1]):
                a = float(vals[pos, rank])
                if a <= 0:
                    break
                b = int(which[pos, rank])
                rows.append((pos, int(self.tokens[pos]), self.token_strs[pos], rank, layers[b],
                             int(idx[pos, rank] - starts[b]), a))
        return pd.DataFrame(rows, columns=["position", "token_id", "token", "rank", "layer", "feature",
                                           "activation"])


@torch.no_grad()
def encode_layers(model, transcoders: TranscoderSet, tokens: torch.Tensor,
                  layers: Sequence[int] | None = None,
                  position: int | None = None) -> dict[int, torch.Tensor]:
    """One forward pass over ``tokens`` [batch, pos], caching only the chosen
    layers' transcoder input hooks, and each layer encoded once:
    ``{layer: [batch, pos, d_sae]}`` (``[batch, d_sae]`` at one ``position``),
    float32 on the CPU."""
    hooks = {transcoders.input_hook(layer): layer
             for layer in as_transcoder_set(transcoders).select_layers(layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    out = {}
    for hook, layer in hooks.items():
        x = cache[hook] if position is None else cache[hook][:, position]
        out[layer] = transcoders[layer].encode(x.to(transcoders.device)).float().cpu()
        refuse_non_finite(out[layer], f"The layer-{layer} transcoder's feature activations",
                          ("prompt", "position") if position is None else ("prompt",))
    return out


@torch.no_grad()
def run_prompt(model, transcoders: TranscoderSet, prompt: Prompt,
               layers: Sequence[int] | None = None, prepend_bos: bool = True) -> PromptActivations:
    """One forward pass over ``prompt`` (a string or token ids), caching only
    the transcoders' input hooks, and every selected layer encoded."""
    layers = as_transcoder_set(transcoders).select_layers(layers)
    transcoders.check_fits(model, layers)
    tokens = to_tokens(model, prompt, prepend_bos=prepend_bos)        # [1, pos]
    if tokens.shape[0] != 1:
        raise InvalidInputError(f"run_prompt takes one prompt, got a batch of {tokens.shape[0]}.")
    acts = {layer: a[0] for layer, a in encode_layers(model, transcoders, tokens, layers).items()}
    return PromptActivations(tokens[0].cpu(), token_strings(model, tokens[0]), acts)


def feature_activations(model, transcoders: TranscoderSet, prompt: Prompt, layer: int,
                        feature: int) -> pd.DataFrame:
    """Per-token activations of one feature on a prompt:
    DataFrame[position, token_id, token, activation]."""
    layer = transcoders.check_layer(layer)
    transcoders.check_feature(layer, feature)
    return run_prompt(model, transcoders, prompt, layers=[layer]).feature(layer, feature)


def top_features_per_token(model, transcoders: TranscoderSet, prompt: Prompt, k: int = 5,
                           layers: Sequence[int] | None = None) -> pd.DataFrame:
    """The k most active features (across all layers by default) at each token of a prompt."""
    return run_prompt(model, transcoders, prompt, layers=layers).top_features(k)
