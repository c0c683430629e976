"""The shared base of the manual-dir sources: COCO, Flickr30K and Visual Genome.

Each of them reads files the user downloaded into a manual dir, writes a TFDS
dataset of (id, stored JPEG, 5 captions, its own fields) as `array_record`,
and reads it back without TensorFlow, images lazily. What they share is here:

- checking the manual dir (`check_manual_dir`, `check_images_exist`): a
  missing file is named with where to get it; nothing is downloaded;
- reading Karpathy's split files (`read_karpathy`), JSON through
  `ccr_jax.files.read_json` (a syntax error names the file, line and column);
- how images are stored (`StoredImagesConfig`: shorter side at 256, or the
  original bytes) and the one builder body, `ManualDirBuilder`: a source
  supplies its files, its extra features and its examples (`_examples`);
- opening a built dataset (`open_dataset`): build if needed, then scan each
  split's ids, captions and fields while images stay on disk
  (`images.JpegRecords`);
- keying a build on its sources (`source_key`): a built dataset records the
  size, mtime and SHA-256 of the annotation files it was built from
  (`SOURCES_FILE`, beside TFDS's dataset_info.json). Given a manual dir that
  holds those files, `open_dataset` reuses the dataset only if they still
  hold the same bytes, and otherwise deletes and rebuilds it, so a fixed
  annotation file takes effect. A dataset without the record (built by older
  code, or by a run killed before writing it) is rebuilt the same way.
  Without a manual dir (or with its annotation files gone) a built dataset
  is reused as it is. Image files are not part of the key (hashing 123k of
  them would cost as much as the build): after replacing an image, delete
  the dataset by hand. A build that fails leaves nothing behind: TFDS writes
  into a temporary folder and renames it only once every split is written,
  and a split the annotations leave empty fails the build before any image
  is encoded.

Usage (in a source):
  class CcrFoo(manual.ManualDirBuilder):
    DATASET = "Foo"; REQUIRED_FILES = {...}; ...
    def _features(self): return {"file_name": tfds.features.Text()}
    def _examples(self, manual_dir): return {"train": [manual.Example(...)]}

  builder, scanned = manual.open_dataset(CcrFoo, data_config, data_dir)
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.data import images
from ccr_jax.data import registry
from ccr_jax.data import tasks

KARPATHY_URL = ("https://cs.stanford.edu/people/karpathy/deepimagesent/"
                "caption_datasets.zip")
# The splits of Karpathy's dataset_*.json files (Flickr30K has no restval).
KARPATHY_SPLITS = ("train", "restval", "val", "test")
CAPTIONS_PER_IMAGE = 5
DEFAULT_STORED_IMAGE_SIZE = 256
# Records read per call when scanning a split's captions and labels.
_SCAN_CHUNK = 512
# In a built dataset's folder: the `source_key` of the files it was built from.
SOURCES_FILE = "ccr_sources.json"

# The `data` keys every manual-dir source reads (registered by each; declared
# once here).
CONFIG_KEYS = {
    "manual_dir": schema.Key(
        "", "the directory of the downloaded files (manual-dir sources); read "
        "only when building; '' = not set"),
    "stored_image_size": schema.Key(
        ml_collections.FieldReference(None, field_type=int),
        "shorter side of the JPEGs stored in the built dataset, 0 = the "
        f"original files; None = {DEFAULT_STORED_IMAGE_SIZE}",
        registry.optional(schema.at_least(0, True))),
    "decode_threads": schema.Key(
        0, "threads decoding images (manual-dir sources); 0 = one per CPU, "
        "at most 16", schema.at_least(0, True)),
}


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


def read_karpathy(path: str) -> list[dict[str, Any]]:
  """The images of a Karpathy `dataset_*.json`, in file order.

  Returns:
    dicts with `split` ("train", "restval", "val" or "test"), `filepath`
    (the image folder, "" if none), `filename`, `sentences` (raw caption
    strings) and `cocoid` (None outside COCO).

  Raises:
    ValueError: the file is not valid JSON (naming it, the line and column),
      or lists an image of another split.
  """
  out = []
  for image in files.read_json(path)["images"]:
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


def source_key(manual_dir: str,
               paths: Sequence[str]) -> dict[str, dict[str, Any]]:
  """What a build is keyed on: the size, mtime and SHA-256 of each file.

  Args:
    manual_dir: the manual dir.
    paths: the annotation files, relative to manual_dir.

  Returns:
    relative path -> {"size": bytes, "mtime_ns": int, "sha256": hex}.
  """
  key = {}
  for path in paths:
    full = os.path.join(manual_dir, path)
    stat = os.stat(full)
    key[path] = dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                     sha256=files.sha256(full))
  return key


def same_sources(key: Mapping[str, Mapping[str, Any]],
                 manual_dir: str) -> bool:
  """Whether the files of `key` (a `source_key`) still hold the same bytes.

  The SHA-256 is read only for a file of the same size but another mtime (a
  copy of the manual dir, or the same files on another host), so an
  untouched manual dir costs a stat per file.
  """
  for path, recorded in key.items():
    full = os.path.join(manual_dir, path)
    stat = os.stat(full)
    if stat.st_size != recorded["size"]:
      return False
    if (stat.st_mtime_ns != recorded["mtime_ns"]
        and files.sha256(full) != recorded["sha256"]):
      return False
  return True


def as_str(value: Any) -> str:
  """A stored text feature (bytes or str) as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------
