"""The train state, the pure train step compiled over a mesh, and train_task.

The state is a plain pytree {"params", "opt", "step"}. One `train_step` is
compiled per experiment: batch shapes are fixed, the optimizer state is reset
(not rebuilt) between tasks, so nothing recompiles when the task changes.
"""

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from ccr_jax import losses as losses_lib
from ccr_jax import progress
from ccr_jax import sharding
from ccr_jax.models.dual_encoder import DualEncoder


def learning_rate_schedule(optim: ml_collections.ConfigDict,
                           steps_per_task: int) -> optax.Schedule:
  """VSE++-style step decay, restarted at every task.

  lr = learning_rate for the first `decay_at` fraction of a task's steps, then
  learning_rate * decay_factor (VSE++: x0.1 after 15 of 30 epochs).
  """
  boundary = int(optim.decay_at * steps_per_task)

  def schedule(step):
    within = step % steps_per_task
    return optim.learning_rate * jnp.where(within < boundary, 1.0, optim.decay_factor)

  return schedule


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_task: int,
                   transform: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
  """`transform` (a strategy's) -> global-norm clip -> Adam with the per-task schedule."""
  return optax.chain(
      transform,
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adam(learning_rate_schedule(optim, steps_per_task)),
  )


def make_loss(loss_config: ml_collections.ConfigDict) -> Callable:
  """The registered loss with the config's values bound (`losses.make_loss`)."""
  return losses_lib.make_loss(loss_config)


def loss_in_compute_dtype(loss_fn: Callable, compute_dtype: Any) -> Callable:
  """`loss_fn` with its score matmuls in bfloat16 when `compute_dtype` is bfloat16.

  That is `loss.matmul_dtype='bfloat16'` (inputs rounded to bfloat16,
  products accumulated in float32), whatever the config's matmul_dtype; the
  rest of the loss (hinge sums, logsumexp, sigmoid terms) stays float32, as
  every loss computes it from float32 scores. With float32 `loss_fn` itself
  is returned.

  Args:
    loss_fn: a loss bound by `make_loss` (any registered loss takes
      `matmul_dtype`).
    compute_dtype: the model's (`DualEncoder.dtype`), a dtype or its name.
  """
  if jnp.dtype(compute_dtype) == jnp.bfloat16:
    return functools.partial(loss_fn, matmul_dtype="bfloat16")
  return loss_fn


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       mesh: Mesh, step: int = 0, *, old_model: dict | None = None,
                       install: Callable | None = None, strategy_state: dict | None = None,
                       task: int = 0, keep_strategy_state: bool = False) -> dict:
  """{"params", "opt", "step"[, "old_model"][, "strategy"]} with a fresh optimizer
  state at `step`.

  Args:
    old_model: for loss terms that need the previous snapshot,
      {"old_params": params pytree, "active": float32 scalar} (see
      `old_model_state`); kept unchanged by the train step.
    install: a strategy's (opt_state, strategy_state, task) -> opt_state,
      applied to the fresh optimizer state (e.g. a regulariser's accumulators, a
      per-task flag); `strategy_state` and `task` (0-based) are what it gets.
    keep_strategy_state: also keep `strategy_state` as state["strategy"], for
      loss terms that read it (`Strategy.loss_reads_state`).
  Every leaf is placed where `sharding.param_sharding` says (replicated
  without a model axis), exactly as `train_step` returns it: a state placed
  otherwise would compile the step a second time.
  """
  args = (params, jnp.asarray(step, jnp.int32), old_model, strategy_state,
          jnp.asarray(task, jnp.int32))
  # Placed first: freshly initialised (unplaced) and trained (placed)
  # params are different input types to jit, two compilations otherwise.
  return _state_builder(optimizer, install, mesh, keep_strategy_state)(
      *sharding.place(args, mesh))


