r"""A grid of config overrides x seeds, one workdir per run, run here or on a cluster.

  python -m launch.sweep --config=configs/default.py --root=/tmp/ccr_sweep \
      --grid=strategy.name=finetune,ewc --seeds=0,1,2 --parallel=2

runs the 6 experiments `python -m ccr_jax.main --config=configs/default.py
--workdir=/tmp/ccr_sweep/strategy.name-ewc__seed-1 --config.strategy.name=ewc
--config.seed=1` (and so on), 2 at a time, each logging to
<root>/logs/<name>.log, then writes one report over every finished run
(`python -m ccr_jax.main --mode=report --workdir=<w1> --workdir=<w2> ...
--report_dir=<root>/report`). A run is named by what varies (its grid values
and seed, in flag order); `--overrides=key=value` (repeated) is applied to
every run and is not part of the names.

A run whose workdir holds results/results.json is skipped, and rerunning a
training command resumes it, so rerunning the same sweep continues an
interrupted one. Ctrl-C (or SIGTERM) sends each running run one SIGTERM, on
which it saves its state at its next step, and waits for them (Ctrl-C again:
kill them now). <root>/sweep.json lists the grid, the seeds and every run
(name, workdir, log, overrides, command; in local mode also its status).

--mode picks where the runs go:
  local  subprocesses on this machine, --parallel at once (default 1); a run
         that fails does not stop the others; the exit code is 1 if any failed.
  slurm  writes <root>/sweep.sbatch, a job array (index i = sweep.json's
         runs[i]) whose tasks start runs as launch/slurm.sbatch does, and
         prints the sbatch command (--parallel N: at most N tasks at once).
  tpu    prints one `python -m launch.tpu_pod ... -- <run>` per run.
  print  prints the training and report commands; writes nothing.
Everything after `--` goes to the launcher: sbatch's options in slurm mode
(`-- --gpus-per-node=8 --ntasks-per-node=8`), launch.tpu_pod's flags in tpu
mode (`-- --tpu=my-v4-32 --zone=us-central2-b`, both required). docs/sweeps.md
has the walkthrough.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

from absl import app
from absl import flags

from ccr_jax import files
from ccr_jax import schema
from ccr_jax.run import config as config_lib
from ccr_jax.run import workdir as workdir_lib

MODES = ("local", "slurm", "tpu", "print")
# Characters kept in run names; any other run of characters becomes one '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
# Below the 255 bytes most filesystems allow per path component, with room
# for the '.log' suffix and the temporary files written beside it.
MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Run:
  """One experiment of a sweep.

  Attributes:
    name: directory name of its workdir, from `settings`.
    settings: (key, value) of what varies between runs (grid keys in flag
      order, then 'seed'); these name the run.
    overrides: every (key, value) given as --config.<key>=<value>: the fixed
      overrides first, then `settings`.
  """
  name: str
  settings: tuple[tuple[str, str], ...]
  overrides: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a run ended in local mode: status is 'ok', 'failed' or 'skipped'."""
  name: str
  status: str
  log: str
  returncode: int | None = None
  seconds: float = 0.0


# --- Parsing and validation -------------------------------------------------


def split_values(text: str) -> list[str]:
  """Splits 'a,b,c' on the commas outside brackets.

  '(1,5),(1,10)' -> ['(1,5)', '(1,10)'], so tuple- and list-valued keys
  (eval.ks, data.task_categories) can be swept.

  Raises:
    ValueError: unbalanced brackets.
  """
  values, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced brackets in {text!r}")
    elif c == "," and depth == 0:
      values.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"unbalanced brackets in {text!r}")
  return values + [text[start:]]


def _assignment(entry: str, flag: str) -> tuple[str, str]:
  key, sep, value = entry.partition("=")
  key = key.strip().removeprefix("config.")
  if not sep or not key:
    raise ValueError(f"--{flag}={entry} is not key=value (e.g. "
                     f"--{flag}=strategy.name=ewc).")
  return key, value


