"""Pretraining stage: the towers learn held-out categories before task 1.

The paper's models start from pretrained encoders; this stage gives the
embedded benchmark the same start. `pretrain.categories` are held out of
every task (`tasks.held_out_examples`); for `pretrain.steps` steps the model
learns their training pairs with the configured loss and no continual
strategy (an identity strategy transform, no loss term), with the batch
pipeline and optimizer of the tasks, the learning-rate schedule spanning the
pretraining steps. Task 1 then starts from these params.

Its outputs live in `<workdir>/pretrained/`, laid out as a workdir of its own
so the snapshot and state checkpoint code serves it unchanged:
  pretrained/snapshots/task_0/  the pretrained params ("snapshot 0": the
                                model before task 1) and JSON metadata;
  pretrained/state/<step>/      resumable state every train.checkpoint_every
                                steps, so a killed pretraining resumes;
  pretrained/quarantine/        a snapshot that failed to restore.
A rerun restores the snapshot instead of pretraining again; one that does not
restore is set aside and pretrained again (same params on the same devices).
"""

import os
from typing import Any

import jax
import ml_collections
import optax
from absl import logging

from ccr_jax import checkpoints
from ccr_jax import losses
from ccr_jax import schema
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from ccr_jax.data import text as text_lib
from ccr_jax.run import setup as setup_lib

# The `task` that seeds pretraining's batch order (`pipeline.train_batch`):
# a stream of its own, far from any real task index.
BATCH_STREAM = 1 << 20


def _category_ids(v: Any) -> str | None:
  ok = all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in v)
  if ok and len(set(v)) == len(v):
    return None
  return "a list of distinct category ids (integers >= 0), e.g. '(12, 13, 14, 15)'"


def config_keys() -> dict:
  """The `pretrain` config section."""
  Key = schema.Key  # pylint: disable=invalid-name
  return {
      "steps": Key(0, "steps of training on pretrain.categories before task 1 "
                   "(the configured loss, no strategy); 0 = task 1 starts from "
                   "the initial params", schema.at_least(0, integer=True)),
      "categories": Key((), "category ids held out of every task: pretraining "
                        "trains on their training pairs; their captions join "
                        "the vocabulary even with steps=0", _category_ids),
      "learning_rate": Key(0.0, "pretraining's Adam learning rate; 0 = "
                           "optim.learning_rate", schema.at_least(0)),
  }


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """What single keys cannot say: pretraining steps without categories, and
  held-out categories inside a task group given by id.

  Checked before any work; what needs the dataset (ids beyond its categories,
  groups by name or by default) is checked once it is loaded
  (`setup_lib.check_pretrain_categories`).
  """
  pretrain = config.pretrain
  categories = tuple(pretrain.categories)
  if pretrain.steps > 0 and not categories:
    return [f"--config.pretrain.steps={pretrain.steps} needs "
            "--config.pretrain.categories: the category ids held out of every "
            "task to pretrain on, e.g. '(12, 13, 14, 15)' (or set steps to 0)."]
  for t, group in enumerate(config.data.task_categories or ()):
    inside = [c for c in categories if c in list(group)]
    if inside:
      return [f"--config.pretrain.categories={categories}: category {inside[0]} is "
              f"in task {t + 1}'s group {list(group)}; a pretraining category must "
              "be in no task: drop it from pretrain.categories or regroup "
              "data.task_categories."]
  return []


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether task 1 starts from pretrained params (`pretrain.steps` > 0)."""
  return config.pretrain.steps > 0


def pretrain_dir(workdir: str) -> str:
  """`<workdir>/pretrained`: the stage's snapshot and state checkpoints."""
  return os.path.join(os.path.abspath(workdir), "pretrained")


