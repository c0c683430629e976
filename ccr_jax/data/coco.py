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
test (5,000); `load` puts restval into train, as VSE++ does.

Images are stored as JPEG, by default with the shorter side reduced to
`stored_image_size` (256, as VSE++ resizes before cropping) to keep the
dataset small and decoding fast, or as the original bytes
(`stored_image_size=0`). They are never held in memory all at once:
`Split.images` is a `tasks.LazyImages` over `JpegRecords`, which decodes the
rows asked for (shorter side resized to `image_size`, centre square crop).

The pieces every pixel source shares (manual-dir checks, Karpathy JSON,
JPEG storage and decoding, reading a built split) live here too;
flickr30k.py and visual_genome.py import them.

Usage:
  dataset = load(config.data, "/data/tfds")   # config.data.name == "coco"
  dataset.splits["train"].images[[0, 5]]      # uint8 [2, 224, 224, 3]
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ccr_jax.data import tasks

KARPATHY_URL = ("https://cs.stanford.edu/people/karpathy/deepimagesent/"
                "caption_datasets.zip")
_COCO_URLS = {
    "annotations": ("http://images.cocodataset.org/annotations/"
                    "annotations_trainval2014.zip"),
    "train2014": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014": "http://images.cocodataset.org/zips/val2014.zip",
}

# The 80 COCO categories in increasing COCO category id, with supercategory;
# category index i in `category_areas` is the i-th entry.
COCO_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"),
    ("motorcycle", "vehicle"), ("airplane", "vehicle"), ("bus", "vehicle"),
    ("train", "vehicle"), ("truck", "vehicle"), ("boat", "vehicle"),
    ("traffic light", "outdoor"), ("fire hydrant", "outdoor"),
    ("stop sign", "outdoor"), ("parking meter", "outdoor"),
    ("bench", "outdoor"), ("bird", "animal"), ("cat", "animal"),
    ("dog", "animal"), ("horse", "animal"), ("sheep", "animal"),
    ("cow", "animal"), ("elephant", "animal"), ("bear", "animal"),
    ("zebra", "animal"), ("giraffe", "animal"), ("backpack", "accessory"),
    ("umbrella", "accessory"), ("handbag", "accessory"), ("tie", "accessory"),
    ("suitcase", "accessory"), ("frisbee", "sports"), ("skis", "sports"),
    ("snowboard", "sports"), ("sports ball", "sports"), ("kite", "sports"),
    ("baseball bat", "sports"), ("baseball glove", "sports"),
    ("skateboard", "sports"), ("surfboard", "sports"),
    ("tennis racket", "sports"), ("bottle", "kitchen"),
    ("wine glass", "kitchen"), ("cup", "kitchen"), ("fork", "kitchen"),
    ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"),
    ("banana", "food"), ("apple", "food"), ("sandwich", "food"),
    ("orange", "food"), ("broccoli", "food"), ("carrot", "food"),
    ("hot dog", "food"), ("pizza", "food"), ("donut", "food"),
    ("cake", "food"), ("chair", "furniture"), ("couch", "furniture"),
    ("potted plant", "furniture"), ("bed", "furniture"),
    ("dining table", "furniture"), ("toilet", "furniture"),
    ("tv", "electronic"), ("laptop", "electronic"), ("mouse", "electronic"),
    ("remote", "electronic"), ("keyboard", "electronic"),
    ("cell phone", "electronic"), ("microwave", "appliance"),
    ("oven", "appliance"), ("toaster", "appliance"), ("sink", "appliance"),
    ("refrigerator", "appliance"), ("book", "indoor"), ("clock", "indoor"),
    ("vase", "indoor"), ("scissors", "indoor"), ("teddy bear", "indoor"),
    ("hair drier", "indoor"), ("toothbrush", "indoor"),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in COCO_CATEGORIES)
# Supercategory -> category indices, usable as names in task_categories.
SUPERCATEGORIES: Mapping[str, tuple[int, ...]] = types.MappingProxyType({
    s: tuple(i for i, (_, sup) in enumerate(COCO_CATEGORIES) if sup == s)
    for s in dict.fromkeys(sup for _, sup in COCO_CATEGORIES)})

