"""The strategy interface: a continual strategy is a value that training composes.

A `Strategy` has optional parts, each called by generic code that knows no
strategy by name (DESIGN.md, Strategies):
  transform      an optax GradientTransformation chained before the optimizer
                 (`transform_last` puts it after the others, e.g. freezing, so
                 nothing added later un-zeroes its gradients);
  loss_term      (img, txt, old, batch, step, loss_params) -> (loss, extras): an
                 extra loss on the batch's embeddings `[B, dim]`; with
                 `needs_old_model`, old = (old_img, old_txt) is the previous
                 snapshot's embeddings of the same batch, and the train step
                 multiplies the term by 0 until a previous snapshot exists;
  data policy    `train_tasks(t)`: the tasks whose training data task t trains
                 on; `memory`: which past pairs a memory keeps and how much of
                 each batch it fills;
  state          `init_state(params, ctx) -> dict` (keys `state_keys`), carried from
                 task to task, saved and restored with every snapshot;
                 `install(opt_state, state, task) -> opt_state` puts it into the
                 transform's state when a task starts (inside jit: `task` is a
                 traced int32, 0-based); `collect(opt_state, params, state) ->
                 state` reads what the transform accumulated over the task's
                 steps once its last step is done (e.g. SI's path integral);
                 `end_of_task(ctx, task, params, state) -> state` updates it
                 once a task is learnt; with `loss_reads_state` the loss term
                 gets it too (as `state`, read-only within a task);
                 `record(state, img, txt, batch) -> state` writes into it
                 from inside the train step, with the step's own embeddings
                 of the batch `[B, dim]` (the model at that step, before its
                 update; stop-gradient): DER's targets, taken when a pair
                 enters the memory (the batch's `insert_img_slot` /
                 `insert_txt_slot`, see `Memory`); the state then travels
                 in the train state and is saved with its checkpoints;
  memory_gradient the train step differentiates the loss on the batch's
                 current-task rows and on its memory rows apart, and hands the
                 memory rows' gradient to the transform as the optax extra
                 argument `memory_grads` (A-GEM) once the memory holds pairs
                 (no extra argument before); needs a memory;
  adapt_queries  (new [N, dim], old [N, dim]) -> (queries [Q, dim] -> [Q, dim]):
                 given the current task's training items embedded by the query
                 snapshot and by an older one, a map from the new space into
                 the old; evaluation applies it to queries searched in indices
                 that the older snapshot built (the fixed regime).
`a + b` composes values: transforms chained, loss terms summed, states merged
(each part keeps its own keys), data policies joined. Each strategy module
registers itself with `register` (name -> factory and config keys).

Loss terms are called as `loss_term(img, txt, old, batch, step, loss_params,
state)`; with a memory, `batch["memory_slot"]` `[B]` int32 says which memory
entry each row is (`row * captions_per_image + caption` in the memory's
concatenated rows, -1 for current-task rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccr_jax import schema


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingContext:
  """What end-of-task hooks may use; built once per experiment (hashed by identity,
  so a hook can cache what it compiles on it).

  Attributes:
    embed: (params, batch) -> (img [B, dim], txt [B, dim]), traceable, each
      device embedding its own rows of the batch.
    loss_fn: the training loss (img, txt, *, image_ids, step, loss_params) ->
      (loss, extras).
    loss_reduction: 'sum' or 'mean', how `loss_fn` reduces over pairs.
    mesh: the device mesh.
    batch_size: the global training batch size.
    seed: the experiment's seed.
    task_batches: (task, count, seed) -> iterator over `count` training batches
      of task `task` (0-based), drawn with `seed`, placed on the mesh.
    task_sizes: images in each task's training split.
    captions_per_image: captions of every image.
    embed_dim: the joint embedding's dimension.
    embed_rows: (params, task, rows int [n]) -> (img [n, dim], txt [n,
      captions_per_image, dim]): those training images of task `task` and all
      their captions, embedded.
    memory_rows: t -> per task before t (0-based), the training rows the
      strategy's memory holds while task t trains (`Memory.rows`).
  """
  embed: Callable
  loss_fn: Callable
  loss_reduction: str
  mesh: jax.sharding.Mesh
  batch_size: int
  seed: int
  task_batches: Callable[[int, int, int], Iterator[dict]]
  task_sizes: tuple[int, ...] = ()
  captions_per_image: int = 1
  embed_dim: int = 0
  embed_rows: Callable | None = None
  memory_rows: Callable[[int], list[np.ndarray]] | None = None


@dataclasses.dataclass(frozen=True)
class Memory:
  """A memory of past pairs added to every batch once it holds any.

  Attributes:
    rows: (past task sizes, seed) -> per past task, the sorted int64 rows of
      its training split the memory holds; a pure function, so a resumed run
      rebuilds the same memory.
    ratio: fraction of each batch's rows drawn from the memory instead of the
      current task (replay, DER).
    separate_batch: pairs drawn from the memory as a batch of their own,
      appended to a full current-task batch (A-GEM's reference batch, DER's
      memory batch); ratio is then 0.

  With a strategy that `record`s, every batch also says which of its
  current-task rows enter the memory the next task will hold, the first
  time each is seen (`pipeline.insertion_slots`): insert_img_slot /
  insert_txt_slot int32 [rows], the image's position among the task's
  rows in that memory (and position * captions_per_image + caption for the
  pair), -1 elsewhere.
  """
  rows: Callable[[Sequence[int], int], list[np.ndarray]]
  ratio: float = 0.0
  separate_batch: int = 0

  def layout(self, batch_size: int) -> tuple[int, int]:
    """(current-task rows, memory rows) of a batch once the memory holds pairs."""
    if self.separate_batch:
      return batch_size, self.separate_batch
    memory = int(round(self.ratio * batch_size))
    return batch_size - memory, memory


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A continual strategy: every part optional (see the module docstring).

  `parts` lists the strategies a composition was made of (empty for one
  registered strategy); `settings` is what results.json records.
  """
  name: str
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  transform: optax.GradientTransformation | None = None
  transform_last: bool = False
  loss_term: Callable | None = None
  needs_old_model: bool = False
  loss_reads_state: bool = False
  train_tasks: Callable[[int], list[int]] | None = None
  memory: Memory | None = None
  memory_gradient: bool = False
  record: Callable[[dict, Any, Any, dict], dict] | None = None
  state_keys: tuple[str, ...] = ()
  init_state: Callable[[Any, TrainingContext], dict] | None = None
  install: Callable[[Any, dict, jax.Array], Any] | None = None
  collect: Callable[[Any, Any, dict], dict] | None = None
  end_of_task: Callable[[TrainingContext, int, Any, dict], dict] | None = None
  adapt_queries: Callable[[np.ndarray, np.ndarray], Callable] | None = None
  parts: tuple[Strategy, ...] = ()

  def __add__(self, other: Strategy) -> Strategy:
    return compose(*self.leaves(), *other.leaves())

  def leaves(self) -> tuple[Strategy, ...]:
    """The registered strategies this value is made of."""
    return self.parts or (self,)

  @property
  def state_in_train_state(self) -> bool:
    """Whether the train step carries the strategy state (its loss term
    reads it, or `record` writes it)."""
    return self.loss_reads_state or self.record is not None

  def training_tasks(self, t: int) -> list[int]:
    """Tasks (0-based) whose training data task t (0-based) trains on."""
    return self.train_tasks(t) if self.train_tasks is not None else [t]

  def describe(self) -> dict:
    """JSON-able description for results.json: name and every part's settings."""
    return {"name": self.name, "settings": dict(self.settings)}


