"""Real data sources on tiny fixtures in their real on-disk formats.

Each fixture is written into a temporary directory exactly as the real
download lays it out (Karpathy JSON, COCO annotation JSON, VG JSON, JPEGs,
VSE++ .npy/.txt files) and goes through the real TFDS builders and loaders.
Expected values are worked out by hand from the fixture definitions below.
"""

import importlib
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image
import pytest

from ccr_jax.data import coco
from ccr_jax.data import flickr30k
from ccr_jax.data import images
from ccr_jax.data import pipeline
from ccr_jax.data import precomputed
from ccr_jax.data import registry
from ccr_jax.data import tasks
from ccr_jax.data import text
from ccr_jax.data import visual_genome
from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg="tiny"):
  if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
  return importlib.import_module(f"configs.{name}").get_config(arg)


# ----------------------------------------------------------------------------
# Images: even ids are 32x32 noise (compared exactly: stored as the original
# bytes, decoded at their own size), odd ids are non-square solid colours
# (compared by colour after the resize and crop).


def _colour(image_id):
  return np.array([(image_id * 40) % 256, 255 - (image_id * 25) % 256,
                   (image_id * 70) % 256], np.uint8)


def _pixels(image_id):
  if image_id % 2 == 0:
    return np.random.default_rng(image_id).integers(
        0, 256, (32, 32, 3), dtype=np.uint8)
  shape = (24, 40, 3) if image_id % 4 == 1 else (44, 30, 3)
  return np.broadcast_to(_colour(image_id), shape).copy()


def _write_image(path, image_id):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_pixels(image_id)).save(path, format="JPEG", quality=95)


def _write_image_bytes(image_id):
  """A file holding image `image_id`, in a fresh temporary directory."""
  path = os.path.join(tempfile.mkdtemp(), f"{image_id}.jpg")
  _write_image(path, image_id)
  return path


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _fixture_dirs(tmp_path_factory, name, write):
  """A manual dir written by `write` (-> {id: image path}) and a TFDS dir.

  Module-scoped: each source is built once in "tfds" and reused by its tests.
  """
  root = tmp_path_factory.mktemp(name)
  paths = write(str(root / "manual"))
  return dict(manual=str(root / "manual"), tfds=str(root / "tfds"),
              paths=paths)


def _check_images(view, ids, paths):
  """view[rows] and view[a:b] equal each image decoded on its own."""
  assert isinstance(view, tasks.LazyImages)
  assert view.shape == (len(ids), 32, 32, 3) and view.dtype == np.uint8
  assert len(view) == len(ids) and view.ndim == 4
  rows = np.array([len(ids) - 1, 0, min(1, len(ids) - 1), 0])  # a repeat
  by_rows = view[rows]
  by_slice = view[1:len(ids)]
  np.testing.assert_array_equal(by_slice, view[np.arange(1, len(ids))])
  np.testing.assert_array_equal(by_rows[1], by_rows[3])
  for got, row in [(by_rows[i], r) for i, r in enumerate(rows)] + [
      (by_slice[i], i + 1) for i in range(len(ids) - 1)]:
    image_id = int(ids[row])
    if image_id % 2 == 0:
      with Image.open(paths[image_id]) as image:
        np.testing.assert_array_equal(got, np.asarray(image.convert("RGB")))
    else:
      # A solid colour survives JPEG and resizing within a few levels.
      np.testing.assert_allclose(got.reshape(-1, 3).mean(0), _colour(image_id),
                                 atol=4)


# ----------------------------------------------------------------------------
# COCO fixture. (cocoid, Karpathy split, annotations as (category, area)).
# Expected tasks with configs/secoco.py's groups
# (1 vehicle/outdoor/accessory, 2 animal/sports, 3 kitchen/food/...):
_COCO_IMAGES = (
    (1, "train", [("car", 500)]),                      # task 1
    (2, "train", [("dog", 300), ("car", 200)]),        # task 2: 300 > 200
    (3, "train", [("pizza", 100)]),                    # task 3
    (4, "restval", [("person", 1000)]),                # no task: person only
    # Dominant category dog (100), but group 1 covers 60 + 60 = 120 > 100.
    (5, "restval", [("dog", 100), ("bench", 60), ("umbrella", 60)]),
    (6, "train", [("cat", 200), ("laptop", 200)]),     # tie -> task 2
    (7, "val", [("bus", 50)]),
    (8, "val", [("horse", 50)]),
    (9, "val", [("cake", 50)]),
    (10, "test", [("truck", 50)]),
    (11, "test", [("kite", 50)]),
    (12, "test", [("tv", 50), ("person", 900)]),       # task 3: person ignored
    (13, "test", []),                                  # no annotations
)
_COCO_TASK_IDS = {
    "train": [[1, 5], [2, 6], [3]], "val": [[7], [8], [9]],
    "test": [[10], [11], [12]]}


def _coco_caption(image_id, k):
  return f"Image {image_id} caption number {k}: a photo of thing {image_id}"


def _folder(image_id):
  return "train2014" if image_id <= 6 else "val2014"