CAPTIONS_PER_IMAGE = 5
# Karpathy split name -> the TFDS split it is written to.
KARPATHY_SPLITS = ("train", "restval", "val", "test")
DEFAULT_STORED_IMAGE_SIZE = 256
# Records read per call when scanning a split's captions and labels.
_SCAN_CHUNK = 512

# ----------------------------------------------------------------------------
# Shared by every pixel source: manual dirs, Karpathy JSON, JPEG storage.


def check_manual_dir(manual_dir: str, required: Mapping[str, str],
                     dataset: str) -> None:
  """Raises FileNotFoundError naming each missing file and where to get it.

  Args:
    manual_dir: the directory the user filled by hand.
    required: path relative to manual_dir (a trailing "/" means a folder) ->
      where to get it (a URL or a short instruction).
    dataset: the dataset's name, for the message.
  """
  layout = "\n".join(f"  {path:40s} from {where}"
                     for path, where in required.items())
  if not manual_dir:
    raise FileNotFoundError(
        f"{dataset}: no manual dir given; set --config.data.manual_dir to a "
        f"directory laid out as:\n{layout}\nNothing is downloaded for you.")
  missing = []
  for path in required:
    full = os.path.join(manual_dir, path)
    if not (os.path.isdir(full) if path.endswith("/") else
            os.path.isfile(full)):
      missing.append(path)
  if missing:
    raise FileNotFoundError(
        f"{dataset}: manual dir {manual_dir} is incomplete; missing "
        f"{missing}. Expected layout:\n{layout}\nNothing is downloaded for "
        "you: fetch the files above and extract them there.")


def check_images_exist(paths: Sequence[str], dataset: str,
                       where: str) -> None:
  """Raises FileNotFoundError if any image file is missing (lists a few)."""
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
        f"{dataset}: {len(missing)} of {len(paths)} images listed in the "
        f"annotations are missing from the manual dir, e.g. {missing[:5]}; "
        f"extract the image archives from {where} there.")


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_karpathy(path: str) -> list[dict[str, Any]]:
  """The images of a Karpathy `dataset_*.json`, in file order.

  Returns:
    dicts with `split` ("train", "restval", "val" or "test"), `filepath`
    (the image folder, "" if none), `filename`, `sentences` (raw caption
    strings) and `cocoid` (None outside COCO).
  """
  images = read_json(path)["images"]
  out = []
  for image in images:
    split = image["split"]
    if split not in KARPATHY_SPLITS:
      raise ValueError(f"{path}: image {image.get('filename')} has split "
                       f"{split!r}, not one of {KARPATHY_SPLITS}.")
    out.append(dict(
        split=split, filepath=image.get("filepath", ""),
        filename=image["filename"],
        sentences=[s["raw"] for s in image.get("sentences", [])],
        cocoid=image.get("cocoid")))
  return out


