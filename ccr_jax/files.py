"""Files every stage writes and reads: atomic writes, JSON that names its file, checksums.

The bottom of the import graph: it imports nothing of ccr_jax, so data
sources, indices, checkpoints and the run stages can all use it.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  A reader (or a run killed mid-write) never sees half a file. The file gets
  the permissions `open` would give it (0666 less the umask, usually 0644):
  mkstemp's private 0600 would hide results from the rest of a team.
  """
  with writing(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".")
    try:
      os.fchmod(fd, 0o666 & ~_umask())
      with os.fdopen(fd, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise


def _umask() -> int:
  # The only way to read the umask is to set it; set it straight back.
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_json(path: str, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON (sorted keys)."""
  write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  """Reads a JSON file; a syntax error names the file, line and column.

  Raises:
    ValueError: the file is not valid JSON (json.JSONDecodeError is one, so
      callers catching ValueError keep working), with the path in the message.
  """
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, "
                       f"column {e.colno}): fix or replace that file.") from e
    except UnicodeDecodeError as e:
      raise ValueError(f"{path} is not UTF-8 text, so not JSON ({e.reason} at "
                       f"byte {e.start}): it may still be compressed (.zip, "
                       ".gz); extract or replace that file.") from e


class StorageError(OSError):
  """A write the storage refused (full, read-only, not permitted): a
  one-line message naming the path and the fix."""

  def __str__(self) -> str:
    return self.strerror


class DiskFullError(StorageError):
  """No space left on the device while writing `path`."""


class NotWritableError(StorageError):
  """`path` is on a read-only filesystem or this user may not write there."""


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
# How libraries that do not raise OSError report the same (TensorStore's
# status codes in Orbax, ScaNN's and numpy's short writes, TFDS's writers).
_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "requested and",
                  "RESOURCE_EXHAUSTED: Error writing", "ENOSPC")
_READ_ONLY_MESSAGES = ("Read-only file system", "Permission denied")
# Below this many free bytes an opaque write error ("I/O error") is a full disk.
_NEARLY_FULL = 4 << 20


def names_storage_failure(text: str) -> bool:
  """Whether a library's message says a device was full or read-only."""
  return any(m in text for m in _FULL_MESSAGES + _READ_ONLY_MESSAGES)


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _free_bytes(path: str) -> int | None:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def storage_error(error: BaseException, path: str) -> StorageError | None:
  """The one-line StorageError that `error` (raised while writing `path`)
  amounts to, or None when it is something else.

  Looks through the exception's chain for the errno or the message by which
  the filesystem, numpy, Orbax (TensorStore), ScaNN and TFDS report a full
  or read-only device; an error without either, raised while the device has
  under 4 MiB free, counts as a full disk too (ScaNN says only "I/O error").
  """
  for e in _chain(error):
    if isinstance(e, StorageError):
      return e
    code = getattr(e, "errno", None)
    text = str(e)
    if code in _FULL_ERRNOS or any(m in text for m in _FULL_MESSAGES):
      return disk_full(path)
    if code in _READ_ONLY_ERRNOS or any(m in text for m in _READ_ONLY_MESSAGES):
      return NotWritableError(
          errno.EROFS, f"cannot write {path}: its filesystem is read-only or this "
          "user may not write there; make it writable or choose another "
          "directory (--workdir, --config.data.data_dir)")
  free = _free_bytes(path)
  if free is not None and free < _NEARLY_FULL:
    return disk_full(path)
  return None


def disk_full(path: str) -> DiskFullError:
  """The DiskFullError of a write to `path`."""
  free = _free_bytes(path)
  left = "" if free is None else f" ({free // 1024} KiB free)"
  return DiskFullError(
      errno.ENOSPC, f"no space left on the device while writing {path}{left}: "
      "free space there and rerun the same command (the run resumes from what is "
      "complete on disk)")


@contextlib.contextmanager
def writing(path: str):
  """Raises what a write to `path` inside the block failed with as its
  one-line StorageError when it is one (`storage_error`), else unchanged."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (libraries raise many types)
    failure = storage_error(e, path)
    if failure is None:
      raise
    raise failure from e


def digests(directory: str, skip: str) -> dict[str, dict]:
  """{relative path ("/"-separated): {"bytes", "sha256"}} of every file under
  `directory` except `skip` (the manifest that lists them), sorted by path."""
  found = []
  for root, _, file_names in os.walk(directory):
    for name in file_names:
      rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
      if rel != skip:
        found.append(rel)
  return {rel: {"bytes": os.path.getsize(os.path.join(directory, rel)),
                "sha256": sha256(os.path.join(directory, rel))} for rel in sorted(found)}


def first_mismatch(directory: str, listed: dict[str, dict],
                   verify_checksums: bool = True) -> tuple[str, str, str] | None:
  """(file, expected, found) of the first file under `directory` that differs
  from its `digests` entry in `listed`, or None when every one matches.

  Sizes are always compared, contents (SHA-256) with `verify_checksums`.
  """
  for rel, entry in sorted(listed.items()):
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      return rel, "present", "missing"
    size = os.path.getsize(full)
    if size != entry["bytes"]:
      return rel, f"{entry['bytes']} bytes", f"{size} bytes (truncated or overwritten)"
    if verify_checksums and sha256(full) != entry["sha256"]:
      return rel, f"sha256 {entry['sha256']}", "different content (corrupt)"
  return None


def sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()