def _coco_file(image_id):
  return f"COCO_{_folder(image_id)}_{image_id:012d}.jpg"


def write_coco(root):
  """The COCO manual dir; returns {cocoid: image path}."""
  paths, karpathy = {}, []
  captions = {"train2014": [], "val2014": []}
  instances = {"train2014": [], "val2014": []}
  categories = [dict(id=i + 1, name=n, supercategory=s)
                for i, (n, s) in enumerate(coco.COCO_CATEGORIES)]
  category_id = {c["name"]: c["id"] for c in categories}
  for image_id, split, annotations in _COCO_IMAGES:
    folder = _folder(image_id)
    paths[image_id] = os.path.join(root, folder, _coco_file(image_id))
    _write_image(paths[image_id], image_id)
    # 6 captions written in decreasing annotation id: the loader must keep
    # the 5 with the smallest ids (k = 0..4), not the first 5 in the file.
    for k in reversed(range(6)):
      captions[folder].append(dict(id=image_id * 100 + k, image_id=image_id,
                                   caption=_coco_caption(image_id, k)))
    for j, (name, area) in enumerate(annotations):
      instances[folder].append(dict(
          id=image_id * 100 + j, image_id=image_id, iscrowd=0, area=area,
          category_id=category_id[name], bbox=[0, 0, 1, 1]))
    karpathy.append(dict(
        filepath=folder, filename=_coco_file(image_id), cocoid=image_id,
        split=split, imgid=image_id,
        sentences=[dict(raw=f"karpathy {k}") for k in range(5)]))
  for folder in ("train2014", "val2014"):
    _write_json(os.path.join(root, "annotations", f"captions_{folder}.json"),
                dict(annotations=captions[folder]))
    _write_json(os.path.join(root, "annotations", f"instances_{folder}.json"),
                dict(annotations=instances[folder], categories=categories))
  _write_json(os.path.join(root, "dataset_coco.json"),
              dict(images=karpathy, dataset="coco"))
  return paths


@pytest.fixture(scope="module")
def coco_dirs(tmp_path_factory):
  return _fixture_dirs(tmp_path_factory, "coco", write_coco)


def _coco_data_config(dirs, **overrides):
  config = _config("secoco")
  config.data.manual_dir = dirs["manual"]
  config.data.update(overrides)
  return config.data


def test_coco_splits_captions_and_areas(coco_dirs):
  dataset = coco.load(_coco_data_config(coco_dirs), coco_dirs["tfds"])
  splits = dataset.splits
  # Karpathy restval (4, 5) joins train, after the train images.
  np.testing.assert_array_equal(splits["train"].ids, [1, 2, 3, 6, 4, 5])
  np.testing.assert_array_equal(splits["val"].ids, [7, 8, 9])
  np.testing.assert_array_equal(splits["test"].ids, [10, 11, 12, 13])
  for split in splits.values():
    for image_id, caps in zip(split.ids, split.captions):
      assert caps == tuple(_coco_caption(image_id, k) for k in range(5))
  areas = splits["train"].category_areas
  assert areas.shape == (6, 80) and areas.dtype == np.float32
  row = list(splits["train"].ids).index(5)
  names = coco.CATEGORY_NAMES
  expected = np.zeros(80, np.float32)
  expected[[names.index("dog"), names.index("bench"),
            names.index("umbrella")]] = [100, 60, 60]
  np.testing.assert_array_equal(areas[row], expected)
  # Dominant category: the largest area; -1 without annotations.
  assert splits["train"].categories[row] == names.index("dog")
  assert splits["test"].categories[-1] == -1
  assert dataset.category_aliases["animal"] == tuple(range(14, 24))
  without_restval = coco.load(_coco_data_config(coco_dirs, use_restval=False),
                              coco_dirs["tfds"])
  np.testing.assert_array_equal(without_restval.splits["train"].ids,
                                [1, 2, 3, 6])


def test_coco_tasks_by_dominant_group(coco_dirs):
  sequence = registry.load_task_sequence(_coco_data_config(coco_dirs),
                                      coco_dirs["tfds"])
  assert len(sequence.tasks) == 3
  for split, per_task in _COCO_TASK_IDS.items():
    got = [sorted(getattr(t, split).ids.tolist()) for t in sequence.tasks]
    assert got == per_task, split
  description = json.loads(json.dumps(sequence.describe()))
  assert description["assignment_rule"] == tasks.DOMINANT_GROUP_RULE
  assert "largest annotated area" in description["assignment_rule"]
  assert description["dataset"]["examples_in_no_task"] == dict(
      train=1, val=0, test=1)
  names = description["tasks"][1]["category_names"]
  assert "dog" in names and "kite" in names and "car" not in names
  # "person" (id 0) is in no group.
  assert description["unassigned_categories"] == [0]


