"""Parameter-importance regularisers (EWC, online EWC, MAS, L2): one optax transform.

Registers the strategies `ewc`, `online_ewc` (settings in `config.strategy.ewc`),
`mas` and `l2`.

Every one of them pulls parameters towards earlier solutions with a quadratic
penalty `strength/2 * sum_k F_k * (theta - theta*_k)^2`. Its gradient is
`strength * (F * theta - B)` with the accumulators `F = sum_k F_k` (importance)
and `B = sum_k F_k * theta*_k` (importance-weighted anchor), so the transform
keeps two parameter-shaped arrays however many tasks have passed:
  ewc         F_k = Fisher diagonal of task k, accumulated: F += F_k, B += F_k*theta*_k;
  online_ewc  F = decay*F + F_k, anchor at the latest solution only: B = F*theta*;
  mas         as ewc, with F_k = MAS importance (sensitivity of the similarities);
  l2          F = 1 after the first task, anchor at the latest solution (L2-SP).
The accumulators live in the transform's state and are installed between tasks
with `optax.tree_utils.tree_set`, so a new anchor never recompiles the step.

Fisher estimate. A contrastive loss over a batch couples its pairs (each pair's
loss depends on every other pair in the batch), so per-example gradients are not
defined. We use the batch-level empirical Fisher: for each of `num_batches`
training batches of the task, the gradient g_m of the batch's per-pair mean
loss; F = batch_size * mean_m g_m^2. Squaring the mean gradient shrinks the
per-pair squared gradient by about 1/batch_size when pair gradients are
independent and centred (near a minimum), hence the batch_size factor; the
estimate is then on the scale of the per-pair Fisher that FACIL's lambda
defaults assume, and exact for a batch of one.

MAS importance. Aljundi et al. use the sensitivity of the squared L2 norm of the
network output; our embeddings are L2-normalised (their norm is constant), so we
take the output that retrieval reads: the in-batch similarity matrix S. For each
batch, Omega_m = |d(||S||_F^2 / batch^2)/d theta|; Omega = mean_m Omega_m.
"""

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ccr_jax import schema
from ccr_jax import sharding
from ccr_jax.strategies import base


class ImportanceState(NamedTuple):
  """The accumulators of `importance_pull`: both shaped like the params."""
  importance: Any        # F = sum_k F_k
  weighted_anchor: Any   # B = sum_k F_k * theta*_k


def importance_pull(strength: float) -> optax.GradientTransformation:
  """Adds `strength * (F * params - B)` to the updates (the penalty's gradient).

  Chain it before the optimizer: the pull is then clipped and scaled like the
  loss gradient it is part of. Starts with F = B = 0 (no pull) until
  `install` puts the accumulators of earlier tasks in its state.
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ImportanceState(importance=zeros, weighted_anchor=zeros)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("importance_pull needs params: call update(g, s, params).")
    updates = jax.tree.map(
        lambda g, p, f, b: g + strength * (f * p - b), updates, params,
        state.importance, state.weighted_anchor)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def penalty(params: Any, accumulators: ImportanceState, strength: float) -> jax.Array:
  """The same regulariser as a loss: strength/2 * sum(F*theta^2 - 2*B*theta) + const.

  The constant sum_k F_k*theta*_k^2 is dropped (it does not move the gradient),
  so this equals `strength/2 * sum_k F_k (theta - theta*_k)^2` up to a constant
  and its gradient is exactly what `importance_pull` adds.
  """
  terms = jax.tree.map(lambda p, f, b: jnp.sum(f * p * p - 2.0 * b * p), params,
                       accumulators.importance, accumulators.weighted_anchor)
  return 0.5 * strength * sum(jax.tree.leaves(terms))


def install(opt_state: Any, accumulators: ImportanceState) -> Any:
  """Returns `opt_state` with the importance_pull accumulators replaced."""
  return optax.tree_utils.tree_set(
      opt_state, importance=accumulators.importance,
      weighted_anchor=accumulators.weighted_anchor)


def zeros_like(params: Any) -> ImportanceState:
  """Accumulators of a run that has not finished a task yet (no pull)."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return ImportanceState(zeros, zeros)


def accumulate(kind: str, accumulators: ImportanceState, task_importance: Any,
               anchor: Any, decay: float = 1.0) -> ImportanceState:
  """The accumulators after a task with importance F_k and solution `anchor`.

  Args:
    kind: 'ewc' / 'mas' (sum over tasks), 'online_ewc' (decayed sum, latest
      anchor) or 'l2' (unit importance, latest anchor).
  """
  if kind in ("ewc", "mas"):
    return ImportanceState(
        jax.tree.map(jnp.add, accumulators.importance, task_importance),
        jax.tree.map(lambda b, f, a: b + f * a, accumulators.weighted_anchor,
                     task_importance, anchor))
  if kind == "online_ewc":
    importance = jax.tree.map(lambda f, fk: decay * f + fk, accumulators.importance,
                              task_importance)
  elif kind == "l2":
    importance = jax.tree.map(jnp.ones_like, anchor)
  else:
    raise ValueError(f"unknown importance kind {kind!r}")
  return ImportanceState(importance, jax.tree.map(jnp.multiply, importance, anchor))


def _mean_over_batches(fn: Callable[[Any, dict], Any], elementwise: Callable,
                       params: Any, batches: Iterable[dict]) -> Any:
  """mean_m elementwise(fn(params, batch_m)), leaf by leaf."""
  total, count = None, 0
  for batch in batches:
    value = jax.tree.map(elementwise, fn(params, batch))
    total = value if total is None else jax.tree.map(jnp.add, total, value)
    count += 1
  return jax.tree.map(lambda s: s / count, total)


