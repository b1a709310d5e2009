"""Quiet failures made loud: words a word-level tokenizer does not know, and a
target string whose twin (leading space toggled) is the token the model predicts."""
import warnings

import pytest

from tc_explore.circuits import logit_direction_target, prompt_context
from tc_explore.corpus import Corpus
from tc_explore.errors import InvalidInputError, TokenizationWarning
from tc_explore.model import single_token_id, to_tokens
from tc_explore.tokenization import unknown_pieces

PROMPT = "The war lasted from 1735 to 17"


def test_unknown_words_in_a_prompt_warn_and_name_the_words(demo_model):
    with pytest.warns(TokenizationWarning, match=r"'Paris'.*<\|endoftext\|>|<\|endoftext\|>.*'Paris'"):
        tokens = to_tokens(demo_model, "The war lasted in Paris from 1735 to 17")
    assert int(demo_model.tokenizer.unk_token_id) in tokens[0, 1:].tolist()


def test_known_words_and_a_literal_endoftext_do_not_warn(demo_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizationWarning)
        to_tokens(demo_model, PROMPT)
        to_tokens(demo_model, PROMPT + "<|endoftext|> The war")
    assert unknown_pieces(demo_model.tokenizer, "The war<|endoftext|>") == []
    assert [p.strip() for p in unknown_pieces(demo_model.tokenizer, "The zork war qux")] == ["zork", "qux"]


def test_corpus_warns_once_about_unknown_words(demo_model):
    corpus = Corpus.from_texts(["The war lasted in Paris", "hello world"] * 4, demo_model, seq_len=6)
    with pytest.warns(TokenizationWarning) as caught:
        corpus.take(2)
    unknown = [w for w in caught if issubclass(w.category, TokenizationWarning)]
    assert len(unknown) == 1
    assert all(w in str(unknown[0].message) for w in ("Paris", "hello", "world"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizationWarning)
        corpus.take(2)                       # once per corpus, not once per pass


def test_target_string_outside_the_vocabulary_is_refused(demo_model):
    with pytest.raises(InvalidInputError, match="not a token of this tokenizer"):
        single_token_id(demo_model, "Paris")
    assert single_token_id(demo_model, " 90") != single_token_id(demo_model, "90")


def test_target_with_the_leading_space_of_the_wrong_twin_warns(demo_model, demo_transcoders):
    ctx = prompt_context(demo_model, demo_transcoders, PROMPT)
    # After "17" the model continues a year without a space: " 90" is not the token meant.
    with pytest.warns(TokenizationWarning, match=r"' 90'.*'90'"):
        spaced = logit_direction_target(ctx, " 90", "20")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenizationWarning)
        plain = logit_direction_target(ctx, "90", "20")
    assert spaced.value != plain.value
