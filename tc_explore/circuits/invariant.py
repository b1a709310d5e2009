"""Input-invariant views of a transcoder feature: what the weights alone say,
independent of any prompt (the "input-invariant" factor of the paper's
input-invariant × input-dependent split). Shared with the dashboards.

Conventions (plain weights, as in Dunefsky et al. 2024; no LayerNorm scale,
since that depends on the input):

* connection of upstream feature g (layer l' < l) to downstream feature f
  (layer l): ``W_dec[l'][g] · W_enc[l][:, f]``; for a cross-layer transcoder,
  g's decoders summed over the target layers l' ≤ l'' < l that f reads;
* logit effect of f: ``W_dec[f] @ W_U`` (a CLT feature's decoders summed over all its target layers);
* direct de-embedding of f: ``W_E @ W_enc[:, f]`` (``W_E`` as written to the
  residual stream: times sqrt(d_model) on Gemma);
* OV de-embedding through head h of layer l' ≤ l: ``W_E @ OV_h @ W_enc[:, f]``
  with ``OV_h = W_V[h] @ W_O[h]`` (d_model × d_model, TransformerLens' row-vector
  convention: a residual vector x moves to ``x @ OV_h``). Heads of layers up to
  and including l count, since attention l writes before MLP l reads.
"""
from __future__ import annotations

from typing import Literal

import pandas as pd
import torch

from ..errors import InvalidInputError, as_count
from ..model import check_layer, model_weights, token_strings
from ..transcoder import TranscoderSet, as_transcoder_set

__all__ = ["feature_connections", "feature_connection_matrix", "logit_effects", "de_embeddings",
           "ov_de_embeddings", "ov_norms"]


def _check_k(k: int) -> int:
    return as_count(k, "k")


def _encoder(transcoders: TranscoderSet, layer: int, feature: int) -> torch.Tensor:
    as_transcoder_set(transcoders).check_feature(layer, feature)
    # contiguous: a strided column makes the matrix-vector products that read it
    # about 4x slower on CPU
    return transcoders[layer].W_enc[:, feature].detach().contiguous()  # [d_model]


def _top(scores: torch.Tensor, k: int, largest: bool = True) -> tuple[list[int], list[float]]:
    """Top-k indices by score, ties broken by lower index (stable, deterministic).

    ``torch.topk`` finds the k-th value in O(n); only the candidates at or
    beyond it (k of them, more where values tie) are sorted, so a dashboard
    does not pay for a full sort of 50k vocabulary scores."""
    s = scores.detach().flatten()
    s = s if largest else -s
    k = min(k, s.numel())
    if k == 0:
        return [], []
    kth = torch.topk(s, k).values[-1]
    candidates = torch.nonzero(s >= kth).flatten()                   # ascending index
    order = candidates[torch.argsort(-s[candidates].double(), stable=True)][:k]
    values = scores.detach().flatten()[order].double().cpu()
    return order.cpu().tolist(), values.tolist()


@torch.no_grad()
def feature_connections(transcoders: TranscoderSet, layer: int, feature: int,
                        direction: Literal["upstream", "downstream"] = "upstream",
                        k: int = 10) -> pd.DataFrame:
    """The k features most strongly connected to (layer, feature), by score
    ``W_dec[upstream g] · W_enc[:, downstream f]`` (largest first).

    ``upstream``: features g of every transcoder layer before ``layer`` (how
    much g's write excites f); ``downstream``: features of every later layer
    that f's write excites. Columns: layer, feature, score.
    """
    _check_k(k)
    layer = as_transcoder_set(transcoders).check_layer(layer)
    as_transcoder_set(transcoders).check_feature(layer, feature)
    rows: list[tuple[int, int, float]] = []
    if direction == "upstream":
        w_enc = _encoder(transcoders, layer, feature)                 # [d_model]
        for l in [l for l in transcoders.layers if l < layer]:
            # a cross-layer transcoder's feature: its writes to the layers before `layer`
            scores = transcoders.decoder_sum(l, before=layer) @ w_enc   # [d_sae_l]
            idx, val = _top(scores, k)
            rows += [(l, i, v) for i, v in zip(idx, val)]
    elif direction == "downstream":
        dec = transcoders.decoder_rows(layer, [feature])[0]           # [n_targets, d_model]
        targets = transcoders.target_layers(layer)
        for l in [l for l in transcoders.layers if l > layer]:
            # the writes a reader at layer l sees: to the target layers before l
            w_dec = dec[[i for i, t in enumerate(targets) if t < l]].sum(0)    # [d_model]
            scores = w_dec @ transcoders[l].W_enc                     # [d_sae_l]
            idx, val = _top(scores, k)
            rows += [(l, i, v) for i, v in zip(idx, val)]
    else:
        raise InvalidInputError(f"direction must be 'upstream' or 'downstream', got {direction!r}.")
    # Highest score first; ties by layer then feature, so the order is deterministic.
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    return pd.DataFrame(rows[:k], columns=["layer", "feature", "score"])


