"""Flickr30K (Karpathy splits) as a TFDS builder over a manual dir, read lazily.

  <manual_dir>/
    dataset_flickr30k.json     Karpathy splits (caption_datasets.zip)
    flickr30k-images/*.jpg     the 31,783 images (flickr30k-images.tar.gz)

Each example is one image, its Flickr photo id (the file name's number, e.g.
1000092795.jpg -> 1000092795) and its first 5 Karpathy captions (`raw`).
Splits are Karpathy's: train 29,000 / val 1,014 / test 1,000 (any restval
images join train). Flickr30K has no category labels: every image has the one
category "all", so the dataset is used as a single task (VSE++'s non-continual
reference). Images are stored and read as in coco.py (`JpegRecords`).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from ccr_jax.data import coco
from ccr_jax.data import tasks

IMAGE_DIR = "flickr30k-images"
IMAGES_URL = ("the Flickr30K images, on request from "
              "https://shannon.cs.illinois.edu/DenotationGraph/")
CATEGORY_NAMES = ("all",)
_TFDS_SPLITS = ("train", "restval", "val", "test")


def required_files() -> dict[str, str]:
  """Flickr30K manual-dir layout: relative path -> where to get it."""
  return {"dataset_flickr30k.json": coco.KARPATHY_URL,
          f"{IMAGE_DIR}/": IMAGES_URL}


def check_flickr30k_manual_dir(manual_dir: str) -> None:
  coco.check_manual_dir(manual_dir, required_files(), "Flickr30K")


def photo_id(filename: str) -> int:
  """The Flickr photo id of an image file name: '1000092795.jpg' -> 1000092795."""
  stem = os.path.splitext(os.path.basename(filename))[0]
  if not stem.isdigit():
    raise ValueError(f"Flickr30K image file {filename!r} is not named "
                     "<photo id>.jpg.")
  return int(stem)


class CcrFlickr30k(tfds.core.GeneratorBasedBuilder):
  """Flickr30K images with 5 captions each, Karpathy splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [coco.stored_images_config(coco.DEFAULT_STORED_IMAGE_SIZE),
                     coco.stored_images_config(0)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
      f"{path}: {where}" for path, where in required_files().items())
  # See synthetic.CcrSynthetic: no checksums file to look for.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Flickr30K with Karpathy splits, 5 captions per image.",
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "file_name": tfds.features.Text(),
            "image": coco.image_feature(),
            "captions": tfds.features.Sequence(
                tfds.features.Text(), length=coco.CAPTIONS_PER_IMAGE),
        }),
        homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_flickr30k_manual_dir(manual_dir)
    images = coco.read_karpathy(
        os.path.join(manual_dir, "dataset_flickr30k.json"))
    coco.check_images_exist(
        [os.path.join(manual_dir, IMAGE_DIR, im["filename"]) for im in images],
        "Flickr30K", IMAGES_URL)
    # Only splits with images: Karpathy's Flickr30K file has no restval.
    return {split: self._generate_examples(
        manual_dir, [im for im in images if im["split"] == split])
            for split in _TFDS_SPLITS
            if any(im["split"] == split for im in images)}

  def _generate_examples(self, manual_dir, images):
    paths = [os.path.join(manual_dir, IMAGE_DIR, im["filename"])
             for im in images]
    encoded = coco.encode_image_files(
        paths, self.builder_config.stored_image_size, coco.default_threads())
    for image, data in zip(images, encoded):
      if len(image["sentences"]) < coco.CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"Flickr30K image {image['filename']} has "
            f"{len(image['sentences'])} captions in dataset_flickr30k.json; "
            f"{coco.CAPTIONS_PER_IMAGE} needed.")
      key = photo_id(image["filename"])
      yield key, dict(id=key, file_name=image["filename"], image=data,
                      captions=image["sentences"][:coco.CAPTIONS_PER_IMAGE])


def load(data_config, data_dir: str) -> tasks.Dataset:
  """Builds Flickr30K in data_dir if needed and opens it, images lazily.

  Args:
    data_config: ConfigDict with manual_dir (read only when building),
      image_size, optional stored_image_size (default 256; 0 = original
      bytes) and decode_threads (0 = one per CPU, at most 16).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 captions each, category 0 ("all") and Flickr photo ids.
  """
  threads = (coco.data_option(data_config, "decode_threads", 0)
             or coco.default_threads())
  config = coco.stored_images_config(coco.data_option(
      data_config, "stored_image_size", coco.DEFAULT_STORED_IMAGE_SIZE))
  builder = coco.make_builder(CcrFlickr30k, data_dir, config)
  sources = coco.prepare(builder, coco.data_option(data_config, "manual_dir",
                                                   ""),
                         check_flickr30k_manual_dir)
  missing = [s for s in ("train", "val", "test") if s not in sources]
  if missing:
    raise ValueError(f"The Flickr30K dataset in {data_dir} has no {missing} "
                     "split(s): dataset_flickr30k.json lists no such images.")
  parts = {split: coco.split_from_scan(
      coco.scan_split(source, data_config.image_size, threads), None)
           for split, source in sources.items()}
  train = [parts["train"]] + ([parts["restval"]] if "restval" in parts else [])
  return tasks.Dataset(
      splits=dict(train=tasks.Split.concatenate(train),
                  val=parts["val"], test=parts["test"]),
      category_names=CATEGORY_NAMES,
      details=dict(
          source="flickr30k", builder=f"{builder.name}/{config.name}",
          splits="Karpathy train (+ restval, if any) / val / test",
          captions="the first 5 Karpathy captions (raw) of each image",
          images=f"shorter side to {data_config.image_size}, centre crop"))
