"""MS-COCO captions (2014 images, Karpathy splits) as a TFDS builder, read lazily.

TFDS's own `coco_captions` builder cannot be constructed without TensorFlow,
so this module has its own `GeneratorBasedBuilder` over the raw COCO files in
a manual dir, written as `array_record` and read back without TensorFlow:

  <manual_dir>/
    dataset_coco.json                    Karpathy splits (caption_datasets.zip)
    annotations/captions_train2014.json  } annotations_trainval2014.zip
    annotations/captions_val2014.json    }
    annotations/instances_train2014.json }
    annotations/instances_val2014.json   }
    train2014/COCO_train2014_*.jpg       train2014.zip
    val2014/COCO_val2014_*.jpg           val2014.zip

Each example is one image with its COCO id, its first 5 captions (by
annotation id, from the official captions files), and the annotated area of
each of the 80 categories (the summed `area` of its instance annotations,
crowd ones included), which the task split uses (`tasks.DOMINANT_GROUP_RULE`).
TFDS splits are Karpathy's train (82,783), restval (30,504), val (5,000) and
test (5,000); `load` puts restval into train, as VSE++ does
(`data.use_restval`).

Images are stored as JPEG, by default with the shorter side reduced to
`stored_image_size` (256, as VSE++ resizes before cropping) to keep the
dataset small and decoding fast, or as the original bytes
(`stored_image_size=0`). They are never held in memory all at once:
`Split.images` is a `tasks.LazyImages` over `JpegRecords`, which decodes the
rows asked for (shorter side resized to `image_size`, centre square crop).

The builder body, manual-dir checks, image storage and reading are shared
with Flickr30K and Visual Genome (manual.py, images.py); this module holds
what is COCO's own: its files, its 80 categories and their areas.

Usage:
  dataset = load(config.data, "/data/tfds")   # config.data.name == "coco"
  dataset.splits["train"].images[[0, 5]]      # uint8 [2, 224, 224, 3]
"""

from __future__ import annotations

import collections
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.data import manual
from ccr_jax.data import registry
from ccr_jax.data import tasks

_COCO_URLS = {
    "annotations": ("http://images.cocodataset.org/annotations/"
                    "annotations_trainval2014.zip"),
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
}

# The 80 COCO 2014 categories by supercategory, each in increasing COCO
# category id (the supercategories' ids are consecutive, in this order).
_BY_SUPERCATEGORY = {
    "person": ("person",),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train",
                "truck", "boat"),
    "outdoor": ("traffic light", "fire hydrant", "stop sign", "parking meter",
                "bench"),
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
               "bear", "zebra", "giraffe"),
    "accessory": ("backpack", "umbrella", "handbag", "tie", "suitcase"),
    "sports": ("frisbee", "skis", "snowboard", "sports ball", "kite",
               "baseball bat", "baseball glove", "skateboard", "surfboard",
               "tennis racket"),
    "kitchen": ("bottle", "wine glass", "cup", "fork", "knife", "spoon",
                "bowl"),
    "food": ("banana", "apple", "sandwich", "orange", "broccoli", "carrot",
             "hot dog", "pizza", "donut", "cake"),
    "furniture": ("chair", "couch", "potted plant", "bed", "dining table",
                  "toilet"),
    "electronic": ("tv", "laptop", "mouse", "remote", "keyboard",
                   "cell phone"),
    "appliance": ("microwave", "oven", "toaster", "sink", "refrigerator"),
    "indoor": ("book", "clock", "vase", "scissors", "teddy bear",
               "hair drier", "toothbrush"),
}
# (name, supercategory) in increasing COCO category id; category index i in
# `category_areas` is the i-th entry.
COCO_CATEGORIES: tuple[tuple[str, str], ...] = tuple(
    (name, supercategory)
    for supercategory, names in _BY_SUPERCATEGORY.items() for name in names)
CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in COCO_CATEGORIES)
# Supercategory -> category indices, usable as names in task_categories.
SUPERCATEGORIES: Mapping[str, tuple[int, ...]] = types.MappingProxyType({
    s: tuple(i for i, (_, sup) in enumerate(COCO_CATEGORIES) if sup == s)
    for s in _BY_SUPERCATEGORY})

CONFIG_KEYS = {
    **manual.CONFIG_KEYS,
    "use_restval": schema.Key(
        ml_collections.FieldReference(None, field_type=bool),
        "COCO: Karpathy restval joins train; None = True (VSE++)",
        registry.optional_bool),
}


def read_captions(paths: Sequence[str]) -> dict[int, list[str]]:
  """COCO image id -> its captions ordered by annotation id."""
  by_image = collections.defaultdict(list)
  for path in paths:
    for annotation in files.read_json(path)["annotations"]:
      by_image[int(annotation["image_id"])].append(
          (int(annotation["id"]), annotation["caption"].strip()))
  return {image: [c for _, c in sorted(caps)]
          for image, caps in by_image.items()}


