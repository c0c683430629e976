"""Split, task assignment, the task sequence's description and the registry."""

import ast
import importlib
import json
import os
import re
import sys

import ml_collections
import numpy as np
import pytest

from ccr_jax import schema
from ccr_jax.data import pipeline
from ccr_jax.data import registry
from ccr_jax.data import tasks

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("circle", "square", "triangle", "plus", "ring", "diamond")


def _config(name, arg=None):
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  return importlib.import_module(f"configs.{name}").get_config(arg)


def _split(categories, first_id=0):
  """A Split whose image i is filled with its id, to track examples."""
  categories = np.asarray(categories, np.int32)
  ids = np.arange(first_id, first_id + len(categories), dtype=np.int64)
  images = np.broadcast_to(ids[:, None, None, None] % 256,
                           (len(ids), 4, 4, 3)).astype(np.uint8)
  captions = tuple(tuple(f"caption {j} of {i}" for j in range(5)) for i in ids)
  return tasks.Split(images=images, captions=captions, categories=categories,
                     ids=ids)


def _splits():
  return dict(train=_split([0, 1, 2, 3, 4, 5, 0, 3, 5]),
              val=_split([0, 1, 2, 3, 4, 5], first_id=100),
              test=_split([5, 4, 3, 2, 1, 0, 1], first_id=200))


def test_split_validates_lengths():
  with pytest.raises(ValueError, match="different lengths"):
    tasks.Split(images=np.zeros((3, 2, 2, 3), np.uint8), captions=(("a",),),
                categories=np.zeros(3, np.int32), ids=np.arange(3))


def test_subset_by_index_and_mask():
  split = _split([0, 1, 2, 3])
  picked = split.subset(np.array([3, 1]))
  np.testing.assert_array_equal(picked.ids, [3, 1])
  np.testing.assert_array_equal(picked.categories, [3, 1])
  assert picked.captions == (split.captions[3], split.captions[1])
  np.testing.assert_array_equal(picked.images[:, 0, 0, 0], [3, 1])
  masked = split.subset(np.array([True, False, True, False]))
  np.testing.assert_array_equal(masked.ids, [0, 2])
  assert len(split.subset(np.array([], np.int64))) == 0
  with pytest.raises(ValueError, match="mask"):
    split.subset(np.array([True, False]))


def test_concatenate():
  a, b = _split([0, 1]), _split([2], first_id=10)
  both = tasks.Split.concatenate([a, b])
  np.testing.assert_array_equal(both.ids, [0, 1, 10])
  np.testing.assert_array_equal(both.categories, [0, 1, 2])
  assert both.captions == a.captions + b.captions
  assert both.images.shape == (3, 4, 4, 3)
  with pytest.raises(ValueError, match="at least one"):
    tasks.Split.concatenate([])
  odd = tasks.Split(images=np.zeros((1, 2, 2, 3), np.uint8),
                    captions=(("x",) * 5,), categories=np.zeros(1, np.int32),
                    ids=np.zeros(1, np.int64))
  with pytest.raises(ValueError, match="different shapes"):
    tasks.Split.concatenate([a, odd])


def test_split_into_tasks_assigns_by_category_group():
  sequence = tasks.split_into_tasks(_splits(), [[0, 1, 2], [3, 4, 5]], NAMES)
  first, second = sequence.tasks
  assert (first.name, second.name) == ("task_1", "task_2")
  assert first.categories == (0, 1, 2) and second.categories == (3, 4, 5)
  # Ids of the examples of each group, worked out by hand from _splits().
  np.testing.assert_array_equal(first.train.ids, [0, 1, 2, 6])
  np.testing.assert_array_equal(second.train.ids, [3, 4, 5, 7, 8])
  np.testing.assert_array_equal(first.val.ids, [100, 101, 102])
  np.testing.assert_array_equal(first.test.ids, [203, 204, 205, 206])
  np.testing.assert_array_equal(second.test.ids, [200, 201, 202])
  for task in sequence.tasks:
    for split in (task.train, task.val, task.test):
      assert set(split.categories.tolist()) <= set(task.categories)


