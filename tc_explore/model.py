"""Loading a model and the few facts about it that the rest of tc_explore uses.

All code in tc_explore talks to a model only through TransformerLens' shared
surface: hook names, ``run_with_cache`` / ``run_with_hooks`` / ``hooks``,
``cfg`` and the weight properties (``W_E``, ``W_pos``, ``W_U``, ``b_U``,
``W_V``, ``b_V``, ``W_O``, ``b_O``). A transformer_lens 4 ``TransformerBridge``
in compatibility mode and a transformer_lens 3 ``HookedTransformer`` both
provide it, with the same processed weights.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
import weakref
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from .errors import (InvalidInputError, OfflineFileMissingError, TcExploreError, TokenizationWarning,
                     as_flag, as_integer)
from .registry import local_model_path

Prompt = Union[str, Sequence[int], torch.Tensor]


# -- hook names: the public contract -------------------------------------------------
# The one place hook names are spelt. Each helper also takes the placeholder
# "{L}" for a layer, giving the template a registry entry stores
# (hook_ln2_normalized("{L}") == "blocks.{L}.ln2.hook_normalized").
HOOK_EMBED = "hook_embed"
HOOK_POS_EMBED = "hook_pos_embed"


def hook_resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def hook_resid_mid(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_mid"


def hook_resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hook_ln2_normalized(layer: int) -> str:
    return f"blocks.{layer}.ln2.hook_normalized"


def hook_ln2_scale(layer: int) -> str:
    return f"blocks.{layer}.ln2.hook_scale"


def hook_ln1_scale(layer: int) -> str:
    return f"blocks.{layer}.ln1.hook_scale"


def hook_mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def hook_mlp_in(layer: int) -> str:
    """The MLP's input (the norm's whole output, gain and bias applied)."""
    return f"blocks.{layer}.mlp.hook_in"


def hook_mlp_post(layer: int) -> str:
    """The MLP's hidden activations (its neurons)."""
    return f"blocks.{layer}.mlp.hook_post"


def hook_mlp_block_out(layer: int) -> str:
    """The MLP's output inside the block: before Gemma 2's post-MLP norm, else
    the same activation as ``hook_mlp_out``."""
    return f"blocks.{layer}.mlp.hook_out"


def hook_ln2_out(layer: int) -> str:
    return f"blocks.{layer}.ln2.hook_out"