def test_coco_single_task_keeps_every_image(coco_dirs):
  config = _config("coco_vsepp")
  config.data.manual_dir = coco_dirs["manual"]
  sequence = registry.load_task_sequence(config.data, coco_dirs["tfds"])
  (task,) = sequence.tasks
  assert (len(task.train), len(task.val), len(task.test)) == (6, 3, 4)
  assert sequence.describe()["assignment_rule"] == tasks.SINGLE_TASK_RULE


def test_coco_lazy_images_equal_eager_decode(coco_dirs):
  dataset = coco.load(_coco_data_config(coco_dirs), coco_dirs["tfds"])
  for split in dataset.splits.values():
    _check_images(split.images, split.ids, coco_dirs["paths"])
  # Subsets and concatenations stay lazy and read the same pixels.
  train, test = dataset.splits["train"], dataset.splits["test"]
  both = tasks.Split.concatenate([train.subset(np.array([4, 0])), test])
  assert isinstance(both.images, tasks.LazyImages)
  np.testing.assert_array_equal(both.images[:2], train.images[[4, 0]])
  np.testing.assert_array_equal(both.images[2:], test.images[:])


def test_coco_built_dataset_needs_no_manual_dir(coco_dirs):
  coco.load(_coco_data_config(coco_dirs), coco_dirs["tfds"])  # built
  dataset = coco.load(_coco_data_config(coco_dirs, manual_dir=""),
                      coco_dirs["tfds"])
  assert len(dataset.splits["val"]) == 3


def test_coco_stored_size_resizes_at_build(coco_dirs, tmp_path):
  dataset = coco.load(_coco_data_config(coco_dirs, stored_image_size=16),
                      str(tmp_path))
  images = dataset.splits["val"].images
  assert images.shape == (3, 32, 32, 3)  # stored at 16, read at 32
  for got, image_id in zip(images[:], dataset.splits["val"].ids):
    if image_id % 2:
      np.testing.assert_allclose(got.reshape(-1, 3).mean(0),
                                 _colour(image_id), atol=4)


def test_coco_missing_or_incomplete_manual_dir(coco_dirs, tmp_path):
  with pytest.raises(FileNotFoundError, match="manual_dir(.|\n)*dataset_coco.json"
                     "(.|\n)*caption_datasets.zip"):
    coco.load(_coco_data_config(coco_dirs, manual_dir=""), str(tmp_path))
  manual = str(tmp_path / "manual")
  shutil.copytree(coco_dirs["manual"], manual)
  os.remove(os.path.join(manual, "annotations", "instances_val2014.json"))
  with pytest.raises(FileNotFoundError,
                     match=r"incomplete; missing \['annotations/instances_val"
                     r"2014.json'\](.|\n)*annotations_trainval2014.zip"):
    coco.load(_coco_data_config(coco_dirs, manual_dir=manual),
              str(tmp_path / "tfds"))
  shutil.copy(os.path.join(coco_dirs["manual"], "annotations",
                           "instances_val2014.json"),
              os.path.join(manual, "annotations"))
  os.remove(os.path.join(manual, "val2014", _coco_file(8)))
  with pytest.raises(FileNotFoundError, match=r"1 of 13 images(.|\n)*"
                     "COCO_val2014_000000000008.jpg"):
    coco.load(_coco_data_config(coco_dirs, manual_dir=manual),
              str(tmp_path / "tfds"))


@pytest.mark.parametrize("stored_image_size", [0, 16])
def test_truncated_jpeg_names_the_file_in_one_line(coco_dirs, tmp_path,
                                                   stored_image_size):
  # stored_image_size=0 stores the file's bytes as they are: the image must
  # still be decoded once at build time, or the error would only come in a
  # training batch, far from the file.
  manual = str(tmp_path / "manual")
  shutil.copytree(coco_dirs["manual"], manual)
  path = os.path.join(manual, "val2014", _coco_file(8))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  config = _coco_data_config(coco_dirs, manual_dir=manual,
                             stored_image_size=stored_image_size)
  with pytest.raises(ValueError) as error:
    coco.load(config, str(tmp_path / "tfds"))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(path + ": cannot read this image")
  assert "truncated" in message and "extract it again" in message
  # What the message says to do works: TFDS kept nothing of the failed build.
  with open(path, "wb") as f:
    f.write(data)
  assert len(coco.load(config, str(tmp_path / "tfds")).splits["val"]) == 3


