"""The train step: one device vs two, learning-rate schedule, NaN guard."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a subprocess because the host device count is fixed when JAX starts.
TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, ml_collections
    from ccr_jax import sharding, strategies, train as train_lib
    from ccr_jax.models import dual_encoder
    assert jax.device_count() == 2, jax.devices()
    cfg = ml_collections.ConfigDict(dict(image_tower="cnn", text_tower="gru",
        embed_dim=16, word_dim=8, cnn_widths=(4, 8)))
    optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, grad_clip=2.0,
        decay_at=0.5, decay_factor=0.1))
    loss_cfg = ml_collections.ConfigDict(dict(name="vse0", margin=0.2,
        reduction="sum", warmup_steps=0))
    model = dual_encoder.build_model(cfg, vocab_size=20)
    rng = np.random.default_rng(0)
    batches = [dict(images=rng.integers(0, 255, (8, 8, 8, 3), dtype=np.uint8),
                    tokens=rng.integers(1, 20, (8, 6)).astype(np.int32),
                    lengths=rng.integers(2, 7, (8,)).astype(np.int32),
                    image_ids=np.array([0, 0, 1, 2, 3, 4, 5, 5], np.int32))
               for _ in range(4)]
    out = {}
    for n in (1, 2):
      mesh = sharding.make_mesh(jax.devices()[:n])
      strategy = strategies.get_strategy(ml_collections.ConfigDict({"name": "finetune"}))
      opt = train_lib.make_optimizer(optim, 4, strategy.transform)
      step = train_lib.make_train_step(model, opt, train_lib.make_loss(loss_cfg),
                                       mesh, strategy.loss_term)
      params = dual_encoder.init_params(model, jax.random.PRNGKey(0), (8, 8, 3), 6)
      state = train_lib.create_train_state(params, opt, mesh)
      losses = []
      for b in batches:
        state, m = step(state, sharding.shard_batch(b, mesh))
        losses.append(float(m["loss"]))
      out[f"loss{n}"] = np.array(losses)
      for i, leaf in enumerate(jax.tree.leaves(state["params"])):
        out[f"p{n}_{i}"] = np.asarray(leaf)
    np.savez(OUT, **out)
""")


@pytest.mark.slow
def test_two_devices_match_one(tmp_path):
  out = tmp_path / "out.npz"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  subprocess.run([sys.executable, "-c", f"OUT={str(out)!r}\n" + TWO_DEVICE_SCRIPT],
                 check=True, env=env, cwd=REPO, timeout=300)
  r = np.load(out)
  # Sharding only reorders float32 sums (all-reduces), so results agree to
  # float32 rounding amplified over 4 Adam steps, far below any real change.
  np.testing.assert_allclose(r["loss1"], r["loss2"], rtol=1e-5)
  names = [k for k in r.files if k.startswith("p1_")]
  assert names
  for k in names:
    np.testing.assert_allclose(r[k], r["p2_" + k[3:]], rtol=1e-4, atol=1e-6)


def test_schedule_decays_and_restarts_per_task():
  optim = ml_collections.ConfigDict(dict(learning_rate=1.0, decay_at=0.5,
                                         decay_factor=0.1))
  lr = train_lib.learning_rate_schedule(optim, steps_per_task=10)
  got = [float(lr(s)) for s in (0, 4, 5, 9, 10, 14, 15)]
  np.testing.assert_allclose(got, [1, 1, 0.1, 0.1, 1, 1, 0.1], rtol=1e-6)


def test_non_finite_loss_stops_with_step_range():
  mesh = sharding.make_mesh(jax.devices()[:1])

  def step(state, batch):
    return state, {"loss": jax.numpy.float32(np.nan)}

  saved = []
  with pytest.raises(FloatingPointError, match="between steps 0 and 2"):
    train_lib.train_task({}, step, lambda s: {"x": np.zeros((1,), np.float32)},
                         first_step=0, num_steps=4, mesh=mesh, checkpoint_every=1,
                         checkpoint_fn=lambda s, n, ranked: saved.append(n), log_every=2, task=1)
  # The checkpoint after step 1 was written before the NaN was seen at step 2;
  # nothing is written after the NaN is detected.
  assert saved == [1]


