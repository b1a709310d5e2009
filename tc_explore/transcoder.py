"""Transcoders: wide, sparsely-activating stand-ins for MLP sublayers.

A transcoder reads the MLP's input hook (``blocks.L.ln2.hook_normalized`` for
GPT-2) and predicts its output hook (``blocks.L.hook_mlp_out``):

    pre  = (x - b_dec) @ W_enc + b_enc          # [.., d_sae]
    acts = relu(pre)            (ReLU)          # or pre * (pre > threshold) (JumpReLU)
    out  = acts @ W_dec + b_dec_out  (+ x @ W_skip for skip transcoders)

``b_dec`` is the input centring of the gpt2-small set; formats without it
(Gemma Scope, circuit-tracer) load with ``b_dec = 0``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import IncompatibleTranscoderError, InvalidInputError, as_integer, check_feature
from .model import hook_ln2_normalized, hook_mlp_out


class Transcoder(nn.Module):
    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor | None = None, b_dec_out: torch.Tensor | None = None,
                 threshold: torch.Tensor | None = None, W_skip: torch.Tensor | None = None,
                 layer: int | None = None, input_hook: str | None = None,
                 output_hook: str | None = None):
        super().__init__()
        where = "" if layer is None else f" (layer {layer})"
        for name, t in (("W_enc", W_enc), ("W_dec", W_dec)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2:
                raise IncompatibleTranscoderError(
                    f"{name}{where} must be a 2-D tensor, got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
        d_in, d_sae = W_enc.shape
        if d_sae == 0 or d_in == 0:
            raise IncompatibleTranscoderError(
                f"W_enc{where} has shape {tuple(W_enc.shape)}: a transcoder needs at least one input "
                "dimension and one feature.")
        if W_dec.shape[0] != d_sae:
            raise IncompatibleTranscoderError(
                f"W_dec has {W_dec.shape[0]} rows but W_enc has {d_sae} features; "
                "expected W_enc [d_in, d_sae] and W_dec [d_sae, d_out].")
        d_out = W_dec.shape[1]
        zeros = W_enc.new_zeros
        self.W_enc = nn.Parameter(_checked(W_enc, (d_in, d_sae), "W_enc", where))
        self.b_enc = nn.Parameter(_checked(b_enc, (d_sae,), "b_enc", where))
        self.W_dec = nn.Parameter(_checked(W_dec, (d_sae, d_out), "W_dec", where))
        self.b_dec = nn.Parameter(
            _checked(b_dec if b_dec is not None else zeros(d_in), (d_in,), "b_dec", where))
        self.b_dec_out = nn.Parameter(
            _checked(b_dec_out if b_dec_out is not None else zeros(d_out), (d_out,), "b_dec_out", where))
        self.threshold = None if threshold is None else nn.Parameter(
            _checked(threshold, (d_sae,), "threshold", where), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(
            _checked(W_skip, (d_in, d_out), "W_skip", where))
        self.layer = layer
        # True for one layer of a cross-layer transcoder: its W_dec is the sum of
        # the feature's decoders over every layer it writes to (its total write to
        # the residual stream), and decoding needs the whole set.
        self.cross_layer = False
        self.input_hook = input_hook if input_hook is not None else (
            None if layer is None else hook_ln2_normalized(layer))
        self.output_hook = output_hook if output_hook is not None else (
            None if layer is None else hook_mlp_out(layer))

    # -- facts -------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def activation(self) -> str:
        return "jumprelu" if self.threshold is not None else "relu"

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # -- computation -------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[..., d_in] -> [..., d_sae], before the nonlinearity; written into
        ``out`` if given (``[..., d_sae]`` of the weights' dtype; same values)."""
        self._check_input(x)
        if out is not None:
            self._check_out(x, out)
        xc = x.to(self.dtype) - self.b_dec
        pre = xc @ self.W_enc if out is None else torch.matmul(xc, self.W_enc, out=out)
        # The bias is added in place (the same sums): [..., d_sae] is the
        # largest tensor here, and a second one would double an encoding's memory.
        return pre.add_(self.b_enc)

    def activate(self, pre: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The nonlinearity; ``inplace`` overwrites ``pre`` (same values)."""
        if self.threshold is None:
            return torch.relu_(pre) if inplace else torch.relu(pre)
        return pre.mul_(pre > self.threshold) if inplace else pre * (pre > self.threshold)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations, [..., d_in] -> [..., d_sae]; written into
        ``out`` if given (a tensor of that shape and the weights' dtype,
        without autograd), the same values: a caller encoding batch after
        batch can reuse one buffer instead of fresh memory each time (at 1024
        tokens x 24,576 features, 100 MB)."""
        pre = self.pre_activation(x, out)
        # Without autograd the pre-activations are not kept: overwrite them.
        return self.activate(pre, inplace=out is not None or not (torch.is_grad_enabled() and pre.requires_grad))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """[..., d_sae] -> [..., d_out]; the skip term needs the input ``x``."""
        if self.cross_layer:
            raise InvalidInputError(
                f"Layer {self.layer} belongs to a cross-layer transcoder: its features write to "
                "every later layer, so one layer cannot decode alone. Use "
                "CrossLayerTranscoderSet.reconstruct (or replace_mlps / decompose, which do).")
        if not isinstance(acts, torch.Tensor) or acts.shape[-1:] != (self.d_sae,):
            raise InvalidInputError(
                f"decode takes feature activations [..., d_sae={self.d_sae}], got "
                f"{tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__}.")
        out = acts.to(self.dtype) @ self.W_dec + self.b_dec_out
        if self.W_skip is not None:
            if x is None:
                raise InvalidInputError("This is a skip transcoder: decode needs the input x too.")
            out = out + x.to(self.dtype) @ self.W_skip
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(output [..., d_out], feature activations [..., d_sae])``."""
        acts = self.encode(x)
        return self.decode(acts, x), acts

    # -- checks ------------------------------------------------------------------------
    def check_feature(self, feature: int) -> int:
        """``feature`` as an int, if it is one of this transcoder's features."""
        where = "the transcoder" if self.layer is None else f"the transcoder of layer {self.layer}"
        return check_feature(feature, self.d_sae, where)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()) \
                or x.ndim == 0:
            raise InvalidInputError(
                f"A transcoder reads a floating-point tensor [..., d_in={self.d_in}], got "
                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}.")
        if x.shape[-1] != self.d_in:
            raise IncompatibleTranscoderError(
                f"The transcoder{'' if self.layer is None else f' of layer {self.layer}'} "
                f"reads vectors of size d_in={self.d_in}, got size {x.shape[-1]}. "
                "Is it the transcoder set of this model?")

    def _check_out(self, x: torch.Tensor, out) -> None:
        shape = (*x.shape[:-1], self.d_sae)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != self.dtype \
                or out.device != self.device:
            got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise InvalidInputError(
                f"out must be a tensor {shape} {self.dtype} on {self.device} (the activations of "
                f"this input), got {got}.")
        if torch.is_grad_enabled() and self.W_enc.requires_grad:
            raise InvalidInputError("out= encodes without autograd: call it under torch.no_grad() "
                                    "or torch.inference_mode(), or leave out out.")

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}, "
                f"activation={self.activation}, skip={self.W_skip is not None}, "
                f"in={self.input_hook!r}, out={self.output_hook!r}")


