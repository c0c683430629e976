"""Datasets by name: each source registers its loader and config keys here.

A source module (synthetic.py, coco.py, ...) calls `register(name, load,
config_keys, summary=...)` at its top level. This module imports none of them: the built-in ones
(`BUILTIN_SOURCES`) are imported on the first call that needs every entry
(`lookup`, `names`, `config_keys`, `load_task_sequence`), so importing the
registry costs nothing and the import graph has no cycle (the sources import
this module, never the other way round).

Usage:
  sequence = registry.load_task_sequence(config.data, data_dir)
  registry.names()        # ('synthetic', 'coco', 'flickr30k', ...)
  registry.config_keys()  # the whole `data` config section: name -> schema.Key
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import logging

from ccr_jax import schema
from ccr_jax.data import tasks

# Modules of ccr_jax.data that register a source under their own name, in
# the order names() lists them.
BUILTIN_SOURCES = ("synthetic", "coco", "flickr30k", "visual_genome",
                   "precomputed")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One dataset source.

  Attributes:
    name: the value of `data.name` that picks it.
    load: (data_config, data_dir) -> tasks.Dataset, the whole dataset before
      task assignment; data_dir is where TFDS datasets are built and cached.
    config_keys: the `data` keys this source reads beyond `COMMON_KEYS`,
      each declared once: keys several sources read are one shared
      declaration (e.g. `manual.CONFIG_KEYS`). A key "not set" by default
      but typed is a `FieldReference(None, field_type=...)`, which
      `config_keys()` copies anew for each config.
    summary: where the data comes from, in a line (listed for unknown names).
    one_task_keeps_all: with num_tasks=1 and no task_categories, one task
      holds every example (`tasks.SINGLE_TASK_RULE`, the standard
      non-continual protocol); False: the one group of every category, as
      for any num_tasks (the synthetic benchmark, where every example has
      one).
  """
  name: str
  load: Callable[[Any, str], tasks.Dataset]
  config_keys: Mapping[str, schema.Key]
  summary: str
  one_task_keeps_all: bool = True


# The one piece of module state: filled by the sources' `register` calls.
_ENTRIES: dict[str, Entry] = {}


def register(name: str, load: Callable[[Any, str], tasks.Dataset],
             config_keys: Mapping[str, schema.Key], *, summary: str,
             one_task_keeps_all: bool = True) -> Entry:
  """Adds a source (the fields of `Entry`); its name must be new.

  Returns:
    The registered Entry.

  Raises:
    ValueError: another source already has this name.
  """
  if name in _ENTRIES:
    raise ValueError(f"A dataset source named {name!r} is already "
                     "registered; choose another name.")
  _ENTRIES[name] = Entry(name=name, load=load, config_keys=config_keys,
                         summary=summary,
                         one_task_keeps_all=one_task_keeps_all)
  return _ENTRIES[name]


def _entries() -> dict[str, Entry]:
  """Every entry: the built-in ones in BUILTIN_SOURCES order, then the others."""
  # importlib, not import statements: the sources import this module to
  # register, so importing them here at the top would be a cycle. Each call
  # after the first is a sys.modules lookup.
  for module in BUILTIN_SOURCES:
    importlib.import_module(f"ccr_jax.data.{module}")
  # Registration order depends on which module was imported first.
  order = {name: i for i, name in enumerate(BUILTIN_SOURCES)}
  return dict(sorted(_ENTRIES.items(),
                     key=lambda item: order.get(item[0], len(order))))


def names() -> tuple[str, ...]:
  """Every registered source name, the built-in ones first."""
  return tuple(_entries())


def lookup(name: str) -> Entry:
  """The source registered as `name`.

  Raises:
    ValueError: no such source; the message lists every one and its data.
  """
  entries = _entries()
  if name not in entries:
    listing = "; ".join(f"{n!r} ({e.summary})" for n, e in entries.items())
    raise ValueError(f"Unknown dataset name {name!r}; valid names are "
                     f"{list(entries)}: {listing}.")
  return entries[name]


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
  """`check`, but None (a key left unset) is valid too."""
  return lambda value: None if value is None else check(value)


def optional_bool(value: Any) -> str | None:
  """None (a key left unset), True or False are valid."""
  return None if value is None or isinstance(value, bool) else "true or false"


def option(data_config: Any, name: str, default: Any) -> Any:
  """data_config[name], or `default` where it is None: a typed-None key left
  unset, whose default is the dataset's own (its doc says "None = ...").
  The config is complete (`run.config.complete`): every key is present."""
  value = data_config[name]
  return default if value is None else value


