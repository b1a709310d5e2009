"""Running a model with MLP sublayers replaced by transcoders, or ablated.

Everything goes through forward hooks on the transcoders' own input and output
hooks, so it works on any TransformerLens model. Each helper comes as a list
of ``(hook_name, fn)`` pairs (compose them yourself with ``run_with_hooks``),
as a context manager, and as a plain function.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Literal, Mapping, Sequence

import torch

from .errors import InvalidInputError, as_count
from .model import check_layer, hook_mlp_out, to_tokens
from .transcoder import Transcoder, TranscoderSet, as_transcoder_set

FeatureSelection = Mapping[int, Iterable[int]]
Hook = tuple[str, object]


def _feature_mask(tc: Transcoder, features: Iterable[int] | None, keep: bool) -> torch.Tensor | None:
    if features is None:
        return None
    idx = torch.as_tensor([tc.check_feature(f) for f in features], dtype=torch.long)
    mask = torch.zeros(tc.d_sae, dtype=tc.dtype, device=tc.device) if keep else \
        torch.ones(tc.d_sae, dtype=tc.dtype, device=tc.device)
    mask[idx.to(tc.device)] = 1.0 if keep else 0.0
    return mask


def transcoder_hooks(model, transcoders: TranscoderSet, layers: Sequence[int] | int | None = None,
                     keep_features: FeatureSelection | None = None,
                     ablate_features: FeatureSelection | None = None,
                     keep_error: bool = False,
                     store: dict | None = None) -> list[Hook]:
    """Hooks that replace each chosen layer's MLP output by its transcoder's.

    ``keep_features[layer]``: only these features write (the rest are zeroed);
    ``ablate_features[layer]``: these features are zeroed. ``keep_error`` adds
    back the transcoder's error (true MLP output minus transcoder output), so
    that with no features removed the model is unchanged. ``store`` (a dict)
    receives ``store[layer] = feature activations [batch, pos, d_sae]``.
    """
    layers = as_transcoder_set(transcoders).select_layers(layers)
    transcoders.check_fits(model, layers)
    for name, selection in (("keep_features", keep_features), ("ablate_features", ablate_features)):
        if selection is None:
            continue
        if not isinstance(selection, Mapping):
            raise InvalidInputError(f"{name} maps each layer to its features, e.g. {{6: [123, 456]}}; got "
                                    f"{type(selection).__name__}.")
        stray = [l for l in selection if l not in layers]
        if stray:
            raise InvalidInputError(f"{name} names layer(s) {stray} that are not replaced here (layers "
                                    f"{layers}); add them to layers, or drop them from {name}.")
    if transcoders.is_cross_layer:
        return _cross_layer_hooks(transcoders, layers, keep_features, ablate_features, keep_error, store)
    hooks: list[Hook] = []
    for layer in layers:
        tc = transcoders[layer]
        keep = _feature_mask(tc, (keep_features or {}).get(layer), keep=True)
        drop = _feature_mask(tc, (ablate_features or {}).get(layer), keep=False)
        captured: dict[str, torch.Tensor] = {}

        def read_input(x, hook, captured=captured):
            captured["x"] = x
            return x

        def write_output(mlp_out, hook, tc=tc, keep=keep, drop=drop, captured=captured, layer=layer):
            x = captured.pop("x")
            acts = tc.encode(x)
            if keep is not None:
                acts = acts * keep
            if drop is not None:
                acts = acts * drop
            if store is not None:
                store[layer] = acts
            out = tc.decode(acts, x)
            if keep_error:
                out = out + (mlp_out.to(out.dtype) - tc(x)[0])
            return out.to(mlp_out.dtype)

        hooks.append((tc.input_hook, read_input))
        hooks.append((tc.output_hook, write_output))
    return hooks


def _cross_layer_hooks(transcoders: TranscoderSet, layers: Sequence[int], keep_features,
                       ablate_features, keep_error: bool, store: dict | None) -> list[Hook]:
    """:func:`transcoder_hooks` for a cross-layer transcoder: every layer's
    features are encoded at its input hook (all layers, since each writes to the
    later ones); each chosen layer's output becomes the sum of the writes of
    the features of layers ≤ it, plus its bias (plus its error, kept)."""
    acts: dict[int, torch.Tensor] = {}
    clean: dict[int, torch.Tensor] = {}
    hooks: list[Hook] = []
    for layer in transcoders.layers:
        tc = transcoders[layer]
        keep = _feature_mask(tc, (keep_features or {}).get(layer), keep=True)
        drop = _feature_mask(tc, (ablate_features or {}).get(layer), keep=False)

        def read_input(x, hook, tc=tc, keep=keep, drop=drop, layer=layer):
            a = tc.encode(x)
            clean[layer] = a
            if keep is not None:
                a = a * keep
            if drop is not None:
                a = a * drop
            acts[layer] = a
            if store is not None:
                store[layer] = a
            return x
        hooks.append((tc.input_hook, read_input))
    for layer in layers:
        def write_output(mlp_out, hook, layer=layer):
            out = transcoders.reconstruct(layer, acts)
            if keep_error:
                out = out + (mlp_out.to(out.dtype) - transcoders.reconstruct(layer, clean))
            return out.to(mlp_out.dtype)
        hooks.append((transcoders.output_hook(layer), write_output))
    return hooks


def mlp_ablation_hooks(model, layers: Sequence[int] | int,
                       mode: Literal["zero", "mean"] = "zero",
                       means: Mapping[int, torch.Tensor] | None = None) -> list[Hook]:
    """Hooks that zero each chosen MLP's output, or set it to its mean
    (``means[layer]``, shape [d_model], e.g. from ``mean_mlp_outputs``)."""
    if isinstance(layers, int):
        layers = [layers]
    if mode not in ("zero", "mean"):
        raise InvalidInputError(f"mode must be 'zero' or 'mean', got {mode!r}.")
    hooks = []
    for layer in layers:
        layer = check_layer(model, layer)
        if mode == "mean":
            if means is None or layer not in means:
                raise InvalidInputError(
                    f"Mean ablation of layer {layer} needs means[{layer}]; compute them with "
                    "mean_mlp_outputs(model, tokens, layers).")
            value = means[layer]
            d_model = int(model.cfg.d_model)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (d_model,) \
                    or not bool(torch.isfinite(value).all()):
                raise InvalidInputError(
                    f"means[{layer}] must be a finite [d_model={d_model}] tensor (mean_mlp_outputs gives "
                    f"them), got {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
                    + (" with NaN or infinite values" if isinstance(value, torch.Tensor)
                       and tuple(value.shape) == (d_model,) else "") + ".")

            def fn(out, hook, value=value):
                return value.to(out.device, out.dtype).expand_as(out).clone()
        else:
            def fn(out, hook):
                return torch.zeros_like(out)
        hooks.append((hook_mlp_out(layer), fn))
    return hooks


@torch.no_grad()
def mean_mlp_outputs(model, tokens: torch.Tensor, layers: Sequence[int] | None = None,
                     batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Mean MLP output per layer over all token positions of ``tokens`` [batch, pos]."""
    tokens = to_tokens(model, tokens)
    batch_size = as_count(batch_size, "batch_size")
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    names = {hook_mlp_out(l): l for l in layers}
    sums = {l: torch.zeros(model.cfg.d_model, dtype=torch.float64) for l in layers}
    count = 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start:start + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
        for name, l in names.items():
            sums[l] += cache[name].double().sum(dim=(0, 1)).cpu()
        count += batch.numel()
    return {l: (s / count).float() for l, s in sums.items()}


@contextmanager
def replace_mlps(model, transcoders: TranscoderSet, layers=None, **kwargs):
    """``with replace_mlps(model, transcoders, layers=[8]): model(tokens)``"""
    with model.hooks(fwd_hooks=transcoder_hooks(model, transcoders, layers, **kwargs)):
        yield model


@contextmanager
def ablate_mlps(model, layers, mode: Literal["zero", "mean"] = "zero", means=None):
    with model.hooks(fwd_hooks=mlp_ablation_hooks(model, layers, mode, means)):
        yield model


def run_with_transcoders(model, tokens, transcoders: TranscoderSet, layers=None, **kwargs):
    """Logits of the model with the chosen MLPs replaced by transcoders."""
    return model.run_with_hooks(to_tokens(model, tokens),
                                fwd_hooks=transcoder_hooks(model, transcoders, layers, **kwargs))


def run_with_ablated_mlps(model, tokens, layers, mode="zero", means=None):
    return model.run_with_hooks(to_tokens(model, tokens), fwd_hooks=mlp_ablation_hooks(model, layers, mode, means))
