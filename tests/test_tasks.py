"""Split, task assignment and the task sequence's description."""

import json

import ml_collections
import numpy as np
import pytest

from ccr_jax.data import tasks

NAMES = ("circle", "square", "triangle", "plus", "ring", "diamond")


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
  sequence = tasks.load_task_sequence(_data_config(), str(tmp_path))
  description = sequence.describe()
  assert [t["category_ids"] for t in description["tasks"]] == [
      [0, 1], [2, 3], [4, 5]]
  assert description["category_names"] == list(NAMES)
  assert [(t["num_train"], t["num_val"], t["num_test"])
          for t in description["tasks"]] == [(6, 2, 4)] * 3


def test_load_task_sequence_explicit_groups(tmp_path):
  config = _data_config(num_tasks=2)
  config.task_categories = [[5, 0], [1]]
  sequence = tasks.load_task_sequence(config, str(tmp_path))
  assert [t.categories for t in sequence.tasks] == [(5, 0), (1,)]
  config.task_categories = [[5, 0], [1], [2]]
  with pytest.raises(ValueError, match="num_tasks"):
    tasks.load_task_sequence(config, str(tmp_path))


def test_load_task_sequence_unknown_name(tmp_path):
  with pytest.raises(ValueError, match=r"valid names are \['synthetic'\]"):
    tasks.load_task_sequence(_data_config(name="cifar"), str(tmp_path))


def test_prefetched_batches_equal_direct_ones_from_any_first_step():
  from ccr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
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