def hook_attn_pattern(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def hook_attn_v(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_v"


def hook_attn_z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def hook_ln1_post_scale(layer: int) -> str:
    """Gemma 2's norm after attention (before the residual add)."""
    return f"blocks.{layer}.ln1_post.hook_scale"


def hook_ln2_post_scale(layer: int) -> str:
    """Gemma 2's norm after the MLP (``hook_mlp_out`` is after it)."""
    return f"blocks.{layer}.ln2_post.hook_scale"


HOOK_LN_FINAL_SCALE = "ln_final.hook_scale"
# The logits before any final softcap (Gemma 2): what logit targets read.
HOOK_UNEMBED_OUT = "unembed.hook_out"


def layer_hook(template: str, layer: int) -> str:
    """Expand a hook template such as ``blocks.{L}.hook_mlp_out`` (or a suffix
    such as ``hook_mlp_out``, as circuit-tracer configs write it) for one layer."""
    if "{L}" in template:
        return template.replace("{L}", str(layer))
    if template.startswith("blocks."):
        return template
    return f"blocks.{layer}.{template}"


# -- loading -------------------------------------------------------------------------
def load_model(name_or_path: Any, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, process_weights: bool | None = None):
    """Load a model through TransformerLens (a ``TransformerBridge`` in
    compatibility mode, so the TransformerLens hook names apply).

    ``process_weights`` (default: True for LayerNorm models such as GPT-2,
    False for RMSNorm models such as Llama, Qwen 3, Gemma 2) applies
    TransformerLens' weight processing: LayerNorm gains folded into the next
    weights, writes to the residual stream and the unembedding centred. The
    gpt2-small transcoders were trained on the processed GPT-2; the published
    sets of the RMSNorm models were trained and are used (by circuit-tracer)
    on the unprocessed model, whose ``ln2.hook_out`` / ``mlp.hook_in`` is the
    MLP's true input and whose logits are the original ones. The exact
    decomposition handles both (see :mod:`tc_explore.architecture`).
    ``dtype`` may be ``"bfloat16"`` / ``"float16"`` to halve the memory.

    ``name_or_path`` is a Hub model id (``"gpt2"``), a local directory saved with
    ``save_pretrained``, a registry name of a transcoder set whose model ships
    with tc_explore (``"tiny-years"``), or a model you already have (a
    ``TransformerBridge`` or a transformer_lens 3 ``HookedTransformer``), which is
    returned as it is after a check that it exposes the hooks we use.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        check_model_surface(name_or_path)
        if process_weights is not None:
            raise InvalidInputError("process_weights applies when tc_explore loads the model; "
                                    "this model is already loaded.")
        if device is not None or dtype is not None:
            name_or_path = name_or_path.to(device=None if device is None else as_device(device),
                                           dtype=as_dtype(dtype))
        _forget_attention_patterns(name_or_path)
        return name_or_path


    source = local_model_path(str(name_or_path)) or str(name_or_path)
    label = model_label(str(name_or_path), source)
    if not os.path.isdir(source) and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise InvalidInputError(
            f"Model {source!r} is neither a directory (none exists there) nor a Hub model id "
            "(NAME or OWNER/NAME). Pass a directory saved with save_pretrained, a Hub id such as "
            "'gpt2', or a registry name such as 'tiny-years'.")
    device = default_device(device)
    dtype = as_dtype(dtype) or torch.float32
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # transformer_lens 3.x
        from transformer_lens import HookedTransformer
        def boot_hooked():
            _verify_model_files(source)
            model = HookedTransformer.from_pretrained(source, device=device, dtype=dtype)
            _verify_model_files(source)
            model.cfg.model_name = label
            return model
        return _with_offline_hint(source, boot_hooked)

    def boot():
        _verify_model_files(source)                      # what is already cached, before reading it
        with _quiet_weight_loading():
            bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
        _verify_model_files(source)                      # and what the load just downloaded
        process = process_weights
        if process is None:
            process = not str(getattr(bridge.cfg, "normalization_type", "LN")).startswith("RMS")
        # processed: the same weight processing as HookedTransformer.from_pretrained
        # (fold LN, centre writing weights and unembedding, fold value biases).
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not process)
        if process:      # processing copied the weights; unprocessed models keep reading the map lazily
            _release_checkpoint_map(bridge)
        _forget_attention_patterns(bridge)
        bridge.eval()
        bridge.cfg.model_name = label
        return bridge

    return _with_offline_hint(source, boot)


def _forget_attention_patterns(model) -> None:
    """TransformerLens 4's joint-QKV attention bridge (GPT-2's) keeps each
    forward's attention pattern, ``[batch, heads, pos, pos]`` floats, as an
    attribute (``_pattern``) that nothing reads: every layer's stays alive
    until the next forward replaces it, through everything after the pass
    (an index build's update: 12 x 24 MiB at a batch of 32 x 128 tokens;
    one 1024-token prompt: 12 x 48 MiB, growing with the square of the
    length). A forward hook on each such module lets the pattern go as soon
    as the module returns; ``hook_pattern`` and ``run_with_cache`` still see
    it. Idempotent: a model passed in again gets no second hook."""
    for module in model.modules():
        if hasattr(module, "_pattern") and _forget_pattern not in module._forward_hooks.values():
            module.register_forward_hook(_forget_pattern)


def _forget_pattern(module, args, output) -> None:
    module._pattern = None


def _release_checkpoint_map(module) -> None:
    """After weight processing (which copies every weight it folds), give the
    weights still backed by the checkpoint's memory map (on GPT-2, the
    bridge's unsplit ``c_attn`` originals) memory of their own: while one
    tensor points into the map, every page of the file the load read stays
    mapped into the process (0.46 GiB of resident memory for GPT-2 small's
    85 MB of such weights). Such tensors are the ones whose storage cannot be
    resized (memory the process did not allocate itself)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and not t.untyped_storage().resizable():
                t.data = t.data.clone()


def model_label(name: str, source: str) -> str:
    """What a loaded model is called in titles, dashboards and index manifests
    (``cfg.model_name``): the name it was asked for by (a Hub id such as
    ``"gpt2"``, or the registry name of a model that ships with tc_explore,
    such as ``"tiny-years"``), or, for a directory, the directory's own name:
    never a full local path, which would put this machine's layout into
    exported pages and pushed indexes."""
    if source != name or not os.path.isdir(source):
        return name
    return Path(source).resolve().name or name


def _verify_model_files(source: str) -> None:
    """Check a model's files in the Hugging Face cache against the Hub's content
    hashes (``integrity.verify_model_snapshot``; each file once per process):
    a damaged weight or tokenizer file is a ``CorruptFileError`` naming it,
    not silently different weights. A directory outside the cache is not checked."""
    from .integrity import cached_snapshot, verify_model_snapshot
    folder = Path(source) if os.path.isdir(source) else cached_snapshot(source)
    if folder is not None:
        verify_model_snapshot(folder)


@contextlib.contextmanager
def _quiet_weight_loading():
    """No "Loading weights" bar from transformers while a model loads from disk
    (it takes well under a second and would leave a widget in every notebook).
    Download bars, which huggingface_hub draws, stay."""
    try:
        from transformers.utils.logging import set_tqdm_hook
    except ImportError:             # an older transformers without the hook
        yield
        return
    previous = set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_tqdm_hook(previous)


def hub_model_download_command(source: str) -> str:
    """The command that puts a Hub model's files into the cache (weights as
    safetensors, configs, tokenizer; not the repo's other weight formats)."""
    return f'hf download {source} --include "*.json" "*.txt" "*.model" "*.safetensors"'


def _with_offline_hint(source: str, load):
    from .hub_access import hub_access

    if os.path.isdir(source):
        try:
            return load()
        except TcExploreError:
            raise
        except (OSError, ValueError, KeyError) as err:
            raise InvalidInputError(
                f"{source} is a directory but not a model tc_explore can load: "
                f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}. Pass a directory "
                "saved with save_pretrained (config.json, weights, tokenizer files), a Hub model "
                "id, or a registry name.") from err
    with hub_access() as access:
        try:
            return load()
        except OSError as err:
            text = str(err).lower()
            if not any(s in text for s in ("offline", "couldn't connect", "cannot find the requested files",
                                           "local_files_only", "not cached", "does not appear to have")):
                raise
            raise OfflineFileMissingError(
                access.missing(f"Model {source!r}", hub_model_download_command(source)) +
                " A local directory saved with save_pretrained works too.") from err


