"""Runs `ccr_jax.main` and SIGKILLs itself at a named point (tests/test_faults.py).

  python tests/fault_driver.py POINT -- <ccr_jax.main flags>

A SIGKILL is what a preempted pod job gets: no exception handler, no
`finally`, no flush. Points (tiny config: 2 tasks of 4 steps, state every 2):
  snapshot_write   while task 1's snapshot files are being written
  train_step       while task 2 trains, after its step-2 state checkpoint
  snapshot_commit  after task 2's snapshot data is written, before Orbax renames
                   its temporary directory into place
  index_save       halfway through saving snapshot 2's first index
  index_build      while building snapshot 2's index of task 2's gallery
  results_write    halfway through writing results/results.json
"""

import os
import signal
import sys
import threading
import time


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str) -> None:
  from ccr_jax import checkpoints
  from ccr_jax import indexing
  from ccr_jax import files
  from ccr_jax.data import pipeline

  if point == "snapshot_write":
    real_save = checkpoints.save_snapshot

    def save(workdir, task, *args, **kwargs):
      if task == 1:
        snapshots = os.path.join(workdir, "snapshots")

        def watch():  # Dies as soon as Orbax's temporary directory shows up.
          while True:
            if os.path.isdir(snapshots) and any(
                "tmp" in name for name in os.listdir(snapshots)):
              _die()
            time.sleep(0.0005)

        threading.Thread(target=watch, daemon=True).start()
        real_save(workdir, task, *args, **kwargs)
        # A starved watcher thread missed the window: die right after instead
        # (still a kill at this stage, so the test never flakes).
        _die()
      return real_save(workdir, task, *args, **kwargs)

    checkpoints.save_snapshot = save
  elif point == "train_step":
    real_batch = pipeline.mixed_batch

    def batch(*args, task, step, **kwargs):
      if task == 1 and step == 3:
        _die()
      return real_batch(*args, task=task, step=step, **kwargs)

    pipeline.mixed_batch = batch
  elif point == "snapshot_commit":
    from orbax.checkpoint._src.path import atomicity
    real_rename = atomicity.async_path.rename

    async def rename(src, dst):
      if os.path.basename(str(dst)) == "task_2":
        _die()
      return await real_rename(src, dst)

    atomicity.async_path.rename = rename
  elif point == "index_save":
    real_write = indexing._write_npy  # pylint: disable=protected-access
    calls = []

    def write(path, array):
      if "snap_2" in str(path):
        calls.append(path)
        if len(calls) == 2:
          _die()
      return real_write(path, array)

    indexing._write_npy = write  # pylint: disable=protected-access
  elif point == "index_build":
    real_build = indexing.build_index

    def build(*args, snapshot, task, **kwargs):
      if snapshot == 2 and task == 2:
        _die()
      return real_build(*args, snapshot=snapshot, task=task, **kwargs)

    indexing.build_index = build
  elif point == "results_write":
    real_write_atomic = files.write_atomic

    def write_atomic(path, data):
      if os.path.basename(path) == "results.json":
        # What a kill mid-write leaves: half of the temporary file.
        tmp = os.path.join(os.path.dirname(path), ".results.json.killed")
        with open(tmp, "w") as f:
          f.write(data[:len(data) // 2])
        _die()
      return real_write_atomic(path, data)

    files.write_atomic = write_atomic
  else:
    raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
  point, sep, *flags = sys.argv[1:]
  assert sep == "--", "usage: fault_driver.py POINT -- FLAGS"
  _install(point)
  from absl import app
  from ccr_jax import main
  sys.argv = ["ccr_jax.main", *flags]
  app.run(main.main, flags_parser=main._parse_flags)  # pylint: disable=protected-access