def _checked(t: torch.Tensor, shape: tuple[int, ...], name: str, where: str = "") -> torch.Tensor:
    """A copy of weight ``t`` after checking its type, shape and values: NaN or
    infinite weights would run and turn every activation downstream into NaN."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise IncompatibleTranscoderError(
            f"{name}{where} must be a floating-point tensor, got "
            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}.")
    if tuple(t.shape) != shape:
        raise IncompatibleTranscoderError(
            f"{name}{where} has shape {tuple(t.shape)}, expected {shape}.")
    t = t.detach()
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int((~finite).sum()) - int(torch.isnan(t).sum())
        raise IncompatibleTranscoderError(
            f"Transcoder weight {name}{where} holds {n_nan} NaN and {n_inf} infinite values "
            f"(of {t.numel()}): the file is damaged or its training diverged. Use another copy "
            "of the weights (re-download or retrain).")
    return t.clone()


def float_weight(t, name: str, path) -> torch.Tensor:
    """Weight ``name`` read from file ``path`` as float32, if the file stores it
    as floating point: integer, bool or complex weights are not a transcoder's
    (casting them would hide a wrong or damaged file)."""
    kind = getattr(getattr(t, "dtype", None), "kind", None)          # numpy
    floating = t.is_floating_point() if isinstance(t, torch.Tensor) else kind == "f"
    if not floating:
        raise IncompatibleTranscoderError(f"{path}: weight {name} is stored as {t.dtype}, not floating point; "
                                          "this is not a transcoder file of this format (or it is damaged).")
    return torch.as_tensor(t).float() if isinstance(t, torch.Tensor) else torch.from_numpy(t.astype("float32"))


@dataclass(frozen=True)
class LayerInfo:
    """What is known of one layer's transcoder before its weights are loaded."""
    layer: int
    input_hook: str
    output_hook: str
    d_in: int | None = None
    d_sae: int | None = None


