"""Loading through the Hugging Face cache, exactly as users do, and the
transcoder formula."""
import sys
from pathlib import Path

import pytest
import torch

from tc_explore import load_model, load_transcoders, registry
from tc_explore.errors import InvalidInputError, OfflineFileMissingError
from tc_explore.formats import LanguageModelSAERunnerConfig, safe_torch_load
from tc_explore.testing import random_transcoder


def reference_forward(sd, x):
    acts = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    return acts @ sd["W_dec"] + sd["b_dec_out"], acts


def test_registry_gpt2_small_entry():
    e = registry()["gpt2-small"]
    assert e.repo_id == "pchlenski/gpt2-transcoders" and e.model == "gpt2"
    assert e.layers == tuple(range(12)) and e.d_sae == 24576
    assert e.file_pattern.replace("{L}", "3") == \
        "final_sparse_autoencoder_gpt2-small_blocks.3.ln2.hook_normalized_24576.pt"
    assert e.frequency_pattern.replace("{L}", "3") == \
        "final_sparse_autoencoder_gpt2-small_blocks.3.ln2.hook_normalized_24576_log_feature_sparsity.pt"
    assert e.input_hook == "blocks.{L}.ln2.hook_normalized"
    assert e.output_hook == "blocks.{L}.hook_mlp_out"
    assert len(e.revision) == 40


def test_round_trip_through_hub_cache(offline_hub, tiny_model, tiny_transcoders):
    from huggingface_hub import hf_hub_download
    entry = registry()["gpt2-small"]
    assert tiny_transcoders.revision == entry.revision
    assert tiny_transcoders.repo_id == "pchlenski/gpt2-transcoders"
    # The file sits in the standard cache as huggingface_hub laid it out.
    path = Path(hf_hub_download(entry.repo_id, entry.file_pattern.replace("{L}", "1"),
                                revision=entry.revision))
    assert str(offline_hub.hf_home) in str(path) and path.is_symlink()
    raw = safe_torch_load(path)
    assert isinstance(raw["cfg"], LanguageModelSAERunnerConfig)
    assert raw["cfg"].hook_point == "blocks.1.ln2.hook_normalized"
    assert raw["cfg"].out_hook_point == "blocks.1.hook_mlp_out"
    assert raw["cfg"].is_transcoder is True and raw["cfg"].dtype == torch.float32
    assert "sae_training" not in sys.modules and "sae_training.config" not in sys.modules
    sd = raw["state_dict"]
    assert sd["W_enc"].shape == (offline_hub.d_model, offline_hub.d_sae)
    assert sd["W_dec"].shape == (offline_hub.d_sae, offline_hub.d_model)

    tc = tiny_transcoders[1]
    assert (tc.input_hook, tc.output_hook) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    _, cache = tiny_model.run_with_cache("The war lasted from 1735 to 17")
    x = cache["blocks.1.ln2.hook_normalized"]
    out, acts = tc(x)
    ref_out, ref_acts = reference_forward(sd, x)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(acts, ref_acts, atol=1e-6)
    assert (acts > 0).any() and (acts == 0).any()  # a meaningful test: some features fire
    # Weights equal the ones the fixture generated.
    fresh = random_transcoder(offline_hub.d_model, offline_hub.d_sae, 1, seed=0)
    assert torch.equal(tc.W_enc, fresh.W_enc) and torch.equal(tc.b_dec_out, fresh.b_dec_out)


def test_log_feature_frequency(tiny_transcoders, offline_hub):
    f = tiny_transcoders.log_feature_frequency(0)
    assert f.shape == (offline_hub.d_sae,) and bool((f < 0).all())


def test_lazy_loading(offline_hub):
    ts = load_transcoders("gpt2-small", layers=[2, 5], device="cpu")
    assert ts.layers == [2, 5] and ts.loaded_layers() == []
    ts[5]
    assert ts.loaded_layers() == [5]


def test_dtype_and_repo_id_alias(offline_hub):
    ts = load_transcoders("pchlenski/gpt2-transcoders", layers=[0], dtype="float64", device="cpu")
    assert ts[0].W_enc.dtype == torch.float64 and ts.name == "gpt2-small"


def test_layer_not_in_set(offline_hub):
    with pytest.raises(InvalidInputError, match="not in transcoder set 'gpt2-small'"):
        load_transcoders("gpt2-small", layers=[12])


def test_missing_offline_file_names_repo_and_command(offline_hub):
    with pytest.raises(OfflineFileMissingError) as err:
        load_transcoders("gpt2-small", layers=[0], revision="0" * 40)
    text = str(err.value)
    assert "pchlenski/gpt2-transcoders" in text and "hf download" in text
    assert "HF_HUB_OFFLINE=1" in text


def test_missing_offline_model(offline_hub):
    with pytest.raises(OfflineFileMissingError, match="hf download nobody/no-such-model"):
        load_model("nobody/no-such-model", device="cpu")


def test_load_model_accepts_existing_model(tiny_model):
    assert load_model(tiny_model) is tiny_model
    with pytest.raises(InvalidInputError, match="not a TransformerLens model"):
        load_model(object())


UNREACHABLE_SCRIPT = """
import json, sys, time, warnings
import tc_explore as tcx
from tc_explore.errors import OfflineFileMissingError
from tc_explore.hub_access import HubUnreachableWarning
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    t = time.perf_counter()
    model = tcx.load_model("gpt2", device="cpu")
    tcs = tcx.load_transcoders("gpt2-small", layers=[0, 1], device="cpu")
    out["cached_s"] = time.perf_counter() - t
    out["n_layers"] = int(model.cfg.n_layers)
    t = time.perf_counter()
    try:
        tcx.load_model("nobody/no-such-model", device="cpu")
    except OfflineFileMissingError as err:
        out["model_error"] = str(err)
    try:
        tcx.load_transcoders("gpt2-small", layers=[0], revision="0" * 40, device="cpu")
    except OfflineFileMissingError as err:
        out["transcoder_error"] = str(err)
    try:
        from tc_explore.corpus import hub_slice
        hub_slice("Skylion007/openwebtext", 100)
    except OfflineFileMissingError as err:
        out["dataset_error"] = str(err)
    out["missing_s"] = time.perf_counter() - t
out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, HubUnreachableWarning)]
print(json.dumps(out))
"""


