"""Continual strategies: values that `train` and the run loop compose (see `base`).

Each strategy is one module here that registers itself; this package imports
them in the order their parts compose (importance pulls before freezing, LwF's
loss term before compat's), whatever order a config names them in.
`--config.strategy.name=ewc+replay` combines registered strategies with '+';
each reads its settings from `config.strategy.<section>`.
"""

import dataclasses
from collections.abc import Callable

import ml_collections

from ccr_jax import schema
# Registration order is composition order.  pylint: disable=unused-import
from ccr_jax.strategies import finetune
from ccr_jax.strategies import joint
from ccr_jax.strategies import freeze
from ccr_jax.strategies import importance
from ccr_jax.strategies import si
from ccr_jax.strategies import agem
from ccr_jax.strategies import lwf
from ccr_jax.strategies import replay
from ccr_jax.strategies import der
from ccr_jax.strategies import compat
from ccr_jax.strategies import query_adapter
# pylint: enable=unused-import
from ccr_jax.strategies.base import REGISTRY
from ccr_jax.strategies.base import Strategy
from ccr_jax.strategies.base import combination_warnings
from ccr_jax.strategies.base import TrainingContext
from ccr_jax.strategies.base import compose


def names() -> tuple[str, ...]:
  """Every registered strategy name, in composition order."""
  return tuple(REGISTRY)


def config_keys() -> dict:
  """The `strategy` config section: `name` and every registered section's keys."""
  keys: dict = {"name": schema.Key(
      "finetune", "registered strategies joined with '+', e.g. ewc+replay "
      f"({', '.join(REGISTRY)})")}
  for registration in REGISTRY.values():
    if registration.keys:
      keys[registration.section] = registration.keys
  return keys


def default_config() -> ml_collections.ConfigDict:
  """The `strategy` config section with every strategy's default settings.

  Strengths are the choices on the validation split of the embedded
  benchmark trained from scratch (benchmarks/strategies.py --stage=select;
  benchmarks/results/strategies.md); each key's help names the pretrained
  setting's choice where it differs (docs/strategies.md lists both).
  """
  return schema.defaults(config_keys())


def _names(name: str) -> list[str]:
  parts = [p.strip() for p in name.split("+") if p.strip()]
  unknown = [p for p in parts if p not in REGISTRY]
  if not parts or unknown:
    raise ValueError(
        f"unknown strategy {name!r} (component(s) {unknown}); valid components: "
        f"{list(REGISTRY)}, combined with '+', e.g. ewc+replay "
        "(set --config.strategy.name).")
  return parts


def sections_used(name: str) -> list[str]:
  """The config sections (`config.strategy.<section>`) strategy `name` reads."""
  return sorted({REGISTRY[p].section for p in _names(name)
                 if REGISTRY[p].section is not None})


def get_strategy(config: ml_collections.ConfigDict,
                 loss_fn: Callable | None = None) -> Strategy:
  """The strategy `config.name` names (`config` is the config's `strategy` section).

  Args:
    loss_fn: the training loss `(img, txt, *, image_ids, step, loss_params) ->
      (loss, extras)`, for strategies that apply it across models.
  Raises:
    ValueError: an unknown name, a setting its declaration refuses, or parts
      that cannot be combined.
  """
  parts = _names(config.name)
  keys = config_keys()
  built = []
  for name in sorted(set(parts), key=list(REGISTRY).index):
    registration = REGISTRY[name]
    settings = None
    if registration.section is not None:
      settings = config[registration.section]
      problems = schema.problems(keys[registration.section], settings.to_dict(),
                                 f"strategy.{registration.section}.")
      if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    built.append(registration.factory(settings, loss_fn))
  return dataclasses.replace(compose(*built), name=config.name)
