"""The ``tc-explore`` command line: build, merge, inspect and share feature indexes.

    tc-explore index build --model gpt2 --transcoders gpt2-small \\
        --dataset Skylion007/openwebtext --tokens 100M --out idx/ --device cuda
    tc-explore index merge idx-a/ idx-b/ --out idx/
    tc-explore index info idx/
    tc-explore index push idx/ me/gpt2-small-owt-index
    tc-explore index pull me/gpt2-small-owt-index
    tc-explore views build idx/ --model gpt2 --transcoders gpt2-small --device cuda

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``index build`` is a distributed
build: every rank indexes its own shard on its own device and rank 0 merges
them (see ``tc_explore.index``). Running the same command again resumes an
unfinished build where it stopped.

The command line only parses and reports: every step is a library call that
a notebook can make too.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from .errors import TcExploreError

_SUFFIXES = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "b": 10 ** 9,
             "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30}
_COUNT = re.compile(r"\s*(\d[\d_]*(?:\.\d+)?)\s*([a-zA-Z]{0,2})\s*")


def parse_count(text: str) -> int:
    """A token count as people write it: ``65536``, ``100_000``, ``8k``, ``1.5M``,
    ``2G`` (powers of 1000) or ``64Ki``, ``1Mi`` (powers of 1024)."""
    m = _COUNT.fullmatch(str(text))
    if m is None or m[2].lower() not in _SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a count: write an integer with an optional suffix k, M, G "
            "(powers of 1000) or Ki, Mi, Gi (powers of 1024), e.g. 100M or 64Ki.")
    value = Fraction(m[1].replace("_", "")) * _SUFFIXES[m[2].lower()]
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number.")
    value = int(value)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the count must be at least 1.")
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text!r} is too large a count (at most 2**63 - 1).")
    return value


def parse_layers(text: str) -> list[int] | None:
    """``all``, ``5``, ``0,5,11`` or ranges ``0-5,8`` (inclusive)."""
    if text.strip().lower() == "all":
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of layers: write e.g. 'all', '6', '0,5,11' or '0-5,8'.") from None
    if not layers:
        raise argparse.ArgumentTypeError("the list of layers is empty.")
    return layers


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N``: the I-th (from 0) of N shards."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None or not int(m[1]) < int(m[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard: write I/N with 0 <= I < N, e.g. 0/8.")
    return int(m[1]), int(m[2])


def parse_window(text: str) -> tuple[int, int]:
    """``BEFORE,AFTER`` tokens of context stored around each example."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window: write BEFORE,AFTER, e.g. 12,4.")
    return int(m[1]), int(m[2])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1.")
    return value


def _device(text: str) -> str:
    from .model import as_device
    try:
        as_device(text)
    except TcExploreError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _dtype(text: str) -> str:
    if text not in ("float32", "float16", "bfloat16"):
        raise argparse.ArgumentTypeError(f"{text!r}: use float32, float16 or bfloat16.")
    return text


