"""Test support: tiny models and transcoders in the exact published layouts,
served from a Hugging Face cache directory so that ``load_model("gpt2")`` and
``load_transcoders("gpt2-small")`` run through huggingface_hub offline exactly
as they do for users.

    hub = build_offline_hub("/tmp/hf")        # then set HF_HOME=/tmp/hf, HF_HUB_OFFLINE=1
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import write_circuit_tracer_safetensors, write_gpt2_transcoder, write_log_feature_sparsity
from .tokenization import word_tokenizer
from .transcoder import Transcoder

FIXTURE_WORDS = ("The war lasted from to and the year was in a it had been cat sat on mat dog "
                 "ran fast slow big small red blue house tree when where what who is are").split()


def fixture_texts(n: int, seed: int = 0, max_words: int = 20) -> list[str]:
    """``n`` seeded random sentences of 2..max_words-1 fixture words (test corpora)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(FIXTURE_WORDS, rng.integers(2, max_words))) for _ in range(n)]


def assert_our_error(call, error: type, names: str) -> Exception:
    """Run ``call()`` and check that it raises one of our errors, of type
    ``error``, whose message contains ``names`` (the bad input it names): the
    one rule of every bad-input test. Returns the error."""
    from .errors import TcExploreError
    try:
        call()
    except TcExploreError as raised:
        assert isinstance(raised, error), f"{type(raised).__name__}: {raised}"
        assert names in str(raised), str(raised)
        return raised
    raise AssertionError(f"no error raised; expected {error.__name__} naming {names!r}")


