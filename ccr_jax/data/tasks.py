"""Examples in memory (`Split`), and splitting a dataset into a TaskSequence.

An example belongs to the task whose category group holds its (dominant)
category; examples whose category is in no group are left out. The rule and
the groups are written into results.json through `TaskSequence.describe()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
DATASET_NAMES = ("synthetic",)
ASSIGNMENT_RULE = (
    "An example belongs to the task whose category group contains the "
    "example's dominant category; examples whose category is in no group are "
    "not used. Each task keeps the train/val/test split of its examples.")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """N examples held in memory, in a stable order.

  Attributes:
    images: uint8 [N, H, W, 3] pixels, or float32 [N, D] precomputed features.
    captions: N tuples of captions (5 per image for every dataset we use).
    categories: int32 [N], the example's (dominant) category.
    ids: int64 [N], stable example ids, unique within a dataset.
  """
  images: np.ndarray
  captions: tuple[tuple[str, ...], ...]
  categories: np.ndarray
  ids: np.ndarray

  def __post_init__(self):
    lengths = dict(images=len(self.images), captions=len(self.captions),
                   categories=len(self.categories), ids=len(self.ids))
    if len(set(lengths.values())) != 1:
      raise ValueError(f"Split fields have different lengths: {lengths}.")
    if self.categories.ndim != 1 or self.ids.ndim != 1:
      raise ValueError(
          f"categories and ids must be 1-D, got shapes "
          f"{self.categories.shape} and {self.ids.shape}.")

  def __len__(self) -> int:
    return len(self.ids)

  def subset(self, index: np.ndarray) -> Split:
    """The examples at `index` (int [M] positions or bool [N] mask)."""
    index = np.asarray(index)
    if index.dtype == bool:
      if index.shape != (len(self),):
        raise ValueError(f"A boolean mask must have shape ({len(self)},), "
                         f"got {index.shape}.")
      index = np.flatnonzero(index)
    return Split(images=self.images[index],
                 captions=tuple(self.captions[i] for i in index.tolist()),
                 categories=self.categories[index], ids=self.ids[index])

  @staticmethod
  def concatenate(splits: Sequence[Split]) -> Split:
    """All examples of `splits`, one after the other."""
    if not splits:
      raise ValueError("Split.concatenate needs at least one split.")
    shapes = {split.images.shape[1:] for split in splits}
    if len(shapes) != 1:
      raise ValueError(f"Cannot concatenate splits whose images have "
                       f"different shapes: {sorted(shapes)}.")
    return Split(
        images=np.concatenate([split.images for split in splits]),
        captions=tuple(c for split in splits for c in split.captions),
        categories=np.concatenate([split.categories for split in splits]),
        ids=np.concatenate([split.ids for split in splits]))


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A named group of categories and the examples assigned to it."""
  name: str
  categories: tuple[int, ...]
  train: Split
  val: Split
  test: Split


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSequence:
  """The tasks in training order and the names of all dataset categories."""
  tasks: tuple[Task, ...]
  category_names: tuple[str, ...]

  def describe(self) -> dict[str, Any]:
    """A JSON-able summary for results.json: rule, groups and counts."""
    assigned = {c for task in self.tasks for c in task.categories}
    return dict(
        assignment_rule=ASSIGNMENT_RULE,
        num_tasks=len(self.tasks),
        category_names=list(self.category_names),
        unassigned_categories=[
            c for c in range(len(self.category_names)) if c not in assigned],
        tasks=[dict(
            name=task.name,
            category_ids=list(task.categories),
            category_names=[self.category_names[c] for c in task.categories],
            num_train=len(task.train),
            num_val=len(task.val),
            num_test=len(task.test),
        ) for task in self.tasks],
    )


def _validate_groups(task_categories: Sequence[Sequence[int]],
                     num_categories: int) -> tuple[tuple[int, ...], ...]:
  """The groups as int tuples, or a ValueError naming the problem and fix."""
  if (task_categories is None or isinstance(task_categories, (str, bytes))
      or not len(task_categories)):
    raise ValueError(
        f"task_categories={task_categories!r} must be a non-empty list of "
        "category groups, e.g. [[0, 1], [2, 3]].")
  groups = []
  for t, group in enumerate(task_categories):
    if isinstance(group, (str, bytes, int, np.integer)) or not len(group):
      raise ValueError(
          f"Task {t} has category group {group!r}; each group must be a "
          "non-empty list of category ids, e.g. [[0, 1], [2, 3]].")
    for c in group:
      if not isinstance(c, (int, np.integer)) or isinstance(c, bool):
        raise ValueError(f"Task {t} lists category {c!r}, which is not an "
                         "integer category id.")
      if not 0 <= c < num_categories:
        raise ValueError(
            f"Task {t} lists category {c}, but the dataset has "
            f"{num_categories} categories (ids 0..{num_categories - 1}); "
            "remove it or use a dataset with more categories.")
    groups.append(tuple(int(c) for c in group))
  owner: dict[int, int] = {}
  for t, group in enumerate(groups):
    for c in group:
      if c in owner:
        where = ("twice in task " + str(t) if owner[c] == t
                 else f"in tasks {owner[c]} and {t}")
        raise ValueError(
            f"Category {c} appears {where}; task category groups must be "
            "disjoint, so list each category in one group only.")
      owner[c] = t
  return tuple(groups)


