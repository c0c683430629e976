"""Precomputed image features in the VSE++ / SCAN layout, memory-mapped.

  <features_dir>/
    {prefix}_ims.npy    float [N, D] (pooled CNN features) or [N, R, D]
                        (region features, e.g. SCAN's 36 x 2048), or the same
                        with each image repeated 5 times: [5N, ...]
    {prefix}_caps.txt   5N lines, the 5 captions of image i on lines 5i..5i+4
    {prefix}_ids.txt    optional: N lines (one id per image) or 5N (one per
                        caption, equal within each image's 5)

with one prefix per split (`data_config.split_prefixes`; VSE++ names them
train / dev / test, and COCO's 5K test set testall). VSE++ and SCAN archives:
https://www.cs.toronto.edu/~faghri/vsepp/data.tar and
https://scanproject.blob.core.windows.net/scan-data/data.zip.

Every split needs images: an empty or unreadable file is an error naming
it, not an empty task later.

Images repeated 5 times (`len(ims) == len(caps)`) are read through a strided
view of every 5th row, after checking that the first and last image's 5 rows
are equal; `len(caps) == 5 * len(ims)` is the plain layout; any other count
is an error. Features are memory-mapped (`np.load(mmap_mode="r")`), so
`Split.images` is a `tasks.LazyImages` that reads only the rows asked for.

Categories, for splitting into tasks, come from one of:
- `data_config.categories_file`, a JSON file
    {"category_names": ["animal", "vehicle", ...],
     "images": {"<image id>": {"<category index>": area, ...}, ...}}
  where an image's value may also be a list of category indices (weight 1
  each) or one index; images absent from "images" have no category;
- `data_config.instances_files`, COCO `instances_*.json` files matched through
  the ids (which must then be COCO image ids), giving COCO's 80 categories,
  their areas and the supercategory names;
- neither: every image has the one category "all" (a single task).
Without an ids file, ids are `split_index * 10**9 + row`; with
`instances_files` every split needs its ids file (row numbers would match
unrelated COCO ids), and with either source a split none of whose images
gets a category is an error naming its ids file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.data import coco
from ccr_jax.data import manual
from ccr_jax.data import registry
from ccr_jax.data import tasks

DEFAULT_SPLIT_PREFIXES = {"train": "train", "val": "dev", "test": "test"}
_ID_STRIDE = 10**9

CONFIG_KEYS = {
    "features_dir": schema.Key(
        "", "precomputed: the directory of the {prefix}_ims.npy / "
        "{prefix}_caps.txt files; '' = not set"),
    # Free-form: split -> file prefix, checked against the files on loading.
    "split_prefixes": schema.Key(
        None, "precomputed: split (train, val, test) -> file prefix; None = "
        "train / dev / test"),
    "categories_file": schema.Key(
        "", "precomputed: JSON of category names and image -> categories; "
        "'' = none"),
    "instances_files": schema.Key(
        (), "precomputed: COCO instances_*.json files matched through the "
        "ids (COCO's 80 categories); () = none"),
    "mmap": schema.Key(
        ml_collections.FieldReference(None, field_type=bool),
        "precomputed: memory-map the features instead of reading them into "
        "memory; None = True", registry.optional_bool),
}


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\r\n") for line in f]


def split_files(features_dir: str, prefix: str) -> dict[str, str]:
  """The files of one split: ims, caps and (maybe absent) ids."""
  return {kind: os.path.join(features_dir, f"{prefix}_{kind}.{ext}")
          for kind, ext in (("ims", "npy"), ("caps", "txt"), ("ids", "txt"))}


def check_features_dir(features_dir: str,
                       prefixes: Mapping[str, str]) -> None:
  """Raises FileNotFoundError naming every missing file and where to get it."""
  required = {}
  for prefix in prefixes.values():
    required[f"{prefix}_ims.npy"] = "the image features [N, D] or [N, R, D]"
    required[f"{prefix}_caps.txt"] = "5 captions per image, one per line"
  try:
    manual.check_manual_dir(features_dir, required, "precomputed features")
  except FileNotFoundError as error:
    raise FileNotFoundError(
        f"{error}\nVSE++ features: https://www.cs.toronto.edu/~faghri/vsepp/"
        "data.tar; SCAN region features: https://scanproject.blob.core."
        "windows.net/scan-data/data.zip (set --config.data.features_dir to "
        "e.g. <extracted>/data/coco_precomp).") from None


def read_split(features_dir: str, prefix: str, split_index: int,
               mmap: bool = True) -> tuple[tasks.LazyImages,
                                           tuple[tuple[str, ...], ...],
                                           np.ndarray]:
  """One split's features (lazy), captions and ids.

  Returns:
    images: LazyImages [N, D] or [N, R, D], in the file's dtype.
    captions: N tuples of 5 captions.
    ids: int64 [N].

  Raises:
    ValueError: a file is empty or unreadable, the counts of features,
      captions and ids do not fit either layout, or a repeated image's 5 rows
      differ.
  """
  files = split_files(features_dir, prefix)
  try:
    features = np.load(files["ims"], mmap_mode="r" if mmap else None)
  except (EOFError, ValueError) as e:  # Empty, cut short or not a .npy file.
    reason = " ".join(str(e).split())
    raise ValueError(f"Unreadable features file ({files['ims']}): {reason}; "
                     "extract it again from the features archive.") from e
  lines = _read_lines(files["caps"])
  # An empty split would only fail later, as an empty task or a count error.
  for kind, what, count in (("caps", "captions", len(lines)),
                            ("ims", "image features", len(features))):
    if not count:
      raise ValueError(
          f"Empty precomputed split, no {what} ({files[kind]}): extract the "
          "features archive again, or point data.split_prefixes at a split "
          "that has images.")
  per_image = manual.CAPTIONS_PER_IMAGE
  if len(lines) % per_image:
    raise ValueError(f"{files['caps']} has {len(lines)} captions, not a "
                     f"multiple of {per_image}.")
  n = len(lines) // per_image
  if len(features) == len(lines) and len(features) != n:
    # Each image repeated per caption (some VSE++ splits): keep every 5th row
    # after checking two images' rows really repeat.
    for first in (0, len(features) - per_image):
      rows = np.asarray(features[first:first + per_image])
      if not (rows == rows[:1]).all():
        raise ValueError(
            f"{files['ims']} has one row per caption ({len(features)}) but "
            f"rows {first}..{first + per_image - 1} differ; expected each "
            f"image repeated {per_image} times.")
    features = features[::per_image]
  elif len(features) != n:
    raise ValueError(
        f"{files['ims']} has {len(features)} rows and {files['caps']} "
        f"{len(lines)} captions; expected {per_image} captions per row "
        f"({len(lines) // per_image} rows) or one row per caption.")
  captions = tuple(tuple(lines[i * per_image:(i + 1) * per_image])
                   for i in range(n))
  if os.path.isfile(files["ids"]):
    ids = np.asarray([int(x) for x in _read_lines(files["ids"]) if x.strip()],
                     np.int64)
    if len(ids) == len(lines) and len(ids) != n:
      grouped = ids.reshape(n, per_image)
      if not (grouped == grouped[:, :1]).all():
        raise ValueError(f"{files['ids']} has one id per caption, but some "
                         f"image's {per_image} ids differ.")
      ids = grouped[:, 0]
    elif len(ids) != n:
      raise ValueError(f"{files['ids']} has {len(ids)} ids for {n} images; "
                       f"give one per image or one per caption.")
  else:
    ids = split_index * _ID_STRIDE + np.arange(n, dtype=np.int64)
  return tasks.LazyImages.of(tasks.ArrayRows(features)), captions, ids


def read_categories_file(path: str, ids: np.ndarray
                         ) -> tuple[tuple[str, ...], np.ndarray]:
  """Category names and float32 [len(ids), num_categories] weights."""
  data = files.read_json(path)
  names = tuple(data["category_names"])
  labels = data["images"]
  out = np.zeros((len(ids), len(names)), np.float32)
  for row, image_id in enumerate(ids.tolist()):
    value = labels.get(str(image_id))
    if value is None:
      continue
    if isinstance(value, dict):
      items = [(int(c), float(w)) for c, w in value.items()]
    elif isinstance(value, list):
      items = [(int(c), 1.0) for c in value]
    else:
      items = [(int(value), 1.0)]
    for c, weight in items:
      if not 0 <= c < len(names):
        raise ValueError(f"{path}: image {image_id} has category {c}, but "
                         f"category_names has {len(names)} entries.")
      out[row, c] += weight
  return names, out


def _no_category_error(split: str, ids_file: str, source: str) -> ValueError:
  """Why no image of a split has a category: its ids are not `source`'s."""
  if os.path.isfile(ids_file):
    fix = f"its ids must be the image ids {source} uses"
  else:
    fix = ("that file is missing, so the images are numbered by row; add it, "
           f"one image id per line (per image or per caption), with the ids "
           f"{source} uses")
  return ValueError(f"No {split} image id is in {source} ({ids_file}): {fix}.")


