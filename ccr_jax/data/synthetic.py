"""The embedded benchmark: coloured shapes on textured backgrounds + captions.

Every image holds one main object (its category is the example's category) and
up to `max_distractors` smaller objects of other shapes and colours. Each image
gets 5 captions from a small grammar with synonyms and varied word order that
mention the main object's category, colour, size and position, so retrieval
needs more than the category. Everything is rendered with NumPy from a seed:
no download, and the same parameters always give the same bytes.

The data is a TFDS `GeneratorBasedBuilder` written as `array_record`, so it is
cached in `data_dir` and read back with `as_data_source()` without TensorFlow.

Registered as the `synthetic` source (`load`, `CONFIG_KEYS`).

Usage:
  splits = load_synthetic("/tmp/tfds", train_per_category=200)
  splits["train"].images  # uint8 [N, 32, 32, 3]
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.data import registry
from ccr_jax.data import tasks

# Shape names, most distinguishable at 32x32 first: a config with
# num_categories=12 uses the first 12. The first synonym is the category name
# as it appears in captions (CATEGORY_NAMES is the ClassLabel name).
_CATEGORY_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("circle", "disc", "round dot"),
    ("square", "box", "block"),
    ("triangle", "triangular shape", "wedge"),
    ("plus", "plus sign", "cross"),
    ("ring", "hoop", "donut"),
    ("diamond", "rhombus", "lozenge"),
    ("star", "five-pointed star", "starburst"),
    ("arrow", "pointer", "right arrow"),
    ("bar", "rod", "plank"),
    ("crescent", "moon", "sickle"),
    ("ellipse", "oval", "egg"),
    ("x", "x mark", "saltire"),
    ("heart", "love heart", "heart shape"),
    ("hexagon", "six-sided shape", "hex"),
    ("semicircle", "dome", "half-disc"),
    ("frame", "border", "hollow frame"),
)
CATEGORY_NAMES: tuple[str, ...] = (
    "circle", "square", "triangle", "plus", "ring", "diamond", "star", "arrow",
    "bar", "crescent", "ellipse", "xmark", "heart", "hexagon", "semicircle",
    "frame",
)
CATEGORY_SYNONYMS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    dict(zip(CATEGORY_NAMES, _CATEGORY_SYNONYMS)))

# Saturated colours that stay apart from each other and from the dark,
# low-contrast backgrounds below.
COLOUR_NAMES: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
    "white")
COLOUR_RGB: tuple[tuple[int, int, int], ...] = (
    (225, 35, 35), (250, 140, 15), (245, 225, 40), (40, 185, 60),
    (30, 215, 225), (45, 85, 240), (150, 55, 215), (250, 105, 195),
    (245, 245, 245))
_COLOUR_SYNONYMS = (
    ("red", "crimson", "scarlet"), ("orange", "amber", "tangerine"),
    ("yellow", "golden", "lemon"), ("green", "emerald", "grassy green"),
    ("cyan", "turquoise", "aqua"), ("blue", "cobalt", "royal blue"),
    ("purple", "violet", "lilac"), ("pink", "magenta", "rose"),
    ("white", "ivory", "snowy"))
COLOUR_SYNONYMS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    dict(zip(COLOUR_NAMES, _COLOUR_SYNONYMS)))

SIZE_NAMES: tuple[str, ...] = ("small", "medium", "large")
# Side of the object's box as a fraction of the image side: 9, 13 and 18
# pixels at 32x32, far enough apart to be told apart despite the jitter.
_SIZE_FRACTIONS = (0.28, 0.41, 0.56)
_DISTRACTOR_FRACTION = 0.22
_SIZE_SYNONYMS = (
    ("small", "tiny", "little"), ("medium", "medium-sized", "mid-sized"),
    ("large", "big", "huge"))
SIZE_SYNONYMS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    dict(zip(SIZE_NAMES, _SIZE_SYNONYMS)))

# Row-major 3x3 grid: position = 3 * row + column.
POSITION_NAMES: tuple[str, ...] = (
    "top_left", "top", "top_right", "left", "center", "right", "bottom_left",
    "bottom", "bottom_right")

_SPLITS = ("train", "val", "test")
_MAX_IMAGE_SIZE = 256
_MIN_IMAGE_SIZE = 16
# Each pixel's coverage is averaged over SUPERSAMPLE x SUPERSAMPLE points, so
# 9-pixel shapes keep their outline instead of aliasing into blobs.
_SUPERSAMPLE = 4


# ----------------------------------------------------------------------------
# Shapes: each maps box coordinates u (right, [1, W]) and v (down, [H, 1]),
# both in [-1, 1], to a boolean "inside" mask [H, W].


def _inside_polygon(u: np.ndarray, v: np.ndarray,
                    vertices: Sequence[tuple[float, float]]) -> np.ndarray:
  """Even-odd rule point-in-polygon test, vectorised over the points."""
  inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
  for (x0, y0), (x1, y1) in zip(vertices, vertices[1:] + vertices[:1]):
    if y0 == y1:  # A horizontal edge never crosses a horizontal ray.
      continue
    crosses = (y0 > v) != (y1 > v)
    x_at_v = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (u < x_at_v)
  return inside


def _regular_polygon(num_vertices: int, radius: float, start_angle: float,
                     inner_radius: float | None = None
                     ) -> tuple[tuple[float, float], ...]:
  """Vertices of a regular polygon (or a star when inner_radius is given)."""
  step = 2 * math.pi / num_vertices
  vertices = []
  for k in range(num_vertices):
    angle = start_angle + k * step
    vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    if inner_radius is not None:
      angle += step / 2
      vertices.append(
          (inner_radius * math.cos(angle), inner_radius * math.sin(angle)))
  return tuple(vertices)


_TRIANGLE = ((0.0, -0.95), (0.95, 0.8), (-0.95, 0.8))
_STAR = _regular_polygon(5, 1.0, -math.pi / 2, inner_radius=0.42)
_HEXAGON = _regular_polygon(6, 0.95, 0.0)
_ARROW = ((-0.95, -0.3), (0.1, -0.3), (0.1, -0.8), (0.95, 0.0), (0.1, 0.8),
          (0.1, 0.3), (-0.95, 0.3))


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  x, y = 1.15 * u, 0.12 - 1.15 * v  # The implicit heart curve has y up.
  return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0


_SHAPE_MASKS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 0.95 ** 2,
    lambda u, v: np.maximum(abs(u), abs(v)) <= 0.8,
    lambda u, v: _inside_polygon(u, v, _TRIANGLE),
    lambda u, v: ((abs(u) <= 0.28) & (abs(v) <= 0.95)) | (
        (abs(v) <= 0.28) & (abs(u) <= 0.95)),
    lambda u, v: (u * u + v * v <= 0.95 ** 2) & (u * u + v * v >= 0.45 ** 2),
    lambda u, v: abs(u) + abs(v) <= 0.95,
    lambda u, v: _inside_polygon(u, v, _STAR),
    lambda u, v: _inside_polygon(u, v, _ARROW),
    lambda u, v: (abs(u) <= 0.95) & (abs(v) <= 0.3),
    lambda u, v: (u * u + v * v <= 0.9 ** 2) & (
        (u - 0.45) ** 2 + v * v > 0.75 ** 2),
    lambda u, v: (u / 0.5) ** 2 + (v / 0.95) ** 2 <= 1,
    lambda u, v: ((abs(u - v) <= 0.4) | (abs(u + v) <= 0.4)) & (
        np.maximum(abs(u), abs(v)) <= 0.9),
    _heart,
    lambda u, v: _inside_polygon(u, v, _HEXAGON),
    lambda u, v: (u * u + (v - 0.4) ** 2 <= 0.95 ** 2) & (v <= 0.4),
    lambda u, v: (np.maximum(abs(u), abs(v)) <= 0.85) & (
        np.maximum(abs(u), abs(v)) >= 0.45),
)
assert len(_SHAPE_MASKS) == len(CATEGORY_NAMES) == len(_CATEGORY_SYNONYMS)


# ----------------------------------------------------------------------------
# Rendering.


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object in a scene; `box_side` and the centre are in pixels."""
  category: int
  colour: int
  box_side: float
  centre_x: float
  centre_y: float


