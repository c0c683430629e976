"""The benchmark scripts: their inputs, their references, and a --smoke run of each.

The --smoke runs (subprocesses, marked slow, ~1 min together) check that each
script prints parseable JSON lines with the keys results are compared by, then
its table. No wall-clock time is asserted anywhere: the machine is shared.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import eval_speed
from benchmarks import harness
from benchmarks import index_bench
from benchmarks import profile_step
from benchmarks import train_throughput
from benchmarks import vs_pytorch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_smoke(module, *args):
  """Runs `python -m module --smoke args`; returns its JSON lines."""
  proc = subprocess.run([sys.executable, "-m", module, "--smoke", *args], cwd=REPO,
                        env=harness.worker_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = harness.parse_json_lines(proc.stdout)
  assert records, proc.stdout[-2000:]
  assert "|---" in proc.stdout, "the markdown table is missing"
  return records


def _assert_keys(records, keys):
  for record in records:
    missing = set(keys) - record.keys()
    assert not missing, (missing, record)


# ------------------------------------------------------------ inputs, references


def test_vsepp_batch_has_coco_like_shapes():
  setup = train_throughput.make_setup("vsepp")
  batch = train_throughput.synthetic_batch(np.random.default_rng(0), setup)
  assert batch["images"].shape == (128, 2048) and batch["images"].dtype == np.float32
  assert batch["tokens"].shape == (128, 32) and batch["tokens"].max() < 10_000
  lengths = train_throughput.caption_lengths(np.random.default_rng(1), 100_000, 12.5, 32)
  # Mean of 2 + Poisson(10.5): 12.5 up to sampling error (sd 3.2 / sqrt(1e5)).
  assert abs(lengths.mean() - 12.5) < 0.05 and lengths.max() <= 32
  # Padding: every position at or past a caption's length is token 0.
  past = np.arange(32)[None, :] >= batch["lengths"][:, None]
  assert (batch["tokens"][past] == 0).all() and (batch["tokens"][~past] > 0).all()


def test_default_setup_matches_default_config():
  from configs import default
  setup = train_throughput.make_setup("default")
  config = default.get_config()
  assert setup.batch_size == config.train.batch_size == 128
  assert setup.image_shape == (32, 32, 3) and setup.max_len == config.data.max_caption_len
  assert setup.config.model.to_dict() == config.model.to_dict()


def test_vsepp_loops_equal_exact_ranks():
  """The per-query VSE++ reference and the library's blocked ranks agree."""
  rng = np.random.default_rng(0)
  images, captions, owner = eval_speed.synthetic_embeddings(rng, 30, 5, 16, noise=3.0)
  i2t, t2i = eval_speed.library_ranks(images, captions, owner)
  np.testing.assert_array_equal(eval_speed.vsepp_i2t_loop(images, captions, 30), i2t)
  np.testing.assert_array_equal(eval_speed.vsepp_t2i_loop(images, captions, 30), t2i)
  assert i2t.min() == 0 and t2i.max() > 0  # neither trivial nor hopeless


def test_recall_vs_exact_matches_library():
  rng = np.random.default_rng(0)
  gallery = index_bench.clustered_gallery(rng, 500, 16, 5)
  queries = index_bench.cross_modal_queries(rng, gallery, 40)
  from ccr_jax import indexing
  index = indexing.build_index(gallery, np.arange(500), backend="scann", snapshot=1,
                               task=1, modality="texts",
                               options={"mode": "tree_ah", "num_leaves": 10,
                                              "num_leaves_to_search": 1})
  _, exact_rows = indexing.exact_search(queries, gallery, 10)
  _, found = indexing.search(index, queries, 10)
  assert index_bench.recall_vs_exact(found, exact_rows) == pytest.approx(
      indexing.recall_against_exact(index, queries, 10))


def test_markdown_table_and_json_lines_round_trip():
  text = "noise\n" + '{"a": 1, "b": 2.5}\n' + harness.markdown_table(
      [{"a": 1, "b": 2.5}], [("a", "A"), ("b", "B")])
  assert harness.parse_json_lines(text) == [{"a": 1, "b": 2.5}]
  assert "| A | B |" in text and "| 1 | 2.5 |" in text


# ----------------------------------------------------------------- smoke runs


@pytest.mark.slow
def test_train_throughput_smoke():
  # The 2-device worker covers the sharded step and the host-device env; the
  # 1-device step is the same code with a 1-device mesh.
  records = _run_smoke("benchmarks.train_throughput", "--setups=vsepp", "--devices=2")
  _assert_keys(records, ["pairs_per_s", "step_s", "compile_s", "flops_per_step",
                         "flops_per_s", "peak_rss_mb", "devices", "real_flops_per_step",
                         "real_flops_per_s", "real_fraction_of_matmul"])
  assert [r["devices"] for r in records] == [2]
  assert records[0]["flops_per_step"] > 0 and np.isfinite(records[0]["final_loss"])
  # Padding is not work: real-token FLOPs are fewer than the padded count.
  assert 0 < records[0]["real_flops_per_step"] < records[0]["flops_per_step"]


