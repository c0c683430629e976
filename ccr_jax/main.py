r"""Entry point: train and evaluate a continual retrieval experiment, or re-evaluate one.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default
  python -m ccr_jax.main --mode=evaluate --workdir=/tmp/ccr_default
  python -m ccr_jax.main --mode=report --workdir=/tmp/ccr_default [--workdir=/tmp/other ...]
  python -m ccr_jax.main --mode=config --config=configs/default.py [--config.a.b=v]

Override any config value with --config.<section>.<field>=<value>, e.g.
--config.strategy.name=<a strategy in docs/strategies.md>; --mode=config
prints every key with its value, meaning and default. Rerunning a training
command resumes it; Ctrl-C (or SIGTERM) saves the state at the next step and
exits 130 (143). Orbax and TFDS log only warnings unless --verbosity=1.

Multi-process runs start this same command in every process (launch/ has
launchers for local CPU processes, TPU VM pods and SLURM); under SLURM, Open
MPI and GKE TPU pods the processes find each other on their own, otherwise
pass --coordinator_address=<host:port of process 0> --num_processes=N
--process_id=i (or --distributed=on where JAX detects the rest, e.g. a TPU VM pod).
"""

import logging as logging_std
import os
import signal
import sys
from collections.abc import Callable

from absl import app
from absl import flags
import tensorflow_datasets as tfds
from absl import logging
from ml_collections import config_flags

from ccr_jax import checkpoints
from ccr_jax import files
from ccr_jax import indexing
from ccr_jax import reporting
from ccr_jax import schema
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.run import config as config_lib
from ccr_jax.run import evaluate as evaluate_lib
from ccr_jax.run import loop
from ccr_jax.run import results as results_lib
from ccr_jax.run import workdir as workdir_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file; override keys with "
    "--config.<section>.<key>=<value>. Every key, its meaning and default: "
    "--mode=config, or the schema in ccr_jax/run/config.py and the registries "
    "it names (docs/ lists them per topic).", lock_config=True)
flags.DEFINE_multi_string("workdir", None, "Directory for snapshots, indices and "
                          "results (--mode=report: repeat the flag for several).")
flags.DEFINE_string("report_dir", None, "--mode=report: where report.md and its "
                    "plots go (default: <workdir>/results for one workdir; "
                    "required for several).")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "report", "config"],
                  "train: run or resume the experiment; evaluate: recompute results "
                  "from the workdir's snapshots and indices, plus the forgetting "
                  "analysis (compatibility, towers, drift, partial reindexing); "
                  "report: write report.md with every table and plot of one or "
                  "more workdirs; config: print the resolved config with each "
                  "key's meaning and default, and exit.")
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

# Mistakes a user can fix from the message alone: reported without a traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError,
                   checkpoints.CheckpointError, indexing.IndexMismatchError,
                   workdir_lib.WorkdirBusyError)
# Libraries whose INFO lines (Orbax: ~55 per checkpoint) bury ours.
QUIET_PACKAGES = ("orbax", "tensorflow_datasets", "etils", "jax")
# Their warnings that are advice, not a problem of the run.
QUIET_WARNINGS = ("OpenCV is not installed", "Using custom data configuration",
                  # Orbax, on every read-only open of a snapshot (resume, evaluate).
                  "Given directory is read only")
