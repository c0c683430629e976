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
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from ccr_jax.data import coco
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


def required_files() -> dict[str, str]:
  """VG manual-dir layout: relative path -> where to get it."""
  return {"image_data.json": API_URL, "objects.json": API_URL,
          "region_descriptions.json": API_URL,
          "VG_100K/": f"images.zip (and images2.zip -> VG_100K_2/), {API_URL}"}


def check_vg_manual_dir(manual_dir: str) -> None:
  coco.check_manual_dir(manual_dir, required_files(), "Visual Genome")


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


class CcrVisualGenome(tfds.core.GeneratorBasedBuilder):
  """VG images, 5 region-description texts, every object's synsets and area."""

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
        description=("Visual Genome images with 5 texts from region "
                     "descriptions and object synsets. " + TEXT_RULE),
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "image": coco.image_feature(),
            "captions": tfds.features.Sequence(
                tfds.features.Text(), length=coco.CAPTIONS_PER_IMAGE),
            # One entry per object: its synsets joined by "|", its box area.
            "object_synsets": tfds.features.Sequence(tfds.features.Text()),
            "object_areas": tfds.features.Sequence(np.float32),
        }),
        homepage="https://visualgenome.org",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_vg_manual_dir(manual_dir)
    images = coco.read_json(os.path.join(manual_dir, "image_data.json"))
    regions = {_image_id(e): e["regions"] for e in coco.read_json(
        os.path.join(manual_dir, "region_descriptions.json"))}
    objects = {_image_id(e): e["objects"] for e in coco.read_json(
        os.path.join(manual_dir, "objects.json"))}
    kept = []
    for image in sorted(images, key=_image_id):
      texts = image_texts(regions.get(_image_id(image), ()),
                          coco.CAPTIONS_PER_IMAGE)
      if len(texts) == coco.CAPTIONS_PER_IMAGE:
        kept.append((image, texts))
    coco.check_images_exist([image_path(manual_dir, im) for im, _ in kept],
                            "Visual Genome", API_URL)
    by_split = collections.defaultdict(list)
    for image, texts in kept:
      by_split[split_of(_image_id(image))].append((image, texts))
    return {split: self._generate_examples(manual_dir, entries, objects)
            for split, entries in by_split.items()}

  def _generate_examples(self, manual_dir, entries, objects):
    paths = [image_path(manual_dir, image) for image, _ in entries]
    encoded = coco.encode_image_files(
        paths, self.builder_config.stored_image_size, coco.default_threads())
    for (image, texts), data in zip(entries, encoded):
      image_id = _image_id(image)
      synsets, areas = [], []
      for obj in objects.get(image_id, ()):
        if obj.get("synsets"):
          synsets.append("|".join(obj["synsets"]))
          areas.append(float(obj["w"]) * float(obj["h"]))
      yield image_id, dict(id=image_id, image=data, captions=texts,
                           object_synsets=synsets,
                           object_areas=np.asarray(areas, np.float32))


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
      for synset in coco.as_str(joined).split("|"):
        hit |= members.get(synset, set())
      for c in hit:  # An object counts once per category.
        out[i, c] += area
  return out


def load(data_config, data_dir: str) -> tasks.Dataset:
  """Builds Visual Genome in data_dir if needed and opens it, images lazily.

  Args:
    data_config: ConfigDict with manual_dir (read only when building),
      image_size, optional categories (category specs; default
      DEFAULT_CATEGORIES), stored_image_size (default 256; 0 = original
      bytes) and decode_threads (0 = one per CPU, at most 16).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 texts each, `category_areas` float32 [N, num_categories], VG image ids.
  """
  categories = tuple(coco.data_option(data_config, "categories",
                                      DEFAULT_CATEGORIES))
  threads = (coco.data_option(data_config, "decode_threads", 0)
             or coco.default_threads())
  config = coco.stored_images_config(coco.data_option(
      data_config, "stored_image_size", coco.DEFAULT_STORED_IMAGE_SIZE))
  builder = coco.make_builder(CcrVisualGenome, data_dir, config)
  sources = coco.prepare(builder, coco.data_option(data_config, "manual_dir",
                                                   ""), check_vg_manual_dir)
  splits = {}
  for split in tasks.SPLIT_NAMES:
    if split not in sources:
      raise ValueError(
          f"The Visual Genome dataset in {data_dir} has no {split!r} images "
          f"({SPLIT_RULE}); the manual dir holds too few images.")
    scanned = coco.scan_split(sources[split], data_config.image_size, threads,
                              ("object_synsets", "object_areas"))
    areas = category_areas(scanned.fields["object_synsets"],
                           scanned.fields["object_areas"], categories)
    splits[split] = coco.split_from_scan(scanned, areas)
  images_per_category = sum((s.category_areas > 0).sum(axis=0)
                            for s in splits.values())
  absent = [c for c, n in zip(categories, images_per_category) if not n]
  if absent:
    logging.warning("Visual Genome: no image has an object of categories %s; "
                    "check the synset names against objects.json.", absent)
  return tasks.Dataset(
      splits=splits, category_names=categories,
      details=dict(
          source="visual_genome", builder=f"{builder.name}/{config.name}",
          splits=SPLIT_RULE, captions=TEXT_RULE,
          category_areas="summed box area of the objects whose synsets "
                         "belong to each category, each object once per "
                         "category",
          images_per_category=dict(zip(categories,
                                       map(int, images_per_category))),
          images=f"shorter side to {data_config.image_size}, centre crop"))
