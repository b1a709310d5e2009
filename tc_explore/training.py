"""Training transcoders for a model's MLP sublayers: ``train_transcoders``
(all layers in one pass over the data, resumable from checkpoints) and
``save_transcoder_set`` (the gpt2-small file layout plus a registry entry, so
``load_transcoders(directory)`` reads the set).

The loss, its normalisation and why, the units, decoder norms, dead-feature
resampling, schedules and checkpoints are described in ``docs/training.md``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .errors import InvalidInputError, as_count, as_number
from .formats import write_gpt2_transcoder, write_log_feature_sparsity
from .integrity import atomic_write, write_text_atomic
from .model import (check_layer, check_model_surface, hook_ln2_normalized, hook_mlp_out, layer_hook,
                    model_device)
from .activation_buffer import ActivationBuffer
from .progress import progress_bar
from .transcoder import Transcoder, TranscoderSet

CHECKPOINT_NAME = "checkpoint.pt"
FREQUENCY_FLOOR = -10.0  # log10 frequency written for a feature that never fired


@dataclass
class TrainingConfig:
    """Hyper-parameters of :func:`train_transcoders`. Steps count optimiser
    updates; each update uses ``batch_size`` activation vectors per layer."""
    layers: Sequence[int] | None = None          # None: every layer of the model
    d_sae: int | None = None                     # default expansion_factor * d_in
    expansion_factor: int = 8
    input_hook: str = hook_ln2_normalized("{L}")
    output_hook: str = hook_mlp_out("{L}")
    n_steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay_frac: float = 0.2
    l1_coefficient: float = 1.0
    l1_warmup_steps: int = 0
    buffer_batches: int = 16                     # buffer = buffer_batches * batch_size vectors
    model_batch_size: int = 32                   # token sequences per model forward
    dead_window: int = 500                       # steps without firing => dead
    resample_every: int | None = None            # steps between resamplings; None: never
    resample_until: float = 0.5                  # fraction of n_steps after which no resampling
    resample_scale: float = 0.2
    checkpoint_every: int | None = None
    log_every: int = 10
    seed: int = 0
    show_progress: bool | None = None            # None: on, off in CI (tc_explore.progress)

    def validate(self) -> None:
        for name in ("n_steps", "batch_size", "buffer_batches", "model_batch_size",
                     "expansion_factor", "dead_window", "log_every"):
            as_count(getattr(self, name), f"TrainingConfig.{name}")
        for name in ("warmup_steps", "l1_warmup_steps", "seed"):
            as_count(getattr(self, name), f"TrainingConfig.{name}", minimum=0)
        for name, low, high in (("lr", 0.0, None), ("l1_coefficient", 0.0, None), ("decay_frac", 0.0, 1.0),
                                ("resample_until", 0.0, 1.0), ("resample_scale", 0.0, None)):
            as_number(getattr(self, name), f"TrainingConfig.{name}", low, high)
        betas = self.adam_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(0.0 <= as_number(b, "TrainingConfig.adam_betas") < 1.0 for b in betas)):
            raise InvalidInputError(f"TrainingConfig.adam_betas must be two numbers in [0, 1), got {betas!r}.")
        for name in ("input_hook", "output_hook"):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"TrainingConfig.{name} must be a hook name template such as "
                                        f"'blocks.{{L}}.hook_mlp_out', got {getattr(self, name)!r}.")
        if self.buffer_batches < 2:
            raise InvalidInputError("TrainingConfig.buffer_batches must be at least 2 (half "
                                    "the buffer is refilled at a time).")
        if self.d_sae is not None:
            as_count(self.d_sae, "TrainingConfig.d_sae")
        if not self.lr > 0:
            raise InvalidInputError(f"TrainingConfig.lr must be positive, got {self.lr!r}.")
        for name in ("resample_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None:
                as_count(value, f"TrainingConfig.{name}")
        for template in (self.input_hook, self.output_hook):
            if "{L}" not in template and not template.startswith("hook_") and \
                    "." not in template:
                raise InvalidInputError(f"Hook template {template!r} should contain '{{L}}', "
                                        "e.g. 'blocks.{L}.hook_mlp_out'.")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else [int(l) for l in self.layers]
        d["adam_betas"] = list(self.adam_betas)
        return d


@dataclass
class TrainingResult:
    """What :func:`train_transcoders` returns. ``transcoders`` have unit-norm
    decoder rows; ``metrics[layer]`` holds the final ``fvu``, ``l0``,
    ``dead_fraction`` and ``mse`` measured on the last buffer."""
    transcoders: dict[int, Transcoder]
    log10_frequencies: dict[int, torch.Tensor]
    metrics: dict[int, dict[str, float]]
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    sequences_consumed: int = 0
    config: TrainingConfig | None = None

    def transcoder_set(self, name: str = "trained", model_name: str | None = None) -> TranscoderSet:
        freqs = self.log10_frequencies
        ts = TranscoderSet.from_transcoders(self.transcoders, name=name, model_name=model_name)
        ts._frequency_loaders = {l: (lambda t=freqs[l]: t) for l in freqs}
        return ts


# -- the trainable transcoders --------------------------------------------------------
class _Layers(torch.nn.Module):
    """All layers' parameters stacked, so every layer trains in one batched step."""

    def __init__(self, n: int, d_in: int, d_sae: int, d_out: int, generator: torch.Generator):
        super().__init__()
        W_enc = torch.randn(n, d_in, d_sae, generator=generator)
        W_enc = W_enc / W_enc.norm(dim=1, keepdim=True)       # unit-RMS inputs -> pre ~ N(0, 1)
        W_dec = torch.randn(n, d_sae, d_out, generator=generator)
        # rows of norm 0.2 / sqrt(d_sae): with about half the features active at
        # O(1), the initial output is about 0.1 of the target's scale
        W_dec = (0.2 / math.sqrt(d_sae)) * W_dec / W_dec.norm(dim=2, keepdim=True)
        self.W_enc = torch.nn.Parameter(W_enc)
        self.b_enc = torch.nn.Parameter(torch.zeros(n, d_sae))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(n, d_in))
        self.b_dec_out = torch.nn.Parameter(torch.zeros(n, d_out))
        self.register_buffer("in_scale", torch.ones(n))
        self.register_buffer("out_scale", torch.ones(n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [batch, n, d_in] -> (out [batch, n, d_out] in the target's units,
        acts [batch, n, d_sae])."""
        acts, out = self.internal(x)
        return out * self.out_scale[:, None], acts

    def internal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature activations and the output divided by ``out_scale``."""
        xs = x / self.in_scale[:, None]
        pre = torch.einsum("bnd,ndf->bnf", xs - self.b_dec, self.W_enc) + self.b_enc
        acts = torch.relu(pre)
        return acts, torch.einsum("bnf,nfo->bno", acts, self.W_dec) + self.b_dec_out

    @torch.no_grad()
    def exported(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s weights in the model's units, decoder rows of unit norm
        (their norm folded into the encoder column and bias): the same function."""
        s_in, s_out = self.in_scale[i], self.out_scale[i]
        W_enc, b_enc = self.W_enc[i] / s_in, self.b_enc[i].clone()
        W_dec, b_dec_out = self.W_dec[i] * s_out, self.b_dec_out[i] * s_out
        norms = W_dec.norm(dim=1).clamp_min(1e-12)
        return {"W_enc": W_enc * norms[None, :], "b_enc": b_enc * norms,
                "W_dec": W_dec / norms[:, None], "b_dec": self.b_dec[i] * s_in,
                "b_dec_out": b_dec_out}

    def transcoder(self, i: int, layer: int, input_hook: str, output_hook: str) -> Transcoder:
        w = self.exported(i)
        return Transcoder(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], w["b_dec_out"],
                          layer=layer, input_hook=input_hook, output_hook=output_hook)


def _lr_factor(step: int, cfg: TrainingConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = int(cfg.decay_frac * cfg.n_steps)
    start = cfg.n_steps - decay_steps
    if decay_steps and step >= start:
        return max(0.0, (cfg.n_steps - step) / decay_steps)
    return 1.0


def _l1_factor(step: int, cfg: TrainingConfig) -> float:
    if cfg.l1_warmup_steps and step < cfg.l1_warmup_steps:
        return (step + 1) / cfg.l1_warmup_steps
    return 1.0


# -- checkpoints -----------------------------------------------------------------------
def _atomic_save(obj, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, str(tmp))


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a foreign or damaged file
        raise InvalidInputError(f"Cannot read checkpoint {path}: {err}. Delete it, or pass "
                                "resume=False to start afresh.") from err


# -- training --------------------------------------------------------------------------
def _resolve_layers(model, cfg: TrainingConfig) -> list[int]:
    n = int(model.cfg.n_layers)
    if cfg.layers is None:
        return list(range(n))
    layers = [cfg.layers] if isinstance(cfg.layers, int) else list(cfg.layers)
    if not layers:
        raise InvalidInputError("TrainingConfig.layers is empty: name at least one layer.")
    out = sorted({check_layer(model, l) for l in layers})
    return out


def train_transcoders(model, tokens: torch.Tensor | Iterable[torch.Tensor],
                      config: TrainingConfig | None = None,
                      checkpoint_dir: str | os.PathLike | None = None,
                      resume: bool = True) -> TrainingResult:
    """Train one transcoder per selected layer of ``model`` (a TransformerLens
    model, e.g. from :func:`tc_explore.load_model`) on ``tokens`` (an integer
    tensor [n_sequences, ctx], or an iterable of [batch, ctx] tensors).

    Every layer is trained from the same model forward passes. Stops after
    ``config.n_steps`` steps, or earlier when the token stream runs out (the
    result's ``steps`` says how many were done). See the module docstring for
    the loss, the schedules, resampling and checkpoints.
    """
    check_model_surface(model)
    cfg = config if config is not None else TrainingConfig()
    if not isinstance(cfg, TrainingConfig):
        raise InvalidInputError(f"config must be a TrainingConfig, got {type(cfg).__name__}: write "
                                "TrainingConfig(n_steps=..., ...).")
    cfg.validate()
    layers = _resolve_layers(model, cfg)
    in_hooks = [layer_hook(cfg.input_hook, l) for l in layers]
    out_hooks = [layer_hook(cfg.output_hook, l) for l in layers]
    model_hooks = getattr(model, "hook_dict", None)
    missing = [h for h in in_hooks + out_hooks if isinstance(model_hooks, dict) and h not in model_hooks]
    if missing:
        raise InvalidInputError(f"The model has no hook(s) {missing[:4]}: check TrainingConfig.input_hook "
                                f"/ output_hook ({cfg.input_hook!r}, {cfg.output_hook!r}).")
    device = model_device(model)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise InvalidInputError(f"checkpoint_dir {checkpoint_dir} is a file, not a folder.")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    ckpt = _load_checkpoint(ckpt_path) if (ckpt_path is not None and resume
                                           and ckpt_path.is_file()) else None
    if ckpt is not None:
        _check_resume(ckpt, cfg, layers)

    buffer = ActivationBuffer(model, tokens, layers, in_hooks, out_hooks,
                              capacity=cfg.buffer_batches * cfg.batch_size,
                              model_batch_size=cfg.model_batch_size,
                              seed=cfg.seed + (ckpt["step"] if ckpt else 0),
                              skip_sequences=ckpt["sequences_consumed"] if ckpt else 0)
    buffer.fill()
    d_in, d_out = buffer.x.shape[-1], buffer.y.shape[-1]
    d_sae = cfg.d_sae or cfg.expansion_factor * d_in
    n = len(layers)

    net = _Layers(n, d_in, d_sae, d_out, gen).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas))
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["optimizer"])
        mu = ckpt["mu"].to(device)
        since_fired = ckpt["since_fired"].to(device)
        step, history = int(ckpt["step"]), list(ckpt["history"])
    else:
        with torch.no_grad():
            x0, y0 = buffer.x[:buffer.size].to(device), buffer.y[:buffer.size].to(device)
            mu = y0.mean(0)                                           # [n, d_out]
            sigma = ((y0 - mu) ** 2).sum(-1).mean(0).sqrt().clamp_min(1e-12)  # [n]
            rms_in = (x0 ** 2).mean((0, 2)).sqrt().clamp_min(1e-12)           # [n]
            net.in_scale.copy_(rms_in)
            net.out_scale.copy_(sigma)
            net.b_dec.copy_(x0.mean(0) / rms_in[:, None])
            net.b_dec_out.copy_(mu / sigma[:, None])
        since_fired = torch.zeros(n, d_sae, dtype=torch.long, device=device)
        step, history = 0, []

    progress = progress_bar(total=cfg.n_steps, initial=step, desc=f"transcoders L{layers}",
                            unit="step", progress=cfg.show_progress)

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        _atomic_save({"step": step, "sequences_consumed": buffer.sequences_consumed,
                      "net": net.state_dict(), "optimizer": opt.state_dict(), "mu": mu.cpu(),
                      "since_fired": since_fired.cpu(),
                      "history": history, "layers": layers, "d_sae": d_sae,
                      "config": cfg.as_dict()}, ckpt_path)

    stats = torch.zeros(4, n)  # sums of: loss terms, fvu, l0 over the logging window
    window = 0
    while step < cfg.n_steps:
        batch = buffer.next_batch(cfg.batch_size)
        if batch is None:
            break
        x, y = batch[0].to(device), batch[1].to(device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _lr_factor(step, cfg)
        acts, out_s = net.internal(x)                          # output in units of sigma
        sq_err = ((out_s - y / net.out_scale[:, None]) ** 2).sum(-1)       # [b, n]
        mse = sq_err.mean(0)                                               # [n] ~ FVU
        dec_norms = net.W_dec.norm(dim=2)                                  # [n, d_sae]
        sparsity = (acts * dec_norms).sum(-1).mean(0)                      # [n]
        l1 = cfg.l1_coefficient * _l1_factor(step, cfg)
        loss = (mse + l1 * sparsity).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        with torch.no_grad():
            fired = (acts > 0)
            since_fired += 1
            since_fired[fired.any(0)] = 0
            total_var = ((y - mu) ** 2).sum(-1).sum(0) / net.out_scale ** 2
            stats[0] += (mse + l1 * sparsity).detach().cpu()
            stats[1] += (sq_err.detach().sum(0) / total_var.clamp_min(1e-12)).cpu()
            stats[2] += fired.float().sum(-1).mean(0).cpu()
            window += 1
        step += 1

        if cfg.resample_every and step % cfg.resample_every == 0 and \
                step < cfg.resample_until * cfg.n_steps:
            _resample(net, opt, since_fired, x, y, out_s.detach() * net.out_scale[:, None],
                      cfg, gen)

        if step % cfg.log_every == 0 or step == cfg.n_steps:
            s = stats / max(window, 1)
            dead = (since_fired >= cfg.dead_window).float().mean(1)
            record = {"step": step, "lr": cfg.lr * _lr_factor(step - 1, cfg),
                      "loss": s[0].tolist(), "fvu": s[1].tolist(), "l0": s[2].tolist(),
                      "dead_fraction": dead.tolist()}
            history.append(record)
            progress.set_postfix(loss=f"{s[0].mean():.4f}", L0=f"{s[2].mean():.1f}",
                                 FVU=f"{s[1].mean():.4f}", dead=f"{dead.mean():.1%}")
            stats.zero_()
            window = 0
        progress.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint()
    progress.close()
    save_checkpoint()

    # Final measurements with the final weights, on the last buffer.
    metrics, freqs = _measure(net, buffer, mu, cfg, layers, device)
    transcoders = {l: net.transcoder(i, l, in_hooks[i], out_hooks[i])
                   for i, l in enumerate(layers)}
    return TrainingResult(transcoders, freqs, metrics, history, step,
                          buffer.sequences_consumed, cfg)


def _check_resume(ckpt: dict, cfg: TrainingConfig, layers: list[int]) -> None:
    if list(ckpt.get("layers", [])) != layers:
        raise InvalidInputError(f"The checkpoint trains layers {ckpt.get('layers')}, this run "
                                f"asks for {layers}: use another checkpoint_dir or resume=False.")
    saved = ckpt.get("config", {})
    for key in ("input_hook", "output_hook", "expansion_factor", "d_sae", "batch_size"):
        if saved.get(key) != getattr(cfg, key):
            raise InvalidInputError(
                f"The checkpoint was trained with {key}={saved.get(key)!r}, this run has "
                f"{getattr(cfg, key)!r}: use another checkpoint_dir or resume=False.")


@torch.no_grad()
def _resample(net: _Layers, opt: torch.optim.Optimizer, since_fired: torch.Tensor,
              x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, cfg: TrainingConfig,
              gen: torch.Generator) -> None:
    dead_mask = since_fired >= cfg.dead_window
    for i in range(dead_mask.shape[0]):
        dead = dead_mask[i].nonzero().flatten()
        if dead.numel() == 0:
            continue
        err = (y[:, i] - out[:, i])
        weights = (err ** 2).sum(-1).cpu() + 1e-12
        picks = torch.multinomial(weights, dead.numel(), replacement=True, generator=gen)
        xin = x[picks.to(x.device), i] / net.in_scale[i] - net.b_dec[i]
        enc_dir = xin / xin.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        dec_dir = err[picks.to(err.device)]
        dec_dir = dec_dir / dec_dir.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = ~dead_mask[i]
        enc_scale = net.W_enc[i][:, alive].norm(dim=0).mean() if alive.any() else 1.0
        dec_scale = net.W_dec[i][alive].norm(dim=1).mean() if alive.any() else 0.1
        net.W_enc[i][:, dead] = (cfg.resample_scale * enc_scale * enc_dir).T
        net.b_enc[i][dead] = 0.0
        net.W_dec[i][dead] = cfg.resample_scale * dec_scale * dec_dir
        for p, index in ((net.W_enc, (i, slice(None), dead)), (net.b_enc, (i, dead)),
                         (net.W_dec, (i, dead))):
            state = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][index] = 0.0
        since_fired[i, dead] = 0


@torch.no_grad()
def _measure(net: _Layers, buffer: ActivationBuffer, mu: torch.Tensor, cfg: TrainingConfig,
             layers: list[int], device) -> tuple[dict, dict]:
    n, d_sae = net.W_enc.shape[0], net.W_enc.shape[2]
    sq = torch.zeros(n, dtype=torch.float64)
    var = torch.zeros(n, dtype=torch.float64)
    l0 = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, d_sae, dtype=torch.float64)
    total = 0
    xs, ys = buffer.x[:buffer.size], buffer.y[:buffer.size]
    mean_y = ys.mean(0).to(device)
    for start in range(0, xs.shape[0], cfg.batch_size):
        x, y = xs[start:start + cfg.batch_size].to(device), ys[start:start + cfg.batch_size].to(device)
        out, acts = net(x)
        sq += ((out - y) ** 2).sum(-1).sum(0).double().cpu()
        var += ((y - mean_y) ** 2).sum(-1).sum(0).double().cpu()
        fired = (acts > 0)
        l0 += fired.sum(-1).sum(0).double().cpu()
        counts += fired.sum(0).double().cpu()
        total += x.shape[0]
    freq = counts / max(total, 1)
    metrics, freqs = {}, {}
    for i, l in enumerate(layers):
        metrics[l] = {"fvu": float(sq[i] / var[i].clamp_min(1e-12)), "l0": float(l0[i] / total),
                      "mse": float(sq[i] / total),
                      "dead_fraction": float((freq[i] == 0).double().mean()),
                      "n_vectors": total}
        freqs[l] = torch.log10(freq[i].clamp_min(10 ** FREQUENCY_FLOOR)).float()
    return metrics, freqs


# -- writing a set -----------------------------------------------------------------------
def save_transcoder_set(result: TrainingResult | Mapping[int, Transcoder], directory,
                        name: str, model_name: str,
                        log10_frequencies: Mapping[int, torch.Tensor] | None = None,
                        description: str = "", file_tag: str | None = None,
                        extra: Mapping | None = None) -> Path:
    """Write a trained set into ``directory``: the gpt2-small per-layer files,
    their ``_log_feature_sparsity`` files, and ``transcoders.json`` (a registry
    entry), so that ``load_transcoders(directory)`` loads it. Returns the
    path of ``transcoders.json``."""
    if isinstance(result, TrainingResult):
        transcoders, freqs, cfg = result.transcoders, result.log10_frequencies, result.config
    else:
        transcoders, freqs, cfg = dict(result), dict(log10_frequencies or {}), None
    if not transcoders:
        raise InvalidInputError("No transcoders to save.")
    if not isinstance(name, str) or not name or "/" in name:
        raise InvalidInputError(f"name must be a plain set name, got {name!r}.")
    if not isinstance(model_name, str) or not model_name:
        raise InvalidInputError(f"model_name must be the model's name (e.g. 'gpt2'), got {model_name!r}.")
    bad = [l for l, tc in transcoders.items() if not isinstance(tc, Transcoder)]
    if bad:
        raise InvalidInputError(f"save_transcoder_set takes Transcoder objects; layer {bad[0]} holds a "
                                f"{type(transcoders[bad[0]]).__name__}.")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"{directory} is a file, not a folder: give a folder for the set.")
    directory.mkdir(parents=True, exist_ok=True)
    layers = sorted(transcoders)
    first = transcoders[layers[0]]
    d_sae, d_in = first.d_sae, first.d_in
    for l in layers:
        tc = transcoders[l]
        if tc.d_sae != d_sae or tc.d_in != d_in:
            raise InvalidInputError("All transcoders of a set must share d_in and d_sae.")
        if tc.input_hook is None or tc.output_hook is None:
            raise InvalidInputError(f"The transcoder of layer {l} has no input/output hook.")
    in_template = _template(first.input_hook, layers[0])
    out_template = _template(first.output_hook, layers[0])
    tag = file_tag or model_name.replace("/", "-")
    pattern = f"final_sparse_autoencoder_{tag}_{in_template}_{d_sae}.pt"
    freq_pattern = pattern.replace(".pt", "_log_feature_sparsity.pt")
    overrides = {}
    if cfg is not None:
        overrides = dict(l1_coefficient=cfg.l1_coefficient, lr=cfg.lr,
                         lr_warm_up_steps=cfg.warmup_steps, train_batch_size=cfg.batch_size,
                         n_batches_in_buffer=cfg.buffer_batches,
                         total_training_tokens=result.steps * cfg.batch_size,
                         store_batch_size=cfg.model_batch_size, seed=cfg.seed,
                         dead_feature_window=cfg.dead_window,
                         feature_sampling_method="anthropic" if cfg.resample_every else "None",
                         lr_scheduler_name="constantwithwarmup_lineardecay")
    for l in layers:
        tc = transcoders[l]
        write_gpt2_transcoder(tc, directory / pattern.replace("{L}", str(l)), l,
                              model_name=model_name, run_name=name, **overrides)
        if l in freqs:
            write_log_feature_sparsity(freqs[l], directory / freq_pattern.replace("{L}", str(l)))
    entry = {"name": name, "description": description, "model": model_name,
             "format": "gpt2-pickle", "layers": layers, "file_pattern": pattern,
             "input_hook": in_template, "output_hook": out_template, "d_in": d_in, "d_sae": d_sae}
    if all(l in freqs for l in layers):
        entry["frequency_pattern"] = freq_pattern
    if extra:
        entry.update(extra)
    return write_text_atomic(directory / "transcoders.json", json.dumps(entry, indent=2) + "\n")


def _template(hook: str, layer: int) -> str:
    prefix = f"blocks.{layer}."
    if not hook.startswith(prefix):
        raise InvalidInputError(f"Hook {hook!r} is not a per-layer hook of layer {layer}.")
    return "blocks.{L}." + hook[len(prefix):]
