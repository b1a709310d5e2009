"""How well transcoders stand in for the MLPs: metrics as a pandas DataFrame.

For every chosen layer (that layer's MLP replaced alone) and for all of them
replaced at once (row ``layer == "all"``):

- ``ce_clean`` / ``ce_replaced`` / ``ce_zero_ablated``: mean next-token
  cross-entropy (nats) of the original model, with the transcoder(s), and with
  the same MLP(s) zero-ablated;
- ``ce_recovered`` = (ce_zero_ablated − ce_replaced) / (ce_zero_ablated − ce_clean);
- ``kl``: mean over positions of KL(original ‖ replaced) of the next-token distribution;
- ``l0``: mean number of active features per token;
- ``fvu``: Σ‖y − ŷ‖² / Σ‖y − ȳ‖² with y the true MLP output at that layer, ŷ the
  transcoder's output and ȳ the mean of y over all tokens. In the ``all`` row,
  ``l0`` and ``fvu`` are averaged over layers and measured inside the
  all-replaced run (so errors compound, as they do when the model runs on them);
- ``dead_features``: features that never fired on these tokens (clean inputs).

Cross-layer transcoders (CLTs) work the same way. Layer l's MLP output is
replaced by the sum of the writes of the features of every layer ≤ l (each
encoded at its own layer's input), plus layer l's output bias. The row of layer l
replaces that layer only, with its sources encoded on the clean run. ``l0`` and
``dead_features`` count the features that read at layer l. Decoder rows are read
lazily: only those of features that fired.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidInputError, as_count, refuse_non_finite
from .model import to_tokens, token_strings
from .progress import progress_bar
from .replacement import mlp_ablation_hooks, transcoder_hooks
from .transcoder import TranscoderSet, as_transcoder_set


@dataclass
class _Sums:
    """Running sums for one configuration (one row of the table)."""
    ce_clean: float = 0.0
    ce: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    n_pred: int = 0
    l0: dict = field(default_factory=dict)         # layer -> sum of active counts
    n_tok: dict = field(default_factory=dict)      # layer -> tokens seen
    sq_err: dict = field(default_factory=dict)     # layer -> Σ‖y − ŷ‖²
    y_sum: dict = field(default_factory=dict)      # layer -> Σ y   [d_model] (float64)
    y_sq: dict = field(default_factory=dict)       # layer -> Σ ‖y‖²

    def add_reconstruction(self, layer: int, y: torch.Tensor, y_hat: torch.Tensor,
                           acts: torch.Tensor) -> None:
        y, y_hat = y.double().reshape(-1, y.shape[-1]), y_hat.double().reshape(-1, y.shape[-1])
        self.sq_err[layer] = self.sq_err.get(layer, 0.0) + float(((y - y_hat) ** 2).sum())
        self.y_sum[layer] = self.y_sum.get(layer, 0) + y.sum(0)
        self.y_sq[layer] = self.y_sq.get(layer, 0.0) + float((y ** 2).sum())
        self.l0[layer] = self.l0.get(layer, 0.0) + float((acts > 0).sum())
        self.n_tok[layer] = self.n_tok.get(layer, 0) + y.shape[0]

    def fvu(self, layer: int) -> float:
        n = self.n_tok[layer]
        total_var = self.y_sq[layer] - float((self.y_sum[layer] ** 2).sum()) / n
        return self.sq_err[layer] / total_var if total_var > 0 else float("nan")


def _ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions 0..n-2."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(),
                           reduction="sum")


def _kl(clean_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(clean ‖ other)."""
    p_log = clean_logits[:, :-1].float().log_softmax(-1)
    q_log = logits[:, :-1].float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum()


def _clean_reconstruction(transcoders: TranscoderSet, cache, layer: int, encoded: dict):
    """(ŷ, acts of layer ``layer``'s features) on the clean run's inputs in ``cache``.
    ``encoded`` memoises each source layer's activations for this batch (a CLT's
    layer reads every earlier layer's features)."""
    for source in transcoders.sources(layer):
        if source not in encoded:
            encoded[source] = transcoders[source].encode(cache[transcoders.input_hook(source)])
    if transcoders.is_cross_layer:
        return transcoders.reconstruct(layer, encoded), encoded[layer]
    x = cache[transcoders.input_hook(layer)]
    return transcoders[layer].decode(encoded[layer], x), encoded[layer]


def _refuse_non_finite_batch(model, values: torch.Tensor, what: str, batch: torch.Tensor,
                             first_sequence: int) -> None:
    """NaN or infinity in ``values`` [batch, pos, ...] would average into every
    metric as NaN: refused, naming the sequence (its index in the caller's
    tokens) and the token of the first."""
    if bool(torch.isfinite(values).all()):
        return
    for i in range(values.shape[0]):
        refuse_non_finite(values[i], f"{what} on sequence {first_sequence + i} of these tokens", ("position",),
                          {"position": token_strings(model, batch[i])})


