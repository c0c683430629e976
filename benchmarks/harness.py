"""What every benchmark script shares: timing, peak memory, workers and output.

A script measures, prints one JSON object per measurement on its own line
(`emit`), then a markdown table (`markdown_table`); with `--write_results` it
also writes both to `benchmarks/results/<script>.json` (the JSON lines) and
`.md`. Measurements that need a fresh process (a different host device count,
or a peak-RSS figure of their own) run as worker subprocesses (`run_worker`).

Nothing here imports JAX: a parent process that only starts workers stays
small, and its own memory never leaks into a worker's peak RSS.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def define_common_flags(flags) -> None:
  """--quick, --smoke and --write_results, shared by every script's main."""
  flags.DEFINE_bool("quick", False, "A couple of minutes on 2 CPU cores: smaller "
                    "sizes or fewer repeats (each script says which).")
  flags.DEFINE_bool("smoke", False, "Seconds: the smallest sizes that still run "
                    "every code path (for tests; the numbers mean nothing).")
  flags.DEFINE_bool("write_results", False, "Also write the JSON lines and the "
                    "table to benchmarks/results/<script>.json / .md.")


def run_mode(quick: bool, smoke: bool) -> str:
  """'smoke', 'quick' or 'full' (smoke wins over quick)."""
  return "smoke" if smoke else "quick" if quick else "full"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """(seconds, result) of one call of `fn`; `fn` must block until its work is done."""
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  """Median and every wall time of `repeats` calls of `fn` (which must block).

  The median, not the mean: the machine is shared, and a neighbour's burst
  inflates a few repeats without saying anything about our code.
  """
  times = [timed(fn)[0] for _ in range(max(1, repeats))]
  return statistics.median(times), times


def interleaved_seconds(fns: dict[str, Callable[[], Any]], repeats: int
                        ) -> dict[str, list[float]]:
  """Wall times of `repeats` rounds, each calling every fn of `fns` once, in order.

  Interleaving puts the timings being compared under the same background load
  (the machine is shared), so their per-round ratios are fair even when the
  load changes between rounds.
  """
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(max(1, repeats)):
    for name, fn in fns.items():
      times[name].append(timed(fn)[0])
  return times


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
  """Median of the per-round ratios of two interleaved timings."""
  return statistics.median(n / d for n, d in zip(numerators, denominators))


def peak_rss_mb() -> float:
  """This process's peak resident set size so far, in MiB (Linux: ru_maxrss is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> list[float]:
  """The 1, 5 and 15 minute load averages (what `uptime` prints)."""
  return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine_info() -> dict:
  """nproc, CPU model, memory, package versions and the load average right now."""
  return {
      "nproc": os.cpu_count(),
      "cpu_model": _cpu_model(),
      "mem_total_gib": _mem_total_gib(),
      "python": platform.python_version(),
      "jax": _version("jax"), "jaxlib": _version("jaxlib"),
      "scann": _version("scann"), "numpy": _version("numpy"),
      "load_average": load_average(),
  }


def emit(record: dict) -> None:
  """Prints one measurement as one JSON line (sorted keys, flushed)."""
  print(json.dumps(record, sort_keys=True), flush=True)


def parse_json_lines(text: str) -> list[dict]:
  """Every line of `text` that is a JSON object, parsed; other lines are skipped."""
  records = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith("{") and line.endswith("}"):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _format(value: Any) -> str:
  if value is None:
    return "–"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3e}"
  return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
  """A markdown table of `rows`, one column per (key, header) in `columns`."""
  lines = ["| " + " | ".join(h for _, h in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_format(row.get(k)) for k, _ in columns) + " |")
  return "\n".join(lines)


def worker_env(host_devices: int | None = None) -> dict[str, str]:
  """The environment of a worker: repo on PYTHONPATH, CPU, N host devices.

  The host device count is fixed when JAX starts, hence a subprocess per
  device count (as tests/test_train.py does).
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (REPO, env.get("PYTHONPATH", "")) if p)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if host_devices is not None:
    flag = f"--xla_force_host_platform_device_count={host_devices}"
    env["XLA_FLAGS"] = " ".join(p for p in (env.get("XLA_FLAGS", ""), flag) if p)
  return env


def run_worker(module: str, args: Sequence[str], *, host_devices: int | None = None,
               timeout: float = 3600) -> list[dict]:
  """Runs `python -m module args` in a fresh process; returns its JSON lines.

  Raises:
    RuntimeError: the worker failed; the message carries its stderr's tail.
  """
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=worker_env(host_devices), capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f"worker `{module} {' '.join(args)}` exited with "
                       f"{proc.returncode}:\n{proc.stderr[-4000:]}")
  return parse_json_lines(proc.stdout)


def command_line(module: str) -> str:
  """The command that reproduces this run (module and the flags given)."""
  return " ".join(["python -m", module, *sys.argv[1:]])


def publish(name: str, records: Sequence[dict], table: str, *, module: str,
            mode: str, notes: str = "", write: bool = False) -> None:
  """Prints `table`; with `write` (--write_results) also `write_results` it."""
  print(table)
  if write:
    write_results(name, records, table, command=command_line(module), mode=mode,
                  notes=notes)


def write_results(name: str, records: Sequence[dict], table: str, *, command: str,
                  mode: str, notes: str = "", results_dir: str = RESULTS_DIR) -> None:
  """benchmarks/results/<name>.json (JSON lines) and <name>.md (table + context)."""
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
    for record in records:
      f.write(json.dumps(record, sort_keys=True) + "\n")
  info = machine_info()
  header = [
      f"# {name}", "",
      f"Command (from the repo root): `{command}` (mode: {mode}).", "",
      f"Machine: {info['nproc']} × {info['cpu_model']}, {info['mem_total_gib']} GiB, "
      f"jax {info['jax']}, scann {info['scann']}, numpy {info['numpy']}; load "
      f"average when written {info['load_average']} (a shared machine: other "
      "work ran beside these measurements; see README.md here).", "",
  ]
  with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
    f.write("\n".join(header) + "\n" + table + "\n"
            + (f"\n{notes.strip()}\n" if notes else ""))


def shared_pretraining(cache_dir: str, workdir: str) -> Callable[[], None]:
  """Lets runs that pretrain identically (same data, seed and pretrain
  settings) pretrain once: copies `cache_dir` into `workdir/pretrained` when
  the cache exists (the run then restores it, checked against its vocabulary,
  exactly as a rerun of its own workdir would), and returns a function to
  call after the run that fills the cache from the workdir."""
  import shutil
  target = os.path.join(workdir, "pretrained")
  if os.path.isdir(os.path.join(cache_dir, "snapshots")) and not os.path.exists(target):
    shutil.copytree(cache_dir, target)

  def fill():
    if not os.path.exists(cache_dir) and os.path.isdir(os.path.join(target, "snapshots")):
      shutil.copytree(target, cache_dir + ".tmp", ignore=shutil.ignore_patterns("state"))
      os.replace(cache_dir + ".tmp", cache_dir)

  return fill


def git_commit() -> str:
  """The checkout's short commit hash ('unknown' outside a git checkout)."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def short_tasks(config) -> None:
  """The experiment scripts' shorter tasks: 200 steps at batch 64, no mid-task
  state checkpoints (about half a minute a run of configs/default.py on 2 cores)."""
  config.train.steps_per_task = 200
  config.train.batch_size = 64
  config.train.checkpoint_every = 0
