"""Shared pytest setup: keep JAX on the CPU and quiet."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib

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
