"""Tests for the forgetting analysis (ccr_jax/analysis.py): metrics and a workdir."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from ccr_jax import analysis
from ccr_jax import evaluation
from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import indices as indices_lib
from ccr_jax.run import evaluate as evaluate_lib
from configs import default


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------ pure metrics


def test_item_cosines_and_alignment_against_loops():
  rng = np.random.default_rng(0)
  old, new = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  want = [float(a @ b / np.sqrt((a @ a) * (b @ b))) for a, b in zip(old, new)]
  np.testing.assert_allclose(analysis.item_cosines(old, new), want, rtol=1e-12)
  images, texts = _unit(rng.normal(size=(3, 4))), _unit(rng.normal(size=(6, 4)))
  ids, owners = np.array([10, 20, 30]), np.array([30, 10, 20, 20, 10, 30])
  row = {10: 0, 20: 1, 30: 2}
  want = np.mean([float(np.float64(images[row[o]]) @ np.float64(t))
                  for t, o in zip(texts, owners)])
  # float32 inputs, float64 sums: 1e-6 covers the inputs' rounding.
  assert analysis.alignment(images, texts, ids, owners) == pytest.approx(want, abs=1e-6)
  with pytest.raises(ValueError, match="same items"):
    analysis.item_cosines(old, new[:3])


def test_uniformity_analytic_and_loop():
  # Two orthogonal unit vectors: |x - y|^2 = 2, so log exp(-2 t) = -2 t.
  assert analysis.uniformity(np.eye(2), t=2.0) == pytest.approx(-4.0, abs=1e-12)
  x = _unit(np.random.default_rng(1).normal(size=(6, 3))).astype(np.float64)
  pairs = [np.exp(-2.0 * np.sum((x[i] - x[j]) ** 2))
           for i in range(6) for j in range(6) if i != j]
  assert analysis.uniformity(x) == pytest.approx(np.log(np.mean(pairs)), abs=1e-12)
  # Identical points are as non-uniform as it gets: log 1 = 0.
  assert analysis.uniformity(np.ones((4, 3)) / np.sqrt(3)) == pytest.approx(0, abs=1e-12)


def test_reindex_order_and_mixed_gallery():
  rng = np.random.default_rng(2)
  old = _unit(rng.normal(size=(10, 4)))
  new = old.copy()
  new[3], new[7] = -old[3], _unit(old[7] + 0.5 * rng.normal(size=4))
  order = analysis.reindex_order(old, new, "drift", seed=0)
  assert order[0] == 3 and order[1] == 7  # most drifted first
  assert sorted(order.tolist()) == list(range(10))
  random = analysis.reindex_order(old, new, "random", seed=0)
  assert sorted(random.tolist()) == list(range(10))
  np.testing.assert_array_equal(random, analysis.reindex_order(old, new, "random", 0))
  np.testing.assert_array_equal(analysis.mixed_gallery(old, new, order, 0.0), old)
  np.testing.assert_array_equal(analysis.mixed_gallery(old, new, order, 1.0), new)
  mixed = analysis.mixed_gallery(old, new, random, 0.3)
  replaced = np.flatnonzero(np.any(mixed != old, axis=1))
  # Rows 3 and 7 are the only ones that differ between old and new.
  assert set(replaced) == {3, 7} & set(random[:3].tolist())
  with pytest.raises(ValueError, match="policy"):
    analysis.reindex_order(old, new, "largest", 0)


def test_exact_metrics_against_loop():
  rng = np.random.default_rng(3)
  images, texts = _unit(rng.normal(size=(12, 8))), _unit(rng.normal(size=(60, 8)))
  ids = np.arange(12) + 100
  owners = np.repeat(ids, 5)
  m, top = evaluation.exact_metrics(images, texts, ids, owners, (1, 5, 10))
  scores = images.astype(np.float64) @ texts.astype(np.float64).T
  ranks = []
  for q in range(12):
    best = scores[q][owners == ids[q]].max()
    ranks.append(int(np.sum(scores[q] > best)))
  for k in (1, 5, 10):
    assert m[f"exact_r{k}"] == pytest.approx(100 * np.mean(np.array(ranks) < k))
  assert m["medr"] == np.floor(np.median(ranks)) + 1
  np.testing.assert_array_equal(top[:, 0], np.argmax(scores, axis=1))


def test_settings_validate():
  assert analysis.settings(analysis.DEFAULTS)["budgets"][-1] == 1.0
  for bad, match in (({"budgets": (0.0, 1.5)}, "budgets"),
                     ({"policies": ("best",)}, "policies"),
                     ({"budget": (0.5,)}, "unknown config.analysis keys")):
    with pytest.raises(ValueError, match=match):
      analysis.settings({**analysis.DEFAULTS, **bad})


# ------------------------------------------------------------ a workdir


def _tiny_config(learning_rate=None, num_tasks=3):
  config = default.get_config("tiny")
  config.data.num_categories, config.data.num_tasks = 2 * num_tasks, num_tasks
  config.analysis.budgets = (0.0, 0.5, 1.0)
  config.eval.fold_size = 4  # 8 test images per task: two folds (the COCO-1K path)
  if learning_rate is not None:
    config.optim.learning_rate = learning_rate
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("analysis"))
  loop.train_and_evaluate(_tiny_config(), workdir)
  return workdir, evaluate_lib.evaluate_workdir(workdir)


@pytest.mark.slow
def test_regimes_are_entries_of_the_compatibility_matrix(trained):
  _, res = trained
  c, metrics = res["analysis"]["compatibility"], res["metrics"]
  num = res["tasks_completed"]
  assert num == 3
  for direction in ("i2t", "t2i"):
    for name in ("exact_r1", "exact_r5", "exact_r10", "medr", "meanr"):
      for j in range(1, num + 1):
        aware = c["task_aware"][direction][str(j)][name]
        for t in range(j, num + 1):
          assert aware[t - 1][t - 1] == (
              metrics["reindex"]["task_aware"][direction][name][t - 1][j - 1])
          assert aware[t - 1][j - 1] == (
              metrics["fixed"]["task_aware"][direction][name][t - 1][j - 1])
          agnostic = c["task_agnostic"][direction][str(j)][name]
          assert agnostic[t - 1][t - 1] == (
              metrics["reindex"]["task_agnostic"][direction][name][t - 1][j - 1])
        # Snapshots that never saw task j have no entry.
        assert all(aware[q][g] is None for q in range(num) for g in range(num)
                   if q < j - 1 or g < j - 1)
  # Folds: task-aware only, and a fold of the gallery ranks no worse than it.
  fold = metrics["fixed"]["task_aware"]["t2i"]
  # Each query's fold holds its positive and a subset of the gallery, so its
  # rank there is no worse: with equal folds, fold R@1 >= the full gallery's.
  assert fold["fold_r1"][num - 1][0] >= fold["exact_r1"][num - 1][0]
  assert fold["fold_meanr"][num - 1][0] <= fold["meanr"][num - 1][0]
  assert "fold_r1" not in metrics["fixed"]["task_agnostic"]["t2i"]
  # The saved galleries are the embeddings the snapshots give again.
  assert res["analysis"]["gallery_reembedding_max_abs_diff"] == 0.0


@pytest.mark.slow
def test_budget_curve_ends_are_fixed_and_reindex(trained):
  _, res = trained
  partial, metrics = res["analysis"]["partial_reindex"], res["metrics"]
  num = partial["query_snapshot"]
  assert partial["budgets"] == [0.0, 0.5, 1.0]
  for policy in ("random", "drift"):
    for direction in ("i2t", "t2i"):
      curves = partial["curves"][policy][direction]
      for j in range(1, num):
        for k in (1, 5, 10):
          points = curves[str(j)][f"exact_r{k}"]
          name = f"exact_r{k}"
          # A mean over draws of one value: equal up to the rounding of the sum.
          assert points[0] == pytest.approx(
              metrics["fixed"]["task_aware"][direction][name][num - 1][j - 1], rel=1e-12)
          assert points[-1] == pytest.approx(
              metrics["reindex"]["task_aware"][direction][name][num - 1][j - 1], rel=1e-12)


@pytest.mark.slow
def test_tower_attribution_pairs_real_towers(trained):
  """A[a][b] equals a model assembled from snapshot a's image and b's text tower."""
  workdir, res = trained
  towers, metrics = res["analysis"]["towers"], res["metrics"]
  num = res["tasks_completed"]
  config = ml_collections.ConfigDict(
      __import__("json").load(open(os.path.join(workdir, "config.json"))))
  setup = setup_lib.build_setup(config, workdir)
  snaps = {s: setup_lib.load_snapshot(setup, s)[0] for s in (1, num)}
  j = 1
  mixed = {**snaps[num], "img": snaps[num]["img"], "txt": snaps[1]["txt"]}
  q = indices_lib.test_queries(setup, mixed, j - 1)
  for direction, (qm, gm) in analysis.DIRECTIONS.items():
    m, _ = evaluation.exact_metrics(q[qm]["emb"], q[gm]["emb"], q[qm]["owners"],
                                    q[gm]["owners"], (1, 5, 10))
    assert m["exact_r1"] == towers[direction][str(j)]["exact_r1"][num - 1][j - 1]
    # Both towers from one snapshot: that snapshot's own (reindex) recall.
    for s in range(1, num + 1):
      assert towers[direction][str(j)]["exact_r1"][s - 1][s - 1] == (
          metrics["reindex"]["task_aware"][direction]["exact_r1"][s - 1][j - 1])
  rows = {(r["task"], r["direction"]): r for r in res["analysis"]["attribution"]}
  assert rows[(1, "i2t")]["new_image_tower"] == towers["i2t"]["1"]["exact_r1"][num - 1][0]
  assert rows[(1, "t2i")]["new_text_tower"] == towers["t2i"]["1"]["exact_r1"][0][num - 1]


@pytest.mark.slow
def test_report_names_every_analysis_figure(trained):
  workdir, _ = trained
  md = open(os.path.join(workdir, "results", "evaluate.md")).read()
  for kind in ("compatibility", "towers", "drift", "partial_reindex"):
    rel = f"plots/evaluate_{kind}.png"
    assert f"]({rel})" in md
    assert os.path.getsize(os.path.join(workdir, "results", rel)) > 1000


@pytest.mark.slow
def test_identical_snapshots_give_constant_compatibility_and_no_drift(tmp_path):
  # Learning rate 0: Adam's updates are exactly zero, every snapshot is the init.
  workdir = str(tmp_path)
  config = _tiny_config(learning_rate=0.0, num_tasks=2)
  loop.train_and_evaluate(config, workdir)
  res = evaluate_lib.evaluate_workdir(workdir)
  a = res["analysis"]
  setup_params = [jax.tree.leaves(p) for p in
                  (setup_lib.load_snapshot(setup_lib.build_setup(config, workdir), s)[0]
                   for s in (1, 2))]
  assert all(np.array_equal(x, y) for x, y in zip(*setup_params))
  for direction in ("i2t", "t2i"):
    for j, mats in a["compatibility"]["task_aware"][direction].items():
      values = {v for row in mats["exact_r1"] for v in row if v is not None}
      assert len(values) == 1, (direction, j, mats["exact_r1"])
    # Task-agnostic galleries grow with q (tasks 1..q): constant along g only.
    for j, mats in a["compatibility"]["task_agnostic"][direction].items():
      for row in mats["exact_r1"]:
        assert len({v for v in row if v is not None}) <= 1, (direction, j, row)
  for modality in ("images", "texts"):
    for j, mat in a["drift"][modality].items():
      for v in (v for row in mat for v in row if v is not None):
        # Cosine of a float32 vector with itself, summed in float64.
        assert v == pytest.approx(1.0, abs=1e-6)
  for policy, by_dir in a["partial_reindex"]["curves"].items():
    for direction, curves in by_dir.items():
      for j, points in curves.items():
        assert len(set(points["exact_r1"])) == 1, (policy, direction, j)