@torch.no_grad()
def feature_connection_matrix(transcoders: TranscoderSet, up_layer: int, down_layer: int,
                              up_features=None, down_features=None, chunk_size: int = 2048,
                              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_dec[up_layer] @ W_enc[down_layer]``: [n_up, n_down] connections,
    returned on the CPU. Computed ``chunk_size`` upstream rows at a time on the
    transcoders' device, so the device holds one chunk, not the full matrix
    (24576² float32 is 2.4 GB: pass ``up_features`` / ``down_features`` index
    lists, or ``out_dtype=torch.float16``, to keep the result small)."""
    up_layer, down_layer = as_transcoder_set(transcoders).check_layer(up_layer), transcoders.check_layer(down_layer)
    if up_layer >= down_layer:
        raise InvalidInputError(f"up_layer ({up_layer}) must come before down_layer ({down_layer}): "
                                "a feature only writes to later layers.")
    W_dec, W_enc = transcoders.decoder_sum(up_layer, before=down_layer), transcoders[down_layer].W_enc
    if up_features is not None:
        up = torch.as_tensor([transcoders.check_feature(up_layer, f) for f in up_features],
                             dtype=torch.long, device=W_dec.device)
        W_dec = W_dec[up]
    if down_features is not None:
        down = torch.as_tensor([transcoders.check_feature(down_layer, f) for f in down_features],
                               dtype=torch.long, device=W_enc.device)
        W_enc = W_enc[:, down]
    out = torch.empty(W_dec.shape[0], W_enc.shape[1], dtype=out_dtype)
    for start in range(0, W_dec.shape[0], chunk_size):
        block = W_dec[start:start + chunk_size] @ W_enc              # [chunk, n_down]
        out[start:start + chunk_size] = block.to("cpu", out_dtype)
    return out


@torch.no_grad()
def logit_effects(model, transcoders: TranscoderSet, layer: int, feature: int,
                  k: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tokens whose logits the feature's write ``W_dec[f] @ W_U`` boosts most
    and suppresses most: (boosted, suppressed), columns token_id, token, score."""
    _check_k(k)
    as_transcoder_set(transcoders).check_feature(layer, feature)
    scores = transcoders[layer].W_dec[feature] @ model_weights(model).W_U.to(transcoders.dtype)  # [d_vocab]
    frames = []
    for largest in (True, False):
        idx, val = _top(scores, k, largest)
        frames.append(pd.DataFrame({"token_id": idx, "token": token_strings(model, idx), "score": val}))
    return frames[0], frames[1]


@torch.no_grad()
def de_embeddings(model, transcoders: TranscoderSet, layer: int, feature: int,
                  k: int = 10) -> pd.DataFrame:
    """Tokens whose embedding most excites the feature directly:
    ``W_E @ W_enc[:, f]``, largest first. Columns token_id, token, score."""
    _check_k(k)
    w_enc = _encoder(transcoders, layer, feature)
    w = model_weights(model)
    scores = (w.W_E.to(w_enc.dtype) @ w_enc) * w.embed_scale         # [d_vocab]
    idx, val = _top(scores, k)
    return pd.DataFrame({"token_id": idx, "token": token_strings(model, idx), "score": val})


def _ov_pullbacks(model, transcoders: TranscoderSet, layer: int, feature: int) -> torch.Tensor:
    """[layer+1, H, d_model]: ``OV_h @ W_enc[:, f]`` for every head of layers ≤ layer."""
    layer = as_transcoder_set(transcoders).check_layer(layer)
    check_layer(model, layer)
    w_enc = _encoder(transcoders, layer, feature)
    w = model_weights(model)
    W_V = w.W_V[: layer + 1].to(w_enc.dtype)                          # [l, H, d_model, d_head]
    W_O = w.W_O[: layer + 1].to(w_enc.dtype)                          # [l, H, d_head, d_model]
    # OV @ w = W_V @ (W_O @ w): never forms the d_model × d_model matrix.
    return torch.einsum("lhde,lhe->lhd", W_V, torch.einsum("lhem,m->lhe", W_O, w_enc))


@torch.no_grad()
def ov_norms(model, transcoders: TranscoderSet, layer: int, feature: int) -> pd.DataFrame:
    """``||OV_h @ W_enc[:, f]||`` for every head h of every layer ≤ ``layer``
    (attention of the feature's own layer writes before its MLP reads):
    how strongly each head can move information into the feature. Columns
    layer, head, norm; sorted by layer then head."""
    pulled = _ov_pullbacks(model, transcoders, layer, feature)        # [l, H, d_model]
    norms = pulled.norm(dim=-1).double().cpu()
    rows = [(l, h, float(norms[l, h])) for l in range(norms.shape[0]) for h in range(norms.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "head", "norm"])


@torch.no_grad()
def ov_de_embeddings(model, transcoders: TranscoderSet, layer: int, feature: int, k: int = 10,
                     n_heads: int = 3) -> pd.DataFrame:
    """De-embeddings through attention: for the ``n_heads`` heads (of layers
    ≤ ``layer``) with the largest ``||OV_h @ W_enc[:, f]||``, the k tokens with
    the largest ``W_E @ OV_h @ W_enc[:, f]`` (a token at a source position
    that, moved by that head, excites the feature). Columns layer, head,
    token_id, token, score; heads in order of decreasing norm."""
    _check_k(k)
    _check_k(n_heads)
    pulled = _ov_pullbacks(model, transcoders, layer, feature)        # [l, H, d_model]
    H = pulled.shape[1]
    head_idx, _ = _top(pulled.norm(dim=-1).reshape(-1), n_heads)
    w = model_weights(model)
    W_E = w.W_E.to(pulled.dtype)
    heads = [divmod(i, H) for i in head_idx]
    # One pass over W_E for all chosen heads: [d_vocab, d_model] @ [d_model, n_heads].
    scores = (W_E @ torch.stack([pulled[l, h] for l, h in heads], dim=1)) * w.embed_scale
    rows = []
    for j, (l, h) in enumerate(heads):
        idx, val = _top(scores[:, j], k)
        rows += [(l, h, t, s, v) for t, s, v in zip(idx, token_strings(model, idx), val)]
    return pd.DataFrame(rows, columns=["layer", "head", "token_id", "token", "score"])
