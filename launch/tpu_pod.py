r"""One command that starts the same ccr_jax run on every worker of a TPU VM pod.

  python -m launch.tpu_pod --tpu=my-v4-32 --zone=us-central2-b -- \
      --config=configs/secoco.py --workdir=/mnt/shared/ccr_secoco \
      --config.data.manual_dir=/mnt/shared/coco --config.data.data_dir=/mnt/shared/tfds

runs, from this machine,

  gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all \
      --command='cd ~/ccr_jax && python3 -m ccr_jax.main --distributed=on <args>'

so every worker starts `ccr_jax.main` at once; `--distributed=on` makes each
call `jax.distributed.initialize()`, which finds the coordinator, the process
count and this worker's id from the TPU metadata. `--dry_run` prints the
command instead. Prerequisites: the repository checked out at `--repo_dir` with
its requirements installed on every worker, and a workdir (and data_dir) on a
filesystem every worker mounts (NFS / Filestore, or a gcsfuse mount), since
process 0 writes results and indices there and every process reads and
writes Orbax checkpoints.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("tpu", None, "TPU VM (pod slice) name.")
flags.DEFINE_string("zone", None, "Its zone.")
flags.DEFINE_string("project", None, "Its project (default: gcloud's).")
flags.DEFINE_string("repo_dir", "~/ccr_jax", "The repository on every worker.")
flags.DEFINE_string("python", "python3", "The Python on every worker.")
flags.DEFINE_bool("dry_run", False, "Print the gcloud command, run nothing.")
flags.mark_flags_as_required(["tpu", "zone"])


def pod_command(args: list[str], tpu: str, zone: str, project: str | None = None,
                repo_dir: str = "~/ccr_jax", python: str = "python3") -> list[str]:
  """The gcloud argv that runs `python -m ccr_jax.main <args>` on every worker."""
  # `~` must reach the worker's shell unquoted to expand there.
  cd = repo_dir if repo_dir.startswith("~") else shlex.quote(repo_dir)
  remote = (f"cd {cd} && {shlex.quote(python)} -m ccr_jax.main --distributed=on "
            + " ".join(shlex.quote(a) for a in args))
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
          *([f"--project={project}"] if project else []), "--worker=all",
          f"--command={remote}"]


def main(argv: list[str]) -> None:
  cmd = pod_command(argv[1:], FLAGS.tpu, FLAGS.zone, FLAGS.project,
                    FLAGS.repo_dir, FLAGS.python)
  if FLAGS.dry_run:
    print(shlex.join(cmd))
    return
  sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
  app.run(main)
