"""Continual strategies: values that `train` and `experiment` compose, never code in the loop.

A strategy (DESIGN.md, Strategies) is up to four parts:
  transform       an optax GradientTransformation chained before the optimizer
                  (freezing; the importance pull of EWC / online EWC / MAS / L2);
  loss_term       an extra loss on the batch, given the current embeddings and,
                  when `needs_old_model`, the previous snapshot's (LwF, compat);
  end_of_task     what is kept after each task (importance accumulators, anchors);
  data            which tasks' training data a task sees (joint) and a replay memory.
Components combine with '+': `--config.strategy.name=ewc+replay`. Each
component's settings live in `config.strategy.<component>`.
"""

import dataclasses
import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ccr_jax.strategies import compat
from ccr_jax.strategies import distillation
from ccr_jax.strategies import regularizers

COMPONENTS = ("finetune", "joint", "freeze", "ewc", "online_ewc", "mas", "l2", "lwf",
              "replay", "compat")
IMPORTANCE_KINDS = ("ewc", "online_ewc", "mas", "l2")


@dataclasses.dataclass(frozen=True)
class Replay:
  """Replay settings: memory of past pairs mixed into each batch."""
  memory_size: int
  ratio: float   # fraction of every batch drawn from the memory (once non-empty)
  policy: str    # 'reservoir' or 'balanced'


@dataclasses.dataclass(frozen=True)
class Strategy:
  """The parts of a continual strategy that `train` and `experiment` compose."""
  name: str
  transform: optax.GradientTransformation = dataclasses.field(
      default_factory=optax.identity)
  # (img, txt, old, batch, step, loss_params) -> (loss, extras); old =
  # (old_img, old_txt) or
  # None; the train step multiplies the loss by 0 until a previous snapshot exists.
  loss_term: Callable | None = None
  needs_old_model: bool = False
  importance: str | None = None   # one of IMPORTANCE_KINDS
  importance_decay: float = 1.0   # online_ewc's gamma
  importance_batches: int = 0     # batches the Fisher / MAS estimate averages over
  joint: bool = False
  freeze_from_task: int | None = None  # 1-based task from which `freeze` applies
  replay: Replay | None = None
  settings: dict = dataclasses.field(default_factory=dict)

  def freeze_active(self, t: int) -> float | None:
    """`freeze`'s flag for task t (0-based), or None without `freeze`."""
    if self.freeze_from_task is None:
      return None
    return 1.0 if t + 1 >= self.freeze_from_task else 0.0

  def training_tasks(self, t: int) -> list[int]:
    """Tasks (0-based) whose training data task t trains on."""
    return list(range(t + 1)) if self.joint else [t]

  def describe(self) -> dict:
    """JSON-able description for results.json."""
    return {"name": self.name, "settings": self.settings,
            "replay": dataclasses.asdict(self.replay) if self.replay else None}


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


def _components(name: str) -> list[str]:
  parts = [p.strip() for p in name.split("+") if p.strip()]
  unknown = [p for p in parts if p not in COMPONENTS]
  if not parts or unknown:
    raise ValueError(
        f"unknown strategy {name!r} (component(s) {unknown}); valid components: "
        f"{list(COMPONENTS)}, combined with '+', e.g. ewc+replay "
        "(set --config.strategy.name).")
  if len([p for p in parts if p in IMPORTANCE_KINDS]) > 1:
    raise ValueError(f"strategy {name!r} combines several of {IMPORTANCE_KINDS}; "
                     "use one importance regulariser.")
  return parts


def _positive(config: ml_collections.ConfigDict, section: str, field: str) -> float:
  value = config[section][field]
  if not value > 0:
    raise ValueError(f"--config.strategy.{section}.{field} must be > 0, got {value}.")
  return value


