"""Cross-layer transcoders in circuit-tracer's layout (e.g. ``mntss/clt-gemma-2-2b-426k``).

A repo (or directory) holds ``config.yaml`` (``model_kind: cross_layer_transcoder``,
``feature_input_hook`` / ``feature_output_hook``) and, for every layer L of the
model:

* ``W_enc_{L}.safetensors``: ``W_enc_{L}`` [d_sae, d_model] (encode is
  ``x @ W_enc.T + b_enc``), ``b_enc_{L}`` [d_sae], ``b_dec_{L}`` [d_model] (the
  output bias of layer L's MLP reconstruction), optional ``threshold_{L}``
  [d_sae] (JumpReLU, strict ``>``; else ReLU);
* ``W_dec_{L}.safetensors``: ``W_dec_{L}`` [d_sae, n_layers − L, d_model]: the
  decoder of layer L's features into the MLP outputs of layers L, L+1, …

Layer L''s MLP output is approximated by ``Σ_{L ≤ L'} acts_L @ W_dec_L[:, L' − L] + b_dec_{L'}``.
Decoders are read lazily with ``safe_open`` slices (rows of active features,
or one target layer at a time): a CLT of 400k+ features never needs all its
decoders in memory. Files load without running code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import IncompatibleTranscoderError
from ..integrity import existing_file, reading
from ..transcoder import float_weight


def encoder_file(layer: int) -> str:
    return f"W_enc_{layer}.safetensors"


def decoder_file(layer: int) -> str:
    return f"W_dec_{layer}.safetensors"


def read_clt_encoder(path, layer: int) -> dict[str, torch.Tensor]:
    """``W_enc`` [d_model, d_sae] (transposed to our convention), ``b_enc``,
    ``b_dec`` (layer ``layer``'s output bias), ``threshold`` (or absent), float32."""
    existing_file(path, "cross-layer encoder file")
    with reading(path, "cross-layer encoder file"), safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        need = [f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"]
        missing = [k for k in need if k not in keys]
        if missing:
            raise IncompatibleTranscoderError(
                f"{path}: a cross-layer transcoder encoder file of layer {layer} needs {need}; "
                f"missing {missing}, found {sorted(keys)}.")
        weight = lambda name: float_weight(f.get_tensor(name), name, path)  # noqa: E731
        out = {"W_enc": weight(f"W_enc_{layer}").T.contiguous(), "b_enc": weight(f"b_enc_{layer}"),
               "b_dec": weight(f"b_dec_{layer}")}
        if f"threshold_{layer}" in keys:
            out["threshold"] = weight(f"threshold_{layer}").reshape(-1)
    return out


def clt_decoder_shape(path, layer: int) -> tuple[int, int, int]:
    """[d_sae, n_targets, d_model] of ``W_dec_{layer}`` without reading it,
    after checking that it is stored as floating point (the readers below cast)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        if f"W_dec_{layer}" not in set(f.keys()):
            raise IncompatibleTranscoderError(f"{path}: no tensor W_dec_{layer}.")
        decoder = f.get_slice(f"W_dec_{layer}")
        shape = tuple(decoder.get_shape())
        if len(shape) != 3:
            raise IncompatibleTranscoderError(
                f"{path}: W_dec_{layer} has shape {shape}, expected [d_sae, n_targets, d_model].")
        float_weight(decoder[:0], f"W_dec_{layer}", path)       # the dtype rule of every reader; reads no row
    return shape  # type: ignore[return-value]


def read_clt_decoder_rows(path, layer: int, features: Sequence[int]) -> torch.Tensor:
    """[k, n_targets, d_model]: the decoders of ``features`` (sorted ids) into every target layer."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_slice(f"W_dec_{layer}")[list(features)].float()


def read_clt_decoder_target(path, layer: int, offset: int, chunk: int = 4096) -> torch.Tensor:
    """[d_sae, d_model]: layer ``layer``'s decoder into target layer ``layer + offset``,
    read ``chunk`` features at a time."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        sl = f.get_slice(f"W_dec_{layer}")
        d_sae = sl.get_shape()[0]
        return torch.cat([sl[start:start + chunk, offset, :].float()
                          for start in range(0, d_sae, chunk)])


def read_clt_decoder_sum(path, layer: int, n_targets: int, chunk: int = 1024) -> torch.Tensor:
    """[d_sae, d_model]: the sum of layer ``layer``'s decoders over its first
    ``n_targets`` target layers, ``chunk`` features at a time."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        sl = f.get_slice(f"W_dec_{layer}")
        d_sae = sl.get_shape()[0]
        return torch.cat([sl[start:start + chunk, :n_targets, :].float().sum(1)
                          for start in range(0, d_sae, chunk)])


def write_clt(directory, W_enc: Sequence[torch.Tensor], b_enc: Sequence[torch.Tensor],
              W_dec: Sequence[torch.Tensor], b_dec: Sequence[torch.Tensor],
              threshold: Sequence[torch.Tensor] | None = None) -> list[Path]:
    """Write a CLT in circuit-tracer's layout: per layer L, ``W_enc[L]``
    [d_model, d_sae] (our convention; stored transposed), ``b_enc[L]`` [d_sae],
    ``W_dec[L]`` [d_sae, n_layers − L, d_model], ``b_dec[L]`` [d_model],
    ``threshold[L]`` [d_sae] (optional). Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    n = len(W_enc)
    for layer in range(n):
        if W_dec[layer].shape[1] != n - layer:
            raise IncompatibleTranscoderError(
                f"W_dec[{layer}] has {W_dec[layer].shape[1]} target layers, expected {n - layer}.")
        enc = {f"W_enc_{layer}": W_enc[layer].T, f"b_enc_{layer}": b_enc[layer],
               f"b_dec_{layer}": b_dec[layer]}
        if threshold is not None:
            enc[f"threshold_{layer}"] = threshold[layer]
        for name, tensors in ((encoder_file(layer), enc),
                              (decoder_file(layer), {f"W_dec_{layer}": W_dec[layer]})):
            path = directory / name
            save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, str(path))
            paths.append(path)
    return paths
