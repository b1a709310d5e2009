"""Faults on disk: damaged downloads and files, full disks. Files are damaged
for real (bytes flipped in the Hugging Face cache's blobs), and read through
the same loading code as users'."""
import hashlib
import os

import pytest
import torch
import yaml

from tc_explore import load_transcoders
from tc_explore.errors import CorruptFileError, StorageError
from tc_explore.formats import write_circuit_tracer_safetensors, write_gpt2_transcoder
from tc_explore.integrity import atomic_write, verify_hub_file
from tc_explore.testing import install_in_hf_cache, random_transcoder

GPT2_NAME = "final_sparse_autoencoder_gpt2-small_blocks.0.ln2.hook_normalized_24576.pt"


def _flip(path, n=64, at=None):
    data = bytearray(path.read_bytes())
    start = len(data) // 3 if at is None else at
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _hub_set(hf_home, tmp_path, repo, filename, write):
    """A circuit-tracer style set in the Hub cache whose layer 0 is ``filename``."""
    work = tmp_path / repo.replace("/", "_")
    work.mkdir()
    write(work / "weights")
    (work / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "gpt2", "model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": [f"hf://{repo}/{filename}"]}))
    snapshot = install_in_hf_cache(hf_home, repo, {filename: work / "weights",
                                                   "config.yaml": work / "config.yaml"})
    return snapshot / filename


@pytest.mark.parametrize("filename,write", [
    ("layer_0.safetensors", lambda p: write_circuit_tracer_safetensors(random_transcoder(32, 64, 0, centred=False), p)),
    (GPT2_NAME, lambda p: write_gpt2_transcoder(random_transcoder(32, 64, 0), p, 0)),
], ids=["safetensors", "gpt2-pickle"])
def test_flipped_bytes_in_a_hub_download_are_caught(offline_hub, tmp_path, filename, write):
    repo = f"h12/flip-{filename.split('.')[-1]}"
    link = _hub_set(offline_hub.hf_home, tmp_path, repo, filename, write)
    good = load_transcoders(repo, device="cpu")[0]            # intact: loads, verified
    blob = link.resolve()
    assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    _flip(blob)
    with pytest.raises(CorruptFileError) as info:
        load_transcoders(repo, device="cpu")[0]
    text = str(info.value)
    assert "corrupted" in text and f"hf download {repo} {filename}" in text and "--force-download" in text
    assert good.W_enc.isfinite().all()


def test_hub_file_verified_once_per_process(offline_hub, tmp_path):
    link = _hub_set(offline_hub.hf_home, tmp_path, "h12/verify-once", "layer_0.safetensors",
                    lambda p: write_circuit_tracer_safetensors(random_transcoder(32, 64, 0, centred=False), p))
    assert verify_hub_file(link, "h12/verify-once", "layer_0.safetensors")
    assert not verify_hub_file(tmp_path, "x/y", "z")           # not a cache blob: nothing to check


def test_flipped_bytes_in_a_local_pt_file_are_caught(tmp_path):
    """torch does not check the CRC-32 its zip archives carry: 64 flipped bytes in
    W_enc would load as weights off by up to 1e24. We check it."""
    directory = tmp_path / "set"
    tc = random_transcoder(32, 64, 0)
    path = write_gpt2_transcoder(tc, directory / GPT2_NAME, 0)
    _flip(path)
    with pytest.raises(CorruptFileError, match="does not match the checksum"):
        load_transcoders(directory, device="cpu")[0]


