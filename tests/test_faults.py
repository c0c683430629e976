"""Preemption and bad input: killed runs resume to identical results, errors are clear."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccr_jax import checkpoints
from ccr_jax import losses
from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib
from ccr_jax.data import registry as data_registry
from ccr_jax.data import tasks as tasks_lib
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/default.py:tiny"


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _cli(*args, driver_point=None):
  cmd = ([sys.executable, os.path.join(REPO, "tests", "fault_driver.py"), driver_point,
          "--"] if driver_point else [sys.executable, "-m", "ccr_jax.main"])
  return subprocess.run([*cmd, *args], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)


def _results(workdir):
  """results.json without its provenance (when and how long each run took)."""
  with open(os.path.join(workdir, "results", "results.json")) as f:
    results = json.load(f)
  results.pop("provenance")
  return results


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """results.json of the tiny config, run once without faults (in process)."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  loop.train_and_evaluate(default.get_config("tiny"), workdir)
  return workdir, _results(workdir)


@pytest.mark.slow
def test_sigkill_at_every_stage_then_resume_gives_identical_results(uninterrupted,
                                                                    tmp_path):
  """One workdir killed (SIGKILL, the real CLI) at each stage in turn, resumed each time."""
  workdir = str(tmp_path / "killed")
  flags = (TINY, f"--workdir={workdir}")
  for point in ("snapshot_write", "train_step", "snapshot_commit", "index_save",
                "index_build", "results_write"):
    proc = _cli(*flags, driver_point=point)
    assert proc.returncode == -9, (point, proc.returncode, proc.stderr[-3000:])
    # Whatever the kill left, no reader sees half a file: only complete
    # snapshots are listed, and results.json is either absent or whole.
    assert checkpoints.completed_snapshots(workdir) in ([], [1], [1, 2]), point
    if os.path.exists(os.path.join(workdir, "results", "results.json")):
      _results(workdir)
  assert not os.path.exists(os.path.join(workdir, "results", "results.json"))
  proc = _cli(*flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Same device count on CPU: bit-identical, hence exactly equal JSON.
  assert _results(workdir) == uninterrupted[1]


def _truncate_largest_file(directory):
  files = [f for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
           if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return biggest


@pytest.mark.slow
def test_corrupt_snapshot_is_quarantined_and_retrained(uninterrupted, tmp_path,
                                                        caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  shutil.copytree(uninterrupted[0], workdir)
  os.remove(os.path.join(workdir, "results", "results.json"))
  _truncate_largest_file(checkpoints.snapshot_dir(workdir, 2))
  # Orbax still lists the broken snapshot: only reading it fails.
  assert checkpoints.completed_snapshots(workdir) == [1, 2]
  loop.train_and_evaluate(default.get_config("tiny"), workdir)
  assert _results(workdir) == uninterrupted[1]
  assert "snapshot of task 2" in caplog.text and "retrained from snapshot 1" in caplog.text
  quarantined = os.listdir(os.path.join(workdir, "quarantine"))
  assert any(q.startswith("snapshots_task_2_") and q.endswith("snap_2")
             for q in quarantined), quarantined
  # One line: TensorStore's error carries its whole spec (~60 lines) after it.
  warning = next(r for r in caplog.records if "snapshot of task 2" in r.getMessage())
  assert len(warning.getMessage().splitlines()) <= 2, warning.getMessage()


def _flip_byte_in_largest_array_file(workdir, task):
  data = glob.glob(os.path.join(checkpoints.snapshot_dir(workdir, task), "params",
                                "ocdbt.process_0", "d", "*"))
  biggest = max(data, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.slow
def test_flipped_byte_in_a_snapshot_is_caught_by_its_manifest(uninterrupted, tmp_path,
                                                              caplog):
  # Issue 25 D3: Orbax reads a flipped byte of an array without error, so the
  # damaged params were evaluated silently (different numbers, exit 0).
  import shutil  # pylint: disable=g-import-not-at-top
  from ccr_jax.run import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "w")
  shutil.copytree(uninterrupted[0], workdir)
  _flip_byte_in_largest_array_file(workdir, 1)
  # Evaluate mode reads, never retrains: it names the snapshot and stops.
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"snapshot of task 1 at .*task_1 does not match its manifest"):
    evaluate_lib.evaluate_workdir(workdir)
  # Training mode quarantines it and retrains: the numbers of the clean run.
  os.remove(os.path.join(workdir, "results", "results.json"))
  loop.train_and_evaluate(default.get_config("tiny"), workdir)
  assert _results(workdir)["metrics"] == uninterrupted[1]["metrics"]
  assert "does not match its manifest" in caplog.text
  assert "task 1 is retrained from the initial params" in caplog.text


def test_snapshot_without_a_manifest_still_restores_and_gets_one(tmp_path):
  # Workdirs from before issue 25 have snapshots without manifests.
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  workdir = str(tmp_path)
  checkpoints.save_snapshot(workdir, 1, params, {"task": 1})
  manifest = os.path.join(checkpoints.snapshot_dir(workdir, 1), checkpoints.MANIFEST_FILE)
  listed = json.load(open(manifest))["files"]
  assert any(rel.startswith("params/") for rel in listed), listed
  os.remove(manifest)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, _ = checkpoints.restore_snapshot(workdir, 1, params, sharding)
  np.testing.assert_array_equal(restored["w"], params["w"])
  checkpoints.write_snapshot_manifest(workdir, 1)
  assert json.load(open(manifest))["files"] == listed


@pytest.mark.slow  # A subprocess per writer (~10 s), three resumes (~20 s).
@pytest.mark.parametrize("point, names", [
    ("full_tfds", "data"), ("full_snapshot", "snapshots/task_1"),
    ("full_state", "state/2"), ("full_index", "indices/snap_1"),
    ("full_results", "results/results.json"), ("full_tensorboard", "logs/tensorboard"),
    ("read_only", "lock")])
def test_full_or_read_only_storage_is_one_line_and_resumes(uninterrupted, tmp_path,
                                                           point, names):
  # Issue 25 D4, D6: every writer's failure is one line naming the path, exit
  # 2, nothing half-written left, and the same command resumes once there is
  # space.
  workdir = str(tmp_path / "w")
  flags_ = [TINY, f"--workdir={workdir}", f"--config.data.data_dir={tmp_path}/data"]
  proc = _cli(*flags_, driver_point=point)
  assert proc.returncode == 2, proc.stderr[-3000:]
  problems = [l for l in proc.stderr.splitlines()
              if not re.match(r"\d\d:\d\d:\d\d (task|after task|mesh|building the|warning: \d+ captions)", l)]
  assert len(problems) == 1, problems
  kind = "cannot write" if point == "read_only" else "no space left on the device"
  assert problems[0].startswith(f"error: {kind}") and names in problems[0], problems
  leftovers = [p for p in glob.glob(f"{tmp_path}/**/*", recursive=True)
               if "orbax-checkpoint-tmp" in p or ".tmp-" in p or "incomplete." in p]
  assert not leftovers, leftovers
  if point in ("full_snapshot", "full_state", "full_index"):
    # Those that stop mid-run (the others stop before any work or after the
    # last; a 30 MB tmpfs filled to 100 ... 2700 KiB resumed at every level).
    proc = _cli(*flags_)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results(workdir)["metrics"] == uninterrupted[1]["metrics"]


@pytest.mark.slow
def test_corrupt_state_falls_back_to_an_older_one(uninterrupted, tmp_path, caplog,
                                                 killed_saving_snapshot):
  workdir = str(tmp_path / "w")
  config = default.get_config("tiny")
  config.train.checkpoint_every = 1  # states at steps 1, 2, 3 of each task
  with killed_saving_snapshot(2), pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, workdir)
  newest = checkpoints.latest_state_step(workdir)
  assert newest == 4 + 3  # task 2, step 3 (global step)
  _truncate_largest_file(os.path.join(workdir, "state", str(newest)))
  results = loop.train_and_evaluate(config, workdir)
  assert f"state at step {newest}" in caplog.text and "older" in caplog.text
  # checkpoint_every is not part of the experiment: same numbers as every=2.
  assert results["metrics"] == uninterrupted[1]["metrics"]


@pytest.mark.slow
def test_nan_loss_names_step_and_last_good_checkpoint(tmp_path, monkeypatch):
  config = default.get_config("tiny")
  config.data.num_tasks, config.data.num_categories = 1, 2
  real_make_loss = losses.make_loss

  def poisoned_loss(loss_config):
    loss_fn = real_make_loss(loss_config)

    def loss(*args, step, **kwargs):
      value, extras = loss_fn(*args, step=step, **kwargs)
      # NaN from step 3 on: after the step-2 state checkpoint.
      return jnp.where(step >= 3, jnp.nan, value), extras

    return loss

  monkeypatch.setattr(losses, "make_loss", poisoned_loss)
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert "between steps 2 and 4" in message
  assert f"{tmp_path}/state/2 (step 2 of task 1)" in message
  assert checkpoints.latest_state_step(str(tmp_path)) == 2


@pytest.mark.slow
def test_same_seed_and_config_give_the_same_results(uninterrupted, tmp_path):
  loop.train_and_evaluate(default.get_config("tiny"), str(tmp_path))
  assert _results(str(tmp_path)) == uninterrupted[1]


def test_images_of_the_wrong_shape_are_named(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  caps = tuple(("a red circle",) * 5 for _ in range(4))
  good = tasks_lib.Split(images=images, captions=caps,
                         categories=np.zeros(4, np.int32), ids=np.arange(4))
  bad = tasks_lib.Split(images=np.zeros((4, 9, 8, 3), np.uint8), captions=caps,
                        categories=np.zeros(4, np.int32), ids=np.arange(4, 8))
  with pytest.raises(ValueError, match=r"task 1 test images have shape \(9, 8, 3\)"):
    setup_lib.check_image_shapes([{"train": good, "val": good, "test": bad}])
  # Pooled features and regions of the same dimension go together; not others.
  pooled, regions, other = (
      tasks_lib.Split(images=np.zeros(shape, np.float32), captions=caps,
                      categories=np.zeros(4, np.int32), ids=np.arange(4))
      for shape in ((4, 6), (4, 3, 6), (4, 3, 5)))
  assert setup_lib.check_image_shapes([{"train": pooled, "test": regions}]) == (6,)
  with pytest.raises(ValueError, match=r"\(3, 5\)"):
    setup_lib.check_image_shapes([{"train": pooled, "test": other}])


def test_empty_caption_is_named_with_its_task_and_split(tmp_path, monkeypatch):
  config = default.get_config("tiny")
  real_load = data_registry.load_task_sequence

  def with_empty_caption(*args, **kwargs):
    sequence = real_load(*args, **kwargs)
    val = sequence.tasks[1].val
    caps = list(val.captions)
    caps[1] = ("", *caps[1][1:])
    object.__setattr__(val, "captions", tuple(caps))
    return sequence

  monkeypatch.setattr(data_registry, "load_task_sequence", with_empty_caption)
  with pytest.raises(ValueError, match=r"task 2 val split of 'synthetic': "
                                       r"Caption 5 has no word tokens"):
    setup_lib.build_setup(config, str(tmp_path))