def test_unlisted_categories_are_left_out():
  sequence = tasks.split_into_tasks(_splits(), [[4], [0, 2]], NAMES)
  used = np.concatenate([t.train.ids for t in sequence.tasks])
  np.testing.assert_array_equal(np.sort(used), [0, 2, 4, 6])
  assert sequence.describe()["unassigned_categories"] == [1, 3, 5]


def test_describe():
  sequence = tasks.split_into_tasks(_splits(), [[0, 1, 2], [3, 4, 5]], NAMES)
  description = json.loads(json.dumps(sequence.describe()))
  assert "dominant category" in description["assignment_rule"]
  assert description["num_tasks"] == 2
  assert description["category_names"] == list(NAMES)
  assert description["unassigned_categories"] == []
  assert description["tasks"] == [
      dict(name="task_1", category_ids=[0, 1, 2],
           category_names=["circle", "square", "triangle"],
           num_train=4, num_val=3, num_test=4),
      dict(name="task_2", category_ids=[3, 4, 5],
           category_names=["plus", "ring", "diamond"],
           num_train=5, num_val=3, num_test=3),
  ]


@pytest.mark.parametrize("groups, message", [
    ([], "non-empty list"),
    (None, "non-empty list"),
    ([[0, 1], []], "Task 1 has category group"),
    ([[0, 1], [1, 2]], "Category 1 appears in tasks 0 and 1.*disjoint"),
    ([[0, 0]], "Category 0 appears twice in task 0"),
    ([[0, 6]], "category 6, but the dataset has 6 categories"),
    ([[-1]], "category -1"),
    ([[0.5]], "not an integer"),
    ([3], "Task 0 has category group 3"),
])
def test_bad_groups_raise_clear_errors(groups, message):
  with pytest.raises(ValueError, match=message):
    tasks.split_into_tasks(_splits(), groups, NAMES)


def test_empty_task_split_raises():
  splits = _splits()
  splits["val"] = _split([0, 1, 2], first_id=100)
  with pytest.raises(ValueError,
                     match=r"task_2 \(categories \[3, 4, 5\]\) has no val"):
    tasks.split_into_tasks(splits, [[0, 1, 2], [3, 4, 5]], NAMES)


def test_missing_split_raises():
  splits = _splits()
  del splits["test"]
  with pytest.raises(ValueError, match="lacks"):
    tasks.split_into_tasks(splits, [[0]], NAMES)


def test_default_task_categories():
  assert tasks.default_task_categories(12, 4) == [
      [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
  assert tasks.default_task_categories(6, 1) == [[0, 1, 2, 3, 4, 5]]
  with pytest.raises(ValueError, match="not divisible"):
    tasks.default_task_categories(12, 5)
  with pytest.raises(ValueError, match="positive"):
    tasks.default_task_categories(12, 0)


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      name="synthetic", image_size=32, num_categories=6, num_tasks=3,
      task_categories=None, train_per_category=3, val_per_category=1,
      test_per_category=2, max_distractors=1, seed=0))
  config.update(overrides)
  return config


def test_load_task_sequence_synthetic(tmp_path):
  sequence = registry.load_task_sequence(_data_config(), str(tmp_path))
  description = sequence.describe()
  assert [t["category_ids"] for t in description["tasks"]] == [
      [0, 1], [2, 3], [4, 5]]
  assert description["category_names"] == list(NAMES)
  assert [(t["num_train"], t["num_val"], t["num_test"])
          for t in description["tasks"]] == [(6, 2, 4)] * 3


