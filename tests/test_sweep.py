"""launch/sweep.py: expansion, names, the launchers, skipping, one real sweep."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks import harness
from ccr_jax.run import config as config_lib
from launch import sweep

REPO = harness.REPO
VALID = config_lib.valid_config_keys()


def _names(runs):
  return [r.name for r in runs]


# --- Parsing and validation -------------------------------------------------


def test_grid_values_split_on_commas_outside_brackets():
  assert sweep.parse_grid(["strategy.name=finetune,ewc",
                           "eval.ks=(1,5),(1, 10)",
                           "data.task_categories=[[0,1],[2,3]],[[0,2],[1,3]]"]) == {
      "strategy.name": ["finetune", "ewc"],
      "eval.ks": ["(1,5)", "(1, 10)"],
      "data.task_categories": ["[[0,1],[2,3]]", "[[0,2],[1,3]]"]}
  # The value of an override keeps its commas and '='.
  assert sweep.parse_overrides(["eval.ks=(1,5,10)", "data.name=a=b"]) == {
      "eval.ks": "(1,5,10)", "data.name": "a=b"}
  assert sweep.parse_seeds(["0", "1", "2"]) == [0, 1, 2]


@pytest.mark.parametrize("entries, message", [
    (["strategy.name"], "is not key=value"),
    (["strategy.name="], "an empty value"),
    (["strategy.name=ewc,"], "an empty value"),
    (["strategy.name=ewc,ewc"], "repeated"),
    (["strategy.name=ewc", "strategy.name=lwf"], "given twice"),
    (["eval.ks=(1,5"], "unbalanced"),
])
def test_bad_grid_entries_are_refused(entries, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid(entries)


def test_bad_seeds_are_refused():
  with pytest.raises(ValueError, match="integers"):
    sweep.parse_seeds(["0", "one"])
  with pytest.raises(ValueError, match="repeated"):
    sweep.parse_seeds(["1", "1"])


def test_an_unknown_key_is_one_line_naming_the_nearest():
  with pytest.raises(ValueError) as e:
    sweep.check_keys({"strategy.nam": ["ewc"]}, [], {"train.stepz": "2"}, VALID)
  assert str(e.value) == (
      "--grid key 'strategy.nam' is not a config key. Did you mean "
      "'strategy.name'?; --overrides key 'train.stepz' is not a config key. "
      "Did you mean 'train.steps_per_task'?")
  assert "\n" not in str(e.value)
  sweep.check_keys({"strategy.name": ["ewc"], "seed": ["1"]}, [],
                   {"data.categories.animals": "[0]"}, VALID)  # No error.


def test_a_key_set_twice_is_refused():
  with pytest.raises(ValueError, match="both --grid and --overrides"):
    sweep.check_keys({"strategy.name": ["ewc"]}, [], {"strategy.name": "lwf"}, VALID)
  with pytest.raises(ValueError, match="'seed' is set by --seeds"):
    sweep.check_keys({}, [0, 1], {"seed": "3"}, VALID)


# --- Expansion and naming ---------------------------------------------------


def test_expansion_order_seeds_slowest_last_grid_key_fastest():
  runs = sweep.expand({"strategy.name": ["finetune", "ewc"],
                       "optim.learning_rate": ["1e-3", "3e-4"]},
                      [0, 1], {"train.steps_per_task": "2"})
  # Written out by hand: seed 0 of every setting first.
  assert _names(runs) == [
      f"strategy.name-{s}__optim.learning_rate-{lr}__seed-{seed}"
      for seed in (0, 1) for s in ("finetune", "ewc") for lr in ("1e-3", "3e-4")]
  assert runs[5].settings == (("strategy.name", "finetune"),
                              ("optim.learning_rate", "3e-4"), ("seed", "1"))
  # Fixed overrides first, then what names the run; the seed is `seed`.
  assert runs[5].overrides == (("train.steps_per_task", "2"),) + runs[5].settings
  assert "seed" in VALID
  # The same inputs give the same runs.
  assert runs == sweep.expand({"strategy.name": ["finetune", "ewc"],
                               "optim.learning_rate": ["1e-3", "3e-4"]},
                              [0, 1], {"train.steps_per_task": "2"})


def test_without_seeds_or_grid_runs_keep_the_configs_seed():
  runs = sweep.expand({"strategy.name": ["finetune", "ewc"]}, [], {})
  assert _names(runs) == ["strategy.name-finetune", "strategy.name-ewc"]
  assert all("seed" not in dict(r.overrides) for r in runs)
  (only,) = sweep.expand({}, [], {"strategy.name": "ewc"})
  assert only.name == "run" and only.overrides == (("strategy.name", "ewc"),)


def test_names_are_unique_and_hold_no_comma_equals_or_slash():
  runs = sweep.expand({"eval.ks": ["(1,5)", "(1, 10)", "(1,5,10)"],
                       "data.manual_dir": ["/data/coco", "a b", ""]}, [7], {})
  names = _names(runs)
  assert len(set(names)) == len(names) == 9
  for name in names:
    assert not set(name) & set(",=/ ()"), name
  assert names[0] == "eval.ks-1_5__data.manual_dir-data_coco__seed-7"
  assert names[2] == "eval.ks-1_5__data.manual_dir-empty__seed-7"


def test_values_that_clean_to_one_name_are_refused():
  with pytest.raises(ValueError, match="share the workdir name 'eval.ks-1_5'"):
    sweep.expand({"eval.ks": ["(1,5)", "[1,5]"]}, [], {})


def test_a_long_name_is_cut_and_stays_unique():
  long_values = ["x" * 300 + "a", "x" * 300 + "b"]
  names = _names(sweep.expand({"data.manual_dir": long_values}, [], {}))
  assert all(len(n) <= sweep.MAX_NAME for n in names)
  assert len(set(names)) == 2


def test_commands_of_a_run_and_of_the_report():
  (run,) = sweep.expand({"strategy.name": ["ewc"]}, [1], {"eval.ks": "(1, 5)"})
  args = sweep.train_args("configs/default.py:tiny", "/r", run)
  assert args == ["--config=configs/default.py:tiny",
                  "--workdir=/r/strategy.name-ewc__seed-1",
                  "--config.eval.ks=(1, 5)", "--config.strategy.name=ewc",
                  "--config.seed=1"]
  assert sweep.shell_command(args).endswith("'--config.eval.ks=(1, 5)' "
                                            "--config.strategy.name=ewc --config.seed=1")
  assert sweep.report_args(["/r/a", "/r/b"], "/r/report") == [
      "--mode=report", "--workdir=/r/a", "--workdir=/r/b", "--report_dir=/r/report"]


# --- Launchers --------------------------------------------------------------


def test_index_ranges_and_sbatch_command():
  assert sweep.index_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
  assert sweep.index_ranges([3]) == "3"
  assert sweep.sbatch_command("r/sweep.sbatch", [1, 2, 4], 2, ["--gpus-per-node=8"]) == [
      "sbatch", "--gpus-per-node=8", "--array=1-2,4%2", "r/sweep.sbatch"]
  assert sweep.sbatch_command("s", [0], 0) == ["sbatch", "--array=0", "s"]


def _fake_srun(bin_dir) -> None:
  """An `srun` that records its arguments, one a line, in $SRUN_ARGS."""
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text(textwrap.dedent("""\
      #!/bin/bash
      printf '%s\\n' "$@" > "$SRUN_ARGS"
      echo "training output"
      """))
  srun.chmod(0o755)


def test_slurm_array_task_runs_its_run_through_slurm_sbatch(tmp_path):
  root = str(tmp_path / "sweep")
  runs = sweep.expand({"strategy.name": ["finetune", "ewc"]}, [0], {"eval.ks": "(1, 5)"})
  script = tmp_path / "sweep.sbatch"
  script.write_text(sweep.slurm_script("configs/default.py:tiny", root, runs))
  text = script.read_text()
  assert "#SBATCH --array=0-1\n" in text
  assert "exec bash launch/slurm.sbatch" in text  # How every ccr_jax run starts.
  subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)

  _fake_srun(tmp_path / "bin")
  env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
         "CCR_REPO": REPO, "PYTHON": "/venv/python", "SLURM_ARRAY_TASK_ID": "1",
         "SRUN_ARGS": str(tmp_path / "srun_args")}
  subprocess.run(["bash", str(script)], env=env, check=True, timeout=30)
  assert (tmp_path / "srun_args").read_text().splitlines() == [
      "--kill-on-bad-exit=1", "/venv/python", "-m", "ccr_jax.main",
      *sweep.train_args("configs/default.py:tiny", root, runs[1])]
  assert "training output" in open(sweep.run_log(root, runs[1])).read()

  # A finished run's task exits at once, without srun.
  os.remove(tmp_path / "srun_args")
  os.makedirs(os.path.join(sweep.run_workdir(root, runs[1]), "results"))
  open(os.path.join(sweep.run_workdir(root, runs[1]), "results", "results.json"),
       "w").write("{}")
  proc = subprocess.run(["bash", str(script)], env=env, check=True, timeout=30,
                        capture_output=True, text=True)
  assert proc.stdout.startswith("skipped strategy.name-ewc__seed-0")
  assert not (tmp_path / "srun_args").exists()
  proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "2"},
                        timeout=30, capture_output=True, text=True)
  assert proc.returncode == 2 and "no run 2" in proc.stderr


def test_slurm_mode_writes_the_script_and_submits_only_unfinished_runs(tmp_path, capsys):
  root = str(tmp_path)
  runs = sweep.expand({"strategy.name": ["finetune", "ewc", "lwf"]}, [], {})
  os.makedirs(os.path.join(sweep.run_workdir(root, runs[1]), "results"))
  open(os.path.join(sweep.run_workdir(root, runs[1]), "results", "results.json"),
       "w").write("{}")
  code = sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc,lwf"],
                     mode="slurm", parallel=2, launcher_args=["--time=1:00:00"])
  assert code == 0
  out = capsys.readouterr().out
  script = os.path.join(root, "sweep.sbatch")
  assert f"sbatch --time=1:00:00 --array=0,2%2 {script}\n" in out
  assert os.path.isdir(os.path.join(root, "logs"))  # SLURM's --output folder.
  record = json.load(open(os.path.join(root, "sweep.json")))
  assert [r["name"] for r in record["runs"]] == _names(runs)  # runs[i] is index i.


def test_tpu_mode_prints_one_pod_command_per_run(tmp_path, capsys):
  code = sweep.sweep("configs/default.py", "/mnt/shared/sweep",
                     ["strategy.name=finetune,ewc"], ["0"], mode="tpu",
                     launcher_args=["--tpu=pod", "--zone=us-central2-b"])
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert ("python -m launch.tpu_pod --tpu=pod --zone=us-central2-b -- "
          "--config=configs/default.py "
          "--workdir=/mnt/shared/sweep/strategy.name-ewc__seed-0 "
          "--config.strategy.name=ewc --config.seed=0") in lines
  assert sum(line.startswith("python -m launch.tpu_pod") for line in lines) == 2
  with pytest.raises(ValueError, match="needs the pod"):
    sweep.sweep("configs/default.py", str(tmp_path), mode="tpu",
                launcher_args=["--tpu=pod"])


def test_print_mode_prints_commands_and_writes_nothing(tmp_path, capsys):
  root = str(tmp_path / "sweep")
  code = sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc"],
                     ["0", "1"], ["train.steps_per_task=2"], mode="print")
  assert code == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 5
  assert lines[0] == ("python -m ccr_jax.main --config=configs/default.py:tiny "
                      f"--workdir={root}/strategy.name-finetune__seed-0 "
                      "--config.train.steps_per_task=2 "
                      "--config.strategy.name=finetune --config.seed=0")
  assert lines[-1].startswith("python -m ccr_jax.main --mode=report --workdir=")
  assert not os.path.exists(root)
  with pytest.raises(ValueError, match="are for --mode=slurm"):
    sweep.sweep("configs/default.py", root, mode="print", launcher_args=["--x"])


def test_a_rerun_with_other_settings_for_the_same_names_is_refused(tmp_path, capsys):
  root = str(tmp_path)
  pod = ["--tpu=pod", "--zone=z"]  # tpu mode: writes sweep.json, runs nothing.
  sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc"], ["0"],
              ["train.steps_per_task=2"], mode="tpu", launcher_args=pod)
  # A finished run is skipped by name, so other overrides would keep old results.
  with pytest.raises(ValueError, match=r"already holds run strategy.name-finetune__seed-0"
                     r" with other settings \(overrides differing in "
                     r"train.steps_per_task\); use a new --root"):
    sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc"], ["0"],
                ["train.steps_per_task=3"], mode="print")
  with pytest.raises(ValueError, match="--config configs/default.py:tiny then "
                     "configs/default.py"):
    sweep.sweep("configs/default.py", root, ["strategy.name=finetune,ewc"], ["0"],
                ["train.steps_per_task=2"], mode="print")
  # More seeds and values: only new runs, accepted.
  assert sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc,lwf"],
                     ["0", "1"], ["train.steps_per_task=2"], mode="tpu",
                     launcher_args=pod) == 0
  capsys.readouterr()


def test_local_runs_skip_finished_ones_and_survive_a_failure(tmp_path, capsys):
  """Fake training commands: 'fail' in the workdir exits 3, others write
  results.json; the finished run's command must never start."""
  root = str(tmp_path)
  fake_main = tmp_path / "fake_python"
  fake_main.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import os, sys
      args = sys.argv[3:]  # after '-m ccr_jax.main'
      if "--mode=report" in args:
        sys.exit(4)  # The report failing is only a warning.
      workdir = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")][0]
      print("ran", workdir)
      if os.path.basename(workdir).endswith("skip"):
        sys.exit(5)
      if os.path.basename(workdir).endswith("fail"):
        sys.exit(3)
      os.makedirs(os.path.join(workdir, "results"))
      open(os.path.join(workdir, "results", "results.json"), "w").write("{{}}")
      """))
  fake_main.chmod(0o755)
  names = ["data.name-ok", "data.name-fail", "data.name-skip", "data.name-ok2"]
  skip_results = os.path.join(root, names[2], "results")
  os.makedirs(skip_results)
  open(os.path.join(skip_results, "results.json"), "w").write("{}")

  config = os.path.join(REPO, "configs", "default.py") + ":tiny"
  code = sweep.sweep(config, root, ["data.name=ok,fail,skip,ok2"],
                     mode="local", parallel=2, python=str(fake_main))
  assert code == 1  # One run failed.
  captured = capsys.readouterr()
  assert "warning: the report failed (exit 4)" in captured.err
  summary = captured.out.split("sweep of 4 runs:\n")[1].splitlines()
  for name, status in zip(names, ("ok", "failed", "skipped", "ok")):
    assert f"{status:8s} {name}  {os.path.join(root, 'logs', name + '.log')}" in summary
  assert not os.path.exists(os.path.join(root, "logs", "data.name-skip.log"))
  assert "ran" in open(os.path.join(root, "logs", "data.name-fail.log")).read()
  record = json.load(open(os.path.join(root, "sweep.json")))
  assert [(r["name"], r["status"]) for r in record["runs"]] == list(
      zip(names, ("ok", "failed", "skipped", "ok")))
  assert record["runs"][1]["returncode"] == 3
  assert record["grid"] == {"data.name": ["ok", "fail", "skip", "ok2"]}
  # The report covers the finished runs only (it refuses an unfinished workdir).
  report_log = open(os.path.join(root, "logs", "report.log")).read()
  assert "data.name-fail" not in report_log and "data.name-ok2" in report_log


def test_a_sweep_with_another_grid_keeps_the_earlier_runs(tmp_path, capsys):
  # A second grid in the same root used to drop the first one's runs from
  # sweep.json and from the report.
  root = str(tmp_path)
  sweep.sweep("configs/default.py:tiny", root, ["strategy.name=finetune,ewc"],
              mode="slurm")
  sweep.sweep("configs/default.py:tiny", root, ["optim.learning_rate=0.001"],
              mode="slurm")
  record = json.load(open(os.path.join(root, "sweep.json")))
  assert [r["name"] for r in record["runs"]] == ["optim.learning_rate-0.001"]
  earlier = [r["name"] for r in record["earlier_runs"]]
  assert earlier == ["strategy.name-finetune", "strategy.name-ewc"]
  for name in earlier + ["optim.learning_rate-0.001"]:
    assert f"--workdir={os.path.join(root, name)}" in record["report_command"]


def _saves_on_sigterm(ready) -> str:
  """A stand-in run: touches `ready`, then prints "SIGTERM: saved" and exits
  143 on SIGTERM, as ccr_jax.main does after saving its state."""
  return textwrap.dedent(f"""\
      import pathlib, signal, sys, time
      def saved(*_):
        print("SIGTERM: saved", flush=True)
        sys.exit(143)
      signal.signal(signal.SIGTERM, saved)
      pathlib.Path({str(ready)!r}).touch()
      time.sleep(60)
      """)


@pytest.mark.slow  # A subprocess that imports the sweep (and JAX).
def test_a_run_gets_sigterm_when_its_sweep_is_killed(tmp_path):
  """SIGKILL reaches no handler: the runs (in sessions of their own) went on
  alone, and the rerun found their workdirs locked and marked them failed."""
  pid_file = tmp_path / "pid"
  child = _saves_on_sigterm(pid_file)
  driver = textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {REPO!r})
      from launch import sweep
      sweep.run_local([("slow", [sys.executable, "-c", {child!r}], {str(tmp_path / "slow.log")!r})], 1)
      """)
  proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
  try:
    for _ in range(600):
      if pid_file.exists():
        break
      time.sleep(0.05)
    proc.kill()
    proc.wait()
    log = tmp_path / "slow.log"
    for _ in range(200):  # The run saves and exits on its own.
      if "SIGTERM: saved" in log.read_text():
        break
      time.sleep(0.05)
    assert "SIGTERM: saved" in log.read_text()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_an_interrupted_sweep_lets_running_runs_save_then_stops(tmp_path):
  """Ctrl-C in the sweep: each running run gets one SIGTERM (ccr_jax.main then
  saves its state at the next step) and is waited for."""
  ready = tmp_path / "ready"
  slow = _saves_on_sigterm(ready)
  fast = (f"import os, time\nwhile not os.path.exists({str(ready)!r}): "
          "time.sleep(0.01)")
  jobs = [("fast", [sys.executable, "-c", fast], str(tmp_path / "fast.log")),
          ("slow", [sys.executable, "-c", slow], str(tmp_path / "slow.log"))]

  def interrupt(outcome):
    assert outcome.name == "fast"
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep.run_local(jobs, parallel=2, on_done=interrupt, grace=20)
  assert "SIGTERM: saved" in (tmp_path / "slow.log").read_text()


