"""Broken or changed data files: one-line errors naming the file and the fix.

Each test writes a tiny manual dir or features dir in the real format (the
writers of test_real_data.py) and runs the real load path.
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

from ccr_jax.data import coco
from ccr_jax.data import flickr30k
from ccr_jax.data import images
from ccr_jax.data import manual
from ccr_jax.data import registry
from ccr_jax.data import visual_genome
import test_real_data as real

_config = real._config  # pylint: disable=protected-access


def _flickr(tmp_path, edit=None):
  """A Flickr30K manual dir (`edit` changes its JSON) and its data config."""
  manual_dir = str(tmp_path / "manual")
  real.write_flickr30k(manual_dir)
  if edit:
    _edit_json(os.path.join(manual_dir, "dataset_flickr30k.json"), edit)
  config = _config("flickr30k_vsepp")
  config.data.manual_dir = manual_dir
  return config.data


def _edit_json(path, edit):
  with open(path) as f:
    data = json.load(f)
  edit(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _val_to_test(data):
  for image in data["images"]:
    if image["split"] == "val":
      image["split"] = "test"


def _test_to_val(data):
  for image in data["images"]:
    if image["filename"] == "2001.jpg":
      image["split"] = "val"


def _built(tmp_path):
  """The Flickr30K dataset folders under tmp_path/tfds, temporary ones too."""
  parent = tmp_path / "tfds" / "ccr_flickr30k" / "original"
  return [p for p in os.listdir(parent) if "1.0.0" in p] if parent.exists(
  ) else []


def _record(tmp_path):
  """The source key file of the Flickr30K dataset built under tmp_path/tfds."""
  return str(tmp_path / "tfds" / "ccr_flickr30k" / "original" / "1.0.0" /
             manual.SOURCES_FILE)


# ----------------------------------------------------------------------------
# Bad images.


def test_damaged_stored_image_names_its_source_file():
  class Records:  # A TFDS data source whose record holds damaged bytes.
    def __len__(self):
      return 1

    def __getitems__(self, rows):
      return [dict(id=77, image=b"\xff\xd8 cut short",
                   file_name=b"COCO_val2014_000000000077.jpg")]

  source = images.JpegRecords(Records(), 8, 1, where="/tfds/ccr_coco/s256/"
                              "1.0.0 (val split)")
  with pytest.raises(ValueError) as error:
    source.read(np.array([0]))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("/tfds/ccr_coco/s256/1.0.0 (val split), image id "
                            "77 (COCO_val2014_000000000077.jpg): cannot decode")


# ----------------------------------------------------------------------------
# JSON syntax errors, in every annotation file (dataset_coco.json and
# region_descriptions.json: test_real_data.py).


@pytest.mark.parametrize("source, name", [
    ("coco", "annotations/captions_val2014.json"),
    ("coco", "annotations/instances_train2014.json"),
    ("flickr30k", "dataset_flickr30k.json"),
    ("visual_genome", "objects.json"),
    ("visual_genome", "image_data.json"),
])
def test_json_syntax_error_names_the_file(tmp_path, source, name):
  write, config_name, load = {
      "coco": (real.write_coco, "secoco", coco.load),
      "flickr30k": (real.write_flickr30k, "flickr30k_vsepp", flickr30k.load),
      "visual_genome": (real.write_visual_genome, "sevige",
                        visual_genome.load)}[source]
  manual_dir = str(tmp_path / "manual")
  write(manual_dir)
  path = os.path.join(manual_dir, name)
  with open(path) as f:
    data = f.read()
  with open(path, "w") as f:
    f.write(data[:-3])  # cut short, as an interrupted extraction leaves it
  config = _config(config_name)
  config.data.manual_dir = manual_dir
  with pytest.raises(ValueError, match=r"^" + re.escape(path) + r" is not "
                     r"valid JSON \([^\n]*\): fix or replace that file\.$"):
    load(config.data, str(tmp_path / "tfds"))


def test_precomputed_json_syntax_errors_name_the_file(tmp_path):
  root = real.write_precomputed(str(tmp_path / "precomp"))
  bad = str(tmp_path / "bad.json")
  with open(bad, "w") as f:
    f.write('{"category_names": ["a",]}')
  config = _config("f30k_precomp")
  config.data.features_dir = root
  config.data.categories_file = bad
  with pytest.raises(ValueError, match=re.escape(bad) + " is not valid JSON"):
    registry.load_task_sequence(config.data, "")
  config.data.categories_file = ""
  config.data.instances_files = (bad,)
  with pytest.raises(ValueError, match=re.escape(bad) + " is not valid JSON"):
    registry.load_task_sequence(config.data, "")


# ----------------------------------------------------------------------------
# A built dataset follows its source files.


def test_fixed_json_without_val_images_builds(tmp_path):
  data_config = _flickr(tmp_path, _val_to_test)
  path = os.path.join(data_config.manual_dir, "dataset_flickr30k.json")
  with pytest.raises(ValueError) as error:
    flickr30k.load(data_config, str(tmp_path / "tfds"))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"Flickr30K has no ['val'] images ({path}): ")
  # Nothing was built (no images encoded for a dataset that cannot be used).
  assert not _built(tmp_path)
  _edit_json(path, _test_to_val)
  dataset = flickr30k.load(data_config, str(tmp_path / "tfds"))
  np.testing.assert_array_equal(dataset.splits["val"].ids, [2001])


def test_changed_annotations_rebuild_the_dataset(tmp_path):
  data_config = _flickr(tmp_path)
  tfds_dir = str(tmp_path / "tfds")
  flickr30k.load(data_config, tfds_dir)
  path = os.path.join(data_config.manual_dir, "dataset_flickr30k.json")

  def fix_caption(data):
    data["images"][3]["sentences"][0]["raw"] = "A fixed caption."
  _edit_json(path, fix_caption)
  val = flickr30k.load(data_config, tfds_dir).splits["val"]
  assert val.captions[0][0] == "A fixed caption."
  # Unchanged files are not rebuilt, even when copied (new mtimes, same
  # bytes: the same files on another host); nor without a manual dir.
  built = os.stat(_record(tmp_path)).st_mtime_ns
  copy = str(tmp_path / "copy")
  shutil.copytree(data_config.manual_dir, copy, copy_function=shutil.copy)
  os.utime(os.path.join(copy, "dataset_flickr30k.json"),
           ns=(1, 1))  # distinct whatever the clock's resolution
  data_config.manual_dir = copy
  assert flickr30k.load(data_config, tfds_dir).splits["val"].captions[0][0] == (
      "A fixed caption.")
  data_config.manual_dir = ""
  flickr30k.load(data_config, tfds_dir)
  assert os.stat(_record(tmp_path)).st_mtime_ns == built


def test_dataset_without_source_key_is_rebuilt_from_a_manual_dir(tmp_path):
  # As a dataset built by older code, or by a run killed before the key.
  data_config = _flickr(tmp_path)
  tfds_dir = str(tmp_path / "tfds")
  flickr30k.load(data_config, tfds_dir)
  os.remove(_record(tmp_path))
  manual_dir = data_config.manual_dir
  data_config.manual_dir = ""  # nothing to compare with: reused as it is
  assert len(flickr30k.load(data_config, tfds_dir).splits["val"]) == 1
  assert not os.path.exists(_record(tmp_path))
  data_config.manual_dir = manual_dir
  assert len(flickr30k.load(data_config, tfds_dir).splits["val"]) == 1
  assert os.path.isfile(_record(tmp_path))


def test_failed_rebuild_leaves_nothing_to_reuse(tmp_path):
  data_config = _flickr(tmp_path)
  tfds_dir = str(tmp_path / "tfds")
  flickr30k.load(data_config, tfds_dir)
  image = os.path.join(data_config.manual_dir, "flickr30k-images", "2001.jpg")
  with open(image, "rb") as f:
    data = f.read()
  with open(image, "wb") as f:
    f.write(data[:len(data) // 2])
  _edit_json(os.path.join(data_config.manual_dir, "dataset_flickr30k.json"),
             lambda d: d["images"].reverse())
  with pytest.raises(ValueError, match=re.escape(image)):
    flickr30k.load(data_config, tfds_dir)
  data_config.manual_dir = ""
  with pytest.raises(FileNotFoundError, match="no manual dir given"):
    flickr30k.load(data_config, tfds_dir)
  assert not _built(tmp_path)


# ----------------------------------------------------------------------------
# Precomputed features (VSE++ / SCAN layout).


@pytest.mark.parametrize("case, empty", [
    ("no rows", "dev_ims.npy"),
    ("no captions", "dev_caps.txt"),
    ("both", "dev_caps.txt"),
    ("zero bytes", "dev_ims.npy"),
])
def test_empty_precomputed_split_names_the_file(tmp_path, case, empty):
  root = real.write_precomputed(str(tmp_path / "precomp"),
                                categories_file=False)
  if case in ("no rows", "both"):
    np.save(os.path.join(root, "dev_ims.npy"), np.zeros((0, 6), np.float32))
  if case in ("no captions", "both"):
    open(os.path.join(root, "dev_caps.txt"), "w").close()
  if case == "zero bytes":
    open(os.path.join(root, "dev_ims.npy"), "w").close()
  config = _config("f30k_precomp")
  config.data.features_dir = root
  with pytest.raises(ValueError) as error:
    registry.load_task_sequence(config.data, "")
  message = str(error.value)
  assert "\n" not in message
  assert f"({os.path.join(root, empty)}): " in message
  assert "extract" in message


def test_missing_ids_file_with_coco_instances_names_it(tmp_path):
  root = real.write_precomputed(str(tmp_path / "precomp"),
                                categories_file=False)
  coco_dir = str(tmp_path / "coco")
  real.write_coco(coco_dir)
  os.remove(os.path.join(root, "dev_ids.txt"))
  config = _config("coco_precomp", "secoco,tiny")
  config.data.features_dir = root
  config.data.split_prefixes = {"train": "train", "val": "dev",
                                "test": "test"}
  config.data.instances_files = tuple(
      os.path.join(coco_dir, "annotations", f"instances_{s}.json")
      for s in ("train2014", "val2014"))
  path = os.path.join(root, "dev_ids.txt")
  with pytest.raises(ValueError, match=r"^No ids file for the val split \(" +
                     re.escape(path) + r"\): [^\n]*add that file"):
    registry.load_task_sequence(config.data, "")


@pytest.mark.parametrize("ids_file", ["missing", "other ids"])
def test_ids_matching_no_category_name_the_ids_file(tmp_path, ids_file):
  root = real.write_precomputed(str(tmp_path / "precomp"))
  path = os.path.join(root, "dev_ids.txt")
  if ids_file == "missing":
    os.remove(path)
  else:
    with open(path, "w") as f:
      f.write("70\n80\n90\n")
  config = _config("f30k_precomp")
  config.data.features_dir = root
  config.data.categories_file = os.path.join(root, "categories.json")
  config.data.num_tasks = 2
  config.data.task_categories = [["a"], ["b", "c"]]
  with pytest.raises(ValueError, match=r"^No val image id is in " +
                     re.escape(config.data.categories_file) + r" \(" +
                     re.escape(path) + r"\): [^\n]*$"):
    registry.load_task_sequence(config.data, "")
