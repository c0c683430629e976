"""The ScaNN backend (the default): brute force below 10k items, else a tree + AH.

ScaNN parameter rule (`scann_parameters`), measured on clustered,
embedding-like data (see tests/test_indexing.py and REFERENCES.md):

* `count < BRUTE_FORCE_MAX_COUNT` (10_000): ScaNN brute-force float32 scoring.
  With sqrt(count) leaves a tree would hold fewer than ~100 points per leaf;
  at 5k items k-means leaves empty partitions, recall@10 drops to ~0.93 and
  the tree is no faster than brute force (both ~28k queries/s at dim 128 on
  2 cores), so a tree buys nothing there. Brute force is exact.
* otherwise a tree + asymmetric hashing + exact reordering: `num_leaves = L
  = round(sqrt(count))`, `num_leaves_to_search = min(ceil(2 * sqrt(L)),
  max(24, ceil(0.02 * L)))` (`rule_leaves_to_search`: 20% of the leaves at
  10k items, 17% at 20k, 7.6% at 100k, 2.4% at 1M, 2% beyond),
  `training_sample_size = min(count, max(50_000, 50 * L))`, plain AH with 2
  dimensions a block (4 from `AH_4_DIMS_MIN_COUNT` = 1M items) and a reorder
  of `max(100, 10 * k)` candidates.
  Small galleries are cheap to search and need the larger share of leaves for
  queries from the other modality, a distribution the tree was not trained
  on. Large ones do not: a query's neighbours lie in a few leaves (3.6 at 1M;
  at 100k, 7 leaves already give recall@10 0.999), so past ~24 leaves more
  buy recall only on data without coarse structure, at a proportional cost. Measured by
  benchmarks/index_bench.py (results/index_bench.md, whole curve; 2 shared
  cores; clustered 256-d embeddings, 1000 queries shifted like another
  modality's; every search timed in one process, interleaved with 'fast
  exact', a bare jitted matmul + top-k: 234 queries/s at 1M, 2360 at 100k):
    1M, 1000 leaves     searched   AH dims   recall@10   QPS / fast exact
                        100        2         0.9994      13x
                        50         2         0.997       23x  (old rule: 64)
                        24         2         0.995       40x
                        24 (rule)  4         0.995       69x  (16k queries/s)
                        15         4         0.989       85x
                        10         4         0.959       102x
    100k, 316 leaves    24 (rule)  2         1.0         12x  (old rule: 36)
                        7          2         0.999       19x
  The flat model (no topics) at 1M: recall@10 0.49 at the rule's 24 leaves
  (0.61 at 50, 0.73 at 100, 0.85 at 200).
  AH with 4 dimensions a block scans half the bytes of 2 (1.3-1.7x the
  queries/s) but its coarser scores cost recall on low-dimensional data
  (100k items, 24 leaves searched: recall@10 0.86 -> 0.70 at 32-d, 0.95 ->
  0.90 at 64-d, 0.997 -> 0.994 at 128-d, 1.0 both at 256-d), hence only
  from 1M items, where the scan dominates the search; `build` warns below
  128-d. Other trees were no faster at equal recall on 1M x 256: 2000 leaves
  (25 searched: 0.994 at the speed of 1000 leaves' 15, and twice the build),
  3000 leaves, or ScaNN's int8 centroids (`quantize_centroids`, slower on
  batches: float centroids are scored by one matmul per batch). Twice as
  many, smaller leaves also cut the benchmark's 100-item clusters apart below
  1M items (at 100k, searching 5% of the points: recall@10 0.87 instead of
  0.98). The 50k sample and the plain AH keep the 1M build under a minute: a
  100k sample and the anisotropic loss (threshold 0.2) added 3-20 s and
  12-27 s to builds of 40-60 s, while at 256-d every recall loss measured
  came from the partition, not from the AH scores.
  Recall depends on the data: where clusters have no coarser structure
  (index_bench's flat model) the tree splits neighbourhoods, and recall@10 at
  1M is far lower (above; 0.67 searching the old rule's 64 leaves).
  Measure real embeddings with `ccr_jax.indexing.recall_against_exact` and
  override via `build_index(..., options=...)` (e.g. `{'dims_per_block': 2,
  'leaves_to_search_fraction': 0.05}`); an index records its parameters, so
  one built by an older rule loads and searches as it was built.

When ScaNN cannot build a searcher at all (an empty gallery, or ScaNN raising
for the data it is given) `build` raises `base.BuildError`, and
`ccr_jax.indexing.build_index` falls back to the exact backend.

On disk the searcher is the directory `scann/` of the index directory (paths
relative to it); its float dataset asset is `../embeddings.npy`, so the
embeddings are stored once.

ScaNN itself is imported inside the functions that need it, so that code and
tests that only use exact search do not load its shared library.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from absl import logging
import numpy as np

from ccr_jax.indexing import base

# Below this many items ScaNN scores by brute force (see the module docstring).
BRUTE_FORCE_MAX_COUNT = 10_000
# The rule's leaves searched, 2 * sqrt(num_leaves), is capped at
# max(SEARCHED_LEAVES_FLOOR, SEARCHED_LEAVES_FRACTION * num_leaves): galleries
# up to 20k items keep the whole 2 * sqrt(L) (module docstring).
SEARCHED_LEAVES_FLOOR = 24
SEARCHED_LEAVES_FRACTION = 0.02
# AH codes 2 dimensions a block (4 bits each), 4 from this many items, where
# scanning the leaves dominates the search (module docstring).
AH_4_DIMS_MIN_COUNT = 1_000_000
SCANN_DIR = "scann"
ASSETS_FILE = "scann_assets.pbtxt"

# Keys a caller may set through `build_index(..., options=...)`.
OPTION_KEYS = frozenset({
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


def scann_parameters(count: int,
                     scann_options: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
  """The ScaNN parameters a gallery of `count` items is built with (module docstring).

  Args:
    count: gallery size.
    scann_options: overrides; keys among 'mode' ('auto', 'brute_force',
      'tree_ah'), 'num_neighbors', 'num_leaves', 'num_leaves_to_search',
      'leaves_to_search_fraction' (of num_leaves, instead of the rule's
      `rule_leaves_to_search`), 'training_sample_size', 'dims_per_block',
      'anisotropic_quantization_threshold' (None: plain AH; ScaNN suggests
      0.2 for dot products), 'reorder_num_neighbors'.

  Returns:
    A JSON-able dict with 'mode' resolved to 'brute_force' or 'tree_ah' and
    every parameter of that mode.
  """
  options = dict(scann_options or {})
  unknown = options.keys() - OPTION_KEYS
  if unknown:
    raise ValueError(f"unknown scann_options {sorted(unknown)}; allowed:"
                     f" {sorted(OPTION_KEYS)}")
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
    searched = (rule_leaves_to_search(num_leaves) if fraction is None
                else math.ceil(float(fraction) * num_leaves))
    params.update(
        num_leaves=num_leaves,
        num_leaves_to_search=min(num_leaves, max(1, searched)),
        training_sample_size=min(count, max(50_000, 50 * num_leaves)),
        dims_per_block=4 if count >= AH_4_DIMS_MIN_COUNT else 2,
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


def rule_leaves_to_search(num_leaves: int) -> int:
  """Leaves a tree of `num_leaves` searches by the rule (module docstring).

  2 * sqrt(num_leaves), capped at max(SEARCHED_LEAVES_FLOOR,
  SEARCHED_LEAVES_FRACTION * num_leaves): 14 of 49, 20 of 100, 24 of 141 to
  1200, then 2%: 40 of 2000.
  """
  return min(math.ceil(2 * math.sqrt(num_leaves)),
             max(SEARCHED_LEAVES_FLOOR,
                 math.ceil(SEARCHED_LEAVES_FRACTION * num_leaves)))


def query_parameters(params: Mapping[str, Any], count: int, k: int
                     ) -> tuple[int, int] | None:
  """(leaves searched, candidates reordered) of a tree search for the top k.

  Read from the parameters at query time, so a caller may change
  'num_leaves_to_search' / 'reorder_num_neighbors' in an index's metadata
  without rebuilding the tree (benchmarks/index_bench.py's curve does).

  Args:
    params: `IndexMetadata.backend_params` of a ScaNN index.
    count: gallery size.
    k: neighbours wanted, 1 <= k <= count.

  Returns:
    None for brute force (nothing to choose), else the pair.
  """
  if params.get("mode") != "tree_ah":
    return None
  # 10 * k: a large k still gets rescored candidates beyond its own k.
  pre_reorder = min(count, max(int(params["reorder_num_neighbors"]), 10 * k))
  num_leaves = int(params["num_leaves"])
  # Search enough leaves to hold twice the reorder candidates on average:
  # with a large k the default leaves could hold fewer than k points, and
  # ScaNN would pad the result with NaN.
  leaves = max(int(params["num_leaves_to_search"]),
               math.ceil(2 * pre_reorder * num_leaves / count))
  return min(num_leaves, leaves), pre_reorder


def _build(embeddings: np.ndarray, params: Mapping[str, Any]):
  if embeddings.shape[0] == 0:
    raise base.BuildError("empty gallery")
  dims_per_block = int(params.get("dims_per_block", 2))
  if params["mode"] == "tree_ah" and dims_per_block >= 4 and embeddings.shape[1] < 128:
    logging.warning(
        "ScaNN AH with %d dimensions a block on %d-d embeddings: measured to"
        " lose recall below 128-d; build with options={'dims_per_block': 2}"
        " if recall_against_exact says so.", dims_per_block, embeddings.shape[1])
  try:
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
          dims_per_block,
          # ScaNN reads NaN as "no anisotropic loss".
          anisotropic_quantization_threshold=float(
              "nan" if threshold is None else threshold),
      ).reorder(int(params["reorder_num_neighbors"]))
    return builder.build()
  except Exception as e:  # pylint: disable=broad-except
    raise base.BuildError(f"ScaNN build failed: {type(e).__name__}: {e}") from e


def _search(index: base.Index, queries: np.ndarray, k: int, block_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
  del block_size  # ScaNN batches and threads queries itself.
  kwargs: dict[str, Any] = {"final_num_neighbors": k}
  tree = query_parameters(index.metadata.backend_params, index.metadata.count, k)
  if tree is not None:
    leaves, pre_reorder = tree
    kwargs.update(pre_reorder_num_neighbors=pre_reorder, leaves_to_search=leaves)
  rows, scores = index.state.search_batched_parallel(queries, **kwargs)
  rows = np.asarray(rows, np.int64)
  scores = np.asarray(scores, np.float32)
  # ScaNN pads short results (too few points in the searched leaves) with NaN.
  missing = np.isnan(scores)
  rows[missing] = -1
  scores[missing] = -np.inf
  return scores, rows


def share_embeddings(scann_dir: str, embeddings: np.ndarray) -> None:
  """Points ScaNN's float dataset asset at ../embeddings.npy and drops its copy.

  ScaNN serialises the float32 dataset it reorders (and brute-forces) with as
  `dataset.npy`, the same array as our embeddings.npy: keeping both doubled
  the size on disk. Its copy is only replaced when it holds exactly our array,
  so a ScaNN version that stored a transformed dataset would keep its own.

  Args:
    scann_dir: a directory ScaNN serialised a searcher into.
    embeddings: float32 [count, dim], the index embeddings saved as
      `../embeddings.npy` beside `scann_dir`.
  """
  from google.protobuf import text_format  # pylint: disable=g-import-not-at-top
  from scann.scann_ops import scann_assets_pb2  # pylint: disable=g-import-not-at-top
  assets_path = os.path.join(scann_dir, ASSETS_FILE)
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
    asset.asset_path = f"../{base.EMBEDDINGS_FILE}"
  with open(assets_path, "w") as f:
    f.write(text_format.MessageToString(assets))


def _save(index: base.Index, directory: str) -> None:
  scann_dir = os.path.join(directory, SCANN_DIR)
  os.makedirs(scann_dir)
  # Relative asset paths: the index directory is renamed into place after
  # this, and may be moved later, and must still load.
  index.state.serialize(scann_dir, relative_path=True)
  share_embeddings(scann_dir, index.embeddings)


def _load(directory: str, metadata: base.IndexMetadata, embeddings: np.ndarray):
  del embeddings  # The searcher reads them through its assets file.
  scann_dir = os.path.join(directory, SCANN_DIR)
  if not os.path.isfile(os.path.join(scann_dir, ASSETS_FILE)):
    raise base.IndexMismatchError(directory, f"{SCANN_DIR}/{ASSETS_FILE}",
                                  "present", "missing")
  from scann import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  try:
    searcher = scann_ops_pybind.load_searcher(scann_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise base.IndexMismatchError(directory, SCANN_DIR, "a loadable ScaNN"
                                  " searcher", f"{type(e).__name__}: {e}") from e
  if searcher.size() != metadata.count:
    raise base.IndexMismatchError(directory, f"{SCANN_DIR} size", metadata.count,
                                  searcher.size())
  return searcher


BACKEND = base.Backend(name="scann", parameters=scann_parameters, build=_build,
                       search=_search, save=_save, load=_load)
