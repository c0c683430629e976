"""What a researcher sees while training runs: a progress bar and live scalars.

Two outputs, both written by process 0 only:

- A tqdm bar per task on stdout (step, loss of the last log window, pairs/s,
  ETA). Drawn only on a terminal and outside CI, so logs captured to a file or
  a CI transcript hold the absl log lines alone.
- Scalars appended to `<workdir>/logs/scalars.jsonl` (the reference, read back
  with `read_scalars`) and mirrored as TensorBoard event files under
  `<workdir>/logs/tensorboard/` (tensorboardX, no TensorFlow needed).

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
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO

import jax
import tqdm

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
      # postfix; tqdm's own rate counts dispatches, which run ahead of the device.
      bar_format="{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} "
                 "[{elapsed}<{remaining}{postfix}]")


def show_window(bar: tqdm.tqdm, loss: float, pairs_per_s: float) -> None:
  """Puts the last log window's mean loss and throughput on the bar."""
  bar.set_postfix_str(f"loss={loss:.4g}, {pairs_per_s:,.0f} pairs/s", refresh=False)


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


class ScalarWriter:
  """Appends scalars to scalars.jsonl and TensorBoard events of one workdir.

  A class because it owns open files (the JSONL and tensorboardX's event file
  with its writer thread). On processes other than 0 every method does
  nothing, so every process can call it alike. Use as a context manager or
  call `close()`; a writer that is never closed still flushes the JSONL on
  every `write`, and tensorboardX flushes its events at interpreter exit.

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
      tensorboard_flush_secs: how stale the event file may get; tensorboardX
        writes from a thread, so this costs the training loop nothing.
    """
    self._jsonl = None
    self._tensorboard = None
    if not _is_lead_process():
      return
    path = scalars_path(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
      _cut_partial_tail(path)
    self._jsonl = open(path, "a", encoding="utf-8")
    if tensorboard:
      import tensorboardX  # Only process 0 pays for the import.
      self._tensorboard = tensorboardX.SummaryWriter(
          tensorboard_dir(workdir), flush_secs=tensorboard_flush_secs,
          # tensorboardX names files by the second and opens them with "wb":
          # two writers in one second would otherwise share (erase) one file.
          filename_suffix=f".{time.time_ns()}")

  @property
  def active(self) -> bool:
    """False on processes other than 0 and after `close`."""
    return self._jsonl is not None

  def _append(self, record: dict) -> None:
    # One write of one whole line, flushed: a kill leaves at most the last
    # line partial, which the reader skips and the next writer cuts.
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
        self._tensorboard.add_scalar(name, value, int(step), walltime=now)

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
      self._tensorboard.file_writer.add_event(event_pb2.Event(
          step=int(step), wall_time=now,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def flush(self) -> None:
    """Pushes pending TensorBoard events to disk (the JSONL is always flushed)."""
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    """Writes everything pending and closes the files; later calls do nothing."""
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> "ScalarWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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