class TranscoderSet(Mapping[int, Transcoder]):
    """Transcoders keyed by layer, loaded lazily on first access.

    ``loaders[layer]()`` returns that layer's Transcoder; ``frequency_loaders``
    (optional) return its log10 firing frequency per feature.
    """

    def __init__(self, name: str, layers: Mapping[int, LayerInfo],
                 loaders: Mapping[int, Callable[[], Transcoder]],
                 frequency_loaders: Mapping[int, Callable[[], torch.Tensor]] | None = None,
                 model_name: str | None = None, repo_id: str | None = None,
                 revision: str | None = None, device=None, dtype: torch.dtype | None = None):
        self.name = name
        self.info = dict(sorted(layers.items()))
        self._loaders = dict(loaders)
        self._frequency_loaders = dict(frequency_loaders or {})
        self._loaded: dict[int, Transcoder] = {}
        self._frequencies: dict[int, torch.Tensor] = {}
        self.model_name = model_name
        self.repo_id = repo_id
        self.revision = revision
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or torch.float32

    @classmethod
    def from_transcoders(cls, transcoders: Mapping[int, Transcoder] | Iterable[Transcoder],
                         name: str = "custom", **kwargs) -> "TranscoderSet":
        """A set from transcoders already in memory (e.g. just trained)."""
        items = list(transcoders.items()) if isinstance(transcoders, Mapping) else \
            [(getattr(tc, "layer", None), tc) for tc in transcoders]
        if not items:
            raise InvalidInputError("from_transcoders needs at least one transcoder, got none.")
        info, loaders = {}, {}
        first = None
        for layer, tc in items:
            if not isinstance(tc, Transcoder):
                raise InvalidInputError(f"from_transcoders takes Transcoder objects, got "
                                        f"{type(tc).__name__} for layer {layer!r}.")
            if layer is None:
                raise InvalidInputError("Each transcoder needs its layer set to form a TranscoderSet.")
            layer = as_integer(layer, "layer")
            if layer in info:
                raise InvalidInputError(f"Two transcoders for layer {layer}: give each layer one.")
            info[layer] = LayerInfo(layer, tc.input_hook, tc.output_hook, tc.d_in, tc.d_sae)
            loaders[layer] = (lambda tc=tc: tc)
            first = first or tc
        kwargs.setdefault("device", first.device if first is not None else None)
        kwargs.setdefault("dtype", first.dtype if first is not None else None)
        return cls(name, info, loaders, **kwargs)

    # -- Mapping -----------------------------------------------------------------------
    def __getitem__(self, layer: int) -> Transcoder:
        layer = self.check_layer(layer)
        if layer not in self._loaded:
            tc = self._loaders[layer]()
            tc.requires_grad_(False)
            self._loaded[layer] = tc.to(device=self.device, dtype=self.dtype)
        return self._loaded[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def __contains__(self, layer) -> bool:
        return layer in self.info

    @property
    def layers(self) -> list[int]:
        return list(self.info)

    def select_layers(self, layers: Iterable[int] | int | None = None) -> list[int]:
        """The layers a caller asked for, validated: all of the set's for None,
        one for an int, else each checked (a clear error for one not in the set)."""
        if layers is None:
            return self.layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable) or \
                getattr(layers, "ndim", None) == 0:
            layers = [layers]          # one layer (an int, numpy or 0-d tensor integer)
        return list(dict.fromkeys(self.check_layer(layer) for layer in layers))

    def loaded_layers(self) -> list[int]:
        return sorted(self._loaded)

    # -- where features write (uniform over per-layer and cross-layer sets) -------------
    is_cross_layer = False

    def target_layers(self, source: int) -> list[int]:
        """The layers whose MLP output the features of layer ``source`` write to:
        ``[source]`` for a per-layer set, ``source`` and every later layer for a CLT."""
        return [self._check(source)]

    def decoder_rows(self, source: int, features) -> torch.Tensor:
        """[k, len(target_layers(source)), d_model]: the decoder rows of
        ``features`` (ids of layer ``source``), one per target layer."""
        tc = self[source]
        idx = self.check_features(source, features).to(tc.device)
        return tc.W_dec.index_select(0, idx)[:, None]

    def decoder_to(self, source: int, target: int) -> torch.Tensor:
        """[d_sae, d_model]: layer ``source``'s decoder into layer ``target``'s MLP output."""
        if target not in self.target_layers(source):
            raise InvalidInputError(f"Features of layer {source} do not write to layer {target}.")
        return self[source].W_dec

    def decoder_sum(self, source: int, before: int | None = None) -> torch.Tensor:
        """[d_sae, d_model]: layer ``source``'s decoders summed over the target
        layers before ``before`` (all of them for None): a feature's total write
        to the residual stream that a reader at layer ``before`` sees."""
        targets = [t for t in self.target_layers(source) if before is None or t < before]
        if targets == [source]:
            return self[source].W_dec
        out = None
        for t in targets:
            part = self.decoder_to(source, t)
            out = part.clone() if out is None else out.add_(part)
        if out is None:
            tc = self[source]
            return tc.W_dec.new_zeros(tc.d_sae, tc.d_out)
        return out

    def output_bias(self, layer: int) -> torch.Tensor:
        """[d_model]: the constant of layer ``layer``'s MLP reconstruction."""
        return self[layer].b_dec_out

    def feature_writes(self, source: int, features) -> list[tuple[str, torch.Tensor]]:
        """``[(output hook, decoder rows [k, d_model])]`` for every layer the
        features ``features`` of layer ``source`` write to."""
        rows = self.decoder_rows(source, features)
        return [(self.output_hook(t), rows[:, i]) for i, t in enumerate(self.target_layers(source))]

    def reconstruct(self, layer: int, acts: Mapping[int, torch.Tensor],
                    x: torch.Tensor | None = None) -> torch.Tensor:
        """[..., d_model]: layer ``layer``'s MLP output as the transcoders
        rebuild it from feature activations ``acts[source]`` [..., d_sae] (of
        every source layer writing to ``layer``) and, for skip transcoders, the
        layer's input ``x``."""
        return self[layer].decode(acts[layer], x)

    def sources(self, target: int) -> list[int]:
        """The layers whose features write to layer ``target``'s MLP output."""
        return [s for s in self.layers if target in self.target_layers(s)]

    def input_hook(self, layer: int) -> str:
        return self.info[self.check_layer(layer)].input_hook

    def output_hook(self, layer: int) -> str:
        return self.info[self.check_layer(layer)].output_hook

    def d_sae(self, layer: int) -> int:
        info = self.info[self.check_layer(layer)]
        return info.d_sae if info.d_sae is not None else self[layer].d_sae

    def fingerprint(self, layer: int) -> str:
        """A short digest of layer ``layer``'s weights (``integrity.transcoder_fingerprint``):
        what an index or weight view records to refuse other weights later."""
        from .integrity import transcoder_fingerprint
        return transcoder_fingerprint(self[layer])

    def d_in(self, layer: int) -> int:
        info = self.info[self.check_layer(layer)]
        return info.d_in if info.d_in is not None else self[layer].d_in

    def log_feature_frequency(self, layer: int) -> torch.Tensor | None:
        """log10 of each feature's firing frequency, as published with the set
        (the ``_log_feature_sparsity`` files); None where the set has none."""
        layer = self.check_layer(layer)
        if layer not in self._frequencies:
            loader = self._frequency_loaders.get(layer)
            if loader is None:
                return None
            self._frequencies[layer] = loader().float().cpu()
        return self._frequencies[layer]

    def to(self, device=None, dtype=None) -> "TranscoderSet":
        from .model import as_device, as_dtype
        if device is not None:
            self.device = as_device(device)
        if dtype is not None:
            self.dtype = as_dtype(dtype)
        for layer, tc in self._loaded.items():
            self._loaded[layer] = tc.to(device=self.device, dtype=self.dtype)
        return self

    def check_layer(self, layer) -> int:
        """``layer`` as an int, if this set has a transcoder for it."""
        layer = as_integer(layer, "layer")
        if layer not in self.info:
            raise InvalidInputError(
                f"Layer {layer} has no transcoder in set {self.name!r}; "
                f"its layers are {self.layers}.")
        return layer

    _check = check_layer      # the old private name, still used by branches in flight

    def check_feature(self, layer: int, feature: int) -> int:
        """``feature`` as an int, if it is one of layer ``layer``'s features."""
        layer = self.check_layer(layer)
        return check_feature(feature, self.d_sae(layer), f"layer {layer} of {self.name!r}")

    def check_features(self, layer: int, features) -> torch.Tensor:
        """``features`` (a list, array or tensor of feature ids of layer ``layer``)
        as a 1-D int64 CPU tensor, checked as ``check_feature`` does: integers in
        range, never rounded (integer tensors and arrays checked at once)."""
        layer = self.check_layer(layer)
        d_sae = self.d_sae(layer)
        if isinstance(features, torch.Tensor) and not (features.is_floating_point() or features.is_complex()
                                                      or features.dtype == torch.bool):
            idx = features.detach().reshape(-1).to("cpu", torch.long)
        elif getattr(getattr(features, "dtype", None), "kind", None) in ("i", "u"):      # numpy integers
            idx = torch.as_tensor(features.reshape(-1), dtype=torch.long)
        else:
            items = features.reshape(-1).tolist() if hasattr(features, "reshape") else features
            items = [items] if not isinstance(items, Iterable) or isinstance(items, (str, bytes)) else items
            return torch.tensor([check_feature(f, d_sae, f"layer {layer} of {self.name!r}") for f in items],
                                dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_sae):
            bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
            check_feature(bad, d_sae, f"layer {layer} of {self.name!r}")
        return idx

    def check_fits(self, model, layers: Iterable[int] | None = None) -> "TranscoderSet":
        """Raise a clear error if this set (or the chosen layers of it) cannot be
        used with ``model``. Loads the layers it checks whose shapes are unknown."""
        from .model import check_model_surface
        check_model_surface(model)
        n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
        for layer in self.select_layers(layers):
            info = self.info[layer]
            if layer >= n_layers:
                raise IncompatibleTranscoderError(
                    f"Transcoder set {self.name!r} has a transcoder for layer {layer}, but the "
                    f"model has only {n_layers} layers. Load the set made for this model"
                    + (f" ({self.model_name!r})." if self.model_name else "."))
            hooks = getattr(model, "hook_dict", None)
            for hook in (info.input_hook, info.output_hook):
                if isinstance(hooks, Mapping) and hook not in hooks:
                    raise IncompatibleTranscoderError(
                        f"Transcoder set {self.name!r} layer {layer} uses hook {hook!r}, which the "
                        f"model does not have (its hooks include "
                        f"{sorted(h for h in hooks if h.startswith(f'blocks.{layer}.'))[:8]}...). Check "
                        "the set's hook names (config.yaml's feature_input_hook / feature_output_hook).")
            d_in = info.d_in if info.d_in is not None else self[layer].d_in
            d_out = self[layer].d_out if layer in self._loaded else None
            for what, size in (("reads", d_in), ("writes", d_out)):
                if size is not None and size != d_model:
                    raise IncompatibleTranscoderError(
                        f"Transcoder set {self.name!r} layer {layer} {what} vectors of size "
                        f"{size}, but the model's d_model is {d_model}: this set belongs to "
                        f"another model{f' ({self.model_name!r})' if self.model_name else ''}.")
        return self

    def __repr__(self) -> str:
        return (f"TranscoderSet({self.name!r}, layers={self.layers}, "
                f"loaded={self.loaded_layers()}, device={self.device}, dtype={self.dtype})")


def as_transcoder_set(transcoders, what: str = "transcoders") -> TranscoderSet:
    """``transcoders`` if it is a :class:`TranscoderSet`; else a clear error
    (a set name or a dict of transcoders is not one yet)."""
    if not isinstance(transcoders, TranscoderSet):
        hint = (f" Load it first: load_transcoders({transcoders!r})." if isinstance(transcoders, str)
                else " Use load_transcoders(...) or TranscoderSet.from_transcoders(...).")
        raise InvalidInputError(f"{what} must be a TranscoderSet, got {type(transcoders).__name__}.{hint}")
    return transcoders
