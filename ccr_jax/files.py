"""Files every stage writes and reads: atomic writes, JSON that names its file, checksums.

The bottom of the import graph: it imports nothing of ccr_jax, so data
sources, indices, checkpoints and the run stages can all use it.
"""

import hashlib
import json
import os
import tempfile
from typing import Any


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  A reader (or a run killed mid-write) never sees half a file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix="." + os.path.basename(path) + ".")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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


def sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()
