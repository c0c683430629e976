"""What a researcher sees while training runs: a progress bar and live scalars.

Two outputs, both written by process 0 only:

- A tqdm bar per task on stdout (step, loss of the last log window, pairs/s,
  ETA). Drawn only on a terminal and outside CI, so logs captured to a file or
  a CI transcript hold the absl log lines alone (`log_line` builds them).
- Scalars appended to `<workdir>/logs/scalars.jsonl` (the reference, read back
  with `read_scalars`) and mirrored as TensorBoard event files under
  `<workdir>/logs/tensorboard/` (tensorboardX, no TensorFlow needed), with
  the config as hyperparameters and text (`ScalarWriter.write_config`) and
  the final continual summary as the hyperparameters' metrics
  (`ScalarWriter.write_summary`).

Resuming: a killed run may leave a truncated last JSONL line, and a resumed
run writes again the steps after its last checkpoint. The writer cuts a
truncated tail before appending; `ScalarWriter.resume_at(step)` records that
steps >= `step` are being rewritten, so `read_scalars` keeps only the resumed
run's values there and TensorBoard, which reads the mark as a restart
(SessionLog START, what tensorboardX's `purge_step` writes), hides the killed
run's points from `step` on. A TensorBoard data loader that ignores the mark
shows such a step twice; `read_scalars` stays the reference.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import jax
import tqdm
from absl import logging

from ccr_jax import files

SCALARS_FILE = "scalars.jsonl"


def _is_lead_process() -> bool:
  return jax.process_index() == 0


def _in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def progress_enabled(stream: IO | None = None, force: bool | None = None) -> bool:
  """Whether to draw a progress bar on `stream` (default: sys.stdout).

  Args:
    stream: where the bar would go.
    force: True draws even when `stream` is not a terminal or in CI, False
      never draws, None decides from the terminal and the `CI` variable.
  Returns:
    False on every process but 0, whatever `force` says: one bar per run.
  """
  if not _is_lead_process() or force is False:
    return False
  if force:
    return True
  stream = sys.stdout if stream is None else stream
  isatty = getattr(stream, "isatty", None)
  return bool(isatty is not None and isatty()) and not _in_ci()


def task_progress(task: int, first_step: int, num_steps: int, *,
                  force: bool | None = None, stream: IO | None = None) -> tqdm.tqdm:
  """A bar over steps `first_step .. num_steps` of task `task` (1-based).

  It reads `task 2 step 150/300, loss 3.412, 2,310 pairs/s |###   | 50%
  00:12<00:41`: the numbers first and the bar in the middle, so on a narrow
  terminal the bar shrinks first and tqdm's cut at the terminal width
  (dynamic_ncols) takes the elapsed/ETA field, never the loss or pairs/s.

  Args:
    force: see `progress_enabled`; a bar that is off is a disabled tqdm whose
      methods do nothing, so the training loop calls it unconditionally.
    stream: where to draw (default: sys.stdout, read at call time).
  Returns:
    The bar; the caller advances it with `update(1)` per step, sets the last
    window's numbers with `show_window` and closes it when the task ends.
  """
  stream = sys.stdout if stream is None else stream
  return tqdm.tqdm(
      total=num_steps, initial=first_step, desc=f"task {task}", file=stream,
      disable=not progress_enabled(stream, force), leave=True, dynamic_ncols=True,
      # pairs/s comes from the log window (measured between host syncs) in the
      # postfix; tqdm's own rate counts dispatches, which run ahead of the
      # device, so it is left out. tqdm puts ", " before a non-empty postfix.
      bar_format="{desc} step {n_fmt}/{total_fmt}{postfix} |{bar}| "
                 "{percentage:3.0f}% {elapsed}<{remaining}")


def show_window(bar: tqdm.tqdm, loss: float, pairs_per_s: float) -> None:
  """Puts the last log window's mean loss and throughput on the bar."""
  bar.set_postfix_str(f"loss {loss:.4g}, {pairs_per_s:,.0f} pairs/s", refresh=False)


# Window means that describe the step rather than add up to the loss: the log
# line shows them after the loss and its terms, outside the parentheses.
DIAGNOSTICS = ("grad_norm", "score_std", "learning_rate", "mean_positive",
               "temperature", "bias", "hardest")
# The training loss's own parts (ccr_jax/losses.py extras): listed right after
# "contrastive", before a strategy's terms (lwf_kl, der, compat, ...).
LOSS_PARTS = ("contrastive", "i2t", "t2i", "positive_term", "negative_term")