def compose(*strategies: Strategy) -> Strategy:
  """One strategy doing what every one of `strategies` does.

  The transform is always a chain (identity when no part has one), so the
  optimizer state has one structure whatever is composed.

  Raises:
    ValueError: two parts keep state under the same key (e.g. two importance
      regularisers) or both bring a memory.
  """
  leaves = tuple(leaf for s in strategies for leaf in s.leaves())
  owners: dict[str, str] = {}
  for leaf in leaves:
    for key in leaf.state_keys:
      if key in owners:
        raise ValueError(
            f"strategies {owners[key]!r} and {leaf.name!r} both keep state "
            f"{key!r}: combine at most one of them (e.g. one importance "
            "regulariser).")
      owners[key] = leaf.name
  memories = [leaf for leaf in leaves if leaf.memory is not None]
  if len(memories) > 1:
    raise ValueError(f"strategies {[m.name for m in memories]} each bring a memory; "
                     "combine at most one.")
  adapters = [leaf for leaf in leaves if leaf.adapt_queries is not None]
  if len(adapters) > 1:
    raise ValueError(f"strategies {[a.name for a in adapters]} each map queries; "
                     "combine at most one.")
  transforms = ([l.transform for l in leaves if l.transform and not l.transform_last]
                + [l.transform for l in leaves if l.transform and l.transform_last])
  stateful = [leaf for leaf in leaves if leaf.init_state is not None]

  with_terms = [leaf for leaf in leaves if leaf.loss_term is not None]

  def own(leaf, state):
    return {k: state[k] for k in leaf.state_keys}

  def loss_term(img, txt, old, batch, step, loss_params=None, state=None):
    total, extras = jnp.float32(0.0), {}
    for leaf in with_terms:
      mine = own(leaf, state) if leaf.loss_reads_state else None
      value, more = leaf.loss_term(img, txt, old, batch, step, loss_params, mine)
      total, extras = total + value, {**extras, **more}
    return total, extras

  def train_tasks(t):
    return sorted({i for leaf in leaves for i in leaf.training_tasks(t)})

  recorders = [leaf for leaf in leaves if leaf.record is not None]

  def record(state, img, txt, batch):
    new = dict(state)
    for leaf in recorders:
      new.update(leaf.record(own(leaf, state), img, txt, batch))
    return new

  def init_state(params, ctx):
    return {k: v for leaf in stateful for k, v in leaf.init_state(params, ctx).items()}

  def install(opt_state, state, task):
    for leaf in leaves:
      if leaf.install is not None:
        opt_state = leaf.install(opt_state, own(leaf, state), task)
    return opt_state

  def collect(opt_state, params, state):
    new = dict(state)
    for leaf in leaves:
      if leaf.collect is not None:
        new.update(leaf.collect(opt_state, params, own(leaf, state)))
    return new

  def end_of_task(ctx, task, params, state):
    new = dict(state)
    for leaf in leaves:
      if leaf.end_of_task is not None:
        new.update(leaf.end_of_task(ctx, task, params, own(leaf, state)))
    return new

  return Strategy(
      name="+".join(leaf.name for leaf in leaves),
      settings={k: v for leaf in leaves for k, v in leaf.settings.items()},
      transform=optax.chain(*transforms) if transforms else optax.identity(),
      loss_term=loss_term if with_terms else None,
      needs_old_model=any(leaf.needs_old_model for leaf in leaves),
      loss_reads_state=any(leaf.loss_reads_state for leaf in with_terms),
      train_tasks=train_tasks,
      memory=memories[0].memory if memories else None,
      memory_gradient=any(leaf.memory_gradient for leaf in leaves),
      record=record if recorders else None,
      state_keys=tuple(owners),
      init_state=init_state if stateful else None,
      install=install if any(l.install for l in leaves) else None,
      collect=collect if any(l.collect for l in leaves) else None,
      end_of_task=end_of_task if any(l.end_of_task for l in leaves) else None,
      adapt_queries=adapters[0].adapt_queries if adapters else None,
      parts=leaves)


