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
  assert seen == {(name, v, b) for name in losses.LOSSES
                  for v in ("dense", "blocked_remat") for b in (256,)}
  for r in records:
    for key in ("compile_s", "step_s", "step_xla_flops", "step_temp_mb",
                "loss_temp_mb", "loss_matmul_gflops"):
      assert r[key] is not None and r[key] > 0, (key, r)
    assert np.isfinite(r["final_loss"])
  by_key = {(r["loss"], r["variant"], r["batch"]): r for r in records}
  for name in losses.LOSSES:
    # What the blocked + remat variant is for: the loss's temporaries no
    # longer hold [B, B] score matrices (256^2 floats = 0.25 MiB each).
    dense, blocked = by_key[(name, "dense", 256)], by_key[(name, "blocked_remat", 256)]
    assert blocked["loss_temp_mb"] < 0.5 * dense["loss_temp_mb"], name


@pytest.mark.slow
def test_train_flag_reports_recall_of_a_trained_model():
  records = _run("--smoke", "--train", "--losses=infonce", "--variants=dense")
  (trained,) = [r for r in records if "final_r1_i2t" in r]
  # The tiny config: 16 test pairs per task; chance R@1 is 1/16 = 6.25 %.
  assert 0.0 <= trained["final_r1_i2t"] <= 100.0
  assert 0.0 <= trained["final_r1_t2i"] <= 100.0