@functools.lru_cache(maxsize=None)
def _state_builder(optimizer: optax.GradientTransformation, install: Callable | None,
                   mesh: Mesh, keep_strategy_state: bool = False) -> Callable:
  # One jitted builder per (optimizer, install, mesh): a fresh closure per
  # call would be a new function to jit, traced and compiled again at every
  # task. Jitted at all because an eager optimizer.init compiles one tiny
  # program per leaf.

  def build(p, s, old_model, strategy_state, task):
    opt = optimizer.init(p)
    if install is not None:
      opt = install(opt, strategy_state, task)
    state = {"params": p, "opt": opt, "step": s}
    if old_model is not None:
      state["old_model"] = old_model
    if keep_strategy_state:
      state["strategy"] = strategy_state
    return sharding.constrain(state, mesh)

  return jax.jit(build)


def old_model_state(old_params: Any | None, params: Any) -> dict:
  """state["old_model"] for loss terms that need the previous snapshot, or none yet.

  On the first task there is no previous snapshot: the current params stand in
  (same shapes, so nothing recompiles later) and `active` = 0 switches the
  loss term off.
  """
  active = old_params is not None
  return {"old_params": old_params if active else params,
          "active": jnp.float32(1.0 if active else 0.0)}


def pair_embedder(model: DualEncoder, mesh: Mesh) -> Callable:
  """(params, batch) -> (img [B, dim], txt [B, dim]), each device its own rows.

  Traceable (not jitted itself): the train step and strategies' hooks call it
  inside their own jitted functions. The towers compute in the model's
  compute dtype from the float32 params (each layer casts them at use, so
  gradients come back float32); the embeddings are float32.
  """
  apply = sharding.per_batch_shard(
      lambda p, images, tokens, lengths: model.apply({"params": p}, images, tokens,
                                                     lengths), mesh)
  return lambda params, batch: apply(params, batch["images"], batch["tokens"],
                                     batch["lengths"])