def load(data_config: Any, data_dir: str = "") -> tasks.Dataset:
  """Opens the precomputed features of data_config.features_dir.

  Args:
    data_config: the `data` config section: features_dir, split_prefixes
      ({"train", "val", "test"} -> file prefix; None = train/dev/test),
      categories_file, instances_files (COCO instances JSONs) and mmap
      (None = True); see `CONFIG_KEYS`.
    data_dir: unused (nothing is built); the registry's loader signature.

  Returns:
    The Dataset: Splits with LazyImages features, 5 captions each and
    categories from the categories file, the COCO instances or "all".
  """
  features_dir = data_config.features_dir
  prefixes = dict(registry.option(data_config, "split_prefixes",
                                  DEFAULT_SPLIT_PREFIXES))
  check_features_dir(features_dir, prefixes)
  categories_file = data_config.categories_file
  instances_files: Sequence[str] = tuple(data_config.instances_files)
  coco_areas = (coco.read_category_areas(instances_files)
                if instances_files else None)
  splits, names, aliases = {}, ("all",), {}
  for index, split in enumerate(tasks.SPLIT_NAMES):
    ids_file = split_files(features_dir, prefixes[split])["ids"]
    # Row-number ids would silently match unrelated COCO ids (train's 0..N-1).
    if instances_files and not os.path.isfile(ids_file):
      raise ValueError(
          f"No ids file for the {split} split ({ids_file}): "
          "data.instances_files are matched to images through their COCO "
          "ids; add that file (one COCO image id per line, per image or per "
          "caption) or drop data.instances_files.")
    images, captions, ids = read_split(
        features_dir, prefixes[split], index,
        registry.option(data_config, "mmap", True))
    areas = None
    if categories_file:
      names, areas = read_categories_file(categories_file, ids)
    elif coco_areas is not None:
      names, aliases = coco.CATEGORY_NAMES, coco.SUPERCATEGORIES
      empty = np.zeros(len(names), np.float32)
      areas = np.stack([coco_areas.get(int(i), empty) for i in ids]) if len(
          ids) else np.zeros((0, len(names)), np.float32)
    if areas is not None and not areas.any():
      raise _no_category_error(split, ids_file, categories_file or "the COCO "
                               "instances of data.instances_files")
    categories = (np.zeros(len(ids), np.int32) if areas is None
                  else tasks.dominant_categories(areas))
    splits[split] = tasks.Split(images=images, captions=captions,
                                categories=categories, ids=ids,
                                category_areas=areas)
  source = ("categories file" if categories_file else
            "COCO instances" if instances_files else "none (one category)")
  return tasks.Dataset(
      splits=splits, category_names=names, category_aliases=aliases,
      details=dict(source="precomputed", features_dir=features_dir,
                   split_prefixes=prefixes, categories=source))


registry.register(
    "precomputed", load, CONFIG_KEYS,
    summary="VSE++/SCAN feature files in data.features_dir")
