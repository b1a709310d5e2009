"""Interventions on transcoder features: ablate, clamp, scale or steer them, and
watch the model's output change.

An :class:`Intervention` sets one feature of one layer's transcoder, at some
token positions, to a new value::

    Intervention(layer=2, positions=-1, feature=97, value=0.0)               # zero-ablate at the last token
    Intervention(layer=2, positions=None, feature=97, value=2.0, mode="scale")  # double it everywhere
    Intervention(layer=2, positions=None, feature=97, value=5.0, mode="add")    # steer: add 5 to its activation

``mode``: ``"set"`` (the activation becomes ``value``), ``"scale"`` (activation ×
``value``: 0 ablates, 2 amplifies, −1 inverts) or ``"add"`` (activation +
``value``). ``positions`` is one position, a list, or None for every position
(during generation: every new token too). Positions count the BOS token.

Every intervention changes an MLP output by ``(new − old activation) × W_dec[feature]``
and leaves the rest of the MLP output (the other features, the transcoder's
error) to the mode of the run:

* **unconstrained** (default): the full model runs forward; at each layer with
  an intervention the true MLP output is kept and the change of the intervened
  features' writes is added, so the other features and the error term are
  those of the new input: downstream features react. This answers "what would
  the model do".
* **constrained** (``constrained=True``): attention patterns and every norm
  scale frozen at their values on the clean prompt, every MLP output frozen
  (every other feature and every error term fixed), and each intervened
  feature's activation changed from its clean value. Only the linear part of
  the model carries the change: the residual stream, attention's OV circuits
  and transcoders' skip terms. This is the linear world of attribution graphs,
  in which a zero-ablation changes a target by exactly minus the feature's edge
  into it. ``freeze_values=True`` also freezes attention value vectors, so the
  change reaches a target only directly through the residual stream: the world
  of :func:`tc_explore.circuits.decompose`, in which a zero-ablation changes a
  target by exactly minus the feature's contribution.

A metric is a logit difference (:func:`logit_difference_metric`), the
greater-than probability difference
(:func:`tc_explore.tasks.greater_than.probability_difference_metric`), a
:class:`~tc_explore.circuits.Target` of the decomposition (a linear readout of
the residual stream, exact in constrained mode), or any callable from the
prompt's logits ``[pos, d_vocab]`` to a float.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, Union

import pandas as pd
import torch

from .circuits.context import PromptContext, prompt_context, stage_name
from .circuits.contributions import Target
from .circuits.frozen import frozen_hooks
from .errors import InvalidInputError, as_count, as_flag, as_integer, as_number, refuse_non_finite
from .model import (Prompt, check_layer, model_device, single_token_id, to_tokens,
                    token_strings)
from .transcoder import TranscoderSet, as_transcoder_set

__all__ = ["Intervention", "InterventionResult", "intervene", "intervention_hooks",
           "Generation", "generate", "logit_difference_metric", "feature_scaling"]

Hook = tuple[str, Callable]
Positions = Union[int, Sequence[int], None]
Metric = Union[Target, Callable[[torch.Tensor], float]]
MODES = ("set", "scale", "add")


@dataclass(frozen=True)
class Intervention:
    """Set feature ``feature`` of layer ``layer``'s transcoder at ``positions``
    (an int, a list of ints, None = every position) to ``value`` (``mode="set"``),
    to ``value`` × its activation (``"scale"``) or to its activation + ``value`` (``"add"``)."""
    layer: int
    positions: Positions
    feature: int
    value: float = 0.0
    mode: Literal["set", "scale", "add"] = "set"

    @classmethod
    def ablate(cls, layer: int, feature: int, positions: Positions = None) -> "Intervention":
        """Zero-ablation (``value=0``, ``mode="set"``)."""
        return cls(layer, positions, feature, 0.0, "set")

    @classmethod
    def scale(cls, layer: int, feature: int, factor: float, positions: Positions = None) -> "Intervention":
        return cls(layer, positions, feature, factor, "scale")

    def label(self) -> str:
        where = "all" if self.positions is None else self.positions
        op = {"set": "=", "scale": "×", "add": "+"}.get(self.mode, self.mode)
        value = f"{self.value:g}" if isinstance(self.value, (int, float)) else repr(self.value)
        return f"L{self.layer}F{self.feature}@{where} {op} {value}"


# -- validation -------------------------------------------------------------------------------
def _check_interventions(model, transcoders: TranscoderSet, interventions: Iterable[Intervention],
                         n_pos: int | None) -> list[tuple[Intervention, list[int] | None]]:
    """Each intervention with its positions resolved (None = every position);
    clear errors for anything that cannot be applied."""
    as_transcoder_set(transcoders)
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    if isinstance(interventions, (str, bytes)) or not isinstance(interventions, Iterable):
        raise InvalidInputError(f"interventions must be an Intervention or a list of them, got "
                                f"{type(interventions).__name__}.")
    out, seen = [], {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise InvalidInputError(f"Interventions must be Intervention objects, got {type(iv).__name__}: "
                                    "write Intervention(layer, positions, feature, value).")
        layer = check_layer(model, iv.layer)
        if layer not in transcoders:
            raise InvalidInputError(
                f"Cannot intervene on layer {layer}: it has no transcoder in set {transcoders.name!r} "
                f"(its layers are {transcoders.layers}). Load a set with that layer, or pick another.")
        feature = transcoders.check_feature(layer, iv.feature)
        if iv.mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {iv.mode!r}.")
        try:
            value = as_number(iv.value, "value")
        except InvalidInputError as err:
            raise InvalidInputError(f"{err} (in {iv})") from None
        positions = _check_positions(iv.positions, n_pos)
        iv = Intervention(layer, iv.positions, feature, value, iv.mode)
        taken = seen.setdefault((layer, iv.feature), [])
        if any(p is None or positions is None or set(p) & set(positions) for p in taken):
            raise InvalidInputError(
                f"Two interventions set layer {layer} feature {iv.feature} at the same position "
                f"({iv.label()}); give each (layer, feature, position) one intervention.")
        taken.append(positions)
        out.append((iv, positions))
    return out


def _check_positions(positions: Positions, n_pos: int | None) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, (str, bytes)):
        raise InvalidInputError(f"positions must be integers, got {positions!r}.")
    single = not isinstance(positions, Iterable) or getattr(positions, "ndim", None) == 0
    items = [positions] if single else list(positions)
    if not items:
        raise InvalidInputError("positions is empty: give a position, a list of positions, or None "
                                "for every position.")
    out = []
    for p in items:
        try:
            p = as_integer(p, "positions")
        except InvalidInputError:
            raise InvalidInputError(f"positions must be integers, got {p!r}.") from None
        if n_pos is not None:
            if not -n_pos <= p < n_pos:
                raise InvalidInputError(f"position {p} is out of range: the prompt has {n_pos} tokens "
                                        f"(0..{n_pos - 1}, counting the BOS token).")
            p %= n_pos
        elif p < 0:
            raise InvalidInputError(f"position {p}: negative positions need a prompt to count from.")
        out.append(p)
    return sorted(set(out))


# -- the hooks ----------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    """The interventions of one transcoder layer: the features touched
    (``index``, [k]) and, per intervention, its slot in ``index``."""
    layer: int
    index: torch.Tensor
    items: list[tuple[int, list[int] | None, str, float]] = field(default_factory=list)  # slot, positions, mode, value

    def new_acts(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., pos, k] activations of the touched features -> their intervened values."""
        new = acts.clone()
        n_pos = acts.shape[-2]
        for slot, positions, mode, value in self.items:
            if positions is not None and positions[-1] >= n_pos:
                # Hooks made without a prompt (intervention_hooks(..., n_pos=None)) meet
                # the input only here: a position past its end would change nothing.
                raise InvalidInputError(
                    f"Intervention position {positions[-1]} is past the end of the {n_pos}-token "
                    f"input of layer {self.layer}; positions index the input's tokens (0..{n_pos - 1}).")
            where = slice(None) if positions is None else positions
            old = acts[..., where, slot]
            new[..., where, slot] = (torch.full_like(old, value) if mode == "set" else
                                     old * value if mode == "scale" else old + value)
        return new