def fisher_diagonal(grad_fn: Callable[[Any, dict], Any], params: Any,
                    batches: Iterable[dict], batch_size: int) -> Any:
  """Batch-level empirical Fisher diagonal (see the module docstring).

  Args:
    grad_fn: (params, batch) -> gradient of the batch's per-pair mean loss.
    batches: the task's training batches to average over.
  """
  mean_sq = _mean_over_batches(grad_fn, jnp.square, params, batches)
  return jax.tree.map(lambda s: batch_size * s, mean_sq)


def mas_importance(sensitivity_fn: Callable[[Any, dict], Any], params: Any,
                   batches: Iterable[dict]) -> Any:
  """MAS importance: mean over batches of |d(||S||_F^2 / B^2)/d theta|.

  Args:
    sensitivity_fn: (params, batch) -> gradient of ||S||_F^2 / B^2, S the
      batch's image-caption similarity matrix.
  """
  return _mean_over_batches(sensitivity_fn, jnp.abs, params, batches)


# ------------------------------------------------------------------ strategies


@functools.lru_cache(maxsize=None)
def _gradient_fns(ctx: base.TrainingContext) -> dict[str, Callable]:
  """Jitted per-batch gradients the estimates average over (one compile per run).

  Returns {"loss": (params, batch) -> grad of the batch's per-pair mean loss,
           "similarity": (params, batch) -> grad of ||S||_F^2 / B^2}, S the
  batch's image-caption similarity matrix (see the module docstring).
  """
  data = sharding.batch_sharded(ctx.mesh)

  def mean_loss(params, batch):
    img, txt = ctx.embed(params, batch)
    # The loss the task ended with (after any VSE0 warm-up of vse_pp).
    loss, _ = ctx.loss_fn(img, txt, image_ids=batch["image_ids"],
                          step=jnp.int32(jnp.iinfo(jnp.int32).max),
                          loss_params=params.get("loss"))
    return loss / img.shape[0] if ctx.loss_reduction == "sum" else loss

  def similarity_energy(params, batch):
    img, txt = ctx.embed(params, batch)
    return jnp.sum(jnp.square(img @ txt.T)) / img.shape[0] ** 2

  def gradient(fn):
    # Gradients land where their parameters are.
    return lambda params, batch: sharding.constrain(jax.grad(fn)(params, batch),
                                                    ctx.mesh)

  return {name: jax.jit(gradient(fn), in_shardings=(None, data))
          for name, fn in (("loss", mean_loss), ("similarity", similarity_energy))}


def importance_strategy(kind: str, strength: float, batches: int = 0,
                        decay: float = 1.0) -> base.Strategy:
  """The pull towards earlier solutions with `kind`'s importance.

  Its state {"importance": F, "weighted_anchor": B} starts at zero (no pull)
  and is updated after every task from `batches` batches of the task's
  training data, drawn from a stream other than the training order's (seed + 1).

  Args:
    kind: 'ewc', 'online_ewc', 'mas' or 'l2' (see `accumulate`).
  """

  def init_state(params, ctx):
    del ctx
    return zeros_like(params)._asdict()

  def install_state(opt_state, state, task):
    del task
    return install(opt_state, ImportanceState(**state))

  def end_of_task(ctx, task, params, state):
    task_importance = None
    if kind != "l2":
      fns = _gradient_fns(ctx)
      draws = ctx.task_batches(task, batches, ctx.seed + 1)
      if kind == "mas":
        task_importance = mas_importance(fns["similarity"], params, draws)
      else:
        task_importance = fisher_diagonal(fns["loss"], params, draws, ctx.batch_size)
    return accumulate(kind, ImportanceState(**state), task_importance, params,
                      decay)._asdict()

  settings = {"strength": strength}
  if kind != "l2":
    settings["batches"] = batches
  if kind == "online_ewc":
    settings["decay"] = decay
  return base.Strategy(
      name=kind, settings={kind: settings}, transform=importance_pull(strength),
      state_keys=ImportanceState._fields, init_state=init_state,
      install=install_state, end_of_task=end_of_task)


_STRENGTH = "weight of the quadratic pull strength/2 * sum F (theta - theta*)^2"
_BATCHES = "training batches of the task the importance estimate averages over"

base.register(
    "ewc", lambda c, _: importance_strategy("ewc", c.strength, c.batches),
    keys={"strength": schema.Key(30.0, _STRENGTH + " (chosen on validation, scratch; "
                                 "pretrained: 300)", schema.greater_than(0)),
          "batches": schema.Key(20, _BATCHES, schema.at_least(1, integer=True)),
          "decay": schema.Key(0.9, "online EWC's gamma: F <- gamma F + F_t (1.0 would "
                              "be plain EWC with the latest anchor)",
                              schema.fraction)})
base.register(
    "online_ewc",
    lambda c, _: importance_strategy("online_ewc", c.strength, c.batches, c.decay),
    section="ewc")
base.register(
    "mas", lambda c, _: importance_strategy("mas", c.strength, c.batches),
    keys={"strength": schema.Key(10.0, _STRENGTH + " (chosen on validation, "
                                 "scratch; pretrained: 100)", schema.greater_than(0)),
          "batches": schema.Key(20, _BATCHES, schema.at_least(1, integer=True))})
base.register(
    "l2", lambda c, _: importance_strategy("l2", c.strength),
    keys={"strength": schema.Key(3e-3, "weight of the pull strength/2 * "
                                 "||theta - theta*||^2 to the previous solution "
                                 "(chosen on validation, scratch; pretrained: 0.03)",
                                 schema.greater_than(0))})