def format_duration(seconds: float | None) -> str:
  """41 -> "0:41", 3725 -> "1:02:05"; "?" for None, negative or non-finite."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def log_line(task: int, step: int, num_steps: int, terms: Mapping[str, float],
             pairs_per_s: float, eta_s: float | None) -> str:
  """The training log line of one log window, e.g.

  `task 2  step 150/300  loss 3.412 (contrastive 3.4, lwf_kl 0.012)
  grad_norm 1.25  2,310 pairs/s  ETA 0:41` (on one line).

  Args:
    task: 1-based task.
    step: steps of the task done; num_steps: the task's steps.
    terms: the window's mean train-step metrics: "loss" is the total, the
      names in `DIAGNOSTICS` (gradient norm, temperature, ...) follow it, every
      other name is a loss term or part and goes in its parentheses (the
      training loss's `LOSS_PARTS` first, then a strategy's terms by name).
    pairs_per_s: training pairs per second over the window.
    eta_s: seconds left in the task; None leaves the ETA out.
  Raises:
    KeyError: `terms` has no "loss".
  """
  num = lambda v: f"{float(v):.4g}"  # noqa: E731
  parts = [f"task {task}", f"step {step}/{num_steps}"]
  order = {k: i for i, k in enumerate(LOSS_PARTS)}
  names = sorted((k for k in terms if k != "loss" and k not in DIAGNOSTICS),
                 key=lambda k: (order.get(k, len(order)), k))
  inner = ", ".join(f"{k} {num(terms[k])}" for k in names)
  parts.append(f"loss {num(terms['loss'])}" + (f" ({inner})" if inner else ""))
  parts += [f"{k} {num(terms[k])}" for k in DIAGNOSTICS if k in terms]
  parts.append(f"{pairs_per_s:,.0f} pairs/s")
  if eta_s is not None:
    parts.append(f"ETA {format_duration(eta_s)}")
  return "  ".join(parts)


@contextlib.contextmanager
def bar_cleared(bar: tqdm.tqdm) -> Iterator[None]:
  """Clears the bar's line while other output (a log line) is written, then redraws.

  Without it a log line written to the same terminal lands after the bar's
  text on one line.
  """
  bar.clear()
  try:
    yield
  finally:
    bar.refresh()


def scalars_path(workdir: str) -> str:
  """<workdir>/logs/scalars.jsonl."""
  return os.path.join(workdir, "logs", SCALARS_FILE)


def tensorboard_dir(workdir: str) -> str:
  """<workdir>/logs/tensorboard: point `tensorboard --logdir` here."""
  return os.path.join(workdir, "logs", "tensorboard")


def flatten_scalars(scalars: Mapping, prefix: str = "") -> dict[str, float]:
  """{"a": {"b": 1}} -> {"a/b": 1.0}: nested mappings of numbers to scalar names."""
  flat = {}
  for key, value in scalars.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_scalars(value, name))
    else:
      flat[name] = float(value)
  return flat


def flatten_config(config: Mapping) -> dict[str, Any]:
  """{"train": {"steps_per_task": 4}} -> {"train.steps_per_task": 4}.

  Args:
    config: a nested mapping (config.json) or an ml_collections ConfigDict.
  Returns:
    Dotted key -> leaf value (lists, None and strings as they are), keys in
    the config's order; an empty section leaves no key.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  flat = {}
  for key, value in config.items():
    if hasattr(value, "to_dict") or isinstance(value, Mapping):
      flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
    else:
      flat[str(key)] = value
  return flat


def summary_scalars(summary: Mapping) -> dict[str, float]:
  """results.json's "summary" as scalar names "summary/<regime>/<scope>/<metric>/<stat>".

  E.g. "summary/fixed/task_aware/i2t_r1/final_average". Statistics that are
  None (forgetting and backward transfer after one task) are left out.
  """
  def keep(tree):
    return {k: keep(v) if isinstance(v, Mapping) else v
            for k, v in tree.items() if v is not None}
  return flatten_scalars(keep(summary), "summary")


def _hparam_value(value: Any) -> bool | int | float | str:
  # TensorBoard's hparams hold a bool, a number or a string: lists and None
  # become their JSON text, as config.json writes them.
  if isinstance(value, (bool, int, float, str)):
    return value
  return json.dumps(value, sort_keys=True, default=str)


def _cut_partial_tail(path: str) -> None:
  # A run killed mid-write leaves a last line without its newline; appending
  # after it would glue the next record onto it, corrupting a middle line.
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    block = 1 << 16
    end = size
    while end > 0:
      start = max(0, end - block)
      f.seek(start)
      newline = f.read(end - start).rfind(b"\n")
      if newline >= 0:
        f.truncate(start + newline + 1)
        return
      end = start
    f.truncate(0)


