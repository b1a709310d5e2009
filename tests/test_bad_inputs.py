"""Bad inputs across the public API: each must raise one of our errors (never a
bare traceback from torch, numpy, pyarrow, json or yaml, never a silently wrong
result), with a message that names the input. Runs on the demo model
``tiny-years`` (3 layers, d_model 64, 512 features, vocabulary 513)."""
import json
import os
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tc_explore import load_model, load_transcoders
from tc_explore.circuits import (Node, Target, decompose, feature_target, logit_diff_target,
                                 prompt_context, residual_target)
from tc_explore.corpus import Corpus, as_corpus
from tc_explore.search import search_features
from tc_explore.errors import (CorruptFileError, IncompatibleTranscoderError, InvalidInputError,
                               OfflineFileMissingError, StorageError,
                               UnknownTranscoderSetError, UnsafeFileError)
from tc_explore.demo import SyntheticSentences
from tc_explore.index import FeatureIndex
from tc_explore.formats import (read_circuit_tracer_config, read_circuit_tracer_safetensors,
                                read_gemma_scope_npz, read_gpt2_transcoder,
                                write_circuit_tracer_safetensors, write_gemma_scope_npz,
                                write_gpt2_transcoder)
from tc_explore.model import check_layer, to_tokens
from tc_explore.prompt_features import feature_activations, run_prompt
from tc_explore.testing import assert_our_error, build_tiny_gpt2, random_transcoder

PROMPT = "The war lasted from 1735 to 17"
GPT2_NAME = "final_sparse_autoencoder_gpt2-small_blocks.0.ln2.hook_normalized_24576.pt"


INDEX = dict(k=3, n_samples=3, batch_size=4, window=(2, 1), features_per_group=128)