def test_load_task_sequence_explicit_groups(tmp_path):
  config = _data_config(num_tasks=2)
  config.task_categories = [[5, 0], [1]]
  sequence = registry.load_task_sequence(config, str(tmp_path))
  assert [t.categories for t in sequence.tasks] == [(5, 0), (1,)]
  config.task_categories = [[5, 0], [1], [2]]
  with pytest.raises(ValueError, match="num_tasks"):
    registry.load_task_sequence(config, str(tmp_path))


def test_synthetic_single_task_keeps_the_category_rule(tmp_path):
  # Every synthetic example has a category: num_tasks=1 is the one group of
  # all of them (tasks.ASSIGNMENT_RULE), as before the registry.
  sequence = registry.load_task_sequence(_data_config(num_tasks=1),
                                         str(tmp_path))
  (task,) = sequence.tasks
  assert task.categories == (0, 1, 2, 3, 4, 5)
  assert sequence.assignment_rule == tasks.ASSIGNMENT_RULE
  assert (len(task.train), len(task.val), len(task.test)) == (18, 6, 12)


def test_load_task_sequence_unknown_name(tmp_path):
  with pytest.raises(ValueError, match=r"valid names are \['synthetic', "
                     r"'coco', 'flickr30k', 'visual_genome', 'precomputed'\]"
                     r"(.|\n)*rendered locally"):
    registry.load_task_sequence(_data_config(name="cifar"), str(tmp_path))


# ----------------------------------------------------------------------------
# The registry: names, config keys, registering and the import graph.


def test_names_are_the_builtin_sources():
  assert registry.names() == ("synthetic", "coco", "flickr30k",
                              "visual_genome", "precomputed")
  assert registry.lookup("coco").name == "coco"


# configs/default.py's data section before the registry (written out here, not
# read from the code, so a changed default fails this test).
_DEFAULT_DATA = dict(
    name="synthetic", data_dir="", image_size=32, num_categories=12,
    num_tasks=4, task_categories=None, train_per_category=200,
    val_per_category=10, test_per_category=40, max_distractors=1, seed=0,
    max_caption_len=24, vocab_min_count=1)
# The keys only the real sources read, and their "not set" defaults.
_REAL_SOURCE_DEFAULTS = dict(
    manual_dir="", stored_image_size=None, decode_threads=0, use_restval=None,
    categories=None, features_dir="", split_prefixes=None, categories_file="",
    instances_files=(), mmap=None)


def test_config_keys_defaults_are_the_default_experiment():
  keys = registry.config_keys()
  assert set(keys) == set(_DEFAULT_DATA) | set(_REAL_SOURCE_DEFAULTS)
  defaults = schema.defaults(keys)
  got = {name: defaults[name] for name in keys}
  assert got == dict(_DEFAULT_DATA, **_REAL_SOURCE_DEFAULTS)
  assert all(key.doc and "\n" not in key.doc for key in keys.values())
  # The default section is valid under its own schema.
  assert schema.problems(keys, json.loads(defaults.to_json())) == []


def test_config_keys_hold_fresh_field_references():
  # A FieldReference is shared by every ConfigDict holding it: two configs
  # built from one call's keys would change each other's task_categories.
  first = schema.defaults(registry.config_keys())
  second = schema.defaults(registry.config_keys())
  first.task_categories = [[0, 1]]
  first.stored_image_size = 0
  first.use_restval = False
  assert second.task_categories is None
  assert second.stored_image_size is None and second.use_restval is None
  # "Not set", but typed: --config.data.use_restval=False parses on any
  # config, and a value of another type is refused.
  for key, wrong in (("task_categories", "not a list"),
                     ("stored_image_size", "256"), ("use_restval", "no"),
                     ("mmap", 1)):
    with pytest.raises(TypeError):
      setattr(second, key, wrong)


