"""Building an index over a gallery, and searching one or several.

A gallery (the images or the captions of one task, embedded with one model
snapshot) becomes an `Index` (`base`): its L2-normalised float32 embeddings
`[count, dim]`, the ids of its items `[count]`, the state its backend built
and an `IndexMetadata` that says which snapshot, task and modality it was
built from. Similarity is the dot product (cosine, since embeddings are
normalised); all scores are returned best first.

A backend that cannot index a gallery (ScaNN: an empty one, or ScaNN
raising) raises `base.BuildError`; `build_index` then builds the
`registry.FALLBACK_BACKEND` (exact) instead, logging why, and the metadata
records the backend actually used.

(Named `searching`, not `search`, so that the package's `search` is always
the function it re-exports.)
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from ccr_jax.indexing.base import (BuildError, Index, IndexMetadata,
                                   MODALITIES)
from ccr_jax.indexing.exact import DEFAULT_BLOCK_SIZE, exact_search
from ccr_jax.indexing.registry import FALLBACK_BACKEND, get_backend


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
                options: Mapping[str, Any] | None = None) -> Index:
  """Builds an index over one gallery.

  Args:
    embeddings: float32 [count, dim], L2-normalised gallery embeddings.
    item_ids: int [count], the id of each gallery item.
    backend: a name of `registry.names()` ('scann', the default, or 'exact').
    snapshot: the snapshot that embedded the gallery.
    task: the task the gallery belongs to.
    modality: 'images' or 'texts'.
    options: overrides of the backend's parameter rule (ScaNN:
      `scann_parameters`' keys; exact: none).

  Returns:
    The Index. When the backend cannot index the gallery (ScaNN: empty, or
    ScaNN raising), an exact index, with the reason logged and stored in
    `metadata.backend_params['fallback_reason']`.
  """
  chosen = get_backend(backend)
  if modality not in MODALITIES:
    raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
  embeddings, item_ids = _check_gallery(embeddings, item_ids)
  count, dim = embeddings.shape
  metadata = functools.partial(IndexMetadata, snapshot=int(snapshot),
                               task=int(task), modality=modality, dim=int(dim),
                               count=int(count))
  params = chosen.parameters(count, options or {})
  try:
    state = chosen.build(embeddings, params)
  except BuildError as e:
    if chosen.name == FALLBACK_BACKEND:
      raise
    reason = str(e)
  else:
    return Index(metadata(backend=chosen.name, backend_params=params),
                 embeddings, item_ids, state)
  logging.warning("Index (snapshot %d, task %d, %s, %d items): %s; using the"
                  " %s backend.", snapshot, task, modality, count, reason,
                  FALLBACK_BACKEND)
  fallback = get_backend(FALLBACK_BACKEND)
  fallback_params = fallback.parameters(count, {})
  return Index(metadata(backend=fallback.name,
                        backend_params={**fallback_params,
                                        "fallback_reason": reason}),
               embeddings, item_ids, fallback.build(embeddings, fallback_params))


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
  scores, rows = get_backend(index.metadata.backend).search(
      index, queries, k, block_size)
  return scores, np.where(rows >= 0, index.item_ids[rows], -1)


def search_many(indices: Sequence[Index], queries, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Searches several indices as one gallery (their union).

  This is the task-agnostic gallery: the union of per-task indices, possibly
  embedded with different snapshots. Each index returns its own top-k and the
  results are merged by score.

  Args:
    indices: indices of the same dim.
    queries: float32 [num_queries, dim], or one such array per index (the
      same queries mapped into each index's space, e.g. by a query adapter).
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
  if not isinstance(queries, (list, tuple)):
    queries = [queries] * len(indices)
  if len(queries) != len(indices):
    raise ValueError(f"{len(queries)} query arrays for {len(indices)} indices")
  parts = [search(index, q, k) for index, q in zip(indices, queries)]
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