def _plans(checked, transcoders: TranscoderSet) -> dict[int, _LayerPlan]:
    plans: dict[int, _LayerPlan] = {}
    slots: dict[tuple[int, int], int] = {}
    features: dict[int, list[int]] = {}
    for iv, positions in checked:
        key = (iv.layer, iv.feature)
        if key not in slots:
            slots[key] = len(features.setdefault(iv.layer, []))
            features[iv.layer].append(iv.feature)
        plans.setdefault(iv.layer, _LayerPlan(iv.layer, torch.empty(0, dtype=torch.long)))
        plans[iv.layer].items.append((slots[key], positions, iv.mode, iv.value))
    for layer, plan in plans.items():
        plan.index = torch.tensor(features[layer], dtype=torch.long, device=transcoders[layer].device)
    return plans


def _feature_writes(transcoders: TranscoderSet, layer: int, index: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Where the features ``index`` of ``layer`` write, and their decoder rows:
    ``[(output hook, W_dec rows [k, d_model])]``. A per-layer transcoder writes
    to its own MLP output only; a cross-layer transcoder's feature writes to
    every layer from its own on, one decoder per layer, and an intervention
    changes all those writes."""
    return transcoders.feature_writes(layer, index)


def intervention_hooks(model, transcoders: TranscoderSet, interventions: Sequence[Intervention],
                       ctx: PromptContext | None = None, n_pos: int | None = None,
                       freeze_values: bool = False) -> list[Hook]:
    """Forward hooks that apply ``interventions``; compose them with your own.

    Without ``ctx``: unconstrained (the feature activations are those of the
    running input; positions are checked against ``n_pos`` if given). With a
    :class:`PromptContext` ``ctx``: constrained on that prompt (patterns, norm
    scales and MLP outputs frozen, see the module docstring), which only makes
    sense when running ``ctx``'s own tokens."""
    if ctx is not None:
        n_pos = ctx.n_pos
    return _hooks(model, transcoders, _check_interventions(model, transcoders, interventions, n_pos),
                  ctx, freeze_values)


def _hooks(model, transcoders: TranscoderSet, checked, ctx: PromptContext | None,
           freeze_values: bool) -> list[Hook]:
    if freeze_values and ctx is None:
        raise InvalidInputError("freeze_values applies to constrained interventions only: pass constrained=True.")
    transcoders.check_fits(model, sorted({iv.layer for iv, _ in checked}))
    plans = _plans(checked, transcoders)
    if ctx is not None:
        return _constrained_hooks(ctx, plans, freeze_values)
    hooks: list[Hook] = []
    for layer, plan in plans.items():
        tc = transcoders[layer]
        delta: dict[str, torch.Tensor] = {}

        def read_input(x, hook, tc=tc, plan=plan, delta=delta):
            acts = tc.encode(x).index_select(-1, plan.index)    # [batch, pos, k]
            delta["acts"] = plan.new_acts(acts) - acts
            return x

        hooks.append((tc.input_hook, read_input))
        for out_hook, rows in _feature_writes(transcoders, layer, plan.index):
            def add_write(out, hook, rows=rows, delta=delta):
                return out + (delta["acts"] @ rows).to(out.dtype)   # [batch, pos, d_model]
            hooks.append((out_hook, add_write))
    return hooks


def _constrained_hooks(ctx: PromptContext, plans: dict[int, _LayerPlan], freeze_values: bool) -> list[Hook]:
    # Every MLP output frozen at its clean value (other features and errors fixed);
    # the intervened features' changed writes and the skip terms' linear response added on top.
    hooks = frozen_hooks(ctx, values=freeze_values, mlps=True)
    writes: dict[str, list[torch.Tensor]] = {}
    for layer, plan in plans.items():
        acts = ctx.feature_acts(layer).index_select(1, plan.index)          # [pos, k] clean
        delta = plan.new_acts(acts) - acts
        for out_hook, rows in _feature_writes(ctx.transcoders, layer, plan.index):
            writes.setdefault(out_hook, []).append(delta @ rows)            # [pos, d_model]
    for out_hook, parts in writes.items():
        write = torch.stack(parts).sum(0)

        def add_write(out, hook, write=write):
            return out + write.to(out.dtype)
        hooks.append((out_hook, add_write))
    if not freeze_values:
        for layer in ctx.transcoders.layers:
            tc = ctx.transcoders[layer]
            if tc.W_skip is None:
                continue
            seen: dict[str, torch.Tensor] = {}

            def read_input(x, hook, seen=seen):
                seen["x"] = x
                return x

            def add_skip(out, hook, tc=tc, seen=seen, clean=ctx.mlp_in[layer]):
                moved = seen.pop("x").to(tc.dtype) - clean.to(tc.dtype)
                return out + (moved @ tc.W_skip).to(out.dtype)
            hooks += [(tc.input_hook, read_input), (tc.output_hook, add_skip)]
    return hooks


# -- metrics ------------------------------------------------------------------------------------
def _token_id(model, token: int | str) -> int:
    if isinstance(token, str):
        return single_token_id(model, token)
    token = as_integer(token, "token id")
    if not 0 <= token < int(model.cfg.d_vocab):
        raise InvalidInputError(f"token id {token} is out of range (0..{int(model.cfg.d_vocab) - 1}).")
    return token


def logit_difference_metric(model, positive: int | str, negative: int | str,
                            position: int = -1) -> Callable[[torch.Tensor], float]:
    """``logit[positive] − logit[negative]`` at ``position`` (tokens as strings or ids)."""
    pos_id, neg_id = _token_id(model, positive), _token_id(model, negative)

    def metric(logits: torch.Tensor) -> float:
        return float(logits[position, pos_id].double() - logits[position, neg_id].double())
    metric.__name__ = f"logit[{positive!r}] − logit[{negative!r}]"
    return metric


def _metric_value(metric, logits: torch.Tensor) -> float:
    """A callable metric's value, which must be one finite number."""
    return as_number(metric(logits), f"The value of metric {_metric_name(metric)!r}")


def _metric_name(metric) -> str:
    if metric is None:
        return ""
    if isinstance(metric, Target):
        return metric.label
    return getattr(metric, "__name__", type(metric).__name__)


# -- one prompt ---------------------------------------------------------------------------------
@dataclass
class InterventionResult:
    """What an intervention did on one prompt. Logits are [pos, d_vocab] (float32, CPU)."""
    interventions: list[Intervention]
    tokens: torch.Tensor              # [pos]
    token_strs: list[str]
    clean_logits: torch.Tensor
    logits: torch.Tensor
    constrained: bool
    metric_name: str = ""
    metric_before: float | None = None
    metric_after: float | None = None
    model: Any = field(default=None, repr=False)

    @property
    def metric_change(self) -> float | None:
        if self.metric_before is None or self.metric_after is None:
            return None
        return self.metric_after - self.metric_before

    def top_tokens(self, k: int = 10, position: int = -1) -> pd.DataFrame:
        """The ``k`` most probable next tokens after the intervention at
        ``position``, with their probabilities before and after. Columns:
        rank, token, token_id, prob, prob_before, logit, logit_before."""
        k = as_count(k, "k")
        position = as_integer(position, "position")
        n = self.logits.shape[0]
        if not -n <= position < n:
            raise InvalidInputError(f"position {position} is out of range (the prompt has {n} tokens).")
        after = self.logits[position].double()
        before = self.clean_logits[position].double()
        p_after, p_before = after.softmax(-1), before.softmax(-1)
        probs, ids = torch.topk(p_after, min(k, p_after.numel()))
        ids = ids.tolist()
        strs = token_strings(self.model, ids)
        return pd.DataFrame(dict(rank=range(len(ids)), token=strs, token_id=ids, prob=probs.tolist(),
                                 prob_before=p_before[ids].tolist(), logit=after[ids].tolist(),
                                 logit_before=before[ids].tolist()))

    def summary(self, k: int = 5) -> dict:
        """A small JSON-ready dict (what the graph widget shows), with the ``k``
        most probable next tokens after the intervention."""
        top = self.top_tokens(k)
        return dict(interventions=[iv.label() for iv in self.interventions], constrained=self.constrained,
                    metric=self.metric_name, metric_before=self.metric_before, metric_after=self.metric_after,
                    metric_change=self.metric_change,
                    top_tokens=[dict(token=r.token, prob=r.prob, prob_before=r.prob_before)
                                for r in top.itertuples()])


def _run(model, tokens: torch.Tensor, hooks: list[Hook], target: Target | None):
    """Logits [pos, d_vocab] of one prompt with ``hooks``, and ``target``'s value if given."""
    name = stage_name(target.stage, int(model.cfg.n_layers)) if target is not None else None
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        if name is None:
            return model(tokens[None])[0], None
        # model.hooks(...) rather than run_with_cache(fwd_hooks=...): TransformerBridge's
        # run_with_cache does not apply fwd_hooks passed to it.
        logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n == name)
    resid = cache[name][0, target.token].double()
    value = float(target.direction.to(resid.device).double() @ resid) + target.offset
    return logits[0], value