@pytest.mark.parametrize("key, value, message", [
    ("name", "cifar", "one of"),
    ("num_tasks", 0, "integer >= 1"),
    ("stored_image_size", -1, "integer >= 0"),
    ("use_restval", "yes", "true or false"),
    ("max_distractors", 5, r"\[0, 4\]"),
    ("num_categories", 17, r"\[2, 16\]"),
])
def test_config_keys_refuse_bad_values(key, value, message):
  keys = registry.config_keys()
  config = dict(json.loads(schema.defaults(keys).to_json()), **{key: value})
  (problem,) = schema.problems(keys, config, "data.")
  assert f"data.{key}" in problem and re.search(message, problem)


def test_variant_configs_set_only_declared_keys():
  keys = registry.config_keys()
  for name, arg in (("coco_vsepp", None), ("secoco", None),
                    ("flickr30k_vsepp", None), ("sevige", None),
                    ("coco_precomp", "secoco"), ("f30k_precomp", None)):
    data = json.loads(_config(name, arg).data.to_json())
    assert schema.problems(keys, data, "data.", free_form=(
        "data.categories", "data.split_prefixes")) == [], name


def test_a_key_declared_twice_differently_is_refused(monkeypatch):
  monkeypatch.setitem(registry._ENTRIES, "twice", registry.Entry(
      name="twice", load=lambda c, d: None, summary="test",
      config_keys={"manual_dir": schema.Key("/x", "another manual_dir")}))
  with pytest.raises(ValueError, match="data.manual_dir is declared by both"):
    registry.config_keys()
  with pytest.raises(ValueError, match="already registered"):
    registry.register("coco", lambda c, d: None, {}, summary="another coco")


def test_a_registered_source_loads_through_the_registry(monkeypatch, tmp_path):
  split = _split([0, 1, 1])
  dataset = tasks.Dataset(splits=dict(train=split, val=split, test=split),
                          category_names=("a", "b"))
  monkeypatch.setitem(registry._ENTRIES, "fixture", registry.Entry(
      name="fixture", load=lambda config, data_dir: dataset, config_keys={},
      summary="in memory"))
  config = _data_config(name="fixture", num_tasks=2, task_categories=[["b"],
                                                                      [0]])
  sequence = registry.load_task_sequence(config, str(tmp_path))
  assert [t.train.ids.tolist() for t in sequence.tasks] == [[1, 2], [0]]
  assert "fixture" in registry.names()


def _imports(path):
  """The ccr_jax modules a file imports, function-level imports included."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
  return {m for m in out if m.startswith("ccr_jax")}


def test_data_modules_import_no_cycle():
  folder = os.path.join(_REPO, "ccr_jax", "data")
  modules = {f"ccr_jax.data.{f[:-3]}": os.path.join(folder, f)
             for f in os.listdir(folder) if f.endswith(".py")
             and f != "__init__.py"}
  graph = {m: _imports(path) & set(modules) for m, path in modules.items()}
  assert "ccr_jax.data.coco" not in graph["ccr_jax.data.tasks"]
  assert not graph["ccr_jax.data.tasks"] and not graph["ccr_jax.data.registry"] - {
      "ccr_jax.data.tasks"}
  done, path = set(), []

  def visit(module):
    assert module not in path, " -> ".join(path[path.index(module):] + [module])
    if module in done:
      return
    path.append(module)
    for dependency in sorted(graph[module]):
      visit(dependency)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)


def test_prefetched_batches_equal_direct_ones_from_any_first_step():
  calls = []

  def batch_fn(step):
    calls.append(step)
    return {"x": np.full((2,), step)}

  for first in (0, 3):
    calls.clear()
    with pipeline.prefetched(batch_fn, num_steps=6, depth=2) as fetch:
      got = [int(fetch(s)["x"][0]) for s in range(first, 6)]
    assert got == list(range(first, 6))
    # Each step built once, none past the task's last step.
    assert sorted(calls) == list(range(first, 6))

  def failing(step):
    if step == 2:
      raise ValueError("corrupt image in batch 2")
    return {"x": step}

  with pytest.raises(ValueError, match="batch 2"):
    with pipeline.prefetched(failing, num_steps=4) as fetch:
      for s in range(4):
        fetch(s)