def parse_grid(entries: Sequence[str]) -> dict[str, list[str]]:
  """{key: [values]} from --grid entries 'key=v1,v2,...', in the order given.

  Raises:
    ValueError: an entry without '=' or values, a key given twice, or a value
      repeated within a key (two runs would share a workdir).
  """
  grid: dict[str, list[str]] = {}
  for entry in entries:
    key, text = _assignment(entry, "grid")
    values = [v.strip() for v in split_values(text)]
    if not text or "" in values:
      raise ValueError(f"--grid={entry}: an empty value; give key=v1,v2,...")
    if key in grid:
      raise ValueError(f"--grid key '{key}' is given twice; list all its "
                       "values in one --grid.")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
      raise ValueError(f"--grid={entry}: values {repeated} are repeated.")
    grid[key] = values
  return grid


def parse_overrides(entries: Sequence[str]) -> dict[str, str]:
  """{key: value} from --overrides entries 'key=value' (the value may hold commas).

  Raises:
    ValueError: an entry without '=', or a key given twice.
  """
  overrides: dict[str, str] = {}
  for entry in entries:
    key, value = _assignment(entry, "overrides")
    if key in overrides:
      raise ValueError(f"--overrides key '{key}' is given twice.")
    overrides[key] = value
  return overrides


def parse_seeds(entries: Sequence[str]) -> list[int]:
  """The --seeds list as integers, in the order given.

  Raises:
    ValueError: a seed that is not an integer, or one given twice.
  """
  try:
    seeds = [int(s) for s in entries if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds={','.join(entries)}: seeds are integers, "
                     "e.g. --seeds=0,1,2.") from None
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={','.join(entries)}: a seed is repeated.")
  return seeds


def check_keys(grid: dict[str, list[str]], seeds: Sequence[int],
               overrides: dict[str, str], valid: Sequence[str]) -> None:
  """Checks every key against the config schema before any run starts.

  Args:
    grid, seeds, overrides: as `expand` takes them.
    valid: every dotted config key (`ccr_jax.run.config.valid_config_keys()`).

  Raises:
    ValueError: one line naming each unknown key and the nearest valid one,
      or a key set twice (in both --grid and --overrides, or 'seed' there as
      well as in --seeds).
  """
  valid = list(valid)
  # Mappings the datasets read (data.categories.<task>) hold keys of their own.
  free_form = tuple(k + "." for k in config_lib.FREE_FORM)
  unknown = [f"--{flag} key '{key}' is not a config key."
             f"{schema.nearest_key_hint(key, valid)}"
             for flag, keys in (("grid", grid), ("overrides", overrides))
             for key in keys if key not in valid and not key.startswith(free_form)]
  if unknown:
    raise ValueError("; ".join(unknown))
  both = sorted(set(grid) & set(overrides))
  if both:
    raise ValueError(f"{both} set by both --grid and --overrides; keep one.")
  if seeds and ("seed" in grid or "seed" in overrides):
    raise ValueError("'seed' is set by --seeds and by --grid/--overrides; keep "
                     "--seeds.")


# --- Expansion and naming ---------------------------------------------------


def run_name(settings: Sequence[tuple[str, str]]) -> str:
  """The directory name of a run: 'strategy.name-ewc__seed-1'.

  Key and value are joined by '-', settings by '__', with no ',' or '=' (the
  report's --workdir used to be comma-separated) and no '/'. Characters other
  than letters, digits and '._+-' become '_'. A name over MAX_NAME characters
  is cut and ends in a hash of the full one, so it stays unique.
  """
  def clean(value: str) -> str:
    return _UNSAFE.sub("_", value).strip("_") or "empty"

  name = "__".join(f"{key}-{clean(value)}" for key, value in settings) or "run"
  if len(name) > MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    name = f"{name[:MAX_NAME - 12]}__{digest}"
  return name


