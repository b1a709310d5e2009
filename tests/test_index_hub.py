"""Indexes shared through the Hub.

``from_hub`` runs the real ``huggingface_hub.snapshot_download`` offline
(``HF_HUB_OFFLINE=1``, set in conftest) against dataset repos laid out in the
session's HF cache exactly as huggingface_hub lays out a download.

``push_to_hub`` is tested against ``HubStandIn``, a stand-in for
``huggingface_hub.HfApi`` (the Hub is unreachable here): it checks the calls
push_to_hub makes (repo type, branch, one commit holding every index file and
the card, deletions of stale files) and materialises each commit into the HF
cache, so the same files round-trip through ``from_hub``. The Hub's own
handling of those calls (LFS uploads, auth) is not tested.
"""
import hashlib
import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from tc_explore.corpus import Corpus
from tc_explore.dashboard import add_weight_views
from tc_explore.errors import IncompatibleTranscoderError, InvalidInputError, OfflineFileMissingError
from tc_explore.index import FeatureIndex
from tc_explore.index.hub import dataset_card, index_files
from tc_explore.testing import fixture_texts, install_in_hf_cache


class HubStandIn:
    """Records HfApi calls; each commit becomes a snapshot in the HF cache."""

    def __init__(self, hf_home):
        self.hf_home = hf_home
        self.calls = []
        self.repos = {}                    # (repo_id, branch) -> {path: bytes}

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, token=None):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
        self.repos.setdefault((repo_id, "main"), {".gitattributes": b"*.parquet filter=lfs\n"})

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, token=None):
        self.calls.append(("create_branch", repo_id, branch, repo_type))
        self.repos.setdefault((repo_id, branch), dict(self.repos[repo_id, "main"]))

    def list_repo_files(self, repo_id, *, repo_type=None, revision=None, token=None):
        self.calls.append(("list_repo_files", repo_id, repo_type, revision))
        return sorted(self.repos[repo_id, revision or "main"])

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, revision=None,
                      token=None):
        operations = list(operations)
        self.calls.append(("create_commit", repo_id, repo_type, revision, commit_message, operations))
        files = self.repos[repo_id, revision or "main"]
        for op in operations:
            if isinstance(op, CommitOperationDelete):
                del files[op.path_in_repo]
            else:
                assert isinstance(op, CommitOperationAdd)
                with op.as_file() as f:
                    files[op.path_in_repo] = f.read()
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items()))
                              .encode()).hexdigest()
        install_in_hf_cache(self.hf_home, repo_id, files, revision=commit, repo_type="dataset",
                            ref=revision or "main")
        return commit


@pytest.fixture(scope="module")
def index(tiny_model, tiny_transcoders, tmp_path_factory):
    corpus = Corpus.from_texts(fixture_texts(60, seed=4), tiny_model, 16, seed=0)
    return FeatureIndex.build(tiny_model, tiny_transcoders, corpus, 16 * 8,
                              tmp_path_factory.mktemp("hub") / "idx", layers=[2, 9], k=3,
                              n_samples=4, batch_size=4, window=(2, 1))


def _same_files(a, b):
    assert index_files(a) == index_files(b)
    for rel in index_files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_push_then_from_hub_round_trip(index, offline_hub, tiny_model, tiny_transcoders):
    api = HubStandIn(offline_hub.hf_home)
    index.push_to_hub("alice/gpt2-tiny-index", api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "list_repo_files", "create_commit"]
    assert api.calls[0][2] == "dataset" and api.calls[0][4] is True
    _, repo, repo_type, revision, message, ops = api.calls[-1]
    assert repo_type == "dataset" and revision is None and "gpt2-small" in message
    added = sorted(op.path_in_repo for op in ops)
    assert added == sorted(index_files(index.directory) + ["README.md"])
    assert "manifest.json" in added and "tokens.parquet" in added and "layer_09/top.parquet" in added

    got = FeatureIndex.from_hub("alice/gpt2-tiny-index", model=tiny_model, transcoders=tiny_transcoders)
    assert "datasets--alice--gpt2-tiny-index" in str(got.directory)
    _same_files(index.directory, got.directory)
    assert got.manifest == index.manifest
    a, b = index.top_examples(9, 5), got.top_examples(9, 5)
    assert [(e.sequence, e.position, e.activation) for e in a] == \
        [(e.sequence, e.position, e.activation) for e in b]


