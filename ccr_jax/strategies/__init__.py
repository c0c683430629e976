"""Continual strategies: what `train` composes, never code inside the loop.

A strategy is a value with up to four parts (DESIGN.md, Strategies):
  transform     an optax GradientTransformation chained before the optimizer
                (freezing, EWC-style pulls, gradient projection);
  loss_term     an extra loss `(params, batch, img_emb, txt_emb) -> (loss, extras)`
                (distillation, compatibility with old gallery embeddings);
  end_of_task   a hook `(task, params, data) -> None` run after each task
                (Fisher diagonal, anchors, replay memory);
  training_tasks which tasks' training data task t trains on.
The baselines live here: fine-tuning (lower bound: only the current task) and
joint training (upper bound: every task seen so far).
"""

import dataclasses
from typing import Callable

import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class Strategy:
  """The parts of a continual strategy that `train` and `experiment` compose."""
  name: str
  transform: optax.GradientTransformation = dataclasses.field(
      default_factory=optax.identity)
  loss_term: Callable | None = None
  end_of_task: Callable | None = None
  training_tasks: Callable[[int], list[int]] = lambda t: [t]


def _finetune(config: ml_collections.ConfigDict) -> Strategy:
  del config
  return Strategy(name="finetune")


def _joint(config: ml_collections.ConfigDict) -> Strategy:
  del config
  return Strategy(name="joint", training_tasks=lambda t: list(range(t + 1)))


STRATEGIES = {"finetune": _finetune, "joint": _joint}


def get_strategy(config: ml_collections.ConfigDict) -> Strategy:
  """The strategy named by `config.name` (`config` is the config's `strategy` field)."""
  if config.name not in STRATEGIES:
    raise ValueError(
        f"unknown strategy {config.name!r}; valid: {sorted(STRATEGIES)} "
        "(set --config.strategy.name).")
  return STRATEGIES[config.name](config)