def expand(grid: dict[str, list[str]], seeds: Sequence[int],
           overrides: dict[str, str]) -> list[Run]:
  """Every run of the grid x seeds, in a fixed order.

  Seeds vary slowest, so the first runs cover every setting once (an
  interrupted sweep already compares every setting); within a seed the last
  grid key varies fastest, as itertools.product does. No seeds: each run
  keeps the config's own seed, and names do not mention it.

  Args:
    grid: {key: [values]}, keys in the order they name runs.
    seeds: values of the `seed` config key; empty for the config's.
    overrides: {key: value} applied to every run.

  Raises:
    ValueError: two runs whose names coincide once cleaned (values differing
      only in characters a name cannot hold).
  """
  combos: list[list[tuple[str, str]]] = [[]]
  for key, values in grid.items():
    combos = [c + [(key, v)] for c in combos for v in values]
  seed_settings = [[("seed", str(s))] for s in seeds] or [[]]
  runs = []
  for seed in seed_settings:
    for combo in combos:
      settings = tuple(combo + seed)
      runs.append(Run(run_name(settings), settings,
                      tuple(overrides.items()) + settings))
  names: dict[str, Run] = {}
  for run in runs:
    if run.name in names:
      raise ValueError(f"runs {dict(names[run.name].settings)} and "
                       f"{dict(run.settings)} would share the workdir name "
                       f"'{run.name}'; spell one value differently.")
    names[run.name] = run
  return runs


def run_workdir(root: str, run: Run) -> str:
  """<root>/<name>: the run's workdir."""
  return os.path.join(root, run.name)


def run_log(root: str, run: Run) -> str:
  """<root>/logs/<name>.log: the run's stdout and stderr, appended to on reruns."""
  return os.path.join(root, "logs", run.name + ".log")


def finished(workdir: str) -> bool:
  """Whether the run in `workdir` is done: results/results.json exists.

  The training loop writes it atomically as its last step, so its presence
  means every task was trained and evaluated.
  """
  return os.path.isfile(os.path.join(workdir, "results", "results.json"))


def train_args(config: str, root: str, run: Run) -> list[str]:
  """The arguments of `python -m ccr_jax.main` that train (or resume) a run."""
  return [f"--config={config}", f"--workdir={run_workdir(root, run)}",
          *(f"--config.{k}={v}" for k, v in run.overrides)]


def report_args(workdirs: Sequence[str], report_dir: str) -> list[str]:
  """The arguments of `python -m ccr_jax.main` that report over several workdirs."""
  return ["--mode=report", *(f"--workdir={w}" for w in workdirs),
          f"--report_dir={report_dir}"]


def shell_command(args: Sequence[str], module: str = "ccr_jax.main") -> str:
  """`python -m <module> <args>`, quoted for a POSIX shell."""
  return shlex.join(["python", "-m", module, *args])


def sweep_record(config: str, root: str, grid: dict[str, list[str]],
                 seeds: Sequence[int], overrides: dict[str, str], runs: Sequence[Run],
                 mode: str, outcomes: dict[str, Outcome] | None = None,
                 earlier: Sequence[dict] = ()) -> dict:
  """sweep.json's content: the sweep's inputs and every run (runs[i] is array
  index i); `earlier`: sweep.json records of runs an earlier sweep with
  another grid put in the same root, kept (as "earlier_runs") and reported."""
  outcomes = outcomes or {}
  records = []
  for run in runs:
    args = train_args(config, root, run)
    record = {"name": run.name, "workdir": run_workdir(root, run),
              "log": run_log(root, run), "settings": dict(run.settings),
              "overrides": dict(run.overrides), "args": args,
              "command": shell_command(args)}
    if run.name in outcomes:
      record["status"] = outcomes[run.name].status
      record["returncode"] = outcomes[run.name].returncode
    records.append(record)
  workdirs = [run_workdir(root, r) for r in runs] + [r["workdir"] for r in earlier]
  return {"config": config, "root": root, "mode": mode, "grid": grid,
          "seeds": list(seeds), "overrides": overrides, "runs": records,
          "earlier_runs": list(earlier),
          "report_command": shell_command(
              report_args(workdirs, os.path.join(root, "report")))}


