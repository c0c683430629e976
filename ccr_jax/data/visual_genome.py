"""Visual Genome as a TFDS builder over a manual dir, read lazily.

  <manual_dir>/
    image_data.json            } https://homes.cs.washington.edu/~ranjay/
    objects.json               }   visualgenome/api.html (version 1.4 files;
    region_descriptions.json   }   1.2 works too)
    VG_100K/*.jpg              images.zip  } same page; images are found in
    VG_100K_2/*.jpg            images2.zip } the folder their url names

Visual Genome has no image-level captions and no standard retrieval split, so
this module derives both, deterministically:

- **Texts** (`TEXT_RULE`): the 5 largest region descriptions of the image. Its
  regions are sorted by box area (width x height), largest first, ties by
  region id; a phrase is kept if it has at least 3 word tokens (shorter ones
  are object names, not descriptions: "a tree") and its tokens differ from
  every phrase kept before (VG repeats phrases); the first 5 kept are the
  image's texts, whitespace collapsed. Large regions describe the whole
  scene, which is what an image-level caption does. Images with fewer than 5
  such phrases are left out of the dataset.
- **Splits** (`SPLIT_RULE`): by image id, `image_id % 20`: 0 -> test,
  1 -> val, otherwise train (about 5% / 5% / 90%).
- **Categories**: each object of the image contributes its box area to every
  category one of its synsets belongs to (`objects.json` WordNet synsets,
  e.g. "dog.n.01"); a category is one synset or several joined by "|"
  ("table.n.02|table.n.01", for synsets whose sense VG may name either way),
  and is counted once per object. The categories come from
  `data_config.categories` (default `DEFAULT_CATEGORIES`), so they can change
  without rebuilding; the stored dataset keeps every object's synsets and
  area. Tasks are then assigned by `tasks.DOMINANT_GROUP_RULE`.

The builder body, image storage and reading are manual.py's.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.data import manual
from ccr_jax.data import registry
from ccr_jax.data import tasks
from ccr_jax.data import text

API_URL = "https://homes.cs.washington.edu/~ranjay/visualgenome/api.html"
IMAGE_DIRS = ("VG_100K", "VG_100K_2")
TEXT_RULE = (
    "The 5 largest region descriptions of each image: regions sorted by box "
    "area, largest first (ties by region id); a phrase is kept if it has at "
    "least 3 word tokens and its tokens differ from every phrase kept before; "
    "images with fewer than 5 such phrases are left out.")
SPLIT_RULE = "image_id % 20: 0 -> test, 1 -> val, otherwise train."
MIN_PHRASE_TOKENS = 3
# Thing categories common in VG (WordNet synsets as objects.json names them),
# grouped as configs/sevige.py uses them: animals, vehicles, indoor scenes.
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "dog.n.01", "cat.n.01", "horse.n.01", "elephant.n.01", "giraffe.n.01",
    "zebra.n.01", "sheep.n.01", "cow.n.01|beef.n.01", "bird.n.01",
    "bear.n.01",
    "car.n.01", "bus.n.01", "truck.n.01", "train.n.01", "airplane.n.01",
    "boat.n.01", "motorcycle.n.01", "bicycle.n.01",
    "table.n.02|table.n.01|dining_table.n.01", "chair.n.01", "bed.n.01",
    "sofa.n.01", "laptop.n.01", "plate.n.04", "pizza.n.01",
    "toilet.n.02|toilet.n.01",
)


CONFIG_KEYS = {
    **manual.CONFIG_KEYS,
    # Free-form: a list of synset specs, checked against objects.json when
    # loading (a category no image has logs a warning).
    "categories": schema.Key(
        ml_collections.FieldReference(None, field_type=tuple),
        "Visual Genome: the categories, each a synset or synsets joined by "
        "'|'; None = visual_genome.DEFAULT_CATEGORIES"),
}


def split_of(image_id: int) -> str:
  """The split of an image (`SPLIT_RULE`)."""
  remainder = image_id % 20
  return "test" if remainder == 0 else "val" if remainder == 1 else "train"


def image_texts(regions: Sequence[dict], num_texts: int = 5) -> list[str]:
  """An image's texts from its region descriptions (`TEXT_RULE`).

  Args:
    regions: region dicts with `region_id`, `phrase`, `width` and `height`.
    num_texts: texts wanted.

  Returns:
    Up to num_texts phrases; fewer means the image is left out.
  """
  ordered = sorted(regions, key=lambda r: (-float(r["width"]) * float(
      r["height"]), int(r.get("region_id", r.get("id", 0)))))
  texts, seen = [], set()
  for region in ordered:
    phrase = " ".join(str(region["phrase"]).split())
    tokens = tuple(text.tokenize(phrase))
    if len(tokens) < MIN_PHRASE_TOKENS or tokens in seen:
      continue
    seen.add(tokens)
    texts.append(phrase)
    if len(texts) == num_texts:
      break
  return texts


def _image_id(entry: dict) -> int:
  # VG 1.4 files say "image_id", 1.2 ones "id".
  return int(entry["image_id"] if "image_id" in entry else entry["id"])


def image_path(manual_dir: str, image: dict) -> str:
  """Where an image_data.json entry's file is: the folder its url names."""
  name = f"{_image_id(image)}.jpg"
  url = image.get("url") or ""
  for folder in IMAGE_DIRS[::-1]:  # VG_100K_2 contains "VG_100K" as a prefix.
    if f"/{folder}/" in url:
      return os.path.join(manual_dir, folder, name)
  for folder in IMAGE_DIRS:
    path = os.path.join(manual_dir, folder, name)
    if os.path.isfile(path):
      return path
  return os.path.join(manual_dir, IMAGE_DIRS[0], name)