# The keys every source shares: which dataset, how it is split into tasks and
# how its captions are tokenised.
COMMON_KEYS = {
    "name": schema.Key("synthetic", "the dataset: a registered source "
                       "(ccr_jax.data.registry.names())",
                       schema.one_of(names)),
    "data_dir": schema.Key("", "where TFDS datasets are built and cached; "
                           "'' = <workdir>/tfds"),
    "image_size": schema.Key(32, "side of the square images the model sees "
                             "(pixel sources)", schema.at_least(1, True)),
    "num_tasks": schema.Key(4, "how many tasks the dataset is split into",
                            schema.at_least(1, True)),
    "task_categories": schema.Key(
        ml_collections.FieldReference(None, field_type=list),
        "one group of category ids or names per task, in training order; "
        "None = consecutive equal groups"),
    "max_caption_len": schema.Key(24, "tokens per caption, <start> and <end> "
                                  "included; longer ones are cut",
                                  schema.at_least(3, True)),
    "vocab_min_count": schema.Key(1, "training-caption count a word needs to "
                                  "enter the vocabulary",
                                  schema.at_least(1, True)),
}


def _own_copy(key: schema.Key) -> schema.Key:
  # A FieldReference is shared by every ConfigDict it is put into: each call
  # of config_keys() gets its own, so two configs never change each other.
  ref = key.default
  if not isinstance(ref, ml_collections.FieldReference):
    return key
  return dataclasses.replace(key, default=ml_collections.FieldReference(
      ref.get(), field_type=ref.get_type()))


def config_keys() -> dict[str, schema.Key]:
  """The whole `data` config section: `COMMON_KEYS`, then each source's.

  Keys whose default is None but whose values have a type are declared with
  a typed `ml_collections.FieldReference(None, field_type=...)` (so that
  `--config.data.use_restval=False` parses on any config); every call returns
  new ones. `data.categories` and `data.split_prefixes` hold free-form values
  (category specs, split -> file prefix) that their sources check.

  Raises:
    ValueError: a key is declared twice (two sources reading one key must
      share one declaration, e.g. `manual.CONFIG_KEYS`).
  """
  keys = dict(COMMON_KEYS)
  owner = {name: "the common keys" for name in keys}
  for entry in _entries().values():
    for name, key in entry.config_keys.items():
      if name in keys and keys[name] is not key:
        raise ValueError(
            f"data.{name} is declared by both {owner[name]} and the "
            f"{entry.name!r} source; declare it once and share it.")
      keys[name] = key
      owner.setdefault(name, f"the {entry.name!r} source")
  return {name: _own_copy(key) for name, key in keys.items()}


def load_task_sequence(data_config: Any, data_dir: str,
                       held_out_categories: tuple[int, ...] = ()
                       ) -> tasks.TaskSequence:
  """Loads the dataset named by data_config.name and splits it into tasks.

  Args:
    data_config: the `data` config section: name, num_tasks and
      task_categories (a list of groups of category ids, or of names: COCO
      category or supercategory names, Visual Genome synsets; None for
      consecutive equal groups or, with num_tasks=1 on a source whose
      `one_task_keeps_all`, one task holding every example), plus the keys
      the source reads (`config_keys`).
    data_dir: where TFDS datasets are built and cached.
    held_out_categories: category ids whose training examples in no task come
      back as the sequence's `held_out_train` (`tasks.held_out_examples`;
      a run pretrains on them). Not checked here: ids in a task or outside
      the dataset give fewer (or no) examples.

  Raises:
    ValueError: an unknown name, or task_categories of another length than
      num_tasks (before anything is loaded); bad groups (from tasks).
  """
  entry = lookup(data_config.name)
  task_categories = data_config.task_categories
  if task_categories is not None and (
      len(task_categories) != data_config.num_tasks):
    raise ValueError(
        f"task_categories has {len(task_categories)} groups but num_tasks="
        f"{data_config.num_tasks}; make them agree.")
  dataset = entry.load(data_config, data_dir)
  if task_categories is None and (
      data_config.num_tasks == 1 and entry.one_task_keeps_all):
    sequence = tasks.single_task(dataset.splits, dataset.category_names,
                                 dataset.details)
  else:
    if task_categories is None:
      task_categories = tasks.default_task_categories(
          len(dataset.category_names), data_config.num_tasks)
    groups = tasks.resolve_category_groups(
        task_categories, dataset.category_names, dataset.category_aliases)
    sequence = tasks.split_into_tasks(dataset.splits, groups,
                                      dataset.category_names, dataset.details)
  if not held_out_categories:
    return sequence
  return dataclasses.replace(
      sequence, held_out_categories=tuple(held_out_categories),
      held_out_train=tasks.held_out_examples(
          dataset.splits["train"], held_out_categories,
          [task.categories for task in sequence.tasks]))


class BuildMessages:
  """Mixed into our TFDS builders: one log line per build instead of TFDS's
  two bold prints, which say "Downloading ... Unknown size" for a dataset
  that is rendered or read locally (TFDS 4.9's private hooks)."""

  def _log_download_bytes(self) -> None:
    logging.info("building the %s dataset into %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    pass

