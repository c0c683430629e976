"""Examples (`Split`), lazily read images, and splitting a dataset into tasks.

An example belongs to the task whose category group holds its (dominant)
category; examples whose category is in no group are left out. For multi-label
datasets (COCO, Visual Genome) the dominant group is the one covering the
largest annotated area (`DOMINANT_GROUP_RULE`). The rule and the groups are
written into results.json through `TaskSequence.describe()`.

Real datasets do not fit in memory as one uint8 array (COCO: ~123k images);
their `Split.images` is a `LazyImages`, a row-indexable view that reads and
decodes rows on access. `take_rows` and `concatenate_images` keep such views
lazy; plain NumPy arrays (the synthetic benchmark) stay plain arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
ASSIGNMENT_RULE = (
    "An example belongs to the task whose category group contains the "
    "example's dominant category; examples whose category is in no group are "
    "not used. Each task keeps the train/val/test split of its examples.")
DOMINANT_GROUP_RULE = (
    "Multi-label images: an image belongs to the task whose category group "
    "covers the largest annotated area in it (the sum over the group's "
    "categories of the areas of their annotations), ties going to the lower "
    "task index; an image with no annotated area in any group is not used. "
    "(With one label per image this is the dominant category rule.) Each task "
    "keeps the train/val/test split of its examples.")
SINGLE_TASK_RULE = (
    "One task holds every example of the dataset (no category filtering), so "
    "galleries match the standard non-continual protocol.")


class LazyImages:
  """A read-only `[N, *row_shape]` array whose rows are read on access.

  Rows come from one or more sources: objects with `read(rows)` (int64 [M]
  rows of that source -> array [M, *row_shape] of `dtype`), `row_shape` and
  `dtype`. Indexing with an int, a slice, an int array or a boolean mask reads
  those rows and returns a NumPy array, like indexing an ndarray; `take` and
  `concatenate` return new views without reading anything.

  Attributes:
    sources: the sources, e.g. one TFDS split's JPEG records, or a memory-mapped
      .npy file.
    source_index: int32 [N], the source of each row.
    rows: int64 [N], each row's index within its source.
  """

  def __init__(self, sources: Sequence[Any], source_index: np.ndarray,
               rows: np.ndarray):
    self.sources = tuple(sources)
    self.source_index = np.asarray(source_index, np.int32)
    self.rows = np.asarray(rows, np.int64)
    if not self.sources:
      raise ValueError("LazyImages needs at least one source.")
    if self.source_index.shape != self.rows.shape or self.rows.ndim != 1:
      raise ValueError(f"source_index {self.source_index.shape} and rows "
                       f"{self.rows.shape} must be 1-D of one length.")
    shapes = {tuple(s.row_shape) for s in self.sources}
    dtypes = {np.dtype(s.dtype) for s in self.sources}
    if len(shapes) != 1 or len(dtypes) != 1:
      raise ValueError(f"LazyImages sources disagree on row shape {shapes} or "
                       f"dtype {dtypes}.")
    self.row_shape, = shapes
    self.dtype, = dtypes

  @staticmethod
  def of(source: Any) -> LazyImages:
    """Every row of one source, in order (the source needs `__len__`)."""
    n = len(source)
    return LazyImages((source,), np.zeros(n, np.int32), np.arange(n))

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.rows),) + self.row_shape

  @property
  def ndim(self) -> int:
    return 1 + len(self.row_shape)

  def __len__(self) -> int:
    return len(self.rows)

  def _positions(self, key: Any) -> np.ndarray:
    if isinstance(key, slice):
      return np.arange(len(self))[key]
    key = np.asarray(key)
    if key.dtype == bool:
      if key.shape != (len(self),):
        raise IndexError(f"A boolean mask must have shape ({len(self)},), "
                         f"got {key.shape}.")
      return np.flatnonzero(key)
    if key.ndim != 1 or not np.issubdtype(key.dtype, np.integer):
      if key.size == 0:
        return np.zeros(0, np.int64)
      raise IndexError("LazyImages takes an int, a slice, a 1-D int array or "
                       f"a boolean mask, got {key!r}.")
    return np.arange(len(self))[key]  # Bounds checks and negative indices.

  def __getitem__(self, key: Any) -> np.ndarray:
    """Reads rows: `x[i]` -> [*row_shape]; `x[a:b]`, `x[rows]` -> [M, ...]."""
    if isinstance(key, (int, np.integer)):
      return self[np.asarray([key])][0]
    positions = self._positions(key)
    out = np.empty((len(positions),) + self.row_shape, self.dtype)
    which, rows = self.source_index[positions], self.rows[positions]
    for s in np.unique(which):
      selected = np.flatnonzero(which == s)
      # Each distinct row is read once, in increasing order (sequential reads
      # for memory maps and array_record), then scattered to its positions.
      unique, inverse = np.unique(rows[selected], return_inverse=True)
      out[selected] = np.asarray(self.sources[s].read(unique))[inverse]
    return out

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # Reading always makes a new array.
    array = self[:]
    return array if dtype is None else array.astype(dtype)

  def take(self, index: np.ndarray) -> LazyImages:
    """The rows at `index` (int [M] positions or bool [N] mask), unread."""
    positions = self._positions(index)
    return LazyImages(self.sources, self.source_index[positions],
                      self.rows[positions])

  @staticmethod
  def concatenate(parts: Sequence[Any]) -> LazyImages:
    """One view of `parts` (LazyImages or arrays) one after the other."""
    sources, source_index, rows = [], [], []
    for part in parts:
      if not isinstance(part, LazyImages):
        part = LazyImages.of(ArrayRows(part))
      offset = len(sources)
      sources.extend(part.sources)
      source_index.append(part.source_index + offset)
      rows.append(part.rows)
    return LazyImages(sources, np.concatenate(source_index),
                      np.concatenate(rows))

  def __repr__(self) -> str:
    return (f"LazyImages(shape={self.shape}, dtype={self.dtype}, "
            f"sources={len(self.sources)})")


class ArrayRows:
  """A LazyImages source over an array, e.g. `np.load(path, mmap_mode="r")`.

  A memory-mapped array is read from disk only for the rows asked for.
  """

  def __init__(self, array: np.ndarray):
    self.array = array
    self.row_shape = tuple(array.shape[1:])
    self.dtype = array.dtype

  def __len__(self) -> int:
    return len(self.array)

  def read(self, rows: np.ndarray) -> np.ndarray:
    return np.asarray(self.array[rows])


def take_rows(images: Any, index: np.ndarray) -> Any:
  """`images[index]`, kept lazy (unread) when `images` is a LazyImages."""
  if isinstance(images, LazyImages):
    return images.take(index)
  return images[index]


def concatenate_images(parts: Sequence[Any]) -> Any:
  """`np.concatenate(parts)`, or one LazyImages view if any part is lazy."""
  if any(isinstance(part, LazyImages) for part in parts):
    return LazyImages.concatenate(parts)
  return np.concatenate(parts)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """N examples held in memory, in a stable order.

  Attributes:
    images: uint8 [N, H, W, 3] pixels, or float [N, D] / [N, R, D]
      precomputed features: a NumPy array, or a LazyImages view that reads
      rows on access (real datasets).
    captions: N tuples of captions (5 per image for every dataset we use).
    categories: int32 [N], the example's (dominant) category, -1 if none.
    ids: int64 [N], stable example ids, unique within a dataset.
    category_areas: float32 [N, num_categories], the annotated area of each
      category in each image (0 where absent), for multi-label datasets; then
      tasks are assigned by `DOMINANT_GROUP_RULE`. None for one-label data.
  """
  images: np.ndarray | LazyImages
  captions: tuple[tuple[str, ...], ...]
  categories: np.ndarray
  ids: np.ndarray
  category_areas: np.ndarray | None = None

  def __post_init__(self):
    lengths = dict(images=len(self.images), captions=len(self.captions),
                   categories=len(self.categories), ids=len(self.ids))
    if len(set(lengths.values())) != 1:
      raise ValueError(f"Split fields have different lengths: {lengths}.")
    if self.categories.ndim != 1 or self.ids.ndim != 1:
      raise ValueError(
          f"categories and ids must be 1-D, got shapes "
          f"{self.categories.shape} and {self.ids.shape}.")
    if self.category_areas is not None and (
        self.category_areas.ndim != 2
        or len(self.category_areas) != len(self.ids)):
      raise ValueError(f"category_areas must be [N={len(self.ids)}, "
                       f"num_categories], got {self.category_areas.shape}.")

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
    areas = self.category_areas
    return Split(images=take_rows(self.images, index),
                 captions=tuple(self.captions[i] for i in index.tolist()),
                 categories=self.categories[index], ids=self.ids[index],
                 category_areas=None if areas is None else areas[index])

  @staticmethod
  def concatenate(splits: Sequence[Split]) -> Split:
    """All examples of `splits`, one after the other."""
    if not splits:
      raise ValueError("Split.concatenate needs at least one split.")
    shapes = {split.images.shape[1:] for split in splits}
    if len(shapes) != 1:
      raise ValueError(f"Cannot concatenate splits whose images have "
                       f"different shapes: {sorted(shapes)}.")
    areas = [split.category_areas for split in splits]
    if any(a is None for a in areas):
      areas = None
    elif len({a.shape[1] for a in areas}) != 1:
      raise ValueError("Cannot concatenate splits with different numbers of "
                       f"categories: {sorted({a.shape[1] for a in areas})}.")
    return Split(
        images=concatenate_images([split.images for split in splits]),
        captions=tuple(c for split in splits for c in split.captions),
        categories=np.concatenate([split.categories for split in splits]),
        ids=np.concatenate([split.ids for split in splits]),
        category_areas=None if areas is None else np.concatenate(areas))


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
  """The tasks in training order and the names of all dataset categories.

  Attributes:
    tasks: the tasks in training order.
    category_names: every dataset category, indexed by id.
    assignment_rule: how examples were assigned to tasks (for results.json).
    details: dataset notes for results.json (source, split and text rules,
      examples left out), JSON-able.
    held_out_categories: category ids kept out of every task (e.g. to
      pretrain on); () when none.
    held_out_train: the training examples in no task whose (dominant)
      category is held out (`held_out_examples`); None when none are held out.
  """
  tasks: tuple[Task, ...]
  category_names: tuple[str, ...]
  assignment_rule: str = ASSIGNMENT_RULE
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  held_out_categories: tuple[int, ...] = ()
  held_out_train: Split | None = None

  def describe(self) -> dict[str, Any]:
    """A JSON-able summary for results.json: rule, groups and counts."""
    assigned = {c for task in self.tasks for c in task.categories}
    out = dict(
        assignment_rule=self.assignment_rule,
        dataset=dict(self.details),
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
    if self.held_out_train is not None:  # Absent otherwise: results.json as before.
      out["held_out"] = dict(
          category_ids=list(self.held_out_categories),
          category_names=[self.category_names[c] for c in self.held_out_categories
                          if 0 <= c < len(self.category_names)],
          num_train=len(self.held_out_train))
    return out


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


def dominant_categories(category_areas: np.ndarray) -> np.ndarray:
  """int32 [N]: each image's largest-area category (ties to the lower id), -1 if none.

  Args:
    category_areas: float [N, num_categories].
  """
  # argmax takes the first maximum: ties go to the lower category id.
  dominant = np.argmax(category_areas, axis=1) if category_areas.shape[1] else (
      np.zeros(len(category_areas), np.int64))
  has_any = category_areas.max(axis=1, initial=0) > 0
  return np.where(has_any, dominant, -1).astype(np.int32)


def assign_tasks(split: Split, groups: Sequence[Sequence[int]]) -> np.ndarray:
  """The task index of each example of `split`, -1 for examples in no task.

  One-label splits (no `category_areas`): the task whose group holds the
  example's category. Multi-label splits: `DOMINANT_GROUP_RULE`, i.e. the group
  with the largest summed annotated area, ties to the lower task index, -1 if
  every group's area is 0.

  Returns:
    int64 [N].
  """
  if split.category_areas is None:
    task = np.full(len(split), -1, np.int64)
    for t, group in enumerate(groups):
      task[np.isin(split.categories, group)] = t
    return task
  group_areas = np.stack(
      [split.category_areas[:, list(group)].sum(axis=1) for group in groups],
      axis=1)
  # argmax returns the first maximum: ties go to the lower task index.
  task = np.argmax(group_areas, axis=1).astype(np.int64)
  task[group_areas.max(axis=1) <= 0] = -1
  return task


def held_out_examples(split: Split, categories: Sequence[int],
                      groups: Sequence[Sequence[int]]) -> Split:
  """The examples of `split` in no task whose (dominant) category is in `categories`.

  An example some task holds (`assign_tasks`) is never held out, so a
  multi-label image with any area in a task's group stays that task's. Ids
  outside the dataset or inside a group simply match nothing: the caller
  checks `categories` against the tasks and says what to fix.

  Args:
    categories: the held-out category ids.
    groups: every task's category group, as `split_into_tasks` took them.
  """
  in_no_task = assign_tasks(split, groups) < 0
  return split.subset(in_no_task & np.isin(split.categories, list(categories)))


def split_into_tasks(splits: dict[str, Split],
                     task_categories: Sequence[Sequence[int]],
                     category_names: Sequence[str],
                     details: dict[str, Any] | None = None) -> TaskSequence:
  """Assigns each example to the task of its dominant category group.

  Args:
    splits: {"train", "val", "test"} -> Split of the whole dataset.
    task_categories: one group of category ids per task, in training order.
    category_names: the names of all dataset categories, indexed by id.
    details: dataset notes for `TaskSequence.details`; the number of examples
      of each split left out (in no task) is added to them.

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
  assignment = {name: assign_tasks(splits[name], groups)
                for name in SPLIT_NAMES}
  multi_label = any(splits[name].category_areas is not None
                    for name in SPLIT_NAMES)
  tasks = []
  for t, group in enumerate(groups):
    name = f"task_{t + 1}"
    parts = {}
    for split_name in SPLIT_NAMES:
      parts[split_name] = splits[split_name].subset(
          assignment[split_name] == t)
      if not len(parts[split_name]):
        raise ValueError(
            f"{name} (categories {list(group)}) has no {split_name} examples; "
            f"add examples of these categories to the {split_name} split "
            "(e.g. raise *_per_category) or regroup the categories.")
    tasks.append(Task(name=name, categories=group, **parts))
  details = dict(details or {})
  details["examples_in_no_task"] = {
      name: int(np.sum(assignment[name] < 0)) for name in SPLIT_NAMES}
  return TaskSequence(
      tasks=tuple(tasks), category_names=tuple(category_names),
      assignment_rule=DOMINANT_GROUP_RULE if multi_label else ASSIGNMENT_RULE,
      details=details)


