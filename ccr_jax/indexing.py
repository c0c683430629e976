"""Nearest-neighbour indices over gallery embeddings: ScaNN (default) and exact.

A gallery (the images or the captions of one task, embedded with one model
snapshot) becomes an `Index`: its L2-normalised float32 embeddings
`[count, dim]`, the ids of its items `[count]`, a ScaNN searcher and an
`IndexMetadata` that says which snapshot, task and modality it was built from.
Similarity is the dot product (cosine, since embeddings are normalised); all
scores are returned best first.

ScaNN parameter rule (`scann_parameters`), measured on clustered,
embedding-like data (see tests/test_indexing.py and REFERENCES.md):

* `count < BRUTE_FORCE_MAX_COUNT` (10_000): ScaNN brute-force float32 scoring.
  With sqrt(count) leaves a tree would hold fewer than ~100 points per leaf;
  at 5k items k-means leaves empty partitions, recall@10 drops to ~0.93 and
  the tree is no faster than brute force (both ~28k queries/s at dim 128 on
  2 cores), so a tree buys nothing there. Brute force is exact.
* otherwise a tree + asymmetric hashing + exact reordering: `num_leaves = L
  = round(sqrt(count))`, `num_leaves_to_search = ceil(2 * sqrt(L))` (20% of
  the leaves at 10k items, 11% at 100k, 6.4% at 1M: small galleries are
  cheap to search and need the larger share for queries from the other
  modality, a distribution the tree was not trained on),
  `training_sample_size = min(count, max(50_000, 50 * L))`, plain
  `score_ah(2)` and a reorder of `max(100, 10 * k)` candidates.
  Measured by benchmarks/index_bench.py (2 shared cores; clustered 256-d
  embeddings, queries shifted like another modality's): at 1M items,
  recall@10 0.9997 against exact at 49x the exact backend's queries/s, built
  in 31 s; at 100k, 1.0 at 18x; at 20k x 64 (tests), 0.9997. Twice as many,
  smaller leaves cut the benchmark's 100-item clusters apart below 1M items
  (at 100k, searching 5% of the points: recall@10 0.87 instead of 0.98) and
  at 1M gained only on the flat model below. The 50k sample and the plain AH
  keep the 1M build under a minute: a 100k sample and the anisotropic loss
  (threshold 0.2) added 3-20 s and 12-27 s to builds of 40-60 s, while every
  recall loss measured came from the partition, not from the AH scores.
  Recall depends on the data: where clusters have no coarser structure
  (index_bench's flat model) the tree splits neighbourhoods, and recall@10
  at 1M is 0.66.
  Measure real embeddings with `recall_against_exact` and override via
  `scann_options`.

Only when ScaNN cannot build a searcher at all (an empty gallery, or ScaNN
raising for the data it is given) does `build_index` fall back to the exact
backend, logging why; the metadata records the backend actually used.

On disk an index is a directory

    metadata.json     IndexMetadata (snapshot, task, modality, dim, count, ...)
    manifest.json     size and sha256 of every other file, written last
    embeddings.npy    float32 [count, dim]
    item_ids.npy      int64 [count]
    scann/            the ScaNN serialization (paths relative to it); its
                      float dataset asset is ../embeddings.npy, so the
                      embeddings are stored once

written atomically by `save_index` and checked field by field by `load_index`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import uuid
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("scann", "exact")
MODALITIES = ("images", "texts")
# Below this many items ScaNN scores by brute force (see the module docstring).
BRUTE_FORCE_MAX_COUNT = 10_000
# Query block for the exact backend: [block, count] float32 scores stay small
# (1024 x 100k = 400 MB) while one matmul still amortises the dispatch.
DEFAULT_BLOCK_SIZE = 1024
FORMAT_VERSION = 1

_METADATA_FILE = "metadata.json"
_MANIFEST_FILE = "manifest.json"
_EMBEDDINGS_FILE = "embeddings.npy"
_ITEM_IDS_FILE = "item_ids.npy"
_SCANN_DIR = "scann"
_SCANN_ASSETS_FILE = "scann_assets.pbtxt"
_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"

# Keys a caller may set through `scann_options`.
_SCANN_OPTION_KEYS = frozenset({
    "mode",  # "auto" | "brute_force" | "tree_ah"
    "num_neighbors",
    "num_leaves",
    "num_leaves_to_search",
    "training_sample_size",
    "dims_per_block",
    "anisotropic_quantization_threshold",
    "reorder_num_neighbors",
    "leaves_to_search_fraction",
})


class IndexMismatchError(ValueError):
  """An index directory is missing, incomplete, corrupt or not the one expected.

  Attributes:
    directory: the index directory.
    field: what did not match (a metadata field, a file name, ...).
    expected: what the caller expected.
    found: what the directory holds.
  """

  def __init__(self, directory, field: str, expected: Any, found: Any,
               fix: str | None = None):
    self.directory = str(directory)
    self.field = field
    self.expected = expected
    self.found = found
    fix = fix or (
        "delete the directory and rebuild it with ccr_jax.indexing.build_index"
        " + save_index from the right snapshot (rerunning the experiment's"
        " indexing stage does this)")
    super().__init__(
        f"Index at {self.directory}: field '{field}' expected {expected!r},"
        f" found {found!r}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True)
class IndexMetadata:
  """What an index was built from; JSON-able.

  Attributes:
    snapshot: the model snapshot (task number) whose towers embedded the gallery.
    task: the task whose gallery this is.
    modality: 'images' or 'texts'.
    dim: embedding dimension.
    count: number of gallery items.
    backend: 'scann' or 'exact' (the backend actually built).
    scann_params: the ScaNN parameters actually used (`{}` for exact; with a
      'fallback_reason' if ScaNN was asked for but could not build). A dict, so
      an `IndexMetadata` compares by value but is not hashable.
    format_version: on-disk layout version.
  """
  snapshot: int
  task: int
  modality: str
  dim: int
  count: int
  backend: str
  scann_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION

  def to_json(self) -> str:
    """Returns the metadata as an indented JSON object string."""
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "IndexMetadata":
    """Parses `to_json` output; raises ValueError on missing/unknown fields."""
    fields = json.loads(text)
    if not isinstance(fields, dict):
      raise ValueError(f"metadata must be a JSON object, got {type(fields)}")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    missing = required - fields.keys()
    unknown = fields.keys() - names
    if missing or unknown:
      raise ValueError(f"metadata fields missing {sorted(missing)},"
                       f" unknown {sorted(unknown)}")
    return cls(**fields)


@dataclasses.dataclass(frozen=True, eq=False)
class Index:
  """A searchable gallery.

  Attributes:
    metadata: what the index was built from.
    embeddings: float32 [count, dim], L2-normalised.
    item_ids: int64 [count], the gallery item of each row.
    searcher: the ScaNN searcher (backend 'scann'), else None.
  """
  metadata: IndexMetadata
  embeddings: np.ndarray
  item_ids: np.ndarray
  searcher: Any = None


# ----------------------------------------------------------------------------
# Exact search.


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_block(queries: jax.Array, gallery: jax.Array, k: int):
  # HIGHEST: accelerators otherwise multiply float32 in bfloat16, which would
  # reorder near-ties and make "exact" search inexact.
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def query_blocks(num_queries: int, block_size: int) -> tuple[int, int]:
  """Returns (block, num_blocks) for scoring `num_queries` in padded blocks.

  Fewer queries than `block_size` use the next power of two, so tiny query sets
  do not pay for a full block while the number of compiled shapes stays
  logarithmic.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  block = min(block_size, 1 << max(0, num_queries - 1).bit_length())
  return block, -(-num_queries // block)


def map_query_blocks(fn: Callable, per_query: Sequence[tuple[np.ndarray, Any]],
                     shared: Sequence[Any], block_size: int) -> list[np.ndarray]:
  """Runs `fn(*query_block_arrays, *shared)` over padded query blocks.

  Every block has the same shape (`query_blocks`), so one compiled program
  serves any query count; every block is dispatched before any is read back,
  so the device stays busy.

  Args:
    fn: a jitted function returning a tuple of arrays with a leading query axis.
    per_query: (array [num_queries, ...], pad value) pairs, sliced per block.
    shared: arguments passed whole to every block (e.g. the gallery).
    block_size: queries per compiled block.

  Returns:
    Each output of `fn`, concatenated over blocks and cut to num_queries rows.
  """
  num_queries = len(per_query[0][0])
  block, num_blocks = query_blocks(num_queries, block_size)
  padded = []
  for array, fill in per_query:
    full = np.full((block * num_blocks, *array.shape[1:]), fill, array.dtype)
    full[:num_queries] = array
    padded.append(full)
  results = [fn(*(p[b * block:(b + 1) * block] for p in padded), *shared)
             for b in range(num_blocks)]
  return [np.concatenate([np.asarray(r[i]) for r in results])[:num_queries]
          for i in range(len(results[0]))]


def exact_search(queries, gallery, k: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product.

  Queries are scored in blocks of a fixed size (the last one zero-padded), so
  one compiled program serves every query count.

  Args:
    queries: float [num_queries, dim].
    gallery: float [num_gallery, dim].
    k: neighbours wanted; clamped to num_gallery.
    block_size: queries per compiled block.

  Returns:
    scores: float32 [num_queries, min(k, num_gallery)], best first.
    indices: int64 [num_queries, min(k, num_gallery)], rows of `gallery`; equal
      scores keep the lower gallery index first.
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must"
                     " be [num_queries, dim] and [num_gallery, dim]")
  num_queries = queries.shape[0]
  k = min(int(k), gallery.shape[0])
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if k == 0 or num_queries == 0:
    return (np.zeros((num_queries, k), np.float32),
            np.zeros((num_queries, k), np.int64))
  scores, indices = map_query_blocks(
      lambda q, g: _top_k_block(q, g, k), [(queries, 0.0)], [jnp.asarray(gallery)],
      block_size)
  return scores.astype(np.float32), indices.astype(np.int64)


# ----------------------------------------------------------------------------
# Building.


def scann_parameters(count: int,
                     scann_options: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
  """The ScaNN parameters `build_index` uses for a gallery (module docstring).

  Args:
    count: gallery size.
    scann_options: overrides; keys among 'mode' ('auto', 'brute_force',
      'tree_ah'), 'num_neighbors', 'num_leaves', 'num_leaves_to_search',
      'leaves_to_search_fraction' (of num_leaves, instead of the rule's
      2 * sqrt(num_leaves)), 'training_sample_size', 'dims_per_block',
      'anisotropic_quantization_threshold' (None: plain AH; ScaNN suggests
      0.2 for dot products), 'reorder_num_neighbors'.

  Returns:
    A JSON-able dict with 'mode' resolved to 'brute_force' or 'tree_ah' and
    every parameter of that mode.
  """
  options = dict(scann_options or {})
  unknown = options.keys() - _SCANN_OPTION_KEYS
  if unknown:
    raise ValueError(f"unknown scann_options {sorted(unknown)}; allowed:"
                     f" {sorted(_SCANN_OPTION_KEYS)}")
  mode = options.pop("mode", "auto")
  if mode == "auto":
    mode = "brute_force" if count < BRUTE_FORCE_MAX_COUNT else "tree_ah"
  if mode not in ("brute_force", "tree_ah"):
    raise ValueError(f"scann mode must be auto, brute_force or tree_ah: {mode}")
  params: dict[str, Any] = {"mode": mode, "num_neighbors": 10}
  if mode == "tree_ah":
    num_leaves = int(options.get("num_leaves",
                                 max(2, round(math.sqrt(max(count, 1))))))
    fraction = options.pop("leaves_to_search_fraction", None)
    searched = (math.ceil(2 * math.sqrt(num_leaves)) if fraction is None
                else math.ceil(float(fraction) * num_leaves))
    params.update(
        num_leaves=num_leaves,
        num_leaves_to_search=min(num_leaves, max(1, searched)),
        training_sample_size=min(count, max(50_000, 50 * num_leaves)),
        dims_per_block=2,
        anisotropic_quantization_threshold=None,
        reorder_num_neighbors=100,
    )
  else:
    options.pop("leaves_to_search_fraction", None)
    tree_only = options.keys() - {"num_neighbors"}
    if tree_only:
      raise ValueError(f"scann_options {sorted(tree_only)} only apply to"
                       " mode='tree_ah'")
  params.update(options)
  return params


def _build_scann_searcher(embeddings: np.ndarray, params: Mapping[str, Any]):
  # Imported here so that modules that only use exact search (and tests of
  # them) do not load ScaNN's shared library.
  from scann import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  builder = scann_ops_pybind.builder(embeddings, int(params["num_neighbors"]),
                                     "dot_product")
  threshold = params.get("anisotropic_quantization_threshold")
  if params["mode"] == "brute_force":
    builder = builder.score_brute_force()
  else:
    builder = builder.tree(
        num_leaves=int(params["num_leaves"]),
        num_leaves_to_search=int(params["num_leaves_to_search"]),
        training_sample_size=int(params["training_sample_size"]),
    ).score_ah(
        int(params["dims_per_block"]),
        # ScaNN reads NaN as "no anisotropic loss".
        anisotropic_quantization_threshold=float(
            "nan" if threshold is None else threshold),
    ).reorder(int(params["reorder_num_neighbors"]))
  return builder.build()


def _check_gallery(embeddings, item_ids) -> tuple[np.ndarray, np.ndarray]:
  embeddings = np.ascontiguousarray(embeddings, np.float32)
  item_ids = np.asarray(item_ids)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [count, dim], got {embeddings.shape}")
  if item_ids.shape != (embeddings.shape[0],):
    raise ValueError(f"item_ids {item_ids.shape} must be [count] with count ="
                     f" {embeddings.shape[0]}")
  if item_ids.size and not np.issubdtype(item_ids.dtype, np.integer):
    raise ValueError(f"item_ids must be integers, got {item_ids.dtype}")
  return embeddings, item_ids.astype(np.int64)


def build_index(embeddings, item_ids, *, backend: str = "scann", snapshot: int,
                task: int, modality: str,
                scann_options: Mapping[str, Any] | None = None) -> Index:
  """Builds an index over one gallery.

  Args:
    embeddings: float32 [count, dim], L2-normalised gallery embeddings.
    item_ids: int [count], the id of each gallery item.
    backend: 'scann' (default) or 'exact'.
    snapshot: the snapshot that embedded the gallery.
    task: the task the gallery belongs to.
    modality: 'images' or 'texts'.
    scann_options: overrides of `scann_parameters`' rule.

  Returns:
    The Index. With backend 'scann' but a gallery ScaNN cannot index (empty,
    or ScaNN raising), an exact index, with the reason logged and stored in
    `metadata.scann_params['fallback_reason']`.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
  embeddings, item_ids = _check_gallery(embeddings, item_ids)
  count, dim = embeddings.shape
  metadata = functools.partial(IndexMetadata, snapshot=int(snapshot),
                               task=int(task), modality=modality, dim=int(dim),
                               count=int(count))
  if backend == "exact":
    return Index(metadata(backend="exact"), embeddings, item_ids)
  params = scann_parameters(count, scann_options)
  if count == 0:
    reason = "empty gallery"
  else:
    try:
      searcher = _build_scann_searcher(embeddings, params)
    except Exception as e:  # pylint: disable=broad-except
      reason = f"ScaNN build failed: {type(e).__name__}: {e}"
    else:
      return Index(metadata(backend="scann", scann_params=params), embeddings,
                   item_ids, searcher)
  logging.warning("Index (snapshot %d, task %d, %s, %d items): %s; using the"
                  " exact backend.", snapshot, task, modality, count, reason)
  return Index(metadata(backend="exact",
                        scann_params={"fallback_reason": reason}),
               embeddings, item_ids)


# ----------------------------------------------------------------------------
# Searching.


def _scann_search(index: Index, queries: np.ndarray, k: int):
  params = index.metadata.scann_params
  count = index.metadata.count
  kwargs = {"final_num_neighbors": k}
  if params["mode"] == "tree_ah":
    # 10 * k: a large k still gets rescored candidates beyond its own k.
    pre_reorder = min(count, max(int(params["reorder_num_neighbors"]), 10 * k))
    num_leaves = int(params["num_leaves"])
    # Search enough leaves to hold twice the reorder candidates on average:
    # with a large k the default leaves could hold fewer than k points, and
    # ScaNN would pad the result with NaN.
    leaves = max(int(params["num_leaves_to_search"]),
                 math.ceil(2 * pre_reorder * num_leaves / count))
    kwargs.update(pre_reorder_num_neighbors=pre_reorder,
                  leaves_to_search=min(num_leaves, leaves))
  rows, scores = index.searcher.search_batched_parallel(queries, **kwargs)
  rows = np.asarray(rows, np.int64)
  scores = np.asarray(scores, np.float32)
  # ScaNN pads short results (too few points in the searched leaves) with NaN.
  missing = np.isnan(scores)
  ids = index.item_ids[rows]
  ids[missing] = -1
  scores[missing] = -np.inf
  return scores, ids


def search(index: Index, queries, k: int, *,
           block_size: int = DEFAULT_BLOCK_SIZE
           ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery items for each query, best first.

  Args:
    index: the gallery index.
    queries: float32 [num_queries, dim], L2-normalised.
    k: neighbours wanted; clamped to `index.metadata.count` (a gallery of 3
      items returns 3 columns), so callers must read the returned width.
    block_size: queries per block for the exact backend.

  Returns:
    scores: float32 [num_queries, min(k, count)], dot products, best first.
    item_ids: int64 [num_queries, min(k, count)]. In the rare case ScaNN finds
      fewer than k candidates, the missing tail is id -1 with score -inf.
  """
  queries = np.ascontiguousarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != index.metadata.dim:
    raise ValueError(f"queries must be [num_queries, {index.metadata.dim}],"
                     f" got {queries.shape}")
  k = min(int(k), index.metadata.count)
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if k == 0 or queries.shape[0] == 0:
    return (np.zeros((queries.shape[0], k), np.float32),
            np.zeros((queries.shape[0], k), np.int64))
  if index.metadata.backend == "scann":
    return _scann_search(index, queries, k)
  scores, rows = exact_search(queries, index.embeddings, k,
                              block_size=block_size)
  return scores, index.item_ids[rows]


def search_many(indices: Sequence[Index], queries, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Searches several indices as one gallery (their union).

  This is the task-agnostic gallery: the union of per-task indices, possibly
  embedded with different snapshots. Each index returns its own top-k and the
  results are merged by score.

  Args:
    indices: indices of the same dim.
    queries: float32 [num_queries, dim].
    k: neighbours wanted; clamped to the total count.

  Returns:
    scores: float32 [num_queries, min(k, total)], best first; equal scores
      keep the earlier index (then its order) first.
    item_ids: int64 [num_queries, min(k, total)].
  """
  if not indices:
    raise ValueError("search_many needs at least one index")
  dims = {index.metadata.dim for index in indices}
  if len(dims) != 1:
    raise ValueError(f"indices have different dims {sorted(dims)}")
  parts = [search(index, queries, k) for index in indices]
  scores = np.concatenate([s for s, _ in parts], axis=1)
  ids = np.concatenate([i for _, i in parts], axis=1)
  k = min(int(k), sum(index.metadata.count for index in indices))
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return (np.take_along_axis(scores, order, axis=1),
          np.take_along_axis(ids, order, axis=1))


def recall_against_exact(index: Index, queries, k: int = 10) -> float:
  """Fraction of the exact top-k that the index returns, averaged over queries.

  Args:
    index: any index (an exact one scores 1.0).
    queries: float32 [num_queries, dim].
    k: neighbours compared; clamped to the gallery size.

  Returns:
    Mean over queries of |exact top-k ∩ index top-k| / k, in [0, 1].
  """
  _, rows = exact_search(queries, index.embeddings, k)
  exact_ids = index.item_ids[rows]
  _, found_ids = search(index, queries, k)
  if exact_ids.shape[1] == 0:
    return 1.0
  hits = (exact_ids[:, :, None] == found_ids[:, None, :]).any(axis=2)
  return float(hits.mean())


# ----------------------------------------------------------------------------
# Saving and loading.


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _fsync_path(path: str) -> None:
  # Directory fsync makes renames durable; not every platform allows opening a
  # directory, which only costs durability, never correctness.
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _data_files(directory: str) -> list[str]:
  """Relative paths of every file but the manifest, sorted."""
  files = []
  for root, _, names in os.walk(directory):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory)
      if rel != _MANIFEST_FILE:
        files.append(rel.replace(os.sep, "/"))
  return sorted(files)


def _write_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.save(f, array, allow_pickle=False)


def _share_embeddings(scann_dir: str, embeddings: np.ndarray) -> None:
  """Points ScaNN's float dataset asset at our embeddings.npy and drops its copy.

  ScaNN serialises the float32 dataset it reorders (and brute-forces) with as
  `dataset.npy`, the same array as our embeddings.npy: keeping both doubled
  the size on disk. Its copy is only replaced when it holds exactly our array,
  so a ScaNN version that stored a transformed dataset would keep its own.
  """
  # Imported here for the reason given in `_build_scann_searcher`.
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from scann.scann_ops import scann_assets_pb2  # pylint: disable=g-import-not-at-top
  assets_path = os.path.join(scann_dir, _SCANN_ASSETS_FILE)
  with open(assets_path) as f:
    assets = text_format.Parse(f.read(), scann_assets_pb2.ScannAssets())
  for asset in assets.assets:
    if asset.asset_type != scann_assets_pb2.ScannAsset.DATASET_NPY:
      continue
    path = os.path.join(scann_dir, asset.asset_path)
    if not np.array_equal(np.load(path, mmap_mode="r"), embeddings):
      logging.warning("ScaNN's %s differs from the index embeddings; keeping"
                      " both copies.", asset.asset_path)
      return
    os.remove(path)
    # Relative to scann_dir, as ScaNN resolves it.
    asset.asset_path = f"../{_EMBEDDINGS_FILE}"
  with open(assets_path, "w") as f:
    f.write(text_format.MessageToString(assets))


def save_index(index: Index, directory) -> None:
  """Writes the index to `directory`, atomically.

  Everything is written into a temporary sibling directory, flushed to disk,
  then renamed into place, so `directory` only ever holds a complete index. An
  existing index there is first renamed aside and deleted after the swap; a
  crash between those two renames leaves no index at `directory` (the old one
  survives as a `.NAME.old-*` sibling) rather than a mixed one. Leftover
  temporary siblings from interrupted saves of the same directory are removed:
  one writer per index directory (in multi-host runs, one host).

  Args:
    index: the index to save.
    directory: the final index directory; its parent is created if needed.
  """
  directory = os.path.abspath(os.fspath(directory))
  parent, name = os.path.split(directory)
  os.makedirs(parent, exist_ok=True)
  for sibling in os.listdir(parent):
    if sibling.startswith(f".{name}{_TMP_MARK}"):
      shutil.rmtree(os.path.join(parent, sibling), ignore_errors=True)
  tmp = os.path.join(parent, f".{name}{_TMP_MARK}{uuid.uuid4().hex}")
  os.makedirs(tmp)
  try:
    _write_npy(os.path.join(tmp, _EMBEDDINGS_FILE), index.embeddings)
    _write_npy(os.path.join(tmp, _ITEM_IDS_FILE), index.item_ids)
    if index.metadata.backend == "scann":
      scann_dir = os.path.join(tmp, _SCANN_DIR)
      os.makedirs(scann_dir)
      # Relative asset paths: the directory can later be renamed or moved
      # (our own rename below included) and still load.
      index.searcher.serialize(scann_dir, relative_path=True)
      _share_embeddings(scann_dir, index.embeddings)
    with open(os.path.join(tmp, _METADATA_FILE), "w") as f:
      f.write(index.metadata.to_json())
    files = _data_files(tmp)
    manifest = {
        rel: {"bytes": os.path.getsize(os.path.join(tmp, rel)),
              "sha256": _sha256(os.path.join(tmp, rel))}
        for rel in files
    }
    for rel in files:
      with open(os.path.join(tmp, rel), "rb+") as f:
        os.fsync(f.fileno())
    # The manifest goes last: a directory with a manifest listing every file is
    # complete by construction.
    with open(os.path.join(tmp, _MANIFEST_FILE), "w") as f:
      json.dump({"format_version": FORMAT_VERSION, "files": manifest}, f,
                indent=2, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    for root, _, _ in os.walk(tmp):
      _fsync_path(root)
    old = None
    if os.path.lexists(directory):
      old = os.path.join(parent, f".{name}{_OLD_MARK}{uuid.uuid4().hex}")
      os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_path(parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _load_npy(directory: str, rel: str) -> np.ndarray:
  try:
    return np.load(os.path.join(directory, rel), allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, rel, "a readable .npy file",
                             f"unreadable ({type(e).__name__}: {e})") from e


def _check_manifest(directory: str, verify_checksums: bool) -> None:
  path = os.path.join(directory, _MANIFEST_FILE)
  if not os.path.isfile(path):
    raise IndexMismatchError(
        directory, _MANIFEST_FILE, "present (written last by save_index)",
        "missing: the directory is not a complete saved index")
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if not all(isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys()
               for entry in files.values()):
      raise ValueError("every manifest entry needs 'bytes' and 'sha256'")
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, _MANIFEST_FILE, "valid JSON",
                             f"unreadable ({type(e).__name__}: {e})") from e
  required = {_METADATA_FILE, _EMBEDDINGS_FILE, _ITEM_IDS_FILE}
  missing = sorted(required - files.keys())
  if missing:
    raise IndexMismatchError(directory, _MANIFEST_FILE,
                             f"entries for {missing}", "none")
  for rel, entry in sorted(files.items()):
    full = os.path.join(directory, rel)
    if not os.path.isfile(full):
      raise IndexMismatchError(directory, rel, "present", "missing")
    size = os.path.getsize(full)
    if size != entry["bytes"]:
      raise IndexMismatchError(directory, rel, f"{entry['bytes']} bytes",
                               f"{size} bytes (truncated or overwritten)")
    if verify_checksums and _sha256(full) != entry["sha256"]:
      raise IndexMismatchError(directory, rel, f"sha256 {entry['sha256']}",
                               "different content (corrupt)")


def load_index(directory, *, expect_snapshot: int | None = None,
               expect_task: int | None = None,
               expect_modality: str | None = None,
               expect_dim: int | None = None, expect_item_ids=None,
               verify_checksums: bool = True) -> Index:
  """Loads an index saved by `save_index`, checking it is the one expected.

  Files are checked against the manifest (sizes always, sha256 when
  `verify_checksums`) before ScaNN reads them: ScaNN aborts the process on
  some corrupt inputs instead of raising.

  Args:
    directory: the index directory.
    expect_snapshot, expect_task, expect_modality, expect_dim: if given, the
      metadata must say exactly this.
    expect_item_ids: if given, int [count]; the stored item ids must equal it.
    verify_checksums: hash every file (a few hundred MB/s).

  Returns:
    The Index, searchable.

  Raises:
    IndexMismatchError: the directory is missing or incomplete, a file is
      unreadable or corrupt, or anything differs from the expectations or from
      the metadata; the message names the directory, the field, expected and
      found values and the fix.
  """
  directory = os.path.abspath(os.fspath(directory))
  if not os.path.isdir(directory):
    raise IndexMismatchError(
        directory, "directory", "an index directory", "nothing there",
        "build and save the index (rerun the experiment's indexing stage)")
  _check_manifest(directory, verify_checksums)
  try:
    with open(os.path.join(directory, _METADATA_FILE)) as f:
      metadata = IndexMetadata.from_json(f.read())
  except Exception as e:  # pylint: disable=broad-except
    raise IndexMismatchError(directory, _METADATA_FILE, "valid IndexMetadata",
                             f"unreadable ({type(e).__name__}: {e})") from e
  expectations = {"snapshot": expect_snapshot, "task": expect_task,
                  "modality": expect_modality, "dim": expect_dim}
  for field, expected in expectations.items():
    found = getattr(metadata, field)
    if expected is not None and expected != found:
      raise IndexMismatchError(directory, field, expected, found)
  if metadata.format_version != FORMAT_VERSION:
    raise IndexMismatchError(directory, "format_version", FORMAT_VERSION,
                             metadata.format_version)
  if metadata.backend not in BACKENDS:
    raise IndexMismatchError(directory, "backend", BACKENDS, metadata.backend)

  embeddings = _load_npy(directory, _EMBEDDINGS_FILE)
  expected_shape = (metadata.count, metadata.dim)
  if embeddings.shape != expected_shape or embeddings.dtype != np.float32:
    raise IndexMismatchError(directory, "embeddings",
                             f"float32 {expected_shape} (from metadata)",
                             f"{embeddings.dtype} {embeddings.shape}")
  item_ids = _load_npy(directory, _ITEM_IDS_FILE)
  if item_ids.shape != (metadata.count,) or item_ids.dtype != np.int64:
    raise IndexMismatchError(directory, "item_ids",
                             f"int64 ({metadata.count},) (from metadata)",
                             f"{item_ids.dtype} {item_ids.shape}")
  if expect_item_ids is not None:
    expected_ids = np.asarray(expect_item_ids)
    if expected_ids.shape != item_ids.shape:
      raise IndexMismatchError(directory, "item_ids",
                               f"{expected_ids.shape[0]} ids as given",
                               f"{item_ids.shape[0]} ids")
    if not np.array_equal(expected_ids, item_ids):
      row = int(np.argmax(expected_ids != item_ids))
      raise IndexMismatchError(directory, "item_ids",
                               f"id {int(expected_ids[row])} at row {row}",
                               f"id {int(item_ids[row])}")

  searcher = None
  if metadata.backend == "scann":
    scann_dir = os.path.join(directory, _SCANN_DIR)
    assets = os.path.join(scann_dir, _SCANN_ASSETS_FILE)
    if not os.path.isfile(assets):
      raise IndexMismatchError(directory, f"{_SCANN_DIR}/{_SCANN_ASSETS_FILE}",
                               "present", "missing")
    from scann import scann_ops_pybind  # pylint: disable=g-import-not-at-top
    try:
      searcher = scann_ops_pybind.load_searcher(scann_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise IndexMismatchError(directory, _SCANN_DIR, "a loadable ScaNN"
                               " searcher", f"{type(e).__name__}: {e}") from e
    if searcher.size() != metadata.count:
      raise IndexMismatchError(directory, f"{_SCANN_DIR} size", metadata.count,
                               searcher.size())
  return Index(metadata, embeddings, item_ids, searcher)
