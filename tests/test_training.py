import json

import pytest
import torch

from tc_explore import load_transcoders
from tc_explore.errors import InvalidInputError
from tc_explore.training import (CHECKPOINT_NAME, TrainingConfig, _Layers, _resample,
                                 save_transcoder_set, train_transcoders)


def _tokens(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


class _CountingModel:
    """Delegates to a model and records every forward that fills the buffer."""

    def __init__(self, model):
        self._model = model
        self.calls = []

    def run_with_cache(self, tokens, names_filter=None, **kwargs):
        out, cache = self._model.run_with_cache(tokens, names_filter=names_filter, **kwargs)
        self.calls.append((tokens.shape[0], sorted(cache.keys())))
        return out, cache

    def __getattr__(self, name):
        return getattr(self._model, name)


def _config(**kw):
    base = dict(n_steps=60, batch_size=128, lr=3e-3, l1_coefficient=0.3, warmup_steps=5,
                buffer_batches=4, model_batch_size=16, dead_window=20, log_every=10,
                expansion_factor=4, show_progress=False, seed=0)
    base.update(kw)
    return TrainingConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_model):
    counting = _CountingModel(tiny_model)
    tokens = _tokens(tiny_model, 400)
    result = train_transcoders(counting, tokens, _config(layers=[0, 5]))
    return counting, result


def test_loss_decreases_and_metrics_are_sane(trained, tiny_model):
    _, result = trained
    assert result.steps == 60
    first, last = result.history[0], result.history[-1]
    for i in range(2):
        assert last["fvu"][i] < 0.7 * first["fvu"][i]
    assert sum(last["loss"]) < sum(first["loss"])
    for layer in (0, 5):
        m = result.metrics[layer]
        assert 0 <= m["fvu"] < 0.8
        assert 0 < m["l0"] < result.transcoders[layer].d_sae
        tc = result.transcoders[layer]
        assert tc.d_sae == 4 * tiny_model.cfg.d_model
        assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(tc.d_sae), atol=1e-5)
        freq = result.log10_frequencies[layer]
        assert freq.shape == (tc.d_sae,) and (freq <= 0).all() and (freq >= -10).all()


def test_all_layers_fed_by_one_forward_per_batch(trained):
    counting, result = trained
    wanted = ["blocks.0.hook_mlp_out", "blocks.0.ln2.hook_normalized",
              "blocks.5.hook_mlp_out", "blocks.5.ln2.hook_normalized"]
    assert counting.calls and all(set(wanted) <= set(keys) for _, keys in counting.calls)
    assert all(k.split(".")[1] in ("0", "5") for _, keys in counting.calls for k in keys)
    assert sum(n for n, _ in counting.calls) == result.sequences_consumed
    # one pass: the vectors used are all the data read, nothing read twice
    assert result.sequences_consumed * 32 >= 60 * 128


def test_files_reload_through_load_transcoders(trained, tiny_model, tmp_path):
    _, result = trained
    path = save_transcoder_set(result, tmp_path, name="fixture-trained", model_name="gpt2")
    entry = json.loads(path.read_text())
    assert entry["layers"] == [0, 5] and entry["d_sae"] == 128
    assert not list(tmp_path.glob("*.tmp"))
    ts = load_transcoders(str(tmp_path), device="cpu")
    assert ts.layers == [0, 5]
    ts.check_fits(tiny_model)
    for layer in (0, 5):
        mine, loaded = result.transcoders[layer], ts[layer]
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_dec_out"):
            assert torch.equal(getattr(mine, name), getattr(loaded, name))
        assert loaded.input_hook == f"blocks.{layer}.ln2.hook_normalized"
        assert loaded.output_hook == f"blocks.{layer}.hook_mlp_out"
        assert torch.equal(ts.log_feature_frequency(layer), result.log10_frequencies[layer])
    # reconstruction on fresh tokens is far better than predicting the mean
    tokens = _tokens(tiny_model, 8, seed=9)
    _, cache = tiny_model.run_with_cache(tokens)
    x, y = cache["blocks.5.ln2.hook_normalized"], cache["blocks.5.hook_mlp_out"]
    out, _ = ts[5](x)
    fvu = ((out - y) ** 2).sum() / ((y - y.mean((0, 1))) ** 2).sum()
    assert fvu < 0.8


