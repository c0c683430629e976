r"""N CPU processes on this machine, joined by JAX's distributed runtime (gloo).

  python -m launch.local --num_processes=2 -- \
      --config=configs/default.py:tiny --workdir=/tmp/ccr_mp
  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      --config=configs/default.py --workdir=/tmp/ccr_mp4 --config.mesh.model_axis_size=2

Everything after `--` goes to every process's `python -m ccr_jax.main`
(`--module` picks another absl entry point taking the same three flags), and
each process also gets --coordinator_address=127.0.0.1:<port>
--num_processes=N --process_id=i. Processes run on the CPU
(JAX_PLATFORMS=cpu) with `--devices_per_process` host devices each
(XLA_FLAGS=--xla_force_host_platform_device_count); their cross-process
collectives use gloo, JAX's default CPU implementation. Every process writes
to this terminal; process 0 writes the run's files. If one process fails,
the others are stopped and its exit code is returned.

This is how the multi-host code paths are exercised without a pod: the same
data split, global batch, Orbax saves and evaluation run as on N hosts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_processes", 2, "Processes to start.")
flags.DEFINE_integer("devices_per_process", 1, "CPU devices each process sees.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")
flags.DEFINE_string("module", "ccr_jax.main", "Entry point run by every process.")


def free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_commands(args: list[str], num_processes: int, devices_per_process: int,
                     port: int, module: str = "ccr_jax.main"
                     ) -> list[tuple[list[str], dict[str, str]]]:
  """(argv, environment) of every process, process 0 first."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(
      xla_flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return [([sys.executable, "-m", module, *args,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}", f"--process_id={i}"], env)
          for i in range(num_processes)]


def run(commands: list[tuple[list[str], dict[str, str]]]) -> int:
  """Starts every command, waits for all; stops the rest when one fails.

  Returns 0, or the first non-zero exit code seen.
  """
  procs = [subprocess.Popen(argv, env=env) for argv, env in commands]
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        code = failed[0]
        break
      time.sleep(0.2)
  finally:
    # A process waiting on a dead peer would otherwise sit out JAX's
    # heartbeat timeout; on Ctrl-C or a failure, stop every one we started.
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  return code or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> None:
  args = argv[1:]
  port = FLAGS.port or free_port()
  sys.exit(run(process_commands(args, FLAGS.num_processes,
                                FLAGS.devices_per_process, port, FLAGS.module)))


if __name__ == "__main__":
  app.run(main)
