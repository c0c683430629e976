"""Freezing: zero gradients for parameters whose path matches a regex (`freeze`).

The whole model learns the first tasks; from `from_task` on, the matched part
(by default the image tower) no longer moves. Chained last, after every other
transform, before Adam (whose moments restart at every task): a zero gradient
gives a zero update, so frozen parameters stay bit-identical.
"""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ccr_jax import schema
from ccr_jax.strategies import base


def parameter_labels(params: Any, patterns: tuple[str, ...]) -> Any:
  """'frozen' for every leaf whose path ('img/conv0/kernel') matches a pattern, else 'trainable'."""
  compiled = [re.compile(p) for p in patterns]

  def label(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return "frozen" if any(c.fullmatch(name) for c in compiled) else "trainable"

  return jax.tree_util.tree_map_with_path(label, params)


class FreezeState(NamedTuple):
  """Whether `freeze` zeroes its parameters during the current task (1.0) or not (0.0)."""
  freeze_active: jax.Array


def _zero_when_active() -> optax.GradientTransformation:
  """optax.set_to_zero() that a task can switch on (see `FreezeState`)."""

  def init_fn(params):
    del params
    return FreezeState(jnp.float32(1.0))

  def update_fn(updates, state, params=None):
    del params
    # where, not a product: 0 * inf would leak a NaN into a frozen leaf.
    return jax.tree.map(lambda g: jnp.where(state.freeze_active > 0, jnp.zeros_like(g), g),
                        updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def freeze(patterns: tuple[str, ...]) -> optax.GradientTransformation:
  """Zeroes the gradient of parameters whose path matches any regex in `patterns`.

  `optax.multi_transform` routes matching leaves to a set-to-zero branch whose
  `freeze_active` flag the experiment sets per task (`freeze.from_task`): the
  whole model learns the first task, then the matched part is frozen. Chained
  before Adam (whose moments restart at every task), a zero gradient gives a
  zero update, so frozen parameters stay bit-identical.
  """
  if not patterns:
    raise ValueError("freeze needs --config.strategy.freeze.patterns, e.g. ('img/.*',).")

  def labels(params):
    out = parameter_labels(params, patterns)
    if "frozen" not in jax.tree.leaves(out):
      paths = ["/".join(str(getattr(k, "key", k)) for k in p)
               for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      raise ValueError(f"freeze patterns {patterns} match no parameter; paths look "
                       f"like {paths[:4]}")
    return out

  return optax.multi_transform(
      {"frozen": _zero_when_active(), "trainable": optax.identity()}, labels)


def freeze_strategy(patterns: tuple[str, ...], from_task: int) -> base.Strategy:
  """Freezes the parameters matching `patterns` from task `from_task` (1-based) on."""
  transform = freeze(patterns)  # Fails here, not at init, without patterns.

  def install(opt_state, state, task):
    del state
    active = jnp.where(task + 1 >= from_task, 1.0, 0.0).astype(jnp.float32)
    return optax.tree_utils.tree_set(opt_state, freeze_active=active)

  return base.Strategy(
      name="freeze", settings={"freeze": {"patterns": list(patterns),
                                          "from_task": from_task}},
      # Last in the chain: zeroing after the importance pull keeps frozen leaves
      # exact (the pull's F*theta - B cancels only up to float rounding, which
      # Adam would scale up to a full step).
      transform=transform, transform_last=True, install=install)


base.register(
    "freeze", lambda c, _: freeze_strategy(tuple(c.patterns), int(c.from_task)),
    keys={"patterns": schema.Key(("img/.*",), "regexes over parameter paths "
                                 "('img/conv0/kernel') to freeze"),
          "from_task": schema.Key(2, "first task (1-based) during which they are "
                                  "frozen", schema.at_least(1, integer=True))})