def build_tiny_gpt2(directory: str | Path, n_layers: int = 2, d_model: int = 32,
                    n_heads: int = 4, n_ctx: int = 32, seed: int = 0,
                    words=FIXTURE_WORDS, random_biases: bool = False) -> Path:
    """A randomly initialised GPT-2-architecture model with our word tokenizer,
    saved with ``save_pretrained`` into ``directory``. ``random_biases`` also
    draws every attention and MLP bias (transformers initialises them to 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = word_tokenizer(words)
    bos = tokenizer.bos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_ctx, n_embd=d_model,
                        n_layer=n_layers, n_head=n_heads, bos_token_id=bos, eos_token_id=bos,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    # Larger-than-default LayerNorm gains and biases, so weight folding matters in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif random_biases and name.endswith("bias"):
                p.normal_(0.0, 0.1)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ARCHITECTURES = ("gpt2", "llama", "qwen3", "gemma2")


def build_tiny_model(directory: str | Path, arch: str, n_layers: int = 2, d_model: int = 64,
                     n_heads: int = 4, n_kv_heads: int = 2, n_ctx: int = 64, seed: int = 0,
                     words=FIXTURE_WORDS) -> Path:
    """A randomly initialised model of architecture ``arch`` (one of
    ``ARCHITECTURES``), built from transformers' own config class, with our word
    tokenizer, saved with ``save_pretrained`` into ``directory``.

    Every norm gain and every bias is randomised (not left at 1 / 0), so that a
    mistake in how the decomposition treats a gain or bias cannot cancel out.
    Llama has untied embeddings, grouped-query attention and attention
    biases; Qwen 3 has QK-norm and grouped-query attention; Gemma 2 has pre-
    and post-norms, scaled embeddings, attention and final-logit softcapping
    and alternating sliding-window attention."""
    if arch == "gpt2":
        return build_tiny_gpt2(directory, n_layers, d_model, n_heads, n_ctx, seed, words,
                               random_biases=True)
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)
    tokenizer = word_tokenizer(words)
    bos = tokenizer.bos_token_id
    d_head = d_model // n_heads
    common = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads,
                  num_key_value_heads=n_kv_heads, head_dim=d_head, max_position_embeddings=n_ctx,
                  bos_token_id=bos, eos_token_id=bos, pad_token_id=bos, attention_dropout=0.0)
    if arch == "llama":
        config, cls = LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True), LlamaForCausalLM
    elif arch == "qwen3":
        config, cls = Qwen3Config(**common, tie_word_embeddings=True), Qwen3ForCausalLM
    elif arch == "gemma2":
        config, cls = Gemma2Config(**common, query_pre_attn_scalar=d_head, sliding_window=4,
                                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                   tie_word_embeddings=True), Gemma2ForCausalLM
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}.")
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
        # Larger-than-default embeddings, so the residual stream is not dominated by eps;
        # the BOS token doubles as padding, whose row transformers initialises to zero
        # (a zero residual at BOS, an RMS scale of sqrt(eps)): give it a random row.
        emb = model.get_input_embeddings().weight
        emb.mul_(10.0)
        emb[bos].normal_(0.0, 0.2)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def mlp_io(model, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP of ``layer``'s input (``ln2.hook_normalized``) and output
    (``hook_mlp_out``) on ``tokens``, from one cached forward pass."""
    from .model import hook_ln2_normalized, hook_mlp_out
    names = [hook_ln2_normalized(layer), hook_mlp_out(layer)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return cache[names[0]], cache[names[1]]


def random_transcoder(d_model: int, d_sae: int, layer: int, seed: int = 0,
                      jumprelu: bool = False, skip: bool = False, centred: bool = True,
                      l0: float | None = None) -> Transcoder:
    """Random weights scaled so that a fraction of features fire on unit-RMS
    inputs; with ``l0``, about ``l0`` features per token (the realistic sparsity
    the benchmarks need: trained transcoders fire ~20-150 features a token)."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    W_enc = torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5
    W_dec = torch.randn(d_sae, d_model, generator=g) / d_sae ** 0.5
    b_enc = 0.3 * torch.randn(d_sae, generator=g) - 0.2
    if l0 is not None:
        # Pre-activations are about N(b_enc, 1) on unit-RMS inputs: shift the
        # bias so that a fraction l0 / d_sae of features fire.
        from statistics import NormalDist
        b_enc.sub_(b_enc.mean() + NormalDist().inv_cdf(1 - l0 / d_sae))
    b_dec = 0.1 * torch.randn(d_model, generator=g) if centred else None
    b_dec_out = 0.1 * torch.randn(d_model, generator=g)
    threshold = 0.2 * torch.rand(d_sae, generator=g) if jumprelu else None
    W_skip = 0.05 * torch.randn(d_model, d_model, generator=g) if skip else None
    return Transcoder(W_enc, b_enc, W_dec, b_dec, b_dec_out, threshold=threshold, W_skip=W_skip,
                      layer=layer)


def install_in_hf_cache(hf_home: str | Path, repo_id: str, files: dict[str, Path | bytes],
                        revision: str | None = None, repo_type: str = "model",
                        ref: str = "main", lfs_suffixes: tuple[str, ...] | None = None) -> Path:
    """Place ``files`` (name in repo -> local path or contents) into the standard
    cache layout ``hub/{models,datasets}--OWNER--NAME/{blobs,snapshots/REV,refs/REF}``,
    as huggingface_hub itself lays out a download of commit ``revision`` of
    branch ``ref``. Blobs are named by their sha256, as LFS files are; with
    ``lfs_suffixes``, files with other suffixes are named by their git blob
    sha1, as the Hub names small files kept in git. Returns the snapshot dir."""
    repo_dir = Path(hf_home) / "hub" / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    commit = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    for name, src in files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        if lfs_suffixes is None or Path(name).suffix in lfs_suffixes:
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        else:
            blob = repo_dir / "blobs" / hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


@dataclass
class OfflineHub:
    hf_home: Path
    model_repo: str
    transcoder_repo: str
    revision: str
    n_layers: int
    d_model: int
    d_sae: int


def write_gpt2_small_transcoders(entry, work: Path, n_layers: int, d_model: int, d_sae: int, seed: int,
                                 l0: float | None = None) -> tuple[dict[str, Path], dict[int, Transcoder]]:
    """Random transcoders (``random_transcoder``, ``l0`` as there) written under
    ``work`` in the ``pchlenski/gpt2-transcoders`` layout of registry ``entry``
    (a pickle and a log-sparsity file per layer): the files by their Hub names,
    and the transcoders by layer."""
    files: dict[str, Path] = {}
    transcoders: dict[int, Transcoder] = {}
    g = torch.Generator().manual_seed(seed)
    for layer in range(n_layers):
        tc = transcoders[layer] = random_transcoder(d_model, d_sae, layer, seed, l0=l0)
        name = entry.file_pattern.replace("{L}", str(layer))
        files[name] = write_gpt2_transcoder(tc, work / name, layer, model_name="gpt2-small")
        fname = entry.frequency_pattern.replace("{L}", str(layer))
        files[fname] = write_log_feature_sparsity(-1 - 3 * torch.rand(d_sae, generator=g), work / fname)
    return files, transcoders


def build_offline_hub(hf_home: str | Path, n_layers: int = 12, d_model: int = 32,
                      d_sae: int = 64, n_ctx: int = 32, seed: int = 0,
                      words=FIXTURE_WORDS) -> OfflineHub:
    """A tiny ``gpt2`` and ``pchlenski/gpt2-transcoders`` (at the registry's
    pinned revision, with the published file names, pickled config objects and
    log-sparsity files) in a Hugging Face cache under ``hf_home``."""
    from .registry import registry

    entry = registry()["gpt2-small"]
    work = Path(tempfile.mkdtemp(prefix="tc_explore_fixture_"))
    try:
        model_dir = build_tiny_gpt2(work / "model", n_layers, d_model, n_ctx=n_ctx, seed=seed, words=words)
        install_in_hf_cache(hf_home, "gpt2", {p.name: p for p in model_dir.iterdir()})
        files, _ = write_gpt2_small_transcoders(entry, work, n_layers, d_model, d_sae, seed)
        install_in_hf_cache(hf_home, entry.repo_id, files, revision=entry.revision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return OfflineHub(Path(hf_home), "gpt2", entry.repo_id, entry.revision, n_layers, d_model, d_sae)


# The GPT-2 notebooks' corpus: the first 2000 documents of this dataset (make_notebooks.py).
OPENWEBTEXT_SLICE = ("Skylion007/openwebtext", 2000)


def install_hub_slice(hf_home: str | Path, path: str, n_documents: int, texts: list[str],
                      text_column: str = "text") -> Path:
    """Place ``texts`` where ``corpus.hub_slice(path, n_documents)`` keeps the
    slice it downloads once, in ``hf_home``'s ``datasets`` cache: later reads
    find it there exactly as after a real download. Returns its directory."""
    import datasets

    from .corpus import hub_slice_directory

    if len(texts) != n_documents:
        raise ValueError(f"{len(texts)} texts for a slice of {n_documents} documents")
    relative = hub_slice_directory(path, n_documents, text_column=text_column).relative_to(
        datasets.config.HF_DATASETS_CACHE)
    directory = Path(hf_home) / "datasets" / relative
    if not (directory / "dataset_info.json").is_file():
        datasets.Dataset.from_dict({text_column: list(texts)}).save_to_disk(str(directory))
    return directory


def build_gpt2_notebook_hub(hf_home: str | Path, n_layers: int = 12, d_model: int = 32,
                            d_sae: int = 64, n_ctx: int = 128, seed: int = 0) -> OfflineHub:
    """Everything ``make gpt2`` (the notebooks with ``TC_EXPLORE_DEMO=0``) reads
    from the Hugging Face cache, tiny and offline: ``build_offline_hub``'s
    ``gpt2`` and ``pchlenski/gpt2-transcoders`` (context 128, the notebooks'
    sequence length) and an OpenWebText-like slice (fixture sentences of up to
    200 words) under ``OPENWEBTEXT_SLICE``'s id. Run the notebooks against it
    with ``HF_HOME=<hf_home> HF_HUB_OFFLINE=1 make gpt2``. The tokenizer also
    knows the greater-than task's words (its prompts tokenize as on GPT-2)."""
    from .tasks.greater_than import NOUNS, TEMPLATE

    words = tuple(dict.fromkeys([*FIXTURE_WORDS, *NOUNS, *TEMPLATE.replace("{", " {").split()]))
    words = tuple(w for w in words if "{" not in w)
    hub = build_offline_hub(hf_home, n_layers, d_model, d_sae, n_ctx, seed, words=words)
    path, n_documents = OPENWEBTEXT_SLICE
    install_hub_slice(hf_home, path, n_documents, fixture_texts(n_documents, seed=seed, max_words=200))
    return hub


# -- other architectures: a tiny model and its transcoder set in the published layout ------
# arch -> (the model's Hub id, the registry name of its transcoder set). GPT-2 is
# served under its canonical id, "openai-community/gpt2" (the Hub redirects "gpt2"
# there), because the session-wide fixture (``build_offline_hub``) already serves a
# different tiny model as "gpt2".
ARCH_FIXTURES = {
    "gpt2": ("openai-community/gpt2", "gpt2-small"),
    "gemma2": ("google/gemma-2-2b", "gemma-scope-2b"),
    "llama": ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
    "qwen3": ("Qwen/Qwen3-0.6B", "qwen3-0.6b"),
}


@dataclass
class ArchitectureHub:
    arch: str
    model_repo: str
    set_name: str
    n_layers: int
    d_model: int
    d_sae: int
    transcoders: dict[int, Transcoder]     # the weights written, by layer
    files: dict[int, str]                  # layer -> "repo_id:path" of its file
    revision: str | None = None            # pass to load_transcoders (None: the registry's)


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def build_architecture_hub(hf_home: str | Path, arch: str, n_layers: int = 3, d_model: int = 64,
                           d_sae: int = 96, seed: int = 0) -> ArchitectureHub:
    """A tiny ``arch`` model (:func:`build_tiny_model`) under its real Hub id
    (``ARCH_FIXTURES``) and its registry transcoder set in that set's exact
    published layout, in a Hugging Face cache under ``hf_home``:

    * ``gemma2``: ``mwhanna/gemma-scope-transcoders``: ``config.yaml`` plus
      ``layer_{L}.safetensors`` (circuit-tracer layout, JumpReLU threshold under
      ``activation_function.threshold``), as that repo holds the Gemma Scope
      transcoders converted (docs/transcoder_layouts.md; the ``hf://`` list of
      Gemma Scope ``params.npz`` files that ``mntss/gemma-scope-transcoders``
      uses is tested in tests/test_formats.py);
    * ``llama``: ``mntss/transcoder-Llama-3.2-1B``, the same layout, every layer
      a skip transcoder (``W_skip``), ReLU;
    * ``qwen3``: ``mwhanna/qwen3-0.6b-transcoders-lowl0``, the same layout, ReLU;
    * ``gpt2``: ``pchlenski/gpt2-transcoders``'s pickles and log-sparsity files
      (the registry's file names), at a revision of their own
      (``ArchitectureHub.revision``, on a branch other than ``main``), since the
      session-wide fixture serves that repo's pinned revision at another width.
    """
    from .formats import write_circuit_tracer_safetensors
    from .registry import registry

    model_repo, set_name = ARCH_FIXTURES[arch]
    entry = registry()[set_name]
    work = Path(tempfile.mkdtemp(prefix=f"tc_explore_{arch}_"))
    written: dict[int, Transcoder] = {}
    where: dict[int, str] = {}
    revision = None
    try:
        model_dir = build_tiny_model(work / "model", arch, n_layers, d_model, seed=seed)
        install_in_hf_cache(hf_home, model_repo, {p.name: p for p in model_dir.iterdir()})
        if arch == "gpt2":
            revision = hashlib.sha1(f"tc_explore tiny gpt2 d{d_model} L{n_layers}".encode()).hexdigest()
            files, written = write_gpt2_small_transcoders(entry, work, n_layers, d_model, d_sae, seed)
            where = {layer: f"{entry.repo_id}:{entry.file_pattern.replace('{L}', str(layer))}"
                     for layer in written}
            install_in_hf_cache(hf_home, entry.repo_id, files, revision=revision, ref="tiny-architectures")
        else:
            # the hooks as each published config.yaml names them
            hooks = {"gemma2": ("ln2.hook_normalized", "hook_mlp_out"),
                     "llama": ("hook_resid_mid", "hook_mlp_out"),
                     "qwen3": ("mlp.hook_in", "mlp.hook_out")}[arch]
            files = {"config.yaml": _write_yaml(work / "config.yaml", dict(
                model_name=entry.model, model_kind="transcoder_set",
                feature_input_hook=hooks[0], feature_output_hook=hooks[1]))}
            for layer in range(n_layers):
                tc = random_transcoder(d_model, d_sae, layer, seed, skip=(arch == "llama"),
                                       jumprelu=(arch == "gemma2"), centred=False)
                if arch == "llama":       # the raw residual stream is small: scale the encoder up
                    with torch.no_grad():
                        tc.W_enc.mul_(4.0)
                name = f"layer_{layer}.safetensors"
                files[name] = write_circuit_tracer_safetensors(tc, work / name)
                written[layer], where[layer] = tc, f"{entry.repo_id}:{name}"
            install_in_hf_cache(hf_home, entry.repo_id, files, revision=entry.revision
                                if entry.revision and len(entry.revision) == 40 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ArchitectureHub(arch, model_repo, set_name, n_layers, d_model, d_sae, written, where, revision)


# arch -> the registry name of its cross-layer transcoder
CLT_FIXTURES = {"gemma2": "clt-gemma-2-2b-426k", "llama": "clt-llama-3.2-1b-524k"}


def random_clt(d_model: int, d_sae: int, n_layers: int, seed: int = 0, jumprelu: bool = False,
               enc_scale: float = 1.0) -> dict[str, list[torch.Tensor]]:
    """Random cross-layer transcoder weights (``write_clt``'s arguments): each
    layer's features decode into every later layer, with negative encoder
    biases so that a fraction of the features fire."""
    g = torch.Generator().manual_seed(seed + 7)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    for layer in range(n_layers):
        out["W_enc"].append(enc_scale * torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5)
        out["b_enc"].append(0.3 * torch.randn(d_sae, generator=g) - 1.0)
        out["W_dec"].append(torch.randn(d_sae, n_layers - layer, d_model, generator=g) / d_sae ** 0.5)
        out["b_dec"].append(0.1 * torch.randn(d_model, generator=g))
        out["threshold"].append(0.2 * torch.rand(d_sae, generator=g))
    if not jumprelu:
        del out["threshold"]
    return out


def build_clt_hub(hf_home: str | Path, arch: str, n_layers: int = 3, d_model: int = 64,
                  d_sae: int = 200, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """The registry CLT of ``arch`` (``CLT_FIXTURES``) in circuit-tracer's layout
    (``config.yaml`` + ``W_enc_{L}`` / ``W_dec_{L}.safetensors``) in the cache
    under ``hf_home``; the tiny model comes from :func:`build_architecture_hub`.
    Returns the weights written."""
    from .formats.clt import write_clt
    from .hub import registry

    entry = registry()[CLT_FIXTURES[arch]]
    # It reads the raw residual stream: small for Llama, large (scaled embeddings) for Gemma.
    # The published Llama CLT is JumpReLU (threshold_{L}); the Gemma one has no
    # threshold in its encoder files, so ReLU (docs/transcoder_layouts.md).
    weights = random_clt(d_model, d_sae, n_layers, seed, jumprelu=(arch == "llama"),
                         enc_scale=4.0 if arch == "llama" else 0.5)
    work = Path(tempfile.mkdtemp(prefix=f"tc_explore_clt_{arch}_"))
    try:
        files = {p.name: p for p in write_clt(work, **weights)}
        files["config.yaml"] = _write_yaml(work / "config.yaml", dict(
            model_name=entry.model, model_kind="cross_layer_transcoder",
            feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out"))
        install_in_hf_cache(hf_home, entry.repo_id, files, revision=entry.revision
                            if entry.revision and len(entry.revision) == 40 else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return weights


# -- models and transcoders that both tc_explore and circuit-tracer load -------------------
# arch -> the Hub id under which TransformerLens 2 (and so circuit-tracer) builds the
# model from its config.json (Llama 3.2 and Gemma 2 it builds from hard-coded real
# shapes, so a tiny model cannot stand in for them there).
CIRCUIT_TRACER_MODELS = {"gpt2": "gpt2", "qwen3": "Qwen/Qwen3-0.6B"}
CIRCUIT_TRACER_KINDS = ("plt", "skip", "clt")


def as_published_config(model_dir: str | Path) -> None:
    """Make a model saved by transformers 5 readable by the transformers 4 and
    TransformerLens 2 that circuit-tracer pins, as the published files are:
    the tokenizer class under a name both know, GPT-2's ``n_ctx`` and a
    top-level ``rope_theta`` (transformers 5 writes neither)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer_config.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"      # transformers 5: "TokenizersBackend"
    path.write_text(json.dumps(tok, indent=2), encoding="utf-8")
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") == "gpt2":
        cfg.setdefault("n_ctx", cfg["n_positions"])
    if "rope_theta" in (cfg.get("rope_parameters") or {}):
        cfg.setdefault("rope_theta", cfg["rope_parameters"]["rope_theta"])
    path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


@dataclass
class CircuitTracerHub:
    """What :func:`build_circuit_tracer_hub` put in the cache under ``hf_home``:
    the model (Hub id ``model_repo``, snapshot ``model_dir``) and its
    transcoders (``transcoder_repo``, snapshot ``transcoder_dir``)."""
    hf_home: Path
    arch: str
    kind: str
    model_repo: str
    model_dir: Path
    transcoder_repo: str
    transcoder_dir: Path
    n_layers: int
    d_model: int
    d_sae: int
    input_hook: str
    output_hook: str


def build_circuit_tracer_hub(hf_home: str | Path, arch: str = "gpt2", kind: str = "plt",
                             n_layers: int = 4, d_model: int = 64, d_sae: int = 256,
                             input_hook: str | None = None, output_hook: str = "hook_mlp_out",
                             enc_bias: float | None = None, seed: int = 0) -> CircuitTracerHub:
    """A tiny ``arch`` model (``CIRCUIT_TRACER_MODELS``: its Hub id is the one
    TransformerLens loads for the real model) with every norm gain and bias
    randomised, and transcoders for it in circuit-tracer's own layout, in a
    Hugging Face cache under ``hf_home``; circuit-tracer loads both by Hub id
    (``ReplacementModel.from_pretrained``), tc_explore the same files.

    ``kind``: ``plt`` (per-layer transcoders, ``config.yaml`` +
    ``layer_{L}.safetensors``; layer 1 JumpReLU, the others ReLU), ``skip``
    (the same with a skip connection in every layer: circuit-tracer takes a
    set's skip flag from its first layer) or ``clt`` (a JumpReLU cross-layer
    transcoder, ``W_enc_{L}`` / ``W_dec_{L}.safetensors``). ``input_hook``
    defaults to ``hook_resid_mid`` for GPT-2 (see docs/circuit_tracer.md on
    ``ln2.hook_normalized``) and the CLT, ``mlp.hook_in`` for Qwen 3 (as its
    published sets). Encoder biases are negative (centred at ``enc_bias``;
    by default chosen per input so that 5-20 % of the features fire on these
    random weights, rather than the ~40 % of zero-centred random biases)."""
    from .formats.clt import write_clt
    if arch not in CIRCUIT_TRACER_MODELS or kind not in CIRCUIT_TRACER_KINDS:
        raise ValueError(f"arch must be one of {sorted(CIRCUIT_TRACER_MODELS)} and kind one of "
                         f"{CIRCUIT_TRACER_KINDS}; got {arch!r}, {kind!r}.")
    if input_hook is None:
        input_hook = "mlp.hook_in" if arch == "qwen3" and kind != "clt" else "hook_resid_mid"
    if enc_bias is None:        # Qwen 3's norm output (gain applied) is larger than the residual
        enc_bias = -1.5 if input_hook == "mlp.hook_in" else -0.3
    model_repo = CIRCUIT_TRACER_MODELS[arch]
    transcoder_repo = f"tc-explore-fixtures/{arch}-tiny-{kind}"
    work = Path(tempfile.mkdtemp(prefix="tc_explore_ct_fixture_"))
    try:
        if arch == "gpt2":
            model_dir = build_tiny_gpt2(work / "model", n_layers, d_model, 4, 32, seed, random_biases=True)
        else:
            model_dir = build_tiny_model(work / "model", arch, n_layers, d_model, seed=seed)
        as_published_config(model_dir)
        model_snapshot = install_in_hf_cache(hf_home, model_repo, {p.name: p for p in model_dir.iterdir()})
        config = dict(model_name=model_repo, model_kind="cross_layer_transcoder" if kind == "clt"
                      else "transcoder_set", feature_input_hook=input_hook, feature_output_hook=output_hook)
        files = {"config.yaml": _write_yaml(work / "config.yaml", config)}
        if kind == "clt":
            weights = random_clt(d_model, d_sae, n_layers, seed, jumprelu=True)
            for b in weights["b_enc"]:
                b.add_(enc_bias + 1.0)                # random_clt centres them at -1
            files.update({p.name: p for p in write_clt(work / "clt", **weights)})
        else:
            for layer in range(n_layers):
                tc = random_transcoder(d_model, d_sae, layer, seed, jumprelu=(layer == 1),
                                       skip=(kind == "skip"), centred=False)
                with torch.no_grad():
                    tc.b_enc.add_(enc_bias + 0.2)    # random_transcoder centres them at -0.2
                name = f"layer_{layer}.safetensors"
                files[name] = write_circuit_tracer_safetensors(tc, work / name)
        tc_snapshot = install_in_hf_cache(hf_home, transcoder_repo, files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return CircuitTracerHub(Path(hf_home), arch, kind, model_repo, model_snapshot, transcoder_repo,
                            tc_snapshot, n_layers, d_model, d_sae, input_hook, output_hook)
