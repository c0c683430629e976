"""Image files to stored bytes, stored bytes to pixels; a bad image names its file.

The manual-dir sources (COCO, Flickr30K, Visual Genome) store each image in
their TFDS dataset as JPEG bytes (`encode_image_file`) and decode the rows a
batch asks for (`JpegRecords`, a `tasks.LazyImages` source). A truncated or
unreadable image raises a one-line ValueError naming the file (at build
time) or the built record (at read time: its dataset directory, split, id and
the image's file name where the source stores one) and what to do, instead of
PIL's bare "image file is truncated". Every image is decoded once at build
time, so a bad file fails the build, not a training batch.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

# What PIL raises for a file it cannot read: UnidentifiedImageError and
# "image file is truncated" are OSErrors; some decoders raise SyntaxError
# ("broken PNG file") or ValueError.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError)


def default_threads() -> int:
  """Threads for encoding or decoding images: one per CPU, at most 16."""
  return min(16, os.cpu_count() or 1)


def _reason(error: Exception) -> str:
  # One line: PIL's messages are short, but keep a stray newline out.
  return " ".join(f"{type(error).__name__}: {error}".split())


def encode_image_file(path: str, stored_size: int) -> bytes:
  """The bytes to store for an image file.

  Args:
    path: an image file (JPEG for COCO, Flickr30K and Visual Genome).
    stored_size: 0 keeps the file's bytes (after checking that they decode);
      otherwise the shorter side is reduced to stored_size (never enlarged)
      and the RGB image re-encoded as JPEG, quality 90.

  Raises:
    ValueError: the file is truncated or not an image; one line naming it.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as image:
      # JPEG draft mode decodes straight at a reduced scale (DCT scaling), no
      # smaller than asked, which is several times faster than a full decode;
      # it still reads every byte, so a truncated file fails here, at build
      # time, rather than in a training batch.
      image.draft("RGB", (stored_size or 1, stored_size or 1))
      image = image.convert("RGB")
      if not stored_size:
        return data
      width, height = image.size
      scale = stored_size / min(width, height)
      if scale < 1:
        image = image.resize((max(1, round(width * scale)),
                              max(1, round(height * scale))),
                             Image.Resampling.BICUBIC)
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
  except FileNotFoundError:
    raise
  except _IMAGE_ERRORS as e:
    raise ValueError(
        f"{path}: cannot read this image ({_reason(e)}); replace it with an "
        "intact copy from the dataset's archive (extract it again) and "
        "rerun.") from e


def encode_image_files(paths: Sequence[str], stored_size: int,
                       num_threads: int) -> Iterator[bytes]:
  """`encode_image_file` over paths, in order, on a thread pool."""
  # PIL releases the GIL while decoding, resizing and encoding.
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    yield from pool.map(lambda p: encode_image_file(p, stored_size), paths)


def decode_image(data: bytes, image_size: int,
                 what: str = "stored image") -> np.ndarray:
  """Decodes stored image bytes to uint8 [image_size, image_size, 3].

  The shorter side is resized to image_size (bilinear, antialiased), then the
  centre square is cropped: the whole height or width is kept, as in VSE++'s
  evaluation transform but without its 256 -> 224 border crop.

  Args:
    data: the stored bytes (JPEG).
    image_size: the side of the square returned.
    what: names the image in an error (e.g. its record in a built dataset).

  Raises:
    ValueError: the bytes do not decode; one line naming `what`.
  """
  try:
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
  except _IMAGE_ERRORS as e:
    raise ValueError(
        f"{what}: cannot decode ({_reason(e)}); the built dataset is damaged: "
        "delete it from data_dir and run again to rebuild it from the manual "
        "dir.") from e


class JpegRecords:
  """A `tasks.LazyImages` source: the images of one TFDS split, decoded on read.

  Attributes:
    source: the split's array_record data source, opened with the image
      feature left undecoded (`tfds.decode.SkipDecoding`); records have
      "image" (bytes) and "id".
    image_size: the side of the square images returned.
    num_threads: decoding threads per read.
    where: names the split in errors (its dataset directory and split).
  """

  def __init__(self, source: Any, image_size: int, num_threads: int,
               where: str = ""):
    self.source = source
    self.image_size = image_size
    self.num_threads = max(1, num_threads)
    self.where = where or repr(source)
    self.row_shape = (image_size, image_size, 3)
    self.dtype = np.dtype(np.uint8)

  def __len__(self) -> int:
    return len(self.source)

  def _decode(self, record: dict) -> np.ndarray:
    what = f"{self.where}, image id {int(record['id'])}"
    name = record.get("file_name")
    if name is not None:  # COCO and Flickr30K keep the image's file name.
      what += f" ({name.decode() if isinstance(name, bytes) else name})"
    return decode_image(record["image"], self.image_size, what)

  def read(self, rows: np.ndarray) -> np.ndarray:
    """uint8 [len(rows), image_size, image_size, 3] for records `rows`."""
    records = self.source.__getitems__([int(r) for r in rows])
    out = np.empty((len(records),) + self.row_shape, np.uint8)
    if self.num_threads == 1 or len(records) < 4:
      for i, record in enumerate(records):
        out[i] = self._decode(record)
      return out
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      for i, image in enumerate(pool.map(self._decode, records)):
        out[i] = image
    return out