def test_unreadable_image_names_the_file(flickr_dirs, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(flickr_dirs["manual"], manual)
  path = os.path.join(manual, "flickr30k-images", "2001.jpg")
  with open(path, "wb") as f:
    f.write(b"<html>Not Found</html>")  # what a failed download leaves
  config = _config("flickr30k_vsepp")
  config.data.manual_dir = manual
  with pytest.raises(ValueError, match=r"^[^\n]*2001\.jpg: cannot read this "
                     r"image \(UnidentifiedImageError"):
    flickr30k.load(config.data, str(tmp_path / "tfds"))


def test_damaged_stored_image_names_its_record():
  class Records:  # a TFDS data source whose second record is damaged
    def __init__(self, records):
      self.records = records

    def __len__(self):
      return len(self.records)

    def __getitems__(self, rows):
      return [self.records[r] for r in rows]

  good = images.encode_image_file(_write_image_bytes(3), 0)
  source = images.JpegRecords(
      Records([dict(id=3, image=good), dict(id=77, image=good[:40])]), 8, 1,
      where="/tfds/ccr_coco/original/1.0.0 (val split)")
  assert source.read(np.array([0])).shape == (1, 8, 8, 3)
  with pytest.raises(ValueError, match=r"^/tfds/ccr_coco/original/1.0.0 \(val "
                     r"split\), image id 77: cannot decode .* delete it from "
                     r"data_dir"):
    source.read(np.array([0, 1]))


def test_coco_json_syntax_error_names_the_file(coco_dirs, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(coco_dirs["manual"], manual)
  path = os.path.join(manual, "dataset_coco.json")
  with open(path, "w") as f:
    # A trailing comma: the "}" after it is line 2, column 21.
    f.write('{"images": [\n  {"split": "train",}\n]}')
  with pytest.raises(ValueError, match=re.escape(path) + r" is not valid JSON "
                     r"\(.* at line 2, column 21\)"):
    coco.load(_coco_data_config(coco_dirs, manual_dir=manual),
              str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------
# Flickr30K fixture: photo id -> Karpathy split.
_F30K_IMAGES = ((1000, "train"), (1002, "train"), (1001, "train"),
                (2001, "val"), (3000, "test"), (3001, "test"))


def write_flickr30k(root):
  paths, images = {}, []
  for image_id, split in _F30K_IMAGES:
    paths[image_id] = os.path.join(root, "flickr30k-images", f"{image_id}.jpg")
    _write_image(paths[image_id], image_id)
    images.append(dict(filename=f"{image_id}.jpg", split=split,
                       imgid=len(images), sentences=[
                           dict(raw=f"Flickr photo {image_id}, sentence {k}.")
                           for k in range(5)]))
  _write_json(os.path.join(root, "dataset_flickr30k.json"),
              dict(images=images, dataset="flickr30k"))
  return paths


@pytest.fixture(scope="module")
def flickr_dirs(tmp_path_factory):
  return _fixture_dirs(tmp_path_factory, "flickr30k", write_flickr30k)


def test_flickr30k_builds_and_reads(flickr_dirs):
  config = _config("flickr30k_vsepp")
  config.data.manual_dir = flickr_dirs["manual"]
  dataset = flickr30k.load(config.data, flickr_dirs["tfds"])
  splits = dataset.splits
  np.testing.assert_array_equal(splits["train"].ids, [1000, 1001, 1002])
  np.testing.assert_array_equal(splits["val"].ids, [2001])
  np.testing.assert_array_equal(splits["test"].ids, [3000, 3001])
  assert splits["test"].captions[1] == tuple(
      f"Flickr photo 3001, sentence {k}." for k in range(5))
  assert dataset.category_names == ("all",)
  for split in splits.values():
    np.testing.assert_array_equal(split.categories, 0)
    _check_images(split.images, split.ids, flickr_dirs["paths"])
  sequence = registry.load_task_sequence(config.data, flickr_dirs["tfds"])
  assert [len(sequence.tasks[0].train), len(sequence.tasks[0].test)] == [3, 2]


def test_flickr30k_missing_manual_dir(tmp_path):
  config = _config("flickr30k_vsepp")
  config.data.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"missing \['dataset_flickr30k"
                     r".json', 'flickr30k-images/'\](.|\n)*DenotationGraph"):
    registry.load_task_sequence(config.data, str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------
# Visual Genome fixture.


def _regions(image_id, phrases):
  """Regions whose areas decrease in list order (largest first)."""
  return [dict(region_id=image_id * 100 + k, image_id=image_id, phrase=p,
               x=0, y=0, width=100 - k, height=10)
          for k, p in enumerate(phrases)]


def _good_phrases(image_id):
  return [f"region {k} of picture {image_id}" for k in range(5)]


# image id -> (objects as (synsets, w, h), phrases); ids % 20: 0 test, 1 val.
# Expected tasks with configs/sevige.py's groups (animals / vehicles / indoor).
_VG_IMAGES = {
    2: ([(["dog.n.01"], 10, 10)], None),                  # train, task 1
    3: ([(["car.n.01"], 10, 10), (["dog.n.01"], 5, 5)], None),   # task 2
    4: ([(["chair.n.01"], 10, 10), (["man.n.01"], 50, 50)], None),  # task 3
    # Two objects of one category add up (dog 6x6 + 6x6 = 72 > car 64).
    5: ([(["dog.n.01"], 6, 6), (["dog.n.01"], 6, 6), (["car.n.01"], 8, 8)],
        None),                                            # task 1
    6: ([(["sky.n.01"], 100, 100)], None),                # no task
    7: ([(["dog.n.01"], 10, 10)], ["a dog", "dog"] * 3),  # too few phrases
    # "table.n.01" is one of the table category's alternative synsets.
    8: ([(["table.n.01"], 10, 10)], None),                # task 3
    9: ([], None),                                        # no objects: no task
    21: ([(["horse.n.01"], 10, 10)], None),               # val
    41: ([(["bus.n.01"], 10, 10)], None),
    61: ([(["bed.n.01"], 10, 10)], None),
    20: ([(["cat.n.01"], 10, 10)], None),                 # test
    40: ([(["boat.n.01"], 10, 10)], None),
    60: ([(["pizza.n.01"], 10, 10)], None),
}
_VG_TASK_IDS = {"train": [[2, 5], [3], [4, 8]], "val": [[21], [41], [61]],
                "test": [[20], [40], [60]]}


def write_visual_genome(root):
  paths, image_data, objects, regions = {}, [], [], []
  for image_id, (objs, phrases) in _VG_IMAGES.items():
    folder = "VG_100K_2" if image_id % 2 else "VG_100K"
    paths[image_id] = os.path.join(root, folder, f"{image_id}.jpg")
    _write_image(paths[image_id], image_id)
    image_data.append(dict(
        image_id=image_id, width=32, height=32, coco_id=None, flickr_id=None,
        url=f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"))
    objects.append(dict(image_id=image_id, objects=[
        dict(object_id=image_id * 100 + k, x=0, y=0, w=w, h=h, synsets=s,
             names=[s[0].split(".")[0]]) for k, (s, w, h) in enumerate(objs)]))
    regions.append(dict(id=image_id, regions=_regions(
        image_id, phrases or _good_phrases(image_id))))
  for name, data in (("image_data", image_data), ("objects", objects),
                     ("region_descriptions", regions)):
    _write_json(os.path.join(root, f"{name}.json"), data)
  return paths


@pytest.fixture(scope="module")
def vg_dirs(tmp_path_factory):
  return _fixture_dirs(tmp_path_factory, "visual_genome", write_visual_genome)


def test_vg_image_texts_rule():
  regions = _regions(1, [
      "A man   riding a horse",   # largest; whitespace collapsed
      "a man riding a horse.",     # same tokens: a repeat
      "tree",                       # 1 token: an object name
      "blue sky",                   # 2 tokens
      "white clouds in the sky", "a red car parked", "green grass field",
      "the sixth description here"])
  assert visual_genome.image_texts(regions) == [
      "A man riding a horse", "white clouds in the sky", "a red car parked",
      "green grass field", "the sixth description here"]
  # Ties in area go to the lower region id, whatever the list order.
  tied = [dict(region_id=9, phrase="second by region id", width=5, height=5),
          dict(region_id=3, phrase="first by region id", width=5, height=5)]
  assert visual_genome.image_texts(tied) == ["first by region id",
                                             "second by region id"]


def test_vg_builds_splits_and_assigns_tasks(vg_dirs):
  config = _config("sevige")
  config.data.manual_dir = vg_dirs["manual"]
  dataset = visual_genome.load(config.data, vg_dirs["tfds"])
  splits = dataset.splits
  # Image 7 has too few distinct phrases of 3+ tokens: left out.
  np.testing.assert_array_equal(splits["train"].ids, [2, 3, 4, 5, 6, 8, 9])
  np.testing.assert_array_equal(splits["val"].ids, [21, 41, 61])
  np.testing.assert_array_equal(splits["test"].ids, [20, 40, 60])
  assert splits["val"].captions[0] == tuple(_good_phrases(21))
  categories = dataset.category_names
  areas = splits["train"].category_areas
  assert areas[3, categories.index("dog.n.01")] == 72
  assert areas[3, categories.index("car.n.01")] == 64
  assert areas[4].sum() == 0  # sky only
  sequence = registry.load_task_sequence(config.data, vg_dirs["tfds"])
  for split, per_task in _VG_TASK_IDS.items():
    got = [sorted(getattr(t, split).ids.tolist()) for t in sequence.tasks]
    assert got == per_task, split
  description = sequence.describe()
  assert description["dataset"]["examples_in_no_task"]["train"] == 2
  assert "region descriptions" in description["dataset"]["captions"]
  assert description["dataset"]["images_per_category"]["dog.n.01"] == 3
  _check_images(splits["train"].images, splits["train"].ids, vg_dirs["paths"])


def test_vg_incomplete_manual_dir(vg_dirs, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(vg_dirs["manual"], manual)
  os.remove(os.path.join(manual, "objects.json"))
  config = _config("sevige")
  config.data.manual_dir = manual
  with pytest.raises(FileNotFoundError,
                     match=r"missing \['objects.json'\](.|\n)*visualgenome"):
    visual_genome.load(config.data, str(tmp_path / "tfds"))


def test_vg_json_syntax_error_names_the_file(vg_dirs, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(vg_dirs["manual"], manual)
  path = os.path.join(manual, "region_descriptions.json")
  with open(path) as f:
    data = f.read()
  with open(path, "w") as f:
    f.write(data[:-10])  # cut short, as an interrupted extraction leaves it
  config = _config("sevige")
  config.data.manual_dir = manual
  with pytest.raises(ValueError, match=re.escape(path) + r" is not valid JSON "
                     r"\(.* at line 1, column \d+\): fix or replace"):
    visual_genome.load(config.data, str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------
# Precomputed features (VSE++ / SCAN layout).


def _features(n, shape, offset):
  """Row i is filled with offset + i, to track rows."""
  values = offset + np.arange(n, dtype=np.float32)
  return np.broadcast_to(values.reshape((n,) + (1,) * len(shape)),
                         (n,) + shape).astype(np.float32)


def write_precomputed(root, categories_file=True):
  """train: [4, 6] plain; dev: 3 images repeated 5x; test: [3, 2, 6] regions."""
  os.makedirs(root)
  np.save(os.path.join(root, "train_ims.npy"), _features(4, (6,), 0))
  np.save(os.path.join(root, "dev_ims.npy"),
          np.repeat(_features(3, (6,), 100), 5, axis=0))
  np.save(os.path.join(root, "test_ims.npy"), _features(3, (2, 6), 200))
  ids = {"train": [1, 2, 3, 4], "dev": [7, 8, 9], "test": [10, 11, 12]}
  for prefix, split_ids in ids.items():
    with open(os.path.join(root, f"{prefix}_caps.txt"), "w") as f:
      f.writelines(f"caption {k} of image {i}\n"
                   for i in split_ids for k in range(5))
  with open(os.path.join(root, "train_ids.txt"), "w") as f:
    f.writelines(f"{i}\n" for i in ids["train"])
  with open(os.path.join(root, "dev_ids.txt"), "w") as f:  # one per caption
    f.writelines(f"{i}\n" for i in ids["dev"] for _ in range(5))
  with open(os.path.join(root, "test_ids.txt"), "w") as f:
    f.writelines(f"{i}\n" for i in ids["test"])
  if categories_file:
    # Image 2: weights 1 (cat a) + 2 (cat b) -> group of b; image 4: none.
    labels = {"1": {"0": 5.0}, "2": {"0": 1.0, "2": 2.0}, "3": [1],
              "7": 0, "8": [2], "9": {"1": 1.0},
              "10": 2, "11": 0, "12": 1}
    _write_json(os.path.join(root, "categories.json"),
                dict(category_names=["a", "b", "c"], images=labels))
  return root


def test_precomputed_layouts_and_ids(tmp_path):
  root = write_precomputed(str(tmp_path / "precomp"))
  config = _config("f30k_precomp")
  config.data.features_dir = root
  dataset = precomputed.load(config.data)
  train, val, test = (dataset.splits[s] for s in ("train", "val", "test"))
  np.testing.assert_array_equal(train.ids, [1, 2, 3, 4])
  np.testing.assert_array_equal(val.ids, [7, 8, 9])
  assert train.captions[2] == tuple(f"caption {k} of image 3"
                                    for k in range(5))
  # Memory-mapped, read lazily; the repeated dev rows collapse to one each.
  assert isinstance(train.images, tasks.LazyImages)
  assert isinstance(train.images.sources[0].array, np.memmap)
  assert val.images.shape == (3, 6) and test.images.shape == (3, 2, 6)
  np.testing.assert_array_equal(val.images[[2, 0]][:, 0], [102, 100])
  np.testing.assert_array_equal(test.images[1:][:, 0, 0], [201, 202])
  np.testing.assert_array_equal(train.images[np.array([True, False, True,
                                                       False])][:, 0], [0, 2])
  assert dataset.category_names == ("all",)  # no categories given
  sequence = registry.load_task_sequence(config.data, "")
  assert len(sequence.tasks) == 1 and len(sequence.tasks[0].val) == 3


def test_precomputed_categories_file_assigns_tasks(tmp_path):
  root = write_precomputed(str(tmp_path / "precomp"))
  config = _config("f30k_precomp")
  config.data.features_dir = root
  config.data.categories_file = os.path.join(root, "categories.json")
  config.data.num_tasks = 2
  config.data.task_categories = [["a"], ["b", "c"]]
  sequence = registry.load_task_sequence(config.data, "")
  got = {s: [sorted(getattr(t, s).ids.tolist()) for t in sequence.tasks]
         for s in ("train", "val", "test")}
  assert got == {"train": [[1], [2, 3]], "val": [[7], [8, 9]],
                 "test": [[11], [10, 12]]}


def test_precomputed_coco_instances_through_ids(tmp_path, coco_dirs):
  root = write_precomputed(str(tmp_path / "precomp"), categories_file=False)
  config = _config("coco_precomp", "secoco,tiny")
  config.data.features_dir = root
  config.data.split_prefixes = {"train": "train", "val": "dev",
                                "test": "test"}
  config.data.instances_files = tuple(
      os.path.join(coco_dirs["manual"], "annotations", f"instances_{s}.json")
      for s in ("train2014", "val2014"))
  dataset = precomputed.load(config.data)
  assert dataset.category_names == coco.CATEGORY_NAMES
  # Ids are COCO ids of the COCO fixture: image 2 has dog 300 and car 200.
  areas = dataset.splits["train"].category_areas
  assert areas[1, coco.CATEGORY_NAMES.index("dog")] == 300
  sequence = registry.load_task_sequence(config.data, "")
  assert [sorted(t.train.ids.tolist()) for t in sequence.tasks] == [
      [1], [2], [3]]  # 4 is person-only: no task
  assert [t.val.ids.tolist() for t in sequence.tasks] == [[7], [8], [9]]


@pytest.mark.parametrize("case, message", [
    ("count", r"has 7 rows .* 15 captions"),
    ("repeat", r"rows 0..4 differ"),
    ("ids", r"3 ids for 4 images"),
    ("missing", r"missing \['test_ims.npy'\](.|\n)*vsepp"),
])
def test_precomputed_bad_files_raise(tmp_path, case, message):
  root = write_precomputed(str(tmp_path / "precomp"))
  if case == "count":
    np.save(os.path.join(root, "test_ims.npy"), _features(7, (6,), 0))
  elif case == "repeat":
    np.save(os.path.join(root, "dev_ims.npy"), _features(15, (6,), 0))
  elif case == "ids":
    with open(os.path.join(root, "train_ids.txt"), "w") as f:
      f.write("1\n2\n3\n")
  else:
    os.remove(os.path.join(root, "test_ims.npy"))
  config = _config("f30k_precomp")
  config.data.features_dir = root
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    precomputed.load(config.data)


# ----------------------------------------------------------------------------
# LazyImages on its own.


def test_lazy_images_indexing_matches_numpy():
  array = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  other = -np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  view = tasks.LazyImages.concatenate(
      [tasks.LazyImages.of(tasks.ArrayRows(array)).take(np.array([9, 2, 5])),
       other])
  eager = np.concatenate([array[[9, 2, 5]], other])
  assert view.shape == eager.shape and len(view) == 7
  for key in (np.array([6, 0, 0, 3]), slice(1, 5), slice(None, None, -2),
              np.array([], np.int64), 4, -1):
    np.testing.assert_array_equal(view[key], eager[key])
  np.testing.assert_array_equal(np.asarray(view), eager)
  np.testing.assert_array_equal(view.take(np.array([1, 4]))[:], eager[[1, 4]])
  with pytest.raises(IndexError):
    view[np.array([7])]
  # Plain arrays stay plain arrays (the synthetic path is unchanged).
  assert type(tasks.concatenate_images([array, other])) is np.ndarray
  assert type(tasks.take_rows(array, np.array([1]))) is np.ndarray


# ----------------------------------------------------------------------------
# Every new config, shrunk and pointed at its fixture, down to batches.


def _pointed(name, arg, coco_dirs, flickr_dirs, vg_dirs, tmp_path):
  config = _config(name, arg)
  dirs = {"coco_vsepp": coco_dirs, "secoco": coco_dirs,
          "flickr30k_vsepp": flickr_dirs, "sevige": vg_dirs}.get(name)
  if dirs:
    config.data.manual_dir = dirs["manual"]
    config.data.data_dir = dirs["tfds"]
  else:
    root = write_precomputed(str(tmp_path / "precomp"),
                             categories_file=False)
    config.data.features_dir = root
    config.data.split_prefixes = {"train": "train", "val": "dev",
                                  "test": "test"}
    if "secoco" in arg:
      config.data.instances_files = tuple(os.path.join(
          coco_dirs["manual"], "annotations", f"instances_{s}.json")
                                          for s in ("train2014", "val2014"))
  return config


@pytest.mark.parametrize("name, arg, num_tasks, image_shape", [
    ("coco_vsepp", "tiny", 1, (32, 32, 3)),
    ("secoco", "tiny", 3, (32, 32, 3)),
    ("flickr30k_vsepp", "tiny", 1, (32, 32, 3)),
    ("sevige", "tiny", 3, (32, 32, 3)),
    ("coco_precomp", "tiny", 1, (6,)),
    ("coco_precomp", "secoco,tiny", 3, (6,)),
    ("f30k_precomp", "tiny", 1, (6,)),
])
def test_config_smoke(name, arg, num_tasks, image_shape, coco_dirs,
                      flickr_dirs, vg_dirs, tmp_path):
  config = _pointed(name, arg, coco_dirs, flickr_dirs, vg_dirs, tmp_path)
  assert config.data.name in registry.names()
  assert config.model.image_tower in (
      ("precomputed",) if config.data.name == "precomputed"
      else ("resnet18", "resnet50", "resnet152"))
  sequence = registry.load_task_sequence(config.data, config.data.data_dir)
  assert len(sequence.tasks) == config.data.num_tasks == num_tasks
  json.dumps(sequence.describe())
  # As run/setup.py's build_setup does: vocabulary from training captions only.
  vocab = text.build_vocabulary(
      (c for t in sequence.tasks for caps in t.train.captions for c in caps),
      min_count=config.data.vocab_min_count)
  test_only = {w for t in sequence.tasks for caps in t.test.captions
               for c in caps for w in text.tokenize(c)} - {
                   w for t in sequence.tasks for caps in t.train.captions
                   for c in caps for w in text.tokenize(c)}
  assert not test_only & set(vocab.words)
  encoded = [pipeline.encode_split(t.train, vocab,
                                   config.data.max_caption_len)[0]
             for t in sequence.tasks]
  pool = pipeline.concatenate(encoded)
  memory = pipeline.subset(encoded[0], np.array([0]))
  assert isinstance(pool.images, tasks.LazyImages)
  assert isinstance(memory.images, tasks.LazyImages)
  batch = pipeline.mixed_batch(pool, memory, config.train.batch_size, 0.25,
                               seed=0, task=0, step=0)
  assert batch["images"].shape == (config.train.batch_size,) + image_shape
  assert batch["tokens"].shape == (config.train.batch_size,
                                   config.data.max_caption_len)
  rows = batch["image_ids"][:3]  # current-task rows of `pool`
  np.testing.assert_array_equal(batch["images"][:3], pool.images[rows])


_TRAINED_CONFIGS = [
    ("coco_vsepp", "tiny", "gru"),
    ("secoco", "tiny", "gru"),
    ("flickr30k_vsepp", "tiny", "gru"),
    ("sevige", "tiny", "gru"),
    ("coco_precomp", "tiny", "gru"),
    ("coco_precomp", "secoco,tiny", "gru"),
    ("f30k_precomp", "tiny", "gru"),
    # The pretrained text tower: its own tokenizer, weights from the package.
    ("f30k_precomp", "tiny", "minilm"),
]


def _r1_bounds(path, direction):
  """R@1 (%) of a saved query/gallery pair: (ties as misses, ties as hits).

  Recomputed with NumPy in float64 from the saved embeddings; the index
  scored in float32, so scores within 1e-5 of each other count as ties.
  """
  with np.load(path) as f:
    q, g, t2i = (f[k] for k in ("query_emb", "gallery_emb", "text_to_image"))
  scores = q.astype(np.float64) @ g.astype(np.float64).T
  if direction == "t2i":  # query i's image is gallery row t2i[i]
    own = np.arange(len(g))[None, :] == t2i[:, None]
  else:  # gallery caption j belongs to query image t2i[j]
    own = t2i[None, :] == np.arange(len(q))[:, None]
  best_own = np.where(own, scores, -np.inf).max(axis=1)
  best_other = np.where(own, -np.inf, scores).max(axis=1)
  return (100 * np.mean(best_own > best_other + 1e-5),
          100 * np.mean(best_own >= best_other - 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("name, arg, text_tower", _TRAINED_CONFIGS)
def test_config_trains_two_steps_and_evaluates(name, arg, text_tower, coco_dirs,
                                               flickr_dirs, vg_dirs, tmp_path):
  """Every real config, shrunk onto its fixture, through the whole experiment."""
  config = _pointed(name, arg, coco_dirs, flickr_dirs, vg_dirs, tmp_path)
  config.model.text_tower = text_tower
  if text_tower == "minilm":
    config.model.freeze_text_backbone = True
  config.eval.save_embeddings = True
  workdir = str(tmp_path / "workdir")
  results = loop.train_and_evaluate(config, workdir)
  assert results["tasks_completed"] == config.data.num_tasks
  assert results["config"]["train"]["steps_per_task"] == 2
  # Every task-aware recall after the last task, recomputed from the saved
  # embeddings; each gallery is exactly its task's fixture test images.
  sequence = registry.load_task_sequence(config.data, config.data.data_dir)
  last = config.data.num_tasks
  aware = results["metrics"]["fixed"]["task_aware"]
  emb_dir = os.path.join(workdir, "embeddings")
  with open(os.path.join(emb_dir, "manifest.json")) as f:
    entries = [e for e in json.load(f) if e["scope"] == "task_aware"
               and e["regime"] == "fixed" and e["query_snapshot"] == last]
  assert sorted((e["direction"], e["task"]) for e in entries) == sorted(
      (d, j) for d in ("i2t", "t2i") for j in range(1, last + 1))
  for entry in entries:
    test_images = len(sequence.tasks[entry["task"] - 1].test)
    with np.load(os.path.join(emb_dir, entry["file"])) as f:
      sizes = (len(f["query_emb"]), len(f["gallery_emb"]))
    assert sizes == ((5 * test_images, test_images) if entry["direction"] == "t2i"
                     else (test_images, 5 * test_images)), entry
    r1 = aware[entry["direction"]]["r1"][last - 1][entry["task"] - 1]
    assert r1 == entry["r1"]
    low, high = _r1_bounds(os.path.join(emb_dir, entry["file"]),
                           entry["direction"])
    assert low <= r1 <= high, (entry, low, high)
  if text_tower == "minilm":
    assert results["vocabulary_size"] == 30522
    # The snapshot records the tokenizer: evaluation from it tokenises the same.
    setup = setup_lib.build_setup(config, workdir)
    setup_lib.load_snapshot(setup, config.data.num_tasks)
