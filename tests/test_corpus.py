import json

import numpy as np
import pytest
import torch

from tc_explore.corpus import Corpus, as_corpus
from tc_explore.errors import InvalidInputError
from tc_explore.testing import fixture_texts

SEQ_LEN = 12


def _texts(n=40, seed=0):
    return fixture_texts(n, seed=seed, max_words=15)


def _stream(model, texts, sep):
    """The documents' tokens joined by the separator, as the corpus should pack them."""
    out = []
    for i, t in enumerate(texts):
        if i:
            out.append(sep)
        out.extend(model.tokenizer(t, add_special_tokens=False)["input_ids"])
    return out


def test_sequences_start_with_bos_and_pack_documents_in_seeded_order(tiny_model):
    texts = _texts()
    corpus = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=3)
    seqs = corpus.take(10).numpy()
    bos = tiny_model.tokenizer.bos_token_id
    assert seqs.shape == (10, SEQ_LEN)
    assert (seqs[:, 0] == bos).all()
    order = np.random.default_rng(3).permutation(len(texts))
    expected = _stream(tiny_model, [texts[i] for i in order], corpus.separator_token_id)
    # Bodies of consecutive sequences continue the document stream without gaps.
    assert seqs[:, 1:].reshape(-1).tolist() == expected[:10 * (SEQ_LEN - 1)]


def test_same_seed_same_sequences_other_seed_other_order(tiny_model):
    texts = _texts()
    a = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=1).take(8)
    b = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=1).take(8)
    c = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=2).take(8)
    unshuffled = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=None).take(8).numpy()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert unshuffled[:, 1:].reshape(-1).tolist() == \
        _stream(tiny_model, texts, tiny_model.tokenizer.eos_token_id)[:8 * (SEQ_LEN - 1)]


def test_take_with_start_matches_the_full_stream(tiny_model):
    corpus = Corpus.from_texts(_texts(), tiny_model, SEQ_LEN, seed=0)
    full = corpus.take(9)
    assert torch.equal(corpus.take(4, start=5), full[5:9])
    batches = list(corpus.batches(4, n_sequences=9))
    assert [len(b) for b in batches] == [4, 4, 1]
    assert np.array_equal(np.concatenate(batches), full.numpy())


def test_dataset_in_memory_and_streaming_are_reproducible(tiny_model):
    import datasets

    texts = _texts(60)
    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(60))})
    a = Corpus.from_dataset(ds, tiny_model, SEQ_LEN, seed=5).take(6)
    b = Corpus.from_dataset(ds, tiny_model, SEQ_LEN, seed=5).take(6)
    assert torch.equal(a, b)
    # Unshuffled, the dataset packs exactly like the list of strings.
    plain = Corpus.from_dataset(ds, tiny_model, SEQ_LEN, seed=None).take(6)
    assert torch.equal(plain, Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=None).take(6))

    stream = ds.to_iterable_dataset()
    s1 = Corpus.from_dataset(stream, tiny_model, SEQ_LEN, seed=5, shuffle_buffer=16)
    s2 = Corpus.from_dataset(stream, tiny_model, SEQ_LEN, seed=5, shuffle_buffer=16)
    assert s1.description["streaming"] is True
    assert torch.equal(s1.take(6), s2.take(6))
    with pytest.raises(InvalidInputError, match="no column 'body'"):
        Corpus.from_dataset(ds, tiny_model, SEQ_LEN, text_column="body")