def make_train_step(model: DualEncoder, optimizer: optax.GradientTransformation,
                    loss_fn: Callable, mesh: Mesh,
                    loss_term: Callable | None = None,
                    current_rows: int = 0, memory_gradient: bool = False,
                    record: Callable | None = None) -> Callable:
  """Compiles `train_step(state, batch) -> (state, metrics)` over `mesh`.

  The batch (images [B, H, W, 3], tokens [B, L], lengths [B], image_ids [B]) is
  split over the mesh's devices; the state keeps the shardings it comes with
  (`create_train_state`: replicated, or split over the model axis) and is
  donated. The loss is computed over the global batch: XLA gathers the
  embeddings (and split parameters) it needs, so the result equals the
  single-device step up to float reassociation.

  `loss_term` (a strategy's: (img, txt, old, batch, step, loss_params,
  strategy_state) -> (loss, extras)) is added; when the state has
  "old_model" (`old_model_state`), old is the previous snapshot's embeddings
  of the batch and the term is multiplied by state["old_model"]["active"];
  strategy_state is state.get("strategy").

  `current_rows` > 0 (`Memory.separate_batch`): a batch of more than
  current_rows rows is the current task's first current_rows rows followed
  by a memory batch (`pipeline.mixed_batch` with `memory_batch`), and the
  training loss is over the current rows only (the loss term sees every
  row: DER's terms on the memory rows). With `memory_gradient` (A-GEM) the
  loss is instead differentiated on the two apart: the first gradient is
  the update's and the second goes to the optimizer as the extra argument
  `memory_grads`. A batch of current_rows rows (no memory yet) is one
  batch, as without `current_rows`. The row count is static, so each
  layout compiles its own program.

  `record` (`Strategy.record`): called with the strategy state and the
  step's own embeddings of the batch; what it returns replaces
  state["strategy"].

  Mixed precision: with a bfloat16 model (`DualEncoder.dtype`) the towers
  run in bfloat16 and so do the loss's score matmuls
  (`loss_in_compute_dtype`); params, gradients and the optimizer state stay
  float32. The `score_std` metric stays a float32 matmul: the collapse check
  compares it with `COLLAPSED_STD`, below bfloat16's resolution.
  """

  embed = pair_embedder(model, mesh)
  loss_fn = loss_in_compute_dtype(loss_fn, model.dtype)

  def loss_and_extras(params, batch, step, old_model, strategy_state):
    img, txt = embed(params, batch)
    loss_params = params.get("loss")
    rows = img.shape[0]
    # With a memory gradient the step hands each part in alone (whole).
    n = (current_rows if current_rows and not memory_gradient and rows > current_rows
         else rows)
    loss, extras = loss_fn(img[:n], txt[:n], image_ids=batch["image_ids"][:n],
                           step=step, loss_params=loss_params)
    # The std of the batch's [B, B] similarity scores: 0 when every
    # similarity is equal (a collapsed model, e.g. a dead tower embedding
    # everything at 0), which `train_task` stops on. B^2 D flops: the loss's own.
    score_std = jnp.std(jax.lax.stop_gradient(img[:n]) @ jax.lax.stop_gradient(txt[:n]).T)
    extras = {"contrastive": loss, **extras, "score_std": score_std}
    if loss_term is not None:
      old, active = None, 1.0
      if old_model is not None:
        old = embed(jax.lax.stop_gradient(old_model["old_params"]), batch)
        active = old_model["active"]
      extra_loss, extra_extras = loss_term(img, txt, old, batch, step, loss_params,
                                           strategy_state)
      loss = loss + active * extra_loss
      extras.update(extra_extras)
    return loss, (extras, (img, txt))

  value_and_grad = jax.value_and_grad(loss_and_extras, has_aux=True)

  def train_step(state, batch):
    args = (state["step"], state.get("old_model"), state.get("strategy"))
    extra_args = {}
    rows = jax.tree.leaves(batch)[0].shape[0]
    if memory_gradient and current_rows and rows > current_rows:
      current = jax.tree.map(lambda x: x[:current_rows], batch)
      memory = jax.tree.map(lambda x: x[current_rows:], batch)
      (loss, (extras, _)), grads = value_and_grad(state["params"], current, *args)
      _, extra_args["memory_grads"] = value_and_grad(state["params"], memory, *args)
      embedded = None
    else:
      (loss, (extras, embedded)), grads = value_and_grad(state["params"], batch, *args)
    updates, opt = optimizer.update(grads, state["opt"], state["params"], **extra_args)
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **extras}
    state = {**state, "params": params, "opt": opt, "step": state["step"] + 1}
    if record is not None:
      if embedded is None:
        raise ValueError("a strategy cannot both record embeddings and take a "
                         "memory gradient.")
      img, txt = jax.tree.map(jax.lax.stop_gradient, embedded)
      state["strategy"] = record(state["strategy"], img, txt, batch)
    return sharding.constrain(state, mesh), metrics

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  # The state's in-sharding (None) is its arguments' own; its out-sharding is
  # the constraint above, the same per-leaf rule, so step t+1 takes step t's
  # output without resharding or recompiling.
  return jax.jit(train_step, in_shardings=(None, data), out_shardings=(None, rep),
                 donate_argnums=(0,))