def encode_image_file(path: str, stored_size: int) -> bytes:
  """The bytes to store for an image file.

  Args:
    path: an image file (JPEG for COCO, Flickr30K and Visual Genome).
    stored_size: 0 keeps the file's bytes; otherwise the shorter side is
      reduced to stored_size (never enlarged) and the RGB image re-encoded
      as JPEG, quality 90.
  """
  if not stored_size:
    with open(path, "rb") as f:
      return f.read()
  with Image.open(path) as image:
    # JPEG draft mode decodes straight at a reduced scale (DCT scaling), no
    # smaller than asked, which is several times faster than a full decode.
    image.draft("RGB", (stored_size, stored_size))
    image = image.convert("RGB")
    width, height = image.size
    scale = stored_size / min(width, height)
    if scale < 1:
      image = image.resize((max(1, round(width * scale)),
                            max(1, round(height * scale))),
                           Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
  return buffer.getvalue()


def encode_image_files(paths: Sequence[str], stored_size: int,
                       num_threads: int) -> Iterator[bytes]:
  """`encode_image_file` over paths, in order, on a thread pool."""
  # PIL releases the GIL while decoding, resizing and encoding.
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    yield from pool.map(lambda p: encode_image_file(p, stored_size), paths)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
  """Decodes stored image bytes to uint8 [image_size, image_size, 3].

  The shorter side is resized to image_size (bilinear, antialiased), then the
  centre square is cropped: the whole height or width is kept, as in VSE++'s
  evaluation transform but without its 256 -> 224 border crop.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", (image_size, image_size))
    image = image.convert("RGB")
    width, height = image.size
    scale = image_size / min(width, height)
    size = (max(image_size, round(width * scale)),
            max(image_size, round(height * scale)))
    if size != image.size:
      image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, np.uint8)


class JpegRecords:
  """A `tasks.LazyImages` source: the images of one TFDS split, decoded on read.

  Attributes:
    source: the split's array_record data source, opened with the image
      feature left undecoded (`tfds.decode.SkipDecoding`).
    image_size: the side of the square images returned.
    num_threads: decoding threads per read.
  """

  def __init__(self, source: Any, image_size: int, num_threads: int):
    self.source = source
    self.image_size = image_size
    self.num_threads = max(1, num_threads)
    self.row_shape = (image_size, image_size, 3)
    self.dtype = np.dtype(np.uint8)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, rows: np.ndarray) -> np.ndarray:
    """uint8 [len(rows), image_size, image_size, 3] for records `rows`."""
    records = self.source.__getitems__([int(r) for r in rows])
    data = [record["image"] for record in records]
    out = np.empty((len(data),) + self.row_shape, np.uint8)
    if self.num_threads == 1 or len(data) < 4:
      for i, d in enumerate(data):
        out[i] = decode_image(d, self.image_size)
      return out
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      for i, image in enumerate(pool.map(
          lambda d: decode_image(d, self.image_size), data)):
        out[i] = image
    return out


def as_str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def default_threads() -> int:
  return min(16, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class ScannedSplit:
  """A built split's metadata in id order, and its images as a lazy view.

  Attributes:
    ids: int64 [N], sorted.
    captions: N tuples of captions.
    fields: the other requested features, each a list of N values.
    images: LazyImages uint8 [N, image_size, image_size, 3].
  """
  ids: np.ndarray
  captions: tuple[tuple[str, ...], ...]
  fields: dict[str, list[Any]]
  images: tasks.LazyImages


def scan_split(source: Any, image_size: int, num_threads: int,
               fields: Sequence[str] = ()) -> ScannedSplit:
  """Reads ids, captions and `fields` of every record; images stay on disk.

  Args:
    source: the split's data source opened with the image undecoded.
    image_size: the side of the images the lazy view returns.
    num_threads: decoding threads of the lazy view.
    fields: other features to return, e.g. "category_areas".
  """
  ids, captions = [], []
  extra = {name: [] for name in fields}
  n = len(source)
  # In chunks: holding every record's image bytes at once would not fit.
  for start in range(0, n, _SCAN_CHUNK):
    for record in source.__getitems__(list(range(start,
                                                 min(n, start + _SCAN_CHUNK)))):
      ids.append(int(record["id"]))
      captions.append(tuple(as_str(c) for c in record["captions"]))
      for name in fields:
        extra[name].append(record[name])
  # TFDS shuffles records by key when writing: restore id order.
  order = np.argsort(np.asarray(ids, np.int64), kind="stable")
  images = tasks.LazyImages(
      (JpegRecords(source, image_size, num_threads),),
      np.zeros(n, np.int32), order)
  return ScannedSplit(
      ids=np.asarray(ids, np.int64)[order],
      captions=tuple(captions[i] for i in order),
      fields={name: [values[i] for i in order]
              for name, values in extra.items()},
      images=images)


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str,
            check: Callable[[str], None]) -> dict[str, Any]:
  """Builds the dataset if needed; returns its data sources, image undecoded.

  `check(manual_dir)` runs first when the dataset still has to be built, so
  a missing or incomplete manual dir fails before TFDS starts writing; an
  already built dataset needs no manual dir.
  """
  if not builder.is_prepared():
    check(manual_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
  return builder.as_data_source(
      decoders={"image": tfds.decode.SkipDecoding()})


def image_feature() -> tfds.features.Image:
  # Examples hand this feature encoded bytes, stored as they are; reading
  # skips TFDS's decoder (`prepare`), so TensorFlow is never needed.
  return tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")


@dataclasses.dataclass(kw_only=True)
class StoredImagesConfig(tfds.core.BuilderConfig):
  """How images are stored; the name (the cache key) spells it out."""
  stored_image_size: int = DEFAULT_STORED_IMAGE_SIZE


def stored_images_config(stored_image_size: int) -> StoredImagesConfig:
  """The builder config for a stored image size (0 = original bytes)."""
  if stored_image_size < 0:
    raise ValueError(f"stored_image_size={stored_image_size} must be >= 0 "
                     "(0 keeps the original image files).")
  name = f"s{stored_image_size}" if stored_image_size else "original"
  return StoredImagesConfig(
      name=name, description=f"Images stored as {name}.",
      stored_image_size=stored_image_size)


def make_builder(cls: type, data_dir: str,
                 config: StoredImagesConfig) -> tfds.core.DatasetBuilder:
  """A builder of `cls` for `config`, writing array_record under data_dir."""
  registered = cls.builder_configs.get(config.name)
  # TFDS refuses a fresh config object that shares a registered config's name.
  builder_config = registered if registered == config else config
  return cls(data_dir=data_dir, config=builder_config,
             file_format="array_record")


def data_option(data_config, name: str, default: Any) -> Any:
  """data_config.name if set, else default (configs may omit optional fields)."""
  value = data_config.get(name, None)
  return default if value is None else value


# ----------------------------------------------------------------------------
# COCO.


def required_files() -> dict[str, str]:
  """COCO manual-dir layout: relative path -> where to get it."""
  return {
      "dataset_coco.json": KARPATHY_URL,
      "annotations/captions_train2014.json": _COCO_URLS["annotations"],
      "annotations/captions_val2014.json": _COCO_URLS["annotations"],
      "annotations/instances_train2014.json": _COCO_URLS["annotations"],
      "annotations/instances_val2014.json": _COCO_URLS["annotations"],
      "train2014/": _COCO_URLS["train2014"],
      "val2014/": _COCO_URLS["val2014"],
  }


def check_coco_manual_dir(manual_dir: str) -> None:
  check_manual_dir(manual_dir, required_files(), "COCO")


def read_captions(paths: Sequence[str]) -> dict[int, list[str]]:
  """COCO image id -> its captions ordered by annotation id."""
  by_image = collections.defaultdict(list)
  for path in paths:
    for annotation in read_json(path)["annotations"]:
      by_image[int(annotation["image_id"])].append(
          (int(annotation["id"]), annotation["caption"].strip()))
  return {image: [c for _, c in sorted(caps)]
          for image, caps in by_image.items()}


def read_category_areas(paths: Sequence[str]) -> dict[int, np.ndarray]:
  """COCO image id -> float32 [80] summed annotation area per category.

  Raises:
    ValueError: a file's categories are not the 80 of COCO_CATEGORIES.
  """
  areas = collections.defaultdict(lambda: np.zeros(len(COCO_CATEGORIES),
                                                   np.float32))
  for path in paths:
    instances = read_json(path)
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


class CcrCoco(tfds.core.GeneratorBasedBuilder):
  """COCO 2014 images, 5 captions and 80 category areas, Karpathy splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [stored_images_config(DEFAULT_STORED_IMAGE_SIZE),
                     stored_images_config(0)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
      f"{path}: {where}" for path, where in required_files().items())
  # See synthetic.CcrSynthetic: no checksums file to look for.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MS-COCO 2014 with Karpathy splits and category areas.",
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "file_name": tfds.features.Text(),
            "image": image_feature(),
            "captions": tfds.features.Sequence(tfds.features.Text(),
                                               length=CAPTIONS_PER_IMAGE),
            "category_areas": tfds.features.Tensor(
                shape=(len(COCO_CATEGORIES),), dtype=np.float32),
        }),
        homepage="https://cocodataset.org",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    check_coco_manual_dir(manual_dir)
    images = read_karpathy(os.path.join(manual_dir, "dataset_coco.json"))
    check_images_exist(
        [os.path.join(manual_dir, im["filepath"], im["filename"])
         for im in images], "COCO",
        f"{_COCO_URLS['train2014']} and {_COCO_URLS['val2014']}")
    annotations = os.path.join(manual_dir, "annotations")
    captions = read_captions(
        [os.path.join(annotations, f"captions_{s}2014.json")
         for s in ("train", "val")])
    areas = read_category_areas(
        [os.path.join(annotations, f"instances_{s}2014.json")
         for s in ("train", "val")])
    # Only splits with images: Flickr30K-style files have no restval.
    return {split: self._generate_examples(
        manual_dir, [im for im in images if im["split"] == split], captions,
        areas) for split in KARPATHY_SPLITS
            if any(im["split"] == split for im in images)}

  def _generate_examples(self, manual_dir, images, captions, areas):
    config = self.builder_config
    paths = [os.path.join(manual_dir, im["filepath"], im["filename"])
             for im in images]
    encoded = encode_image_files(paths, config.stored_image_size,
                                 default_threads())
    for image, data in zip(images, encoded):
      coco_id = int(image["cocoid"])
      caps = captions.get(coco_id, [])
      if len(caps) < CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"COCO image {coco_id} ({image['filename']}) has {len(caps)} "
            f"captions in captions_*2014.json; {CAPTIONS_PER_IMAGE} needed.")
      yield coco_id, dict(
          id=coco_id, file_name=image["filename"], image=data,
          captions=caps[:CAPTIONS_PER_IMAGE],
          category_areas=areas.get(coco_id, np.zeros(len(COCO_CATEGORIES),
                                                     np.float32)))


