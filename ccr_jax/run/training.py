"""Training stage: one compiled train step for the sequence, a task at a time,
and the strategy's end-of-task hook. Knows no strategy by name: it calls the
parts of the `strategies.Strategy` value the config names."""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

from ccr_jax import checkpoints
from ccr_jax import losses
from ccr_jax import progress
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from ccr_jax.run import setup as setup_lib


@dataclasses.dataclass(frozen=True)
class Training:
  """The compiled pieces of training, built once per experiment.

  `compiled` holds the train step compiled ahead of time per batch row count
  (("step", rows)) and the seconds compiling took in all ("compile_s"); see
  `compiled_train_step`.
  """
  strategy: strategies.Strategy
  optimizer: Any
  train_step: Any
  context: strategies.TrainingContext
  compiled: dict = dataclasses.field(default_factory=dict)

  def state_template(self, setup: setup_lib.Setup) -> Any:
    """The abstract strategy state saved with snapshots (None without one)."""
    if self.strategy.init_state is None:
      return None
    return jax.eval_shape(lambda p: self.strategy.init_state(p, self.context),
                          setup.params_template)


def build_training(setup: setup_lib.Setup) -> Training:
  """Strategy, optimizer and the one compiled train step for the whole sequence."""
  cfg = setup.config
  sharding.check_batch_size(cfg.train.batch_size, setup.mesh)
  # The strategy's own uses of the loss run at the model's compute dtype too.
  loss_fn = train_lib.loss_in_compute_dtype(losses.make_loss(cfg.loss), setup.model.dtype)
  strategy = strategies.get_strategy(cfg.strategy, loss_fn)
  optimizer = train_lib.make_optimizer(cfg.optim, cfg.train.steps_per_task,
                                       strategy.transform)
  if strategy.memory_gradient and strategy.memory is None:
    raise ValueError(f"strategy {strategy.name!r} needs a memory for its memory "
                     "gradient.")
  current_rows = 0
  if strategy.memory is not None:
    if strategy.memory.separate_batch:
      current_rows = cfg.train.batch_size
    # The batch once a memory exists (A-GEM's and DER's are larger than
    # batch_size).
    sharding.check_batch_size(sum(strategy.memory.layout(cfg.train.batch_size)),
                              setup.mesh)
  train_step = train_lib.make_train_step(
      setup.model, optimizer, loss_fn, setup.mesh, strategy.loss_term, current_rows,
      memory_gradient=strategy.memory_gradient, record=strategy.record)
  rows = sharding.process_rows(cfg.train.batch_size, setup.mesh)

  def task_batches(task, count, seed):
    pool = setup.encoded[task]["train"]
    return (sharding.shard_batch(pipeline.train_batch(
        pool, cfg.train.batch_size, seed=seed, task=task, step=m, rows=rows),
                                 setup.mesh) for m in range(count))

  def embed_rows(params, task, rows):
    split = pipeline.subset(setup.encoded[task]["train"], rows)
    img, txt = setup_lib.embed_split(setup, params, split)
    return img, txt.reshape(len(rows), split.captions_per_image, -1)

  context = strategies.TrainingContext(
      embed=train_lib.pair_embedder(setup.model, setup.mesh), loss_fn=loss_fn,
      loss_reduction=cfg.loss.reduction, mesh=setup.mesh,
      batch_size=cfg.train.batch_size, seed=cfg.seed, task_batches=task_batches,
      task_sizes=tuple(len(e["train"]) for e in setup.encoded),
      captions_per_image=setup.captions_per_image, embed_dim=cfg.model.embed_dim,
      embed_rows=embed_rows,
      memory_rows=lambda t: memory_rows(setup, strategy, t))
  return Training(strategy, optimizer, train_step, context)


def describe_strategy(setup: setup_lib.Setup, strategy: strategies.Strategy) -> dict:
  """results.json's "strategy": the strategy's own description and, with a
  memory, how many items of each task it holds after the last task."""
  out = strategy.describe()
  if strategy.memory is not None:
    out["memory_per_task_at_last_task"] = [
        len(m) for m in memory_rows(setup, strategy, setup.num_tasks - 1)]
  return out


def memory_rows(setup: setup_lib.Setup, strategy: strategies.Strategy,
                t: int) -> list:
  """Per task before t (0-based), the training rows the strategy's memory holds."""
  return strategy.memory.rows([len(setup.encoded[j]["train"]) for j in range(t)],
                              setup.config.seed)


def memory_pool(setup: setup_lib.Setup, strategy: strategies.Strategy,
                t: int) -> pipeline.EncodedSplit | None:
  """The memory available while training task t (0-based): past tasks' pairs."""
  if strategy.memory is None or t == 0:
    return None
  return pipeline.concatenate([pipeline.subset(setup.encoded[j]["train"], r)
                               for j, r in enumerate(memory_rows(setup, strategy, t))])


def compiled_train_step(setup: setup_lib.Setup, training: Training, state: dict,
                        batch: dict) -> Any:
  """The train step compiled ahead of time on first use of a batch layout,
  then reused by every task with that layout.

  A compiled executable accepts only the shapes and shardings it was compiled
  for, so a task whose state would need a second compilation fails loudly
  instead of silently compiling again. The sequence compiles once, or twice
  for a strategy whose batches grow once a memory exists (A-GEM's reference
  batch).

  Args:
    state: a train state as `train_lib.create_train_state` returns it.
    batch: a host batch (images [B, ...], tokens [B, L], lengths [B],
      image_ids [B]).
  """
  key = ("step", len(batch["image_ids"]))
  if key not in training.compiled:
    start = time.perf_counter()
    training.compiled[key] = training.train_step.lower(
        state, sharding.shard_batch(batch, setup.mesh)).compile()
    training.compiled["compile_s"] = (training.compiled.get("compile_s", 0.0)
                                      + time.perf_counter() - start)
  return training.compiled[key]


