"""Nearest-neighbour indices over gallery embeddings, behind pluggable backends.

A gallery (the images or the captions of one task, embedded with one model
snapshot) becomes an `Index`: its L2-normalised float32 embeddings
`[count, dim]`, the ids of its items `[count]`, the state its backend built
and an `IndexMetadata` that says which snapshot, task and modality it was
built from. Similarity is the dot product (cosine, since embeddings are
normalised); all scores are returned best first.

Backends (`names()`), each a `base.Backend` in its own module:
  scann  (default) ScaNN: brute force below 10k items, else a tree + AH
         (`scann_backend`, whose docstring gives the parameter rule).
  exact  blocked matmul + top-k (`exact`).
Adding one is a module defining `BACKEND = base.Backend(...)` and a line in
`_REGISTRY` below. A backend that cannot index a gallery (ScaNN: an empty one,
or ScaNN raising) raises `base.BuildError`; `build_index` then builds the
exact backend instead, logging why, and the metadata records the backend
actually used.

On disk an index is a directory

    metadata.json     IndexMetadata (snapshot, task, modality, dim, count,
                      backend, backend_params, format_version)
    manifest.json     size and sha256 of every other file, written last
    embeddings.npy    float32 [count, dim]
    item_ids.npy      int64 [count]
    ...               the backend's own files (ScaNN: scann/)

written atomically by `save_index` and checked field by field by `load_index`,
which also reads format version 1 (metadata field `scann_params`).
"""

from __future__ import annotations

import functools
import os
import shutil
import types
import uuid
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.indexing import base
from ccr_jax.indexing import exact
from ccr_jax.indexing import scann_backend
from ccr_jax.indexing.base import (Backend, BuildError, FORMAT_VERSION, Index,
                                   IndexMetadata, IndexMismatchError, MODALITIES)
from ccr_jax.indexing.exact import (DEFAULT_BLOCK_SIZE, exact_search,
                                    map_query_blocks, query_blocks)
from ccr_jax.indexing.scann_backend import BRUTE_FORCE_MAX_COUNT, scann_parameters

# name -> Backend, in the order errors list them. A read-only mapping built
# once from the backend modules' constants: no backend registers itself at
# import time, so importing one never changes another module's state.
_REGISTRY: Mapping[str, Backend] = types.MappingProxyType(
    {b.name: b for b in (scann_backend.BACKEND, exact.BACKEND)})
# The backend built when the requested one cannot index a gallery.
FALLBACK_BACKEND = "exact"

_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


def names() -> tuple[str, ...]:
  """The registered backend names, default ('scann') first."""
  return tuple(_REGISTRY)


# Kept for callers that test membership (`index.backend in BACKENDS`).
BACKENDS = names()


def get_backend(name: str) -> Backend:
  """The backend registered as `name`; ValueError listing the valid ones."""
  if name not in _REGISTRY:
    raise ValueError(f"backend must be one of {names()}, got {name!r}")
  return _REGISTRY[name]


def config_keys() -> dict[str, schema.Key]:
  """The `index` config section: name -> `schema.Key` (configs/default.py's defaults)."""
  return {
      "backend": schema.Key(
          "scann", "nearest-neighbour backend of every gallery index"
          " (scann: brute force below 10k items, else a tree; exact: matmul"
          " + top-k)", schema.one_of(names)),
      "reindex": schema.Key(
          True, "also index old galleries with the new snapshot"),
  }


# ----------------------------------------------------------------------------
# Building.


def _check_gallery(embeddings, item_ids) -> tuple[np.ndarray, np.ndarray]:
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  item_ids = np.asarray(item_ids)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [count, dim], got {embeddings.shape}")
  if item_ids.shape != (embeddings.shape[0],):
    raise ValueError(f"item_ids {item_ids.shape} must be [count] with count ="
                     f" {embeddings.shape[0]}")
  if item_ids.size and not np.issubdtype(item_ids.dtype, np.integer):
    raise ValueError(f"item_ids must be integers, got {item_ids.dtype}")
  return embeddings, item_ids.astype(np.int64)


