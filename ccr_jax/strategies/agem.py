"""A-GEM (`agem`; Chaudhry et al. 2019): project the gradient when it conflicts
with the gradient on the memory.

Every batch carries `ratio` of memory pairs (the replay memory's rows, see
`replay.replay_memory`); the train step differentiates the loss on the
current-task rows (g) and on the memory rows (g_ref) apart
(`Strategy.memory_gradient`), and the update follows
  g - (g . g_ref) / (g_ref . g_ref) * g_ref   if g . g_ref < 0,   else g,
so a step never increases the memory's loss to first order. The memory pairs
are not trained on directly. On the first task there is no memory: those
rows are current-task pairs and both gradients are summed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ccr_jax.strategies import base
from ccr_jax.strategies import replay


class AgemState(NamedTuple):
  agem_active: jax.Array  # float32 scalar: 1 once a memory exists (task > 0)


def _dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project(grads, memory_grads):
  """A-GEM's projection of `grads` against `memory_grads` (pytrees, same structure)."""
  dot = _dot(grads, memory_grads)
  scale = jnp.where(dot < 0, dot / jnp.maximum(_dot(memory_grads, memory_grads), 1e-30),
                    0.0)
  return jax.tree.map(lambda g, r: g - scale * r, grads, memory_grads)


def agem_projection() -> optax.GradientTransformationExtraArgs:
  """Projects the updates against the extra argument `memory_grads` once active."""

  def init_fn(params):
    del params
    return AgemState(jnp.float32(0.0))

  def update_fn(updates, state, params=None, *, memory_grads=None, **extra_args):
    del params, extra_args
    if memory_grads is None:
      raise ValueError("agem needs the memory rows' gradient: the train step passes "
                       "it when the strategy sets memory_gradient.")
    projected = project(updates, memory_grads)
    summed = jax.tree.map(jnp.add, updates, memory_grads)
    active = state.agem_active
    return jax.tree.map(lambda p, s: active * p + (1 - active) * s, projected,
                        summed), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agem_strategy(memory_size: int, ratio: float, policy: str) -> base.Strategy:
  """A-GEM with a memory of `memory_size` pairs filling `ratio` of every batch."""
  memory = replay.replay_strategy(memory_size, ratio, policy).memory

  def install(opt_state, state, task):
    del state
    return optax.tree_utils.tree_set(
        opt_state, agem_active=jnp.where(task > 0, 1.0, 0.0).astype(jnp.float32))

  return base.Strategy(
      name="agem", settings={"agem": {"memory_size": memory_size, "ratio": ratio,
                                      "policy": policy}},
      transform=agem_projection(), memory=memory, memory_gradient=True,
      install=install)


base.register(
    "agem", lambda c, _: agem_strategy(int(c.memory_size), float(c.ratio), c.policy),
    keys=replay.MEMORY_KEYS)