# --- A real sweep -----------------------------------------------------------


@pytest.mark.slow
def test_a_two_run_sweep_of_the_tiny_config_trains_both_and_reports_them(tmp_path):
  """Two tiny runs at once, then their report: ~33 s of CPU, ~50 s on 2 shared cores."""
  root = tmp_path / "sweep"
  # Two learning rates of fine-tuning: the cheapest pair (EWC adds its own
  # compilations); no resumable-state checkpoints inside a 2-step task.
  cmd = [sys.executable, "-m", "launch.sweep", "--config=configs/default.py:tiny",
         f"--root={root}", "--grid=optim.learning_rate=1e-3,3e-4", "--seeds=3",
         "--overrides=train.steps_per_task=2", "--overrides=train.checkpoint_every=0",
         "--parallel=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=harness.worker_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  names = ["optim.learning_rate-1e-3__seed-3", "optim.learning_rate-3e-4__seed-3"]
  record = json.loads((root / "sweep.json").read_text())
  assert [(r["name"], r["workdir"], r["status"]) for r in record["runs"]] == [
      (n, str(root / n), "ok") for n in names]
  for name, lr in zip(names, (1e-3, 3e-4)):
    results = json.loads((root / name / "results" / "results.json").read_text())
    assert results["config"]["seed"] == 3
    assert results["config"]["optim"]["learning_rate"] == lr
    assert results["config"]["train"]["steps_per_task"] == 2
  # The report step (main.py's repeated --workdir) covers both runs.
  assert "warning" not in proc.stderr, proc.stderr[-2000:]
  report = (root / "report" / "report.md").read_text()
  assert all(str(root / n) in report for n in names)
  # What a rerun of the sweep checks to skip them (the rerun itself is
  # test_local_runs_skip_finished_ones_and_survive_a_failure).
  assert all(sweep.finished(str(root / n)) for n in names)