def default_device(device=None) -> str:
    """``device`` as a string (checked: see :func:`as_device`), or the default:
    CUDA when available, else CPU."""
    if device is not None:
        return str(as_device(device))
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_device(device) -> torch.device:
    """``device`` (a torch.device or a name such as ``"cpu"``, ``"cuda:1"``) as a
    torch.device that this machine has; a clear error for a misspelt name or a
    CUDA device that is not there."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InvalidInputError(f"device must be a name such as 'cpu' or 'cuda:0', got {device!r:.80} "
                                f"({type(device).__name__}).")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"{device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {device!r}: this machine has no CUDA device (torch "
                                    f"{torch.__version__}); use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                                    "CUDA device(s).")
    return dev


def as_dtype(dtype) -> torch.dtype | None:
    """A floating-point torch dtype from a dtype or its name (``"bfloat16"``,
    ``"torch.float16"``); None stays None. Integer dtypes are refused: weights
    and activations are real numbers."""
    if dtype is None:
        return None
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise InvalidInputError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16'.")
    if not value.is_floating_point:
        raise InvalidInputError(f"dtype {dtype!r} is not a floating-point type; use e.g. 'float32', "
                                "'bfloat16'.")
    return value


_REQUIRED_ATTRS = ("cfg", "run_with_cache", "run_with_hooks", "W_E", "W_U", "to_tokens")


def check_model_surface(model) -> None:
    """Refuse an object that lacks the TransformerLens surface we rely on."""
    missing = [a for a in _REQUIRED_ATTRS if not hasattr(model, a)]
    if missing:
        raise InvalidInputError(
            f"{type(model).__name__} is not a TransformerLens model (missing {missing}). "
            "Pass a model from tc_explore.load_model, a TransformerBridge with "
            "enable_compatibility_mode(), or a transformer_lens HookedTransformer.")


# -- model facts ---------------------------------------------------------------------
def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def d_model(model) -> int:
    return int(model.cfg.d_model)


def n_ctx(model) -> int:
    return int(model.cfg.n_ctx)


def model_device(model) -> torch.device:
    return model.W_E.device


def model_dtype(model) -> torch.dtype:
    return model.W_E.dtype


def check_layer(model_or_n_layers, layer: int, what: str = "layer") -> int:
    """Validate a layer index (negative indices count from the end)."""
    n = model_or_n_layers if isinstance(model_or_n_layers, int) else n_layers(model_or_n_layers)
    layer = as_integer(layer, what)
    if not -n <= layer < n:
        raise InvalidInputError(
            f"{what} {layer} is out of range: the model has {n} layers (0..{n - 1}).")
    return layer % n


def to_tokens(model, prompt: Prompt, prepend_bos: bool = True) -> torch.Tensor:
    """Tokenize one prompt (or check a token sequence) into shape [1, pos],
    refusing a prompt longer than the model's context."""
    as_flag(prepend_bos, "prepend_bos")
    if isinstance(prompt, str):
        # truncate=False: an over-long prompt must be refused, not silently cut
        tokens = model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
        warn_unknown_words(model.tokenizer, prompt, tokens[0].tolist(), "The prompt")
    else:
        tokens = token_id_tensor(prompt, int(model.cfg.d_vocab), "prompt")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InvalidInputError(
                f"Token input must have shape [pos] or [batch, pos], got {tuple(tokens.shape)}.")
    check_context(model, tokens.shape[-1])
    return tokens.to(model_device(model))


