"""Pretraining on held-out categories (`pretrain.*`, run/pretrain.py, `:pretrained`)."""

import json
import os

import jax
import numpy as np
import pytest

from ccr_jax import checkpoints
from ccr_jax.data import registry as data_registry
from ccr_jax.data import tasks as tasks_lib
from ccr_jax.data import text as text_lib
from ccr_jax.run import config as config_lib
from ccr_jax.run import loop
from ccr_jax.run import pretrain as pretrain_lib
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import training as training_lib
from ccr_jax.run import workdir as workdir_lib
from configs import default


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One rendering of each tiny benchmark, shared by the tests of this file."""
  return str(tmp_path_factory.mktemp("tfds"))


def _tiny(data_dir, pretrained=True, **pretrain):
  config = default.get_config("pretrained,tiny" if pretrained else "tiny")
  config.data.data_dir = data_dir
  for key, value in pretrain.items():
    config.pretrain[key] = value
  return config


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, _host(a), _host(b))))


def _no_training(*args):
  raise AssertionError("pretrained again instead of restoring the snapshot")


def test_pretrained_variant_holds_out_the_last_four_shapes():
  config = default.get_config("pretrained")
  config_lib.validate_config(config)
  assert config.data.num_categories == 16
  # The default's tasks: 4 consecutive groups of 3 over shapes 0..11.
  assert config.data.task_categories == tasks_lib.default_task_categories(12, 4)
  assert tuple(config.pretrain.categories) == (12, 13, 14, 15)
  assert config.pretrain.steps > 0
  tiny = default.get_config("pretrained,tiny")
  config_lib.validate_config(tiny)
  assert tiny.data.num_categories == 6 and tuple(tiny.pretrain.categories) == (4, 5)
  # Pretraining is off unless asked for: the default and tiny configs are as before.
  for config in (default.get_config(), default.get_config("tiny")):
    assert not pretrain_lib.enabled(config) and not config.pretrain.categories
  with pytest.raises(ValueError, match="unknown options.*'pretrained', 'tiny'"):
    default.get_config("pretrain")


@pytest.mark.parametrize("change, message", [
    (dict(steps=5, categories=()),
     r"--config.pretrain.steps=5 needs --config.pretrain.categories"),
    (dict(categories=(4, 1)),
     r"--config.pretrain.categories=\(4, 1\): category 1 is in task 1's group "
     r"\[0, 1\].*drop it from pretrain.categories or regroup data.task_categories"),
    (dict(categories=(4, 4)), r"must be a list of distinct category ids"),
    (dict(categories=(-1,)), r"must be a list of distinct category ids"),
    (dict(steps=-1), r"--config.pretrain.steps=-1 must be an integer >= 0"),
])
def test_bad_pretrain_config_is_refused_before_any_work(change, message):
  config = default.get_config("pretrained,tiny")
  for key, value in change.items():
    config.pretrain[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(config)


@pytest.mark.parametrize("categories, message", [
    # Beyond the 4 rendered shapes.
    ((9,), r"category 9 is not one of the dataset's 4 categories \(ids 0..3\)"),
    # In a default (consecutive) group, which only the loaded dataset knows.
    ((3,), r"category 3 is in task 2's group \[2, 3\]; a pretraining category "
           r"must be in no task"),
])
def test_held_out_categories_are_checked_against_the_dataset(data_dir, categories,
                                                             message):
  config = _tiny(data_dir, pretrained=False, steps=2, categories=categories)
  config_lib.validate_config(config)  # Only the dataset can tell.
  sequence = data_registry.load_task_sequence(config.data, data_dir, categories)
  with pytest.raises(ValueError, match=r"--config.pretrain.categories=\(.*\): " + message):
    setup_lib.check_pretrain_categories(categories, sequence)


def test_held_out_examples_are_those_of_no_task():
  images = np.zeros((5, 2, 2, 3), np.uint8)
  caps = tuple((f"caption {i}",) for i in range(5))
  one_label = tasks_lib.Split(images=images, captions=caps,
                              categories=np.array([0, 2, 3, 2, 1], np.int32),
                              ids=np.arange(5))
  held = tasks_lib.held_out_examples(one_label, (2, 3), [(0,), (1,)])
  np.testing.assert_array_equal(held.ids, [1, 2, 3])
  # Multi-label: image 1's dominant category is held out (2) but it has area
  # in task 1's group: it stays task 1's, never pretraining data.
  areas = np.array([[1, 0, 0], [0.2, 0, 0.5], [0, 0, 0.9], [0, 0, 0], [0, 1, 0]],
                   np.float32)
  multi = tasks_lib.Split(images=images, captions=caps,
                          categories=tasks_lib.dominant_categories(areas),
                          ids=np.arange(5), category_areas=areas)
  held = tasks_lib.held_out_examples(multi, (2,), [(0,), (1,)])
  np.testing.assert_array_equal(held.ids, [2])


def test_steps_zero_is_the_same_setup_without_pretraining(data_dir):
  """The default's vocabulary (task captions only) and initial params are
  untouched; held-out categories with steps=0 change only the vocabulary,
  so `pretrain.steps=0` is the pretrained variant's from-scratch baseline."""
  plain = setup_lib.build_setup(_tiny(data_dir, pretrained=False), "/unused")
  assert plain.pretrain_pool is None and plain.sequence.held_out_train is None
  assert "held_out" not in plain.sequence.describe()
  expected = text_lib.build_vocabulary(
      c for task in plain.sequence.tasks for caps in task.train.captions for c in caps)
  assert plain.vocab == expected

  with_steps = setup_lib.build_setup(_tiny(data_dir), "/unused")
  without = setup_lib.build_setup(_tiny(data_dir, steps=0), "/unused")
  assert with_steps.vocab == without.vocab
  assert len(without.pretrain_pool) == 2 * 16  # 2 held-out shapes x 16 images
  held = without.sequence.describe()["held_out"]
  assert held == {"category_ids": [4, 5], "category_names": ["ring", "diamond"],
                  "num_train": 32}
  assert not pretrain_lib.enabled(without.config)
  assert _equal(setup_lib.initial_params(with_steps),
                setup_lib.initial_params(without))