def intervene(model, transcoders: TranscoderSet, prompt: Prompt | PromptContext,
              interventions: Sequence[Intervention] | Intervention, *, constrained: bool = False,
              freeze_values: bool = False, metric: Metric | None = None,
              prepend_bos: bool = True) -> InterventionResult:
    """Run ``prompt`` with ``interventions`` and compare with the clean run.

    ``prompt``: a string, token ids, or a :class:`PromptContext` (reused: the
    widget passes one so that each call is one forward pass). ``constrained``
    and ``freeze_values``: see the module docstring. ``metric``: a callable of
    the logits [pos, d_vocab], or a :class:`Target` (read off the residual
    stream; its frozen norm scale makes it exact in constrained mode).
    """
    constrained, freeze_values = as_flag(constrained, "constrained"), as_flag(freeze_values, "freeze_values")
    if isinstance(prompt, PromptContext):
        ctx = prompt
        if ctx.model is not model or ctx.transcoders is not transcoders:
            raise InvalidInputError("The PromptContext was built for another model or transcoder set.")
        tokens = ctx.tokens
    else:
        ctx = None
        tokens = to_tokens(model, prompt, prepend_bos=prepend_bos)
        if tokens.shape[0] != 1:
            raise InvalidInputError(f"intervene works on one prompt at a time, got a batch of {tokens.shape[0]}.")
        tokens = tokens[0]
    checked = _check_interventions(model, transcoders, interventions, int(tokens.shape[0]))
    if metric is not None and not isinstance(metric, Target) and not callable(metric):
        raise InvalidInputError(f"metric must be a callable of the logits or a Target, got {type(metric).__name__}.")
    target = metric if isinstance(metric, Target) else None
    if target is not None and not 0 <= target.token < tokens.shape[0]:
        raise InvalidInputError(f"The metric's target reads token {target.token}, outside this prompt.")
    if constrained and ctx is None:
        ctx = prompt_context(model, transcoders, tokens, prepend_bos=False)
    hooks = _hooks(model, transcoders, checked, ctx if constrained else None, freeze_values)
    clean, before = _run(model, tokens, [], target)
    strs = {"position": token_strings(model, tokens)}
    refuse_non_finite(clean, "The logits of the clean run", ("position",), strs)
    logits, after = _run(model, tokens, hooks, target)
    refuse_non_finite(logits, f"The logits with the interventions ({', '.join(iv.label() for iv, _ in checked)})",
                      ("position",), strs)
    if metric is not None and target is None:
        before, after = _metric_value(metric, clean), _metric_value(metric, logits)
    return InterventionResult([iv for iv, _ in checked], tokens.cpu(), strs["position"], clean.float().cpu(),
                              logits.float().cpu(), bool(constrained), _metric_name(metric),
                              before, after, model=model)