def test_unreachable_hub_reads_the_cache_at_once_and_says_so(offline_hub, tmp_path):
    """No network and HF_HUB_OFFLINE unset: no retries for ~24 s per file, one
    warning, cached files load, a missing one fails saying the Hub is unreachable."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(offline_hub.hf_home), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens
    run = subprocess.run([sys.executable, "-c", UNREACHABLE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["n_layers"] == offline_hub.n_layers
    assert len(out["warnings"]) == 1 and "cannot be reached" in out["warnings"][0]
    # huggingface_hub alone retries ~24 s per file (model, 2 transcoders, 2 frequencies)
    assert out["cached_s"] < 60 and out["missing_s"] < 15
    for key in ("model_error", "transcoder_error", "dataset_error"):
        text = out[key]
        assert "cannot be reached" in text and "http://127.0.0.1:9" in text
        assert ("hf download" in text) if key != "dataset_error" else ("hub_slice(" in text)
        assert "HF_HUB_OFFLINE=1" in text


def test_model_is_named_by_its_id_or_folder_never_a_local_path(offline_hub, tiny_model, demo_model, tmp_path):
    """cfg.model_name, which dashboards, index manifests and pushed index cards
    show, is the Hub id or registry name asked for, or a directory's own name."""
    from tc_explore.dashboard import dashboard_html, feature_dashboard
    from tc_explore.index import FeatureIndex
    from tc_explore.demo import SyntheticSentences
    from tc_explore.testing import build_tiny_gpt2

    assert tiny_model.cfg.model_name == "gpt2"
    assert demo_model.cfg.model_name == "tiny-years"
    folder = build_tiny_gpt2(tmp_path / "my-model")
    assert load_model(str(folder), device="cpu").cfg.model_name == "my-model"
    demo_tcs = load_transcoders("tiny-years", device="cpu")
    texts = [SyntheticSentences(seed=0).sentence() for _ in range(40)]
    index = FeatureIndex.build(demo_model, demo_tcs, texts, 128, tmp_path / "idx",
                               layers=[0], k=3, n_samples=4, batch_size=4)
    assert index.manifest.model == "tiny-years" and "model='tiny-years'" in repr(index)
    feature = int(index.table(0, "stats").sort_values("n_firing")["feature"].iloc[-1])
    page = dashboard_html(feature_dashboard(index, 0, feature))
    header = page[page.index('class="tcx-stats"'):][:200]
    assert "tiny-years on tiny-years" in header and "/" not in header.split("·")[0]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_loaded_model_keeps_no_map_of_its_checkpoint(tmp_path):
    """No weight stays backed by the checkpoint's memory map (GPT-2's unsplit
    c_attn originals did), so the file is unmapped after loading and its pages
    are not resident in the process."""
    from tc_explore.testing import build_tiny_gpt2
    path = build_tiny_gpt2(tmp_path / "model", n_layers=2, d_model=32)
    model = load_model(str(path), device="cpu")
    weights = [*model.parameters(), *model.buffers()]
    assert weights and all(t.untyped_storage().resizable() for t in weights)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert model("The war lasted from", return_type="logits").isfinite().all()


def _activations_left_on(model) -> list:
    """(module, attribute) of the tensors of three or more dimensions a
    forward pass left as module attributes (weights are parameters or buffers)."""
    return [(name, attr) for name, module in model.named_modules() for attr, value in vars(module).items()
            if isinstance(value, torch.Tensor) and value.dim() >= 3]


def test_a_forward_leaves_no_attention_pattern_on_the_model(tiny_model, tmp_path):
    """TransformerLens 4's attention bridge keeps each forward's pattern
    ([batch, heads, pos, pos]) as a module attribute that nothing reads; a
    model from load_model, or passed through it, lets it go as the module
    returns, while hook_pattern (and so run_with_cache) still sees the pattern."""
    from transformer_lens.model_bridge import TransformerBridge

    from tc_explore.model import _forget_pattern, hook_attn_pattern
    from tc_explore.testing import build_tiny_gpt2
    tokens = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=hook_attn_pattern(0))
    assert _activations_left_on(tiny_model) == []
    pattern = cache[hook_attn_pattern(0)]
    assert pattern.shape == (2, tiny_model.cfg.n_heads, 9, 9)
    assert torch.allclose(pattern.sum(-1), torch.ones(()))

    # Booted without tc_explore, a bridge keeps one pattern per layer...
    bridge = TransformerBridge.boot_transformers(str(build_tiny_gpt2(tmp_path / "m", n_layers=2, d_model=32)),
                                                 device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True)
    with torch.inference_mode():
        before = bridge(tokens, return_type="logits")
    assert len(_activations_left_on(bridge)) == 2
    # ... until passed through load_model (twice: one hook each still).
    assert load_model(load_model(bridge)) is bridge
    hooked = [m for m in bridge.modules() if _forget_pattern in m._forward_hooks.values()]
    assert len(hooked) == 2 and all(list(m._forward_hooks.values()).count(_forget_pattern) == 1 for m in hooked)
    with torch.inference_mode():
        after = bridge(tokens, return_type="logits")
    assert _activations_left_on(bridge) == [] and torch.equal(after, before)