# -- the parser -------------------------------------------------------------------------
def _add_weights_args(p: argparse.ArgumentParser, device_default: str | None = None) -> None:
    p.add_argument("--model", required=True,
                   help="Hub model id (gpt2), local save_pretrained directory, or a registry name")
    p.add_argument("--transcoders", required=True,
                   help="registry name (gpt2-small), Hub repo id or local directory")
    p.add_argument("--revision", help="transcoder repo revision (default: the registry's pin)")
    p.add_argument("--device", type=_device, default=device_default,
                   help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each "
                        "rank takes cuda:LOCAL_RANK)")
    p.add_argument("--dtype", type=_dtype, default="float32",
                   help="weights' dtype: float32 (default), float16 or bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tc-explore", description="Transcoder feature indexes from the command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tc-explore index build --help` etc. for each command's options.")
    top = parser.add_subparsers(dest="group", metavar="{index,views}", required=True)

    index = top.add_parser("index", help="build, merge, inspect and share feature indexes")
    cmds = index.add_subparsers(dest="command", metavar="{build,merge,info,push,pull}", required=True)

    b = cmds.add_parser(
        "build", help="index a corpus (resumes an unfinished build; distributed under torchrun)",
        description="Index --tokens tokens of a corpus into --out. Run the same command again to "
                    "resume an unfinished build. Under torchrun every rank builds one shard "
                    "and rank 0 merges them.")
    _add_weights_args(b)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a datasets dataset: Hub id (Skylion007/openwebtext) or local path")
    src.add_argument("--text-files", nargs="+", metavar="FILE", help="local text files instead")
    b.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    b.add_argument("--split", default="train", help="dataset split (default train)")
    b.add_argument("--text-column", default="text", help="dataset column with the text (default text)")
    b.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="download the whole dataset instead of streaming it")
    b.add_argument("--tokens", type=parse_count, required=True,
                   help="tokens to index, a whole number of sequences: 65536, 8Ki, 100M")
    b.add_argument("--out", required=True, help="the index directory")
    b.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence, BOS included (128)")
    b.add_argument("--batch-size", type=_positive, default=32, help="sequences per forward pass (32)")
    b.add_argument("--layers", type=parse_layers, default=None, help="all (default), 6, 0,5,11 or 0-5")
    b.add_argument("--k", type=_positive, default=20, help="top examples per feature (20)")
    b.add_argument("--n-samples", type=_positive, default=40, help="uniform samples per feature (40)")
    b.add_argument("--window", type=parse_window, default=(12, 4),
                   help="context activations stored around each example, BEFORE,AFTER (12,4)")
    b.add_argument("--seed", type=int, default=0, help="corpus shuffle and sampling seed (0)")
    b.add_argument("--checkpoint-every", type=_positive, default=None,
                   help="batches between checkpoints (default: one every 10 minutes)")
    b.add_argument("--max-batches", type=_positive, default=None,
                   help="stop (checkpointed) after this many new batches; run again to continue")
    b.add_argument("--shard", type=parse_shard, help="build only shard I/N (merge them with `index merge`)")
    b.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    b.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: on, off in CI)")

    m = cmds.add_parser("merge", help="merge finished shards into one index")
    m.add_argument("shards", nargs="+", help="shard directories")
    m.add_argument("--out", required=True, help="the merged index directory")
    m.add_argument("--overwrite", action="store_true", help="replace what is in --out")

    i = cmds.add_parser("info", help="describe an index (finished or not)")
    i.add_argument("index", help="index directory")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    p = cmds.add_parser("push", help="upload an index to a Hub dataset repo, with a dataset card")
    p.add_argument("index", help="index directory")
    p.add_argument("repo_id", help="owner/name of the dataset repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--message", help="commit message")

    q = cmds.add_parser("pull", help="download an index from the Hub into the HF cache; prints its path")
    q.add_argument("repo_id", help="owner/name of the dataset repo")
    q.add_argument("--revision", help="branch, tag or commit")

    views = top.add_parser("views", help="precompute weight-based dashboard sections")
    vcmds = views.add_subparsers(dest="command", metavar="{build}", required=True)
    v = vcmds.add_parser("build", help="store every feature's weight views in <index>/weight_views")
    v.add_argument("index", help="index directory")
    _add_weights_args(v)
    v.add_argument("--k", type=_positive, default=10, help="entries per section (10)")
    v.add_argument("--n-heads", type=_positive, default=3, help="OV heads per feature (3)")
    v.add_argument("--chunk-size", type=_positive, default=1024, help="features per product block (1024)")
    v.add_argument("--overwrite", action="store_true", help="replace existing views")
    v.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: on, off in CI)")
    return parser


# -- commands ---------------------------------------------------------------------------
def _load_weights(args, device: str | None):
    from .hub import load_transcoders
    from .model import load_model
    model = load_model(args.model, device=device, dtype=args.dtype)
    transcoders = load_transcoders(args.transcoders, layers=getattr(args, "layers", None),
                                   revision=args.revision, device=device, dtype=args.dtype)
    return model, transcoders


def _corpus(args, model):
    from .corpus import Corpus
    if args.text_files:
        return Corpus.from_files(args.text_files, model, args.seq_len, seed=args.seed)
    return Corpus.from_hub(args.dataset, model, args.seq_len, split=args.split, name=args.dataset_config,
                           seed=args.seed, text_column=args.text_column, streaming=args.streaming)


def _check_budget(args) -> None:
    if args.tokens >= 2 ** 32:   # before the corpus is tokenized for it (FeatureIndex.build refuses too)
        raise TcExploreError(f"--tokens {args.tokens:,} is too large for one index (at most 2**32 tokens); "
                             "build shards (--shard I/N) and keep them as separate indexes.")
    if args.tokens % args.seq_len:
        lo = args.tokens // args.seq_len * args.seq_len
        raise TcExploreError(
            f"--tokens {args.tokens} is not a whole number of {args.seq_len}-token sequences; an "
            f"index holds whole sequences. Use --tokens {lo or args.seq_len} or "
            f"{lo + args.seq_len}, or another --seq-len.")