FeatureAt = tuple[int, int, Union[int, None]]     # (layer, feature, position or None = every position)


def feature_scaling(model, transcoders: TranscoderSet, prompt: Prompt | PromptContext, *,
                    metric: Metric | None = None, constrained: bool = False, k: int = 5,
                    prepend_bos: bool = True) -> Callable[[Sequence[FeatureAt], float], dict]:
    """``fn(features, factor) -> summary`` for interactive use (the graph
    widget's intervention controls): scales each ``(layer, feature, position)``
    by ``factor`` on ``prompt`` (0 ablates, 1 changes nothing) with
    :func:`intervene` and returns :meth:`InterventionResult.summary` with the
    ``k`` most probable next tokens. The prompt is encoded once (one
    :class:`PromptContext`), so each call costs two forward passes."""
    ctx = prompt if isinstance(prompt, PromptContext) else \
        prompt_context(model, transcoders, prompt, prepend_bos=prepend_bos)

    def fn(features: Sequence[FeatureAt], factor: float) -> dict:
        bad = [f for f in features if not (isinstance(f, (tuple, list)) and len(f) == 3)]
        if bad:
            raise InvalidInputError(f"features must be (layer, feature, position or None) triples, "
                                    f"got {bad[0]!r}.")
        ivs = [Intervention(layer, position, feature, factor, "scale")
               for layer, feature, position in features]
        return intervene(model, transcoders, ctx, ivs, constrained=constrained, metric=metric).summary(k)
    return fn