def read_category_areas(paths: Sequence[str]) -> dict[int, np.ndarray]:
  """COCO image id -> float32 [80] summed annotation area per category.

  Raises:
    ValueError: a file is not valid JSON (naming it), or its categories are
      not the 80 of COCO_CATEGORIES.
  """
  areas = collections.defaultdict(lambda: np.zeros(len(COCO_CATEGORIES),
                                                   np.float32))
  for path in paths:
    instances = files.read_json(path)
    categories = sorted(instances["categories"], key=lambda c: c["id"])
    names = tuple((c["name"], c["supercategory"]) for c in categories)
    if names != COCO_CATEGORIES:
      raise ValueError(f"{path} lists categories {names[:5]}..., not the 80 "
                       "COCO 2014 categories this builder knows.")
    column = {c["id"]: i for i, c in enumerate(categories)}
    for annotation in instances["annotations"]:
      areas[int(annotation["image_id"])][column[annotation["category_id"]]] += (
          float(annotation["area"]))
  return dict(areas)


class CcrCoco(manual.ManualDirBuilder):
  """COCO 2014 images, 5 captions and 80 category areas, Karpathy splits."""

  DATASET = "COCO"
  DESCRIPTION = "MS-COCO 2014 with Karpathy splits and category areas."
  HOMEPAGE = "https://cocodataset.org"
  REQUIRED_FILES = {
      "dataset_coco.json": manual.KARPATHY_URL,
      "annotations/captions_train2014.json": _COCO_URLS["annotations"],
      "annotations/captions_val2014.json": _COCO_URLS["annotations"],
      "annotations/instances_train2014.json": _COCO_URLS["annotations"],
      "annotations/instances_val2014.json": _COCO_URLS["annotations"],
      "train2014/": _COCO_URLS["train2014"],
      "val2014/": _COCO_URLS["val2014"],
  }
  IMAGES_FROM = f"{_COCO_URLS['train2014']} and {_COCO_URLS['val2014']}"
  SPLITS = manual.KARPATHY_SPLITS
  SPLITS_FROM = "dataset_coco.json lists no such images"

  def _features(self) -> dict[str, Any]:
    return {"file_name": tfds.features.Text(),
            "category_areas": tfds.features.Tensor(
                shape=(len(COCO_CATEGORIES),), dtype=np.float32)}

  def _examples(self, manual_dir: str) -> dict[str, list[manual.Example]]:
    annotations = os.path.join(manual_dir, "annotations")
    captions = read_captions(
        [os.path.join(annotations, f"captions_{s}2014.json")
         for s in ("train", "val")])
    areas = read_category_areas(
        [os.path.join(annotations, f"instances_{s}2014.json")
         for s in ("train", "val")])
    no_area = np.zeros(len(COCO_CATEGORIES), np.float32)
    by_split = collections.defaultdict(list)
    for image in manual.read_karpathy(os.path.join(manual_dir,
                                                   "dataset_coco.json")):
      coco_id = int(image["cocoid"])
      caps = captions.get(coco_id, [])
      if len(caps) < manual.CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"COCO image {coco_id} ({image['filename']}) has {len(caps)} "
            f"captions in captions_*2014.json; {manual.CAPTIONS_PER_IMAGE} "
            "needed.")
      by_split[image["split"]].append(manual.Example(
          key=coco_id,
          image_path=os.path.join(manual_dir, image["filepath"],
                                  image["filename"]),
          features=dict(file_name=image["filename"],
                        captions=caps[:manual.CAPTIONS_PER_IMAGE],
                        category_areas=areas.get(coco_id, no_area))))
    return by_split


def load(data_config: Any, data_dir: str) -> tasks.Dataset:
  """Builds COCO in data_dir if needed and opens it, images lazily.

  Args:
    data_config: the `data` config section: image_size (side of the square
      images the model sees), `manual.CONFIG_KEYS` (manual_dir, read only
      when building; stored_image_size; decode_threads) and use_restval
      (None = True: Karpathy restval joins train).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 captions each, `category_areas` float32 [N, 80] and COCO image ids.
  """
  builder, scanned = manual.open_dataset(CcrCoco, data_config, data_dir,
                                         ("category_areas",))
  parts = {}
  for split, part in scanned.items():
    areas = np.asarray(part.fields["category_areas"], np.float32).reshape(
        len(part.ids), len(COCO_CATEGORIES))
    parts[split] = manual.split_from_scan(part, areas)
  use_restval = registry.option(data_config, "use_restval", True)
  splits = dict(
      train=(tasks.Split.concatenate([parts["train"], parts["restval"]])
             if use_restval else parts["train"]),
      val=parts["val"], test=parts["test"])
  return tasks.Dataset(
      splits=splits, category_names=CATEGORY_NAMES,
      category_aliases=SUPERCATEGORIES,
      details=dict(
          source="coco", builder=builder,
          splits="Karpathy " + ("train + restval" if use_restval else "train")
          + " / val / test",
          captions="the first 5 captions of each image by annotation id",
          category_areas="summed area of each category's instance "
                         "annotations (crowd included)",
          images=f"shorter side to {data_config.image_size}, centre crop"))


registry.register(
    "coco", load, CONFIG_KEYS,
    summary="MS-COCO 2014 files in data.manual_dir, Karpathy splits")
