"""Multi-process runs: CPU processes on localhost against one process, FSDP, launchers.

The slow tests start real JAX processes joined by `jax.distributed` over gloo
(JAX's default CPU collectives) and train the tiny config through the real
entry point; each subprocess has a timeout, and its whole process group is
killed when it runs out, so a hung collective fails the test, never the suite.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib
from ccr_jax import sharding
from ccr_jax.data import pipeline
from configs import default
from launch import local
from launch import tpu_pod

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _run(argv: list[str], env: dict | None = None, timeout: int = TIMEOUT_S
         ) -> subprocess.CompletedProcess:
  """Runs `argv` in its own session; fails with its stderr on error or timeout."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **(env or {})}
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # The launcher and every process it started.
    out, err = proc.communicate()
    pytest.fail(f"{argv[:4]} timed out after {timeout} s; stderr tail:\n{err[-4000:]}")
  if proc.returncode:
    pytest.fail(f"{argv[:4]} exited {proc.returncode}; stderr tail:\n{err[-4000:]}")
  return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# ------------------------------------------------------------------ fast checks


def test_cluster_launched_reads_the_launchers_environment():
  assert not sharding.cluster_launched({})
  assert not sharding.cluster_launched({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
  assert sharding.cluster_launched({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
  assert sharding.cluster_launched({"OMPI_COMM_WORLD_SIZE": "2"})
  assert not sharding.cluster_launched({"TPU_WORKER_HOSTNAMES": "w0"})
  assert sharding.cluster_launched({"TPU_WORKER_HOSTNAMES": "w0,w1"})


def test_single_process_is_not_initialised(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert not sharding.initialize_distributed("auto")
  assert not sharding.initialize_distributed("off", "127.0.0.1:1", 2, 0)
  with pytest.raises(ValueError, match="auto"):
    sharding.initialize_distributed("maybe")
  mesh = sharding.make_mesh()
  assert sharding.process_rows(16, mesh) == slice(0, 16)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_process_rows_of_a_batch_concatenate_to_the_global_batch(ratio):
  rng = np.random.default_rng(0)
  pool = pipeline.EncodedSplit(
      images=rng.integers(0, 255, (10, 4, 4, 3), dtype=np.uint8),
      tokens=rng.integers(1, 9, (10, 5, 6)).astype(np.int32),
      lengths=rng.integers(1, 7, (10, 5)).astype(np.int32), ids=np.arange(10))
  memory = pipeline.subset(pool, np.array([1, 3, 5]))
  full = pipeline.mixed_batch(pool, memory, 16, ratio, seed=3, task=1, step=7)
  # Four processes' blocks, the cut falling inside the memory part too.
  blocks = [pipeline.mixed_batch(pool, memory, 16, ratio, seed=3, task=1, step=7,
                                 rows=slice(lo, lo + 4)) for lo in range(0, 16, 4)]
  for key, value in full.items():
    np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), value)


def test_local_launcher_gives_each_process_its_id_and_devices():
  cmds = local.process_commands(["--workdir=/w"], 3, 2, 1234)
  assert len(cmds) == 3
  for i, (argv, env) in enumerate(cmds):
    assert argv[1:4] == ["-m", "ccr_jax.main", "--workdir=/w"]
    assert argv[4:] == ["--coordinator_address=127.0.0.1:1234", "--num_processes=3",
                        f"--process_id={i}"]
    assert env["JAX_PLATFORMS"] == "cpu"
    assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]


def test_tpu_launcher_runs_main_on_every_worker():
  cmd = tpu_pod.pod_command(["--config=configs/default.py", "--workdir=/mnt/a b"],
                            "pod", "us-central2-b", project="p")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
  remote = cmd[-1]
  assert remote.startswith("--command=cd ~/ccr_jax && python3 -m ccr_jax.main "
                           "--distributed=on --config=configs/default.py")
  assert remote.endswith("'--workdir=/mnt/a b'")


def test_slurm_script_parses():
  subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "slurm.sbatch")],
                 check=True, timeout=30)


def test_fsdp_splits_the_largest_divisible_dimension_of_large_leaves():
  mesh = jax.sharding.AbstractMesh((2, 4), (sharding.DATA_AXIS, sharding.MODEL_AXIS))
  spec = lambda shape: tuple(sharding.param_sharding(shape, mesh).spec)
  assert spec((300, 128)) == ("model", None)
  assert spec((6, 4096)) == (None, "model")
  assert spec((3, 3, 64, 128)) == (None, None, None, "model")
  assert spec((1023, 8)) == (None, "model")  # 1023 does not divide by 4.
  assert spec((1023, 3)) == ()  # No dimension divides: replicated.
  assert spec((128,)) == ()  # Small: replicated.
  assert spec(()) == ()
  one = jax.sharding.AbstractMesh((8, 1), (sharding.DATA_AXIS, sharding.MODEL_AXIS))
  assert tuple(sharding.param_sharding((300, 128), one).spec) == ()


# ------------------------------------------------------- real multi-process runs