# -- steered generation -------------------------------------------------------------------------
@dataclass
class Generation:
    """A continuation: ``tokens`` [pos] are the prompt's then the new ones."""
    prompt_tokens: torch.Tensor
    tokens: torch.Tensor
    text: str
    new_text: str
    interventions: list[Intervention]

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[self.prompt_tokens.shape[0]:]


@torch.no_grad()
def generate(model, transcoders: TranscoderSet, prompt: Prompt,
             interventions: Sequence[Intervention] | Intervention = (), max_new_tokens: int = 20, *,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stop_at_eos: bool = True, prepend_bos: bool = True) -> Generation:
    """Continue ``prompt`` with ``interventions`` applied (unconstrained) at
    every forward pass. An intervention with ``positions=None`` applies at every
    position, the new tokens included; explicit positions index the prompt.

    ``temperature=0`` is greedy decoding (with no interventions, the model's own
    greedy continuation); otherwise tokens are sampled from the softmax of
    logits / temperature (restricted to the ``top_k`` most likely), from a
    generator seeded with ``seed``, so a call is reproducible.

    Each step reruns the whole sequence (no key/value cache), so every
    position sees the interventions; the result equals ``model.generate(...,
    use_past_kv_cache=False)``. (On the demo model, TransformerBridge's cached
    ``generate`` picked tokens that a full forward pass does not rank first.)"""
    max_new_tokens = as_count(max_new_tokens, "max_new_tokens")
    temperature = as_number(temperature, "temperature", low=0.0)
    top_k = None if top_k is None else as_count(top_k, "top_k")
    seed = as_integer(seed, "seed")
    stop_at_eos = as_flag(stop_at_eos, "stop_at_eos")
    if seed < 0:
        raise InvalidInputError(f"seed must be a non-negative integer, got {seed}.")
    tokens = to_tokens(model, prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise InvalidInputError(f"generate continues one prompt at a time, got a batch of {tokens.shape[0]}.")
    if tokens.shape[1] + max_new_tokens > int(model.cfg.n_ctx):
        raise InvalidInputError(
            f"The prompt ({tokens.shape[1]} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {int(model.cfg.n_ctx)} tokens; ask for at most "
            f"{int(model.cfg.n_ctx) - tokens.shape[1]} new tokens.")
    # Positions are resolved against the prompt once (None stays "every
    # position"), so that a negative position keeps meaning the same prompt
    # token as the text grows.
    checked = _check_interventions(model, transcoders, interventions, tokens.shape[1])
    hooks = _hooks(model, transcoders, checked, None, False)
    generator = torch.Generator(device=model_device(model)).manual_seed(int(seed))
    eos = getattr(model.tokenizer, "eos_token_id", None)
    prompt_tokens = tokens[0].clone()
    with model.hooks(fwd_hooks=hooks):
        for _ in range(max_new_tokens):
            logits = model(tokens)[0, -1].double()                          # [d_vocab]
            # argmax of NaN logits would pick a token silently (and sampling fail deep in torch)
            refuse_non_finite(logits, f"The next-token logits after {tokens.shape[1]} tokens"
                              f"{' with the interventions' if checked else ''}")
            if temperature == 0:
                nxt = int(torch.argmax(logits))
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            tokens = torch.cat([tokens, torch.tensor([[nxt]], device=tokens.device)], dim=1)
            if stop_at_eos and eos is not None and nxt == eos:
                break
    new = tokens[0, prompt_tokens.shape[0]:]
    decode = model.tokenizer.decode
    return Generation(prompt_tokens.cpu(), tokens[0].cpu(), decode(tokens[0].tolist()),
                      decode(new.tolist()), [iv for iv, _ in checked])
