"""Files every stage writes and reads: atomic writes, JSON that names its file, checksums.

The bottom of the import graph: it imports nothing of ccr_jax, so data
sources, indices, checkpoints and the run stages can all use it.
"""

import errno
import hashlib
import json
import os
import tempfile
from typing import Any


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  A reader (or a run killed mid-write) never sees half a file. The file gets
  the permissions `open` would give it (0666 less the umask, usually 0644):
  mkstemp's private 0600 would hide results from the rest of a team.
  """
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
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise disk_error(e, path) from e
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


class DiskFullError(OSError):
  """No space left on the device while writing `path`: a one-line message."""

  def __str__(self) -> str:
    return self.strerror


def disk_error(error: OSError, path: str) -> OSError:
  """`error`, or a DiskFullError naming `path` when the device was full.

  numpy and ScaNN report a short write as "N requested and M written" without
  an errno; both mean the same to a user: free space and rerun.
  """
  if error.errno == errno.ENOSPC or "requested and" in str(error):
    return DiskFullError(
        errno.ENOSPC, f"no space left on the device while writing {path}: free "
        "space there and rerun the same command (the run resumes from what is "
        "complete on disk)")
  return error


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
