"""Each published format, written in its exact layout, loads and computes the
format's own forward pass."""
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tc_explore import load_transcoders, registry
from tc_explore.errors import IncompatibleTranscoderError
from tc_explore.testing import install_in_hf_cache

D, S = 16, 40


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(W_enc=torch.randn(D, S, generator=g) / 4, W_dec=torch.randn(S, D, generator=g) / 6,
                b_enc=0.2 * torch.randn(S, generator=g), b_dec=0.1 * torch.randn(D, generator=g),
                threshold=0.3 * torch.rand(S, generator=g), W_skip=0.1 * torch.randn(D, D, generator=g))


def _x(seed=1):
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(seed))


def _jumprelu_reference(w, x, skip=None):
    pre = x @ w["W_enc"] + w["b_enc"]
    acts = pre * (pre > w["threshold"])
    out = acts @ w["W_dec"] + w["b_dec"]
    return (out if skip is None else out + skip(x)), acts


def _write_gemma_npz(path, w):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: w[k].numpy() for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    return path


def test_gemma_scope_npz_via_circuit_tracer_config_in_hub_cache(offline_hub, tmp_path):
    """Registry 'gemma-scope-2b': mwhanna/gemma-scope-transcoders' config.yaml lists
    hf:// URIs of google/gemma-scope-2b-pt-transcoders' params.npz files."""
    entry = registry()["gemma-scope-2b"]
    ws = [_weights(l) for l in range(2)]
    npz = {f"layer_{l}/width_16k/average_l0_{70 + l}/params.npz":
           _write_gemma_npz(tmp_path / f"l{l}" / "params.npz", ws[l]) for l in range(2)}
    install_in_hf_cache(offline_hub.hf_home, "google/gemma-scope-2b-pt-transcoders", npz)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-2-2b", "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://google/gemma-scope-2b-pt-transcoders/{name}" for name in npz]}))
    install_in_hf_cache(offline_hub.hf_home, entry.repo_id, {"config.yaml": tmp_path / "config.yaml"},
                        revision=entry.revision)
    ts = load_transcoders("gemma-scope-2b", device="cpu")
    assert ts.layers == [0, 1] and ts.model_name == "google/gemma-2-2b"
    for l in range(2):
        tc = ts[l]
        assert tc.activation == "jumprelu"
        assert (tc.input_hook, tc.output_hook) == (f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.hook_mlp_out")
        out, acts = tc(_x())
        ref_out, ref_acts = _jumprelu_reference(ws[l], _x())
        assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(acts, ref_acts, atol=1e-6)
        assert (acts > 0).any() and (acts == 0).any()


def test_circuit_tracer_safetensors_directory(tmp_path):
    w = _weights(3)
    save_file({"W_enc": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"],
               "b_dec": w["b_dec"], "activation_function.threshold": w["threshold"],
               "W_skip": w["W_skip"]}, str(tmp_path / "layer_0.safetensors"))
    save_file({"W_enc": w["W_enc"].T.contiguous(), "W_dec": w["W_dec"], "b_enc": w["b_enc"],
               "b_dec": w["b_dec"]}, str(tmp_path / "layer_1.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "meta-llama/Llama-3.2-1B", "model_kind": "transcoder_set",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "mlp.hook_out"}))
    ts = load_transcoders(tmp_path, device="cpu")
    assert ts.layers == [0, 1]
    assert ts.input_hook(1) == "blocks.1.hook_resid_mid" and ts.output_hook(1) == "blocks.1.mlp.hook_out"
    x = _x()
    out, acts = ts[0](x)
    ref_out, ref_acts = _jumprelu_reference(w, x, skip=lambda x: x @ w["W_skip"].T)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(acts, ref_acts, atol=1e-6)
    out1, acts1 = ts[1](x)
    relu_acts = torch.relu(x @ w["W_enc"] + w["b_enc"])
    assert ts[1].activation == "relu"
    assert torch.allclose(out1, relu_acts @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_gemma_scope_2_safetensors(tmp_path):
    w = _weights(4)
    save_file({"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
               "threshold": w["threshold"], "affine_skip_connection": w["W_skip"]},
              str(tmp_path / "layer_0.safetensors"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "google/gemma-3-1b-pt", "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}))
    tc = load_transcoders(tmp_path, device="cpu")[0]
    ref_out, ref_acts = _jumprelu_reference(w, _x(), skip=lambda x: x @ w["W_skip"])
    out, acts = tc(_x())
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(acts, ref_acts, atol=1e-6)


def test_cross_layer_transcoder_without_its_files_refused_clearly(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "x", "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}))
    with pytest.raises(IncompatibleTranscoderError, match="W_enc_0"):
        load_transcoders(tmp_path)


def test_writers_round_trip(tmp_path):
    from tc_explore.formats import (read_circuit_tracer_safetensors, read_gemma_scope_npz,
                                    write_circuit_tracer_safetensors, write_gemma_scope_npz)
    from tc_explore.testing import random_transcoder
    tc = random_transcoder(D, S, layer=0, jumprelu=True, centred=False)
    for write, read, name in ((write_gemma_scope_npz, read_gemma_scope_npz, "p.npz"),
                              (write_circuit_tracer_safetensors, read_circuit_tracer_safetensors,
                               "l.safetensors")):
        back = read(write(tc, tmp_path / name))
        assert torch.allclose(back(_x())[0], tc(_x())[0], atol=1e-6)