class CcrVisualGenome(manual.ManualDirBuilder):
  """VG images, 5 region-description texts, every object's synsets and area."""

  DATASET = "Visual Genome"
  DESCRIPTION = ("Visual Genome images with 5 texts from region descriptions "
                 "and object synsets. " + TEXT_RULE)
  HOMEPAGE = "https://visualgenome.org"
  REQUIRED_FILES = {
      "image_data.json": API_URL, "objects.json": API_URL,
      "region_descriptions.json": API_URL,
      "VG_100K/": f"images.zip (and images2.zip -> VG_100K_2/), {API_URL}"}
  IMAGES_FROM = API_URL
  SPLITS_FROM = f"{SPLIT_RULE} The manual dir holds too few images"

  def _features(self) -> dict[str, Any]:
    # One entry per object: its synsets joined by "|", its box area.
    return {"object_synsets": tfds.features.Sequence(tfds.features.Text()),
            "object_areas": tfds.features.Sequence(np.float32)}

  def _examples(self, manual_dir: str) -> dict[str, list[manual.Example]]:
    regions = {_image_id(e): e["regions"] for e in files.read_json(
        os.path.join(manual_dir, "region_descriptions.json"))}
    objects = {_image_id(e): e["objects"] for e in files.read_json(
        os.path.join(manual_dir, "objects.json"))}
    by_split = collections.defaultdict(list)
    for image in sorted(files.read_json(
        os.path.join(manual_dir, "image_data.json")), key=_image_id):
      image_id = _image_id(image)
      texts = image_texts(regions.get(image_id, ()),
                          manual.CAPTIONS_PER_IMAGE)
      if len(texts) < manual.CAPTIONS_PER_IMAGE:
        continue  # TEXT_RULE: too few descriptions.
      synsets, areas = [], []
      for obj in objects.get(image_id, ()):
        if obj.get("synsets"):
          synsets.append("|".join(obj["synsets"]))
          areas.append(float(obj["w"]) * float(obj["h"]))
      by_split[split_of(image_id)].append(manual.Example(
          key=image_id, image_path=image_path(manual_dir, image),
          features=dict(captions=texts, object_synsets=synsets,
                        object_areas=np.asarray(areas, np.float32))))
    return by_split


def category_areas(object_synsets: Sequence[Sequence[str]],
                   object_areas: Sequence[Sequence[float]],
                   categories: Sequence[str]) -> np.ndarray:
  """float32 [N, len(categories)]: each image's object area per category.

  Args:
    object_synsets: per image, per object, its synsets joined by "|".
    object_areas: per image, per object, its box area.
    categories: category specs, each a synset or synsets joined by "|".
  """
  members = collections.defaultdict(set)
  for c, spec in enumerate(categories):
    for synset in spec.split("|"):
      members[synset].add(c)
  out = np.zeros((len(object_synsets), len(categories)), np.float32)
  for i, (synsets, areas) in enumerate(zip(object_synsets, object_areas)):
    for joined, area in zip(synsets, areas):
      hit = set()
      for synset in manual.as_str(joined).split("|"):
        hit |= members.get(synset, set())
      for c in hit:  # An object counts once per category.
        out[i, c] += area
  return out


def load(data_config: Any, data_dir: str) -> tasks.Dataset:
  """Builds Visual Genome in data_dir if needed and opens it, images lazily.

  Args:
    data_config: the `data` config section: image_size, categories
      (category specs; None = DEFAULT_CATEGORIES) and `manual.CONFIG_KEYS`
      (manual_dir, read only when building; stored_image_size;
      decode_threads).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 texts each, `category_areas` float32 [N, num_categories], VG image ids.
  """
  categories = tuple(registry.option(data_config, "categories",
                                     DEFAULT_CATEGORIES))
  builder, scanned = manual.open_dataset(CcrVisualGenome, data_config, data_dir,
                                         ("object_synsets", "object_areas"))
  splits = {split: manual.split_from_scan(part, category_areas(
      part.fields["object_synsets"], part.fields["object_areas"], categories))
            for split, part in scanned.items()}
  images_per_category = sum((s.category_areas > 0).sum(axis=0)
                            for s in splits.values())
  absent = [c for c, n in zip(categories, images_per_category) if not n]
  if absent:
    logging.warning("Visual Genome: no image has an object of categories %s; "
                    "check the synset names against objects.json.", absent)
  return tasks.Dataset(
      splits=splits, category_names=categories,
      details=dict(
          source="visual_genome", builder=builder,
          splits=SPLIT_RULE, captions=TEXT_RULE,
          category_areas="summed box area of the objects whose synsets "
                         "belong to each category, each object once per "
                         "category",
          images_per_category=dict(zip(categories,
                                       map(int, images_per_category))),
          images=f"shorter side to {data_config.image_size}, centre crop"))


registry.register(
    "visual_genome", load, CONFIG_KEYS,
    summary="Visual Genome files in data.manual_dir, derived texts and splits")
