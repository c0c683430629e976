"""Orbax checkpoints: one params snapshot per task and a resumable training state.

This is the only module that imports Orbax. Layout under a workdir:
  snapshots/task_<t>/   params of the model at the end of task t (1-based),
                        JSON metadata (vocabulary, config fingerprint, task)
                        and manifest.json (size and SHA-256 of every file,
                        written once Orbax has finished, checked before every
                        restore: Orbax reads a flipped byte without error);
  state/<step>/         the full train state ({"params", "opt", "step"}) and
                        JSON metadata (task, step within the task), saved every
                        `checkpoint_every` steps so a killed run resumes.
Restores always go into an abstract target with explicit shardings (orbax
issues #648, #332: restores that fail or hang on another device count).
In a multi-process run every process calls save and restore: Orbax writes
each array once (from the processes that hold its shards) and the JSON from
process 0, and each process reads back the shards its devices hold; the
workdir must be on a filesystem every process sees.
"""

import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from ccr_jax import files

# Beside Orbax's own files in a snapshot directory.
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
  """A snapshot or state checkpoint that exists but cannot be restored."""


def _abstract(tree: Any, sharding: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves placed with `sharding`: one
  `jax.sharding.Sharding` for every leaf, or a function leaf -> its Sharding."""
  where = sharding if callable(sharding) else lambda _: sharding
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where(x)), tree)


def _snapshot_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      step_prefix="task", create=not read_only, read_only=read_only,
      enable_async_checkpointing=False,
      # What a killed or failed save left behind goes when the next opens.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "snapshots"), options=options,
      item_names=("params", "meta", "strategy"))


def snapshot_dir(workdir: str, task: int) -> str:
  """Directory of the params snapshot taken after task `task` (1-based)."""
  return os.path.join(os.path.abspath(workdir), "snapshots", f"task_{task}")


def completed_snapshots(workdir: str) -> list[int]:
  """Tasks (1-based, sorted) whose snapshot was fully written."""
  if not os.path.isdir(os.path.join(workdir, "snapshots")):
    return []
  with _snapshot_manager(workdir, read_only=True) as mngr:
    return sorted(mngr.all_steps())


def save_snapshot(workdir: str, task: int, params: Any, meta: dict,
                  strategy: Any = None) -> None:
  """Writes the params snapshot of task `task` (1-based) with JSON `meta`.

  Args:
    strategy: an optional pytree a continual strategy carries to later tasks
      (e.g. importance estimates), saved beside the params.
  Orbax writes into a temporary directory and renames it when complete, so a
  run killed mid-save leaves no snapshot that `completed_snapshots` lists.
  """
  items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
  if strategy is not None:
    items["strategy"] = ocp.args.StandardSave(strategy)
  with files.writing(snapshot_dir(workdir, task)), _snapshot_manager(workdir) as mngr:
    try:
      mngr.save(task, args=ocp.args.Composite(**items), force=True)
      mngr.wait_until_finished()
    except BaseException:
      _remove_tmp(os.path.join(os.path.abspath(workdir), "snapshots"))
      raise
    write_snapshot_manifest(workdir, task)


def _remove_tmp(directory: str) -> None:
  # A failed save's temporary directories: nothing half-written stays behind.
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in os.listdir(directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def write_snapshot_manifest(workdir: str, task: int) -> None:
  """Lists size and SHA-256 of every file of snapshot `task` in its
  manifest.json (process 0; the snapshot must be complete on disk)."""
  if jax.process_index() == 0:
    path = snapshot_dir(workdir, task)
    files.write_json(os.path.join(path, MANIFEST_FILE),
                     {"files": files.digests(path, MANIFEST_FILE)})


def has_manifest(workdir: str, task: int) -> bool:
  """Whether snapshot `task` has a manifest (snapshots saved before issue 25
  have none)."""
  return os.path.isfile(os.path.join(snapshot_dir(workdir, task), MANIFEST_FILE))


def _check_snapshot_manifest(workdir: str, task: int) -> None:
  path = snapshot_dir(workdir, task)
  if not has_manifest(workdir, task):
    return  # Orbax's own restore is then the only check.
  try:
    listed = files.read_json(os.path.join(path, MANIFEST_FILE))["files"]
    mismatch = files.first_mismatch(path, listed)
  except (ValueError, KeyError, TypeError) as e:
    mismatch = (MANIFEST_FILE, "a valid manifest", f"unreadable ({e})")
  if mismatch is not None:
    rel, expected, found = mismatch
    raise CheckpointError(
        f"snapshot of task {task} at {path} does not match its manifest: {rel} "
        f"should be {expected}, found {found}. Delete that directory and rerun "
        "to retrain from the previous task.")


def restore_snapshot(workdir: str, task: int, params_template: Any,
                     sharding: jax.sharding.Sharding | Callable,
                     strategy_template: Any = None) -> tuple[Any, dict]:
  """Restores (params, meta) of task `task` into `params_template`'s structure.

  Args:
    params_template: a pytree of arrays or ShapeDtypeStructs with the expected
      structure, shapes and dtypes (e.g. from `jax.eval_shape` of the init).
    sharding: where every restored leaf is placed: one sharding, or a
      function from a template leaf to its sharding (e.g. by shape, as
      `sharding.param_sharding` decides).
    strategy_template: when given, the strategy pytree saved with the snapshot
      is restored too and returned as meta["strategy"].
  Raises:
    CheckpointError: naming the snapshot's path when it is missing, corrupt
      (a file differs from its manifest, or Orbax cannot read it) or does not
      match the template (another model configuration).
  """
  path = snapshot_dir(workdir, task)
  _check_snapshot_manifest(workdir, task)
  try:
    with _snapshot_manager(workdir, read_only=True) as mngr:
      items = {"params": ocp.args.StandardRestore(_abstract(params_template, sharding)),
               "meta": ocp.args.JsonRestore()}
      if strategy_template is not None:
        items["strategy"] = ocp.args.StandardRestore(
            _abstract(strategy_template, sharding))
      restored = mngr.restore(task, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax raises many types, lazily, at restore time.
    # The first line: TensorStore appends its whole spec (~60 lines) after it.
    raise CheckpointError(
        f"snapshot of task {task} at {path} could not be restored "
        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})."
        " If the model config changed, use a new "
        "--workdir; if the snapshot is corrupt, delete that directory and "
        "rerun to retrain from the previous task.") from e
  meta = dict(restored["meta"])
  if strategy_template is not None:
    meta["strategy"] = restored["strategy"]
  return restored["params"], meta


def _state_manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "state"), options=options,
      item_names=("state", "meta"))


def save_state(workdir: str, state: Any, meta: dict) -> None:
  """Saves the train state under its global step (`state["step"]`) with `meta`."""
  step = int(jax.device_get(state["step"]))
  folder = os.path.join(os.path.abspath(workdir), "state")
  with files.writing(os.path.join(folder, str(step))), _state_manager(workdir) as mngr:
    if step in mngr.all_steps():
      # A task retrained after its snapshot was quarantined passes the steps
      # its first training saved; the newer state replaces the older.
      mngr.delete(step)
    try:
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True)
      mngr.wait_until_finished()
    except BaseException:
      _remove_tmp(folder)
      raise


def restore_latest_state(workdir: str, state_template: Any,
                         sharding: jax.sharding.Sharding | Callable
                         ) -> tuple[Any, dict] | None:
  """The newest saved (state, meta) that restores, or None when none does.

  A state that fails to restore (Orbax lists a truncated or corrupt step and
  only fails when reading it) is logged with its step and path, and the next
  older one is tried: resuming from an older state repeats some steps, which
  give the same result because batches are a function of the step.
  """
  if not os.path.isdir(os.path.join(workdir, "state")):
    return None
  with _state_manager(workdir) as mngr:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(state_template, sharding)),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
        path = os.path.join(os.path.abspath(workdir), "state", str(step))
        # Out of the way: the resumed run saves this step again.
        moved = _quarantine(workdir, path, f"state_{step}")
        logging.warning(
            "training state at step %d in %s could not be restored (%s: %s); "
            "moved it to %s and falling back to the next older state checkpoint.",
            step, path, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
            moved)
        mngr.reload()
        continue
      return restored["state"], dict(restored["meta"])
  return None


def latest_state_step(workdir: str) -> int | None:
  """The global step of the newest state checkpoint on disk, or None."""
  if not os.path.isdir(os.path.join(workdir, "state")):
    return None
  with _state_manager(workdir) as mngr:
    return mngr.latest_step()


def quarantine_snapshot(workdir: str, task: int) -> str:
  """Moves snapshot `task` out of `snapshots/` (kept for inspection); returns where.

  `completed_snapshots` no longer lists it, so a resumed run retrains that task.
  """
  return _quarantine(workdir, snapshot_dir(workdir, task), f"snapshots_task_{task}")


def _quarantine(workdir: str, path: str, name: str) -> str:
  """Moves `path` to <workdir>/quarantine/<name>_<unix time>; returns the new path."""
  dst = os.path.join(os.path.abspath(workdir), "quarantine", f"{name}_{int(time.time())}")
  if jax.process_index() == 0:  # Every process finds the same damage; one moves it.
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(path, dst)
  return dst
