"""Tests for ccr_jax.evaluation against hand-computed and NumPy-loop references."""

import math

import jax
import numpy as np
import pytest

from ccr_jax import evaluation


def _reference_ranks(queries, gallery, query_owner, gallery_owner):
  """The definition, one query at a time: items strictly above the best positive."""
  ranks = []
  for q, owner in zip(queries.astype(np.float64), query_owner):
    scores = gallery.astype(np.float64) @ q
    best = max(s for s, o in zip(scores, gallery_owner) if o == owner)
    ranks.append(sum(1 for s in scores if s > best))
  return np.array(ranks)


def _reference_recall(ranks, k):
  return 100.0 * sum(1 for r in ranks if r < k) / len(ranks)


def _normalise(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _min_gap_to_best(queries, gallery, query_owner, gallery_owner):
  """Smallest |score - best positive score| over items that do not tie it."""
  scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
  positive = query_owner[:, None] == gallery_owner[None, :]
  best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
  gaps = np.abs(scores - best)
  return gaps[gaps > 0].min()


def _retrieval_data(num_images=40, captions_per_image=5, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  images = _normalise(rng.normal(size=(num_images, dim)))
  image_ids = rng.choice(10**6, size=num_images, replace=False)
  caption_owner = np.repeat(image_ids, captions_per_image)
  # Captions near their image but noisy enough that some rank below others.
  captions = _normalise(np.repeat(images, captions_per_image, axis=0)
                        + 0.9 * rng.normal(size=(num_images * captions_per_image,
                                                 dim)))
  return images, image_ids, captions, caption_owner


def test_hand_computed_example():
  # Dyadic values: every dot product is exact in float32, so ties are real.
  images = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
  image_ids = np.array([0, 1, 2])
  captions = np.array([[1, 0], [0, 1], [.5, .5], [-1, 0], [1, 0]], np.float32)
  caption_owner = np.array([0, 0, 1, 1, 2])
  # Image 0: its caption [1,0] scores 1, nothing higher -> 0. Image 1: best own
  # caption [.5,.5] scores .5, only [0,1] is higher -> 1. Image 2: its caption
  # ties caption 0 at 1 -> 0 (ties count in the query's favour).
  i2t = evaluation.exact_ranks(images, captions, image_ids, caption_owner,
                               block_size=2)
  np.testing.assert_array_equal(i2t, [0, 1, 0])
  # Caption 1 ([0,1], of image 0) sees image 1 at 1 above image 0 at 0 -> 1;
  # every other caption has its image at the top, tied or not.
  t2i = evaluation.exact_ranks(captions, images, caption_owner, image_ids,
                               block_size=2)
  np.testing.assert_array_equal(t2i, [0, 1, 0, 0, 0])

  assert evaluation.recall_at_k(i2t) == pytest.approx(
      {"r1": 200 / 3, "r5": 100.0, "r10": 100.0})
  assert evaluation.recall_at_k(t2i) == {"r1": 80.0, "r5": 100.0, "r10": 100.0}
  assert evaluation.rank_stats(i2t) == pytest.approx({"medr": 1.0,
                                                      "meanr": 4 / 3})
  assert evaluation.rank_stats(t2i) == pytest.approx({"medr": 1.0,
                                                      "meanr": 1.2})
  assert evaluation.rsum(evaluation.recall_at_k(i2t),
                         evaluation.recall_at_k(t2i)) == pytest.approx(
                             200 / 3 + 200 + 80 + 200)
  # Other K values: the sum over those (issue 25 D1).
  assert evaluation.rsum(evaluation.recall_at_k(i2t, (1, 2)),
                         evaluation.recall_at_k(t2i, (1, 2)), (1, 2)) == pytest.approx(
                             200 / 3 + 100 + 80 + 100)


@pytest.mark.parametrize("block_size", [7, 64, 1024])
def test_exact_ranks_match_reference_both_directions(block_size):
  images, image_ids, captions, caption_owner = _retrieval_data()
  # The reference works in float64, the function in float32 (error ~1e-7 on
  # unit vectors); equality of ranks is exact as long as no score lies within
  # that error of a best positive without tying it.
  for queries, gallery, q_owner, g_owner in [
      (images, captions, image_ids, caption_owner),  # image -> text, 5 positives
      (captions, images, caption_owner, image_ids),  # text -> image
  ]:
    assert _min_gap_to_best(queries, gallery, q_owner, g_owner) > 1e-5
    ranks = evaluation.exact_ranks(queries, gallery, q_owner, g_owner,
                                   block_size=block_size)
    expected = _reference_ranks(queries, gallery, q_owner, g_owner)
    np.testing.assert_array_equal(ranks, expected)
    assert ranks.dtype == np.int64
    # The data must exercise the interesting range, not rank everything 0.
    assert 0 < np.mean(expected == 0) < 1 and expected.max() >= 10
    recalls = evaluation.recall_at_k(ranks, ks=(1, 5, 10))
    for k in (1, 5, 10):
      assert recalls[f"r{k}"] == pytest.approx(_reference_recall(expected, k))
    stats = evaluation.rank_stats(ranks)
    assert stats["medr"] == math.floor(np.median(expected)) + 1
    assert stats["meanr"] == pytest.approx(np.mean(expected) + 1)


def test_exact_ranks_with_many_ties():
  # Small integer vectors: dot products are exact, so ties are frequent and
  # exactly reproduced by the integer reference.
  rng = np.random.default_rng(1)
  gallery = rng.integers(-1, 2, size=(60, 3)).astype(np.float32)
  gallery_owner = np.repeat(np.arange(12), 5)
  queries = rng.integers(-1, 2, size=(30, 3)).astype(np.float32)
  query_owner = rng.integers(0, 12, size=30)
  ranks = evaluation.exact_ranks(queries, gallery, query_owner, gallery_owner,
                                 block_size=8)
  expected = _reference_ranks(queries, gallery, query_owner, gallery_owner)
  np.testing.assert_array_equal(ranks, expected)
  scores = queries @ gallery.T
  best = np.where(query_owner[:, None] == gallery_owner[None], scores,
                  -np.inf).max(1)
  assert ((scores == best[:, None]).sum(1) > 1).any()  # ties really occur


def test_exact_ranks_owner_ids_beyond_int32():
  images = np.eye(3, dtype=np.float32)
  ids = np.array([2**40, 2**40 + 1, 5], np.int64)  # would collide in int32
  ranks = evaluation.exact_ranks(images, images, ids, ids, block_size=4)
  np.testing.assert_array_equal(ranks, [0, 0, 0])


def test_exact_ranks_raises_without_positive():
  images = np.eye(2, dtype=np.float32)
  with pytest.raises(ValueError, match="no positive"):
    evaluation.exact_ranks(images, images, np.array([0, 7]), np.array([0, 1]))


def test_exact_ranks_match_topk_ranks():
  images, image_ids, captions, caption_owner = _retrieval_data(seed=3)
  exact = evaluation.exact_ranks(images, captions, image_ids, caption_owner)
  order = np.argsort(-(images @ captions.T), axis=1, kind="stable")[:, :10]
  from_topk = evaluation.ranks_from_topk(caption_owner[order], image_ids)
  np.testing.assert_array_equal(from_topk, np.minimum(exact, 10))


def test_ranks_from_topk():
  topk_owner = np.array([[3, 1, 1], [2, 2, 5], [4, 4, 4]])
  ranks = evaluation.ranks_from_topk(topk_owner, np.array([1, 2, 9]))
  np.testing.assert_array_equal(ranks, [1, 0, 3])  # 3 == k: not in the top-k


def test_rank_stats_even_count():
  # median 1.5 -> floor 1 -> medr 2 (VSE++: np.floor(np.median(r)) + 1).
  assert evaluation.rank_stats([0, 1, 2, 3]) == {"medr": 2.0, "meanr": 2.5}


def test_continual_summary_hand_computed():
  nan = float("nan")
  matrix = [[80, nan, nan],
            [85, 70, nan],
            [50, 65, 90]]
  summary = evaluation.continual_summary(matrix)
  # A_0 = 80, A_1 = (85 + 70) / 2 = 77.5, A_2 = (50 + 65 + 90) / 3 = 68.33..
  assert summary["final_average"] == pytest.approx(205 / 3)
  assert summary["average_incremental"] == pytest.approx(
      (80 + 77.5 + 205 / 3) / 3)
  # Task 0 peaked at 85 (after task 1), ends at 50 -> 35; task 1: 70 -> 65.
  assert summary["forgetting"] == pytest.approx((35 + 5) / 2)
  # Against the just-trained value: 50 - 80 and 65 - 70.
  assert summary["backward_transfer"] == pytest.approx((-30 - 5) / 2)
  assert all(isinstance(v, float) for v in summary.values())


def test_continual_summary_single_task_and_errors():
  assert evaluation.continual_summary([[42.0]]) == {
      "final_average": 42.0, "average_incremental": 42.0,
      "forgetting": None, "backward_transfer": None}
  with pytest.raises(ValueError, match="NaN"):
    evaluation.continual_summary([[1.0, np.nan], [np.nan, 2.0]])
  with pytest.raises(ValueError, match="T, T"):
    evaluation.continual_summary([[1.0, 2.0]])


@pytest.mark.parametrize("max_score_bytes", [0, evaluation.DEFAULT_MAX_SCORE_BYTES])
def test_paired_ranks_equal_reference_both_directions(max_score_bytes):
  # 0 forces the blocked per-direction fallback; the default holds the dense
  # matrix. Both must give the definition's ranks.
  images, image_ids, captions, caption_owner = _retrieval_data(seed=5)
  i2t, t2i = evaluation.paired_ranks(images, captions, image_ids, caption_owner,
                                     max_score_bytes=max_score_bytes, block_size=16)
  np.testing.assert_array_equal(
      i2t, _reference_ranks(images, captions, image_ids, caption_owner))
  np.testing.assert_array_equal(
      t2i, _reference_ranks(captions, images, caption_owner, image_ids))


def test_paired_ranks_raise_for_a_caption_without_its_image():
  images, image_ids, captions, caption_owner = _retrieval_data(seed=6)
  with pytest.raises(ValueError, match="no positive"):
    evaluation.paired_ranks(images[1:], captions, image_ids[1:], caption_owner)


@pytest.mark.parametrize("k", [0, 10, 10_000])
def test_exact_ranks_and_topk_is_one_pass_of_both(k):
  images, image_ids, captions, caption_owner = _retrieval_data(seed=7)
  ranks, top = evaluation.exact_ranks_and_topk(images, captions, image_ids,
                                               caption_owner, k, block_size=16)
  np.testing.assert_array_equal(
      ranks, _reference_ranks(images, captions, image_ids, caption_owner))
  kk = min(k, len(captions))  # clamped to the gallery size
  assert top.shape == (len(images), kk)
  order = np.argsort(-(images.astype(np.float64) @ captions.T), axis=1,
                     kind="stable")[:, :kk]
  np.testing.assert_array_equal(top, order)


def test_fold_metrics_average_independent_folds():
  images, image_ids, captions, caption_owner = _retrieval_data(num_images=12)
  order = np.random.default_rng(5).permutation(image_ids)
  got = evaluation.fold_metrics(images, captions, image_ids, caption_owner, order,
                                fold_size=4, ks=(1, 5))
  want = {"r1": [], "r5": [], "medr": []}
  for f in range(3):
    fold = set(order[4 * f:4 * f + 4].tolist())
    qi = [i for i, o in enumerate(image_ids) if o in fold]
    gi = [i for i, o in enumerate(caption_owner) if o in fold]
    ranks = _reference_ranks(images[qi], captions[gi], image_ids[qi],
                             caption_owner[gi])
    want["r1"].append(_reference_recall(ranks, 1))
    want["r5"].append(_reference_recall(ranks, 5))
    want["medr"].append(math.floor(np.median(ranks)) + 1)
  assert got["fold_r1"] == pytest.approx(np.mean(want["r1"]))
  assert got["fold_r5"] == pytest.approx(np.mean(want["r5"]))
  assert got["fold_medr"] == pytest.approx(np.mean(want["medr"]))
  with pytest.raises(ValueError, match="fold_size"):
    evaluation.fold_metrics(images, captions, image_ids, caption_owner, order,
                            fold_size=5, ks=(1,))


def test_device_embeddings_are_ranked_without_implicit_transfers():
  # Embeddings fresh from the model are JAX arrays: every entry point ranks
  # them where they are. Under the "disallow" guard any implicit copy (a
  # NumPy conversion of an embedding array, a NumPy array fed to a jitted
  # function) raises; only the explicit copies of small ids and of the
  # results pass. The ranks must equal those of the NumPy inputs.
  images, image_ids, captions, caption_owner = _retrieval_data(num_images=12, seed=8)
  order = np.random.default_rng(8).permutation(image_ids)
  on_device = [jax.device_put(images), jax.device_put(captions)]
  want = (evaluation.exact_ranks_and_topk(images, captions, image_ids, caption_owner,
                                          10, block_size=8),
          evaluation.paired_ranks(images, captions, image_ids, caption_owner),
          evaluation.paired_ranks(images, captions, image_ids, caption_owner,
                                  max_score_bytes=0, block_size=8),
          evaluation.fold_metrics(captions, images, caption_owner, image_ids, order,
                                  fold_size=4, ks=(1, 5)))
  with jax.transfer_guard("disallow"):
    got = (evaluation.exact_ranks_and_topk(*on_device, image_ids, caption_owner, 10,
                                           block_size=8),
           evaluation.paired_ranks(*on_device, image_ids, caption_owner),
           evaluation.paired_ranks(*on_device, image_ids, caption_owner,
                                   max_score_bytes=0, block_size=8),
           evaluation.fold_metrics(on_device[1], on_device[0], caption_owner, image_ids,
                                   order, fold_size=4, ks=(1, 5)))
  for g, w in zip(got[:3], want[:3]):
    for a, b in zip(g, w):
      np.testing.assert_array_equal(a, b)
  assert got[3] == want[3]
