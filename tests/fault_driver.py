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

Storage failures, raised as each library reports them (the messages are those
seen on a filling 30 MB tmpfs): the run must stop with one line, exit 2.
  full_tfds        the dataset build (TFDS's array_record writer)
  full_snapshot    task 1's snapshot (Orbax / TensorStore)
  full_state       a state checkpoint (Orbax / TensorStore)
  full_index       an index save (numpy's short write)
  full_results     results/results.json
  full_tensorboard the TensorBoard event file, after its first events
  read_only        every directory and file created under --workdir
"""

import errno
import os
import signal
import sys
import tempfile
import threading
import time


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def _install(point: str) -> None:
  from ccr_jax import checkpoints
  from ccr_jax import indexing
  from ccr_jax import files
  from ccr_jax.data import pipeline
  from ccr_jax.indexing import storage as index_storage

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
    real_write = index_storage._write_npy  # pylint: disable=protected-access
    calls = []

    def write(path, array):
      if "snap_2" in str(path):
        calls.append(path)
        if len(calls) == 2:
          _die()
      return real_write(path, array)

    index_storage._write_npy = write  # pylint: disable=protected-access
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
  elif point.startswith("full_") or point == "read_only":
    _install_storage_fault(point)
  else:
    raise SystemExit(f"unknown fault point {point!r}")


def _enospc(path):
  return OSError(errno.ENOSPC, "No space left on device", path)


def _install_storage_fault(point: str) -> None:
  import orbax.checkpoint as ocp
  import tensorflow_datasets as tfds
  from ccr_jax.indexing import storage as index_storage

  if point == "full_tfds":
    def prepare(self, *args, **kwargs):
      raise RuntimeError(
          'Failed to finalize writing of split "val": write() failed: No space '
          f"left on device; writing {self.data_dir}/x.array_record; at byte 36864")

    tfds.core.DatasetBuilder.download_and_prepare = prepare
  elif point in ("full_snapshot", "full_state"):
    real_save = ocp.CheckpointManager.save
    folder = "snapshots" if point == "full_snapshot" else "state"

    def save(self, step, *args, **kwargs):
      if os.path.basename(str(self.directory)) == folder:
        # As Orbax's own save does first: the manager cleans earlier tmp
        # directories on a background thread, which otherwise races the one
        # made below (CI logged its FileNotFoundError as an extra line).
        self._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
        # What Orbax leaves when TensorStore fails: a temporary directory.
        os.makedirs(os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp"))
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "img.conv1.kernel/0.0.0.0" in OCDBT '
            f'database at local file "{self.directory}": Failed writing: [OS error '
            "28: No space left on device]")
      return real_save(self, step, *args, **kwargs)

    ocp.CheckpointManager.save = save
  elif point == "full_index":
    def write(path, array):
      raise OSError("15360 requested and 992 written")

    index_storage._write_npy = write  # pylint: disable=protected-access
  elif point == "full_results":
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
      if os.path.basename(str(dst)) == "results.json":
        raise _enospc(dst)
      return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
  elif point == "full_tensorboard":
    from tensorboardX import record_writer
    real_write, calls = record_writer.RecordWriter.write, []

    def write(self, data):
      calls.append(1)
      if len(calls) > 3:  # The file opened; later the disk filled.
        raise _enospc("events")
      return real_write(self, data)

    record_writer.RecordWriter.write = write
  elif point == "read_only":
    workdir = os.path.abspath(next(
        a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")))
    real_makedirs, real_open, real_mkstemp = os.makedirs, os.open, tempfile.mkstemp

    def refuse(path):
      if os.path.abspath(str(path)).startswith(workdir):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def makedirs(path, *args, **kwargs):
      refuse(path)
      return real_makedirs(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
      if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse(path)
      return real_open(path, flags, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
      refuse(dir or "")
      return real_mkstemp(*args, dir=dir, **kwargs)

    os.makedirs, os.open, tempfile.mkstemp = makedirs, open_, mkstemp
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
