"""Loading a transcoder file must never run code from it."""
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from tc_explore import load_transcoders
from tc_explore.errors import UnsafeFileError
from tc_explore.testing import install_in_hf_cache


class _TouchFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpenFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_torch_file(path: Path, payload) -> Path:
    torch.save({"cfg": payload, "state_dict": {"W_enc": torch.zeros(2, 2)}}, str(path))
    return path


def _malicious_raw_pickle(path: Path, payload) -> Path:
    path.write_bytes(pickle.dumps({"cfg": payload}, protocol=2))
    return path


NAME = "final_sparse_autoencoder_gpt2-small_blocks.0.ln2.hook_normalized_24576.pt"


@pytest.mark.parametrize("writer", [_malicious_torch_file, _malicious_raw_pickle])
@pytest.mark.parametrize("payload_cls", [_TouchFile, _OpenFile])
def test_malicious_local_file_refused_without_side_effect(tmp_path, writer, payload_cls):
    marker = tmp_path / "pwned"
    directory = tmp_path / "set"
    directory.mkdir()
    writer(directory / NAME, payload_cls(marker))
    ts = load_transcoders(directory, device="cpu")
    with pytest.raises(UnsafeFileError, match="Nothing from the file was executed"):
        ts[0]
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_malicious_file_from_hub_cache_refused(offline_hub, tmp_path):
    """The same through huggingface_hub: a circuit-tracer style repo whose
    config points at a poisoned .pt file in another repo."""
    marker = tmp_path / "pwned"
    work = tmp_path / "work"
    work.mkdir()
    evil = _malicious_torch_file(work / NAME, _TouchFile(marker))
    install_in_hf_cache(offline_hub.hf_home, "mallory/poisoned-weights", {NAME: evil})
    (work / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "gpt2", "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out",
        "transcoders": [f"hf://mallory/poisoned-weights/{NAME}"]}))
    install_in_hf_cache(offline_hub.hf_home, "mallory/transcoders", {"config.yaml": work / "config.yaml"})
    ts = load_transcoders("mallory/transcoders", device="cpu")
    with pytest.raises(UnsafeFileError):
        ts[0]
    assert not marker.exists()


def test_sparsity_file_is_also_checked(tmp_path):
    from tc_explore.formats import read_log_feature_sparsity
    marker = tmp_path / "pwned"
    path = tmp_path / "x_log_feature_sparsity.pt"
    torch.save(_TouchFile(marker), str(path))
    with pytest.raises(UnsafeFileError):
        read_log_feature_sparsity(path)
    assert not marker.exists()
