"""Shared pytest setup: keep JAX on the CPU and quiet, and compile each program once."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "PYTEST_XDIST_WORKER" in os.environ or "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One XLA compilation cache per test process (each xdist worker, which would
  # otherwise inherit the controller's), shared with the CLI subprocesses it
  # starts: the suite compiles the tiny config's programs dozens of times
  # (measured: test_end_to_end's three kill-and-resume tests 70.8 s -> 48.9 s).
  # A hit is the same compiled program (the key hashes the HLO, compile options
  # and versions), so no result changes. A size limit turns on JAX's file lock
  # around every read and write: processes started together (a sweep, two
  # hosts) never read an entry half written. Fresh per session, so a run's
  # timing never rests on an earlier run's leftovers.
  _CACHE = tempfile.mkdtemp(prefix="ccr_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest


@pytest.fixture
def killed_saving_snapshot(monkeypatch):
  """kill(task): a context in which saving snapshot `task` (1-based) raises
  KeyboardInterrupt("killed"), as a run killed mid-save stops; other
  snapshots save normally, and the real save is back after the context."""
  from ccr_jax import checkpoints  # pylint: disable=import-outside-toplevel

  @contextlib.contextmanager
  def kill(task):
    real_save = checkpoints.save_snapshot

    def dying_save(workdir, t, *args, **kwargs):
      if t == task:
        raise KeyboardInterrupt("killed")
      return real_save(workdir, t, *args, **kwargs)

    with monkeypatch.context() as patch:
      patch.setattr(checkpoints, "save_snapshot", dying_save)
      yield

  return kill