def train_task(state: dict, train_step: Callable, batch_fn: Callable[[int], dict],
               *, first_step: int, num_steps: int, mesh: Mesh,
               checkpoint_every: int, checkpoint_fn: Callable[[dict, int, bool], None],
               log_every: int, task: int, ranked_before: bool = False,
               writer: progress.ScalarWriter | None = None,
               learning_rate_fn: Callable[[int], Any] | None = None,
               show_progress: bool | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
  """Runs steps `first_step .. num_steps-1` of one task and returns the state.

  Every `log_every` steps (and at the last) the metrics averaged over the
  window are logged, shown on the progress bar and, with a `writer`, recorded
  as scalars "train/<metric>" (the numbers of the log line),
  "train/learning_rate" and "perf/pairs_per_s" at global step
  (task - 1) * num_steps + steps done, which is the state's "step" when every
  task runs `num_steps` steps.

  Args:
    batch_fn: step within the task -> this process's rows of the global
      batch (`sharding.process_rows`; all of it with one process), a pure
      function of the step, so a resumed task draws the same batches.
    checkpoint_fn: called as (state, next step within task, ranked) every
      `checkpoint_every` steps; `ranked` (the model ranked in some window so
      far) is what a resume passes back as `ranked_before`.
    ranked_before: the model ranked before `first_step` (a resumed task's
      checkpoint said so, or an earlier task trained it), so a first window
      that is already collapsed is a collapse, not a dead initialisation.
    writer: where scalars go (`progress.ScalarWriter`); none are recorded
      without one. A resumed task (`first_step` > 0) marks the steps it writes
      again, so earlier runs' values there are dropped.
    learning_rate_fn: the optimizer's schedule, called with the step within
      the task (the optimizer state starts afresh each task); the learning
      rate of a window's last step is recorded.
    show_progress: True draws the bar even off a terminal or in CI, False
      never; None draws it on a terminal outside CI (`progress_enabled`).
    should_stop: polled between steps (a signal handler's flag); when it
      turns true the state is checkpointed at that step and `Interrupted` is
      raised. With several processes it is polled at log windows and acted on
      when any process asks, so all of them save the same step.
  Raises:
    FloatingPointError: when the loss is not finite, or the model collapsed
      (it ranked in an earlier window; now every similarity of a window's
      batches is equal and there is no gradient), naming the step range;
      the last state checkpoint on disk is left as it was.
    Interrupted: `should_stop` asked to stop.
  """
  step_offset = (task - 1) * num_steps
  if writer is not None and first_step > 0:
    # Windows ending after the checkpoint may have been written by the killed
    # run; the one ending at first_step was logged before that checkpoint.
    writer.resume_at(step_offset + first_step + 1)
  bar = progress.task_progress(task, first_step, num_steps, force=show_progress)
  metrics_sum, since = None, first_step
  window_start = time.perf_counter()
  try:
    for step in range(first_step, num_steps):
      if _stop_requested(should_stop, step, first_step, log_every):
        if step > first_step:
          with progress.bar_cleared(bar):
            checkpoint_fn(state, step, ranked_before)
        raise Interrupted(task, step, saved=step > first_step)
      batch = sharding.shard_batch(batch_fn(step), mesh)
      batch_size = jax.tree.leaves(batch)[0].shape[0]  # The global batch.
      state, metrics = train_step(state, batch)
      bar.update(1)  # Host-side count only: the bar reads no device value.
      metrics_sum = metrics if metrics_sum is None else jax.tree.map(
          jnp.add, metrics_sum, metrics)
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        # The only host sync in the loop: reading the metrics to log them.
        host = jax.tree.map(lambda x: float(x) / (done - since),
                            jax.device_get(metrics_sum))
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(
              f"task {task}: loss became {host['loss']} between steps {since} and "
              f"{done}; the last good state checkpoint is left intact. Lower "
              "--config.optim.learning_rate or check the data.")
        flat = (host.get("score_std", 1.0) < COLLAPSED_STD
                and host.get("grad_norm", 1.0) < COLLAPSED_GRAD_NORM)
        # Collapsed = was ranking, now cannot: a model that starts flat (e.g.
        # degenerate fixture features) is not a training accident to stop.
        ranked_before = ranked_before or not flat
        if flat and ranked_before:
          raise FloatingPointError(
              f"task {task}: the model collapsed between steps {since} and {done} "
              f"(every image-text similarity of the batch is the same: std "
              f"{host['score_std']:.2g}, gradient norm {host['grad_norm']:.2g}), "
              "so retrieval is at chance and cannot recover; the last good state "
              "checkpoint is left intact. Lower --config.optim.learning_rate.")
        # Timed between syncs, so it is what the device did, not the dispatch.
        now = time.perf_counter()
        seconds_per_step = max(now - window_start, 1e-9) / (done - since)
        pairs_per_s = batch_size / seconds_per_step
        window_start = now
        progress.show_window(bar, host["loss"], pairs_per_s)
        with progress.bar_cleared(bar):
          logging.info("%s", progress.log_line(
              task, done, num_steps, host, pairs_per_s,
              seconds_per_step * (num_steps - done)))
        if writer is not None:
          scalars = {f"train/{k}": v for k, v in host.items()}
          if learning_rate_fn is not None:
            scalars["train/learning_rate"] = float(learning_rate_fn(done - 1))
          scalars["perf/pairs_per_s"] = pairs_per_s
          writer.write(step_offset + done, scalars)
        metrics_sum, since = None, done
      if checkpoint_every and done % checkpoint_every == 0 and done < num_steps:
        with progress.bar_cleared(bar):  # Checkpointing logs too.
          checkpoint_fn(state, done, ranked_before)
  finally:
    bar.close()
  return state


# Below this std of a window's similarity scores every similarity is equal to
# float32 precision; a model that still ranks anything spreads them by far
# more (~0.05 at initialisation, ~0.2 trained, on the embedded benchmark).
COLLAPSED_STD = 1e-6
# ... and with no gradient the model cannot leave that state: a model whose
# scores are merely equal for now (identical inputs, e.g. degenerate fixture
# features at initialisation) still has a gradient and trains on.
COLLAPSED_GRAD_NORM = 1e-10


class Interrupted(Exception):
  """The run stopped on request (SIGINT/SIGTERM): at a training step boundary
  (`task`, `step`, whether the state was `saved` there) or before a later
  `stage` (every earlier stage's output is on disk)."""

  def __init__(self, task: int, step: int, saved: bool, stage: str | None = None):
    super().__init__(f"before {stage}" if stage else f"task {task} step {step}")
    self.task, self.step, self.saved, self.stage = task, step, saved, stage


def _stop_requested(should_stop: Callable[[], bool] | None, step: int,
                    first_step: int, log_every: int) -> bool:
  if should_stop is None:
    return False
  if jax.process_count() == 1:
    return should_stop()
  # Every process must stop at the same step: agree at log windows (one small
  # collective) rather than each at its own signal's step.
  if (step - first_step) % log_every:
    return False
  return sharding.any_process(should_stop())


def make_embed_fns(model: DualEncoder, mesh: Mesh) -> tuple[Callable, Callable]:
  """Jitted (embed_images(params, images), embed_texts(params, tokens, lengths)).

  Inputs and the [batch, dim] output are split over the mesh's devices; the
  params keep their own shardings. The towers compute in the model's compute
  dtype, as in training; the embeddings are float32 and unit norm.
  """
  data = sharding.batch_sharded(mesh)
  embed_images = jax.jit(sharding.per_batch_shard(
      lambda p, x: model.apply({"params": p}, x, method=DualEncoder.embed_images),
      mesh), in_shardings=(None, data), out_shardings=data)
  embed_texts = jax.jit(sharding.per_batch_shard(
      lambda p, t, l: model.apply({"params": p}, t, l, method=DualEncoder.embed_texts),
      mesh), in_shardings=(None, data, data), out_shardings=data)
  return embed_images, embed_texts


def embed_in_batches(embed_fn: Callable, params: Any, arrays: tuple[np.ndarray, ...],
                     batch_size: int, mesh: Mesh) -> np.ndarray:
  """Embeds rows of `arrays` (each [N, ...]) in fixed-size batches -> [N, dim] float32.

  The last batch is padded to `batch_size` (by repeating its first row) so
  one compiled program serves every gallery size. Each process reads only its
  rows of every batch (`sharding.process_rows`); every process returns all N.
  """
  n = len(arrays[0])
  rows = sharding.process_rows(batch_size, mesh)
  out = []
  for start in range(0, n, batch_size):
    count = min(batch_size, n - start)
    # Global rows of this batch, padding rows pointing at its first row.
    index = start + np.arange(batch_size)[rows]
    index[index >= start + count] = start
    if rows == slice(0, batch_size) and count == batch_size:
      chunk = [a[start:start + batch_size] for a in arrays]  # Plain slices: no copy.
    else:
      chunk = [a[index] for a in arrays]
    placed = sharding.shard_batch(dict(enumerate(chunk)), mesh)
    emb = embed_fn(params, *(placed[i] for i in range(len(chunk))))
    out.append(sharding.to_host(emb)[:count])
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)