def test_dataset_card_lists_what_was_indexed(index):
    card = dataset_card(index, "alice/x")
    m = index.manifest
    assert card.startswith("---\n") and "tc_explore" in card.split("---")[1]
    for text in ("gpt2-small", m["model"], m["revision"], f"{m['n_tokens']:,}", "| seed | 0",
                 "(k) | 3", "FeatureIndex.from_hub('alice/x'", m["corpus"]["tokenizer"]):
        assert str(text) in card, text
    recorded = m["fingerprints"]["transcoders"]
    assert f"| transcoder layer 9 | `{recorded['9']}` |" in card


def test_a_second_push_deletes_files_the_index_no_longer_has(index, offline_hub, tmp_path):
    api = HubStandIn(offline_hub.hf_home)
    api.create_repo("bob/idx", repo_type="dataset")
    api.repos["bob/idx", "main"]["layer_05/top.parquet"] = b"old"
    index.push_to_hub("bob/idx", api=api, revision="v2", commit_message="again")
    assert ("create_branch", "bob/idx", "v2", "dataset") in api.calls
    ops = api.calls[-1][-1]
    assert [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)] == ["layer_05/top.parquet"]
    got = FeatureIndex.from_hub("bob/idx", revision="v2")
    _same_files(index.directory, got.directory)


def test_checkpoints_and_temporary_files_are_not_uploaded(index, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(index.directory, copy)
    (copy / "checkpoint.pt").write_bytes(b"x")
    (copy / "layer_02" / "top.parquet.tmp").write_bytes(b"x")
    assert index_files(copy) == index_files(index.directory)


def test_from_hub_offline_without_the_repo_says_how_to_get_it():
    with pytest.raises(OfflineFileMissingError, match="tc-explore index pull carol/none"):
        FeatureIndex.from_hub("carol/none")


def test_from_hub_refuses_other_weights(index, offline_hub, tiny_model, tiny_transcoders, tmp_path):
    import shutil
    views_index = FeatureIndex(shutil.copytree(index.directory, tmp_path / "v"))
    add_weight_views(views_index, tiny_model, tiny_transcoders, k=3, n_heads=1)
    api = HubStandIn(offline_hub.hf_home)
    views_index.push_to_hub("dave/idx", api=api)
    assert "weight views: transcoder layer 9" in api.repos["dave/idx", "main"]["README.md"].decode()
    FeatureIndex.from_hub("dave/idx", model=tiny_model, transcoders=tiny_transcoders)   # same weights

    from tc_explore.transcoder import TranscoderSet
    other = {layer: tiny_transcoders[layer] for layer in tiny_transcoders.layers}
    changed = type(other[9])(other[9].W_enc.clone(), other[9].b_enc, other[9].W_dec, other[9].b_dec,
                             other[9].b_dec_out, layer=9)
    with torch.no_grad():
        changed.W_enc[0, 0] += 1.0
    other[9] = changed
    tcs = TranscoderSet.from_transcoders(other, name=tiny_transcoders.name)
    with pytest.raises(IncompatibleTranscoderError, match="layer-9"):
        FeatureIndex.from_hub("dave/idx", model=tiny_model, transcoders=tcs)


def test_push_refuses_a_bad_repo_id(index, offline_hub):
    with pytest.raises(InvalidInputError, match="owner/name"):
        index.push_to_hub("no-slash", api=HubStandIn(offline_hub.hf_home))