def single_task(splits: dict[str, Split], category_names: Sequence[str],
                details: dict[str, Any] | None = None) -> TaskSequence:
  """One task with every example (standard non-continual training)."""
  missing = [name for name in SPLIT_NAMES if name not in splits]
  if missing:
    raise ValueError(f"splits lacks {missing}; it must have keys "
                     f"{list(SPLIT_NAMES)}.")
  task = Task(name="task_1", categories=tuple(range(len(category_names))),
              **{name: splits[name] for name in SPLIT_NAMES})
  details = dict(details or {})
  details["examples_in_no_task"] = {name: 0 for name in SPLIT_NAMES}
  return TaskSequence(tasks=(task,), category_names=tuple(category_names),
                      assignment_rule=SINGLE_TASK_RULE, details=details)


def resolve_category_groups(
    task_categories: Sequence[Sequence[int | str]],
    category_names: Sequence[str],
    aliases: Mapping[str, Sequence[int]] | None = None) -> list[list[int]]:
  """Category groups with names replaced by ids.

  Args:
    task_categories: groups of category ids or names; a name is a category
      name or an alias for several categories (e.g. a COCO supercategory).
    category_names: every category's name, indexed by id.
    aliases: name -> category ids, e.g. {"animal": [15, ..., 24]}.

  Returns:
    The groups as lists of int ids (validated later by split_into_tasks).
  """
  aliases = aliases or {}
  ids = {name: i for i, name in enumerate(category_names)}
  groups = []
  for group in task_categories:
    if isinstance(group, (str, bytes, int, np.integer)):
      groups.append(group)  # split_into_tasks names this error.
      continue
    resolved = []
    for c in group:
      if not isinstance(c, str):
        resolved.append(c)
      elif c in aliases:
        resolved.extend(int(i) for i in aliases[c])
      elif c in ids:
        resolved.append(ids[c])
      else:
        known = sorted(aliases) + list(category_names)
        raise ValueError(
            f"Unknown category name {c!r} in task_categories; valid names: "
            f"{known[:100]}{' ...' if len(known) > 100 else ''}.")
    groups.append(resolved)
  return groups


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


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole dataset before task assignment, as each source's `load` gives it.

  Attributes:
    splits: {"train", "val", "test"} -> Split.
    category_names: every category's name, indexed by id.
    category_aliases: names that stand for several categories in
      `task_categories` (COCO supercategories).
    details: notes for results.json (source files, split and text rules).
  """
  splits: dict[str, Split]
  category_names: tuple[str, ...]
  category_aliases: Mapping[str, tuple[int, ...]] = dataclasses.field(
      default_factory=dict)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
