"""The forward pass of an index build: the model run just far enough to reach
every indexed layer's transcoder input, each layer encoded as the forward
reaches it, in chunks of sequences of bounded size.

Nothing is cached: a layer's input is encoded inside its hook and dropped, so
one layer's activations (or one chunk of them) are alive at a time, and the
forward stops right after the last hook it needs (the later blocks and the
unembedding, [tokens, d_vocab] floats, are never computed). The benchmark's
bare pass (``benchmarks/bench_index.py``) runs this same function with no
bookkeeping, so a build's overhead is measured against exactly the work it
cannot avoid.

On a CPU the build encodes into buffers it reuses batch after batch
(``buffers``) rather than into a fresh ``[tokens, d_sae]`` tensor each layer
(at 1024 tokens x 24,576 features, 100 MB the kernel maps and zeroes page
by page). In a loop of encodings alone that took 282 ms an encoding against
317-341 ms; within the model's forward the two measured alike (8,192 tokens:
38.9 s and 38.8 s, ``benchmarks/bench_index.py``'s bare and plain passes).

On a GPU the layers are encoded, and the build's bookkeeping done, by an
``EncodeWorker``: a thread of its own issuing work on a CUDA stream of its
own. Finding a layer's nonzero activations waits for the GPU (``nonzero``
must know its result's size); done in the model's thread, that wait stopped
it from queuing the next block's kernels while the GPU encoded, 12 times a
batch. With the worker, the model's thread never waits: it hands each
layer's input over (a [tokens, d_model] tensor) and goes on.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Sequence

import torch

from ..model import model_device
from ..transcoder import TranscoderSet
from . import accumulator

# Dense activations of one chunk at most this large (bytes): at GPU batch
# sizes a layer's [tokens, d_sae] floats are gigabytes (32 x 1024 tokens x
# 24576 features: 3.2 GB). Batches under it (the CPU default, 8 x 128 tokens:
# 96 MiB) are encoded whole.
CHUNK_BYTES = 256 * 2 ** 20


def reuses_buffers(device) -> bool:
    """Whether a build encodes into buffers kept from batch to batch
    (``stream_encodings``' ``buffers``): on a CPU, where fresh memory is
    mapped and zeroed page by page; not on a GPU, whose caching allocator
    hands a freed block back at no cost, and where a kept buffer would sit
    idle through each accumulator update (192 MiB at a batch of 32 x 128
    tokens of GPT-2 small). The CPU's way is one of its shortcuts
    (``accumulator.CPU_SHORTCUTS``): with them off, a CPU takes the GPU's."""
    return accumulator.takes_cpu_shortcuts(device)


class EncodeWorker:
    """Runs tasks on a layer's input, in the order submitted, on a thread of
    its own and, for CUDA, a CUDA stream of its own, so the model's thread
    (which submits them from its hooks) never waits for their results.

    Each task's stream first waits for all work queued on the device's
    current stream when it was submitted (the input, and anything set up
    before it), and every CUDA input is recorded on the worker's stream, so
    its memory is not reused while the worker's kernels read it. At most
    ``max_pending`` tasks wait (each holds its input alive); ``submit``
    blocks beyond that. A task's error is raised (once) by the next
    ``submit`` or ``wait``; every task after it is skipped, also those
    already waiting when it is raised (they would run without the failed
    one's work). ``wait`` returns once every task and its kernels are done,
    so the tasks' results can be read on any stream after it."""

    def __init__(self, device, max_pending: int):
        device = torch.device(device)
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._tasks: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None          # to raise in the submitting thread
        self._failed = False                                # skip every task after an error
        self._thread = threading.Thread(target=self._loop, name="tc-index-encode", daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[torch.Tensor], None], x: torch.Tensor) -> None:
        self._raise()
        ready = None
        if self.stream is not None:
            if x.is_cuda and x.device != self.device:
                x = x.to(self.device)
            if x.is_cuda:
                x.record_stream(self.stream)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        self._tasks.put((task, x, ready))

    def _loop(self) -> None:
        while True:
            item = self._tasks.get()
            try:
                if item is None:
                    return
                task, x, ready = item
                del item
                if not self._failed:
                    try:
                        self._run(task, x, ready)
                    except BaseException as error:          # raised in the submitting thread
                        self._error, self._failed = error, True
                del task, x, ready
            finally:
                self._tasks.task_done()

    def _run(self, task, x, ready) -> None:
        with torch.inference_mode():                            # grad mode is per thread
            if self.stream is None:
                task(x)
                return
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                task(x)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Block until every submitted task and its GPU work is done; raise a task's error."""
        self._tasks.join()
        if self.stream is not None:
            self.stream.synchronize()
        self._raise()

    def close(self) -> None:
        """``wait``, then end the thread (also when ``wait`` raises)."""
        try:
            self.wait()
        finally:
            self._tasks.put(None)
            self._thread.join()


