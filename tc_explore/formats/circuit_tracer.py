"""circuit-tracer transcoder sets: ``config.yaml`` plus per-layer safetensors.

``config.yaml`` (read with ``yaml.safe_load``): ``model_name``, ``model_kind``
(``transcoder_set``; ``cross_layer_transcoder`` sets are read by :mod:`.clt`), ``feature_input_hook`` / ``feature_output_hook`` (hook
suffixes such as ``ln2.hook_normalized`` / ``hook_mlp_out``, or
``hook_resid_mid`` / ``mlp.hook_out``), optionally ``transcoders``: one
``hf://REPO/PATH[?revision=REV]`` URI per layer; else files ``layer_{L}.safetensors``.

Per-layer safetensors: ``W_enc`` [d_sae, d_model] (encode is ``x @ W_enc.T +
b_enc``), ``W_dec`` [d_sae, d_model], ``b_enc`` [d_sae], ``b_dec`` [d_model]
(output bias), optional ``activation_function.threshold`` [d_sae] (JumpReLU),
optional ``W_skip`` [d_model, d_model] added as ``x @ W_skip.T``.

Gemma Scope 2 per-layer safetensors: ``w_enc`` [d_model, d_sae], ``w_dec``
[d_sae, d_model], ``b_enc``, ``b_dec``, ``threshold``, optional
``affine_skip_connection`` [d_model, d_model] added as ``x @ affine_skip_connection``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..errors import IncompatibleTranscoderError
from ..integrity import atomic_write, existing_file, reading
from ..transcoder import Transcoder, float_weight

THRESHOLD_KEY = "activation_function.threshold"


def _load(path) -> dict[str, torch.Tensor]:
    # safetensors carry no checksum: a damaged header or a short file is caught
    # here, flipped weight bytes only by the Hub cache's content hash.
    existing_file(path, "safetensors file")
    with reading(path, "safetensors file"):
        tensors = load_file(str(path), device="cpu")
    return {k: float_weight(v, k, path) for k, v in tensors.items()}


def _need(tensors: dict, keys, path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise IncompatibleTranscoderError(
            f"{path}: missing {missing}; found {sorted(tensors)}. Is this the right format?")


def read_circuit_tracer_safetensors(path, layer=None, input_hook=None, output_hook=None) -> Transcoder:
    t = _load(path)
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec"), path)
    # circuit-tracer loads these files strictly, so an unknown key is a file of
    # another layout, never something to skip (a bare "threshold" would
    # otherwise load a JumpReLU set as ReLU).
    unknown = sorted(set(t) - {"W_enc", "W_dec", "b_enc", "b_dec", THRESHOLD_KEY, "W_skip"})
    if unknown:
        hint = (f" (a JumpReLU threshold is stored as {THRESHOLD_KEY!r} in this layout)"
                if "threshold" in unknown else "")
        raise IncompatibleTranscoderError(
            f"{path}: unexpected tensors {unknown} in a circuit-tracer transcoder file{hint}; it holds only "
            f"W_enc, W_dec, b_enc, b_dec and optionally {THRESHOLD_KEY} and W_skip. Is this the right format?")
    skip = t.get("W_skip")
    return Transcoder(t["W_enc"].T, t["b_enc"], t["W_dec"], b_dec=None, b_dec_out=t["b_dec"],
                      threshold=t.get(THRESHOLD_KEY), W_skip=None if skip is None else skip.T,
                      layer=layer, input_hook=input_hook, output_hook=output_hook)


def write_circuit_tracer_safetensors(tc: Transcoder, path) -> Path:
    if bool(tc.b_dec.detach().abs().max() > 0):
        raise IncompatibleTranscoderError("circuit-tracer files have no input centring (b_dec).")
    t = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec_out}
    if tc.threshold is not None:
        t[THRESHOLD_KEY] = tc.threshold
    if tc.W_skip is not None:
        t["W_skip"] = tc.W_skip.T
    return _save(t, path)


def read_gemma_scope_2_safetensors(path, layer=None, input_hook=None, output_hook=None) -> Transcoder:
    t = _load(path)
    _need(t, ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"), path)
    return Transcoder(t["w_enc"], t["b_enc"], t["w_dec"], b_dec=None, b_dec_out=t["b_dec"],
                      threshold=t["threshold"], W_skip=t.get("affine_skip_connection"),
                      layer=layer, input_hook=input_hook, output_hook=output_hook)


def write_gemma_scope_2_safetensors(tc: Transcoder, path) -> Path:
    if tc.threshold is None or bool(tc.b_dec.detach().abs().max() > 0):
        raise IncompatibleTranscoderError("Gemma Scope 2 files are JumpReLU without input centring.")
    t = {"w_enc": tc.W_enc, "w_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec_out,
         "threshold": tc.threshold}
    if tc.W_skip is not None:
        t["affine_skip_connection"] = tc.W_skip
    return _save(t, path)


def _save(tensors: dict[str, torch.Tensor], path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}, str(tmp))
    return path


@dataclass(frozen=True)
class HfUri:
    repo_id: str
    filename: str
    revision: str | None


_HF_URI = re.compile(r"^hf://(?P<repo>[^/]+/[^/]+)/(?P<path>[^?]+)(\?revision=(?P<rev>.+))?$")


def parse_hf_uri(uri: str) -> HfUri:
    m = _HF_URI.match(uri.strip())
    if not m:
        raise IncompatibleTranscoderError(
            f"{uri!r} is not an hf://OWNER/REPO/PATH[?revision=REV] URI.")
    return HfUri(m["repo"], m["path"], m["rev"])


def read_circuit_tracer_config(path) -> dict:
    existing_file(path, "config file")
    with reading(path, "config file"), open(path, "r", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise IncompatibleTranscoderError(f"{path}: config.yaml must hold a mapping.")
    kind = cfg.get("model_kind", "transcoder_set")
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise IncompatibleTranscoderError(
            f"{path}: model_kind {kind!r} is not supported (per-layer 'transcoder_set' or "
            "'cross_layer_transcoder').")
    _need(cfg, ("feature_input_hook", "feature_output_hook"), path)
    return cfg
