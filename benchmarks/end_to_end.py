r"""The default experiment's wall time and peak memory, split by stage.

  python -m benchmarks.end_to_end            # full: configs/default.py, ~3.5 min on 2 CPU cores
  python -m benchmarks.end_to_end --quick    # configs/default.py:tiny, ~30 s

Two worker processes:
  run      `loop.train_and_evaluate(config, workdir)` into a fresh
           workdir, timed around the call (wall_s) and around the process
           (process_wall_s: + Python and JAX start-up); its stage times are
           the experiment's own `results/timing.json`; peak RSS is the
           process's.
  compile  in a fresh process on the same workdir (its data already on
           disk): the experiment's train step built and compiled the same
           way, then a few steps timed the way `train.train_task` runs them,
           host batch assembly included (step_s: the step alone).
The experiment compiles its train step ahead of time once
(`training_lib.compiled_train_step`) and times that as its compile stage, so
train_s is the steps only. pairs_per_s = batch * steps / train_s is the
throughput the run achieved, state checkpoints and logging syncs included.
other_s = wall_s - every stage (setup between stages).

Keys: wall_s, one <stage>_s per timing.json stage (data, compile, train,
strategy, snapshot, embed, index, evaluate, report), other_s, peak_rss_mb.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax

from benchmarks import harness
from ccr_jax.run import loop
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import training as training_lib
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from configs import default

MODULE = "benchmarks.end_to_end"
# timing.json's stages, in the order the experiment runs them.
STAGES = ("data_s", "compile_s", "train_s", "strategy_s", "snapshot_s", "embed_s",
          "index_s", "evaluate_s", "report_s")


def config_for(name: str):
  """configs/default.py with `name` 'default' or 'tiny'."""
  return default.get_config(None if name == "default" else name)


def run_experiment(config_name: str, workdir: str) -> dict:
  """Runs the whole experiment into `workdir`; its wall time, stages and peak RSS."""
  if os.path.exists(os.path.join(workdir, "config.json")):
    raise ValueError(f"{workdir} already holds a run: the experiment would resume "
                     "it and skip stages. Give an empty --workdir.")
  wall_s, _ = harness.timed(
      lambda: loop.train_and_evaluate(config_for(config_name), workdir))
  with open(os.path.join(workdir, "results", "timing.json")) as f:
    timing = json.load(f)
  return {"wall_s": wall_s, "timing": timing, "devices": jax.device_count(),
          "peak_rss_mb": harness.peak_rss_mb()}


def time_train_step(config_name: str, workdir: str, steps: int) -> dict:
  """Compile time and steady step time of the experiment's train step.

  Builds and compiles the step with the experiment's own pieces
  (`training_lib.build_training`, `training_lib.compiled_train_step`), on task
  1's data in `workdir`; steps draw and place their batch on the host each
  time, as `train.train_task` does, and block on the result.
  """
  config = config_for(config_name)
  setup = setup_lib.build_setup(config, workdir)
  training = training_lib.build_training(setup)
  state = train_lib.create_train_state(setup_lib.initial_params(setup),
                                       training.optimizer, setup.mesh)
  pool = setup.encoded[0]["train"]

  def host_batch(step):
    return pipeline.train_batch(pool, config.train.batch_size, seed=config.seed, task=0,
                                step=step)

  def batch(step):
    return sharding.shard_batch(host_batch(step), setup.mesh)

  compiled = training_lib.compiled_train_step(setup, training, state, host_batch(0))
  compile_s = training.compiled["compile_s"]
  times = []
  for step in range(steps + 1):  # the first step is a warm-up
    start = time.perf_counter()
    state, metrics = compiled(state, batch(step))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  return {"compile_s": compile_s, "step_s": statistics.median(times[1:]),
          "final_loss": float(metrics["loss"])}


def combine(run: dict, step: dict, config_name: str, process_wall_s: float) -> dict:
  """The end-to-end record: the run's stages, and the isolated step time."""
  config = config_for(config_name)
  timing = run["timing"]
  steps = config.data.num_tasks * config.train.steps_per_task
  stages = {s: timing.get(s, 0.0) for s in STAGES}
  train_s = stages["train_s"]
  return {
      "benchmark": "end_to_end", "config": f"configs/default.py:{config_name}",
      "wall_s": run["wall_s"], "process_wall_s": process_wall_s, **stages,
      "other_s": run["wall_s"] - sum(stages.values()),
      "isolated_compile_s": step["compile_s"], "steps": steps, "batch_size": config.train.batch_size, "step_s": step["step_s"],
      "pairs_per_s": config.train.batch_size * steps / train_s if train_s > 0 else None,
      "devices": run["devices"], "peak_rss_mb": run["peak_rss_mb"],
      "load_average": harness.load_average(),
  }


TABLE_COLUMNS = (
    ("config", "config"), ("wall_s", "wall s"), ("data_s", "data s"),
    ("compile_s", "compile s"), ("train_s", "train s (steps)"),
    ("snapshot_s", "snapshot s"), ("embed_s", "embed s"), ("index_s", "index s"), ("evaluate_s", "evaluate s"),
    ("report_s", "report s"), ("other_s", "other s"), ("steps", "steps"),
    ("pairs_per_s", "pairs/s in train"), ("step_ms", "step ms (isolated)"),
    ("peak_rss_mb", "peak RSS MB"),
)

NOTES = """
wall s = `loop.train_and_evaluate` (process_wall_s in the JSON adds the
interpreter and imports); the stages are the run's own timing.json. compile s:
the train step's one ahead-of-time `lower().compile()`; train s: the steps.
pairs/s in train = batch × steps / train s (Orbax state checkpoints,
optimizer-state creation per task and logging syncs included); step ms
(isolated): the same step timed alone in the compile worker, host batch
assembly included, at another moment (under another background load on a
shared machine). snapshot s: the per-task Orbax parameter snapshots. other s
= wall − the stages.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  config_name = "default" if mode == "full" else "tiny"
  steps = FLAGS.steps or {"full": 20, "quick": 10, "smoke": 3}[mode]
  if FLAGS.worker == "run":
    harness.emit(run_experiment(config_name, FLAGS.workdir))
    return
  if FLAGS.worker == "compile":
    harness.emit(time_train_step(config_name, FLAGS.workdir, steps))
    return

  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="end_to_end_")
  common = [f"--quick={FLAGS.quick}", f"--smoke={FLAGS.smoke}", f"--workdir={workdir}",
            f"--steps={steps}"]
  try:
    start = time.perf_counter()
    (run,) = harness.run_worker(MODULE, ["--worker=run", *common], host_devices=1)
    process_wall_s = time.perf_counter() - start
    (step,) = harness.run_worker(MODULE, ["--worker=compile", *common], host_devices=1)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  record = {**combine(run, step, config_name, process_wall_s), "mode": mode}
  if FLAGS.workdir:
    record["workdir"] = FLAGS.workdir
  harness.emit(record)
  harness.publish("end_to_end", [record],
                  harness.markdown_table([{**record, "step_ms": 1e3 * record["step_s"]}],
                                         TABLE_COLUMNS),
                  module=MODULE, mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_string("workdir", "", "Where the experiment writes (must be empty or "
                      "new; kept). Empty: a temp dir, deleted afterwards.")
  flags.DEFINE_integer("steps", 0, "Steps timed in the compile worker (0: 20 full, "
                       "10 quick, 3 smoke).")
  flags.DEFINE_enum("worker", "", ["", "run", "compile"], "Internal.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
