"""The one tokeniser, and the vocabulary built on training captions.

Every caption that reaches a text tower goes through `tokenize`; the
vocabulary's JSON records the tokeniser's name and is saved with each
snapshot, so a snapshot is never scored with differently processed text.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)
# Change the name whenever `tokenize` changes behaviour, so that vocabularies
# saved with older snapshots refuse to load instead of silently mismatching.
TOKENIZER_NAME = "lower_ascii_alnum_v1"

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> list[str]:
  """Lower-cased ASCII word tokens; punctuation separates and is dropped.

  Accents are stripped first ("Café" -> ["cafe"]) so they do not split words.
  Example: "Top-left: a RED disc." -> ["top", "left", "a", "red", "disc"].
  """
  ascii_text = unicodedata.normalize("NFKD", caption).encode(
      "ascii", "ignore").decode("ascii")
  return _WORD.findall(ascii_text.lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Words by id; ids 0..3 are <pad>, <start>, <end>, <unk>."""
  words: tuple[str, ...]

  def __post_init__(self):
    if tuple(self.words[:4]) != SPECIAL_TOKENS:
      raise ValueError(f"A vocabulary must start with {SPECIAL_TOKENS}, got "
                       f"{tuple(self.words[:4])}.")
    if len(set(self.words)) != len(self.words):
      duplicates = sorted(
          w for w, n in collections.Counter(self.words).items() if n > 1)
      raise ValueError(f"Vocabulary words repeat: {duplicates[:10]}.")

  @property
  def size(self) -> int:
    """Number of ids, specials included."""
    return len(self.words)

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {word: i for i, word in enumerate(self.words)}

  def encode(self, captions: Sequence[str],
             max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids `<start> words <end> <pad>...`, truncated to max_len.

    A caption too long keeps its first max_len - 2 words and still ends with
    <end>; it is counted in num_truncated rather than rejected.

    Returns:
      tokens: int32 [N, max_len].
      lengths: int32 [N], tokens before the padding (<start> and <end> count).
      num_truncated: how many captions were cut.

    Raises:
      ValueError: a caption is not a string or has no word tokens (the
        message names its index), or max_len < 3.
    """
    if isinstance(captions, (str, bytes)):
      raise ValueError("encode takes a sequence of captions, not one string; "
                       "wrap it in a list.")
    if max_len < 3:
      raise ValueError(f"max_len={max_len} leaves no room for a word between "
                       "<start> and <end>; use max_len >= 3.")
    tokens = np.full((len(captions), max_len), PAD_ID, np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    num_truncated = 0
    for i, caption in enumerate(captions):
      if not isinstance(caption, str):
        raise ValueError(f"Caption {i} is a {type(caption).__name__}, not a "
                         f"string: {caption!r}.")
      words = tokenize(caption)
      if not words:
        raise ValueError(f"Caption {i} has no word tokens: {caption!r}.")
      if len(words) > max_len - 2:
        words = words[:max_len - 2]
        num_truncated += 1
      ids = [START_ID] + [self._ids.get(w, UNK_ID) for w in words] + [END_ID]
      tokens[i, :len(ids)] = ids
      lengths[i] = len(ids)
    return tokens, lengths, num_truncated

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict that `from_json` reads back."""
    return dict(tokenizer=TOKENIZER_NAME, words=list(self.words))

  @staticmethod
  def from_json(data: dict[str, Any]) -> Vocabulary:
    """The vocabulary saved by `to_json`; refuses another tokeniser's."""
    if data.get("tokenizer") != TOKENIZER_NAME:
      raise ValueError(
          f"Vocabulary was built with tokenizer {data.get('tokenizer')!r}, "
          f"but this code tokenises with {TOKENIZER_NAME!r}.")
    return Vocabulary(words=tuple(data["words"]))


def build_vocabulary(captions: Iterable[str], min_count: int = 1) -> Vocabulary:
  """Words seen at least min_count times in captions (training ones only).

  Words are ordered by decreasing count, then alphabetically, so the same
  captions always give the same ids. VSE++ uses min_count=4.
  """
  if min_count < 1:
    raise ValueError(f"min_count={min_count} must be at least 1.")
  counts = collections.Counter()
  for caption in captions:
    counts.update(tokenize(caption))
  kept = sorted((w for w, n in counts.items() if n >= min_count),
                key=lambda w: (-counts[w], w))
  return Vocabulary(words=SPECIAL_TOKENS + tuple(kept))