# Shell convention for a process ended by a signal: 128 + its number.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _QuietLibraries(logging_std.Filter):
  """Drops INFO and below from QUIET_PACKAGES; their warnings still show, but
  for TFDS's advice (QUIET_WARNINGS) and for what their threads log about a
  full or read-only device, which the run reports in one line as it stops."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if _storage_failure(record):
      return False
    if not any(f"/{p}/" in path for p in QUIET_PACKAGES):
      return True
    return (record.levelno >= logging_std.WARNING
            and not any(s in record.getMessage() for s in QUIET_WARNINGS))


def _storage_failure(record: logging_std.LogRecord) -> bool:
  # Orbax's writer threads log each failed write; asyncio logs the tasks
  # whose failure nobody awaited (Orbax's, after the run stopped).
  error = record.exc_info[1] if record.exc_info else None
  text = record.getMessage()
  return (("_SignalingThread" in text and files.names_storage_failure(text))
          or (error is not None and files.storage_error(error, ".") is not None
              and "never retrieved" in text))


def _quiet_orbax_shutdown() -> None:
  """TensorStore's write callbacks of a save Orbax gave up on (a full disk)
  land on Orbax's closed event loop and print a traceback each; they say
  nothing about the run, which reports the full disk in one line."""
  default = sys.unraisablehook

  def hook(args):
    if not (isinstance(args.exc_value, RuntimeError)
            and str(args.exc_value) == "Event loop is closed"):
      default(args)

  sys.unraisablehook = hook


class _ShortFormat(logging_std.Formatter):
  """`21:10:32 task 1  step 2/4 ...`: time and message; the level only when it
  is not INFO (absl's default prefix, thread id and source line, returns with
  --verbosity=1)."""

  def format(self, record: logging_std.LogRecord) -> str:
    level = "" if record.levelno == logging_std.INFO else f"{record.levelname.lower()}: "
    return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"


def _stop_on_signals() -> Callable[[], int | None]:
  """Installs SIGINT/SIGTERM handlers; returns what was received (or None).

  The first signal only sets the flag that training polls between steps (the
  state is saved there); a second one interrupts at once.
  """
  received: list[int] = []

  def handler(signum, frame):
    del frame
    if received:
      raise KeyboardInterrupt
    received.append(signum)
    print(f"\n{signal.Signals(signum).name}: stopping at the next step boundary "
          "after saving the state (send it again to stop at once)", file=sys.stderr)

  for signum in EXIT_CODES:
    signal.signal(signum, handler)
  return lambda: received[0] if received else None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  if FLAGS.verbosity <= 0:
    handler = logging.get_absl_handler()
    handler.addFilter(_QuietLibraries())
    handler.setFormatter(_ShortFormat())
    tfds.disable_progress_bar()  # Its per-split bars, a screenful per build.
    _quiet_orbax_shutdown()
  if FLAGS.mode == "config":
    _require_config()
    print(config_lib.describe_config(FLAGS.config))
    return
  workdirs = FLAGS.workdir or []
  if not workdirs:
    _fail("--workdir is required.")
  if FLAGS.mode != "report" and len(workdirs) > 1:
    _fail(f"--mode={FLAGS.mode} takes one --workdir, not {len(workdirs)}.")
  workdir = workdirs[0]
  received = _stop_on_signals()
  # Before anything touches a device: JAX must know every process first.
  sharding.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                  FLAGS.num_processes, FLAGS.process_id)
  try:
    if FLAGS.mode == "report":
      if sharding.is_lead_process():  # Reading and plotting needs no devices.
        print(f"wrote {_report(workdirs, FLAGS.report_dir)}")
      return
    if FLAGS.mode == "train":
      _require_config()
      results = loop.train_and_evaluate(FLAGS.config, workdir,
                                        should_stop=lambda: received() is not None,
                                        argv=sys.argv)
    else:
      # With --config, only its `analysis` section is used (budgets, policies):
      # everything else comes from the workdir's own config.json.
      _only_analysis_overrides(sys.argv)
      with workdir_lib.locked(workdir):  # It writes results/evaluate.*.
        results = evaluate_lib.evaluate_workdir(
            workdir, FLAGS.config.analysis if FLAGS.config and "analysis" in FLAGS.config
            else None)  # evaluate_workdir completes the section it is given.
  except train_lib.Interrupted as e:
    signum = received() or signal.SIGINT
    where = (f"stopped before {e.stage}, every earlier stage is on disk" if e.stage
             else f"state saved at task {e.task} step {e.step} in {workdir}/state"
             if e.saved else "nothing to save since the last checkpoint")
    print(f"interrupted by {signal.Signals(signum).name}: {where}; rerun the same "
          "command to resume.", file=sys.stderr)
    sys.exit(EXIT_CODES[signum])
  except KeyboardInterrupt:
    signum = received() or signal.SIGINT
    print(f"interrupted by {signal.Signals(signum).name}: rerun the same command "
          "to resume from the last checkpoint.", file=sys.stderr)
    sys.exit(EXIT_CODES[signum])
  except files.StorageError as e:
    _fail_storage(e)
  except EXPECTED_ERRORS as e:
    _fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    failure = files.storage_error(e, getattr(e, "filename", None) or workdir)
    if failure is None:
      raise
    _fail_storage(failure)
  if sharding.is_lead_process():  # Process 0 prints the summary.
    print(results_lib.console_summary(results, workdir, FLAGS.mode))
    if received() is not None:
      print(f"{signal.Signals(received()).name} came as the last results were "
            "written: the run is complete.", file=sys.stderr)


def _only_analysis_overrides(argv: list[str]) -> None:
  """--mode=evaluate recomputes from the workdir's config.json: an override
  of any other section would be ignored, so it is refused."""
  ignored = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")
             and not a.startswith("--config.analysis.")]
  if ignored:
    _fail(f"--mode=evaluate evaluates the workdir's snapshots with the config they "
          f"were trained with (its config.json); only --config.analysis.* applies. "
          f"Drop {', '.join(ignored)}, or train a new --workdir with it.")


def _require_config() -> None:
  if FLAGS.config is None:
    _fail(f"--config is required with --mode={FLAGS.mode} "
          "(e.g. --config=configs/default.py).")


def _fail_storage(error: files.StorageError) -> None:
  """Exits 2 with `error`'s one line and without the interpreter's shutdown:
  the writers still pending at a full or read-only device (Orbax's
  TensorStore callbacks, TensorBoard's thread) would each print a traceback
  there. Every file of the run is written atomically, and the workdir's lock
  is an flock the OS releases, so nothing is lost by skipping it."""
  print(f"error: {error}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)  # pylint: disable=protected-access


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _report(workdirs: list[str], report_dir: str | None) -> str:
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
  argv = [_json_config(a) for a in argv]
  try:
    rest = FLAGS(argv)
  except SystemExit as e:
    # absl exits 1 after printing --help; asking for help is not a failure.
    if e.code == 1 and any(a.lstrip("-") in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:  # A value of the wrong type, a missing flag.
    message = str(e)
    if "Error whilst parsing config file" in message:
      # The config's own error (a variant that does not exist) is the last
      # line of the traceback that ml_collections puts in the message.
      _config_failure(argv, message.strip().splitlines()[-1])
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError):
    _unknown_override(argv)
    raise
  except Exception as e:  # pylint: disable=broad-except  (a config file can raise anything)
    _config_failure(argv, _root_message(e))
  if FLAGS["config"].present:
    try:
      # ml_collections defers a missing file's error to the first read.
      FLAGS.config.keys()
    except Exception as e:  # pylint: disable=broad-except
      _config_failure(argv, _root_message(e))
  return rest


HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")
# Where a --config=<file>.json is read (ml_collections loads Python files).
JSON_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "from_json.py")


def _json_config(arg: str) -> str:
  if arg.startswith("--config=") and arg.endswith(".json"):
    return f"--config={JSON_CONFIG}:{arg[len('--config='):]}"
  return arg


def _root_message(error: BaseException) -> str:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def _config_failure(argv: list[str], reason: str) -> None:
  """Exits 2 with one line: the --config that does not load and why."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  if spec.startswith(JSON_CONFIG + ":"):
    spec = spec[len(JSON_CONFIG) + 1:]
  path = spec if spec.endswith(".json") else spec.split(":", 1)[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    near = (sorted(n for n in os.listdir(folder) if n.endswith(".py"))
            if os.path.isdir(folder) else [])
    reason = f"no file {path}" + (f" (Python files there: {', '.join(near)})"
                                  if near else "")
  print(f"error: --config={spec} does not load: {reason.rstrip('.')}. Configs: configs/*.py "
        "(variants after a colon, e.g. configs/default.py:tiny).", file=sys.stderr)
  sys.exit(2)


def _unknown_override(argv: list[str]) -> None:
  """Exits 2 naming each --config.<key> that is not a key (and the nearest);
  returns when every key exists (the error was another)."""
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
               if a.startswith("--config.")]
  valid = config_lib.valid_config_keys()
  unknown = [k for k in overrides if k not in valid]
  if unknown:
    print("error: " + "; ".join(
        f"--config.{k} is not a config key.{schema.nearest_key_hint(k, valid)}"
        for k in unknown), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
