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

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccr_jax import indexing
from ccr_jax.indexing import exact

DEFAULT_KS = (1, 5, 10)


# HIGHEST: accelerators otherwise multiply float32 in bfloat16, which would
# turn near-ties into ties (or break real ones) and shift ranks.
_PRECISION = jax.lax.Precision.HIGHEST
# Above this many bytes of scores, `paired_ranks` ranks each direction in
# query blocks instead of holding the whole [images, texts] score matrix.
DEFAULT_MAX_SCORE_BYTES = 2 << 30


def _ranks_from_scores(scores, positive, axis):
  """Items strictly above the best positive along `axis`; any positive at all."""
  best = jnp.max(jnp.where(positive, scores, -jnp.inf), axis=axis, keepdims=True)
  ranks = jnp.sum(scores > best, axis=axis, dtype=jnp.int32)
  return ranks, jnp.any(positive, axis=axis)


@functools.partial(jax.jit, static_argnames=("k",))
def _ranks_and_topk_block(queries, gallery, query_owner, gallery_owner, k):
  scores = jnp.matmul(queries, gallery.T, precision=_PRECISION)
  positive = query_owner[:, None] == gallery_owner[None, :]
  ranks, has_positive = _ranks_from_scores(scores, positive, axis=1)
  # The index-agreement check needs the exact top-k of the very same scores;
  # taking it here saves a second pass over the gallery.
  top = (jax.lax.top_k(scores, k)[1] if k
         else jnp.zeros((queries.shape[0], 0), jnp.int32))
  return ranks, has_positive, top


@jax.jit
def _paired_ranks_dense(images, texts, image_codes, text_codes):
  # One score matrix ranked along both axes: rows give image->text ranks,
  # columns text->image ranks.
  scores = jnp.matmul(images, texts.T, precision=_PRECISION)
  positive = image_codes[:, None] == text_codes[None, :]
  i2t, image_has = _ranks_from_scores(scores, positive, axis=1)
  t2i, text_has = _ranks_from_scores(scores, positive, axis=0)
  return i2t, t2i, image_has, text_has


def _check_pair(query_emb, gallery_emb, query_owner, gallery_owner):
  # Embeddings stay where they are: JAX arrays (fresh from the model) are
  # ranked on their device without a host round trip. Owners are small ids,
  # needed on the host (codes, error messages).
  query_emb = exact.float32_rows(query_emb)
  gallery_emb = exact.float32_rows(gallery_emb)
  query_owner, gallery_owner = (np.asarray(x) for x in jax.device_get(
      (query_owner, gallery_owner)))
  if (query_emb.ndim != 2 or gallery_emb.ndim != 2
      or query_emb.shape[1] != gallery_emb.shape[1]
      or query_owner.shape != (query_emb.shape[0],)
      or gallery_owner.shape != (gallery_emb.shape[0],)):
    raise ValueError(
        "expected query_emb [Q, D], gallery_emb [G, D], query_owner [Q],"
        f" gallery_owner [G]; got {query_emb.shape}, {gallery_emb.shape},"
        f" {query_owner.shape}, {gallery_owner.shape}")
  return query_emb, gallery_emb, query_owner, gallery_owner


def _owner_codes(query_owner, gallery_owner):
  # Dense int32 codes: owner ids may exceed int32 (JAX's default int), and
  # -1 (padding) then matches nothing.
  _, codes = np.unique(np.concatenate([query_owner, gallery_owner]),
                       return_inverse=True)
  codes = codes.astype(np.int32).reshape(-1)
  return codes[:len(query_owner)], codes[len(query_owner):]


def _require_positive(has_positive, query_owner):
  if not has_positive.all():
    missing = np.flatnonzero(~has_positive)
    raise ValueError(
        f"{missing.size} queries have no positive in the gallery, e.g. query"
        f" {int(missing[0])} (owner {query_owner[missing[0]]!r}); the gallery"
        " must hold every query's image/captions")


