"""The activation buffer of transcoder training: shuffled (input, output)
activation pairs of every trained layer, from one model forward per token batch."""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import InvalidInputError
from .model import model_device, token_id_tensor


def _sequence_batches(tokens, batch_size: int, skip: int, d_vocab: int | None = None
                      ) -> Iterator[torch.Tensor]:
    """Batches of token sequences from a [n, ctx] tensor or an iterable of
    [b, ctx] tensors, after skipping ``skip`` sequences; every batch checked
    (integer ids inside ``0..d_vocab - 1``: never rounded, never out of range)."""
    if isinstance(tokens, (str, bytes)) or not (isinstance(tokens, torch.Tensor) or hasattr(tokens, "__iter__")):
        raise InvalidInputError(f"tokens must be an integer tensor [n_sequences, ctx] or an iterable of "
                                f"[batch, ctx] token tensors, got {type(tokens).__name__} {tokens!r:.60}.")
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise InvalidInputError(f"tokens must be an integer tensor [n_sequences, ctx], got "
                                    f"{tuple(tokens.shape)} {tokens.dtype}.")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise InvalidInputError(f"tokens is empty ({tuple(tokens.shape)}): give at least one sequence.")
        tokens = [tokens]
    pending = skip
    for batch in tokens:
        batch = token_id_tensor(batch, d_vocab, "training tokens")
        if batch.ndim == 1:
            batch = batch[None]
        if batch.ndim != 2:
            raise InvalidInputError(f"Each token batch must be [batch, ctx], got "
                                    f"{tuple(batch.shape)}.")
        if pending >= batch.shape[0]:
            pending -= batch.shape[0]
            continue
        batch, pending = batch[pending:], 0
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]


class ActivationBuffer:
    """Shuffled (input, output) activation pairs of every layer, filled by one
    model forward per token batch. Half the buffer is served, refilled with
    fresh activations, and the whole buffer reshuffled."""

    def __init__(self, model, tokens, layers: list[int], in_hooks: list[str],
                 out_hooks: list[str], capacity: int, model_batch_size: int,
                 seed: int, skip_sequences: int = 0):
        self.model, self.layers = model, layers
        self.in_hooks, self.out_hooks = in_hooks, out_hooks
        self.names = set(in_hooks) | set(out_hooks)
        self.capacity = capacity
        self.stream = _sequence_batches(tokens, model_batch_size, skip_sequences, int(model.cfg.d_vocab))
        self.sequences_consumed = skip_sequences
        self.generator = torch.Generator().manual_seed(seed)
        self.stop_layer = self._stop_layer()
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.size = 0          # valid rows
        self.served = 0
        self.exhausted = False
        self._pending_x: list[torch.Tensor] = []
        self._pending_y: list[torch.Tensor] = []
        self._pending_n = 0

    def _stop_layer(self) -> int | None:
        n = int(self.model.cfg.n_layers)
        deepest = -1
        for name in self.names:
            parts = name.split(".")
            if parts[0] != "blocks":
                return None
            deepest = max(deepest, int(parts[1]))
        return deepest + 1 if deepest + 1 < n else None

    @torch.no_grad()
    def _activations(self, n_needed: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``n_needed`` fresh rows (fewer if the stream ends): x [n, L, d_in], y [n, L, d_out]."""
        while self._pending_n < n_needed and not self.exhausted:
            try:
                batch = next(self.stream)
            except StopIteration:
                self.exhausted = True
                break
            kwargs = {"names_filter": lambda n: n in self.names}
            if self.stop_layer is not None:
                kwargs["stop_at_layer"] = self.stop_layer
            _, cache = self.model.run_with_cache(batch.to(model_device(self.model)), **kwargs)
            xs = torch.stack([cache[h].reshape(-1, cache[h].shape[-1]) for h in self.in_hooks], 1)
            ys = torch.stack([cache[h].reshape(-1, cache[h].shape[-1]) for h in self.out_hooks], 1)
            self._pending_x.append(xs.float())
            self._pending_y.append(ys.float())
            self._pending_n += xs.shape[0]
            self.sequences_consumed += batch.shape[0]
        if self._pending_n == 0:
            return None
        x, y = torch.cat(self._pending_x), torch.cat(self._pending_y)
        take = min(n_needed, x.shape[0])
        self._pending_x, self._pending_y = [x[take:]], [y[take:]]
        self._pending_n = x.shape[0] - take
        return x[:take], y[:take]

    def _shuffle(self) -> None:
        perm = torch.randperm(self.size, generator=self.generator)
        self.x[:self.size] = self.x[:self.size][perm]
        self.y[:self.size] = self.y[:self.size][perm]

    def fill(self) -> None:
        got = self._activations(self.capacity)
        if got is None:
            raise InvalidInputError("The token stream is empty: no activations to train on.")
        self.x, self.y = got[0].clone(), got[1].clone()
        self.size = self.x.shape[0]
        self.served = 0
        self._shuffle()

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.x is None:
            self.fill()
        if self.served + batch_size > self.size // 2 or self.served + batch_size > self.size:
            self._refill_half()
            if self.served + batch_size > self.size:
                return None
        start = self.served
        self.served += batch_size
        return self.x[start:start + batch_size], self.y[start:start + batch_size]

    def _refill_half(self) -> None:
        used = self.served
        got = self._activations(used) if used else None
        if got is not None:
            n = got[0].shape[0]
            self.x[:n], self.y[:n] = got
            if n < used:  # the stream ended: drop the served rows we could not replace
                keep = torch.cat([torch.arange(n), torch.arange(used, self.size)])
                self.x, self.y = self.x[keep], self.y[keep]
                self.size = self.x.shape[0]
        elif used:
            self.x, self.y = self.x[used:self.size], self.y[used:self.size]
            self.size = self.x.shape[0]
        self.served = 0
        if self.size:
            self._shuffle()