def _cell_centre(position: int, box_side: float, image_size: int,
                 rng: np.random.Generator) -> tuple[float, float]:
  """Pixel centre (x, y) of a box in a 3x3 grid cell, kept inside the image."""
  low = box_side / 2 + 1
  high = image_size - box_side / 2 - 1
  anchors = (low, image_size / 2, high)
  row, column = divmod(position, 3)
  # Jitter stays well below the gap between anchors (>= 6 px at 32x32).
  jitter = rng.uniform(-1.0, 1.0, size=2) * 0.04 * image_size
  x = min(max(anchors[column] + float(jitter[0]), low), high)
  y = min(max(anchors[row] + float(jitter[1]), low), high)
  return x, y


def render_background(image_size: int, rng: np.random.Generator) -> np.ndarray:
  """A dark, low-contrast background: noise, stripes or a gradient.

  Returns:
    float32 [image_size, image_size, 3], values in about [0, 130].
  """
  base = rng.uniform(25, 85) + rng.uniform(-10, 10, size=3)
  coordinate = np.arange(image_size, dtype=np.float32) / image_size
  angle = rng.uniform(0, math.pi)
  along = (coordinate[None, :] * math.cos(angle) +
           coordinate[:, None] * math.sin(angle))
  kind = rng.integers(3)
  if kind == 0:  # Blotchy noise: coarse noise upsampled to full size.
    cells = max(2, image_size // 8)
    coarse = rng.normal(0, 10, size=(cells, cells))
    pattern = np.kron(coarse, np.ones((image_size // cells + 1,) * 2))
    pattern = pattern[:image_size, :image_size]
  elif kind == 1:  # Stripes with a random period and orientation.
    period = rng.uniform(0.12, 0.35)
    pattern = 12 * np.sin(2 * math.pi * along / period + rng.uniform(0, 6.3))
  else:  # Linear gradient.
    pattern = 40 * (along - along.mean())
  image = base[None, None, :] + pattern[:, :, None]
  image = image + rng.normal(0, 4, size=image.shape)
  return image.astype(np.float32)


def _draw_object(image: np.ndarray, obj: SceneObject,
                 rgb: Sequence[float]) -> None:
  """Composites an anti-aliased object into image (float [H, W, 3]) in place.

  In place because a scene is layered: distractors first, then the main object.
  """
  size = image.shape[0]
  half = obj.box_side / 2
  x0 = max(0, int(math.floor(obj.centre_x - half)))
  x1 = min(size, int(math.ceil(obj.centre_x + half)))
  y0 = max(0, int(math.floor(obj.centre_y - half)))
  y1 = min(size, int(math.ceil(obj.centre_y + half)))
  offsets = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
  xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
  ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
  u = ((xs - obj.centre_x) / half)[None, :]
  v = ((ys - obj.centre_y) / half)[:, None]
  inside = _SHAPE_MASKS[obj.category](u, v)
  alpha = inside.reshape(
      y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
  patch = image[y0:y1, x0:x1]
  patch += alpha[:, :, None] * (np.asarray(rgb, np.float32) - patch)


def sample_scene(category: int, num_categories: int, image_size: int,
                 max_distractors: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict[str, int], list[SceneObject]]:
  """Renders one scene whose main object has the given category.

  Returns:
    image: uint8 [image_size, image_size, 3].
    labels: the main object's `colour`, `size` and `position` indices.
    distractors: the extra objects, drawn under the main one.
  """
  colour = int(rng.integers(len(COLOUR_NAMES)))
  size = int(rng.integers(len(SIZE_NAMES)))
  position = int(rng.integers(len(POSITION_NAMES)))
  image = render_background(image_size, rng)

  distractors = []
  num_distractors = int(rng.integers(max_distractors + 1))
  other_categories = [c for c in range(num_categories) if c != category]
  other_colours = [c for c in range(len(COLOUR_NAMES)) if c != colour]
  other_positions = [p for p in range(len(POSITION_NAMES)) if p != position]
  for _ in range(num_distractors):
    side = _DISTRACTOR_FRACTION * image_size * rng.uniform(0.9, 1.1)
    x, y = _cell_centre(int(rng.choice(other_positions)), side, image_size,
                        rng)
    distractor = SceneObject(category=int(rng.choice(other_categories)),
                             colour=int(rng.choice(other_colours)),
                             box_side=side, centre_x=x, centre_y=y)
    _draw_object(image, distractor, _jittered_rgb(distractor.colour, rng))
    distractors.append(distractor)

  side = _SIZE_FRACTIONS[size] * image_size * rng.uniform(0.95, 1.05)
  x, y = _cell_centre(position, side, image_size, rng)
  main = SceneObject(category=category, colour=colour, box_side=side,
                     centre_x=x, centre_y=y)
  _draw_object(image, main, _jittered_rgb(colour, rng))
  pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  return pixels, dict(colour=colour, size=size, position=position), distractors


def _jittered_rgb(colour: int, rng: np.random.Generator) -> np.ndarray:
  # Small shifts so that "red" is a range of reds, not one RGB triple.
  return np.asarray(COLOUR_RGB[colour], np.float32) + rng.normal(0, 10, 3)


# ----------------------------------------------------------------------------
# Captions.

_VERTICAL = (("top", "upper"), None, ("bottom", "lower"))
_HORIZONTAL = (("left",), None, ("right",))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  # rng.random() is several times cheaper than rng.integers() per call.
  return options[int(rng.random() * len(options))]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" or word == "x" or word.startswith(
      "x ") else "a"


def _position_phrases(position: int,
                      rng: np.random.Generator) -> tuple[str, str]:
  """(a phrase like "in the top left", a label like "top-left")."""
  row, column = divmod(position, 3)
  if row == 1 and column == 1:
    return (_pick(rng, ("in the center", "in the centre", "in the middle",
                        "at the center of the image")),
            _pick(rng, ("center", "centre", "middle")))
  if column == 1:
    # "upper"/"lower" are adjectives only: "at the upper" is not English.
    noun, adjective = _VERTICAL[row][0], _pick(rng, _VERTICAL[row])
    return (_pick(rng, (f"at the {noun}", f"in the {adjective} middle",
                        f"along the {adjective} edge",
                        f"at the {noun} of the picture")),
            _pick(rng, (noun, f"{adjective}-centre")))
  if row == 1:
    h = _pick(rng, _HORIZONTAL[column])
    return (_pick(rng, (f"on the {h}", f"at the {h} side",
                        f"in the middle {h}", f"on the {h} of the image")),
            _pick(rng, (h, f"middle-{h}")))
  v, h = _pick(rng, _VERTICAL[row]), _pick(rng, _HORIZONTAL[column])
  return (_pick(rng, (f"in the {v} {h}", f"in the {v} {h} corner",
                      f"at the {v} {h}", f"near the {v} {h} corner")),
          f"{v}-{h}")


# {a_x}: the article for word x; {p}: position phrase ({P} capitalised);
# {q}: position label.
_TEMPLATES = (
    "{a_size} {size} {colour} {shape} {p}",
    "{q}: there is {a_size} {size} {colour} {shape}",
    "there is {a_colour} {colour} {shape} {p} and it is {size}",
    "{P}, {a_size} {size} {shape} coloured {colour}",
    "the image shows {a_size} {size} {colour} {shape} {p}",
    "{a_colour} {colour} {size} {shape} sits {p}",
    "{size} {colour} {shape}, {p}",
    "{P} you can see {a_shape} {shape} which is {size} and {colour}",
    "a picture of {a_colour} {colour} {shape} that is {size}, located {p}",
    "{colour} {shape} ({size}) {p}",
)
_DISTRACTOR_CLAUSES = (
    ", next to {a} {colour} {shape}",
    " and {a} {colour} {shape} nearby",
    ", with a smaller {colour} {shape} close by",
)
# How often a caption of a scene with distractors mentions one of them.
_DISTRACTOR_MENTION_PROBABILITY = 0.3


def write_captions(category: int, labels: dict[str, int],
                   distractors: Sequence[SceneObject],
                   rng: np.random.Generator, num_captions: int = 5
                   ) -> list[str]:
  """`num_captions` different captions of a scene, from distinct templates."""
  templates = rng.choice(len(_TEMPLATES), size=num_captions, replace=False)
  captions = []
  for template in templates:
    words = dict(
        shape=_pick(rng, _CATEGORY_SYNONYMS[category]),
        colour=_pick(rng, _COLOUR_SYNONYMS[labels["colour"]]),
        size=_pick(rng, _SIZE_SYNONYMS[labels["size"]]))
    words["p"], words["q"] = _position_phrases(labels["position"], rng)
    words["P"] = words["p"][0].upper() + words["p"][1:]
    for key in ("shape", "colour", "size"):
      words[f"a_{key}"] = _article(words[key])
    caption = _TEMPLATES[template].format(**words)
    if distractors and rng.random() < _DISTRACTOR_MENTION_PROBABILITY:
      distractor = distractors[int(rng.integers(len(distractors)))]
      shape = _pick(rng, _CATEGORY_SYNONYMS[distractor.category])
      colour = _pick(rng, _COLOUR_SYNONYMS[distractor.colour])
      caption += _pick(rng, _DISTRACTOR_CLAUSES).format(
          a=_article(colour), colour=colour, shape=shape)
    captions.append(caption)
  return captions


# ----------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass(kw_only=True)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Parameters of the synthetic benchmark; build with `synthetic_config`."""
  image_size: int = 32
  num_categories: int = 12
  train_per_category: int = 200
  val_per_category: int = 20
  test_per_category: int = 40
  max_distractors: int = 1
  seed: int = 0

  def per_category(self, split: str) -> int:
    """Examples of each category in split ("train", "val" or "test")."""
    return getattr(self, f"{split}_per_category")


def synthetic_config(*, image_size: int = 32, num_categories: int = 12,
                     train_per_category: int = 200, val_per_category: int = 20,
                     test_per_category: int = 40, max_distractors: int = 1,
                     seed: int = 0) -> SyntheticConfig:
  """Validated config whose name spells out every parameter.

  The name is the cache key inside `data_dir`, so datasets with different
  parameters can never be mistaken for each other.
  """
  if not _MIN_IMAGE_SIZE <= image_size <= _MAX_IMAGE_SIZE:
    raise ValueError(f"image_size={image_size} must be in "
                     f"[{_MIN_IMAGE_SIZE}, {_MAX_IMAGE_SIZE}].")
  if not 2 <= num_categories <= len(CATEGORY_NAMES):
    raise ValueError(f"num_categories={num_categories} must be in "
                     f"[2, {len(CATEGORY_NAMES)}]: the shapes are "
                     f"{CATEGORY_NAMES}.")
  counts = dict(train=train_per_category, val=val_per_category,
                test=test_per_category)
  for split, count in counts.items():
    if count < 1:
      raise ValueError(f"{split}_per_category={count} must be at least 1.")
  if not 0 <= max_distractors <= 4:
    raise ValueError(f"max_distractors={max_distractors} must be in [0, 4].")
  if seed < 0:
    raise ValueError(f"seed={seed} must be non-negative.")
  name = (f"s{image_size}_c{num_categories}_n{train_per_category}"
          f"-{val_per_category}-{test_per_category}_d{max_distractors}"
          f"_seed{seed}")
  return SyntheticConfig(
      name=name, description=f"Synthetic scenes, {name}.",
      image_size=image_size, num_categories=num_categories,
      train_per_category=train_per_category,
      val_per_category=val_per_category, test_per_category=test_per_category,
      max_distractors=max_distractors, seed=seed)


class CcrSynthetic(registry.BuildMessages, tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on textured backgrounds with 5 captions each."""

  # Bump when rendering or captions change: the version is part of the cache
  # path, so old caches are not reused.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [synthetic_config()]
  # TFDS 4.9.10 finds a builder's code path (only used to look for a download
  # checksums file) through `importlib_resources`, which it declares only for
  # Python < 3.9; without that package, download_and_prepare fails. This
  # builder downloads nothing, so it has no checksums file to find.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    side = config.image_size
    # tfds.features.Image (PNG) works without TensorFlow as long as examples
    # hand it a PIL image: TFDS then encodes with PIL (a NumPy array would go
    # through tf.image.encode_png) and decodes with PIL in data sources.
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Coloured shapes on textured backgrounds, 5 captions "
                     "each, rendered locally from a seed."),
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "image": tfds.features.Image(shape=(side, side, 3),
                                         encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=5),
            "category": tfds.features.ClassLabel(
                names=CATEGORY_NAMES[:config.num_categories]),
            "colour": tfds.features.ClassLabel(names=COLOUR_NAMES),
            "size": tfds.features.ClassLabel(names=SIZE_NAMES),
            "position": tfds.features.ClassLabel(names=POSITION_NAMES),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is rendered locally.
    return {split: self._generate_examples(split) for split in _SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    for example in generate_examples(self.builder_config, split):
      image = Image.fromarray(example["image"])
      yield example["id"], dict(example, image=image)


def generate_examples(config: SyntheticConfig, split: str) -> Iterator[dict]:
  """Renders the examples of one split in id order.

  Each example has its own random stream keyed by (seed, split, category,
  index), so growing `*_per_category` keeps the earlier examples unchanged.

  Yields:
    dicts with `id` (int), `image` (uint8 [H, W, 3]), `captions` (5 str),
    `category`, `colour`, `size` and `position` (int).
  """
  first_id = sum(config.per_category(s) * config.num_categories
                 for s in _SPLITS[:_SPLITS.index(split)])
  per_category = config.per_category(split)
  for category in range(config.num_categories):
    for index in range(per_category):
      rng = np.random.default_rng(
          [config.seed, _SPLITS.index(split), category, index])
      image, labels, distractors = sample_scene(
          category, config.num_categories, config.image_size,
          config.max_distractors, rng)
      yield dict(id=first_id + category * per_category + index, image=image,
                 captions=write_captions(category, labels, distractors, rng),
                 category=category, **labels)


def synthetic_builder(data_dir: str, config: SyntheticConfig) -> CcrSynthetic:
  """The builder for `config`, writing `array_record` files under data_dir."""
  registered = CcrSynthetic.builder_configs.get(config.name)
  # TFDS refuses a fresh config object that shares a registered config's name.
  builder_config = registered if registered == config else config
  return CcrSynthetic(data_dir=data_dir, config=builder_config,
                      file_format="array_record")


def _read_split(data_source) -> tasks.Split:
  records = data_source.__getitems__(list(range(len(data_source))))
  # TFDS shuffles records by key when writing: restore id order.
  records.sort(key=lambda record: int(record["id"]))
  return tasks.Split(
      images=np.stack([record["image"] for record in records]),
      captions=tuple(
          tuple(c.decode("utf-8") if isinstance(c, bytes) else str(c)
                for c in record["captions"])
          for record in records),
      categories=np.asarray([record["category"] for record in records],
                            np.int32),
      ids=np.asarray([record["id"] for record in records], np.int64))


def load_synthetic(data_dir: str, *, image_size: int = 32,
                   num_categories: int = 12, train_per_category: int = 200,
                   val_per_category: int = 20, test_per_category: int = 40,
                   max_distractors: int = 1,
                   seed: int = 0) -> dict[str, tasks.Split]:
  """Builds the benchmark in data_dir if needed and reads it into memory.

  Generation needs no network and no TensorFlow; a second call with the same
  parameters reads the cached `array_record` files.

  Returns:
    {"train", "val", "test"} -> Split with images uint8 [N, image_size,
    image_size, 3], 5 captions per image, categories int32 [N] and ids int64
    [N] (unique across the three splits), in id order.
  """
  config = synthetic_config(
      image_size=image_size, num_categories=num_categories,
      train_per_category=train_per_category,
      val_per_category=val_per_category, test_per_category=test_per_category,
      max_distractors=max_distractors, seed=seed)
  with files.writing(data_dir):
    builder = synthetic_builder(data_dir, config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  sources = builder.as_data_source()
  return {split: _read_split(sources[split]) for split in _SPLITS}


# ----------------------------------------------------------------------------
# The registered source.

# Defaults: configs/default.py's benchmark (4 tasks x 3 of 12 shapes).
CONFIG_KEYS = {
    "num_categories": schema.Key(
        12, "synthetic: shapes rendered, the first of CATEGORY_NAMES",
        lambda v: None if 2 <= v <= len(CATEGORY_NAMES)
        else f"an integer in [2, {len(CATEGORY_NAMES)}]"),
    "train_per_category": schema.Key(
        200, "synthetic: training images per shape", schema.at_least(1, True)),
    "val_per_category": schema.Key(
        10, "synthetic: validation images per shape", schema.at_least(1, True)),
    "test_per_category": schema.Key(
        40, "synthetic: test images per shape", schema.at_least(1, True)),
    "max_distractors": schema.Key(
        1, "synthetic: smaller objects of other shapes per image, at most",
        lambda v: None if 0 <= v <= 4 else "an integer in [0, 4]"),
    "seed": schema.Key(0, "synthetic: the seed every scene is rendered from",
                       schema.at_least(0, True)),
}


def load(data_config: Any, data_dir: str) -> tasks.Dataset:
  """The benchmark of data_config (`CONFIG_KEYS` and image_size), in memory.

  Args:
    data_config: the `data` config section.
    data_dir: where it is rendered once and cached.

  Returns:
    The Dataset of `load_synthetic`'s splits and the first num_categories
    CATEGORY_NAMES.
  """
  splits = load_synthetic(
      data_dir, image_size=data_config.image_size,
      num_categories=data_config.num_categories,
      train_per_category=data_config.train_per_category,
      val_per_category=data_config.val_per_category,
      test_per_category=data_config.test_per_category,
      max_distractors=data_config.max_distractors, seed=data_config.seed)
  return tasks.Dataset(splits=splits, category_names=CATEGORY_NAMES[
      :data_config.num_categories])


# Every example has a category: num_tasks=1 is the one group of them all.
registry.register(
    "synthetic", load, CONFIG_KEYS,
    summary="rendered locally, no download", one_task_keeps_all=False)
