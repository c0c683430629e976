"""The whole experiment through `main` on the tiny config: results, resume, evaluate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ccr_jax import checkpoints
from ccr_jax.run import loop
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run_main(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "ccr_jax.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  proc = _run_main("--config=configs/default.py:tiny", f"--workdir={workdir}",
                   "--config.eval.save_embeddings=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_main_writes_every_output(tiny_run):
  res = json.load(open(os.path.join(tiny_run, "results", "results.json")))
  assert res["tasks_completed"] == 2
  assert checkpoints.completed_snapshots(tiny_run) == [1, 2]
  for regime in ("fixed", "reindex"):
    for scope in ("task_aware", "task_agnostic"):
      for d in ("i2t", "t2i"):
        r1 = np.array(res["metrics"][regime][scope][d]["r1"], dtype=float)
        assert r1.shape == (2, 2)
        assert np.isnan(r1[0, 1]) and np.isfinite(r1[1]).all()
        assert ((0 <= r1[np.isfinite(r1)]) & (r1[np.isfinite(r1)] <= 100)).all()
  for regime in ("fixed", "reindex"):
    for d in ("i2t", "t2i"):
      m = {scope: res["metrics"][regime][scope][d]["r1"]
           for scope in ("task_aware", "task_agnostic", "task_agnostic_as_learnt")}
      # Task 1's galleries as learnt are its own; the newest task's are all.
      assert [row[0] for row in m["task_agnostic_as_learnt"]] == [
          row[0] for row in m["task_aware"]]
      assert m["task_agnostic_as_learnt"][1][1] == m["task_agnostic"][1][1]
      assert res["gallery_growth"][regime][f"{d}_r1"] == pytest.approx(
          m["task_agnostic_as_learnt"][1][0] - m["task_agnostic"][1][0])
  # After task 1 only one gallery exists: both regimes search the same index.
  assert (res["metrics"]["fixed"]["task_aware"]["t2i"]["r1"][0][0] ==
          res["metrics"]["reindex"]["task_aware"]["t2i"]["r1"][0][0])
  for rel in ("indices/snap_1/task_1/images", "indices/snap_2/task_1/texts",
              "indices/snap_2/task_2/images", "results/results.md",
              "results/plots/results_r1.png", "results/timing.json"):
    assert os.path.exists(os.path.join(tiny_run, rel)), rel
  timing = json.load(open(os.path.join(tiny_run, "results", "timing.json")))
  for stage in ("data_s", "compile_s", "train_s", "snapshot_s", "embed_s",
                "index_s", "evaluate_s", "report_s"):
    assert timing[stage] > 0, stage


def test_saved_embeddings_reproduce_reported_recalls(tiny_run):
  """Recomputes every recall from the .npz files with plain NumPy."""
  emb_dir = os.path.join(tiny_run, "embeddings")
  manifest = json.load(open(os.path.join(emb_dir, "manifest.json")))
  # directions x regimes x (two scopes x (t, j) pairs + the as-learnt scope's
  # one search of its own: task 1 after task 2; its j = t entries are the
  # task-agnostic ones).
  assert len(manifest) == 2 * 2 * (2 * (1 + 2) + 1)
  for entry in manifest:
    f = np.load(os.path.join(emb_dir, entry["file"]))
    q, g, t2i = f["query_emb"], f["gallery_emb"], f["text_to_image"]
    scores = q @ g.T
    order = np.argsort(-scores, axis=1, kind="stable")
    if entry["direction"] == "i2t":
      hit = t2i[order] == np.arange(len(q))[:, None]
    else:
      hit = order == t2i[:, None]
    first = np.where(hit.any(1), hit.argmax(1), len(g))
    for k in (1, 5, 10):
      # Tiny galleries use ScaNN's brute-force scoring, which is exact up to
      # float rounding; near-ties could swap, hence 1e-6 on percentages only
      # where none occurs in practice.
      assert abs(100 * np.mean(first < k) - entry[f"r{k}"]) < 1e-6, entry


def test_evaluate_mode_matches_training_run(tiny_run):
  proc = _run_main("--mode=evaluate", f"--workdir={tiny_run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  train = json.load(open(os.path.join(tiny_run, "results", "results.json")))
  again = json.load(open(os.path.join(tiny_run, "results", "evaluate.json")))
  assert again["metrics"] == train["metrics"]
  assert again["summary"] == train["summary"]
  assert set(again["analysis"]) >= {"compatibility", "towers", "attribution", "drift",
                                    "partial_reindex"}
  md = open(os.path.join(tiny_run, "results", "evaluate.md")).read()
  for kind in ("compatibility", "towers", "drift", "partial_reindex"):
    assert os.path.exists(os.path.join(tiny_run, "results", "plots",
                                       f"evaluate_{kind}.png"))
    assert f"plots/evaluate_{kind}.png" in md


def test_report_mode_writes_every_plot_and_names_it(tiny_run, tmp_path):
  if not os.path.exists(os.path.join(tiny_run, "results", "evaluate.json")):
    assert _run_main("--mode=evaluate", f"--workdir={tiny_run}").returncode == 0
  proc = _run_main("--mode=report", f"--workdir={tiny_run}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results_dir = os.path.join(tiny_run, "results")
  md = open(os.path.join(results_dir, "report.md")).read()
  label = os.path.basename(tiny_run)
  for kind in ("r1", "forgetting", "training", "evaluate_compatibility",
               "evaluate_towers", "evaluate_drift", "evaluate_partial_reindex"):
    rel = f"plots/{label}_{kind}.png"
    assert f"]({rel})" in md, kind
    assert os.path.getsize(os.path.join(results_dir, rel)) > 1000, kind
  assert "### Continual summary" in md and "#### Partial reindexing" in md
  # Two workdirs (the same one twice): a comparison first, labels kept apart.
  proc = _run_main("--mode=report", f"--workdir={tiny_run}", f"--workdir={tiny_run}")
  assert proc.returncode == 2 and "--report_dir" in proc.stderr
  proc = _run_main("--mode=report", f"--workdir={tiny_run}", f"--workdir={tiny_run}",
                   f"--report_dir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = open(tmp_path / "report.md").read()
  assert "](plots/comparison.png)" in md and f"## {label}_2" in md
  assert (tmp_path / "plots" / "comparison.png").stat().st_size > 1000


def test_rerun_of_finished_workdir_changes_nothing(tiny_run):
  path = os.path.join(tiny_run, "results", "results.json")
  before = json.load(open(path))
  proc = _run_main("--config=configs/default.py:tiny", f"--workdir={tiny_run}",
                   "--config.eval.save_embeddings=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  after = json.load(open(path))
  # Everything but the provenance, which describes this rerun.
  assert after.pop("provenance")["command_line"].endswith("save_embeddings=True")
  before.pop("provenance")
  assert after == before


def test_workdir_of_another_experiment_is_refused(tiny_run):
  proc = _run_main("--config=configs/default.py:tiny", f"--workdir={tiny_run}",
                   "--config.optim.learning_rate=0.5")
  assert proc.returncode == 2
  assert "different config" in proc.stderr and "new --workdir" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("strategy, task", [("finetune", 2), ("ewc+lwf+replay", 2),
                                            ("der", 1)])
def test_killed_run_resumes_to_identical_results(tmp_path, killed_saving_snapshot,
                                                 strategy, task):
  # ewc+lwf+replay carries state across the kill: importance accumulators in
  # the snapshot, the old model in the train state, the replay memory. der,
  # killed in task 1, carries the targets its steps 1-2 recorded in the
  # state checkpoint; task 2 trains against them.
  config = default.get_config("tiny")
  config.strategy.name = strategy
  full = loop.train_and_evaluate(config, str(tmp_path / "full"))

  # Kill the second run while it saves the task's snapshot: its state
  # checkpoint (step 2 of 4) is on disk, the snapshot is not.
  with killed_saving_snapshot(task), pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(tmp_path / "killed"))
  assert checkpoints.completed_snapshots(str(tmp_path / "killed")) == list(range(1, task))
  resumed = loop.train_and_evaluate(config, str(tmp_path / "killed"))
  # Same device count on CPU: bit-identical.
  assert resumed["metrics"] == full["metrics"]