def test_files_split_by_line(tiny_model, tmp_path):
    texts = _texts(12)
    (tmp_path / "a.txt").write_text("\n".join(texts[:6]) + "\n")
    (tmp_path / "b.txt").write_text("\n\n".join(texts[6:]))
    corpus = Corpus.from_files([tmp_path / "a.txt", tmp_path / "b.txt"], tiny_model, SEQ_LEN,
                               seed=None, split="line")
    n = (len(_stream(tiny_model, texts, 0)) // (SEQ_LEN - 1))
    seqs = corpus.take(n).numpy()
    assert seqs[:, 1:].reshape(-1).tolist() == \
        _stream(tiny_model, texts, corpus.separator_token_id)[:n * (SEQ_LEN - 1)]
    with pytest.raises(InvalidInputError, match="do not exist"):
        Corpus.from_files([tmp_path / "missing.txt"], tiny_model, SEQ_LEN)


def test_clear_errors(tiny_model):
    corpus = Corpus.from_texts(_texts(3), tiny_model, SEQ_LEN)
    with pytest.raises(InvalidInputError, match="yields only"):
        corpus.take(1000)
    with pytest.raises(InvalidInputError, match="seq_len"):
        Corpus.from_texts(_texts(3), tiny_model, 1)
    with pytest.raises(InvalidInputError, match="Cannot make a corpus"):
        as_corpus(42, tiny_model)


def test_token_ids_are_served_as_given(tiny_model):
    ids = torch.randint(1, 100, (5, 8))
    ids[:, 0] = 0
    corpus = as_corpus(ids, tiny_model)
    assert torch.equal(corpus.take(5), ids)
    assert corpus.description["kind"] == "token_ids"


def test_cached_corpus_serves_the_same_sequences_without_reading_documents(tiny_model, tmp_path):
    texts = _texts(80)
    corpus = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=4)
    cached = corpus.cached(20, cache_dir=tmp_path)
    assert cached.description == corpus.description
    assert torch.equal(cached.take(20), corpus.take(20))
    assert torch.equal(cached.take(7, start=9), corpus.take(7, start=9))
    assert [len(b) for b in cached.batches(8, 13, start=5)] == [8, 5]

    reads = []

    def counting():                                      # the same documents, counted
        reads.append(1)
        return corpus.documents()
    again = Corpus(counting, corpus.tokenizer, SEQ_LEN, corpus.bos_token_id, corpus.separator_token_id,
                   {k: v for k, v in corpus.description.items()})
    assert torch.equal(again.cached(12, cache_dir=tmp_path).take(12), corpus.take(12))
    assert reads == []                                   # a shorter request is served from the cache
    assert torch.equal(again.cached(30, cache_dir=tmp_path).take(30), corpus.take(30))
    assert reads == [1]                                  # a longer one rebuilds it once
    other = Corpus.from_texts(texts, tiny_model, SEQ_LEN, seed=5).cached(12, cache_dir=tmp_path)
    assert not torch.equal(other.take(12), corpus.take(12))   # another description, another entry


def test_cached_corpus_that_runs_out_keeps_what_there_is(tiny_model, tmp_path):
    corpus = Corpus.from_texts(_texts(3), tiny_model, SEQ_LEN)
    n = len(list(corpus.sequences()))
    cached = corpus.cached(1000, cache_dir=tmp_path)
    assert torch.equal(cached.take(n), corpus.take(n))
    with pytest.raises(InvalidInputError, match="yields only"):
        cached.take(n + 1)
    assert len(corpus.cached(2000, cache_dir=tmp_path).take(n)) == n   # known short: not rebuilt


def test_streamed_hub_corpus_opens_the_dataset_only_when_read(tiny_model, tmp_path, monkeypatch):
    import datasets

    texts = _texts(40)
    ds = datasets.Dataset.from_dict({"text": texts})
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        return ds.to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus = Corpus.from_hub("someone/texts", tiny_model, SEQ_LEN, seed=3, shuffle_buffer=8)
    assert calls == []
    expected = Corpus.from_dataset(ds.to_iterable_dataset(), tiny_model, SEQ_LEN, seed=3,
                                   shuffle_buffer=8).take(6)
    assert torch.equal(corpus.cached(6, cache_dir=tmp_path).take(6), expected)
    assert calls == [("someone/texts", None, "train", True)]
    again = Corpus.from_hub("someone/texts", tiny_model, SEQ_LEN, seed=3, shuffle_buffer=8)
    assert torch.equal(again.cached(6, cache_dir=tmp_path).take(6), expected)
    assert len(calls) == 1                               # served from the cache, no dataset opened
    assert corpus.description["streaming"] is True and corpus.description["name"] == "someone/texts"


def test_hub_slice_is_downloaded_once_then_read_from_disk(tiny_model, tmp_path):
    """A fixed slice goes through ``datasets`` (streamed, saved with
    save_to_disk) and is read back without the source on later calls."""
    import shutil

    from tc_explore.corpus import hub_slice, hub_slice_directory
    from tc_explore.testing import fixture_texts

    source = tmp_path / "owt-like"
    source.mkdir()
    texts = fixture_texts(30, seed=3)
    (source / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    first = hub_slice(str(source), 12)
    assert first["text"] == texts[:12]
    assert (hub_slice_directory(str(source), 12) / "dataset_info.json").is_file()
    shutil.rmtree(source)                 # the source is gone: the cached slice still loads
    again = hub_slice(str(source), 12)
    assert again["text"] == texts[:12]
    corpus = Corpus.from_hub(str(source), tiny_model, seq_len=8, n_documents=12)
    assert corpus.description["first_documents"] == 12
    assert corpus.take(3).shape == (3, 8)
    with pytest.raises(InvalidInputError, match="n_documents"):
        hub_slice(str(source), 0)


def test_uncached_hub_dataset_offline_says_what_to_do(offline_hub, tiny_model):
    from tc_explore.corpus import hub_slice
    from tc_explore.errors import OfflineFileMissingError

    with pytest.raises(OfflineFileMissingError, match=r"HF_HUB_OFFLINE=1.*hub_slice\('nobody/no-such-corpus', 50\)"):
        hub_slice("nobody/no-such-corpus", 50)
    with pytest.raises(OfflineFileMissingError, match="n_documents=N"):
        Corpus.from_hub("nobody/no-such-corpus", tiny_model, seq_len=8).take(1)