def split_from_scan(scanned: ScannedSplit,
                    category_areas: np.ndarray | None) -> tasks.Split:
  """A Split of a scanned split; categories = dominant category or -1."""
  categories = (np.zeros(len(scanned.ids), np.int32)
                if category_areas is None
                else tasks.dominant_categories(category_areas))
  return tasks.Split(images=scanned.images, captions=scanned.captions,
                     categories=categories, ids=scanned.ids,
                     category_areas=category_areas)


def load(data_config, data_dir: str) -> tasks.Dataset:
  """Builds COCO in data_dir if needed and opens it, images lazily.

  Args:
    data_config: ConfigDict with manual_dir (read only when building),
      image_size (side of the square images the model sees), optional
      stored_image_size (default 256; 0 = original bytes), decode_threads
      (0 = one per CPU, at most 16) and use_restval (default True: Karpathy
      restval joins train).
    data_dir: where the TFDS dataset is built and cached.

  Returns:
    The Dataset: Splits with LazyImages uint8 [N, image_size, image_size, 3],
    5 captions each, `category_areas` float32 [N, 80] and COCO image ids.
  """
  threads = data_option(data_config, "decode_threads", 0) or default_threads()
  config = stored_images_config(
      data_option(data_config, "stored_image_size", DEFAULT_STORED_IMAGE_SIZE))
  builder = make_builder(CcrCoco, data_dir, config)
  sources = prepare(builder, data_option(data_config, "manual_dir", ""),
                    check_coco_manual_dir)
  parts = {}
  for split in KARPATHY_SPLITS:
    if split not in sources:
      raise ValueError(f"The COCO dataset in {data_dir} has no {split!r} "
                       "split: dataset_coco.json lists no such images.")
    scanned = scan_split(sources[split], data_config.image_size, threads,
                         ("category_areas",))
    areas = np.asarray(scanned.fields["category_areas"], np.float32).reshape(
        len(scanned.ids), len(COCO_CATEGORIES))
    parts[split] = split_from_scan(scanned, areas)
  use_restval = data_option(data_config, "use_restval", True)
  splits = dict(
      train=(tasks.Split.concatenate([parts["train"], parts["restval"]])
             if use_restval else parts["train"]),
      val=parts["val"], test=parts["test"])
  return tasks.Dataset(
      splits=splits, category_names=CATEGORY_NAMES,
      category_aliases=SUPERCATEGORIES,
      details=dict(
          source="coco", builder=f"{builder.name}/{config.name}",
          splits="Karpathy " + ("train + restval" if use_restval else "train")
          + " / val / test",
          captions="the first 5 captions of each image by annotation id",
          category_areas="summed area of each category's instance "
                         "annotations (crowd included)",
          images=f"shorter side to {data_config.image_size}, centre crop"))