def pretrained_params(setup: setup_lib.Setup, params: Any) -> Any:
  """The params task 1 starts from: `params` pretrained, or their saved result.

  Args:
    params: the initial params (`setup_lib.initial_params`); donated to the
      train step when pretraining runs, so the caller must not reuse them.
  Returns:
    The pretrained params, placed as `setup.params_template` on the mesh.
  Raises:
    ValueError: the saved snapshot holds another vocabulary (code changed
      under the workdir).
  """
  folder = pretrain_dir(setup.workdir)
  restored = _restore(setup, folder)
  if restored is not None:
    logging.info("pretraining: restored %s", checkpoints.snapshot_dir(folder, 0))
    return restored
  params = _train(setup, params, folder)
  checkpoints.save_snapshot(folder, 0, params, {
      **setup_lib.snapshot_meta(setup, 0),
      "pretrain_steps": setup.config.pretrain.steps,
      "pretrain_categories": list(setup.config.pretrain.categories)})
  return params


def _restore(setup: setup_lib.Setup, folder: str) -> Any | None:
  """The saved pretrained params, or None (none saved, or one set aside)."""
  if 0 not in checkpoints.completed_snapshots(folder):
    return None
  try:
    params, meta = checkpoints.restore_snapshot(
        folder, 0, setup.params_template, setup_lib.param_placement(setup.mesh))
  except checkpoints.CheckpointError as e:
    moved = checkpoints.quarantine_snapshot(folder, 0)
    logging.warning("%s\nMoved it to %s; pretraining again.", e, moved)
    sharding.sync("pretrained snapshot set aside")  # Before anyone saves anew.
    return None
  if text_lib.tokenizer_from_json(meta["vocab"]) != setup.vocab:
    raise ValueError(
        f"the pretrained snapshot in {folder} was trained with another "
        "vocabulary than this config's data gives; use a new --workdir.")
  return params


def _train(setup: setup_lib.Setup, params: Any, folder: str) -> Any:
  """`pretrain.steps` steps on `setup.pretrain_pool`, resuming a saved state."""
  cfg = setup.config
  steps = cfg.pretrain.steps
  optim = ml_collections.ConfigDict(cfg.optim.to_dict())  # Unlocked copy.
  if cfg.pretrain.learning_rate > 0:
    optim.learning_rate = cfg.pretrain.learning_rate
  # The tasks' optimizer with the identity as its strategy transform, and a
  # train step without loss term: plain training, whatever strategy follows.
  optimizer = train_lib.make_optimizer(optim, steps, optax.identity())
  train_step = train_lib.make_train_step(setup.model, optimizer,
                                         losses.make_loss(cfg.loss), setup.mesh)
  state = train_lib.create_train_state(params, optimizer, setup.mesh)
  first_step, ranked_before = 0, False
  resumed = checkpoints.restore_latest_state(
      folder, jax.eval_shape(lambda: state), setup_lib.param_placement(setup.mesh))
  if resumed is not None:
    state, first_step = resumed[0], resumed[1]["next_step"]
    ranked_before = resumed[1].get("ranked", first_step > 0)  # See training.py.
    logging.info("pretraining: resuming at step %d from %s/state", first_step, folder)
  pool, batch_size = setup.pretrain_pool, cfg.train.batch_size
  rows = sharding.process_rows(batch_size, setup.mesh)
  logging.info("pretraining: %d steps on categories %s (%d images)", steps,
               list(cfg.pretrain.categories), len(pool))

  def batch_fn(s):
    return pipeline.train_batch(pool, batch_size, seed=cfg.seed, task=BATCH_STREAM,
                                step=s, rows=rows)

  def save(state, next_step, ranked):
    checkpoints.save_state(folder, state,
                           {"task": 0, "next_step": next_step, "ranked": ranked})

  with pipeline.prefetched(batch_fn, steps) as next_batch:
    # Logged (and drawn) as "task 0"; no live scalars: their step axis is the
    # tasks' (t * steps_per_task + step), which pretraining precedes.
    state = train_lib.train_task(
        state, train_step, next_batch, first_step=first_step, num_steps=steps,
        mesh=setup.mesh, checkpoint_every=cfg.train.checkpoint_every,
        checkpoint_fn=save, log_every=cfg.train.log_every, task=0,
        ranked_before=ranked_before)
  return state["params"]
