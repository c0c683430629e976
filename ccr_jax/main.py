r"""Entry point: train and evaluate a continual retrieval experiment, or re-evaluate one.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default
  python -m ccr_jax.main --mode=evaluate --workdir=/tmp/ccr_default
  python -m ccr_jax.main --mode=report --workdir=/tmp/ccr_default[,/tmp/other...]

Override any config value with --config.<section>.<field>=<value>, e.g.
--config.strategy.name=<a strategy in docs/strategies.md>. Rerunning a training command resumes it.

Multi-process runs start this same command in every process (launch/ has
launchers for local CPU processes, TPU VM pods and SLURM); under SLURM, Open
MPI and GKE TPU pods the processes find each other on their own, otherwise
pass --coordinator_address=<host:port of process 0> --num_processes=N
--process_id=i (or --distributed=on where JAX detects the rest, e.g. a TPU VM pod).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ccr_jax import checkpoints
from ccr_jax import indexing
from ccr_jax import reporting
from ccr_jax import schema
from ccr_jax import sharding
from ccr_jax.run import config as config_lib
from ccr_jax.run import evaluate as evaluate_lib
from ccr_jax.run import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for snapshots, indices and results "
                    "(--mode=report: one or more, comma-separated).")
flags.DEFINE_string("report_dir", None, "--mode=report: where report.md and its "
                    "plots go (default: <workdir>/results for one workdir; "
                    "required for several).")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "report"],
                  "train: run or resume the experiment; evaluate: recompute results "
                  "from the workdir's snapshots and indices, plus the forgetting "
                  "analysis (compatibility, towers, drift, partial reindexing); "
                  "report: write report.md with every table and plot of one or "
                  "more workdirs.")
flags.DEFINE_enum("distributed", "auto", list(sharding.DISTRIBUTED_MODES),
                  "Multi-process start-up (jax.distributed.initialize): auto = when "
                  "any of the three flags below is set or SLURM / Open MPI / a GKE "
                  "TPU pod started several processes; on = always (JAX detects "
                  "TPU pods, SLURM and Open MPI); off = one process.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's "
                    "coordinator service, the same for every process.")
flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
flags.DEFINE_integer("process_id", None, "This process's index in "
                     "[0, num_processes).")
flags.mark_flags_as_required(["workdir"])

# Mistakes a user can fix from the message alone: reported without a traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError,
                   checkpoints.CheckpointError, indexing.IndexMismatchError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Before anything touches a device: JAX must know every process first.
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                  FLAGS.num_processes, FLAGS.process_id)
  try:
    if FLAGS.mode == "report":
      if sharding.is_lead_process():  # Reading and plotting needs no devices.
        print(f"wrote {_report(FLAGS.workdir, FLAGS.report_dir)}")
      return
    if FLAGS.mode == "train":
      if FLAGS.config is None:
        raise ValueError("--config is required with --mode=train "
                         "(e.g. --config=configs/default.py).")
      results = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      name = "results"
    else:
      # With --config, only its `analysis` section is used (budgets, policies):
      # everything else comes from the workdir's own config.json.
      results = evaluate_lib.evaluate_workdir(
          FLAGS.workdir, FLAGS.config.get("analysis") if FLAGS.config else None)
      name = "evaluate"
  except EXPECTED_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if not sharding.is_lead_process():
    return  # Process 0 prints the summary.
  out = os.path.join(FLAGS.workdir, "results", f"{name}.md")
  print(f"wrote {out}")
  for regime, scopes in results["summary"].items():
    s = scopes["task_aware"]
    print(f"{regime:8s} task-aware final average R@1: i2t "
          f"{s['i2t_r1']['final_average']:.1f}  t2i {s['t2i_r1']['final_average']:.1f}")


def _report(workdir_flag: str, report_dir: str | None) -> str:
  workdirs = [w for w in workdir_flag.split(",") if w]
  if not workdirs:
    raise ValueError("--workdir names no workdir.")
  if report_dir is None:
    if len(workdirs) > 1:
      raise ValueError("--mode=report with several workdirs needs --report_dir "
                       "(where report.md and its plots go).")
    report_dir = os.path.join(workdirs[0], "results")
  return reporting.report(workdirs, report_dir)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error for an unknown --config.<key>.

  ml_collections raises a bare AttributeError (with a traceback) when an
  override names a key the config does not have; name it and the nearest key.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:  # A value of the wrong type, a missing flag.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError):
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
                 if a.startswith("--config.")]
    valid = config_lib.valid_config_keys()
    unknown = [k for k in overrides if k not in valid]
    if not unknown:
      raise
    print("error: " + "; ".join(
        f"--config.{k} is not a config key.{schema.nearest_key_hint(k, valid)}"
        for k in unknown), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