@pytest.mark.slow
def test_eval_speed_smoke():
  (record,) = _run_smoke("benchmarks.eval_speed")
  _assert_keys([record], ["eval_s", "matmul_s", "loop_s"])
  assert record["ranks_match"] and record["ranks_checked"] > 0
  assert record["per_direction_ranks_equal"]
  assert record["eval_device_ranks_equal"] and record["eval_device_s"] > 0
  assert record["loop_extrapolated"]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A tiny experiment run by end_to_end --smoke, kept for index_bench's real galleries."""
  workdir = str(tmp_path_factory.mktemp("e2e") / "run")
  records = _run_smoke("benchmarks.end_to_end", f"--workdir={workdir}")
  return workdir, records


@pytest.mark.slow
def test_end_to_end_smoke(tiny_workdir):
  workdir, (record,) = tiny_workdir
  _assert_keys([record], ["wall_s", "data_s", "compile_s", "train_s", "index_s",
                          "evaluate_s", "peak_rss_mb"])
  assert record["config"] == "configs/default.py:tiny"
  assert os.path.exists(os.path.join(workdir, "results", "timing.json"))


@pytest.mark.slow
def test_index_bench_smoke(tiny_workdir):
  workdir, _ = tiny_workdir
  records = _run_smoke("benchmarks.index_bench", f"--real_workdir={workdir}")
  _assert_keys(records, ["items", "build_s", "qps", "exact_qps", "recall_at_10",
                         "bytes_on_disk"])
  galleries = {r["gallery"] for r in records}
  assert galleries == {"clustered", "real_texts", "real_images"}
  assert {r["measurement"] for r in records} == {"default", "curve"}
  assert all(0.0 <= r["recall_at_10"] <= 1.0 for r in records)
  # Brute force is exact: the real galleries' library-rule rows (below
  # BRUTE_FORCE_MAX_COUNT) must agree with exact search.
  for r in records:
    if r["scann_mode"] == "brute_force":
      assert r["recall_at_10"] == pytest.approx(1.0)


def test_profile_summary_sums_complete_events_per_timeline(tmp_path):
  # A perfetto trace by hand: two timelines, a Python-tracer event (left
  # out), an instant event (no duration: left out), 2 traced steps.
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
      {"ph": "X", "pid": 1, "name": "fusion.1", "dur": 3000},
      {"ph": "X", "pid": 1, "name": "fusion.1", "dur": 1000},
      {"ph": "X", "pid": 2, "name": "fusion.1", "dur": 500},
      {"ph": "X", "pid": 1, "name": "$api.py:1 block_until_ready", "dur": 9000},
      {"ph": "i", "pid": 1, "name": "marker"},
  ]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  got = profile_step.summarize_trace(str(path), steps=2)
  assert got == [
      {"timeline": "/host:CPU", "name": "fusion.1", "ms_per_step": 2.0, "calls_per_step": 1.0},
      {"timeline": "/device:GPU:0", "name": "fusion.1", "ms_per_step": 0.25,
       "calls_per_step": 0.5}]


def test_vs_pytorch_summary_and_missing_torch():
  rounds = [{"batch_size": b, "device": "cpu", "backend": "cpu", "torch": "t",
             "torch_threads": 2, "ours_pairs_per_s": o, "torch_pairs_per_s": t,
             "ratio": o / t, "ours_mean_len": 12.0, "torch_mean_len": 12.5}
            for b, o, t in ((128, 400.0, 200.0), (128, 300.0, 200.0), (128, 500.0, 200.0),
                            (512, 100.0, 100.0))]
  by_batch = {r["batch_size"]: r for r in vs_pytorch.summarize(rounds)}
  assert by_batch[128]["ratio"] == 2.0 and by_batch[128]["ratio_min"] == 1.5
  assert by_batch[128]["ratio_max"] == 2.5 and by_batch[128]["rounds"] == 3
  assert by_batch[512]["ratio"] == 1.0
  # An interpreter without torch (CI's): the error says which flag to fix.
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with pytest.raises(RuntimeError, match="--torch_python"):
      vs_pytorch.torch_step(sys.executable, 2, 1, "cpu")


@pytest.mark.slow
def test_profile_step_smoke(tmp_path):
  records = _run_smoke("benchmarks.profile_step", f"--trace_dir={tmp_path}", "--top=5")
  header, events = records[0], records[1:]
  assert header["kind"] == "step" and header["step_ms"] > 0
  assert os.path.exists(header["trace"])
  assert 0 < len(events) <= 5 and all(e["ms_per_step"] >= 0 for e in events)