def test_failed_write_keeps_the_previous_file(tmp_path):
    """A write that fails half-way (here: the temporary file is /dev/full, so
    every write fails with ENOSPC) leaves the file it was replacing intact."""
    path = write_gpt2_transcoder(random_transcoder(8, 16, 0), tmp_path / "tc.pt", 0)
    before = path.read_bytes()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    os.symlink("/dev/full", tmp)
    with pytest.raises(StorageError, match="disk full") as info:
        write_gpt2_transcoder(random_transcoder(8, 16, 1), path, 0)
    assert "keeps its previous content" in str(info.value)
    assert path.read_bytes() == before
    assert not tmp.exists() and not tmp.is_symlink()


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "x.bin"
    with pytest.raises(ZeroDivisionError):
        with atomic_write(path) as tmp:
            tmp.write_bytes(b"half")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def _clt_hub_set(hf_home, tmp_path, repo, weights):
    """A cross-layer transcoder in circuit-tracer's layout in the Hub cache."""
    from tc_explore.formats.clt import write_clt
    work = tmp_path / repo.replace("/", "_")
    files = {p.name: p for p in write_clt(work, **weights)}
    (work / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "gpt2", "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}))
    files["config.yaml"] = work / "config.yaml"
    return install_in_hf_cache(hf_home, repo, files)


def test_flipped_bytes_in_a_clt_decoder_are_caught(offline_hub, tmp_path):
    """CLT decoders are read lazily, in row slices; their content hash is still
    checked (once) before anything of them is used."""
    from tc_explore.testing import random_clt
    snapshot = _clt_hub_set(offline_hub.hf_home, tmp_path, "h12/flip-clt", random_clt(16, 40, 2, seed=3))
    assert load_transcoders("h12/flip-clt", device="cpu").decoder_rows(1, [0, 5]).isfinite().all()
    _flip((snapshot / "W_dec_0.safetensors").resolve(), n=16, at=200)
    clt = load_transcoders("h12/flip-clt", device="cpu")
    with pytest.raises(CorruptFileError) as info:
        clt.decoder_rows(0, [0, 5])                    # a row slice alone, before the layer is loaded
    assert "W_dec_0.safetensors of h12/flip-clt" in str(info.value)
    assert "hf download h12/flip-clt W_dec_0.safetensors" in str(info.value)


def test_clt_fingerprint_covers_every_target_decoder(offline_hub, tmp_path):
    """Two CLTs whose layer-0 decoders differ only in what they write to layer 1
    (their sum over targets equal) have different fingerprints."""
    from tc_explore.testing import random_clt
    a = random_clt(16, 40, 2, seed=4)
    b = {k: [t.clone() for t in v] for k, v in a.items()}
    delta = 0.1 * torch.randn(40, 16)
    b["W_dec"][0][:, 0] += delta                     # to layer 0 ...
    b["W_dec"][0][:, 1] -= delta                     # ... and back from layer 1: same sum
    _clt_hub_set(offline_hub.hf_home, tmp_path, "h12/clt-a", a)
    _clt_hub_set(offline_hub.hf_home, tmp_path, "h12/clt-b", b)
    ca, cb = (load_transcoders(r, device="cpu") for r in ("h12/clt-a", "h12/clt-b"))
    assert torch.allclose(ca[0].W_dec, cb[0].W_dec, atol=1e-6)
    assert ca.fingerprint(0) != cb.fingerprint(0)
    assert ca.fingerprint(1) == cb.fingerprint(1)
    assert ca.fingerprint(0) == load_transcoders("h12/clt-a", device="cpu").fingerprint(0)


# -- model files in the Hugging Face cache ------------------------------------------------------
def _hub_model(hf_home, tmp_path, repo):
    """A tiny GPT-2 in the Hub cache as the Hub lays it out: the weights an LFS
    blob named by its sha256, the configs and tokenizer git blobs named by their sha1."""
    from tc_explore.testing import build_tiny_gpt2
    model_dir = build_tiny_gpt2(tmp_path / repo.replace("/", "_"), n_layers=1, d_model=16)
    return install_in_hf_cache(hf_home, repo, {p.name: p for p in model_dir.iterdir()},
                               lfs_suffixes=(".safetensors",))


@pytest.mark.parametrize("filename", ["model.safetensors", "tokenizer.json"])
def test_flipped_bytes_in_a_cached_model_file_are_caught(offline_hub, tmp_path, filename):
    from tc_explore import load_model
    repo = f"h12/flip-model-{filename.split('.')[0]}"
    snapshot = _hub_model(offline_hub.hf_home, tmp_path, repo)
    blob = (snapshot / filename).resolve()
    assert len(blob.name) == (64 if filename.endswith(".safetensors") else 40)
    load_model(repo, device="cpu")                               # intact: loads, verified
    _flip(blob, n=4, at=len(blob.read_bytes()) - 40)             # in the weights / the vocabulary
    with pytest.raises(CorruptFileError) as info:
        load_model(repo, device="cpu")
    text = str(info.value)
    assert f"model file {filename} of {repo}" in text and "corrupted" in text
    assert str(blob) in text and f"hf download {repo} {filename}" in text and "--force-download" in text


def test_model_snapshot_hashed_once_per_process(offline_hub, tmp_path, monkeypatch):
    from tc_explore import integrity
    snapshot = _hub_model(offline_hub.hf_home, tmp_path, "h12/verify-model-once")
    assert integrity.cached_snapshot("h12/verify-model-once") == snapshot
    assert integrity.verify_model_snapshot(snapshot) == 5     # weights, 2 configs, 2 tokenizer files
    hashed = []
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(p))
    monkeypatch.setattr(integrity, "_git_blob_sha1", lambda p: hashed.append(p))
    assert integrity.verify_model_snapshot(snapshot) == 5 and hashed == []
    assert integrity.verify_model_snapshot(tmp_path) == 0      # a folder outside the cache


