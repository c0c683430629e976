"""Flickr30K (Karpathy splits) as a TFDS builder over a manual dir, read lazily.

  <manual_dir>/
    dataset_flickr30k.json     Karpathy splits (caption_datasets.zip)
    flickr30k-images/*.jpg     the 31,783 images (flickr30k-images.tar.gz)

Each example is one image, its Flickr photo id (the file name's number, e.g.
1000092795.jpg -> 1000092795) and its first 5 Karpathy captions (`raw`).
Splits are Karpathy's: train 29,000 / val 1,014 / test 1,000 (any restval
images join train). Flickr30K has no category labels: every image has the one
category "all", so the dataset is used as a single task (VSE++'s non-continual
reference). The builder body, image storage and reading are manual.py's.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import tensorflow_datasets as tfds

from ccr_jax.data import manual
from ccr_jax.data import registry
from ccr_jax.data import tasks

IMAGE_DIR = "flickr30k-images"
IMAGES_URL = ("the Flickr30K images, on request from "
              "https://shannon.cs.illinois.edu/DenotationGraph/")
CATEGORY_NAMES = ("all",)


def photo_id(filename: str) -> int:
  """The Flickr photo id of an image file name: '1000092795.jpg' -> 1000092795."""
  stem = os.path.splitext(os.path.basename(filename))[0]
  if not stem.isdigit():
    raise ValueError(f"Flickr30K image file {filename!r} is not named "
                     "<photo id>.jpg.")
  return int(stem)


class CcrFlickr30k(manual.ManualDirBuilder):
  """Flickr30K images with 5 captions each, Karpathy splits."""

  DATASET = "Flickr30K"
  DESCRIPTION = "Flickr30K with Karpathy splits, 5 captions per image."
  HOMEPAGE = "https://shannon.cs.illinois.edu/DenotationGraph/"
  REQUIRED_FILES = {"dataset_flickr30k.json": manual.KARPATHY_URL,
                    f"{IMAGE_DIR}/": IMAGES_URL}
  IMAGES_FROM = IMAGES_URL
  SPLITS_FROM = "dataset_flickr30k.json lists no such images"

  def _features(self) -> dict[str, Any]:
    return {"file_name": tfds.features.Text()}

  def _examples(self, manual_dir: str) -> dict[str, list[manual.Example]]:
    by_split = collections.defaultdict(list)
    for image in manual.read_karpathy(
        os.path.join(manual_dir, "dataset_flickr30k.json")):
      if len(image["sentences"]) < manual.CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"Flickr30K image {image['filename']} has "
            f"{len(image['sentences'])} captions in dataset_flickr30k.json; "
            f"{manual.CAPTIONS_PER_IMAGE} needed.")
      by_split[image["split"]].append(manual.Example(
          key=photo_id(image["filename"]),
          image_path=os.path.join(manual_dir, IMAGE_DIR, image["filename"]),
          features=dict(
              file_name=image["filename"],
              captions=image["sentences"][:manual.CAPTIONS_PER_IMAGE])))
    return by_split


def load(data_config: Any, data_dir: str) -> tasks.Dataset:
  """Builds Flickr30K in data_dir if needed and opens it, images lazily.

  Args:
    data_config: the `data` config section: image_size and
      `manual.CONFIG_KEYS` (manual_dir, read only when building;
      stored_image_size; decode_threads).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 captions each, category 0 ("all") and Flickr photo ids.
  """
  builder, scanned = manual.open_dataset(CcrFlickr30k, data_config, data_dir)
  parts = {split: manual.split_from_scan(part, None)
           for split, part in scanned.items()}
  train = [parts["train"]] + ([parts["restval"]] if "restval" in parts else [])
  return tasks.Dataset(
      splits=dict(train=tasks.Split.concatenate(train),
                  val=parts["val"], test=parts["test"]),
      category_names=CATEGORY_NAMES,
      details=dict(
          source="flickr30k", builder=builder,
          splits="Karpathy train (+ restval, if any) / val / test",
          captions="the first 5 Karpathy captions (raw) of each image",
          images=f"shorter side to {data_config.image_size}, centre crop"))


registry.register(
    "flickr30k", load, manual.CONFIG_KEYS,
    summary="Flickr30K files in data.manual_dir, Karpathy splits")
