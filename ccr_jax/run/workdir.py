"""A run's workdir: where each stage's output lives, whose config it holds, and writes.

Every stage leaves its output here (snapshots, indices, a results row per
task) and a rerun skips what is complete. Multi-process runs share one
workdir: process 0 alone writes the files of this module (`write_json`,
`write_bytes`) and moves damaged outputs aside; the others wait for it where
they read what it wrote (`sharding.sync`).
"""

import json
import os

import ml_collections

from ccr_jax import files
from ccr_jax import sharding

# Config sections that define the experiment: a workdir that holds results of
# other values must not be continued with these (eval settings may differ).
EXPERIMENT_SECTIONS = ("seed", "data", "model", "loss", "optim", "train",
                       "pretrain", "strategy", "index")


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


def fingerprint(config: ml_collections.ConfigDict, defaults: dict | None = None) -> dict:
  """The config sections that define the experiment (and the evaluation split).

  Args:
    defaults: the schema's default config as a dict; keys a config lacks
      (written before they were declared) count as their defaults, so an
      older workdir's config.json matches the same experiment today.
  """
  d = json.loads(config.to_json())
  if defaults is not None:
    d = _with_defaults(d, defaults)
  subset = {k: d[k] for k in EXPERIMENT_SECTIONS if k in d}
  # Indices and rows are built on the evaluation split: it defines the workdir.
  subset["eval_split"] = d.get("eval", {}).get("split", "test")
  return subset


def _with_defaults(given: dict, defaults: dict) -> dict:
  out = dict(given)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _with_defaults(out[k], v)
  return out


def check_config(config: ml_collections.ConfigDict, workdir: str,
                 defaults: dict | None = None) -> None:
  """Records the config in a new workdir; refuses a workdir of another experiment.

  Only process 0 writes; it writes atomically, so another process reads
  either no file or the whole one.

  Raises:
    ValueError: naming the config sections that differ from config.json's.
  """
  path = os.path.join(workdir, "config.json")
  mine = fingerprint(config, defaults)
  if os.path.exists(path):
    theirs = fingerprint(ml_collections.ConfigDict(files.read_json(path)), defaults)
    if theirs != mine:
      diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      raise ValueError(
          f"workdir {workdir} holds an experiment with a different config "
          f"(sections differing: {diffs}). Use a new --workdir, or rerun with "
          "the config stored in its config.json.")
  else:
    write_json(path, json.loads(config.to_json()))


def quarantine_derived(workdir: str, task: int, moved_snapshot: str) -> None:
  """Moves what was derived from snapshot `task` (its indices, its results row)
  beside the quarantined snapshot at `moved_snapshot` (process 0 only)."""
  for derived in (os.path.join(workdir, "indices", f"snap_{task}"),
                  row_path(workdir, task)):
    if sharding.is_lead_process() and os.path.exists(derived):
      os.replace(derived, f"{moved_snapshot}_{os.path.basename(derived)}")
