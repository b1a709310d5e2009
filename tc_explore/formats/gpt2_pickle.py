"""The gpt2-small transcoder files of ``pchlenski/gpt2-transcoders``.

Each is a ``torch.save`` pickle of ``{"cfg": sae_training.config.
LanguageModelSAERunnerConfig(...), "state_dict": {W_enc [d_in, d_sae], b_enc
[d_sae], W_dec [d_sae, d_out], b_dec [d_in], b_dec_out [d_out]}}``. We read them
with torch's ``weights_only`` unpickler, which only rebuilds tensors and plain
containers, plus one stand-in class for that config: a file whose unpickling
would call anything else is refused before anything runs. The ``sae_training``
package is never imported (nor needed).
"""
from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, IncompatibleTranscoderError
from ..integrity import REPLACE_FILE, atomic_write, check_zip_crc, existing_file, reading
from ..transcoder import Transcoder

CONFIG_CLASS_PATH = "sae_training.config.LanguageModelSAERunnerConfig"
STATE_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out")


class LanguageModelSAERunnerConfig:
    """Stand-in for ``sae_training.config.LanguageModelSAERunnerConfig``.

    Unpickling restores its fields as attributes and nothing else: no
    ``__post_init__`` or other method of the original class runs.
    """

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in sorted(self.__dict__.items()))
        return f"LanguageModelSAERunnerConfig({inner})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def safe_torch_load(path: str | Path, extra_classes: list | None = None) -> Any:
    """``torch.load`` restricted to tensors, containers and the classes named
    (``(cls, "module.QualName")`` pairs). Raises UnsafeFileError otherwise, and
    CorruptFileError for a damaged file (checked against its zip CRCs first:
    torch does not check them and would load flipped bytes as weights)."""
    path = existing_file(path, "torch file")
    _check_torch_container(path)
    allowed = [(LanguageModelSAERunnerConfig, CONFIG_CLASS_PATH)] + list(extra_classes or [])
    with reading(path, "torch file"):
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)


def _check_torch_container(path: Path) -> None:
    """A torch file is a zip archive (torch >= 1.6) or, in the legacy format,
    a pickle (first byte 0x80, the protocol marker); anything else is damaged."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        check_zip_crc(path, "torch file")
    elif not head.startswith(b"\x80"):
        raise CorruptFileError(
            f"torch file {path} is corrupted or not a torch file: it starts with {head!r}, "
            f"neither a zip archive nor a pickle. {REPLACE_FILE}")


def read_gpt2_transcoder(path: str | Path, layer: int | None = None) -> Transcoder:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise IncompatibleTranscoderError(
            f"{path} is not a gpt2-small transcoder file: expected a dict with 'cfg' and "
            f"'state_dict', got {type(obj).__name__} with keys "
            f"{list(obj) if isinstance(obj, dict) else '-'}.")
    sd, cfg = obj["state_dict"], obj.get("cfg")
    if not isinstance(sd, dict):
        raise IncompatibleTranscoderError(
            f"{path}: 'state_dict' should be a dict of tensors, got {type(sd).__name__}.")
    missing = [k for k in STATE_KEYS if k not in sd]
    if missing:
        raise IncompatibleTranscoderError(f"{path}: state_dict lacks {missing}.")
    input_hook = getattr(cfg, "hook_point", None)
    output_hook = getattr(cfg, "out_hook_point", None)
    if layer is None:
        layer = getattr(cfg, "hook_point_layer", None)
    return Transcoder(sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"], sd["b_dec_out"],
                      layer=layer, input_hook=input_hook, output_hook=output_hook)


def read_log_feature_sparsity(path: str | Path) -> torch.Tensor:
    t = safe_torch_load(path)
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        raise IncompatibleTranscoderError(
            f"{path} should hold a 1-D tensor of log10 feature frequencies.")
    return t


def default_config(tc: Transcoder, layer: int, model_name: str, **overrides: Any) -> dict:
    """Config fields in the layout of the published files."""
    fields = dict(
        model_name=model_name, hook_point=tc.input_hook, hook_point_layer=layer,
        hook_point_head_index=None, dataset_path="", is_dataset_tokenized=True,
        context_size=128, use_cached_activations=False, cached_activations_path=None,
        d_in=tc.d_in, d_out=tc.d_out, is_transcoder=True, out_hook_point=tc.output_hook,
        out_hook_point_layer=layer, expansion_factor=tc.d_sae // max(tc.d_in, 1),
        b_dec_init_method="mean", l1_coefficient=0.0, lp_norm=1, lr=1e-3,
        lr_scheduler_name="constantwithwarmup", lr_warm_up_steps=0, train_batch_size=4096,
        n_batches_in_buffer=32, total_training_tokens=0, store_batch_size=32,
        feature_sampling_method="None", feature_sampling_window=1000, resample_batches=32,
        feature_reinit_scale=0.2, dead_feature_window=1000, dead_feature_estimation_method="no_fire",
        dead_feature_threshold=1e-8, log_to_wandb=False, wandb_project="", wandb_entity=None,
        wandb_log_frequency=10, n_checkpoints=0, checkpoint_path="", device="cpu", seed=42,
        dtype=torch.float32, d_sae=tc.d_sae, tokens_per_buffer=0, run_name="")
    fields.update(overrides)
    return fields


@contextmanager
def _sae_training_module():
    """Make a class importable as sae_training.config.LanguageModelSAERunnerConfig
    for the duration of a save, so the file names exactly that class."""
    pkg = types.ModuleType("sae_training")
    mod = types.ModuleType("sae_training.config")
    cls = type("LanguageModelSAERunnerConfig", (), {"__module__": "sae_training.config"})
    mod.LanguageModelSAERunnerConfig = cls
    pkg.config = mod
    saved = {k: sys.modules.get(k) for k in ("sae_training", "sae_training.config")}
    sys.modules["sae_training"], sys.modules["sae_training.config"] = pkg, mod
    try:
        yield cls
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_gpt2_transcoder(tc: Transcoder, path: str | Path, layer: int,
                          model_name: str = "gpt2-small", **config: Any) -> Path:
    """Write ``tc`` in the exact layout of the published gpt2-small files."""
    if tc.threshold is not None or tc.W_skip is not None:
        raise IncompatibleTranscoderError(
            "The gpt2-small format stores plain ReLU transcoders only (no threshold, no skip).")
    path = Path(path)
    sd = {k: getattr(tc, k).detach().cpu().contiguous().clone() for k in STATE_KEYS}
    with _sae_training_module() as cls, atomic_write(path) as tmp:
        cfg = cls.__new__(cls)
        cfg.__dict__.update(default_config(tc, layer, model_name, **config))
        torch.save({"cfg": cfg, "state_dict": sd}, str(tmp))
    return path


def write_log_feature_sparsity(log10_freq: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(log10_freq.detach().cpu().float().contiguous().clone(), str(tmp))
    return path