# -- NaN and infinity in activations ---------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned_demo():
    """The demo model (a copy of its own) with NaN written into the residual
    stream at position 3 before layer 1: as a float16 overflow would."""
    from tc_explore import load_model
    model = load_model("tiny-years", device="cpu")

    def poison(x, hook):
        x = x.clone()
        x[:, 3] = float("nan")
        return x
    model.add_hook("blocks.1.hook_resid_pre", poison)
    return model, load_transcoders("tiny-years", device="cpu")


def _prompt():
    from tc_explore.demo import SyntheticSentences
    return SyntheticSentences(0).sentence()                # words the demo tokenizer knows


PROMPT = _prompt()


def test_nan_in_a_prompt_pass_is_refused_naming_hook_and_token(poisoned_demo):
    from tc_explore.circuits.attribution import attribute
    from tc_explore.circuits.context import prompt_context
    from tc_explore.errors import NonFiniteError
    model, ts = poisoned_demo
    where = r"residual stream at blocks\.1\.hook_resid_pre on this prompt: \d+ NaN and 0 infinite values, " \
            r"the first at position 3 \('.*'\)\. .*float32"
    with pytest.raises(NonFiniteError, match=where):
        attribute(model, ts, PROMPT)
    with pytest.raises(NonFiniteError, match=where):       # every decomposition starts from a context
        prompt_context(model, ts, PROMPT)


def test_nan_in_run_prompt_and_interventions_is_refused(poisoned_demo):
    from tc_explore import Intervention, generate, intervene
    from tc_explore.errors import NonFiniteError
    from tc_explore.prompt_features import run_prompt
    model, ts = poisoned_demo
    with pytest.raises(NonFiniteError, match=r"layer-1 transcoder's feature activations: \d+ NaN"):
        run_prompt(model, ts, PROMPT)
    with pytest.raises(NonFiniteError, match=r"logits of the clean run: \d+ NaN.*position \d+ \('"):
        intervene(model, ts, PROMPT, Intervention.ablate(0, 3))
    with pytest.raises(NonFiniteError, match=r"next-token logits after \d+ tokens: \d+ NaN"):
        generate(model, ts, PROMPT, max_new_tokens=2)


def test_nan_in_an_evaluation_is_refused_naming_hook_sequence_and_token(poisoned_demo):
    from tc_explore import evaluate_transcoders
    from tc_explore.errors import NonFiniteError
    model, ts = poisoned_demo
    tokens = torch.cat([model.to_tokens(PROMPT)] * 3)
    with pytest.raises(NonFiniteError, match=r"activations at blocks\.1\.ln2\.hook_normalized on sequence 0 of "
                                             r"these tokens: \d+ NaN and 0 infinite values, the first at "
                                             r"position 0 \('.*'\)\. .*float32"):
        # (position 0 too: layer 1's attention multiplies position 3's NaN values by zero weights)
        evaluate_transcoders(model, ts, tokens, batch_size=2, progress=False)
    with pytest.raises(NonFiniteError, match=r"at blocks\.1\.ln2\.hook_normalized on sequence 0 of these"):
        evaluate_transcoders(model, ts, [PROMPT], layers=[1], progress=False)        # texts, one a batch


def test_a_transcoder_turning_finite_inputs_into_nan_is_refused_by_evaluation(demo_model):
    from tc_explore import evaluate_transcoders
    from tc_explore.errors import NonFiniteError
    ts = load_transcoders("tiny-years", device="cpu")          # a copy of its own, poisoned below
    with torch.no_grad():
        ts[1].b_dec_out.fill_(float("inf"))                  # the features are finite, the output is not
    with pytest.raises(NonFiniteError, match=r"The layer-1 transcoder's output on sequence 0 of these tokens: "
                                             r"0 NaN and \d+ infinite values, the first at position 0"):
        evaluate_transcoders(demo_model, ts, [PROMPT], progress=False)
    with torch.no_grad():
        ts[1].b_enc.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"The layer-1 transcoder's feature activations on sequence 0"):
        evaluate_transcoders(demo_model, ts, [PROMPT], progress=False)