class _EventFile:
  """One TensorBoard event file, written in the caller's thread.

  tensorboardX's SummaryWriter writes from a thread of its own: a full disk
  killed that thread with a traceback, and its bounded queue then blocked the
  run at the next scalars. Here a failed write raises where it happens, as a
  one-line `files.StorageError`. Events are flushed (and fsynced) at most
  every `flush_secs`, and on `flush` and `close`.
  """

  def __init__(self, folder: str, flush_secs: float):
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    self._folder, self._flush_secs = folder, flush_secs
    with files.writing(folder):
      os.makedirs(folder, exist_ok=True)
      # tensorboardX names files by the second and opens them with "wb": two
      # writers in one second would otherwise share (erase) one file.
      self._events = EventsWriter(os.path.join(folder, "events"),
                                  filename_suffix=f".{time.time_ns()}")
    self._flushed = time.monotonic()

  def event(self, event: Any) -> None:
    """Appends an `event_pb2.Event`."""
    with files.writing(self._folder):
      self._events.write_event(event)
      if time.monotonic() - self._flushed > self._flush_secs:
        self.flush()

  def summary(self, summary: Any, step: int, walltime: float | None = None) -> None:
    """Appends a `summary_pb2.Summary` at `step`."""
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self.event(event_pb2.Event(wall_time=time.time() if walltime is None else walltime,
                               step=step, summary=summary))

  def flush(self) -> None:
    """Writes buffered events to disk."""
    with files.writing(self._folder):
      self._events.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the file."""
    with files.writing(self._folder):
      self._events.close()


def scalar_summary(name: str, value: float) -> Any:
  """TensorBoard's `Summary` proto of one scalar."""
  from tensorboardX.summary import scalar  # pylint: disable=g-import-not-at-top
  return scalar(name, float(value))