def check_previous(previous: dict, current: dict) -> None:
  """Refuses a sweep whose runs would reuse workdirs of other settings.

  A finished run is skipped by name alone, so a rerun with another --config
  or other --overrides (which do not name runs) would silently keep the old
  results. Runs that are new (an added seed or grid value) are fine.

  Args:
    previous: the sweep.json already in the root.
    current: `sweep_record` of the sweep about to start.

  Raises:
    ValueError: naming the first run whose settings differ, and how.
  """
  old_runs = {r["name"]: r for r in previous.get("runs", [])}
  for run in current["runs"]:
    old = old_runs.get(run["name"])
    if old is None:
      continue
    if previous.get("config") != current["config"]:
      diff = f"--config {previous.get('config')} then {current['config']}"
    elif old["overrides"] != run["overrides"]:
      keys = sorted(k for k in set(old["overrides"]) | set(run["overrides"])
                    if old["overrides"].get(k) != run["overrides"].get(k))
      diff = "overrides differing in " + ", ".join(keys)
    else:
      continue
    raise ValueError(f"{current['root']} already holds run {run['name']} with "
                     f"other settings ({diff}); use a new --root, or the "
                     "previous flags to continue that sweep.")


# --- Launchers --------------------------------------------------------------


def index_ranges(indices: Iterable[int]) -> str:
  """SLURM's --array syntax for sorted indices: [0, 1, 2, 5] -> '0-2,5'."""
  parts: list[str] = []
  for i in sorted(indices):
    if parts and parts[-1][1] == i - 1:
      parts[-1] = (parts[-1][0], i)
    else:
      parts.append((i, i))
  return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def slurm_script(config: str, root: str, runs: Sequence[Run]) -> str:
  """A SLURM job-array script: array index i trains runs[i] via launch/slurm.sbatch.

  The #SBATCH resources are one run's (one node, one GPU); sbatch options on
  the command line override them. Each task skips a finished run, so
  resubmitting the array continues the sweep.
  """
  last = len(runs) - 1
  logs = os.path.join(root, "logs")
  cases = []
  for i, run in enumerate(runs):
    args = " ".join(shlex.quote(a) for a in train_args(config, root, run))
    cases.append(f"  {i}) NAME={shlex.quote(run.name)}\n"
                 f"     WORKDIR={shlex.quote(run_workdir(root, run))}\n"
                 f"     ARGS=({args}) ;;")
  return f"""#!/bin/bash
# The ccr_jax sweep in {root}/sweep.json as a SLURM job array, written by
# launch/sweep.py (rerun it to regenerate): array index i runs sweep.json's
# runs[i]. Submit from the repository root (or set CCR_REPO):
#
#   sbatch --array={index_ranges(range(len(runs)))} {root}/sweep.sbatch
#
# Each task starts its run exactly as launch/slurm.sbatch does (it runs that
# script: srun, one process per task, JAX finding its peers from SLURM's
# variables) and appends the run's output to {logs}/<name>.log. A run whose
# results/results.json exists is skipped; any other resumes, so resubmitting
# continues the sweep. The resources below are one run's; sbatch options given
# on the command line override them. PYTHON picks the interpreter.
#
#SBATCH --job-name=ccr_sweep
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output={logs}/%x-%A_%a.out

set -euo pipefail
cd "${{CCR_REPO:-${{SLURM_SUBMIT_DIR:-.}}}}"
case "${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch --array}}" in
{chr(10).join(cases)}
  *) echo "sweep.sbatch: no run ${{SLURM_ARRAY_TASK_ID}} (runs 0-{last})" >&2
     exit 2 ;;
esac
if [[ -f "$WORKDIR/results/results.json" ]]; then
  echo "skipped $NAME: $WORKDIR/results/results.json exists"
  exit 0
fi
LOG={shlex.quote(logs)}/"$NAME.log"
mkdir -p "$(dirname "$LOG")"
echo "# $(date -Is) SLURM job ${{SLURM_ARRAY_JOB_ID:-?}}_${{SLURM_ARRAY_TASK_ID}}" \
  >>"$LOG"
exec bash launch/slurm.sbatch "${{ARGS[@]}}" >>"$LOG" 2>&1
"""


def sbatch_command(script: str, pending: Sequence[int], parallel: int,
                   sbatch_args: Sequence[str] = ()) -> list[str]:
  """The sbatch argv submitting the unfinished array indices, at most `parallel`
  at once (0: no limit); `--array` on the command line overrides the script's."""
  array = index_ranges(pending) + (f"%{parallel}" if parallel > 0 else "")
  return ["sbatch", *sbatch_args, f"--array={array}", script]