def test_checkpoint_resume(tiny_model, tmp_path):
    tokens = _tokens(tiny_model, 400, seed=1)
    cfg = _config(layers=[3], n_steps=20, checkpoint_every=10)
    first = train_transcoders(tiny_model, tokens, cfg, checkpoint_dir=tmp_path)
    ckpt = tmp_path / CHECKPOINT_NAME
    assert ckpt.is_file() and not list(tmp_path.glob("*.tmp"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 20 and saved["sequences_consumed"] == first.sequences_consumed
    more = train_transcoders(tiny_model, tokens, _config(layers=[3], n_steps=40, checkpoint_every=10),
                             checkpoint_dir=tmp_path)
    assert more.steps == 40
    assert [h["step"] for h in more.history] == [10, 20, 30, 40]
    assert more.history[:2] == first.history[:2]
    assert more.sequences_consumed > first.sequences_consumed
    with pytest.raises(InvalidInputError, match="layers"):
        train_transcoders(tiny_model, tokens, _config(layers=[4], n_steps=40), checkpoint_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="expansion_factor"):
        train_transcoders(tiny_model, tokens, _config(layers=[3], n_steps=41, expansion_factor=2),
                          checkpoint_dir=tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="Cannot read checkpoint"):
        train_transcoders(tiny_model, tokens, cfg, checkpoint_dir=tmp_path)


def test_stream_shorter_than_steps_stops_early(tiny_model):
    result = train_transcoders(tiny_model, _tokens(tiny_model, 40), _config(layers=[0], n_steps=500))
    assert 0 < result.steps < 500
    assert result.sequences_consumed == 40


def test_export_keeps_the_function_with_unit_decoder_rows():
    net = _Layers(2, 8, 32, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.W_dec.mul_(torch.rand(2, 32, 1) * 3)
        net.b_enc.normal_()
        net.b_dec.normal_()
        net.in_scale.copy_(torch.tensor([0.5, 4.0]))
        net.out_scale.copy_(torch.tensor([0.01, 30.0]))
    x = torch.randn(50, 2, 8)
    out, acts = net(x)
    for i in range(2):
        tc = net.transcoder(i, layer=i, input_hook=f"blocks.{i}.ln2.hook_normalized",
                            output_hook=f"blocks.{i}.hook_mlp_out")
        tc_out, tc_acts = tc(x[:, i])
        assert torch.allclose(tc_out, out[:, i], rtol=1e-4, atol=1e-5 * net.out_scale[i].item())
        assert torch.equal(tc_acts > 0, acts[:, i] > 0)
        assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


def test_resampling_reinitialises_dead_features():
    g = torch.Generator().manual_seed(0)
    net = _Layers(1, 8, 16, 8, g)
    opt = torch.optim.Adam(net.parameters())
    x, y = torch.randn(64, 1, 8), torch.randn(64, 1, 8)
    out, _ = net(x)
    out.pow(2).sum().backward()
    opt.step()
    since = torch.zeros(1, 16, dtype=torch.long)
    since[0, [2, 7]] = 100
    W_before = net.W_enc.detach().clone()
    _resample(net, opt, since, x, y, out.detach(), _config(), g)
    assert since[0, [2, 7]].tolist() == [0, 0]
    assert not torch.equal(net.W_enc[0][:, 2], W_before[0][:, 2])
    assert torch.equal(net.W_enc[0][:, 3], W_before[0][:, 3])
    assert net.b_enc[0, 2] == 0 and net.b_enc[0, 7] == 0
    assert (opt.state[net.W_enc]["exp_avg"][0][:, [2, 7]] == 0).all()
    # the new encoder direction is a centred training input
    col = net.W_enc[0][:, 2] / net.W_enc[0][:, 2].norm()
    centred = x[:, 0] - net.b_dec[0]
    cos = (centred / centred.norm(dim=1, keepdim=True)) @ col
    assert cos.max().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kwargs", [dict(n_steps=0), dict(batch_size=-1), dict(lr=0.0),
                                    dict(l1_coefficient=-1.0), dict(buffer_batches=1),
                                    dict(decay_frac=2.0), dict(resample_every=0),
                                    dict(d_sae=0)])
def test_bad_config_is_refused(tiny_model, kwargs):
    with pytest.raises(InvalidInputError):
        train_transcoders(tiny_model, _tokens(tiny_model, 4), _config(**kwargs))


def test_bad_layers_and_tokens_are_refused(tiny_model):
    with pytest.raises(InvalidInputError, match="out of range"):
        train_transcoders(tiny_model, _tokens(tiny_model, 4), _config(layers=[99]))
    with pytest.raises(InvalidInputError, match="empty"):
        train_transcoders(tiny_model, _tokens(tiny_model, 4), _config(layers=[]))
    with pytest.raises(InvalidInputError, match="integer tensor"):
        train_transcoders(tiny_model, torch.zeros(4, 32), _config(layers=[0]))
    with pytest.raises(InvalidInputError, match="empty"):
        train_transcoders(tiny_model, torch.zeros(0, 32, dtype=torch.long), _config(layers=[0]))
    with pytest.raises(InvalidInputError, match="No transcoders"):
        save_transcoder_set({}, "/nonexistent-dir-not-created", name="x", model_name="m")
