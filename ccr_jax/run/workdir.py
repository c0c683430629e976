"""A run's workdir: where each stage's output lives, whose config it holds, and writes.

Every stage leaves its output here (snapshots, indices, a results row per
task) and a rerun skips what is complete. Multi-process runs share one
workdir: process 0 alone writes the files of this module (`write_json`,
`write_bytes`) and moves damaged outputs aside; the others wait for it where
they read what it wrote (`sharding.sync`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator

import ml_collections

from ccr_jax import files
from ccr_jax import sharding
from ccr_jax import strategies

# Config sections that define the experiment: a workdir that holds results of
# other values must not be continued with these (eval settings may differ).
EXPERIMENT_SECTIONS = ("seed", "data", "model", "loss", "optim", "train",
                       "pretrain", "strategy", "index")


# Model keys that choose an implementation of the same math (and the same
# parameters): not part of the experiment.
IMPLEMENTATION_KEYS = ("gru_impl", "gru_unroll")


def index_dir(workdir: str, snapshot: int, task: int, modality: str) -> str:
  """Where the index of task `task`'s gallery embedded by `snapshot` lives."""
  return os.path.join(workdir, "indices", f"snap_{snapshot}", f"task_{task}", modality)


def row_path(workdir: str, task: int) -> str:
  """The evaluation row written after task `task` (1-based)."""
  return os.path.join(workdir, "results", "rows", f"task_{task}.json")


def results_dir(workdir: str) -> str:
  """results/: results.json, tables, plots, timing."""
  return os.path.join(workdir, "results")


def write_json(path: str, obj) -> None:
  """Atomically writes `obj` as JSON from process 0 (a no-op elsewhere)."""
  if sharding.is_lead_process():
    files.write_json(path, obj)


def write_bytes(path: str, data: bytes | str) -> None:
  """Atomically writes `data` from process 0 (a no-op elsewhere)."""
  if sharding.is_lead_process():
    files.write_atomic(path, data)


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The config sections that define the experiment (and the evaluation
  split) of a complete config (`run.config.complete`: every declared key set)."""
  d = json.loads(config.to_json())
  subset = {k: d[k] for k in EXPERIMENT_SECTIONS if k in d}
  if "strategy" in subset:
    # Only the sections the named strategy reads define the experiment: a
    # changed default of another strategy must not orphan this workdir.
    try:
      used = strategies.sections_used(subset["strategy"]["name"])
    except (KeyError, ValueError):  # A name from another version: compare all.
      used = [k for k in subset["strategy"] if k != "name"]
    subset["strategy"] = {k: v for k, v in subset["strategy"].items()
                          if k == "name" or k in used}
  if "model" in subset:
    # How the GRU is computed, not what: a run resumes on another backend.
    subset["model"] = {k: v for k, v in subset["model"].items()
                       if k not in IMPLEMENTATION_KEYS}
  # Indices and rows are built on the evaluation split: it defines the workdir.
  subset["eval_split"] = d["eval"]["split"]
  return subset


def check_config(config: ml_collections.ConfigDict, workdir: str,
                 complete: Callable[[ml_collections.ConfigDict],
                                    ml_collections.ConfigDict],
                 write: bool = True) -> None:
  """Records the config in a new workdir; refuses a workdir of another experiment.

  Only process 0 writes; it writes atomically, so another process reads
  either no file or the whole one. With `write=False` it only checks.

  Args:
    config: the run's config, complete.
    complete: `run.config.complete` (fills the keys an older config.json
      lacks; passed in because run/config.py imports what imports this).

  Raises:
    ValueError: naming the config sections that differ from config.json's.
  """
  path = os.path.join(workdir, "config.json")
  mine = fingerprint(config)
  if os.path.exists(path):
    # Keys its code did not have yet count as their defaults: an older
    # workdir's config.json matches the same experiment today.
    theirs = fingerprint(complete(ml_collections.ConfigDict(files.read_json(path))))
    if theirs != mine:
      diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      raise ValueError(
          f"workdir {workdir} holds an experiment with a different config "
          f"(sections differing: {diffs}). Use a new --workdir, or rerun with "
          f"the config stored in it: --config={os.path.join(workdir, 'config.json')}")
  elif write:
    write_json(path, json.loads(config.to_json()))


@contextlib.contextmanager
def nothing_left_on_error(workdir: str) -> Iterator[None]:
  """Undoes the block's writes to a workdir that has no config.json yet when
  the block raises: a config found invalid while loading the data leaves no
  files behind, and the corrected command starts clean (process 0 only)."""
  fresh = not os.path.exists(os.path.join(workdir, "config.json"))
  before = set(os.listdir(workdir)) if os.path.isdir(workdir) else set()
  try:
    yield
  except BaseException:
    if fresh and sharding.is_lead_process() and os.path.isdir(workdir):
      for name in set(os.listdir(workdir)) - before - {LOCK_FILE}:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          os.remove(path)
    raise


def quarantine_derived(workdir: str, task: int, moved_snapshot: str) -> None:
  """Moves what was derived from snapshot `task` (its indices, its results row)
  beside the quarantined snapshot at `moved_snapshot` (process 0 only)."""
  for derived in (os.path.join(workdir, "indices", f"snap_{task}"),
                  row_path(workdir, task)):
    if sharding.is_lead_process() and os.path.exists(derived):
      os.replace(derived, f"{moved_snapshot}_{os.path.basename(derived)}")


LOCK_FILE = "lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def lock_holder(workdir: str) -> str | None:
  """Who holds `workdir`'s lock ("pid P on host H, since T"), or None when
  nobody does (no lock file, or a stale one)."""
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError:
    return os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
  finally:
    os.close(fd)  # Releases the probe's shared lock, if it got one.
  return None


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds `<workdir>/lock` for the block: one run per workdir.

  The lock is an advisory `flock` on the file, which the OS releases when its
  holder dies however it dies, so a stale lock (kill -9, a lost node) is taken
  over without a manual step; the file's content (pid, host, start time) only
  names the holder in the error. Only process 0 locks: the processes of one
  multi-process run share the workdir by design.

  Raises:
    WorkdirBusyError: another process holds it, naming that process.
  """
  if not sharding.is_lead_process():
    yield
    return
  created = not os.path.exists(workdir)
  path = os.path.join(workdir, LOCK_FILE)
  # The first write of a run: a read-only or full device stops it here, in
  # one line, before anything is computed.
  with files.writing(path):
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
    os.close(fd)
    raise WorkdirBusyError(
        f"workdir {workdir} is in use by another run ({holder}); wait for it "
        "to finish or stop it, or use another --workdir.") from e
  try:
    me = (f"pid {os.getpid()} on host {socket.gethostname()}, since "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    with files.writing(path):
      os.ftruncate(fd, 0)
      os.pwrite(fd, me.encode() + b"\n", 0)
    yield
  finally:
    # A run that stopped before its config was valid (config.json is written
    # once it is) leaves nothing behind, not even the lock or a new workdir.
    if not os.path.exists(os.path.join(workdir, "config.json")):
      os.remove(path)
      if created and not os.listdir(workdir):
        os.rmdir(workdir)
    os.close(fd)  # Releases the flock.