def _tiny_config(data_dir: str):
  config = default.get_config("tiny")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The tiny experiment in this (one-device) process; renders the shared data."""
  root = tmp_path_factory.mktemp("multihost")
  data_dir = str(root / "tfds")
  workdir = str(root / "single")
  results = loop.train_and_evaluate(_tiny_config(data_dir), workdir)
  return {"root": root, "data_dir": data_dir, "workdir": workdir, "results": results}


def _launch_local(reference, name: str, processes: int, devices: int, *extra: str
                  ) -> tuple[str, str]:
  """Runs the tiny experiment by launch.local; returns (workdir, stderr)."""
  workdir = str(reference["root"] / name)
  proc = _run([sys.executable, "-m", "launch.local", f"--num_processes={processes}",
        f"--devices_per_process={devices}", "--",
        "--config=configs/default.py:tiny", f"--workdir={workdir}",
        f"--config.data.data_dir={reference['data_dir']}", *extra])
  return workdir, proc.stderr


def _final_params(reference, workdir: str):
  setup = setup_lib.build_setup(_tiny_config(reference["data_dir"]),
                                 reference["workdir"])
  return setup_lib.load_snapshot(dataclasses.replace(setup, workdir=workdir), 2)[0]


def _assert_same_results(got: dict, want: dict, path: str = "") -> None:
  """Every number equal up to float rounding (recalls are exact percentages)."""
  if isinstance(want, dict):
    assert set(got) == set(want), path
    for k in want:
      _assert_same_results(got[k], want[k], f"{path}/{k}")
  elif isinstance(want, list):
    assert len(got) == len(want), path
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_same_results(g, w, f"{path}[{i}]")
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6), path
  else:
    assert got == want, path


def _check_against_reference(reference, workdir: str) -> dict:
  got = json.load(open(os.path.join(workdir, "results", "results.json")))
  want = reference["results"]
  _assert_same_results(got["metrics"], want["metrics"])
  _assert_same_results(got["summary"], want["summary"])
  # Sharding only regroups float32 sums: equal to rounding over 8 Adam steps.
  for g, w in zip(jax.tree.leaves(_final_params(reference, workdir)),
                  jax.tree.leaves(_final_params(reference, reference["workdir"]))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
  return got


def _fake_srun(bin_dir) -> None:
  """An `srun` that starts its command as two tasks on this node, with the
  variables SLURM sets (SLURM_JOB_ID comes from the caller, as from sbatch)."""
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import os, subprocess, sys
      argv = [a for a in sys.argv[1:] if not a.startswith("--kill-on-bad-exit")]
      procs = [subprocess.Popen(argv, env={{**os.environ, "SLURM_NTASKS": "2",
                   "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                   "SLURM_STEP_NODELIST": "localhost"}}) for i in range(2)]
      sys.exit(max(p.wait() for p in procs))
      """))
  srun.chmod(0o755)


@pytest.fixture(scope="module")
def fsdp_run(reference, tmp_path_factory):
  """The tiny experiment by launch/slurm.sbatch under a stand-in srun: 2 tasks
  of 2 devices each, model axis 2; returns (workdir, the processes' stderr)."""
  bin_dir = tmp_path_factory.mktemp("slurm") / "bin"
  _fake_srun(bin_dir)
  workdir = str(reference["root"] / "two_by_two_fsdp")
  proc = _run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"),
               "--config=configs/default.py:tiny", f"--workdir={workdir}",
               f"--config.data.data_dir={reference['data_dir']}",
               "--config.mesh.model_axis_size=2"],
              env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                   "PYTHON": sys.executable, "CCR_REPO": REPO, "SLURM_JOB_ID": "12345",
                   "JAX_COORDINATOR_PORT": str(local.free_port()),
                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  return workdir, proc.stderr


@pytest.mark.slow
def test_two_processes_of_two_devices_with_fsdp_match_one(reference, fsdp_run):
  """SLURM's variables alone join the processes (no flags); the model axis
  splits parameters across devices and training matches one replicated device."""
  workdir, stderr = fsdp_run
  for i in (0, 1):
    assert f"process {i} of 2: 2 local devices of 4" in stderr
  split = re.search(r"(\d+) of (\d+) parameter arrays split over the model axis",
                    stderr)
  assert split and int(split.group(1)) >= 4, split
  got = _check_against_reference(reference, workdir)
  assert got["devices"]["processes"] == 2 and got["devices"]["count"] == 4
  assert got["config"]["mesh"]["model_axis_size"] == 2


@pytest.mark.slow
def test_two_processes_resume_on_another_mesh_like_one(reference, fsdp_run):
  """2 processes x 1 device, joined by explicit flags (launch.local), resume a
  run killed in task 2 from what 2 x 2 devices with split parameters saved:
  every process restores snapshot 1 and task 2's train state, trains the last
  steps, and results and final params match the one-process run."""
  workdir = str(reference["root"] / "resumed")
  shutil.copytree(fsdp_run[0], workdir)
  # What a kill while saving task 2's snapshot leaves: task 2's state at step 2.
  for rel in ("snapshots/task_2", "indices/snap_2", "results/rows/task_2.json",
              "results/results.json"):
    path = os.path.join(workdir, rel)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  _, stderr = _launch_local(reference, "resumed", 2, 1)
  assert "task 2: resuming at step 2" in stderr
  got = _check_against_reference(reference, workdir)
  assert got["devices"]["processes"] == 2 and got["devices"]["count"] == 2
  assert sorted(os.listdir(os.path.join(workdir, "results", "rows"))) == [
      "task_1.json", "task_2.json"]
