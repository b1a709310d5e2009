"""Gemma Scope transcoders: ``layer_{L}/width_16k/average_l0_{N}/params.npz``.

Keys ``W_enc`` [d_model, d_sae], ``W_dec`` [d_sae, d_model], ``b_enc`` [d_sae],
``b_dec`` [d_model] (an *output* bias here: no input centring), ``threshold``
[d_sae]. ``pre = x @ W_enc + b_enc``, JumpReLU, ``out = acts @ W_dec + b_dec``.
Loaded with ``allow_pickle=False``: no code can run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import IncompatibleTranscoderError
from ..integrity import atomic_write, check_zip_crc, existing_file, reading
from ..transcoder import Transcoder, float_weight

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def read_gemma_scope_npz(path: str | Path, layer: int | None = None,
                         input_hook: str | None = None, output_hook: str | None = None) -> Transcoder:
    existing_file(path, "npz file")
    check_zip_crc(path, "npz file")
    with reading(path, "npz file"), np.load(str(path), allow_pickle=False) as data:
        missing = [k for k in KEYS if k not in data.files]
        if missing:
            raise IncompatibleTranscoderError(f"{path}: Gemma Scope params.npz lacks {missing}.")
        p = {k: float_weight(np.asarray(data[k]), k, path) for k in KEYS}
    return Transcoder(p["W_enc"], p["b_enc"], p["W_dec"], b_dec=None, b_dec_out=p["b_dec"],
                      threshold=p["threshold"], layer=layer, input_hook=input_hook,
                      output_hook=output_hook)


def write_gemma_scope_npz(tc: Transcoder, path: str | Path) -> Path:
    if tc.threshold is None or bool(tc.b_dec.detach().abs().max() > 0) or tc.W_skip is not None:
        raise IncompatibleTranscoderError(
            "The Gemma Scope format stores JumpReLU transcoders without input centring or skip.")
    path = Path(path)
    arrays = dict(W_enc=tc.W_enc, W_dec=tc.W_dec, b_enc=tc.b_enc, b_dec=tc.b_dec_out,
                  threshold=tc.threshold)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:   # a file object: savez adds no suffix
        np.savez(f, **{k: v.detach().cpu().float().numpy() for k, v in arrays.items()})
    return path