def split_into_tasks(splits: dict[str, Split],
                     task_categories: Sequence[Sequence[int]],
                     category_names: Sequence[str]) -> TaskSequence:
  """Assigns each example to the task whose group holds its category.

  Args:
    splits: {"train", "val", "test"} -> Split of the whole dataset.
    task_categories: one group of category ids per task, in training order.
    category_names: the names of all dataset categories, indexed by id.

  Returns:
    The TaskSequence; tasks are named "task_1" ... "task_T".

  Raises:
    ValueError: groups are empty, overlap or name unknown categories, a split
      is missing, or some task would get no examples in some split.
  """
  missing = [name for name in SPLIT_NAMES if name not in splits]
  if missing:
    raise ValueError(f"splits lacks {missing}; it must have keys "
                     f"{list(SPLIT_NAMES)}.")
  groups = _validate_groups(task_categories, len(category_names))
  tasks = []
  for t, group in enumerate(groups):
    name = f"task_{t + 1}"
    parts = {}
    for split_name in SPLIT_NAMES:
      split = splits[split_name]
      parts[split_name] = split.subset(np.isin(split.categories, group))
      if not len(parts[split_name]):
        raise ValueError(
            f"{name} (categories {list(group)}) has no {split_name} examples; "
            f"add examples of these categories to the {split_name} split "
            "(e.g. raise *_per_category) or regroup the categories.")
    tasks.append(Task(name=name, categories=group, **parts))
  return TaskSequence(tasks=tuple(tasks),
                      category_names=tuple(category_names))


def default_task_categories(num_categories: int,
                            num_tasks: int) -> list[list[int]]:
  """Consecutive equal groups: (12, 4) -> [[0, 1, 2], [3, 4, 5], ...]."""
  if num_tasks < 1 or num_categories < 1:
    raise ValueError(f"num_tasks={num_tasks} and num_categories="
                     f"{num_categories} must both be positive.")
  if num_categories % num_tasks:
    raise ValueError(
        f"num_categories={num_categories} is not divisible by "
        f"num_tasks={num_tasks}; choose a divisor or give task_categories "
        "explicitly.")
  per_task = num_categories // num_tasks
  return [list(range(t * per_task, (t + 1) * per_task))
          for t in range(num_tasks)]


def load_task_sequence(data_config, data_dir: str) -> TaskSequence:
  """Loads the dataset named by data_config and splits it into tasks.

  Args:
    data_config: ConfigDict with name, image_size, num_categories, num_tasks,
      task_categories (a list of groups, or None for consecutive groups),
      train/val/test_per_category, max_distractors and seed.
    data_dir: where TFDS datasets are built and cached.
  """
  name = data_config.name
  if name not in DATASET_NAMES:
    raise ValueError(f"Unknown dataset name {name!r}; valid names are "
                     f"{list(DATASET_NAMES)}.")
  # Imported here: synthetic.py imports Split from this module.
  from ccr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  splits = synthetic.load_synthetic(
      data_dir, image_size=data_config.image_size,
      num_categories=data_config.num_categories,
      train_per_category=data_config.train_per_category,
      val_per_category=data_config.val_per_category,
      test_per_category=data_config.test_per_category,
      max_distractors=data_config.max_distractors, seed=data_config.seed)
  task_categories = data_config.get("task_categories", None)
  if task_categories is None:
    task_categories = default_task_categories(data_config.num_categories,
                                              data_config.num_tasks)
  elif len(task_categories) != data_config.num_tasks:
    raise ValueError(
        f"task_categories has {len(task_categories)} groups but num_tasks="
        f"{data_config.num_tasks}; make them agree.")
  return split_into_tasks(
      splits, task_categories,
      synthetic.CATEGORY_NAMES[:data_config.num_categories])


def replay_memory(task_sizes: Sequence[int], memory_size: int, policy: str,
                  seed: int) -> list[np.ndarray]:
  """Which training examples of the past tasks a replay memory holds.

  A pure function of its arguments, so a resumed run rebuilds the same memory.

  Args:
    task_sizes: number of training examples of each past task, in task order.
    memory_size: slots in the memory.
    policy: 'reservoir' — reservoir sampling (Algorithm R) over the stream of
      every past example in task order, so each seen example is kept with equal
      probability; 'balanced' — the same number of slots per task (the first
      tasks take the remainder), each task's kept rows a random subset.
  Returns:
    For each past task, the sorted int64 rows of its training split in memory.
  """
  if not task_sizes:
    return []
  if policy == "balanced":
    slots = [memory_size // len(task_sizes)] * len(task_sizes) if task_sizes else []
    for i in range(memory_size - sum(slots)):
      slots[i % len(slots)] += 1
    return [np.sort(np.random.default_rng([seed, j]).permutation(n)[:min(m, n)])
            for j, (n, m) in enumerate(zip(task_sizes, slots))]
  if policy != "reservoir":
    raise ValueError(f"unknown replay policy {policy!r}; valid: 'reservoir', 'balanced'.")
  rng = np.random.default_rng(seed)
  offsets = np.cumsum([0, *task_sizes])
  reservoir: list[int] = []
  for seen in range(int(offsets[-1])):
    if len(reservoir) < memory_size:
      reservoir.append(seen)
    else:
      slot = rng.integers(0, seen + 1)
      if slot < memory_size:
        reservoir[slot] = seen
  kept = np.sort(np.asarray(reservoir, np.int64))
  return [kept[(kept >= lo) & (kept < hi)] - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