def test_unknown_strategy_lists_valid_names():
  with pytest.raises(ValueError, match="finetune"):
    strategies.get_strategy(ml_collections.ConfigDict({"name": "ewcc"}))


def test_joint_trains_on_every_seen_task():
  joint = strategies.get_strategy(ml_collections.ConfigDict({"name": "joint"}))
  fine = strategies.get_strategy(ml_collections.ConfigDict({"name": "finetune"}))
  assert joint.training_tasks(2) == [0, 1, 2]
  assert fine.training_tasks(2) == [2]


def test_train_step_compiles_once_across_tasks():
  """A new task resets the optimizer state; that must not recompile the step."""
  from ccr_jax.models import dual_encoder
  cfg = ml_collections.ConfigDict(dict(image_tower="cnn", text_tower="gru",
                                       embed_dim=8, word_dim=4, cnn_widths=(4,)))
  optim = ml_collections.ConfigDict(dict(learning_rate=1e-3, grad_clip=2.0,
                                         decay_at=0.5, decay_factor=0.1))
  loss_cfg = ml_collections.ConfigDict(dict(name="vse0", margin=0.2,
                                            reduction="sum", warmup_steps=0))
  model = dual_encoder.build_model(cfg, vocab_size=10)
  mesh = sharding.make_mesh()
  strategy = strategies.get_strategy(ml_collections.ConfigDict({"name": "finetune"}))
  opt = train_lib.make_optimizer(optim, 2, strategy.transform)
  step = train_lib.make_train_step(model, opt, train_lib.make_loss(loss_cfg), mesh,
                                   strategy.loss_term)
  params = dual_encoder.init_params(model, jax.random.PRNGKey(0), (8, 8, 3), 5)
  batch = dict(images=np.zeros((4, 8, 8, 3), np.uint8),
               tokens=np.ones((4, 5), np.int32), lengths=np.full((4,), 3, np.int32),
               image_ids=np.arange(4, dtype=np.int32))
  for task in range(3):
    state = train_lib.create_train_state(params, opt, mesh, step=2 * task)
    for _ in range(2):
      state, _ = step(state, sharding.shard_batch(batch, mesh))
    params = state["params"]
  assert step._cache_size() == 1
  # The state builder too: a new jit per task would retrace and recompile it.
  assert train_lib._state_builder(opt, None, mesh, False)._cache_size() == 1


@pytest.mark.slow
def test_learnable_loss_params_train_and_snapshot_with_the_towers(tmp_path):
  """infonce with learn_temperature: params["loss"] exists, gets updated, restores."""
  from ccr_jax import checkpoints
  from ccr_jax.run import setup as setup_lib
  from ccr_jax.run import training as training_lib
  from configs import default
  cfg = default.get_config("tiny")
  cfg.loss.name = "siglip"
  cfg.loss.learn_temperature = True
  cfg.loss.temperature = 0.1
  setup = setup_lib.build_setup(cfg, str(tmp_path))
  training = training_lib.build_training(setup)
  params = setup_lib.initial_params(setup)
  assert set(params["loss"]) == {"log_scale", "bias"}
  before = jax.device_get(params["loss"])
  trained, _ = training_lib.train_one_task(setup, training, 0, params, None)
  after = jax.device_get(trained["loss"])
  for key in ("log_scale", "bias"):
    assert after[key] != before[key], key
  checkpoints.save_snapshot(str(tmp_path), 1, trained, setup_lib.snapshot_meta(setup, 1))
  restored, _ = setup_lib.load_snapshot(setup, 1)
  assert jax.device_get(restored["loss"]) == after
