r"""Entry point: train and evaluate a continual retrieval experiment, or re-evaluate one.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default
  python -m ccr_jax.main --mode=evaluate --workdir=/tmp/ccr_default

Override any config value with --config.<section>.<field>=<value>, e.g.
--config.strategy.name=joint. Rerunning a training command resumes it.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ccr_jax import analysis
from ccr_jax import checkpoints
from ccr_jax import experiment
from ccr_jax import indexing

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for snapshots, indices and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                  "train: run or resume the experiment; evaluate: recompute results "
                  "from the workdir's snapshots and indices, plus the forgetting "
                  "analysis (compatibility, towers, drift, partial reindexing).")
flags.mark_flags_as_required(["workdir"])

# Mistakes a user can fix from the message alone: reported without a traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, checkpoints.CheckpointError,
                   indexing.IndexMismatchError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    if FLAGS.mode == "train":
      if FLAGS.config is None:
        raise ValueError("--config is required with --mode=train "
                         "(e.g. --config=configs/default.py).")
      results = experiment.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      name = "results"
    else:
      # With --config, only its `analysis` section is used (budgets, policies):
      # everything else comes from the workdir's own config.json.
      results = analysis.evaluate_workdir(
          FLAGS.workdir, FLAGS.config.get("analysis") if FLAGS.config else None)
      name = "evaluate"
  except EXPECTED_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = os.path.join(FLAGS.workdir, "results", f"{name}.md")
  print(f"wrote {out}")
  for regime, scopes in results["summary"].items():
    s = scopes["task_aware"]
    print(f"{regime:8s} task-aware final average R@1: i2t "
          f"{s['i2t_r1']['final_average']:.1f}  t2i {s['t2i_r1']['final_average']:.1f}")


if __name__ == "__main__":
  app.run(main)
