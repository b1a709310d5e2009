"""Cross-layer transcoders (CLTs): ``CrossLayerTranscoderSet``, a
``TranscoderSet`` whose features write to every later layer, with decoders
read from circuit-tracer's ``W_dec_{L}.safetensors`` files as needed."""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from .errors import IncompatibleTranscoderError, InvalidInputError
from .integrity import reading
from .integrity import transcoder_fingerprint
from .formats.clt import (clt_decoder_shape, read_clt_decoder_rows, read_clt_decoder_sum, read_clt_decoder_target,
                          read_clt_encoder)
from .model import layer_hook
from .transcoder import LayerInfo, Transcoder, TranscoderSet

__all__ = ["CrossLayerTranscoderSet"]


class CrossLayerTranscoderSet(TranscoderSet):
    """A cross-layer transcoder (CLT): the features of layer ``l`` read layer
    ``l``'s input hook and write to the output hook of every layer ``l' ≥ l``,
    one decoder per target layer; layer ``l'``'s MLP output is approximated by
    ``Σ_{l ≤ l'} acts_l @ W_dec_l[:, l' − l] + b_dec[l']``.

    ``self[l]`` is layer ``l``'s encoder as a :class:`Transcoder` (``encode``
    works as for a per-layer transcoder; its ``W_dec`` is the sum of the
    feature's decoders over all target layers, its total write to the residual
    stream, as the logit-effect views need; ``decode`` refuses). Decoders stay
    on disk (circuit-tracer's ``W_dec_{L}.safetensors``) and are read as
    needed: the rows of chosen features (:meth:`decoder_rows`), one target
    layer at a time (:meth:`decoder_to`), or summed in chunks. No more than one
    layer's decoder is ever held whole.

    ``encoder_paths[l]()`` / ``decoder_paths[l]()`` return the local files
    (downloading them on first call)."""

    is_cross_layer = True

    def __init__(self, name: str, n_layers: int, input_hook: str, output_hook: str,
                 encoder_paths: Mapping[int, Callable[[], object]],
                 decoder_paths: Mapping[int, Callable[[], object]], **kwargs):
        layers = {l: LayerInfo(l, layer_hook(input_hook, l), layer_hook(output_hook, l))
                  for l in range(n_layers)}
        self._encoder_paths, self._decoder_paths = dict(encoder_paths), dict(decoder_paths)
        self._biases: dict[int, torch.Tensor] = {}
        loaders = {l: (lambda l=l: self._load_encoder(l)) for l in range(n_layers)}
        super().__init__(name, layers, loaders, **kwargs)
        self.n_layers = n_layers

    # -- files ---------------------------------------------------------------------
    def _decoder_path(self, layer: int):
        return self._decoder_paths[layer]()

    def _load_encoder(self, layer: int) -> Transcoder:
        t = read_clt_encoder(self._encoder_paths[layer](), layer)
        self._biases[layer] = t["b_dec"]
        path = self._decoder_path(layer)
        n_targets = self.n_layers - layer
        # Checked before reading: a decoder with too many target layers would
        # otherwise be summed over the first n_targets only, silently.
        with reading(path, "cross-layer decoder file"):
            shape = clt_decoder_shape(path, layer)
        d_model, d_sae = t["W_enc"].shape
        if tuple(shape) != (d_sae, n_targets, d_model):
            raise IncompatibleTranscoderError(
                f"{path}: W_dec_{layer} has shape {tuple(shape)}, expected (d_sae, n_targets, d_model) = "
                f"{(d_sae, n_targets, d_model)}: layer {layer} of a {self.n_layers}-layer cross-layer "
                "transcoder writes to every layer from its own on. Is this file from another set?")
        total = read_clt_decoder_sum(path, layer, n_targets)       # [d_sae, d_model]
        tc = Transcoder(t["W_enc"], t["b_enc"], total, threshold=t.get("threshold"), layer=layer,
                        input_hook=self.info[layer].input_hook, output_hook=self.info[layer].output_hook)
        tc.cross_layer = True
        return tc

    def fingerprint(self, layer: int) -> str:
        """Layer ``layer``'s digest covers its decoders into every target layer
        (the first and last 8 features' rows), not only their sum: weights that
        differ in one target's decoder get another fingerprint."""
        tc = self[layer]
        picks = sorted(set(range(min(8, tc.d_sae))) | set(range(max(0, tc.d_sae - 8), tc.d_sae)))
        rows = read_clt_decoder_rows(self._decoder_path(layer), layer, picks)   # [16, n_targets, d_model]
        return transcoder_fingerprint(tc, rows)

    # -- decoders ------------------------------------------------------------------
    def target_layers(self, source: int) -> list[int]:
        return list(range(self._check(source), self.n_layers))

    def decoder_rows(self, source: int, features) -> torch.Tensor:
        source = self._check(source)
        idx = self.check_features(source, features)
        if idx.numel() == 0:
            d = self.d_in(source)
            return torch.zeros(0, self.n_layers - source, d, device=self.device, dtype=self.dtype)
        uniq, inverse = torch.unique(idx, return_inverse=True)
        rows = read_clt_decoder_rows(self._decoder_path(source), source, uniq.tolist())
        return rows[inverse].to(device=self.device, dtype=self.dtype)

    def decoder_to(self, source: int, target: int) -> torch.Tensor:
        source = self._check(source)
        if target not in self.target_layers(source):
            raise InvalidInputError(f"Features of layer {source} do not write to layer {target}.")
        return read_clt_decoder_target(self._decoder_path(source), source, target - source).to(
            device=self.device, dtype=self.dtype)

    def decoder_sum(self, source: int, before: int | None = None) -> torch.Tensor:
        source = self._check(source)
        if before is None or before >= self.n_layers:
            return self[source].W_dec
        n = max(0, before - source)
        if n == 0:
            tc = self[source]
            return tc.W_dec.new_zeros(tc.d_sae, tc.d_out)
        return read_clt_decoder_sum(self._decoder_path(source), source, n).to(
            device=self.device, dtype=self.dtype)

    def output_bias(self, layer: int) -> torch.Tensor:
        layer = self._check(layer)
        if layer not in self._biases:
            self[layer]
        return self._biases[layer].to(device=self.device, dtype=self.dtype)

    def reconstruct(self, layer: int, acts: Mapping[int, torch.Tensor],
                    x: torch.Tensor | None = None) -> torch.Tensor:
        layer = self._check(layer)
        out = self.output_bias(layer)
        for source in self.sources(layer):
            a = acts[source]                                         # [..., d_sae]
            flat = a.reshape(-1, a.shape[-1])
            active = torch.nonzero(flat.abs().sum(0) > 0).flatten()
            if active.numel() == 0:
                continue
            rows = self.decoder_rows(source, active)[:, layer - source]       # [k, d_model]
            out = out + flat.index_select(1, active).to(rows.dtype) @ rows    # [N, d_model]
        return out.reshape(*acts[layer].shape[:-1], -1) if out.ndim == 2 else \
            out.expand(*acts[layer].shape[:-1], out.shape[-1])

    def __repr__(self) -> str:
        return (f"CrossLayerTranscoderSet({self.name!r}, n_layers={self.n_layers}, "
                f"loaded={self.loaded_layers()}, device={self.device}, dtype={self.dtype})")