def token_id_tensor(ids, d_vocab: int | None, what: str = "token ids") -> torch.Tensor:
    """``ids`` (a list, numpy array or tensor of token ids) as an int64 CPU
    tensor, refusing what is not integer ids: None, dicts, bytes, strings
    inside a list, floats (never truncated: ``[1.7, 2.2]`` is an error, not
    ``[1, 2]``), bools, and ids outside ``0..d_vocab-1``."""
    import numpy as np
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu()
        integer = not arr.is_floating_point() and not arr.is_complex() and arr.dtype != torch.bool
    elif isinstance(ids, (list, tuple, range, np.ndarray)):
        try:
            arr = np.asarray(ids)
        except ValueError:           # ragged nesting
            arr = np.asarray(ids, dtype=object)
        if arr.size == 0:
            return torch.zeros(arr.shape, dtype=torch.long)
        integer = arr.dtype.kind in "iu"
        if integer:
            arr = torch.from_numpy(arr.astype(np.int64))
    else:
        raise InvalidInputError(
            f"The {what} must be a string or a sequence of token ids, got "
            f"{type(ids).__name__} {ids!r:.80}.")
    if not integer:
        raise InvalidInputError(
            f"The {what} must be integer token ids, got {_preview(ids)} "
            f"({getattr(arr, 'dtype', type(ids).__name__)}); ids are never rounded. Convert "
            "them yourself (e.g. tensor.long()) if they are whole numbers.")
    tokens = arr.to(torch.long)
    if d_vocab is not None and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)].unique()[:5].tolist()
        raise InvalidInputError(
            f"The {what} contain ids outside the vocabulary 0..{d_vocab - 1}: {bad} "
            f"(values from {int(tokens.min())} to {int(tokens.max())}).")
    return tokens


def _preview(x) -> str:
    text = repr(x.tolist() if hasattr(x, "tolist") else x)
    return text if len(text) <= 80 else text[:77] + "..."


def check_context(model, length: int) -> None:
    ctx = n_ctx(model)
    if length > ctx:
        raise InvalidInputError(
            f"The prompt is {length} tokens long but the model's context is {ctx} tokens. "
            f"Shorten the prompt (or split it into windows of at most {ctx} tokens).")
    if length == 0:
        raise InvalidInputError("The prompt is empty: give at least one token.")


_DECODED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_strings(model, tokens: torch.Tensor | Sequence[int]) -> list[str]:
    """One string per token of a 1-D (or [1, pos]) token tensor or id list.

    Decoded strings are cached per tokenizer: dashboards and graphs show the
    same ids over and over, and a tokenizer's ``decode`` costs ~20 µs a call."""
    ids = tokens.reshape(-1).tolist() if isinstance(tokens, torch.Tensor) else [int(i) for i in tokens]
    tokenizer = model.tokenizer
    try:
        cache = _DECODED.setdefault(tokenizer, {})
    except TypeError:                      # a tokenizer that cannot be weakly referenced
        cache = {}
    out = []
    for i in ids:
        s = cache.get(i)
        if s is None:
            s = cache[i] = tokenizer.decode([i])
        out.append(s)
    return out


def warn_unknown_words(tokenizer, text: str, ids: list[int] | None, where: str) -> None:
    """Warn (``TokenizationWarning``) when ``tokenizer`` maps pieces of ``text``
    to its unknown token, which a word-level tokenizer such as the demo's does
    silently."""
    from .tokenization import unknown_pieces, unknown_warning
    pieces = unknown_pieces(tokenizer, text, ids)
    if pieces:
        warnings.warn(unknown_warning(tokenizer, pieces, where), TokenizationWarning, stacklevel=3)