def build_index(embeddings, item_ids, *, backend: str = "scann", snapshot: int,
                task: int, modality: str,
                options: Mapping[str, Any] | None = None,
                scann_options: Mapping[str, Any] | None = None) -> Index:
  """Builds an index over one gallery.

  Args:
    embeddings: float32 [count, dim], L2-normalised gallery embeddings.
    item_ids: int [count], the id of each gallery item.
    backend: a name of `names()` ('scann', the default, or 'exact').
    snapshot: the snapshot that embedded the gallery.
    task: the task the gallery belongs to.
    modality: 'images' or 'texts'.
    options: overrides of the backend's parameter rule (ScaNN:
      `scann_parameters`' keys; exact: none).
    scann_options: the older name of `options`, applied only when `backend`
      is 'scann' (ignored for exact, as before backends were pluggable).

  Returns:
    The Index. When the backend cannot index the gallery (ScaNN: empty, or
    ScaNN raising), an exact index, with the reason logged and stored in
    `metadata.backend_params['fallback_reason']`.
  """
  chosen = get_backend(backend)
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
  if options is not None and scann_options is not None:
    raise ValueError("pass options or scann_options, not both")
  if options is None and backend == "scann":
    options = scann_options
  embeddings, item_ids = _check_gallery(embeddings, item_ids)
  count, dim = embeddings.shape
  metadata = functools.partial(IndexMetadata, snapshot=int(snapshot),
                               task=int(task), modality=modality, dim=int(dim),
                               count=int(count))
  params = chosen.parameters(count, options or {})
  try:
    state = chosen.build(embeddings, params)
  except BuildError as e:
    if chosen.name == FALLBACK_BACKEND:
      raise
    reason = str(e)
  else:
    return Index(metadata(backend=chosen.name, backend_params=params),
                 embeddings, item_ids, state)
  logging.warning("Index (snapshot %d, task %d, %s, %d items): %s; using the"
                  " %s backend.", snapshot, task, modality, count, reason,
                  FALLBACK_BACKEND)
  fallback = get_backend(FALLBACK_BACKEND)
  fallback_params = fallback.parameters(count, {})
  return Index(metadata(backend=fallback.name,
                        backend_params={**fallback_params,
                                        "fallback_reason": reason}),
               embeddings, item_ids, fallback.build(embeddings, fallback_params))


# ----------------------------------------------------------------------------
# Searching.