@pytest.fixture(scope="module")
def env(demo_model, demo_transcoders, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    other = load_model(str(build_tiny_gpt2(tmp / "other_model", n_layers=2, d_model=32)), device="cpu")
    ctx = prompt_context(demo_model, demo_transcoders, PROMPT)
    index = FeatureIndex.build(demo_model, demo_transcoders, _texts(demo_model), 16 * 16, tmp / "index",
                               **INDEX)
    return types.SimpleNamespace(model=demo_model, ts=demo_transcoders, ctx=ctx, other=other,
                                 tmp=tmp, index=index)


def _texts(model):
    gen = SyntheticSentences(0)
    return Corpus.from_texts([gen.sentence() for _ in range(200)], model, 16)


def _build(env, out="built", corpus=None, n_tokens=16 * 8, **kw):
    return FeatureIndex.build(env.model, env.ts, corpus if corpus is not None else _texts(env.model),
                              n_tokens, env.tmp / out, **{**INDEX, **kw})


def _index_copy(env, name, edit) -> Path:
    """A copy of the built index, with ``edit(folder)`` applied."""
    import shutil
    folder = env.tmp / name
    if not folder.exists():
        shutil.copytree(env.index.directory, folder)
        edit(folder)
    return folder


def _set_manifest(folder, text=None, **changes):
    path = folder / "manifest.json"
    if text is None:
        data = json.loads(path.read_text())
        data.update(changes)
        text = json.dumps(data)
    path.write_text(text)


def _break_parquet_unchecked(folder):
    """Truncate a layer file and drop the manifest's checksums (an index from
    before checksums): the Parquet reader itself meets the damage."""
    data = json.loads((folder / "manifest.json").read_text())
    del data["checksums"]
    (folder / "manifest.json").write_text(json.dumps(data))
    path = folder / "layer_01" / "top.parquet"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _damaged_checkpoint(env):
    out = "checkpoint"
    assert _build(env, out, max_batches=1) is None
    path = env.tmp / out / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    _build(env, out)


# -- files written per case ---------------------------------------------------------------
def _gpt2_file(env, name="ok", tc=None) -> Path:
    directory = env.tmp / name
    directory.mkdir(exist_ok=True)
    tc = tc if tc is not None else random_transcoder(8, 16, 0)
    return write_gpt2_transcoder(tc, directory / GPT2_NAME, 0)


def _flipped(env, name="flipped") -> Path:
    path = _gpt2_file(env, name)
    data = bytearray(path.read_bytes())
    start = len(data) // 3            # inside W_enc's bytes, past the headers
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def _truncated(env) -> Path:
    path = _gpt2_file(env, "truncated")
    path.write_bytes(path.read_bytes()[:-700])
    return path


def _empty_dir(env, name) -> Path:
    (env.tmp / name).mkdir(exist_ok=True)
    return env.tmp / name


def _with_bytes(env, name, data: bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(data)
    return path


def _nonfinite_transcoder(env, value, name) -> Path:
    tc = random_transcoder(8, 16, 0)
    with torch.no_grad():
        tc.b_enc[3] = value       # after construction: the writer copies what it is given
    return _gpt2_file(env, name, tc)


def _npz_with_object_array(env) -> Path:
    path = env.tmp / "object_array.npz"
    arrays = {k: np.zeros((2, 2), dtype=np.float32) for k in ("W_enc", "W_dec")}
    arrays.update({k: np.zeros(2, dtype=np.float32) for k in ("b_enc", "b_dec")})
    arrays["threshold"] = np.array([object(), None], dtype=object)
    np.savez(path, **arrays)
    return path


def _yaml_file(env, name, text) -> Path:
    path = env.tmp / name
    path.write_text(text)
    return path


class _CallsGetcwd:
    def __reduce__(self):
        return (os.getcwd, ())


def _pickle_with_global(env) -> Path:
    path = env.tmp / "global.pt"
    path.write_bytes(pickle.dumps({"cfg": _CallsGetcwd()}, protocol=2))
    return path


def _config_set(env, name, transcoders) -> Path:
    directory = env.tmp / name
    directory.mkdir(exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny", "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": transcoders}))
    write_circuit_tracer_safetensors(random_transcoder(8, 16, 0, centred=False), env.tmp / "outside.safetensors")
    return directory


def _truncated_safetensors(env) -> Path:
    path = write_circuit_tracer_safetensors(random_transcoder(8, 16, 0, centred=False),
                                            env.tmp / "short.safetensors")
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _to_full_disk(env, writer):
    """A write whose temporary file lands on /dev/full: every write fails with ENOSPC."""
    target = env.tmp / f"full_{writer.__name__}" / "out.bin"
    target.parent.mkdir(exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink("/dev/full", tmp)
    writer(random_transcoder(8, 16, 0, centred=False), target)


def _over_file_size_limit(env, writer):
    """A write past RLIMIT_FSIZE fails with EFBIG, as on a full quota (safetensors
    writes through its own temporary file and rename, so /dev/full cannot stand in)."""
    import resource
    import signal
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))
    try:
        writer(random_transcoder(8, 64, 0, centred=False), env.tmp / "limited" / "out.bin")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _nan_target(env, value):
    direction = torch.zeros(env.model.cfg.d_model, dtype=torch.float64)
    direction[1] = value
    decompose(env.ctx, Target(Node("direction", layer=1, token=2), 3, 2, direction, 0.0, 0.0))


# -- the cases ---------------------------------------------------------------------------------
# (id, call, error type, text the message must contain: the input, named)
CASES = [
    # prompts
    ("prompt-none", lambda e: run_prompt(e.model, e.ts, None), InvalidInputError, "NoneType"),
    ("prompt-dict", lambda e: run_prompt(e.model, e.ts, {"text": PROMPT}), InvalidInputError, "dict"),
    ("prompt-bytes", lambda e: run_prompt(e.model, e.ts, PROMPT.encode()), InvalidInputError, "bytes"),
    ("prompt-float-ids", lambda e: run_prompt(e.model, e.ts, [1.7, 2.2, 3.9]), InvalidInputError,
     "[1.7, 2.2, 3.9]"),
    ("prompt-float-tensor", lambda e: run_prompt(e.model, e.ts, torch.tensor([1.0, 2.0])),
     InvalidInputError, "float32"),
    ("prompt-bool-ids", lambda e: run_prompt(e.model, e.ts, [True, False]), InvalidInputError, "bool"),
    ("prompt-ragged", lambda e: run_prompt(e.model, e.ts, [[1, 2], [3]]), InvalidInputError, "[[1, 2], [3]]"),
    ("prompt-mixed", lambda e: run_prompt(e.model, e.ts, [1, "war"]), InvalidInputError, "'war'"),
    ("prompt-empty", lambda e: run_prompt(e.model, e.ts, []), InvalidInputError, "empty"),
    ("prompt-oov-id", lambda e: run_prompt(e.model, e.ts, [0, 513]), InvalidInputError, "[513]"),
    ("prompt-negative-id", lambda e: run_prompt(e.model, e.ts, [0, -4]), InvalidInputError, "[-4]"),
    ("prompt-3d", lambda e: to_tokens(e.model, torch.zeros(1, 1, 3, dtype=torch.long)),
     InvalidInputError, "(1, 1, 3)"),
    ("prompt-too-long", lambda e: run_prompt(e.model, e.ts, " war" * 70), InvalidInputError, "71 tokens"),
    ("prompt-batch", lambda e: run_prompt(e.model, e.ts, [[0, 1], [0, 2]]), InvalidInputError, "batch of 2"),
    # layers and features
    ("layer-missing", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=[9]), InvalidInputError, "Layer 9"),
    ("layer-string", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=["one"]), InvalidInputError, "'one'"),
    ("layer-float", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=[1.5]), InvalidInputError, "1.5"),
    ("feature-negative", lambda e: feature_activations(e.model, e.ts, PROMPT, 1, -1), InvalidInputError, "-1"),
    ("feature-too-large", lambda e: feature_activations(e.model, e.ts, PROMPT, 1, 512), InvalidInputError, "512"),
    ("feature-float", lambda e: feature_activations(e.model, e.ts, PROMPT, 1, 2.5), InvalidInputError, "2.5"),
    ("feature-string", lambda e: feature_activations(e.model, e.ts, PROMPT, 1, "3"), InvalidInputError, "'3'"),
    ("feature-none", lambda e: feature_activations(e.model, e.ts, PROMPT, 1, None), InvalidInputError, "None"),
    ("top-k-zero", lambda e: run_prompt(e.model, e.ts, PROMPT).top_features(k=0), InvalidInputError, "0"),
    ("top-k-float", lambda e: run_prompt(e.model, e.ts, PROMPT).top_features(k=1.5), InvalidInputError, "1.5"),
    ("acts-layer-not-run", lambda e: run_prompt(e.model, e.ts, PROMPT, layers=[0]).feature(2, 0),
     InvalidInputError, "Layer 2"),
    ("model-layer-float", lambda e: check_layer(e.model, 1.5), InvalidInputError, "1.5"),
    ("model-layer-range", lambda e: check_layer(e.model, 7), InvalidInputError, "7"),
    # model and transcoders that do not fit each other
    ("run-prompt-other-model", lambda e: run_prompt(e.other, e.ts, PROMPT), IncompatibleTranscoderError,
     "d_model is 32"),
    ("search-other-model", lambda e: search_features(e.other, e.ts, " war"), IncompatibleTranscoderError,
     "d_model is 32"),
    ("not-a-model", lambda e: run_prompt(object(), e.ts, PROMPT), InvalidInputError, "object"),
    ("search-multi-token", lambda e: search_features(e.model, e.ts, " war lasted"), InvalidInputError,
     "' war lasted'"),
    ("search-token-oov", lambda e: search_features(e.model, e.ts, 10_000), InvalidInputError, "10000"),
    ("search-token-float", lambda e: search_features(e.model, e.ts, 3.5), InvalidInputError, "3.5"),
    # loading transcoder sets
    ("set-unknown", lambda e: load_transcoders("no-such-set"), UnknownTranscoderSetError, "no-such-set"),
    ("set-empty-dir", lambda e: load_transcoders(e.tmp), UnknownTranscoderSetError, str("bad_inputs")),
    ("set-layer-missing", lambda e: load_transcoders("tiny-years", layers=[7]), InvalidInputError, "[7]"),
    ("set-dtype", lambda e: load_transcoders("tiny-years", dtype="float99"), InvalidInputError, "float99"),
    ("config-path-outside", lambda e: load_transcoders(_config_set(e, "escape", ["../outside.safetensors"])),
     IncompatibleTranscoderError, "../outside.safetensors"),
    ("config-path-absolute", lambda e: load_transcoders(
        _config_set(e, "absolute", [str(e.tmp / "outside.safetensors")])), IncompatibleTranscoderError,
     "outside.safetensors"),
    ("config-transcoders-not-list", lambda e: load_transcoders(_config_set(e, "notlist", {"0": "x"})),
     IncompatibleTranscoderError, "'transcoders'"),
    # damaged and hostile files
    ("pt-flipped-bytes", lambda e: read_gpt2_transcoder(_flipped(e)), CorruptFileError, "flipped"),
    ("pt-truncated", lambda e: read_gpt2_transcoder(_truncated(e)), CorruptFileError, "truncated"),
    ("pt-empty", lambda e: read_gpt2_transcoder(_with_bytes(e, "empty.pt", b"")), CorruptFileError, "empty.pt"),
    ("pt-junk", lambda e: read_gpt2_transcoder(_with_bytes(e, "junk.pt", b"hello" * 20)),
     CorruptFileError, "junk.pt"),
    ("pt-nan-weights", lambda e: read_gpt2_transcoder(_nonfinite_transcoder(e, float("nan"), "nan")),
     IncompatibleTranscoderError, "b_enc"),
    ("pt-inf-weights", lambda e: read_gpt2_transcoder(_nonfinite_transcoder(e, float("inf"), "inf")),
     IncompatibleTranscoderError, "1 infinite"),
    ("set-nan-layer", lambda e: load_transcoders(_nonfinite_transcoder(e, float("nan"), "nanset").parent)[0],
     IncompatibleTranscoderError, "nanset"),
    ("pt-pickle-global", lambda e: read_gpt2_transcoder(_pickle_with_global(e)), UnsafeFileError, "global.pt"),
    ("npz-object-array", lambda e: read_gemma_scope_npz(_npz_with_object_array(e)), UnsafeFileError,
     "object_array.npz"),
    ("npz-junk", lambda e: read_gemma_scope_npz(_with_bytes(e, "junk.npz", b"PK\x03\x04junk")),
     CorruptFileError, "junk.npz"),
    ("yaml-python-tag", lambda e: read_circuit_tracer_config(
        _yaml_file(e, "evil.yaml", "!!python/object/apply:os.getcwd []\n")), UnsafeFileError, "evil.yaml"),
    ("yaml-broken", lambda e: read_circuit_tracer_config(_yaml_file(e, "broken.yaml", "a: [1, 2\n")),
     CorruptFileError, "broken.yaml"),
    ("yaml-not-mapping", lambda e: read_circuit_tracer_config(_yaml_file(e, "list.yaml", "- 1\n")),
     IncompatibleTranscoderError, "list.yaml"),
    ("safetensors-truncated", lambda e: read_circuit_tracer_safetensors(_truncated_safetensors(e)),
     CorruptFileError, "short.safetensors"),
    ("disk-full-pt", lambda e: _to_full_disk(e, lambda tc, p: write_gpt2_transcoder(tc, p, 0)),
     StorageError, "out.bin"),
    ("file-too-large-safetensors", lambda e: _over_file_size_limit(e, write_circuit_tracer_safetensors),
     StorageError, "out.bin"),
    ("disk-full-npz", lambda e: _to_full_disk(e, lambda tc, p: write_gemma_scope_npz(
        random_transcoder(8, 16, 0, jumprelu=True, centred=False), p)), StorageError, "out.bin"),
    # circuits
    ("target-vector-nan", lambda e: residual_target(e.ctx, torch.full((64,), float("nan")), 1),
     InvalidInputError, "NaN"),
    ("target-vector-inf", lambda e: residual_target(e.ctx, torch.tensor([float("inf")] + [0.0] * 63), 1),
     InvalidInputError, "infinite"),
    ("target-vector-size", lambda e: residual_target(e.ctx, torch.zeros(7), 1), InvalidInputError, "size 7"),
    ("target-vector-none", lambda e: residual_target(e.ctx, None, 1), InvalidInputError, "NoneType"),
    ("target-direction-nan", lambda e: _nan_target(e, float("nan")), InvalidInputError, "direction"),
    ("target-direction-inf", lambda e: _nan_target(e, float("-inf")), InvalidInputError, "direction"),
    ("feature-target-token", lambda e: feature_target(e.ctx, 1, 0, token=99), InvalidInputError, "99"),
    ("feature-target-float-token", lambda e: feature_target(e.ctx, 1, 0, token=2.5), InvalidInputError, "2.5"),
    ("logit-diff-multi-token", lambda e: logit_diff_target(e.ctx, " war lasted", "20"), InvalidInputError,
     "' war lasted'"),
    ("contribution-other-token", lambda e: decompose(e.ctx, logit_diff_target(e.ctx, "40", "20"))
     .contribution_of(Node("feature", layer=1, index=3, token=3)), InvalidInputError, "L1F3@3"),
    ("contribution-token-range", lambda e: decompose(e.ctx, logit_diff_target(e.ctx, "40", "20"))
     .contribution_of(Node("feature", layer=1, index=3, token=99)), InvalidInputError, "99"),
    ("contribution-head-source", lambda e: decompose(e.ctx, logit_diff_target(e.ctx, "40", "20"))
     .contribution_of(Node("head", layer=1, index=0, token=8, source=42)), InvalidInputError, "42"),
    ("contribution-head-layer-none", lambda e: decompose(e.ctx, logit_diff_target(e.ctx, "40", "20"))
     .contribution_of(Node("head", layer=None, index=0, token=8, source=1)), InvalidInputError, "None"),
    # corpora
    ("corpus-float-ids", lambda e: Corpus.from_token_ids([[0, 1.5, 2.7]], e.model), InvalidInputError, "1.5"),
    ("corpus-oov-ids", lambda e: Corpus.from_token_ids([[0, 5, 9999]], e.model), InvalidInputError, "[9999]"),
    ("corpus-negative-ids", lambda e: Corpus.from_token_ids(np.array([[0, -3, 4]]), e.model),
     InvalidInputError, "[-3]"),
    ("corpus-1d", lambda e: Corpus.from_token_ids([0, 1, 2], e.model), InvalidInputError, "(3,)"),
    ("corpus-oov-document", lambda e: Corpus(lambda: iter([[1, 2, 70_000]]), e.model.tokenizer, 4, 0, 0)
     .take(1), InvalidInputError, "[70000]"),
    ("corpus-texts-empty", lambda e: Corpus.from_texts([], e.model, 8), InvalidInputError, "from_texts"),
    ("corpus-texts-none", lambda e: Corpus.from_texts([None], e.model, 8), InvalidInputError, "strings"),
    ("corpus-seq-len", lambda e: Corpus.from_texts(["a b"], e.model, 1), InvalidInputError, "seq_len"),
    ("corpus-files-missing", lambda e: Corpus.from_files([e.tmp / "nope.txt"], e.model, 8), InvalidInputError,
     "nope.txt"),
    ("corpus-split", lambda e: Corpus.from_files([], e.model, 8, split="words"), InvalidInputError, "'words'"),
    ("corpus-unknown-source", lambda e: as_corpus(42, e.model), InvalidInputError, "int"),
    ("corpus-binary-file", lambda e: Corpus.from_files([_with_bytes(e, "binary.txt", b"\xff\xfe\x00ab")],
                                                        e.model, 8).take(1), InvalidInputError, "binary.txt"),
    ("model-dir-missing", lambda e: load_model(str(e.tmp / "no_model_here")), InvalidInputError,
     "no_model_here"),
    ("model-dir-not-a-model", lambda e: load_model(str(_empty_dir(e, "not_a_model"))), InvalidInputError,
     "not_a_model"),
    ("corpus-too-short", lambda e: Corpus.from_texts(["war"], e.model, 8).take(5), InvalidInputError, "5"),
    # feature indexes: settings
    ("index-window-negative", lambda e: _build(e, window=(-1, 2)), InvalidInputError, "(-1, 2)"),
    ("index-window-shape", lambda e: _build(e, window=3), InvalidInputError, "3"),
    ("index-window-float", lambda e: _build(e, window=(1.5, 2)), InvalidInputError, "1.5"),
    ("index-k-zero", lambda e: _build(e, k=0), InvalidInputError, "k must be at least 1"),
    ("index-batch-float", lambda e: _build(e, batch_size=2.5), InvalidInputError, "2.5"),
    ("index-bins-nan", lambda e: _build(e, bins=[0.1, float("nan"), 1.0]), InvalidInputError, "nan"),
    ("index-shard-bad", lambda e: _build(e, shard=(3, 2)), InvalidInputError, "(3, 2)"),
    ("index-shard-not-pair", lambda e: _build(e, shard=1), InvalidInputError, "1"),
    ("index-n-tokens-float", lambda e: _build(e, n_tokens=100.5), InvalidInputError, "100.5"),
    ("index-unknown-setting", lambda e: _build(e, windw=(1, 1)), InvalidInputError, "windw"),
    ("index-corpus-oov", lambda e: _build(e, "oov", corpus=Corpus.from_token_ids(
        np.array([[0, 5, 9999]] * 40))), InvalidInputError, "[9999]"),
    ("index-other-model", lambda e: FeatureIndex.build(e.other, e.ts, _texts(e.model), 128, e.tmp / "om"),
     IncompatibleTranscoderError, "d_model is 32"),
    # feature indexes: reading
    ("index-layer-missing", lambda e: e.index.top_examples(7, 0), InvalidInputError, "Layer 7"),
    ("index-feature-float", lambda e: e.index.top_examples(1, 2.5), InvalidInputError, "2.5"),
    ("index-feature-range", lambda e: e.index.feature_stats(1, 512), InvalidInputError, "512"),
    ("index-table-name", lambda e: e.index.table(1, "tops"), InvalidInputError, "'tops'"),
    ("index-sequence-range", lambda e: e.index.sequence_tokens(99), InvalidInputError, "99"),
    ("index-bands-zero", lambda e: e.index.interval_samples(1, 0, n_bands=0), InvalidInputError, "0"),
    ("index-not-a-folder", lambda e: FeatureIndex(e.tmp / "nowhere"), InvalidInputError, "nowhere"),
    ("index-manifest-not-json", lambda e: FeatureIndex(_index_copy(e, "badjson", lambda f: _set_manifest(
        f, text="{not json"))), CorruptFileError, "manifest.json"),
    ("index-manifest-list", lambda e: FeatureIndex(_index_copy(e, "listjson", lambda f: _set_manifest(
        f, text="[1, 2]"))), CorruptFileError, "list"),
    ("index-manifest-lacks", lambda e: FeatureIndex(_index_copy(e, "lacks", lambda f: _set_manifest(
        f, text=json.dumps({"format_version": 2, "complete": True})))), InvalidInputError, "lacks"),
    ("index-manifest-d-sae", lambda e: FeatureIndex(_index_copy(e, "dsae", lambda f: _set_manifest(
        f, d_sae=[512]))), CorruptFileError, "d_sae"),
    ("index-parquet-truncated", lambda e: FeatureIndex(_index_copy(e, "trunc", _break_parquet_unchecked))
     .top_examples(1, 0), CorruptFileError, "layer_01/top.parquet"),
    ("index-file-missing", lambda e: FeatureIndex(_index_copy(e, "missing", lambda f: (
        f / "layer_00" / "stats.parquet").unlink())).feature_stats(0, 1), CorruptFileError,
     "layer_00/stats.parquet"),
    ("index-checkpoint-damaged", _damaged_checkpoint, CorruptFileError, "checkpoint.pt"),
    ("index-settings-differ", lambda e: _build(e, "index", n_tokens=16 * 16, k=5), InvalidInputError, "k"),
    ("index-other-weights", lambda e: e.index.check_transcoders(_other_weights(e)),
     IncompatibleTranscoderError, "layer-2"),
    ("index-other-model-dashboard", lambda e: e.index.check_model(e.other), IncompatibleTranscoderError,
     "tokenizer"),
    ("merge-into-input", lambda e: FeatureIndex.merge([e.index.directory], e.index.directory),
     InvalidInputError, "one of its inputs"),
    ("merge-inside-input", lambda e: FeatureIndex.merge([e.index.directory], e.index.directory / "m"),
     InvalidInputError, "inside"),
    ("merge-nothing", lambda e: FeatureIndex.merge([], e.tmp / "m0"), InvalidInputError, "at least one"),
]


def _other_weights(env):
    other = load_transcoders("tiny-years", device="cpu")
    with torch.no_grad():
        other[2].W_dec[0] *= 2
    return other


@pytest.mark.parametrize("call,error,names", [pytest.param(c, err, n, id=i) for i, c, err, n in CASES])
def test_bad_input_raises_our_error(env, call, error, names):
    assert_our_error(lambda: call(env), error, names)


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