# The TFDS builder every manual-dir source shares.


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


@dataclasses.dataclass(frozen=True)
class Example:
  """One example to write, before its image is read.

  Attributes:
    key: the example's id (its `id` feature and TFDS key).
    image_path: its image file in the manual dir.
    features: every other feature (captions and the source's own).
  """
  key: int
  image_path: str
  features: dict[str, Any]


class ManualDirBuilder(registry.BuildMessages, tfds.core.GeneratorBasedBuilder):
  """Images (stored as `StoredImagesConfig` says), ids, 5 captions and more.

  A source subclasses it with the class attributes below and two methods,
  `_features` and `_examples`; the class name is the dataset's name in
  data_dir (CcrCoco -> ccr_coco), so it must not change.

  Attributes:
    DATASET: the dataset's name in messages ("COCO").
    DESCRIPTION, HOMEPAGE: for the TFDS DatasetInfo.
    REQUIRED_FILES: the manual-dir layout, relative path (a trailing "/" is a
      folder) -> where to get it.
    IMAGES_FROM: where the image archives come from (for missing images).
    SPLITS: the splits `load` needs.
    SPLITS_FROM: why a split could be missing (ends the error message).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [stored_images_config(DEFAULT_STORED_IMAGE_SIZE),
                     stored_images_config(0)]
  # See synthetic.CcrSynthetic: no checksums file to look for.
  code_path = None

  DATASET: str
  DESCRIPTION: str
  HOMEPAGE: str
  REQUIRED_FILES: Mapping[str, str]
  IMAGES_FROM: str
  SPLITS: tuple[str, ...] = tasks.SPLIT_NAMES
  SPLITS_FROM: str

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # TFDS hands dl_manager.manual_dir only to builders with instructions.
    cls.MANUAL_DOWNLOAD_INSTRUCTIONS = "\n".join(
        f"{path}: {where}" for path, where in cls.REQUIRED_FILES.items())

  @classmethod
  def check_files(cls, manual_dir: str) -> None:
    """`check_manual_dir` for this source's layout."""
    check_manual_dir(manual_dir, cls.REQUIRED_FILES, cls.DATASET)

  @classmethod
  def source_files(cls) -> list[str]:
    """The annotation files a build is keyed on: REQUIRED_FILES but folders."""
    return [path for path in cls.REQUIRED_FILES if not path.endswith("/")]

  @abc.abstractmethod
  def _features(self) -> dict[str, Any]:
    """The features beside id, image and captions: name -> TFDS feature."""

  @abc.abstractmethod
  def _examples(self, manual_dir: str) -> dict[str, list[Example]]:
    """The examples of each split, from the (checked) manual dir's files."""

  def _info(self) -> tfds.core.DatasetInfo:
    # Examples hand the image feature encoded bytes, stored as they are;
    # reading skips TFDS's decoder (`open_dataset`), so TensorFlow is never
    # needed.
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "captions": tfds.features.Sequence(tfds.features.Text(),
                                               length=CAPTIONS_PER_IMAGE),
            **self._features(),
        }))

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    self.check_files(manual_dir)
    by_split = self._examples(manual_dir)
    # Before any image is encoded: `open_dataset` needs every split.
    missing = [split for split in self.SPLITS if not by_split.get(split)]
    if missing:
      path = os.path.join(manual_dir, self.source_files()[0])
      raise ValueError(f"{self.DATASET} has no {missing} images ({path}): "
                       f"{self.SPLITS_FROM}; fix the files and run again.")
    check_images_exist(
        [e.image_path for examples in by_split.values() for e in examples],
        self.DATASET, self.IMAGES_FROM)
    # Only splits with images: Flickr30K's Karpathy file has no restval.
    return {split: self._generate_examples(examples)
            for split, examples in by_split.items() if examples}

  def _generate_examples(self, examples: Sequence[Example]):
    encoded = images.encode_image_files(
        [e.image_path for e in examples],
        self.builder_config.stored_image_size, images.default_threads())
    for example, data in zip(examples, encoded):
      yield example.key, dict(example.features, id=example.key, image=data)