def tpu_command(config: str, root: str, run: Run, pod_args: Sequence[str]) -> str:
  """`python -m launch.tpu_pod <pod_args> -- <run's args>`: one run on every worker."""
  return shlex.join(["python", "-m", "launch.tpu_pod", *pod_args, "--",
                     *train_args(config, root, run)])


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
  """SIGTERM to every running process, then waits up to `grace` seconds.

  ccr_jax.main saves its training state at the next step on SIGTERM; another
  interrupt (Ctrl-C again) or the end of `grace` kills what is left, which
  then resumes from its last checkpoint.
  """
  running = [p for p in procs if p.poll() is None]
  if not running:
    return
  print(f"\nstopping {len(running)} run(s): each saves its state at its next "
        "step (Ctrl-C again to kill them now)", file=sys.stderr, flush=True)
  for p in running:
    p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  try:
    for p in running:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
  except (subprocess.TimeoutExpired, KeyboardInterrupt):
    for p in running:
      if p.poll() is None:
        p.kill()
    for p in running:
      p.wait()


def _prctl():
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    return ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None  # Not Linux.


# Resolved here, in the sweep: the child runs only this one call between fork
# and exec (no import, no lock), which is what makes preexec_fn safe there.
_PRCTL = _prctl()


def _term_with_parent() -> None:
  """In a run's process before it starts: SIGTERM when the sweep dies, however
  it dies (SIGKILL included, which no handler sees), so that no run goes on
  alone; the run saves its state and a rerun of the sweep resumes it. Off
  Linux a SIGKILLed sweep leaves its runs going."""
  if _PRCTL is not None:
    _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local(jobs: Sequence[tuple[str, list[str], str]], parallel: int,
              on_done: Callable[[Outcome], None] = lambda o: None,
              env: dict[str, str] | None = None, grace: float = 120.0
              ) -> list[Outcome]:
  """Runs commands as subprocesses, `parallel` at a time, each logging to a file.

  A failing command does not stop the others. On an exception (Ctrl-C) every
  running command gets SIGTERM and up to `grace` seconds to save its state
  (`_stop`), then the exception goes on: the runs resume when the sweep is
  rerun.

  Args:
    jobs: (name, argv, log path); logs are appended to.
    parallel: commands at once (at least 1).
    on_done: called with each outcome as its command ends.
    env: the commands' environment (default: this process's).

  Returns:
    The outcomes ('ok' or 'failed'), in the order of `jobs`.
  """
  pending = list(jobs)
  active: dict[str, tuple[subprocess.Popen, object, float, str]] = {}
  outcomes: dict[str, Outcome] = {}
  try:
    while pending or active:
      while pending and len(active) < max(1, parallel):
        name, argv, log = pending.pop(0)
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        log_file = open(log, "a", encoding="utf-8")  # pylint: disable=consider-using-with
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log_file.write(f"# {stamp} {shlex.join(argv)}\n")
        log_file.flush()
        # Its own session: a Ctrl-C at the terminal reaches the sweep only,
        # which then sends each run one SIGTERM (a run's second signal
        # stops it at once, without saving its state).
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True,
                                preexec_fn=_term_with_parent)
        active[name] = (proc, log_file, time.monotonic(), log)
        print(f"started {name}  (log: {log})", flush=True)
      for name in list(active):
        proc, log_file, start, log = active[name]
        if proc.poll() is None:
          continue
        log_file.close()
        del active[name]
        outcome = Outcome(name, "ok" if proc.returncode == 0 else "failed", log,
                          proc.returncode, time.monotonic() - start)
        outcomes[name] = outcome
        print(f"{outcome.status} {name} in {outcome.seconds:.0f} s", flush=True)
        on_done(outcome)
      if active:
        time.sleep(0.2)
  finally:
    if active:
      _stop([proc for proc, _, _, _ in active.values()], grace)
      for _, log_file, _, _ in active.values():
        log_file.close()
  return [outcomes[name] for name, _, _ in jobs]


# --- The sweep --------------------------------------------------------------