def search(index: Index, queries, k: int, *,
           block_size: int = DEFAULT_BLOCK_SIZE
           ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery items for each query, best first.

  Args:
    index: the gallery index.
    queries: float32 [num_queries, dim], L2-normalised.
    k: neighbours wanted; clamped to `index.metadata.count` (a gallery of 3
      items returns 3 columns), so callers must read the returned width.
    block_size: queries per block for the exact backend.

  Returns:
    scores: float32 [num_queries, min(k, count)], dot products, best first.
    item_ids: int64 [num_queries, min(k, count)]. In the rare case ScaNN finds
      fewer than k candidates, the missing tail is id -1 with score -inf.
  """
  queries = np.ascontiguousarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != index.metadata.dim:
    raise ValueError(f"queries must be [num_queries, {index.metadata.dim}],"
                     f" got {queries.shape}")
  k = min(int(k), index.metadata.count)
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if k == 0 or queries.shape[0] == 0:
    return (np.zeros((queries.shape[0], k), np.float32),
            np.zeros((queries.shape[0], k), np.int64))
  scores, rows = get_backend(index.metadata.backend).search(
      index, queries, k, block_size)
  return scores, np.where(rows >= 0, index.item_ids[rows], -1)


def search_many(indices: Sequence[Index], queries, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Searches several indices as one gallery (their union).

  This is the task-agnostic gallery: the union of per-task indices, possibly
  embedded with different snapshots. Each index returns its own top-k and the
  results are merged by score.

  Args:
    indices: indices of the same dim.
    queries: float32 [num_queries, dim], or one such array per index (the
      same queries mapped into each index's space, e.g. by a query adapter).
    k: neighbours wanted; clamped to the total count.

  Returns:
    scores: float32 [num_queries, min(k, total)], best first; equal scores
      keep the earlier index (then its order) first.
    item_ids: int64 [num_queries, min(k, total)].
  """
  if not indices:
    raise ValueError("search_many needs at least one index")
  dims = {index.metadata.dim for index in indices}
  if len(dims) != 1:
    raise ValueError(f"indices have different dims {sorted(dims)}")
  if not isinstance(queries, (list, tuple)):
    queries = [queries] * len(indices)
  if len(queries) != len(indices):
    raise ValueError(f"{len(queries)} query arrays for {len(indices)} indices")
  parts = [search(index, q, k) for index, q in zip(indices, queries)]
  scores = np.concatenate([s for s, _ in parts], axis=1)
  ids = np.concatenate([i for _, i in parts], axis=1)
  k = min(int(k), sum(index.metadata.count for index in indices))
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return (np.take_along_axis(scores, order, axis=1),
          np.take_along_axis(ids, order, axis=1))


def recall_against_exact(index: Index, queries, k: int = 10) -> float:
  """Fraction of the exact top-k that the index returns, averaged over queries.

  Args:
    index: any index (an exact one scores 1.0).
    queries: float32 [num_queries, dim].
    k: neighbours compared; clamped to the gallery size.

  Returns:
    Mean over queries of |exact top-k ∩ index top-k| / k, in [0, 1].
  """
  _, rows = exact_search(queries, index.embeddings, k)
  exact_ids = index.item_ids[rows]
  _, found_ids = search(index, queries, k)
  if exact_ids.shape[1] == 0:
    return 1.0
  hits = (exact_ids[:, :, None] == found_ids[:, None, :]).any(axis=2)
  return float(hits.mean())


# ----------------------------------------------------------------------------
# Saving and loading.


def _fsync_path(path: str) -> None:
  # Directory fsync makes renames durable; not every platform allows opening a
  # directory, which only costs durability, never correctness.
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_npy(path: str, array: np.ndarray) -> None:
  # A module-level function (not inlined) so that tests/fault_driver.py can
  # kill a save in the middle of its files.
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def save_index(index: Index, directory) -> None:
  """Writes the index to `directory`, atomically.

  Everything is written into a temporary sibling directory, flushed to disk,
  then renamed into place, so `directory` only ever holds a complete index. An
  existing index there is first renamed aside and deleted after the swap; a
  crash between those two renames leaves no index at `directory` (the old one
  survives as a `.NAME.old-*` sibling) rather than a mixed one. Leftover
  temporary siblings from interrupted saves of the same directory are removed:
  one writer per index directory (in multi-host runs, one host).

  Args:
    index: the index to save.
    directory: the final index directory; its parent is created if needed.
  """
  directory = os.path.abspath(os.fspath(directory))
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  for sibling in os.listdir(parent):
    if sibling.startswith(f".{name}{_TMP_MARK}"):
      shutil.rmtree(os.path.join(parent, sibling), ignore_errors=True)
  tmp = os.path.join(parent, f".{name}{_TMP_MARK}{uuid.uuid4().hex}")
  os.makedirs(tmp)
  try:
    _write_npy(os.path.join(tmp, base.EMBEDDINGS_FILE), index.embeddings)
    _write_npy(os.path.join(tmp, base.ITEM_IDS_FILE), index.item_ids)
    get_backend(index.metadata.backend).save(index, tmp)
    files.write_atomic(os.path.join(tmp, base.METADATA_FILE),
                       index.metadata.to_json())
    manifest = files.digests(tmp, base.MANIFEST_FILE)
    for rel in manifest:
      with open(os.path.join(tmp, rel), "rb+") as f:
        os.fsync(f.fileno())
    # The manifest goes last: a directory with a manifest listing every file is
    # complete by construction.
    files.write_json(os.path.join(tmp, base.MANIFEST_FILE),
                     {"format_version": FORMAT_VERSION, "files": manifest})
    for root, _, _ in os.walk(tmp):
      _fsync_path(root)
    old = None
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{name}{_OLD_MARK}{uuid.uuid4().hex}")
      os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_path(parent)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    failure = files.storage_error(e, directory) if isinstance(e, Exception) else None
    if failure is None:
      raise
    raise failure from e
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _load_npy(directory: str, rel: str) -> np.ndarray:
  try:
    return np.load(os.path.join(directory, rel), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, rel, "a readable .npy file",
                             f"unreadable ({type(e).__name__}: {e})") from e


def _check_manifest(directory: str, verify_checksums: bool) -> None:
  path = os.path.join(directory, base.MANIFEST_FILE)
  if not os.path.isfile(path):
    raise IndexMismatchError(
        directory, base.MANIFEST_FILE, "present (written last by save_index)",
        "missing: the directory is not a complete saved index")
  try:
    listed = files.read_json(path)["files"]
    if not all(isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys()
               for entry in listed.values()):
      raise ValueError("every manifest entry needs 'bytes' and 'sha256'")
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, base.MANIFEST_FILE, "valid JSON",
                             f"unreadable ({type(e).__name__}: {e})") from e
  required = {base.METADATA_FILE, base.EMBEDDINGS_FILE, base.ITEM_IDS_FILE}
  missing = sorted(required - listed.keys())
  if missing:
    raise IndexMismatchError(directory, base.MANIFEST_FILE,
                             f"entries for {missing}", "none")
  mismatch = files.first_mismatch(directory, listed, verify_checksums)
  if mismatch is not None:
    raise IndexMismatchError(directory, *mismatch)