def test_a_workdir_from_before_pretraining_resumes(tmp_path):
  """A config.json without a `pretrain` section is the same experiment."""
  config = default.get_config("tiny")
  old = json.loads(config.to_json())
  del old["pretrain"]
  workdir_lib.write_json(str(tmp_path / "config.json"), old)
  workdir_lib.check_config(config, str(tmp_path), config_lib.complete)
  config.pretrain.steps, config.pretrain.categories = 2, (3,)
  with pytest.raises(ValueError, match=r"sections differing: \['pretrain'\]"):
    workdir_lib.check_config(config, str(tmp_path), config_lib.complete)


@pytest.mark.slow  # Two experiments' setups and a pretraining (seconds).
def test_pretraining_is_saved_once_and_restored(data_dir, tmp_path, monkeypatch):
  setup = setup_lib.build_setup(_tiny(data_dir), str(tmp_path))
  params = setup_lib.initial_params(setup)
  initial = _host(params)  # Before the train step donates `params`.
  pretrained = _host(pretrain_lib.pretrained_params(setup, params))
  assert not _equal(pretrained, initial)
  folder = pretrain_lib.pretrain_dir(setup.workdir)
  assert checkpoints.completed_snapshots(folder) == [0]

  # A rerun restores the snapshot: nothing is trained.
  with monkeypatch.context() as patch:
    patch.setattr(pretrain_lib, "_train", _no_training)
    again = pretrain_lib.pretrained_params(setup, initial)
  assert _equal(again, pretrained)


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_params(data_dir, tmp_path,
                                                       monkeypatch):
  config = _tiny(data_dir)  # 4 steps, a state checkpoint every 2
  full = setup_lib.build_setup(config, str(tmp_path / "full"))
  pretrained = pretrain_lib.pretrained_params(full, setup_lib.initial_params(full))
  # Killed while saving its snapshot: the rerun resumes from step 2's state
  # and reaches the same params (batches are a function of the step).
  killed = setup_lib.build_setup(config, str(tmp_path / "killed"))

  def dying_save(*args, **kwargs):
    raise KeyboardInterrupt("killed")

  with monkeypatch.context() as patch:
    patch.setattr(checkpoints, "save_snapshot", dying_save)
    with pytest.raises(KeyboardInterrupt):
      pretrain_lib.pretrained_params(killed, setup_lib.initial_params(killed))
  state_dir = os.path.join(pretrain_lib.pretrain_dir(killed.workdir), "state")
  assert os.listdir(state_dir) == ["2"]
  resumed = pretrain_lib.pretrained_params(killed, setup_lib.initial_params(killed))
  # Same device count on CPU: bit-identical.
  assert _equal(resumed, pretrained)


@pytest.mark.slow
def test_run_starts_task_1_from_the_pretrained_params(data_dir, tmp_path,
                                                      monkeypatch, killed_saving_snapshot):
  config = _tiny(data_dir)
  workdir = str(tmp_path / "run")
  starts = []
  real_train = training_lib.train_one_task

  def recording_train(setup, training, t, params, *args, **kwargs):
    if t == 0:
      starts.append(_host(params))
    return real_train(setup, training, t, params, *args, **kwargs)

  monkeypatch.setattr(training_lib, "train_one_task", recording_train)
  # Killed while saving snapshot 1: pretraining is done, task 1 is not.
  with killed_saving_snapshot(1), pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir)
  setup = setup_lib.build_setup(config, workdir)
  pretrained, meta = checkpoints.restore_snapshot(
      pretrain_lib.pretrain_dir(workdir), 0, setup.params_template,
      setup_lib.param_placement(setup.mesh))
  assert meta["pretrain_steps"] == 4 and meta["pretrain_categories"] == [4, 5]
  assert _equal(starts[0], pretrained)
  assert not _equal(starts[0], setup_lib.initial_params(setup))

  # The rerun restores the pretrained params rather than training them again.
  monkeypatch.setattr(pretrain_lib, "_train", _no_training)
  results = loop.train_and_evaluate(config, workdir)
  assert _equal(starts[1], pretrained)
  assert results["task_split"]["held_out"]["category_ids"] == [4, 5]
  assert results["config"]["pretrain"]["steps"] == 4
  timing = json.load(open(os.path.join(workdir, "results", "timing.json")))
  assert timing["pretrain_s"] > 0
