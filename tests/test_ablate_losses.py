"""The loss ablation tool (launch/ablate_losses.py) runs for real."""
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import harness
from ccr_jax import losses


def _run(*args):
  proc = subprocess.run([sys.executable, "-m", "launch.ablate_losses", *args],
                        cwd=harness.REPO, env=harness.worker_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "|---" in proc.stdout, "the markdown table is missing"
  return harness.parse_json_lines(proc.stdout)


@pytest.mark.slow
def test_quick_ablation_covers_every_loss_variant_and_batch():
  records = _run("--quick")
  seen = {(r["loss"], r["variant"], r["batch"]) for r in records}
  assert seen == {(name, v, b) for name in losses.names()
                  for v in ("dense", "blocked_remat") for b in (256,)}
  for r in records:
    for key in ("compile_s", "step_s", "step_xla_flops", "step_temp_mb",
                "loss_temp_mb", "loss_matmul_gflops"):
      assert r[key] is not None and r[key] > 0, (key, r)
    assert np.isfinite(r["final_loss"])
  by_key = {(r["loss"], r["variant"], r["batch"]): r for r in records}
  for name in losses.names():
    # What the blocked + remat variant is for: the loss's temporaries no
    # longer hold [B, B] score matrices (256^2 floats = 0.25 MiB each).
    dense, blocked = by_key[(name, "dense", 256)], by_key[(name, "blocked_remat", 256)]
    assert blocked["loss_temp_mb"] < 0.5 * dense["loss_temp_mb"], name


def _final_r1_bounds(workdir) -> dict[str, tuple[float, float]]:
  """Final task-aware reindex R@1 (percent) per direction, from the saved indices.

  Under reindex the last snapshot embedded every task's gallery, and a task's
  test queries are the items of its gallery of the other modality, so NumPy
  (float64) recomputes the metric without the experiment's code. Identical
  captions of different images embed identically, so the top score can be a
  tie: the low bound counts a tie with a wrong item as a miss, the high bound
  any tie with a right one as a hit (scores within 1e-5: float32 rounding).

  Returns:
    {'i2t': (low, high), 't2i': (low, high)}, each averaged over tasks as
    `final_average` is.
  """
  root = workdir / "indices"
  last = max(int(p.name.split("_")[1]) for p in root.glob("snap_*"))
  bounds = {"i2t": [], "t2i": []}
  for task_dir in sorted((root / f"snap_{last}").glob("task_*")):
    image_emb = np.load(task_dir / "images" / "embeddings.npy").astype(np.float64)
    image_ids = np.load(task_dir / "images" / "item_ids.npy")
    text_emb = np.load(task_dir / "texts" / "embeddings.npy").astype(np.float64)
    text_ids = np.load(task_dir / "texts" / "item_ids.npy")
    # Caption ids are image_id * captions_per_image + c.
    text_owner = text_ids // (len(text_ids) // len(image_ids))
    scores = image_emb @ text_emb.T
    for direction, s, query_owner, gallery_owner in (
        ("i2t", scores, image_ids, text_owner),
        ("t2i", scores.T, text_owner, image_ids)):
      top = s >= s.max(axis=1, keepdims=True) - 1e-5
      right = gallery_owner[None, :] == query_owner[:, None]
      bounds[direction].append((100 * np.mean(~(top & ~right).any(axis=1)),
                                100 * np.mean((top & right).any(axis=1))))
  return {d: tuple(np.mean(b, axis=0)) for d, b in bounds.items()}


@pytest.mark.slow
def test_train_flag_reports_recall_of_a_trained_model(tmp_path):
  records = _run("--smoke", "--train", "--losses=infonce", "--variants=dense",
                 f"--train_workdir={tmp_path}", "--train_steps=200")
  (trained,) = [r for r in records if "final_r1_i2t" in r]
  bounds = _final_r1_bounds(tmp_path / "infonce_dense")
  for direction in ("i2t", "t2i"):
    low, high = bounds[direction]
    reported = trained[f"final_r1_{direction}"]
    assert low - 1e-9 <= reported <= high + 1e-9, (direction, reported, bounds)
    # The tiny config: 8 test images of 5 captions per task, so chance R@1 is
    # 1/8 = 12.5 % both ways (its own 4 steps per task stay there: 12.5 / 10).
    # 200 steps reached 56 % i2t and 34 % t2i; twice chance is the bar.
    assert reported >= 25.0, (direction, reported)