class ScalarWriter:
  """Appends scalars to scalars.jsonl and TensorBoard events of one workdir.

  A class because it owns open files (the JSONL and the TensorBoard event
  file). On processes other than 0 every method does
  nothing, so every process can call it alike. Use as a context manager or
  call `close()`; a writer that is never closed still flushes the JSONL on
  every `write`; TensorBoard events reach the disk at least every
  `tensorboard_flush_secs`.

  Each JSONL line is one record: {"step": int, "time": unix seconds,
  "scalars": {name: float}}, or {"step": int, "time": ..., "resume_at": true}
  written by `resume_at`.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               tensorboard_flush_secs: float = 10.0):
    """Opens (creating or appending to) the workdir's logs.

    Args:
      workdir: the experiment's workdir; logs go to <workdir>/logs/.
      tensorboard: also write TensorBoard events.
      tensorboard_flush_secs: how stale the event file may get (each flush
        is an fsync).
    """
    self._jsonl = None
    self._tensorboard = None
    self._hparams: dict[str, Any] = {}
    if not _is_lead_process():
      return
    path = self._path = scalars_path(workdir)
    with files.writing(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      if os.path.exists(path):
        _cut_partial_tail(path)
      self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      self._tensorboard = _EventFile(tensorboard_dir(workdir), tensorboard_flush_secs)

  @property
  def active(self) -> bool:
    """False on processes other than 0 and after `close`."""
    return self._jsonl is not None

  def _append(self, record: dict) -> None:
    # One write of one whole line, flushed: a kill leaves at most the last
    # line partial, which the reader skips and the next writer cuts.
    with files.writing(self._path):
      self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
      self._jsonl.flush()

  def write(self, step: int, scalars: Mapping) -> None:
    """Records `scalars` at global step `step`.

    Args:
      step: the global step (across tasks) the values belong to.
      scalars: name -> number, or nested mappings flattened to "a/b" names
        (`flatten_scalars`); numbers may be Python, NumPy or host JAX scalars.
    """
    if not self.active:
      return
    flat = flatten_scalars(scalars)
    now = time.time()
    self._append({"step": int(step), "time": now, "scalars": flat})
    if self._tensorboard is not None:
      for name, value in flat.items():
        self._tensorboard.summary(scalar_summary(name, value), int(step), now)

  def resume_at(self, step: int) -> None:
    """Marks that this run writes steps >= `step` again after a resume.

    `read_scalars` drops what earlier runs wrote at those steps; TensorBoard
    receives a restart event at `step` and hides the killed run's points there.
    """
    if not self.active:
      return
    now = time.time()
    self._append({"step": int(step), "time": now, "resume_at": True})
    if self._tensorboard is not None:
      from tensorboardX.proto import event_pb2
      self._tensorboard.event(event_pb2.Event(
          step=int(step), wall_time=now,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write_config(self, config: Mapping) -> None:
    """Records the experiment's config in TensorBoard: hyperparameters and text.

    The flattened config (`flatten_config`, dotted keys) becomes the run's
    hyperparameters (the HPARAMS tab; lists and None as JSON text) and the
    whole config, as JSON, the text "config" at step 0. The JSONL is left
    alone: config.json holds the config. Call it once per run, before
    `write_summary`, which lists these hyperparameters with the metrics.

    Args:
      config: a nested mapping (config.json's contents) or a ConfigDict.
    """
    if not self.active:
      return
    self._hparams = {k: _hparam_value(v) for k, v in flatten_config(config).items()}
    if self._tensorboard is None:
      return
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    # Only the session start here: the experiment record names the metrics,
    # which exist once the run ends (write_summary). A run killed before that
    # still shows its hyperparameters; TensorBoard infers the experiment.
    _, session_start, _ = hparams(self._hparams, {})
    self._tensorboard.summary(session_start, 0)
    nested = config.to_dict() if hasattr(config, "to_dict") else config
    text = json.dumps(nested, indent=2, sort_keys=True, default=str)
    # Indented four spaces: a code block in TensorBoard's markdown text view.
    from tensorboardX.summary import text as text_summary  # pylint: disable=g-import-not-at-top
    self._tensorboard.summary(text_summary(
        "config", "\n".join("    " + line for line in text.splitlines())), 0)

  def write_summary(self, summary: Mapping, step: int) -> None:
    """Records the final continual summary as scalars and hyperparameter metrics.

    Args:
      summary: results.json's "summary": regime -> scope -> metric -> {
        "final_average", "average_incremental", "forgetting",
        "backward_transfer"}; None values are skipped.
      step: the global step the run ended at.

    Each number becomes the scalar "summary/<regime>/<scope>/<metric>/<stat>"
    (`summary_scalars`) in the JSONL and TensorBoard; after `write_config` the
    same names are the metrics of the hyperparameters table, which compares
    runs whose `logs/tensorboard` folders sit under one --logdir.
    """
    if not self.active:
      return
    scalars = summary_scalars(summary)
    self.write(step, scalars)
    if self._tensorboard is None or not self._hparams:
      return
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
    experiment, _, session_end = hparams(self._hparams, scalars)
    self._tensorboard.summary(experiment, int(step))
    self._tensorboard.summary(session_end, int(step))

  def flush(self) -> None:
    """Pushes pending TensorBoard events to disk (the JSONL is always flushed)."""
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self, failing: bool = False) -> None:
    """Writes everything pending and closes the files; later calls do nothing.

    A full or read-only device is logged in one line, not raised, and not
    even logged when `failing` (the run is stopping on an error, often that
    same device's, which is the one to report).
    """
    tensorboard, jsonl = self._tensorboard, self._jsonl
    self._tensorboard = self._jsonl = None
    for handle in (tensorboard, jsonl):
      if handle is None:
        continue
      try:
        with files.writing(self._path):  # The event file names its own folder.
          handle.close()
      except files.StorageError as e:
        if not failing:
          logging.warning("%s", e)

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, kind, *exc) -> None:
    self.close(failing=kind is not None)


def read_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
  """Reads a scalars.jsonl into {name: [(step, value), ...] sorted by step}.

  Tolerates what killed and resumed runs leave: a last line that does not
  parse (cut mid-write) is skipped; a `resume_at` mark drops the values
  earlier lines gave at steps >= its step; of several values at one
  (step, name), the last written wins.

  Args:
    path: a scalars.jsonl file (`scalars_path(workdir)`).
  Raises:
    ValueError: a line other than the last does not parse (the file was
      damaged some other way than by a kill).
  """
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  # split leaves b"" after a final newline; a last line without one is a
  # write cut short, even if it happens to parse.
  complete, tail = lines[:-1], lines[-1]
  values: dict[tuple[int, str], float] = {}
  for number, line in enumerate(complete, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number} is not a JSON record ({e}); only a "
                       "truncated last line is expected after a kill.") from e
    step = int(record["step"])
    if record.get("resume_at"):
      values = {k: v for k, v in values.items() if k[0] < step}
      continue
    for name, value in record["scalars"].items():
      values[(step, name)] = float(value)
  del tail  # Cut short by a kill: never trusted.
  out: dict[str, list[tuple[int, float]]] = {}
  for (step, name), value in sorted(values.items()):
    out.setdefault(name, []).append((step, value))
  return out

