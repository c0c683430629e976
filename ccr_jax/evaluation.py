"""Retrieval and continual-learning metrics (pure functions).

Ranks follow the VSE++ protocol (Faghri et al., `evaluation.py` of VSE++):

* image -> text: an image query succeeds at K if ANY of its captions is in the
  top K of the caption gallery; its rank is the best (smallest) 0-based rank
  among its captions.
* text -> image: a caption's rank is the 0-based rank of its image in the image
  gallery.

Both directions are one generic computation: every query and every gallery
item has an `owner` (an image id: a caption's owner is its image, an image
owns itself) and the positives of a query are the gallery items with the same
owner. Recalls are percentages; `medr` and `meanr` are 1-based as in VSE++.

Continual metrics read an accuracy matrix `R[t][j]` (a metric on task j's test
queries after training task t, NaN where j > t); see `continual_summary`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccr_jax import indexing

DEFAULT_KS = (1, 5, 10)


@jax.jit
def _best_positive_ranks(queries, gallery, query_owner, gallery_owner):
  # HIGHEST: accelerators otherwise multiply float32 in bfloat16, which would
  # turn near-ties into ties (or break real ones) and shift ranks.
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  positive = query_owner[:, None] == gallery_owner[None, :]
  best = jnp.max(jnp.where(positive, scores, -jnp.inf), axis=1)
  ranks = jnp.sum(scores > best[:, None], axis=1, dtype=jnp.int32)
  return ranks, jnp.any(positive, axis=1)


def exact_ranks(query_emb, gallery_emb, query_owner, gallery_owner, *,
                block_size: int = indexing.DEFAULT_BLOCK_SIZE) -> np.ndarray:
  """0-based rank of each query's best positive in the gallery, exactly.

  The rank is the number of gallery items scoring strictly higher than the
  query's best-scoring positive. Ties therefore count in the query's favour:
  a negative with exactly the positive's score does not push it down (VSE++
  sorts and takes the first position of a positive, which resolves ties by
  sort order; counting "strictly greater" makes the result order-independent).

  Queries are scored in fixed-size, zero-padded blocks by one jitted program,
  so memory is [block_size, num_gallery] and nothing loops per query.

  Args:
    query_emb: float [num_queries, dim].
    gallery_emb: float [num_gallery, dim].
    query_owner: int [num_queries], the owner (image id) of each query.
    gallery_owner: int [num_gallery], the owner of each gallery item.
    block_size: queries per compiled block.

  Returns:
    int64 [num_queries] ranks in [0, num_gallery).

  Raises:
    ValueError: shapes disagree, or a query has no positive in the gallery
      (its rank would be undefined).
  """
  query_emb = np.asarray(query_emb, np.float32)
  gallery_emb = np.asarray(gallery_emb, np.float32)
  query_owner = np.asarray(query_owner)
  gallery_owner = np.asarray(gallery_owner)
  num_queries = query_emb.shape[0]
  if (query_emb.ndim != 2 or gallery_emb.ndim != 2
      or query_emb.shape[1] != gallery_emb.shape[1]
      or query_owner.shape != (num_queries,)
      or gallery_owner.shape != (gallery_emb.shape[0],)):
    raise ValueError(
        "expected query_emb [Q, D], gallery_emb [G, D], query_owner [Q],"
        f" gallery_owner [G]; got {query_emb.shape}, {gallery_emb.shape},"
        f" {query_owner.shape}, {gallery_owner.shape}")
  if num_queries == 0:
    return np.zeros((0,), np.int64)
  # Dense int32 codes: owner ids may exceed int32 (JAX's default int) and
  # padded query rows get a code (-1) that matches no gallery item.
  _, codes = np.unique(np.concatenate([query_owner, gallery_owner]),
                       return_inverse=True)
  codes = codes.astype(np.int32).reshape(-1)
  query_codes, gallery_codes = codes[:num_queries], codes[num_queries:]

  block, num_blocks = indexing.query_blocks(num_queries, block_size)
  padded = np.zeros((block * num_blocks, query_emb.shape[1]), np.float32)
  padded[:num_queries] = query_emb
  padded_codes = np.full((block * num_blocks,), -1, np.int32)
  padded_codes[:num_queries] = query_codes
  gallery_device = jnp.asarray(gallery_emb)
  gallery_codes_device = jnp.asarray(gallery_codes)
  # Dispatch every block before reading any back.
  results = [
      _best_positive_ranks(padded[b * block:(b + 1) * block], gallery_device,
                           padded_codes[b * block:(b + 1) * block],
                           gallery_codes_device)
      for b in range(num_blocks)
  ]
  ranks = np.concatenate([np.asarray(r) for r, _ in results])[:num_queries]
  has_positive = np.concatenate([np.asarray(h) for _, h in results])
  has_positive = has_positive[:num_queries]
  if not has_positive.all():
    missing = np.flatnonzero(~has_positive)
    raise ValueError(
        f"{missing.size} queries have no positive in the gallery, e.g. query"
        f" {int(missing[0])} (owner {query_owner[missing[0]]!r}); the gallery"
        " must hold every query's image/captions")
  return ranks.astype(np.int64)


def ranks_from_topk(topk_owner, query_owner) -> np.ndarray:
  """0-based rank of each query's first positive within a retrieved top-k.

  Args:
    topk_owner: int [num_queries, k], owners of the retrieved items, best
      first (e.g. the image ids of the captions an index returned).
    query_owner: int [num_queries].

  Returns:
    int64 [num_queries]: the first position holding a positive, or k if none
    does (meaning "rank >= k": Recall@K is only valid for K <= k, and
    medr/meanr from these ranks are lower bounds).
  """
  topk_owner = np.asarray(topk_owner)
  query_owner = np.asarray(query_owner)
  if topk_owner.ndim != 2 or query_owner.shape != (topk_owner.shape[0],):
    raise ValueError(f"expected topk_owner [Q, k] and query_owner [Q], got"
                     f" {topk_owner.shape} and {query_owner.shape}")
  hit = topk_owner == query_owner[:, None]
  return np.where(hit.any(axis=1), hit.argmax(axis=1),
                  topk_owner.shape[1]).astype(np.int64)


def recall_at_k(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Recall@K in percent from 0-based ranks.

  Args:
    ranks: int [num_queries], 0-based.
    ks: the K values.

  Returns:
    {"r1": ..., "r5": ..., "r10": ...} (one "r{K}" per K): 100 * mean(rank < K).
  """
  ranks = np.asarray(ranks)
  if ranks.size == 0:
    raise ValueError("recall_at_k needs at least one rank")
  return {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def rank_stats(ranks) -> dict[str, float]:
  """Median and mean rank, 1-based as in VSE++.

  Args:
    ranks: int [num_queries], 0-based.

  Returns:
    {"medr": floor(median(ranks)) + 1, "meanr": mean(ranks) + 1}.
  """
  ranks = np.asarray(ranks, np.float64)
  if ranks.size == 0:
    raise ValueError("rank_stats needs at least one rank")
  return {"medr": float(np.floor(np.median(ranks)) + 1),
          "meanr": float(ranks.mean() + 1)}


def rsum(image_to_text: Mapping[str, float],
         text_to_image: Mapping[str, float]) -> float:
  """R@1 + R@5 + R@10 of both directions (`recall_at_k` outputs)."""
  return float(sum(recalls[f"r{k}"] for recalls in (image_to_text, text_to_image)
                   for k in DEFAULT_KS))


def continual_summary(matrix) -> dict[str, float | None]:
  """Summaries of an accuracy matrix.

  Args:
    matrix: float [T, T]; matrix[t][j] is a metric on task j after training
      task t, for j <= t. Entries above the diagonal are ignored (NaN by
      convention).

  Returns:
    final_average: A_T = mean_j R[T-1][j].
    average_incremental: mean over t of A_t = mean_{j<=t} R[t][j].
    forgetting: mean over j < T-1 of max_{j<=t<T-1} R[t][j] - R[T-1][j] (the
      FACIL / Mammoth form); None if T == 1.
    backward_transfer: mean over j < T-1 of R[T-1][j] - R[j][j]; None if
      T == 1.

  Raises:
    ValueError: not square, or a NaN on or below the diagonal (a missing
      evaluation would silently bias every average).
  """
  matrix = np.asarray(matrix, np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
    raise ValueError(f"matrix must be [T, T] with T >= 1, got {matrix.shape}")
  num_tasks = matrix.shape[0]
  lower = np.tril_indices(num_tasks)
  if np.isnan(matrix[lower]).any():
    raise ValueError("matrix has NaN on or below the diagonal: every task j <="
                     f" t must be evaluated; got\n{matrix}")
  averages = [matrix[t, :t + 1].mean() for t in range(num_tasks)]
  summary = {
      "final_average": float(averages[-1]),
      "average_incremental": float(np.mean(averages)),
      "forgetting": None,
      "backward_transfer": None,
  }
  if num_tasks > 1:
    last = matrix[-1]
    old = range(num_tasks - 1)
    summary["forgetting"] = float(np.mean(
        [matrix[j:num_tasks - 1, j].max() - last[j] for j in old]))
    summary["backward_transfer"] = float(np.mean(
        [last[j] - matrix[j, j] for j in old]))
  return summary