def sweep(config: str, root: str, grid_entries: Sequence[str] = (),
          seed_entries: Sequence[str] = (), override_entries: Sequence[str] = (),
          mode: str = "local", parallel: int = 0, launcher_args: Sequence[str] = (),
          python: str = sys.executable) -> int:
  """Expands, records and launches a sweep; what `python -m launch.sweep` does.

  Args:
    config: the --config value of every run ('configs/default.py:tiny').
    root: the sweep's directory (workdirs, logs, sweep.json, report).
    grid_entries, seed_entries, override_entries: the raw --grid, --seeds and
      --overrides values.
    mode: one of MODES.
    parallel: local: runs at once (0 or 1: one); slurm: array tasks at once
      (0: no limit).
    launcher_args: sbatch options (slurm) or launch.tpu_pod flags (tpu).
    python: the interpreter of local runs.

  Returns:
    The exit code: 1 if a local run failed, else 0.

  Raises:
    ValueError: a bad flag value, with a message that says how to fix it.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode}: one of {', '.join(MODES)}.")
  if parallel < 0:
    raise ValueError(f"--parallel={parallel}: 0 or more.")
  grid = parse_grid(grid_entries)
  seeds = parse_seeds(seed_entries)
  overrides = parse_overrides(override_entries)
  check_keys(grid, seeds, overrides, config_lib.valid_config_keys())
  runs = expand(grid, seeds, overrides)
  if launcher_args and mode in ("local", "print"):
    raise ValueError(f"arguments after -- ({shlex.join(launcher_args)}) are for "
                     "--mode=slurm (sbatch options) or --mode=tpu (launch.tpu_pod "
                     "flags); use --overrides for config values.")
  if mode == "tpu" and not all(
      any(a == f"--{f}" or a.startswith(f"--{f}=") for a in launcher_args)
      for f in ("tpu", "zone")):
    raise ValueError("--mode=tpu needs the pod after --, e.g. "
                     "-- --tpu=my-v4-32 --zone=us-central2-b.")
  config_file = config.split(":", 1)[0]
  if mode == "local" and not os.path.isfile(config_file):
    raise ValueError(f"--config={config}: {config_file} is not a file (run from "
                     "the repository root, or give its path).")

  pending = [i for i, r in enumerate(runs) if not finished(run_workdir(root, r))]
  skipped = [r for i, r in enumerate(runs) if i not in pending]

  record_path = os.path.join(root, "sweep.json")
  previous = files.read_json(record_path) if os.path.exists(record_path) else {}
  # Runs of an earlier grid in this root stay in sweep.json and the report.
  names = {r.name for r in runs}
  earlier = [r for r in previous.get("runs", []) + previous.get("earlier_runs", [])
             if r["name"] not in names]

  def record(outcomes: dict[str, Outcome] | None = None) -> dict:
    return sweep_record(config, root, grid, seeds, overrides, runs, mode, outcomes,
                        earlier)

  if previous:
    check_previous(previous, record())
  if mode == "print":
    for run in skipped:
      print(f"# skipped (finished): {run.name}")
    for i in pending:
      print(shell_command(train_args(config, root, runs[i])))
    print(record()["report_command"])
    return 0
  outcomes = {r.name: Outcome(r.name, "skipped", run_log(root, r)) for r in skipped}
  files.write_json(record_path, record(outcomes if mode == "local" else None))
  print(f"{len(runs)} runs ({len(skipped)} finished) in {record_path}")
  if mode == "tpu":
    for run in skipped:
      print(f"# skipped (finished): {run.name}")
    # One at a time: each command takes every worker of the pod.
    for i in pending:
      print(tpu_command(config, root, runs[i], launcher_args))
    print(f"# then, where the workdirs are readable:\n{record()['report_command']}")
    return 0
  if mode == "slurm":
    script = os.path.join(root, "sweep.sbatch")
    files.write_atomic(script, slurm_script(config, root, runs))
    os.chmod(script, 0o755)
    # SLURM opens --output before the script runs: the folder must exist.
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    print(f"wrote {script}")
    if pending:
      print(shlex.join(sbatch_command(script, pending, parallel, launcher_args)))
    else:
      print("every run is finished; nothing to submit.")
    print(f"# then:\n{record()['report_command']}")
    return 0

  def done(outcome: Outcome) -> None:
    # sweep.json is rewritten as each run ends, so it shows progress, even
    # of a sweep killed half-way.
    outcomes[outcome.name] = outcome
    files.write_json(record_path, record(outcomes))

  jobs = [(runs[i].name, [python, "-m", "ccr_jax.main",
                          *train_args(config, root, runs[i])],
           run_log(root, runs[i])) for i in pending]
  _wait_for_earlier_runs([run_workdir(root, runs[i]) for i in pending])
  run_local(jobs, parallel, on_done=done)
  print(f"\nsweep of {len(runs)} runs:")
  for run in runs:
    print(f"{outcomes[run.name].status:8s} {run.name}  {outcomes[run.name].log}")
  workdirs = [run_workdir(root, r) for r in runs] + [r["workdir"] for r in earlier]
  _report(python, [w for w in workdirs if finished(w)], root)
  return 1 if any(o.status == "failed" for o in outcomes.values()) else 0


def _wait_for_earlier_runs(workdirs: Sequence[str], grace: float = 180.0) -> None:
  """Waits while a run of a killed sweep still holds one of `workdirs` (it
  saves its state on the SIGTERM its sweep's death sent), so that the rerun
  resumes it instead of failing on its lock."""
  deadline = time.monotonic() + grace
  told = False
  while time.monotonic() < deadline:
    busy = {w: h for w in workdirs if (h := workdir_lib.lock_holder(w)) is not None}
    if not busy:
      return
    if not told:
      print(f"waiting for {len(busy)} run(s) of an earlier sweep to stop: "
            + "; ".join(f"{w} ({h})" for w, h in busy.items()), flush=True)
      told = True
    time.sleep(1.0)


def _report(python: str, workdirs: list[str], root: str) -> None:
  """Runs the report over the finished workdirs; a failure is only a warning.

  The runs' results are on disk either way, and the report can be rerun alone
  with sweep.json's report_command.
  """
  if not workdirs:
    print("no run finished: no report.")
    return
  report_dir = os.path.join(root, "report")
  log = os.path.join(root, "logs", "report.log")
  os.makedirs(os.path.dirname(log), exist_ok=True)
  argv = [python, "-m", "ccr_jax.main", *report_args(workdirs, report_dir)]
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"# {shlex.join(argv)}\n")
    f.flush()
    code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
  if code:
    print(f"warning: the report failed (exit {code}); see {log}", file=sys.stderr)
  else:
    print(f"report: {os.path.join(report_dir, 'report.md')}")


def define_flags() -> None:
  """The command-line flags.

  Defined by `__main__` only: absl flags are process-wide, and the test suite
  imports this module beside launch.tpu_pod and others that define flags.
  """
  flags.DEFINE_string("config", None, "The --config of every run, passed through "
                      "(e.g. configs/default.py:tiny).")
  flags.DEFINE_multi_string("grid", [], "key=v1,v2,...: one axis of the grid "
                            "(repeat the flag for more); commas inside brackets "
                            "stay in a value.")
  flags.DEFINE_list("seeds", [], "Values of the `seed` config key (empty: the "
                    "config's own seed).")
  flags.DEFINE_multi_string("overrides", [], "key=value applied to every run "
                            "(repeat the flag for more).")
  flags.DEFINE_string("root", None, "The sweep's directory: one workdir per run, "
                      "logs/, sweep.json, report/.")
  flags.DEFINE_enum("mode", "local", list(MODES), "local: run here; slurm: write "
                    "a job array script; tpu: print launch.tpu_pod commands; "
                    "print: print the commands.")
  flags.DEFINE_integer("parallel", 0, "local: runs at once (0: one); slurm: "
                       "array tasks at once (0: no limit).")
  flags.mark_flags_as_required(["config", "root"])


def _interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt


def main(argv: list[str]) -> None:
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  # `kill <sweep>` or a closed terminal stops the runs as Ctrl-C does; the
  # runs are in sessions of their own, so they would otherwise go on alone.
  for signum in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, _interrupt)
  try:
    code = sweep(FLAGS.config, FLAGS.root, FLAGS.grid, FLAGS.seeds, FLAGS.overrides,
                 FLAGS.mode, FLAGS.parallel, argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("\ninterrupted: rerun the same command to continue the sweep.",
          file=sys.stderr)
    sys.exit(130)
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main)