def train_one_task(setup: setup_lib.Setup, training: Training, t: int, params: Any,
                   strategy_state: dict | None,
                   writer: progress.ScalarWriter | None = None, *,
                   should_stop: Callable[[], bool] | None = None) -> tuple[Any, Any]:
  """Trains task index t (0-based) from `params`, resuming a saved state if any.

  `strategy_state` (the strategy's, after task t-1) is installed into the
  optimizer state. With a `writer`, the logged loss terms and learning rate
  go to the workdir's live scalars at global steps t * steps_per_task + step.
  `should_stop`: see `train.train_task` (a stop saves the state and raises
  `train.Interrupted`).

  Returns:
    (params, strategy state): the trained params, and the strategy state with
    what its `collect` read from the final optimizer state (unchanged without).
  """
  cfg, strategy = setup.config, training.strategy
  steps = cfg.train.steps_per_task
  old_model = None
  if strategy.needs_old_model:
    # A copy: the train step donates params, the old model must survive it.
    old = jax.tree.map(lambda x: x.copy(), params) if t > 0 else None
    old_model = train_lib.old_model_state(old, params)
  state = train_lib.create_train_state(
      params, training.optimizer, setup.mesh, step=t * steps, old_model=old_model,
      install=strategy.install, strategy_state=strategy_state, task=t,
      keep_strategy_state=strategy.state_in_train_state)
  first_step = 0
  # A later task starts from a trained snapshot: collapsing in its first
  # window is a training accident, as it is after any ranking window.
  ranked_before = t > 0
  resumed = checkpoints.restore_latest_state(
      setup.workdir, jax.eval_shape(lambda: state), setup_lib.param_placement(setup.mesh))
  if resumed is not None and resumed[1]["task"] == t + 1:
    state, first_step = resumed[0], resumed[1]["next_step"]
    # Checkpoints written before issue 25 do not say; the model had then
    # trained for first_step steps.
    ranked_before = resumed[1].get("ranked", first_step > 0) or ranked_before
    logging.info("task %d: resuming at step %d from %s/state", t + 1, first_step,
                 setup.workdir)
  pool = pipeline.concatenate(
      [setup.encoded[i]["train"] for i in strategy.training_tasks(t)])
  memory = memory_pool(setup, strategy, t)
  ratio = strategy.memory.ratio if strategy.memory else 0.0
  memory_batch = strategy.memory.separate_batch if memory is not None else 0

  def save(state, next_step, ranked):
    checkpoints.save_state(setup.workdir, state,
                           {"task": t + 1, "next_step": next_step, "ranked": ranked})

  rows = sharding.process_rows(cfg.train.batch_size + memory_batch, setup.mesh)

  insertions = None
  if strategy.record is not None:
    if strategy.training_tasks(t) != [t]:
      raise ValueError(f"strategy {strategy.name!r} records memory targets as pairs "
                       "of the current task are first seen: it cannot train on "
                       "other tasks' data too (drop the data policy).")
    incoming = memory_rows(setup, strategy, t + 1)[t]
    insertions = pipeline.insertion_slots(
        pool, incoming, strategy.memory.layout(cfg.train.batch_size)[0]
        if memory is not None else cfg.train.batch_size,
        seed=cfg.seed, task=t, num_steps=steps)

  def batch_fn(s):
    batch = pipeline.mixed_batch(pool, memory, cfg.train.batch_size, ratio,
                                 seed=cfg.seed, task=t, step=s, rows=rows,
                                 with_slots=strategy.memory is not None,
                                 memory_batch=memory_batch)
    if insertions is not None:
      total = cfg.train.batch_size + memory_batch
      for key, slots in insertions(s).items():
        padded = np.full(total, -1, np.int32)
        padded[:len(slots)] = slots
        batch[key] = padded[rows]
    return batch

  step_fn = compiled_train_step(setup, training, state, batch_fn(0))
  try:
    with pipeline.prefetched(batch_fn, steps) as next_batch:
      state = train_lib.train_task(
          state, step_fn, next_batch,
          first_step=first_step, num_steps=steps, mesh=setup.mesh,
          checkpoint_every=cfg.train.checkpoint_every, checkpoint_fn=save,
          log_every=cfg.train.log_every, task=t + 1, writer=writer,
          ranked_before=ranked_before,
          learning_rate_fn=train_lib.learning_rate_schedule(cfg.optim, steps),
          should_stop=should_stop)
  except FloatingPointError as e:
    latest = checkpoints.latest_state_step(setup.workdir)
    last_good = (f"the state checkpoint at {setup.workdir}/state/{latest} (step "
                 f"{latest - t * steps} of task {t + 1})"
                 if latest is not None and latest > t * steps else
                 f"snapshot {t} at {checkpoints.snapshot_dir(setup.workdir, t)}"
                 if t > 0 else "none yet (the task started from the initial params)")
    raise FloatingPointError(f"{e} Last good checkpoint: {last_good}.") from e
  if strategy.record is not None:  # What the steps wrote into it.
    strategy_state = state["strategy"]
  if strategy.collect is not None:
    strategy_state = strategy.collect(state["opt"], state["params"], strategy_state)
  return state["params"], strategy_state


def end_of_task(training: Training, t: int, params: Any,
                strategy_state: dict | None) -> dict | None:
  """The strategy's state after task t (0-based): its end-of-task hook's output,
  or the state unchanged for strategies without a hook (None without state)."""
  if training.strategy.end_of_task is None:
    return strategy_state
  return training.strategy.end_of_task(training.context, t, params, strategy_state)