def cmd_index_build(args) -> int:
    from .index import FeatureIndex
    from .distributed import Launch, init_process_group
    from .index.distributed import build_distributed
    _check_budget(args)
    settings = dict(layers=args.layers, k=args.k, n_samples=args.n_samples, batch_size=args.batch_size,
                    window=args.window, seed=args.seed, checkpoint_every=args.checkpoint_every,
                    max_batches=args.max_batches, overwrite=args.overwrite, progress=args.progress)
    launch = Launch.from_env()
    if launch is None:
        model, transcoders = _load_weights(args, args.device)
        # Tokenized once into the datasets cache: a resumed build and every shard
        # read these same sequences without streaming the corpus again.
        corpus = _corpus(args, model).cached(args.tokens // args.seq_len, progress=args.progress)
        index = FeatureIndex.build(model, transcoders, corpus, args.tokens, args.out, shard=args.shard,
                                   **settings)
        say = print
    else:
        if args.shard is not None:
            raise TcExploreError("--shard cannot be used under torchrun: each rank builds shard "
                                 "(rank, world size).")
        import torch.distributed as dist
        device = launch.device(args.device)
        init_process_group(device)
        try:
            model, transcoders = _load_weights(args, device)
            index = build_distributed(model, transcoders, _corpus(args, model), args.tokens, args.out,
                                      **settings)
        finally:
            dist.destroy_process_group()
        say = print if launch.rank == 0 else (lambda *a: None)
    if index is None:
        say(f"stopped after --max-batches {args.max_batches}; run the same command again to continue.")
    else:
        say(f"index ready: {index!r}")
    return 0


def cmd_index_merge(args) -> int:
    from .index import FeatureIndex
    index = FeatureIndex.merge(args.shards, args.out, overwrite=args.overwrite)
    print(f"merged {len(args.shards)} shards: {index!r}")
    return 0


def describe(directory: str | os.PathLike) -> str:
    """A human summary of an index directory's manifest, finished or not."""
    from .store import read_manifest
    m = read_manifest(Path(directory), f"{directory} is not a feature index (no manifest.json).")
    corpus = m.get("corpus") if isinstance(m.get("corpus"), dict) else {}
    count = lambda key: f"{m[key]:,}" if isinstance(m.get(key), int) else "?"  # noqa: E731
    state = "complete" if m.get("complete") else (
        f"unfinished: {m.get('batches_done_hint', 0)} of {m.get('n_batches')} batches checkpointed; "
        "run the same build command again to resume")
    lines = [
        f"index        {Path(directory).resolve()}",
        f"state        {state}",
        f"model        {m.get('model')}",
        f"transcoders  {m.get('transcoder_set')} ({m.get('transcoder_repo')} @ {m.get('revision')})",
        f"corpus       {corpus.get('name', corpus.get('kind'))}"
        + "".join(f", {key} {corpus[key]}" for key in ("config", "split", "seed") if corpus.get(key) is not None),
        f"tokens       {count('n_tokens')} ({count('n_sequences')} sequences x {m.get('seq_len')}; "
        f"{count('n_tokens_counted')} counted, BOS left out)",
        f"sequences    {m.get('sequence_start')}..{m.get('sequence_stop')} of {m.get('total_sequences')}",
        f"layers       {m.get('layers')}, features per layer "
        f"{sorted(set(m['d_sae'].values())) if isinstance(m.get('d_sae'), dict) and m['d_sae'] else '?'}",
        f"settings     k {m.get('k')}, samples {m.get('n_samples')}, window {m.get('window')}, "
        f"batch {m.get('batch_size')}, seed {m.get('seed')}",
    ]
    if m.get("built_at"):
        lines.append(f"built        {m['built_at']}")
    size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    lines.append(f"size         {size / 2 ** 20:.1f} MiB on disk")
    views = Path(directory) / "weight_views" / "manifest.json"
    lines.append("weight views " + ("yes" if views.is_file() else "no (tc-explore views build)"))
    return "\n".join(lines)


def cmd_index_info(args) -> int:
    if args.json:
        from .store import read_manifest
        print(json.dumps(read_manifest(Path(args.index), f"{args.index} is not a feature index "
                                       "(no manifest.json)."), indent=2, sort_keys=True))
    else:
        print(describe(args.index))
    return 0


def cmd_index_push(args) -> int:
    from .index import FeatureIndex
    info = FeatureIndex.load(args.index).push_to_hub(args.repo_id, private=args.private or None,
                                                     revision=args.revision, commit_message=args.message)
    print(f"pushed: {getattr(info, 'commit_url', info)}")
    return 0


def cmd_index_pull(args) -> int:
    from .index import FeatureIndex
    index = FeatureIndex.from_hub(args.repo_id, revision=args.revision)
    print(index.directory)
    return 0


def cmd_views_build(args) -> int:
    from .dashboard import add_weight_views
    from .distributed import Launch, init_process_group
    from .index import FeatureIndex
    index = FeatureIndex.load(args.index)
    options = dict(k=args.k, n_heads=args.n_heads, chunk_size=args.chunk_size, overwrite=args.overwrite,
                   progress=args.progress)
    launch = Launch.from_env()
    if launch is None:
        model, transcoders = _load_weights(args, args.device)
        views = add_weight_views(index, model, transcoders, **options)
        print(f"weight views ready: {views!r}")
        return 0
    # Under torchrun every rank computes every world_size-th chunk of features.
    import torch.distributed as dist
    device = launch.device(args.device)
    init_process_group(device)
    try:
        model, transcoders = _load_weights(args, device)
        views = add_weight_views(index, model, transcoders, distributed=True,
                                 **{**options, "progress": args.progress if launch.rank == 0 else False})
    finally:
        dist.destroy_process_group()
    if launch.rank == 0:
        print(f"weight views ready: {views!r}")
    return 0


COMMANDS = {("index", "build"): cmd_index_build, ("index", "merge"): cmd_index_merge,
            ("index", "info"): cmd_index_info, ("index", "push"): cmd_index_push,
            ("index", "pull"): cmd_index_pull, ("views", "build"): cmd_views_build}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.group, args.command](args)
    except TcExploreError as err:
        print(f"tc-explore: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tc-explore: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