def exact_ranks_and_topk(query_emb, gallery_emb, query_owner, gallery_owner, k: int,
                         *, block_size: int = indexing.DEFAULT_BLOCK_SIZE
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Exact ranks (`exact_ranks`) and the exact top-k, from one scoring pass.

  Args:
    query_emb: float [num_queries, dim], NumPy or JAX (a JAX array is ranked on
      its device, without a copy to the host and back).
    gallery_emb: float [num_gallery, dim].
    query_owner: int [num_queries], the owner (image id) of each query.
    gallery_owner: int [num_gallery], the owner of each gallery item.
    k: top-k rows wanted (clamped to num_gallery); 0 for ranks only.
    block_size: queries per compiled block.

  Returns:
    ranks: int64 [num_queries], 0-based, in [0, num_gallery).
    top_rows: int64 [num_queries, min(k, num_gallery)], gallery rows by
      decreasing score (`lax.top_k`: equal scores keep the lower row first).

  Raises:
    ValueError: shapes disagree, or a query has no positive in the gallery
      (its rank would be undefined).
  """
  query_emb, gallery_emb, query_owner, gallery_owner = _check_pair(
      query_emb, gallery_emb, query_owner, gallery_owner)
  num_queries = query_emb.shape[0]
  k = max(0, min(int(k), gallery_emb.shape[0]))
  if num_queries == 0:
    return np.zeros((0,), np.int64), np.zeros((0, k), np.int64)
  query_codes, gallery_codes = _owner_codes(query_owner, gallery_owner)
  # Padded query rows get owner code -1, which matches no gallery item.
  ranks, has_positive, top = indexing.map_query_blocks(
      lambda q, qc, g, gc: _ranks_and_topk_block(q, g, qc, gc, k),
      [(query_emb, 0.0), (query_codes, -1)],
      [exact.device_gallery(gallery_emb), jax.device_put(gallery_codes)], block_size)
  _require_positive(has_positive, query_owner)
  return ranks.astype(np.int64), top.astype(np.int64)


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
    query_emb, gallery_emb, query_owner, gallery_owner, block_size: as in
      `exact_ranks_and_topk`.

  Returns:
    int64 [num_queries] ranks in [0, num_gallery).

  Raises:
    ValueError: shapes disagree, or a query has no positive in the gallery
      (its rank would be undefined).
  """
  return exact_ranks_and_topk(query_emb, gallery_emb, query_owner, gallery_owner,
                              0, block_size=block_size)[0]


def paired_ranks(image_emb, text_emb, image_owner, text_owner, *,
                 max_score_bytes: int = DEFAULT_MAX_SCORE_BYTES,
                 block_size: int = indexing.DEFAULT_BLOCK_SIZE
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Image->text and text->image ranks when both sides are one embedding set.

  The standard (non-continual) protocol, e.g. COCO-5K: images query the
  captions and captions query the images, so both directions rank the same
  score matrix. It is computed once and ranked along both axes, which halves
  the matmul work of two `exact_ranks` calls. Ranks equal theirs exactly.

  Args:
    image_emb: float [num_images, dim], NumPy or JAX (as in `exact_ranks`).
    text_emb: float [num_texts, dim].
    image_owner: int [num_images] (an image owns itself: its id).
    text_owner: int [num_texts], the id of each text's image.
    max_score_bytes: above num_images * num_texts * 4 bytes, the two
      directions are ranked separately in query blocks (memory
      [block_size, gallery] instead of the whole matrix; twice the matmuls).
    block_size: queries per block in that case.

  Returns:
    i2t: int64 [num_images], t2i: int64 [num_texts]; 0-based ranks.

  Raises:
    ValueError: as `exact_ranks`, for either direction.
  """
  image_emb, text_emb, image_owner, text_owner = _check_pair(
      image_emb, text_emb, image_owner, text_owner)
  num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
  if not num_images or not num_texts or num_images * num_texts * 4 > max_score_bytes:
    return (exact_ranks(image_emb, text_emb, image_owner, text_owner,
                        block_size=block_size),
            exact_ranks(text_emb, image_emb, text_owner, image_owner,
                        block_size=block_size))
  image_codes, text_codes = _owner_codes(image_owner, text_owner)
  i2t, t2i, image_has, text_has = jax.device_get(_paired_ranks_dense(
      *jax.device_put((image_emb, text_emb, image_codes, text_codes))))
  _require_positive(image_has, image_owner)
  _require_positive(text_has, text_owner)
  return i2t.astype(np.int64), t2i.astype(np.int64)


def owner_of(modality: str, item_ids: np.ndarray, captions_per_image: int) -> np.ndarray:
  """The image id each gallery item `[count]` belongs to (captions: id * C + c)."""
  return item_ids // captions_per_image if modality == "texts" else item_ids


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


def exact_metrics(query_emb, gallery_emb, query_owner, gallery_owner,
                  ks: Sequence[int], top: int = 0) -> tuple[dict[str, float], np.ndarray]:
  """Exact Recall@K, medr and meanr, and the exact top rows.

  Args:
    query_emb: float [Q, dim]; gallery_emb: float [G, dim].
    query_owner: int [Q]; gallery_owner: int [G] (image ids).
    ks: the K values.
    top: at least this many top rows (beside max(ks)).

  Returns:
    ({"exact_r1": ..., "medr": ..., "meanr": ...}, top rows int64
    [Q, max(*ks, top)]).
  """
  ranks, top_rows = exact_ranks_and_topk(
      query_emb, gallery_emb, query_owner, gallery_owner, max(*ks, top))
  recalls = recall_at_k(ranks, ks)
  return ({f"exact_{name}": v for name, v in recalls.items()}
          | rank_stats(ranks)), top_rows


def _take_rows(x, rows: np.ndarray):
  """`x[rows]`, on the device for a JAX array (no host round trip)."""
  if isinstance(x, jax.Array):
    return jnp.take(x, jax.device_put(rows), axis=0)
  return x[rows]


def fold_metrics(query_emb, gallery_emb, query_owner, gallery_owner,
                 image_order, fold_size: int, ks: Sequence[int]) -> dict[str, float]:
  """`exact_metrics` averaged over folds of `fold_size` images (COCO-1K).

  VSE++'s COCO-1K protocol: the 5,000 test images in their split order are cut
  into 5 folds of 1,000; each fold's images and captions are queries and
  gallery only within the fold; every metric is averaged over the folds.

  Args:
    query_emb, gallery_emb, query_owner, gallery_owner: as `exact_metrics`.
    image_order: int [N], the test images' ids in split order (N must be a
      multiple of fold_size).
    fold_size: images per fold (1000 for COCO-1K).
    ks: the K values.

  Returns:
    {"fold_r1": ..., "fold_medr": ..., "fold_meanr": ...}: fold means.

  Raises:
    ValueError: N is not a positive multiple of fold_size.
  """
  image_order = np.asarray(image_order)
  if fold_size <= 0 or len(image_order) % fold_size or not len(image_order):
    raise ValueError(f"{len(image_order)} test images cannot be cut into folds of "
                     f"{fold_size}; set eval.fold_size to a divisor (COCO-1K: "
                     "1000 on the 5,000-image test split) or 0 for no folds.")
  query_emb, gallery_emb, query_owner, gallery_owner = _check_pair(
      query_emb, gallery_emb, query_owner, gallery_owner)
  per_fold = []
  for start in range(0, len(image_order), fold_size):
    fold = image_order[start:start + fold_size]
    q = np.flatnonzero(np.isin(query_owner, fold))
    g = np.flatnonzero(np.isin(gallery_owner, fold))
    m, _ = exact_metrics(_take_rows(query_emb, q), _take_rows(gallery_emb, g),
                         query_owner[q], gallery_owner[g], ks)
    per_fold.append(m)
  return {"fold_" + name.removeprefix("exact_"):
          float(np.mean([m[name] for m in per_fold])) for name in per_fold[0]}


def rsum(image_to_text: Mapping[str, float],
         text_to_image: Mapping[str, float],
         ks: Sequence[int] = DEFAULT_KS) -> float:
  """The sum of R@K over `ks` in both directions (`recall_at_k` outputs);
  VSE++'s rsum with the default ks (1, 5, 10)."""
  return float(sum(recalls[f"r{k}"] for recalls in (image_to_text, text_to_image)
                   for k in ks))


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