def _read_metadata(directory: str) -> IndexMetadata:
  try:
    fields = files.read_json(os.path.join(directory, base.METADATA_FILE))
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, base.METADATA_FILE, "valid JSON",
                             f"unreadable ({type(e).__name__}: {e})") from e
  # A missing version reads as the current one, as the dataclass default does.
  version = (fields.get("format_version", FORMAT_VERSION)
             if isinstance(fields, dict) else None)
  if version not in base.READABLE_VERSIONS:
    raise IndexMismatchError(directory, "format_version",
                             f"one of {base.READABLE_VERSIONS}", version)
  try:
    return IndexMetadata.from_dict(fields)
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, base.METADATA_FILE, "valid IndexMetadata",
                             f"unreadable ({type(e).__name__}: {e})") from e


def load_index(directory, *, expect_snapshot: int | None = None,
               expect_task: int | None = None,
               expect_modality: str | None = None,
               expect_dim: int | None = None, expect_item_ids=None,
               verify_checksums: bool = True) -> Index:
  """Loads an index saved by `save_index`, checking it is the one expected.

  Files are checked against the manifest (sizes always, sha256 when
  `verify_checksums`) before the backend reads them: ScaNN aborts the process
  on some corrupt inputs instead of raising. Directories of format version 1
  (metadata field `scann_params`) load too.

  Args:
    directory: the index directory.
    expect_snapshot, expect_task, expect_modality, expect_dim: if given, the
      metadata must say exactly this.
    expect_item_ids: if given, int [count]; the stored item ids must equal it.
    verify_checksums: hash every file (a few hundred MB/s).

  Returns:
    The Index, searchable.

  Raises:
    IndexMismatchError: the directory is missing or incomplete, a file is
      unreadable or corrupt, or anything differs from the expectations or from
      the metadata; the message names the directory, the field, expected and
      found values and the fix.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise IndexMismatchError(
        directory, "directory", "an index directory", "nothing there",
        "build and save the index (rerun the experiment's indexing stage)")
  _check_manifest(directory, verify_checksums)
  metadata = _read_metadata(directory)
  expectations = {"snapshot": expect_snapshot, "task": expect_task,
                  "modality": expect_modality, "dim": expect_dim}
  for field, expected in expectations.items():
    found = getattr(metadata, field)
    if expected is not None and expected != found:
      raise IndexMismatchError(directory, field, expected, found)
  if metadata.backend not in _REGISTRY:
    raise IndexMismatchError(directory, "backend", names(), metadata.backend)

  embeddings = _load_npy(directory, base.EMBEDDINGS_FILE)
  expected_shape = (metadata.count, metadata.dim)
  if embeddings.shape != expected_shape or embeddings.dtype != np.float32:
    raise IndexMismatchError(directory, "embeddings",
                             f"float32 {expected_shape} (from metadata)",
                             f"{embeddings.dtype} {embeddings.shape}")
  item_ids = _load_npy(directory, base.ITEM_IDS_FILE)
  if item_ids.shape != (metadata.count,) or item_ids.dtype != np.int64:
    raise IndexMismatchError(directory, "item_ids",
                             f"int64 ({metadata.count},) (from metadata)",
                             f"{item_ids.dtype} {item_ids.shape}")
  if expect_item_ids is not None:
    expected_ids = np.asarray(expect_item_ids)
    if expected_ids.shape != item_ids.shape:
      raise IndexMismatchError(directory, "item_ids",
                               f"{expected_ids.shape[0]} ids as given",
                               f"{item_ids.shape[0]} ids")
    if not np.array_equal(expected_ids, item_ids):
      row = int(np.argmax(expected_ids != item_ids))
      raise IndexMismatchError(directory, "item_ids",
                               f"id {int(expected_ids[row])} at row {row}",
                               f"id {int(item_ids[row])}")
  state = get_backend(metadata.backend).load(directory, metadata, embeddings)
  return Index(metadata, embeddings, item_ids, state)


__all__ = [
    "BACKENDS", "BRUTE_FORCE_MAX_COUNT", "Backend", "BuildError",
    "DEFAULT_BLOCK_SIZE", "FALLBACK_BACKEND", "FORMAT_VERSION", "Index",
    "IndexMetadata", "IndexMismatchError", "MODALITIES", "build_index",
    "config_keys", "exact_search", "get_backend", "load_index",
    "map_query_blocks", "names", "query_blocks", "recall_against_exact",
    "save_index", "scann_parameters", "search", "search_many",
]
