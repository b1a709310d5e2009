def test_tiny_hub_loads(tiny_model, tiny_transcoders, offline_hub):
    assert tiny_model.cfg.n_layers == offline_hub.n_layers
    assert tiny_transcoders.layers == list(range(offline_hub.n_layers))
    assert tiny_transcoders[0].d_sae == offline_hub.d_sae
