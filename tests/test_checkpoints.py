"""Orbax snapshots and train state: round trips, device counts, clear errors."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccr_jax import checkpoints
from ccr_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
  return {"img": {"w": jnp.arange(12.0).reshape(3, 4)},
          "txt": {"b": jnp.ones((5,), jnp.float32)}}


def test_snapshot_round_trip(tmp_path):
  rep = sharding.replicated(sharding.make_mesh())
  checkpoints.save_snapshot(str(tmp_path), 1, _params(), {"task": 1, "vocab": ["a"]})
  checkpoints.save_snapshot(str(tmp_path), 2, jax.tree.map(lambda x: x * 2, _params()),
                            {"task": 2})
  assert checkpoints.completed_snapshots(str(tmp_path)) == [1, 2]
  assert os.path.isdir(checkpoints.snapshot_dir(str(tmp_path), 2))
  params, meta = checkpoints.restore_snapshot(str(tmp_path), 2, _params(), rep)
  assert meta == {"task": 2}
  np.testing.assert_array_equal(params["img"]["w"], 2 * np.arange(12.0).reshape(3, 4))


def test_snapshot_with_other_shapes_is_a_clear_error(tmp_path):
  rep = sharding.replicated(sharding.make_mesh())
  checkpoints.save_snapshot(str(tmp_path), 1, _params(), {"task": 1})
  wrong = {"img": {"w": jnp.zeros((3, 5))}, "txt": {"b": jnp.ones((5,))}}
  with pytest.raises(checkpoints.CheckpointError, match="task_1"):
    checkpoints.restore_snapshot(str(tmp_path), 1, wrong, rep)


def test_state_latest_round_trip(tmp_path):
  rep = sharding.replicated(sharding.make_mesh())
  assert checkpoints.restore_latest_state(str(tmp_path), {}, rep) is None
  for step in (3, 6):
    state = {"params": _params(), "opt": {"mu": jnp.full((2,), float(step))},
             "step": jnp.asarray(step, jnp.int32)}
    checkpoints.save_state(str(tmp_path), state, {"task": 1, "next_step": step})
  restored, meta = checkpoints.restore_latest_state(str(tmp_path), state, rep)
  assert meta == {"task": 1, "next_step": 6}
  assert int(restored["step"]) == 6
  np.testing.assert_array_equal(restored["opt"]["mu"], [6.0, 6.0])


def test_saved_on_two_devices_restores_on_one(tmp_path):
  script = textwrap.dedent(f"""
      import jax, jax.numpy as jnp
      from ccr_jax import checkpoints, sharding
      assert jax.device_count() == 2
      mesh = sharding.make_mesh()
      p = sharding.replicate({{"img": {{"w": jnp.arange(12.0).reshape(3, 4)}}}}, mesh)
      checkpoints.save_snapshot({str(tmp_path)!r}, 1, p, {{"task": 1}})
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO,
                 timeout=300)
  rep = sharding.replicated(sharding.make_mesh(jax.devices()[:1]))
  template = {"img": {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}
  params, _ = checkpoints.restore_snapshot(str(tmp_path), 1, template, rep)
  np.testing.assert_array_equal(params["img"]["w"], np.arange(12.0).reshape(3, 4))


def test_a_save_removes_what_an_interrupted_save_left(tmp_path):
  # A second SIGTERM 100 ms after the first killed a state save half-way and
  # left state/<step>.orbax-checkpoint-tmp for ever.
  workdir = str(tmp_path)
  leftover = os.path.join(workdir, "state", "3.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(leftover, "state"))
  checkpoints.save_state(workdir, {"step": jnp.int32(4), "w": jnp.ones(3)},
                         {"task": 1, "next_step": 4, "ranked": True})
  assert not os.path.exists(leftover)
  assert checkpoints.latest_state_step(workdir) == 4