class _Reached(Exception):
    """Raised in the last hook a pass needs: the rest of the forward is skipped."""


def sequence_chunks(n_seq: int, seq_len: int, d_sae: int, element_size: int,
                    chunk_bytes: int = CHUNK_BYTES) -> list[slice]:
    """Slices of sequences splitting a batch into as few, equal chunks as keep
    each chunk's activations under ``chunk_bytes`` (whole sequences: never a
    one-row matrix product, whose result can differ in the last bit)."""
    total = n_seq * seq_len * d_sae * element_size
    n_chunks = min(n_seq, max(1, -(-total // chunk_bytes)))
    per = -(-n_seq // n_chunks)
    return [slice(i, min(i + per, n_seq)) for i in range(0, n_seq, per)]


def stream_encodings(model, transcoders: TranscoderSet, layers: Sequence[int], tokens: torch.Tensor,
                     consume: Callable[[int, Iterator[tuple[int, torch.Tensor]]], None],
                     chunk_bytes: int = CHUNK_BYTES, nonfinite: dict | None = None,
                     buffers: dict | None = None, worker: EncodeWorker | None = None) -> None:
    """One forward pass over ``tokens [n_seq, seq_len]``; as it reaches layer
    ``l``'s transcoder input, calls ``consume(l, chunks)`` where ``chunks``
    yields ``(first_sequence, acts [n, seq_len, d_sae])`` on the
    transcoders' device, encoded lazily one chunk at a time (consume each
    before asking for the next to keep one chunk alive). Layers come in the
    order the forward reaches them. Call under ``torch.inference_mode()``.
    ``nonfinite``, if given, counts each layer's NaN and infinite input values
    (``{layer: 0-d tensor}``, added to on the device, so no host sync here):
    NaN activations would otherwise vanish from the statistics unnoticed
    (``NaN > 0`` is false), and the build checks the counts when it checkpoints.

    ``buffers``, if given (a dict, empty at first), holds one output buffer per
    chunk shape and dtype, made on first use and kept there for later passes:
    every chunk is encoded into it, so its activations are valid only until
    the next chunk is asked for or ``consume`` returns (the build passes
    them where ``reuses_buffers``).

    ``worker``, if given, runs each ``consume`` (and so the encoding) in its
    thread and stream; this returns when the forward has handed the last
    layer over, maybe before it is consumed (``worker.wait()`` for that)."""
    n_seq, seq_len = tokens.shape
    by_hook: dict[str, list[int]] = {}
    for layer in layers:
        by_hook.setdefault(transcoders.input_hook(layer), []).append(layer)
    pending = set(by_hook)

    def chunks(tc, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        x = x.to(transcoders.device)
        for part in sequence_chunks(n_seq, seq_len, tc.d_sae, tc.W_enc.element_size(), chunk_bytes):
            out = None
            if buffers is not None:
                shape = (part.stop - part.start, seq_len, tc.d_sae)
                out = buffers.get((shape, tc.dtype))
                if out is None:
                    out = buffers[shape, tc.dtype] = torch.empty(shape, dtype=tc.dtype, device=x.device)
            yield part.start, tc.encode(x[part], out=out)

    def hook_of(name: str):
        def hook(x: torch.Tensor, hook) -> None:
            if name not in pending:                 # a repeated call (an alias of the same point)
                return None
            pending.discard(name)
            if nonfinite is not None:
                bad = torch.count_nonzero(~torch.isfinite(x))
                for layer in by_hook[name]:
                    nonfinite[layer] = nonfinite[layer] + bad if layer in nonfinite else bad
            for layer in by_hook[name]:
                if worker is None:
                    consume(layer, chunks(transcoders[layer], x))
                else:
                    worker.submit(lambda x, layer=layer: consume(layer, chunks(transcoders[layer], x)), x)
            if not pending:
                raise _Reached
            return None
        return hook

    with model.hooks(fwd_hooks=[(name, hook_of(name)) for name in by_hook]):
        try:
            model(tokens.to(model_device(model)), return_type=None)
        except _Reached:
            pass
    if pending:
        raise RuntimeError(f"the forward pass never reached the hooks {sorted(pending)}")
