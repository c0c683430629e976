"""benchmarks/input_pipeline.py: its synthetic COCO dir, its arithmetic, a --smoke run.

The --smoke run (a subprocess, ~15 s on 2 cores) checks that the script goes
through the real COCO source, the batch path and the train step, and prints
parseable JSON lines with the keys the results are read by, then its tables.
No wall-clock time is asserted: the machine is shared.
"""

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from benchmarks import harness
from benchmarks import input_pipeline
from ccr_jax.data import coco
from ccr_jax.data import manual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_manual_dir_has_coco_layout_and_every_karpathy_split(tmp_path):
  root = str(tmp_path / "manual")
  sizes = input_pipeline.write_coco_manual_dir(root, 40, width=64, height=48)
  coco.CcrCoco.check_files(root)  # raises if a required file is missing
  images = manual.read_karpathy(os.path.join(root, "dataset_coco.json"))
  splits = [image["split"] for image in images]
  # 40 // 32 = 1 val and 1 test, 40 // 8 = 5 restval, the other 33 train.
  assert [splits.count(s) for s in ("train", "restval", "val", "test")] == [33, 5, 1, 1]
  captions = coco.read_captions([
      os.path.join(root, "annotations", f"captions_{f}2014.json")
      for f in ("train", "val")])
  assert sorted(captions) == list(range(1, 41))
  assert all(len(c) == 6 for c in captions.values())
  for image, size in zip(images, sizes):
    path = os.path.join(root, image["filepath"], image["filename"])
    assert os.path.getsize(path) == size
    with Image.open(path) as jpeg:
      assert jpeg.format == "JPEG" and jpeg.size == (64, 48)


def test_synthetic_photo_is_about_as_large_as_a_coco_jpeg():
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 20.0, (480, 640, 3)).astype(np.float32)
  buffer = io.BytesIO()
  Image.fromarray(input_pipeline.synthetic_photo(rng, noise, 640, 480)).save(
      buffer, format="JPEG", quality=90)
  # COCO train2014 averages ~160 KB a file; the noise level was chosen for
  # ~150 KB. A wide band: only a change of content or quality should fail.
  assert 100e3 < len(buffer.getvalue()) < 220e3


def test_scaling_record_bounds_threads_by_the_prefetch_threads_share():
  # One thread: 450 images/s of wall time (a loaded machine), 2 ms of CPU
  # each, so one core's rate is 1000 / 2 = 500 images/s.
  pipelines = [{"threads_resolved": 1, "images_per_s": 450.0, "cpu_ms_per_image": 2.0},
               {"threads_resolved": 2, "images_per_s": 720.0, "cpu_ms_per_image": 2.2}]
  decode = {"cpu_ms_per_image": 1.5}
  record = input_pipeline.scaling_record(pipelines, decode, threads=16)
  # Serial: 2.0 - 1.5 = 0.5 ms of 2.0 = 0.25; 16 threads:
  # 1 / (0.25 + 0.75 / 16) = 1 / 0.296875 times one core.
  assert record["one_core_images_per_s"] == pytest.approx(500.0)
  assert record["serial_ms_per_image"] == pytest.approx(0.5)
  assert record["serial_fraction"] == pytest.approx(0.25)
  assert record["amdahl_images_per_s"] == pytest.approx(500.0 / 0.296875)
  assert record["linear_images_per_s"] == pytest.approx(8000.0)
  assert record["two_thread_speedup"] == pytest.approx(720.0 / 450.0)
  assert input_pipeline.scaling_record(pipelines[1:], decode) is None


def test_extrapolation_and_ratios():
  steps = [{"image_tower": "resnet50", "backbone": "finetune", "text_tower": "gru",
            "images_per_s": 4.0, "cpu_ms_per_image": 400.0,
            "flops_per_image": 24.54e9},
           # MiniLM's step has its own ratios but not the H100 columns (GRU's).
           {"image_tower": "resnet50", "backbone": "finetune", "text_tower": "minilm",
            "images_per_s": 2.0, "cpu_ms_per_image": 800.0,
            "flops_per_image": 26.6e9}]
  pipelines = [{"decode_threads": 0, "threads_resolved": 2, "images_per_s": 1000.0,
                "cpu_ms_per_image": 2.0}]
  ratio, minilm_ratio = input_pipeline.ratio_records(pipelines, steps)
  assert ratio["delivered_over_consumed"] == pytest.approx(250.0)
  assert ratio["pipeline_cpu_over_step_cpu"] == pytest.approx(2.0 / 400.0)
  assert minilm_ratio["text_tower"] == "minilm"
  assert minilm_ratio["delivered_over_consumed"] == pytest.approx(500.0)
  records = input_pipeline.extrapolation_records(2.0, steps, rates=(3000,))
  # 3000 images/s x 2 ms of one core each = 6 cores; 3000 x 24.54 GFLOP
  # over 494.7 TFLOP/s.
  assert records[0]["cores_needed"] == pytest.approx(6.0)
  assert records[0]["h100_tf32_fraction_finetune"] == pytest.approx(
      3000 * 24.54e9 / 494.7e12)


@pytest.mark.slow
def test_input_pipeline_smoke():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.input_pipeline", "--smoke",
       "--backbones=frozen", "--decode_threads=1,2"],
      cwd=REPO, env=harness.worker_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = harness.parse_json_lines(proc.stdout)
  by_kind = {}
  for record in records:
    by_kind.setdefault(record["kind"], []).append(record)
  assert set(by_kind) == {"dataset", "decode", "pipeline", "step", "fed",
                          "ratio", "scaling", "extrapolation"}
  assert [p["decode_threads"] for p in by_kind["pipeline"]] == [1, 2]
  for p in by_kind["pipeline"]:
    assert p["images_per_s"] > 0 and p["cpu_ms_per_image"] > 0
  (step,) = by_kind["step"]
  assert step["image_tower"] == "resnet18" and step["backbone"] == "frozen"
  assert step["loss"] == "infonce" and np.isfinite(step["final_loss"])
  assert step["flops_per_step"] > 0 and 0 < step["fraction_of_matmul"]
  for ratio in by_kind["ratio"]:
    assert ratio["delivered_over_consumed"] == pytest.approx(
        ratio["delivered_images_per_s"] / step["images_per_s"])
  assert all("load_average" in r for r in records)
  assert "|---" in proc.stdout, "the markdown tables are missing"


def test_minilm_forward_flops_match_the_architecture():
  # all-MiniLM-L6-v2: 6 layers, width 384, FFN 1536. Per layer: Q, K, V and
  # output projections (4 H^2 per token), the FFN (2 H F per token), scores
  # and weighted values (2 L H per token); then the [H -> embed_dim]
  # projection of each caption's pooled vector. Multiply-adds x 2.
  from ccr_jax.models import minilm  # pylint: disable=g-import-not-at-top
  config = input_pipeline.step_config("finetune", 2, True, "minilm")
  batch, length, width, ffn, embed = 3, 8, 384, 1536, config.model.embed_dim
  per_layer = 2 * batch * length * (4 * width * width + 2 * width * ffn + 2 * length * width)
  want = 6 * per_layer + 2 * batch * width * embed
  got = input_pipeline.text_forward_flops(config, minilm.VOCAB_SIZE, batch, length)
  assert got == want
