"""A-GEM (`agem`; Chaudhry et al. 2019): project the gradient when it conflicts
with the gradient on the memory.

As published: every step trains on a full current-task batch (the gradient g,
exactly fine-tuning's) and draws a separate reference batch of
`memory_batch` pairs from the episodic memory (`replay.replay_memory`), whose
gradient g_ref only steers the update (`Memory.separate_batch`; the train
step differentiates the two batches apart and hands g_ref to the transform as
the optax extra argument `memory_grads`):
  g - (g . g_ref) / (g_ref . g_ref) * g_ref   if g . g_ref < 0,   else g,
so a step never increases the memory's loss to first order. The memory pairs
are not trained on directly. On the first task there is no memory, no
reference batch and no projection: task 1 is fine-tuning, step for step.
"""

import jax
import jax.numpy as jnp
import optax

from ccr_jax import schema
from ccr_jax.strategies import base
from ccr_jax.strategies import replay


def _dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def project(grads, memory_grads):
  """A-GEM's projection of `grads` against `memory_grads` (pytrees, same structure)."""
  dot = _dot(grads, memory_grads)
  scale = jnp.where(dot < 0, dot / jnp.maximum(_dot(memory_grads, memory_grads), 1e-30),
                    0.0)
  return jax.tree.map(lambda g, r: g - scale * r, grads, memory_grads)


def agem_projection() -> optax.GradientTransformationExtraArgs:
  """Projects the updates against the extra argument `memory_grads`; passes
  them through unchanged when there is none (no memory yet)."""

  def update_fn(updates, state, params=None, *, memory_grads=None, **extra_args):
    del params, extra_args
    if memory_grads is None:
      return updates, state
    return project(updates, memory_grads), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)


def agem_strategy(memory_size: int, memory_batch: int, policy: str) -> base.Strategy:
  """A-GEM with a memory of `memory_size` images and a reference batch of
  `memory_batch` pairs drawn from it every step."""
  if policy not in replay.POLICIES:
    raise ValueError(f"--config.strategy.agem.policy={policy!r}; valid: "
                     f"{', '.join(replay.POLICIES)}.")
  return base.Strategy(
      name="agem", settings={"agem": {"memory_size": memory_size,
                                      "memory_batch": memory_batch, "policy": policy}},
      transform=agem_projection(),
      memory=base.Memory(
          rows=lambda sizes, seed: replay.replay_memory(sizes, memory_size, policy, seed),
          separate_batch=memory_batch),
      memory_gradient=True)


KEYS = {
    "memory_size": replay.MEMORY_KEYS["memory_size"],
    "memory_batch": schema.Key(
        64, "pairs of the reference batch drawn from the memory every step (its "
        "gradient steers the update; the current batch stays full)",
        schema.at_least(1, integer=True)),
    "policy": replay.MEMORY_KEYS["policy"],
}

base.register(
    "agem", lambda c, _: agem_strategy(int(c.memory_size), int(c.memory_batch), c.policy),
    keys=KEYS)
