"""A run a user can trust: resume checks every artifact, one run per workdir,
checks before writes, clean stops, clear errors, readable console."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from ccr_jax import files
from ccr_jax import indexing
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.indexing import storage as index_storage
from ccr_jax.run import config as config_lib
from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import workdir as workdir_lib
from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/default.py:tiny"


def _cli(*args, timeout=600):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", "ccr_jax.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _results(workdir):
  return files.read_json(os.path.join(workdir, "results", "results.json"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny workdir (in process) and its results; tests copy it."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  loop.train_and_evaluate(default.get_config("tiny"), workdir)
  return workdir, _results(workdir)


def _copy(finished, tmp_path, name="run"):
  workdir = str(tmp_path / name)
  shutil.copytree(finished[0], workdir)
  return workdir


def _metrics(results):
  return json.dumps(results["metrics"], sort_keys=True)


# ---------------------------------------------------------------------------
# Resume checks every artifact.


@pytest.mark.slow  # A finished run or a subprocess: seconds each.
def test_deleted_or_truncated_index_is_rebuilt_on_rerun(finished, tmp_path, caplog):
  workdir = _copy(finished, tmp_path)
  deleted = workdir_lib.index_dir(workdir, 2, 2, "texts")
  shutil.rmtree(deleted)
  truncated = os.path.join(workdir_lib.index_dir(workdir, 1, 1, "images"),
                           "embeddings.npy")
  with open(truncated, "r+b") as f:
    f.truncate(os.path.getsize(truncated) // 2)
  with caplog.at_level("WARNING"):
    again = loop.train_and_evaluate(default.get_config("tiny"), workdir)
  assert os.path.isdir(deleted)
  for snapshot, task, modality in ((2, 2, "texts"), (1, 1, "images")):
    indexing.load_index(workdir_lib.index_dir(workdir, snapshot, task, modality),
                        expect_snapshot=snapshot, expect_task=task)
  # Rebuilt from the same snapshots: the same numbers.
  assert _metrics(again) == _metrics(finished[1])
  assert "embeddings.npy" in caplog.text and "recomputing" in caplog.text


@pytest.mark.slow  # A finished run or a subprocess: seconds each.
def test_corrupt_row_is_recomputed(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  with open(workdir_lib.row_path(workdir, 2), "w") as f:
    f.write('{"metrics": ')
  again = loop.train_and_evaluate(default.get_config("tiny"), workdir)
  assert _metrics(again) == _metrics(finished[1])


@pytest.mark.slow  # A finished run or a subprocess: seconds each.
def test_changed_eval_settings_recompute_every_cached_row(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  config = default.get_config("tiny")
  config.eval.ks = (1, 5, 10, 20)
  config.eval.fold_size = 2  # 4 test images per task
  again = loop.train_and_evaluate(config, workdir)
  for regime, scopes in again["metrics"].items():
    aware = scopes["task_aware"]["i2t"]
    for t in range(2):
      for j in range(t + 1):
        assert aware["r20"][t][j] is not None, (regime, t, j)
        assert aware["fold_r1"][t][j] is not None, (regime, t, j)
    # The other numbers come from the same snapshots and indices.
    assert aware["r1"] == finished[1]["metrics"][regime]["task_aware"]["i2t"]["r1"]
  rows = [files.read_json(workdir_lib.row_path(workdir, t)) for t in (1, 2)]
  assert all(r["eval_settings"] == {"ks": [1, 5, 10, 20], "fold_size": 2}
             for r in rows)


@pytest.mark.slow  # A finished run: seconds.
def test_a_config_json_of_older_code_is_completed_once_with_defaults(finished, tmp_path):
  # Keys added since a workdir was made are filled from the schema where the
  # config is loaded, not by a `.get(key, default)` at each reader.
  from ccr_jax.run import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  workdir = _copy(finished, tmp_path)
  path = os.path.join(workdir, "config.json")
  old = files.read_json(path)
  del old["mesh"], old["pretrain"], old["train"]["compute_dtype"], old["eval"]["fold_size"]
  files.write_json(path, old)
  evaluated = evaluate_lib.evaluate_workdir(workdir)
  assert _metrics(evaluated) == _metrics(finished[1])
  again = loop.train_and_evaluate(default.get_config("tiny"), workdir)
  assert _metrics(again) == _metrics(finished[1])


@pytest.mark.slow  # A finished run: seconds.
def test_stop_request_after_training_stops_before_the_next_stage(finished, tmp_path):
  # A signal during the last task's evaluation was acknowledged ("stopping at
  # the next step boundary") and then ignored: the run exited 0.
  workdir = _copy(finished, tmp_path)
  os.remove(workdir_lib.row_path(workdir, 2))
  with pytest.raises(train_lib.Interrupted) as e:
    loop.train_and_evaluate(default.get_config("tiny"), workdir, should_stop=lambda: True)
  assert e.value.stage == "indexing and evaluating task 2"
  assert not os.path.exists(workdir_lib.row_path(workdir, 2))


@pytest.mark.slow  # A finished run: seconds.
@pytest.mark.parametrize("ks", [(1, 5), (1, 2, 3)])
def test_ks_without_the_default_ones_finish_the_run(finished, tmp_path, ks):
  # Issue 25 D1: rsum and the embeddings manifest read r1, r5 and r10 whatever
  # ks was, so (1, 5) threw a finished run away with KeyError: 'r10'.
  workdir = _copy(finished, tmp_path)
  config = default.get_config("tiny")
  config.eval.ks = ks
  again = loop.train_and_evaluate(config, workdir)
  for regime, scopes in again["metrics"].items():
    d = scopes["task_aware"]
    assert f"r{ks[-1]}" in d["i2t"] and "r10" not in d["i2t"]
    expected = [[sum(d[x][f"r{k}"][t][0] for x in ("i2t", "t2i") for k in ks)]
                for t in range(2)]
    assert [[row[0]] for row in d["rsum"]] == expected
    # The agreement with exact search stays at 10 whatever the K values.
    assert (d["i2t"]["index_recall_at_10"]
            == finished[1]["metrics"][regime]["task_aware"]["i2t"]["index_recall_at_10"])
    assert again["summary"][regime]["task_aware"]["rsum"]["final_average"] is not None


# ---------------------------------------------------------------------------
# One run per workdir.


def test_second_run_on_a_locked_workdir_names_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\nfrom ccr_jax.run import workdir as w\n"
       "with w.locked(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(60)",
       workdir], cwd=REPO, stdout=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusyError) as e:
      loop.train_and_evaluate(default.get_config("tiny"), workdir)
    assert f"pid {holder.pid}" in str(e.value) and workdir in str(e.value)
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]  # Nothing else written.
  finally:
    holder.kill()
    holder.wait()
  # The holder died without unlocking: its stale lock is taken over.
  with workdir_lib.locked(workdir):
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
      assert f"pid {os.getpid()}" in f.read()


def test_lock_of_a_new_workdir_that_fails_leaves_nothing(tmp_path):
  workdir = str(tmp_path / "new")
  with pytest.raises(RuntimeError):
    with workdir_lib.locked(workdir):
      raise RuntimeError("boom")
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------
# Every check that can run before training does, before anything is written.


def test_num_tasks_not_dividing_categories_writes_nothing(tmp_path):
  config = default.get_config("tiny")
  config.data.num_tasks = 3  # 4 categories
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="num_tasks=3"):
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)


def test_fold_size_not_dividing_the_test_split_fails_before_training(tmp_path):
  config = default.get_config("tiny")
  config.eval.fold_size = 3  # 4 test images per task
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"eval.fold_size=3 does not divide task 1"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  # What the user had there stays; the run's own files (data, config) do not.
  assert os.listdir(tmp_path / "run") == ["notes.txt"]


def test_odd_but_valid_settings_are_warned_about():
  config = default.get_config("tiny")
  config.train.checkpoint_every = 0
  config.strategy.name = "joint+replay"
  warnings = config_lib.config_warnings(config)
  assert any("checkpoint_every=0" in w and "restarts" in w for w in warnings)
  assert any("'joint'" in w and "'replay'" in w for w in warnings)
  assert config_lib.config_warnings(default.get_config("tiny")) == []


def test_batch_larger_than_a_task_is_warned_about():
  config = default.get_config("tiny")
  config.train.batch_size = 200
  split = types.SimpleNamespace(ids=np.arange(32), captions_per_image=5)
  fake = types.SimpleNamespace(
      config=config, encoded=[{"train": _Sized(split), "test": _Sized(split)}])
  warnings = setup_lib.check_setup(fake)
  assert len(warnings) == 1 and "exceeds task 1's 160 training pairs" in warnings[0]
  config.train.batch_size = 160
  assert setup_lib.check_setup(fake) == []


class _Sized:
  def __init__(self, ns):
    self.ids, self.captions_per_image = ns.ids, ns.captions_per_image

  def __len__(self):
    return len(self.ids)


# ---------------------------------------------------------------------------
# Training stops cleanly: on request, and when the model collapsed.


def _fake_step(std, grad_norm=0.0, healthy_steps=0):
  """A step whose metrics are healthy (std 0.1, gradient 1) for its first
  `healthy_steps` steps, then `std` and `grad_norm`."""
  def step(state, batch):
    del batch
    ok = state["step"] < healthy_steps
    return {**state, "step": state["step"] + 1}, {
        "loss": jnp.float32(1.0),
        "grad_norm": jnp.where(ok, 1.0, grad_norm).astype(jnp.float32),
        "score_std": jnp.where(ok, 0.1, std).astype(jnp.float32)}
  return step


def _run_task(step_fn, first_step=0, checkpoint_every=0, **kwargs):
  saved = []
  mesh = sharding.make_mesh()
  state = train_lib.train_task(
      {"step": jnp.int32(first_step)}, step_fn,
      lambda s: {"x": np.zeros((2, 1), np.float32)},
      first_step=first_step, num_steps=8, mesh=mesh, checkpoint_every=checkpoint_every,
      checkpoint_fn=lambda st, n, ranked: saved.append((n, ranked)), log_every=2, task=1,
      show_progress=False, **kwargs)
  return state, saved


def test_stop_request_saves_the_state_at_the_step_and_raises():
  calls = []

  def should_stop():
    calls.append(1)
    return len(calls) > 3  # Asked before step 3 (0-based).

  with pytest.raises(train_lib.Interrupted) as e:
    _run_task(_fake_step(0.1), should_stop=should_stop)
  assert (e.value.task, e.value.step, e.value.saved) == (1, 3, True)


def test_collapsed_model_is_stopped_with_the_step_range():
  with pytest.raises(FloatingPointError, match="collapsed between steps 2 and 4"):
    _run_task(_fake_step(0.0, healthy_steps=2))
  # Flat from the first step (a dead initialisation on degenerate data): not
  # a collapse of training, so it is not stopped.
  state, _ = _run_task(_fake_step(0.0))
  assert int(state["step"]) == 8
  state, saved = _run_task(_fake_step(0.05))  # A spread model trains on.
  assert int(state["step"]) == 8 and saved == []
  # Equal scores with a gradient (identical inputs at initialisation) can
  # still move: not a collapse.
  state, _ = _run_task(_fake_step(0.0, grad_norm=0.5))
  assert int(state["step"]) == 8


def test_collapse_guard_survives_a_resume():
  # Issue 25 D2: the guard's memory started False on every call, so a rerun
  # resumed from the checkpoint before the collapse and trained on at chance.
  _, saved = _run_task(_fake_step(0.1), checkpoint_every=2)
  assert saved == [(2, True), (4, True), (6, True)]  # Checkpoints say it ranked.
  with pytest.raises(FloatingPointError, match="collapsed between steps 2 and 4"):
    _run_task(_fake_step(0.0), first_step=2, ranked_before=True)
  # A checkpoint of a model that never ranked resumes as it started.
  _, saved = _run_task(_fake_step(0.0), first_step=2, checkpoint_every=2)
  assert saved == [(4, False), (6, False)]


@pytest.mark.slow
def test_huge_learning_rate_collapse_is_caught_again_on_rerun(tmp_path):
  config = default.get_config("tiny")
  config.optim.learning_rate = 1e6
  config.train.checkpoint_every = 2
  workdir = str(tmp_path / "run")
  for _ in range(2):  # The rerun resumes from the last good state: same stop.
    with pytest.raises(FloatingPointError, match="task 1: the model collapsed") as e:
      loop.train_and_evaluate(config, workdir)
    assert "Last good checkpoint" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_state_and_exits_with_its_code(signum, code, tmp_path):
  workdir = str(tmp_path / "run")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  proc = subprocess.Popen(
      [sys.executable, "-m", "ccr_jax.main", TINY, f"--workdir={workdir}",
       "--config.train.steps_per_task=100000", "--config.train.log_every=1",
       "--config.train.checkpoint_every=0"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:  # absl logs to stderr.
      if "task 1  step" in line:
        break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == code, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"interrupted by {signal.Signals(signum).name}: state saved "
                         "at task 1 step"), err[-3000:]
  assert "Traceback" not in err
  assert os.listdir(os.path.join(workdir, "state"))


# ---------------------------------------------------------------------------
# Files: disk full, permissions.


def test_disk_full_during_an_index_save_is_one_line_naming_the_path(tmp_path,
                                                                    monkeypatch):
  index = indexing.build_index(np.eye(4, dtype=np.float32), np.arange(4),
                               backend="exact", snapshot=1, task=1, modality="images")

  def short_write(path, array):
    raise OSError("15360 requested and 992 written")

  monkeypatch.setattr(index_storage, "_write_npy", short_write)
  target = str(tmp_path / "index")
  with pytest.raises(files.DiskFullError) as e:
    indexing.save_index(index, target)
  assert str(e.value).startswith(f"no space left on the device while writing {target}")
  assert not os.listdir(tmp_path)  # The temporary directory is gone.


def test_disk_full_in_an_atomic_write_names_the_file(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  path = str(tmp_path / "results.json")
  with pytest.raises(files.DiskFullError, match=f"writing {path}"):
    files.write_json(path, {"a": 1})
  assert not os.listdir(tmp_path)


def test_written_files_are_readable_by_others(tmp_path):
  old = os.umask(0o022)
  try:
    files.write_json(str(tmp_path / "results.json"), {"a": 1})
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == 0o644


# ---------------------------------------------------------------------------
# The command line: report flags, --mode=config, provenance, the console.


@pytest.mark.slow  # A finished run or a subprocess: seconds each.
def test_mode_config_prints_every_key_with_its_meaning_and_default():
  proc = _cli("--mode=config", TINY, "--config.train.steps_per_task=7", timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert ("train.steps_per_task = 7  # optimizer steps per task (default 400)"
          in lines)
  assert "seed = 0  # seeds the initial params, batch order and every sampled subset" \
      in lines
  # One line per leaf key of the resolved config.
  assert len(lines) == len(_leaves(json.loads(default.get_config("tiny").to_json())))
  assert "--mode=config" in _cli("--help", timeout=120).stdout


def _leaves(tree):
  return [v for x in tree.values()
          for v in (_leaves(x) if isinstance(x, dict) else [x])]


@pytest.mark.slow  # A finished run or a subprocess: seconds each.
def test_provenance_is_recorded(finished):
  prov = finished[1]["provenance"]
  assert set(prov) >= {"commit", "dirty", "command_line", "started", "finished",
                       "wall_s", "stage_s", "devices"}
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                        text=True).stdout.strip()
  assert prov["commit"] == head
  assert prov["stage_s"]["train_s"] > 0 and prov["wall_s"] >= prov["stage_s"]["train_s"]


@pytest.mark.slow
def test_console_of_a_run_is_quiet_and_ends_with_a_summary(tmp_path):
  workdir = str(tmp_path / "a,b")  # A comma: report flags must not split it.
  proc = _cli(TINY, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  assert "orbax" not in console.lower(), console[-3000:]
  assert len(console.splitlines()) < 40, console
  for regime in ("fixed", "reindex"):
    for scope in ("task-aware", "task-agnostic"):
      assert any(l.startswith(regime) and scope in l for l in proc.stdout.splitlines())
  assert f"--mode=evaluate --workdir={workdir}" in proc.stdout
  for name in ("results.json", "results.md", "config.json"):
    path = os.path.join(workdir, "results", name) if name != "config.json" else \
        os.path.join(workdir, name)
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044 == 0o044, name
  assert _results(workdir)["provenance"]["command_line"].endswith(
      f"--workdir={workdir}")
  report = _cli("--mode=report", f"--workdir={workdir}", f"--workdir={workdir}",
                f"--report_dir={tmp_path / 'report'}")
  assert report.returncode == 0, report.stderr[-3000:]
  assert os.path.exists(tmp_path / "report" / "report.md")


def test_report_over_a_broken_results_json_names_the_file(tmp_path):
  from ccr_jax import reporting  # pylint: disable=g-import-not-at-top
  (tmp_path / "run" / "results").mkdir(parents=True)
  (tmp_path / "run" / "config.json").write_text("{}")
  broken = tmp_path / "run" / "results" / "results.json"
  broken.write_text('{"metrics": ')
  with pytest.raises(ValueError, match=f"{broken} is not valid JSON .*line 1"):
    reporting.report([str(tmp_path / "run")], str(tmp_path / "out"))


def test_other_strategies_defaults_do_not_orphan_a_workdir(tmp_path):
  """Only the sections the named strategy reads define the experiment: an
  older config.json whose *other* strategies had other defaults still
  matches, while a changed setting of the strategy in use is refused."""
  config = default.get_config("tiny")
  config.strategy.name = "ewc+replay"
  old = json.loads(config.to_json())
  old["strategy"]["l2"]["strength"] = 0.03  # l2's default before it was chosen
  del old["strategy"]["agem"]               # a section that did not exist yet
  workdir_lib.write_json(str(tmp_path / "config.json"), old)
  workdir_lib.check_config(config, str(tmp_path), config_lib.complete)
  config.strategy.replay.memory_size = 7
  with pytest.raises(ValueError, match=r"sections differing: \['strategy'\]"):
    workdir_lib.check_config(config, str(tmp_path), config_lib.complete)


def test_console_summary_quotes_paths_and_offers_what_is_next():
  from ccr_jax.run import results as results_lib  # pylint: disable=g-import-not-at-top
  summary = {"fixed": {"task_aware": {
      "i2t_r1": {"final_average": 50.0, "forgetting": 1.0},
      "t2i_r1": {"final_average": 40.0, "forgetting": None}}}}
  workdir = "/tmp/my runs/a"
  text = results_lib.console_summary({"summary": summary}, workdir, "train")
  assert "tensorboard --logdir '/tmp/my runs/a/logs/tensorboard'" in text
  assert "--mode=evaluate --workdir='/tmp/my runs/a'" in text
  # After evaluate mode, evaluating again is not what comes next.
  text = results_lib.console_summary({"summary": summary}, workdir, "evaluate")
  assert "--mode=evaluate" not in text and "--mode=report" in text