def make_builder(cls: type, data_dir: str,
                 config: StoredImagesConfig) -> tfds.core.DatasetBuilder:
  """A builder of `cls` for `config`, writing array_record under data_dir."""
  registered = cls.builder_configs.get(config.name)
  # TFDS refuses a fresh config object that shares a registered config's name.
  builder_config = registered if registered == config else config
  return cls(data_dir=data_dir, config=builder_config,
             file_format="array_record")


# ----------------------------------------------------------------------------
# Reading a built dataset.


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
  info = getattr(source, "dataset_info", None)
  where = (f"{info.data_dir} ({source.split} split)" if info is not None
           else repr(source))
  lazy = tasks.LazyImages(
      (images.JpegRecords(source, image_size, num_threads, where),),
      np.zeros(n, np.int32), order)
  return ScannedSplit(
      ids=np.asarray(ids, np.int64)[order],
      captions=tuple(captions[i] for i in order),
      fields={name: [values[i] for i in order]
              for name, values in extra.items()},
      images=lazy)


def split_from_scan(scanned: ScannedSplit,
                    category_areas: np.ndarray | None) -> tasks.Split:
  """A Split of a scanned split; categories = dominant category, -1 if none.

  Args:
    category_areas: float32 [N, num_categories], or None: every example then
      has category 0 (one-category datasets such as Flickr30K).
  """
  categories = (np.zeros(len(scanned.ids), np.int32)
                if category_areas is None
                else tasks.dominant_categories(category_areas))
  return tasks.Split(images=scanned.images, captions=scanned.captions,
                     categories=categories, ids=scanned.ids,
                     category_areas=category_areas)


def open_dataset(cls: type, data_config: Any, data_dir: str,
                 fields: Sequence[str] = ()
                 ) -> tuple[str, dict[str, ScannedSplit]]:
  """Builds `cls`'s dataset in data_dir if needed; scans every split.

  The manual dir is checked (and read) only when the dataset still has to be
  built, so a missing or incomplete one fails before TFDS starts writing,
  and an already built dataset needs none. A built dataset whose annotation
  files have changed since (or are unknown: see the module docstring) is
  deleted and rebuilt.

  Args:
    cls: a ManualDirBuilder subclass.
    data_config: reads manual_dir, stored_image_size, decode_threads
      (`CONFIG_KEYS`) and image_size.
    data_dir: where the TFDS dataset is built and cached.
    fields: features to scan beside ids and captions.

  Returns:
    "<builder>/<config>" (for results.json) and split -> ScannedSplit, for
    every split the dataset has.

  Raises:
    ValueError: a split of `cls.SPLITS` is missing.
  """
  threads = (data_config.decode_threads
             or images.default_threads())
  config = stored_images_config(registry.option(
      data_config, "stored_image_size", DEFAULT_STORED_IMAGE_SIZE))
  builder = make_builder(cls, data_dir, config)
  manual_dir = data_config.manual_dir
  if builder.is_prepared() and _built_from_other_files(cls, builder.data_dir,
                                                       manual_dir):
    logging.warning("%s: rebuilding %s, built from other files than those "
                    "in %s.", cls.DATASET, builder.data_dir, manual_dir)
    shutil.rmtree(builder.data_dir)
    builder = make_builder(cls, data_dir, config)
  if not builder.is_prepared():
    cls.check_files(manual_dir)
    # Keyed before reading: a file edited during the build rebuilds next time.
    key = source_key(manual_dir, cls.source_files())
    with files.writing(data_dir):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir, try_download_gcs=False))
    # After TFDS's rename: a run killed in between leaves a dataset without
    # a key, which is rebuilt like one of older code.
    files.write_json(os.path.join(builder.data_dir, SOURCES_FILE), key)
  sources = builder.as_data_source(
      decoders={"image": tfds.decode.SkipDecoding()})
  missing = [split for split in cls.SPLITS if split not in sources]
  if missing:  # Only a dataset built by older code, which did not check.
    raise ValueError(
        f"The built {cls.DATASET} dataset has no {missing} split(s) "
        f"({builder.data_dir}): {cls.SPLITS_FROM}; fix the files and run "
        "again with data.manual_dir set, which rebuilds it.")
  scanned = {split: scan_split(source, data_config.image_size, threads, fields)
             for split, source in sources.items()}
  return f"{builder.name}/{config.name}", scanned


def _built_from_other_files(cls: type, dataset_dir: str,
                            manual_dir: str) -> bool:
  """Whether a built dataset must be rebuilt from manual_dir's files."""
  paths = cls.source_files()
  if not manual_dir or not all(
      os.path.isfile(os.path.join(manual_dir, p)) for p in paths):
    return False  # Nothing to compare with: the built dataset is all there is.
  try:
    key = files.read_json(os.path.join(dataset_dir, SOURCES_FILE))
  except (OSError, ValueError):
    return True  # Built by older code, or killed before writing its key.
  return set(key) != set(paths) or not same_sources(key, manual_dir)
