"""Synaptic Intelligence (`si`; Zenke, Poole & Ganguli 2017): importance from the
path integral of the loss along training.

Every step, the transform adds -g_{s-1} * (theta_s - theta_{s-1}) to a running
path integral omega (g the loss gradient, before any regulariser's pull; the
update actually applied, after clipping and Adam, is the parameter change).
After task k (`collect`, with the final params for the last step's term):
  Omega_k = max(omega, 0) / ((theta*_k - theta_start)^2 + damping),
the importance F += Omega_k with the anchor at the latest solution, and the
paper's surrogate loss c * sum F (theta - theta*)^2 with c = `strength`
(Zenke et al., eq. 4), through the same quadratic pull as EWC
(`importance.importance_pull`, whose own strength s means s/2 * sum F
(theta - theta*)^2: it is given 2c). Negative path contributions (the loss
rose along a parameter) are clipped to zero importance rather than a push
away from the anchor.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ccr_jax import schema
from ccr_jax.strategies import base
from ccr_jax.strategies import importance


class PathState(NamedTuple):
  """The path integral's running sums; all shaped like the params."""
  si_path: Any              # omega: sum over steps of -g * dtheta
  si_previous_params: Any   # theta at the previous step
  si_previous_grads: Any    # the loss gradient there
  si_start: Any             # theta when the task started


def path_integral() -> optax.GradientTransformation:
  """Accumulates -g_{s-1} * (theta_s - theta_{s-1}) every step; updates unchanged.

  Its state is created with the optimizer's at every task start, so `si_start`
  is the task's starting point and the first step adds nothing (its previous
  gradient is zero).
  """

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return PathState(zeros, params, zeros, params)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("path_integral needs params: call update(g, s, params).")
    path = jax.tree.map(lambda w, g, p, q: w - g * (p - q), state.si_path,
                        state.si_previous_grads, params, state.si_previous_params)
    return updates, PathState(path, params, updates, state.si_start)

  return optax.GradientTransformation(init_fn, update_fn)


def task_importance(path: PathState, final_params: Any, damping: float) -> Any:
  """Omega_k = max(omega + last step's term, 0) / ((theta* - theta_start)^2 + damping)."""
  return jax.tree.map(
      lambda w, g, p, q, s: jnp.maximum(w - g * (p - q), 0.0) / ((p - s) ** 2 + damping),
      path.si_path, path.si_previous_grads, final_params, path.si_previous_params,
      path.si_start)


def si_strategy(strength: float, damping: float) -> base.Strategy:
  """The SI pull c * sum Omega (theta - theta*)^2, c = `strength`; state
  {"importance", "weighted_anchor"} as the importance strategies."""

  def init_state(params, ctx):
    del ctx
    return importance.zeros_like(params)._asdict()

  def install_state(opt_state, state, task):
    del task
    return importance.install(opt_state, importance.ImportanceState(**state))

  def collect(opt_state, params, state):
    path = PathState(*(optax.tree_utils.tree_get(opt_state, f) for f in PathState._fields))
    omega = task_importance(path, params, damping)
    return importance.accumulate("online_ewc", importance.ImportanceState(**state),
                                 omega, params, decay=1.0)._asdict()

  return base.Strategy(
      name="si", settings={"si": {"strength": strength, "damping": damping}},
      transform=optax.chain(path_integral(), importance.importance_pull(2.0 * strength)),
      state_keys=importance.ImportanceState._fields, init_state=init_state,
      install=install_state, collect=collect)


base.register(
    "si", lambda c, _: si_strategy(c.strength, c.damping),
    keys={"strength": schema.Key(5.0, "c of Zenke et al.: the pull c * sum Omega "
                                 "(theta - theta*)^2 (chosen on validation, scratch; "
                                 "pretrained: 50)", schema.greater_than(0)),
          "damping": schema.Key(0.1, "xi: added to the squared parameter change "
                                "of a task (Zenke et al.: 0.1)", schema.greater_than(0))})