@dataclasses.dataclass(frozen=True)
class Registration:
  """A registered strategy.

  Attributes:
    factory: (settings, loss_fn) -> Strategy; settings is the strategy's config
      section (`config.strategy.<section>`, None without keys), loss_fn the
      training loss (for strategies that apply it across models).
    section: the config section it reads (its own name, or one it shares).
    keys: the keys of that section it declares (empty when shared or none).
  """
  factory: Callable[[Any, Callable | None], Strategy]
  section: str | None
  keys: Mapping[str, schema.Key]


REGISTRY: dict[str, Registration] = {}


def register(name: str, factory: Callable[[Any, Callable | None], Strategy], *,
             keys: Mapping[str, schema.Key] | None = None,
             section: str | None = None) -> None:
  """Makes `name` usable in `--config.strategy.name` (alone or in 'a+b').

  Args:
    factory: (settings, loss_fn) -> Strategy.
    keys: the config keys of `config.strategy.<name>` with defaults and docs.
    section: read another strategy's section instead of declaring one (e.g.
      online EWC reads EWC's).
  """
  if name in REGISTRY:
    raise ValueError(f"strategy {name!r} is registered twice.")
  REGISTRY[name] = Registration(factory, section or (name if keys else None),
                                dict(keys or {}))


def combination_warnings(strategy: Strategy) -> list[str]:
  """What a valid but wasteful combination will do, one line each (logged).

  A memory beside a data policy that already trains on the tasks the memory
  replays (e.g. joint training plus a replay memory) only re-weights old
  pairs: it is allowed, and said.
  """
  leaves = strategy.leaves()
  policies = [leaf for leaf in leaves if leaf.train_tasks is not None]
  memories = [leaf for leaf in leaves if leaf.memory is not None]
  if policies and memories and any(0 in p.training_tasks(1) for p in policies):
    return [f"strategy {strategy.name!r}: {policies[0].name!r} already trains "
            f"each task on earlier tasks' data, so {memories[0].name!r}'s memory "
            "replays pairs that are in the pool anyway: it only up-weights "
            "old pairs (use one of the two to compare them)."]
  return []
