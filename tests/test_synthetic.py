"""The embedded benchmark: determinism, layout, labels in captions, caching."""

import numpy as np
import pytest

from ccr_jax import schema
from ccr_jax.data import registry
from ccr_jax.data import synthetic
from ccr_jax.data import text

# Small enough that each build takes well under a second.
SMALL = dict(num_categories=12, train_per_category=6, val_per_category=2,
             test_per_category=3)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def small(data_root):
  return synthetic.load_synthetic(str(data_root / "a"), seed=0, **SMALL)


def _contains_phrase(tokens, phrase):
  words = text.tokenize(phrase)
  return any(tokens[i:i + len(words)] == words
             for i in range(len(tokens) - len(words) + 1))


def test_shapes_dtypes_and_counts(small):
  assert set(small) == {"train", "val", "test"}
  for name, per_category in [("train", 6), ("val", 2), ("test", 3)]:
    split = small[name]
    n = 12 * per_category
    assert len(split) == n
    assert split.images.shape == (n, 32, 32, 3)
    assert split.images.dtype == np.uint8
    assert split.categories.dtype == np.int32
    assert split.ids.dtype == np.int64
    assert len(split.captions) == n
    assert all(len(c) == 5 and all(isinstance(s, str) and s for s in c)
               for c in split.captions)
    # Every category appears, equally often.
    np.testing.assert_array_equal(np.bincount(split.categories, minlength=12),
                                  np.full(12, per_category))


def test_ids_unique_across_splits(small):
  ids = np.concatenate([small[name].ids for name in ("train", "val", "test")])
  assert len(np.unique(ids)) == len(ids)


def test_same_seed_same_data_other_seed_other_data(data_root, small):
  again = synthetic.load_synthetic(str(data_root / "b"), seed=0, **SMALL)
  other = synthetic.load_synthetic(str(data_root / "c"), seed=1, **SMALL)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(small[name].images, again[name].images)
    assert small[name].captions == again[name].captions
    np.testing.assert_array_equal(small[name].ids, again[name].ids)
    assert not np.array_equal(small[name].images, other[name].images)
    assert small[name].captions != other[name].captions


def test_stored_images_equal_rendered_images(small):
  # PNG is lossless: what the data source reads is what was rendered.
  config = synthetic.synthetic_config(seed=0, **SMALL)
  rendered = list(synthetic.generate_examples(config, "val"))
  np.testing.assert_array_equal(
      small["val"].images, np.stack([e["image"] for e in rendered]))
  assert small["val"].captions == tuple(tuple(e["captions"]) for e in rendered)


def test_captions_mention_category_colour_and_size():
  config = synthetic.synthetic_config(seed=3, **SMALL)
  for example in synthetic.generate_examples(config, "train"):
    category = synthetic.CATEGORY_NAMES[example["category"]]
    colour = synthetic.COLOUR_NAMES[example["colour"]]
    size = synthetic.SIZE_NAMES[example["size"]]
    for caption in example["captions"]:
      tokens = text.tokenize(caption)
      for synonyms in (synthetic.CATEGORY_SYNONYMS[category],
                       synthetic.COLOUR_SYNONYMS[colour],
                       synthetic.SIZE_SYNONYMS[size]):
        assert any(_contains_phrase(tokens, s) for s in synonyms), (
            caption, synonyms)
    assert len(set(example["captions"])) == 5


def test_every_colour_size_and_position_appears():
  config = synthetic.synthetic_config(seed=0, **SMALL)
  examples = list(synthetic.generate_examples(config, "train"))
  for key, names in [("colour", synthetic.COLOUR_NAMES),
                     ("size", synthetic.SIZE_NAMES),
                     ("position", synthetic.POSITION_NAMES)]:
    assert {e[key] for e in examples} == set(range(len(names))), key


def test_main_object_colour_is_visible():
  # Some pixel must be close to the named colour (objects get +-10 jitter per
  # channel, anti-aliased edges blend, so 40 is a loose but telling bound).
  config = synthetic.synthetic_config(seed=0, **SMALL)
  for example in synthetic.generate_examples(config, "test"):
    rgb = np.asarray(synthetic.COLOUR_RGB[example["colour"]], np.float32)
    distance = np.abs(example["image"].astype(np.float32) - rgb).max(axis=-1)
    assert distance.min() < 40, example["id"]


