"""The demo model ``tiny-years`` and its transcoders, built from scratch on CPU.

    python -m tc_explore.demo build      # model + transcoders + registry entry (~minutes)
    python -m tc_explore.demo evaluate   # re-measure the shipped files

A GPT-2-architecture model (3 layers, d_model 64, 4 heads, d_mlp 256, context
64, word-level tokenizer from :mod:`tc_explore.tokenization` with one token per
two-digit number) is trained on a synthetic corpus of templated English:

* year ranges -- "The war lasted from the year 1735 to the year 1789." (end
  year uniformly greater than the start year, same century; several templates
  and centuries). The start year's two digits sit four tokens before the
  final century token, so attention has to bring them to the prediction.
* subject-verb agreement -- "The dog runs in the park." / "The dogs run ...".
* counting -- "Mary counted four five six seven."
* copying names -- "Mary and John went to the shop. John gave a book to Mary."
* colour facts -- "The banana is yellow." (one fixed colour per object).

Then transcoders (8x expansion) are trained for every MLP with
:func:`tc_explore.training.train_transcoders`, all layers in one pass.

Held out: the greater-than evaluation prompts use the paper's template with
``(noun, start year)`` pairs that never occur with that template in the
training corpus (about one pair in five).

The build is deterministic (fixed seeds, fixed thread count) and writes
``pretrained/tiny-years/model`` (``save_pretrained``), ``pretrained/tiny-years/
transcoders`` (gpt2-small file layout + ``transcoders.json``), ``pretrained/
tiny-years/metrics.json`` and the registry entry ``pretrained/tiny-years.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import InvalidInputError
from .registry import pretrained_dir
from .tasks import greater_than as gt

NAME = "tiny-years"

ANIMALS = ("dog", "cat", "bird", "horse", "cow", "fox", "wolf", "duck")
VERBS = ("run", "sleep", "sing", "jump", "play", "eat", "swim", "hide")
PLACES = ("park", "garden", "house", "field", "forest", "shop", "school", "river")
PEOPLE = ("Mary", "John", "Anna", "Paul", "Lucy", "Tom", "Emma", "Jack", "Sara", "Mark")
OBJECTS = ("book", "ball", "cup", "pen", "hat", "key", "box", "coin")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
COLOURS = {"banana": "yellow", "sky": "blue", "grass": "green", "snow": "white",
           "coal": "black", "apple": "red", "orange": "orange", "sea": "blue",
           "lemon": "yellow", "cherry": "red", "leaf": "green", "milk": "white",
           "night": "black", "rose": "red", "plum": "purple", "sand": "brown"}
YEAR_TEMPLATES = (
    gt.TEMPLATE + "{zz:02d}.",                                        # the evaluation template
    "The {noun} began in {century}{yy:02d} and ended in {century}{zz:02d}.",
    "The {noun} ran from {century}{yy:02d} to {century}{zz:02d}.",
)
FILLER = ("The", "the", "in", "a", "to", "from", "year", "lasted", "began", "ended", "and",
          "ran", "is", "counted", "went", "gave")


def vocabulary_words() -> list[str]:
    words = list(FILLER) + list(gt.NOUNS) + list(ANIMALS) + [a + "s" for a in ANIMALS]
    words += list(VERBS) + [v + "s" for v in VERBS] + list(PLACES) + list(PEOPLE)
    words += list(OBJECTS) + list(NUMBER_WORDS) + list(COLOURS) + list(COLOURS.values())
    return list(dict.fromkeys(words))


def tokenizer():
    from .tokenization import word_tokenizer
    return word_tokenizer(vocabulary_words())


def is_held_out(noun: str, yy: int) -> bool:
    """(noun, start year) pairs never seen with the evaluation template and
    century 17 in training."""
    return (gt.NOUNS.index(noun) * 7 + yy) % 5 == 0


def held_out_prompts(n: int = 100, seed: int = 1) -> list[gt.GreaterThanPrompt]:
    """``n`` greater-than prompts of held-out (noun, start year) pairs, start
    years 02..98 spread evenly."""
    rng = random.Random(seed)
    years = list(gt.DEFAULT_START_YEARS)
    chosen: list[int] = []
    while len(chosen) < n:
        block = years[:]
        rng.shuffle(block)
        chosen.extend(block)
    pairs = []
    for yy in chosen[:n]:
        nouns = [noun for noun in gt.NOUNS if is_held_out(noun, yy)]
        pairs.append((rng.choice(nouns), yy))
    return gt.prompts_from_pairs(pairs)


class SyntheticSentences:
    """Sentences of the synthetic corpus, drawn with a seeded generator."""
    KINDS = ("years", "agreement", "counting", "names", "colours")
    WEIGHTS = (0.45, 0.14, 0.14, 0.13, 0.14)

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        kind = self.rng.choices(self.KINDS, self.WEIGHTS)[0]
        return getattr(self, "_" + kind)()

    def _years(self) -> str:
        r = self.rng
        while True:
            template = r.randrange(len(YEAR_TEMPLATES))
            noun = r.choice(gt.NOUNS)
            century = 17 if r.random() < 0.5 else r.randint(11, 19)
            yy = r.randint(0, 98)
            if template == 0 and century == 17 and is_held_out(noun, yy):
                continue
            zz = r.randint(yy + 1, 99)
            return YEAR_TEMPLATES[template].format(noun=noun, century=century, yy=yy, zz=zz)

    def _agreement(self) -> str:
        r = self.rng
        animal, verb, place = r.choice(ANIMALS), r.choice(VERBS), r.choice(PLACES)
        if r.random() < 0.5:
            return f"The {animal} {verb}s in the {place}."
        return f"The {animal}s {verb} in the {place}."

    def _counting(self) -> str:
        r = self.rng
        length = r.randint(3, 6)
        start = r.randint(0, len(NUMBER_WORDS) - length)
        return f"{r.choice(PEOPLE)} counted " + " ".join(NUMBER_WORDS[start:start + length]) + "."

    def _names(self) -> str:
        r = self.rng
        a, b = r.sample(PEOPLE, 2)
        return (f"{a} and {b} went to the {r.choice(PLACES)}. "
                f"{b} gave a {r.choice(OBJECTS)} to {a}.")

    def _colours(self) -> str:
        thing = self.rng.choice(sorted(COLOURS))
        return f"The {thing} is {COLOURS[thing]}."

    def windows(self, tok, n: int, n_ctx: int) -> torch.Tensor:
        """[n, n_ctx] token windows: BOS, then whole sentences, the last one
        cut at the window's end."""
        texts = []
        for _ in range(n):
            parts, length = [], 0
            while length < n_ctx:            # each word is at least one token
                s = self.sentence()
                parts.append(s)
                length += len(s.split())
            texts.append(" ".join(parts))
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        out = torch.full((n, n_ctx), tok.bos_token_id, dtype=torch.long)
        for i, seq in enumerate(ids):
            seq = seq[:n_ctx - 1]
            if len(seq) < n_ctx - 1:
                raise InvalidInputError("A corpus window came out shorter than the context.")
            out[i, 1:] = torch.tensor(seq)
        return out


