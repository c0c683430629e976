"""The tokeniser and the vocabulary."""

import json

import numpy as np
import pytest

from ccr_jax.data import text


def test_tokenize_lower_cases_and_drops_punctuation():
  assert text.tokenize("Top-left: there is a TINY crimson disc.") == [
      "top", "left", "there", "is", "a", "tiny", "crimson", "disc"]
  assert text.tokenize("  two  spaces,\tand\na 3rd line!") == [
      "two", "spaces", "and", "a", "3rd", "line"]
  assert text.tokenize("A man's hat (red)") == ["a", "man", "s", "hat", "red"]


def test_tokenize_strips_accents_instead_of_splitting():
  assert text.tokenize("Café NAÏVE") == ["cafe", "naive"]


def test_tokenize_empty():
  assert text.tokenize("") == []
  assert text.tokenize("?!") == []


def test_build_vocabulary_orders_by_count_then_alphabet():
  vocab = text.build_vocabulary(["b a c", "a b", "a d"])
  # a: 3, b: 2, c: 1, d: 1 (c before d alphabetically).
  assert vocab.words == ("<pad>", "<start>", "<end>", "<unk>",
                         "a", "b", "c", "d")
  assert vocab.size == 8


def test_build_vocabulary_min_count():
  vocab = text.build_vocabulary(["b a c", "a b", "a d"], min_count=2)
  assert vocab.words[4:] == ("a", "b")
  with pytest.raises(ValueError):
    text.build_vocabulary(["a"], min_count=0)


def test_build_vocabulary_uses_the_tokeniser():
  vocab = text.build_vocabulary(["Red, red RED."])
  assert vocab.words[4:] == ("red",)


def test_encode_pads_and_ends():
  vocab = text.build_vocabulary(["a red disc", "a blue box"])
  ids = {w: i for i, w in enumerate(vocab.words)}
  tokens, lengths, num_truncated = vocab.encode(["A red box", "disc"], 6)
  assert tokens.dtype == np.int32 and tokens.shape == (2, 6)
  assert lengths.dtype == np.int32
  np.testing.assert_array_equal(tokens, [
      [1, ids["a"], ids["red"], ids["box"], 2, 0],
      [1, ids["disc"], 2, 0, 0, 0]])
  np.testing.assert_array_equal(lengths, [5, 3])
  assert num_truncated == 0


def test_encode_truncates_keeping_end_and_counts():
  vocab = text.build_vocabulary(["one two three four five"])
  tokens, lengths, num_truncated = vocab.encode(
      ["one two three four five", "one two three", "one"], 5)
  ids = {w: i for i, w in enumerate(vocab.words)}
  np.testing.assert_array_equal(tokens[0], [1, ids["one"], ids["two"],
                                            ids["three"], 2])
  np.testing.assert_array_equal(tokens[1], [1, ids["one"], ids["two"],
                                            ids["three"], 2])
  np.testing.assert_array_equal(lengths, [5, 5, 3])
  assert num_truncated == 1  # "one two three" fits exactly.


def test_encode_unknown_words():
  vocab = text.build_vocabulary(["red"])
  tokens, _, _ = vocab.encode(["red zebra"], 4)
  np.testing.assert_array_equal(tokens, [[1, vocab.words.index("red"),
                                          text.UNK_ID, 2]])


@pytest.mark.parametrize("captions, index", [
    (["fine", ""], "1"), (["fine", "ok", "..."], "2"), ([None], "0"),
    (["a", 3], "1")])
def test_encode_rejects_empty_or_non_string_naming_index(captions, index):
  vocab = text.build_vocabulary(["fine"])
  with pytest.raises(ValueError, match=f"Caption {index}"):
    vocab.encode(captions, 8)


def test_encode_rejects_a_bare_string_and_tiny_max_len():
  vocab = text.build_vocabulary(["fine"])
  with pytest.raises(ValueError, match="not one string"):
    vocab.encode("fine", 8)
  with pytest.raises(ValueError, match="max_len"):
    vocab.encode(["fine"], 2)


def test_json_round_trip():
  vocab = text.build_vocabulary(["a red disc", "a blue box", "a red box"])
  restored = text.Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
  assert restored == vocab
  captions = ["a red box", "blue zebra"]
  for got, want in zip(restored.encode(captions, 7), vocab.encode(captions, 7)):
    np.testing.assert_array_equal(got, want)


def test_from_json_refuses_another_tokeniser():
  data = dict(text.build_vocabulary(["a"]).to_json(), tokenizer="other")
  with pytest.raises(ValueError, match="tokenizer 'other', but this code "
                     "tokenises with 'lower_ascii_alnum_v1'"):
    text.Vocabulary.from_json(data)
  # A vocabulary saved by the word tokeniser is no WordPiece tokenizer (refused
  # before the packaged tokenizer file is looked for).
  with pytest.raises(ValueError, match="tokenises with "
                     "'hf_tokenizers_wordpiece_v1'"):
    text.WordPieceTokenizer.from_json(text.build_vocabulary(["a"]).to_json())
  assert text.tokenizer_from_json(text.build_vocabulary(["a"]).to_json()) == (
      text.build_vocabulary(["a"]))


def test_vocabulary_validates_specials_and_duplicates():
  with pytest.raises(ValueError, match="start with"):
    text.Vocabulary(words=("a", "b"))
  with pytest.raises(ValueError, match="repeat"):
    text.Vocabulary(words=text.SPECIAL_TOKENS + ("a", "a"))
