"""Saving an index to disk atomically, and loading it back checked.

On disk an index is a directory

    metadata.json     IndexMetadata (snapshot, task, modality, dim, count,
                      backend, backend_params, format_version)
    manifest.json     size and sha256 of every other file, written last
    embeddings.npy    float32 [count, dim]
    item_ids.npy      int64 [count]
    ...               the backend's own files (ScaNN: scann/)

written atomically by `save_index` and checked field by field by `load_index`,
which also reads format version 1 (metadata field `scann_params`).

`save_index` writes the .npy files through the module attribute `_write_npy`,
so tests (tests/fault_driver.py, tests/test_robustness.py) can replace it to
kill or fail a save in the middle of its files.
"""

from __future__ import annotations

import os
import shutil
import uuid

import numpy as np

from ccr_jax import files
from ccr_jax.indexing import base
from ccr_jax.indexing.base import (FORMAT_VERSION, Index, IndexMetadata,
                                   IndexMismatchError)
from ccr_jax.indexing.registry import get_backend, names

# Sibling names of an index directory NAME: `.NAME.tmp-*` while a save is
# being written, `.NAME.old-*` for the index it replaces until the swap is done.
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"


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
  # A module-level function (not inlined), called through this module's
  # globals, so that tests/fault_driver.py can kill a save in the middle of
  # its files by replacing `storage._write_npy`.
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
  if metadata.backend not in names():
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