def test_main_object_is_where_the_caption_says():
  # Without distractors, the bright pixels are the object's; for shapes that
  # are symmetric in both axes their bounding-box centre is the box centre,
  # which must be nearest the anchor of the named cell (anchors are computed
  # here from the documented layout: box side = fraction x image side, kept
  # 1 px inside the image; jitter is at most 0.04 x 32 = 1.3 px).
  symmetric = {"circle", "square", "plus", "ring", "diamond", "bar",
               "ellipse", "xmark"}
  fractions = {"small": 0.28, "medium": 0.41, "large": 0.56}
  config = synthetic.synthetic_config(seed=0, max_distractors=0, **SMALL)
  checked = 0
  for example in synthetic.generate_examples(config, "train"):
    if synthetic.CATEGORY_NAMES[example["category"]] not in symmetric:
      continue
    bright = example["image"].astype(np.float32).max(axis=-1) > 170
    ys, xs = np.nonzero(bright)
    side = fractions[synthetic.SIZE_NAMES[example["size"]]] * 32
    anchors = np.array([side / 2 + 1, 16, 32 - side / 2 - 1])
    row, column = divmod(example["position"], 3)
    for pixels, cell in [(ys, row), (xs, column)]:
      centre = (pixels.min() + pixels.max() + 1) / 2
      assert np.argmin(abs(anchors - centre)) == cell, example["id"]
      assert abs(anchors[cell] - centre) < 2.5, example["id"]
    checked += 1
  assert checked >= 30


def test_different_parameters_do_not_collide(data_root):
  shared = str(data_root / "shared")
  first = synthetic.load_synthetic(shared, seed=0, **SMALL)
  bigger = dict(SMALL, train_per_category=7)
  second = synthetic.load_synthetic(shared, seed=0, **bigger)
  assert len(first["train"]) == 12 * 6
  assert len(second["train"]) == 12 * 7
  # Per-example seeding: the larger dataset starts with the same examples.
  np.testing.assert_array_equal(first["train"].images[0],
                                second["train"].images[0])
  names = {synthetic.synthetic_config(**params).name
           for params in (SMALL, bigger, dict(SMALL, seed=1),
                          dict(SMALL, image_size=48),
                          dict(SMALL, max_distractors=0),
                          dict(SMALL, num_categories=8),
                          dict(SMALL, val_per_category=3),
                          dict(SMALL, test_per_category=4))}
  assert len(names) == 8


def test_image_size_and_fewer_categories(tmp_path):
  splits = synthetic.load_synthetic(
      str(tmp_path), image_size=48, num_categories=4, train_per_category=2,
      val_per_category=1, test_per_category=1, max_distractors=2)
  assert splits["train"].images.shape == (8, 48, 48, 3)
  assert set(splits["test"].categories.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [
    dict(image_size=8), dict(num_categories=1),
    dict(num_categories=len(synthetic.CATEGORY_NAMES) + 1),
    dict(train_per_category=0), dict(max_distractors=-1), dict(seed=-1)])
def test_invalid_parameters_raise(bad):
  with pytest.raises(ValueError):
    synthetic.synthetic_config(**bad)
  # The config schema refuses the same values before any work, except
  # image_size: a key every pixel source reads, checked here when rendering.
  ((key, value),) = bad.items()
  if key != "image_size":
    (problem,) = schema.problems(synthetic.CONFIG_KEYS, {key: value}, "data.")
    assert f"data.{key}={value}" in problem


def test_registered_source_is_load_synthetic(data_root, small):
  # The default experiment's data, through the registry, is load_synthetic's.
  config = schema.defaults(registry.config_keys())
  config.update(SMALL)
  dataset = registry.lookup("synthetic").load(config, str(data_root / "a"))
  assert dataset.category_names == synthetic.CATEGORY_NAMES[:12]
  for name in ("train", "val", "test"):
    got, want = dataset.splits[name], small[name]
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.categories, want.categories)
    assert got.captions == want.captions


def test_category_names():
  assert len(synthetic.CATEGORY_NAMES) >= 12
  assert len(set(synthetic.CATEGORY_NAMES)) == len(synthetic.CATEGORY_NAMES)
  assert len(synthetic.COLOUR_NAMES) >= 8