def single_token_id(model, text: str) -> int:
    """The id of ``text`` if the tokenizer maps it to exactly one token that
    reads back as ``text``. A string outside the vocabulary (which a word-level
    tokenizer maps to its unknown token) is refused, not silently replaced."""
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise InvalidInputError(
            f"{text!r} is {len(ids)} tokens for this tokenizer ({ids}), not one; "
            "pick a string that is a single token (mind a leading space).")
    decoded = model.tokenizer.decode(ids)
    # strip(): SentencePiece tokenizers decode a lone token without its leading space.
    if decoded != text and decoded.strip() != text.strip():
        raise InvalidInputError(
            f"{text!r} is not a token of this tokenizer: it became token {ids[0]} "
            f"({decoded!r}). Pick a string that is one token as written (mind a leading "
            "space), or pass the token id.")
    return ids[0]


# -- weights -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelWeights:
    """Detached weights, fetched once per model (see ``model_weights``).

    ``W_E`` is the embedding matrix; what a token writes to the residual
    stream is ``embed_scale × W_E[token]`` (Gemma multiplies by sqrt(d_model);
    the scale is kept apart so that a 256k-token vocabulary is not copied).
    Grouped-query attention is expanded: ``W_V``
    and ``b_V`` hold one slice per *query* head (heads sharing a key/value head
    share it), so every head has its own OV circuit ``W_V[h] @ W_O[h]``.
    Absent parameters (no positional embedding matrix under rotary embeddings,
    no attention biases) are zeros."""
    W_E: torch.Tensor     # [d_vocab, d_model]
    W_pos: torch.Tensor   # [n_ctx, d_model] (zeros for rotary models)
    W_U: torch.Tensor     # [d_model, d_vocab]
    b_U: torch.Tensor     # [d_vocab]
    W_V: torch.Tensor     # [n_layers, n_heads, d_model, d_head]
    b_V: torch.Tensor     # [n_layers, n_heads, d_head]
    W_O: torch.Tensor     # [n_layers, n_heads, d_head, d_model]
    b_O: torch.Tensor     # [n_layers, d_model]
    embed_scale: float = 1.0

    @classmethod
    @torch.no_grad()
    def of(cls, model) -> "ModelWeights":
        from .architecture import architecture
        arch = architecture(model)
        W_E = model.W_E.detach()
        W_U = model.W_U.detach()
        W_O = model.W_O.detach()
        L, H, d_head, d = W_O.shape
        W_V = model.W_V.detach()
        b_V = _optional(model, "b_V")
        b_V = b_V if b_V is not None else W_V.new_zeros(W_V.shape[0], W_V.shape[1], d_head)
        if W_V.shape[1] != H:                          # grouped-query attention
            rep = H // W_V.shape[1]
            W_V, b_V = W_V.repeat_interleave(rep, dim=1), b_V.repeat_interleave(rep, dim=1)
        b_O = _optional(model, "b_O")
        W_pos = _optional(model, "W_pos")
        b_U = _optional(model, "b_U")
        return cls(W_E=W_E, W_pos=W_pos if W_pos is not None else W_E.new_zeros(n_ctx(model), d),
                   W_U=W_U, b_U=b_U if b_U is not None else W_U.new_zeros(W_U.shape[1]),
                   W_V=W_V, b_V=b_V, W_O=W_O,
                   b_O=b_O if b_O is not None else W_O.new_zeros(L, d), embed_scale=arch.embed_scale)


def _optional(model, name: str) -> torch.Tensor | None:
    """A weight property that a model may lack (a TransformerBridge raises
    AttributeError for bias-free projections and rotary models)."""
    try:
        value = getattr(model, name)
    except (AttributeError, NotImplementedError):
        return None
    return None if value is None else value.detach()


_WEIGHTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_stamp(model) -> tuple:
    return tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in (model.W_E, model.W_U))


def model_weights(model, refresh: bool = False) -> ModelWeights:
    """The model's processed weights, cached per model object.

    A TransformerBridge re-stacks ``W_V`` / ``W_O`` from its blocks on every
    access (about 0.1 s each on GPT-2 small), so reading them per feature or per
    prompt would dominate dashboards and traces. The cache is renewed when the
    embedding or unembedding changes (device, dtype, in-place edits); after
    editing attention weights in place, pass ``refresh=True``."""
    try:
        cached = None if refresh else _WEIGHTS.get(model)
    except TypeError:  # not weak-referenceable: no caching
        return ModelWeights.of(model)
    stamp = _weights_stamp(model)
    if cached is None or cached[0] != stamp:
        cached = (stamp, ModelWeights.of(model))
        _WEIGHTS[model] = cached
    return cached[1]