def get_strategy(config: ml_collections.ConfigDict,
                 loss_fn: Callable | None = None) -> Strategy:
  """The strategy `config.name` names (`config` is the config's `strategy` section).

  Args:
    loss_fn: the training loss `(img, txt, *, image_ids, step) -> (loss, extras)`,
      which `compat` applies across the old and new models.
  """
  parts = _components(config.name)
  transforms, terms, settings = [], [], {}
  kwargs: dict[str, Any] = {"joint": "joint" in parts}
  for kind in IMPORTANCE_KINDS:
    if kind in parts:
      section = "ewc" if kind == "online_ewc" else kind
      strength = _positive(config, section, "strength")
      transforms.append(regularizers.importance_pull(strength))
      kwargs.update(importance=kind, importance_batches=int(config[section].get(
          "batches", 0)))
      settings[kind] = {"strength": strength}
      if kind in ("ewc", "online_ewc", "mas"):
        settings[kind]["batches"] = kwargs["importance_batches"]
      if kind == "online_ewc":
        kwargs["importance_decay"] = config.ewc.decay
        settings[kind]["decay"] = config.ewc.decay
  if "freeze" in parts:
    # Last in the chain: zeroing after the importance pull keeps frozen leaves
    # exact (the pull's F*theta - B cancels only up to float rounding, which
    # Adam would scale up to a full step).
    patterns = tuple(config.freeze.patterns)
    transforms.append(freeze(patterns))
    kwargs["freeze_from_task"] = int(config.freeze.from_task)
    if kwargs["freeze_from_task"] < 1:
      raise ValueError("--config.strategy.freeze.from_task must be >= 1 (1-based).")
    settings["freeze"] = {"patterns": list(patterns),
                          "from_task": kwargs["freeze_from_task"]}
  if "lwf" in parts:
    strength = config.lwf.strength
    emb_strength = config.lwf.embedding_strength
    temperature = _positive(config, "lwf", "temperature")

    def lwf_term(img, txt, old, batch, step, loss_params):
      kl = distillation.similarity_distillation(img, txt, *old, temperature=temperature)
      emb = distillation.embedding_distillation(img, txt, *old)
      return strength * kl + emb_strength * emb, {"lwf_kl": kl, "lwf_embedding": emb}

    terms.append(lwf_term)
    settings["lwf"] = {"strength": strength, "embedding_strength": emb_strength,
                       "temperature": temperature}
  if "compat" in parts:
    if loss_fn is None:
      raise ValueError("compat needs the training loss: pass loss_fn to get_strategy.")
    strength = _positive(config, "compat", "strength")

    def compat_term(img, txt, old, batch, step, loss_params):
      c = compat.compatibility_loss(
          functools.partial(loss_fn, loss_params=loss_params), img, txt, *old,
          image_ids=batch["image_ids"], step=step)
      return strength * c, {"compat": c}

    terms.append(compat_term)
    settings["compat"] = {"strength": strength}
  if "replay" in parts:
    r = config.replay
    if r.policy not in ("reservoir", "balanced"):
      raise ValueError(f"--config.strategy.replay.policy={r.policy!r}; valid: "
                       "'reservoir', 'balanced'.")
    if not 0 < r.ratio < 1 or r.memory_size < 1:
      raise ValueError("replay needs 0 < --config.strategy.replay.ratio < 1 and "
                       "--config.strategy.replay.memory_size >= 1.")
    kwargs["replay"] = Replay(int(r.memory_size), float(r.ratio), r.policy)
  if terms:
    def loss_term(img, txt, old, batch, step, loss_params=None):
      total, extras = jnp.float32(0.0), {}
      for term in terms:
        value, ex = term(img, txt, old, batch, step, loss_params)
        total, extras = total + value, {**extras, **ex}
      return total, extras
    kwargs.update(loss_term=loss_term, needs_old_model=True)
  transform = optax.chain(*transforms) if transforms else optax.identity()
  return Strategy(name=config.name, transform=transform, settings=settings, **kwargs)


def default_config() -> ml_collections.ConfigDict:
  """The `strategy` config section with every component's settings.

  Strengths were chosen on the validation split of the embedded benchmark
  (benchmarks/strategies.py --select; see benchmarks/results/strategies.md).
  """
  c = ml_collections.ConfigDict()
  c.name = "finetune"
  # The whole model learns task 1; the image tower is frozen from task 2 on.
  c.freeze = ml_collections.ConfigDict({"patterns": ("img/.*",), "from_task": 2})
  # EWC and online EWC (decay = online EWC's gamma; 1.0 would be plain EWC).
  c.ewc = ml_collections.ConfigDict({"strength": 300.0, "batches": 20, "decay": 0.9})
  c.mas = ml_collections.ConfigDict({"strength": 1000.0, "batches": 20})
  c.l2 = ml_collections.ConfigDict({"strength": 0.03})
  c.lwf = ml_collections.ConfigDict(
      {"strength": 1.0, "embedding_strength": 0.0, "temperature": 2.0})
  c.replay = ml_collections.ConfigDict(
      {"memory_size": 200, "ratio": 0.25, "policy": "reservoir"})
  c.compat = ml_collections.ConfigDict({"strength": 0.1})
  return c