def _batches(model, tokens, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens if tokens.ndim == 2 else tokens[None]
        for start in range(0, tokens.shape[0], batch_size):
            yield to_tokens(model, tokens[start:start + batch_size])
    else:  # strings or token lists: one sequence at a time, no padding to distort the loss
        for item in tokens:
            yield to_tokens(model, item)


@torch.no_grad()
def evaluate_transcoders(model, transcoders: TranscoderSet, tokens,
                         layers: Sequence[int] | None = None, batch_size: int = 8,
                         include_all: bool = True, progress: bool | None = None):
    """Metrics of each chosen layer's transcoder (and of all replaced at once)
    over ``tokens``: a [batch, pos] tensor, or an iterable of strings / token lists.
    ``progress``: a bar over the batches (default on, off in CI; see ``tc_explore.progress``)."""
    import pandas as pd

    layers = as_transcoder_set(transcoders).select_layers(layers)
    transcoders.check_fits(model, layers)
    batch_size = as_count(batch_size, "batch_size")
    if isinstance(tokens, (str, bytes)) or not (isinstance(tokens, torch.Tensor) or isinstance(tokens, Iterable)):
        raise InvalidInputError(f"tokens must be a [batch, pos] tensor or a list of texts / token lists, "
                                f"got {type(tokens).__name__} {tokens!r:.60} (wrap one text in a list).")
    per_layer = {l: _Sums() for l in layers}
    together = _Sums()
    fired = {l: torch.zeros(transcoders.d_sae(l), dtype=torch.bool) for l in layers}
    io_names = {transcoders.output_hook(l) for l in layers} | \
        {transcoders.input_hook(s) for l in layers for s in transcoders.sources(l)}

    if isinstance(tokens, torch.Tensor):
        n_batches = -(-(tokens.shape[0] if tokens.ndim == 2 else 1) // batch_size)
    else:
        n_batches = len(tokens) if hasattr(tokens, "__len__") else None
    first_sequence = 0                            # index in tokens of this batch's first sequence
    for batch in progress_bar(_batches(model, tokens, batch_size), total=n_batches,
                              desc="evaluating", unit="batch", progress=progress):
        clean_logits, cache = model.run_with_cache(batch, names_filter=lambda n: n in io_names)
        for name in [n for n in cache.keys() if n in io_names]:      # in the order the forward pass ran
            _refuse_non_finite_batch(model, cache[name], f"The activations at {name}", batch, first_sequence)
        n_pred = batch.shape[0] * (batch.shape[1] - 1)
        ce_clean = float(_ce(clean_logits, batch))
        encoded: dict[int, torch.Tensor] = {}
        for layer in layers:
            y = cache[transcoders.output_hook(layer)]
            y_hat, acts = _clean_reconstruction(transcoders, cache, layer, encoded)
            for what, values in (("feature activations", acts), ("output", y_hat)):
                _refuse_non_finite_batch(model, values, f"The layer-{layer} transcoder's {what}", batch,
                                         first_sequence)
            s = per_layer[layer]
            s.add_reconstruction(layer, y, y_hat, acts)
            fired[layer] |= (acts > 0).reshape(-1, acts.shape[-1]).any(0).cpu()
            logits = model.run_with_hooks(batch, fwd_hooks=transcoder_hooks(model, transcoders, [layer]))
            zero = model.run_with_hooks(batch, fwd_hooks=mlp_ablation_hooks(model, [layer]))
            s.ce += float(_ce(logits, batch))
            s.ce_zero += float(_ce(zero, batch))
            s.kl += float(_kl(clean_logits, logits))
            s.ce_clean += ce_clean
            s.n_pred += n_pred
        if include_all:
            # Inside the all-replaced run, record each layer's true MLP output (on the
            # inputs of that run) just before its replacement, the replacement's
            # output just after it, and the features' activations (``store``).
            acts_in_run: dict[int, torch.Tensor] = {}
            true_out: dict[int, torch.Tensor] = {}
            recon = []

            def before(y, hook, layer):
                true_out[layer] = y.clone()
                return y

            def after(y_hat, hook, layer):
                recon.append((layer, true_out.pop(layer), y_hat.clone()))
                return y_hat
            # (closures per layer, not hook.name: an output hook may be an alias,
            # e.g. Llama's mlp.hook_out of hook_mlp_out)
            hooks = [(transcoders.output_hook(l), partial(before, layer=l)) for l in layers] + \
                transcoder_hooks(model, transcoders, layers, store=acts_in_run) + \
                [(transcoders.output_hook(l), partial(after, layer=l)) for l in layers]
            logits = model.run_with_hooks(batch, fwd_hooks=hooks)
            zero = model.run_with_hooks(batch, fwd_hooks=mlp_ablation_hooks(model, layers))
            for layer, y, y_hat in recon:
                together.add_reconstruction(layer, y, y_hat, acts_in_run[layer])
            together.ce += float(_ce(logits, batch))
            together.ce_zero += float(_ce(zero, batch))
            together.kl += float(_kl(clean_logits, logits))
            together.ce_clean += ce_clean
            together.n_pred += n_pred
        first_sequence += batch.shape[0]

    if together.n_pred == 0 and not any(s.n_pred for s in per_layer.values()):
        raise InvalidInputError("tokens hold no next-token predictions to evaluate: give at least one "
                                "sequence of two or more tokens.")

    def row(name, s: _Sums, row_layers):
        n = s.n_pred
        ce_clean, ce, ce_zero = s.ce_clean / n, s.ce / n, s.ce_zero / n
        denom = ce_zero - ce_clean
        return dict(
            layer=name, ce_clean=ce_clean, ce_replaced=ce, ce_zero_ablated=ce_zero,
            ce_recovered=(ce_zero - ce) / denom if denom != 0 else float("nan"),
            kl=s.kl / n,
            l0=sum(s.l0[l] / s.n_tok[l] for l in row_layers) / len(row_layers),
            fvu=sum(s.fvu(l) for l in row_layers) / len(row_layers),
            dead_features=int(sum(int((~fired[l]).sum()) for l in row_layers)),
            d_sae=int(sum(transcoders.d_sae(l) for l in row_layers)),
            n_tokens=n)

    rows = [row(l, per_layer[l], [l]) for l in layers]
    if include_all:
        rows.append(row("all", together, layers))
    return pd.DataFrame(rows).set_index("layer")
