"""What every index backend shares: the backend protocol and the index types.

The bottom of `ccr_jax.indexing`: the backend modules (`exact`,
`scann_backend`) import this module and nothing else of the package, and
`registry` imports them, so the import graph has no cycle.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import numpy as np

MODALITIES = ("images", "texts")
# On-disk layout version. 2: metadata field `backend_params` (1 called it
# `scann_params`; `IndexMetadata.from_json` still reads version 1).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, FORMAT_VERSION)

METADATA_FILE = "metadata.json"
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"


class IndexMismatchError(ValueError):
  """An index directory is missing, incomplete, corrupt or not the one expected.

  Attributes:
    directory: the index directory.
    field: what did not match (a metadata field, a file name, ...).
    expected: what the caller expected.
    found: what the directory holds.
  """

  def __init__(self, directory, field: str, expected: Any, found: Any,
               fix: str | None = None):
    self.directory = str(directory)
    self.field = field
    self.expected = expected
    self.found = found
    fix = fix or (
        "delete the directory and rebuild it with ccr_jax.indexing.build_index"
        " + save_index from the right snapshot (rerunning the experiment's"
        " indexing stage does this)")
    super().__init__(
        f"Index at {self.directory}: field '{field}' expected {expected!r},"
        f" found {found!r}. Fix: {fix}.")


class BuildError(Exception):
  """A backend cannot index this gallery; the message says why.

  `build_index` catches it and falls back to the exact backend, recording the
  message as the metadata's 'fallback_reason'.
  """


@dataclasses.dataclass(frozen=True)
class IndexMetadata:
  """What an index was built from; JSON-able.

  Attributes:
    snapshot: the model snapshot (task number) whose towers embedded the gallery.
    task: the task whose gallery this is.
    modality: 'images' or 'texts'.
    dim: embedding dimension.
    count: number of gallery items.
    backend: the name of the backend actually built ('scann', 'exact').
    backend_params: that backend's parameters as used (`{}` for exact; with a
      'fallback_reason' if another backend was asked for but could not
      build). A dict, so an `IndexMetadata` compares by value but is not
      hashable.
    format_version: on-disk layout version (`FORMAT_VERSION` once parsed:
      `from_json` upgrades older layouts).
  """
  snapshot: int
  task: int
  modality: str
  dim: int
  count: int
  backend: str
  backend_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  def to_json(self) -> str:
    """Returns the metadata as an indented JSON object string."""
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "IndexMetadata":
    """Parses `to_json` output of this or an older layout; see `from_dict`."""
    return cls.from_dict(json.loads(text))

  @classmethod
  def from_dict(cls, fields: Any) -> "IndexMetadata":
    """The metadata of a parsed metadata.json, of any version in `READABLE_VERSIONS`.

    Version 1 (before backends were pluggable) named `backend_params`
    `scann_params`; it is renamed and the version set to `FORMAT_VERSION`,
    so a loaded index saves again in the current layout.

    Raises:
      ValueError: not a mapping, a version not in `READABLE_VERSIONS`, or
        missing or unknown fields.
    """
    if not isinstance(fields, dict):
      raise ValueError(f"metadata must be a JSON object, got {type(fields)}")
    version = fields.get("format_version", FORMAT_VERSION)
    if version not in READABLE_VERSIONS:
      raise ValueError(f"format_version {version!r} is not one of"
                       f" {READABLE_VERSIONS}")
    if version == 1:
      fields = {("backend_params" if name == "scann_params" else name): value
                for name, value in fields.items()}
      fields["format_version"] = FORMAT_VERSION
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = required - fields.keys()
    unknown = fields.keys() - names
    if missing or unknown:
      raise ValueError(f"metadata fields missing {sorted(missing)},"
                       f" unknown {sorted(unknown)}")
    return cls(**fields)


@dataclasses.dataclass(frozen=True, eq=False)
class Index:
  """A searchable gallery.

  Attributes:
    metadata: what the index was built from.
    embeddings: float32 [count, dim], L2-normalised.
    item_ids: int64 [count], the gallery item of each row.
    state: what the backend built to search with (ScaNN: its searcher;
      exact: the embeddings as a float32 device array, `exact.device_gallery`,
      placed once; None only in a hand-made Index, which then copies the
      gallery to the device per search).
  """
  metadata: IndexMetadata
  embeddings: np.ndarray
  item_ids: np.ndarray
  state: Any = None


@dataclasses.dataclass(frozen=True)
class Backend:
  """An index backend: pure functions over an `Index`, as optax pairs init/update.

  Attributes:
    name: the name configs and metadata use (`index.backend`).
    parameters: (count, options) -> the JSON-able parameters a gallery of
      `count` items is built with, `options` (a mapping, maybe empty)
      overriding the backend's rule; raises ValueError for options it does
      not know. Stored as `IndexMetadata.backend_params`.
    build: (embeddings float32 [count, dim], parameters) -> state; raises
      `BuildError` when the backend cannot index this gallery.
    search: (index, queries float32 [num_queries, dim], k, block_size) ->
      (scores float32 [num_queries, k] best first, rows int64 [num_queries, k]
      into the gallery, -1 with score -inf where fewer than k were found).
      Called with 1 <= k <= count and num_queries >= 1; block_size is the
      caller's query block (a hint; backends may ignore it).
    save: (index, directory) -> None; writes the state's files into the
      (temporary, not yet published) index directory, beside the shared
      embeddings and item ids. Paths must be relative: the directory is
      renamed afterwards.
    load: (directory, metadata, embeddings float32 [count, dim]) -> state;
      raises `IndexMismatchError` when the saved state is missing or does not
      match the metadata.
  """
  name: str
  parameters: Callable[[int, Mapping[str, Any]], dict[str, Any]]
  build: Callable[[np.ndarray, Mapping[str, Any]], Any]
  search: Callable[[Index, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
  save: Callable[[Index, str], None]
  load: Callable[[str, IndexMetadata, np.ndarray], Any]