@dataclass
class DemoConfig:
    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 64
    lm_steps: int = 800
    lm_batch: int = 32
    lm_lr: float = 3e-3
    lm_warmup: int = 100
    tc_steps: int = 1000
    tc_batch: int = 512
    tc_lr: float = 2e-3
    tc_l1: float = 0.5
    tc_expansion: int = 8
    seed: int = 0
    # One thread: bitwise reproducible, and on a small shared CPU faster than two
    # (OpenMP threads wait on each other when another process holds a core).
    threads: int = 1
    eval_prompts: int = 100
    eval_windows: int = 64


# -- the language model --------------------------------------------------------------
def train_language_model(cfg: DemoConfig, out_dir: Path, log=print) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    torch.manual_seed(cfg.seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_ctx, n_embd=cfg.d_model,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.bos_token_id, pad_token_id=tok.bos_token_id)
    model = GPT2LMHeadModel(config)
    model.train()
    data = SyntheticSentences(cfg.seed + 1).windows(tok, cfg.lm_steps * cfg.lm_batch, cfg.n_ctx)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lm_lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < cfg.lm_warmup:
            return (step + 1) / cfg.lm_warmup
        progress = (step - cfg.lm_warmup) / max(1, cfg.lm_steps - cfg.lm_warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    from .progress import progress_bar
    bar = progress_bar(range(cfg.lm_steps), desc="language model", unit="step")
    running = None
    for step in bar:
        batch = data[step * cfg.lm_batch:(step + 1) * cfg.lm_batch]
        for g in opt.param_groups:
            g["lr"] = cfg.lm_lr * lr_at(step)
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
    bar.close()
    log(f"language model: final training loss {running:.3f}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# -- evaluation ------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, transcoders, cfg: DemoConfig | None = None) -> dict:
    """The numbers the build prints and the tests check, on held-out data:
    greater-than probability difference (original, every MLP replaced, each
    MLP replaced alone), per-layer FVU and mean L0 of the transcoders on fresh
    corpus windows, and the next-token loss with and without replacement."""
    from .replacement import transcoder_hooks

    cfg = cfg or DemoConfig()
    prompts = gt.tokenize_prompts(model, held_out_prompts(cfg.eval_prompts))
    pd_orig = gt.probability_difference(model, prompts)
    pd_repl = gt.probability_difference(model, prompts,
                                        fwd_hooks=transcoder_hooks(model, transcoders))
    pd_single = {l: gt.probability_difference(
        model, prompts, fwd_hooks=transcoder_hooks(model, transcoders, layers=[l]))
        for l in transcoders.layers}
    tok = model.tokenizer
    windows = SyntheticSentences(cfg.seed + 1000).windows(tok, cfg.eval_windows, int(model.cfg.n_ctx))
    names = {transcoders.input_hook(l) for l in transcoders.layers} | \
        {transcoders.output_hook(l) for l in transcoders.layers}
    loss_orig, cache = model.run_with_cache(windows, names_filter=lambda n: n in names,
                                            return_type="loss")
    loss_repl = model.run_with_hooks(windows, return_type="loss",
                                     fwd_hooks=transcoder_hooks(model, transcoders))
    layers = {}
    for l in transcoders.layers:
        x = cache[transcoders.input_hook(l)].reshape(-1, model.cfg.d_model)
        y = cache[transcoders.output_hook(l)].reshape(-1, model.cfg.d_model)
        out, acts = transcoders[l](x)
        fvu = ((out - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        freq = (acts > 0).float().mean(0)
        layers[l] = {"fvu": float(fvu), "l0": float((acts > 0).float().sum(-1).mean()),
                     "dead_fraction": float((freq == 0).float().mean()),
                     "pd_replaced_alone": pd_single[l]}
    return {"prob_diff_original": pd_orig, "prob_diff_replaced": pd_repl,
            "prob_diff_ratio": pd_repl / pd_orig if pd_orig else float("nan"),
            "loss_original": float(loss_orig), "loss_replaced": float(loss_repl),
            "n_prompts": len(prompts), "n_eval_tokens": int(windows.numel()),
            "layers": layers}


def format_report(m: dict) -> str:
    lines = [f"greater-than probability difference (held-out, {m['n_prompts']} prompts): "
             f"original {m['prob_diff_original']:.3f}, all MLPs replaced "
             f"{m['prob_diff_replaced']:.3f} ({100 * m['prob_diff_ratio']:.1f}% of original)",
             f"next-token loss on {m['n_eval_tokens']} held-out tokens: original "
             f"{m['loss_original']:.3f}, all MLPs replaced {m['loss_replaced']:.3f}"]
    for l, d in m["layers"].items():
        lines.append(f"  layer {l}: FVU {d['fvu']:.4f}  mean L0 {d['l0']:.1f}  "
                     f"dead {100 * d['dead_fraction']:.1f}%  prob diff with only this MLP "
                     f"replaced {d['pd_replaced_alone']:.3f}")
    return "\n".join(lines)


# -- the build ------------------------------------------------------------------------------
def build(out_root: str | os.PathLike | None = None, cfg: DemoConfig | None = None,
          log=print) -> dict:
    """Train the model and its transcoders, write them under ``out_root``
    (default: tc_explore's ``pretrained`` directory), print and return the
    evaluation. Deterministic for a given config and thread count."""
    cfg = cfg or DemoConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _build(Path(out_root) if out_root is not None else pretrained_dir(), cfg, log)
    finally:
        torch.set_num_threads(threads)


def _build(out_root: Path, cfg: DemoConfig, log) -> dict:
    from .model import load_model
    from .hub import load_transcoders
    from .training import TrainingConfig, save_transcoder_set, train_transcoders

    t0 = time.time()
    staging = out_root / f"{NAME}.building"
    shutil.rmtree(staging, ignore_errors=True)
    model_dir = train_language_model(cfg, staging / "model", log)
    t_lm = time.time() - t0
    log(f"language model trained in {t_lm:.0f} s")

    model = load_model(str(model_dir), device="cpu")
    tokens = SyntheticSentences(cfg.seed + 2).windows(model.tokenizer, cfg.tc_steps * cfg.tc_batch //
                                          cfg.n_ctx + 16 * cfg.tc_batch // cfg.n_ctx + 64,
                                          cfg.n_ctx)
    tcfg = TrainingConfig(n_steps=cfg.tc_steps, batch_size=cfg.tc_batch, lr=cfg.tc_lr,
                          l1_coefficient=cfg.tc_l1, expansion_factor=cfg.tc_expansion,
                          warmup_steps=50, l1_warmup_steps=cfg.tc_steps // 5,
                          buffer_batches=16, model_batch_size=64, dead_window=300,
                          resample_every=300, resample_until=0.6, seed=cfg.seed)
    result = train_transcoders(model, tokens, tcfg)
    t_tc = time.time() - t0 - t_lm
    log(f"transcoders trained in {t_tc:.0f} s")
    tc_dir = staging / "transcoders"
    save_transcoder_set(result, tc_dir, name=NAME, model_name=NAME,
                        description="Transcoders for every MLP of the tiny-years demo model.")
    transcoders = load_transcoders(str(tc_dir), device="cpu")
    metrics = evaluate(model, transcoders, cfg)
    metrics["build_seconds"] = {"language_model": round(t_lm, 1), "transcoders": round(t_tc, 1),
                                "total": round(time.time() - t0, 1)}
    metrics["training_metrics"] = {str(l): v for l, v in result.metrics.items()}
    metrics["config"] = asdict(cfg)
    metrics["layers"] = {str(l): v for l, v in metrics["layers"].items()}
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    final = out_root / NAME
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    entry = json.loads((final / "transcoders" / "transcoders.json").read_text())
    entry.update({"description": "Demo: a 3-layer GPT-2-architecture model trained on templated "
                                 "English with year ranges (greater-than), and transcoders for "
                                 "every MLP; ships with tc_explore, works offline.",
                  "local_dir": f"{NAME}/transcoders", "model_dir": f"{NAME}/model"})
    (out_root / f"{NAME}.json").write_text(json.dumps(entry, indent=2) + "\n")
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    metrics["shipped_bytes"] = size
    log(format_report(metrics))
    log(f"build time {metrics['build_seconds']['total']:.0f} s; wrote {final} "
        f"({size / 1e6:.2f} MB) and {out_root / (NAME + '.json')}")
    from .registry import registry
    registry.cache_clear()  # the new registry entry is visible to load_transcoders at once
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tc_explore.demo",
                                     description="Build or evaluate the tiny-years demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the model and transcoders, write them")
    b.add_argument("--out", default=None, help="directory to write into (default: "
                                               "tc_explore's pretrained directory)")
    sub.add_parser("evaluate", help="measure the shipped model and transcoders")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out)
    else:
        from .hub import load_transcoders
        from .model import load_model
        torch.set_num_threads(DemoConfig().threads)
        print(format_report(evaluate(load_model(NAME, device="cpu"),
                                     load_transcoders(NAME, device="cpu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
