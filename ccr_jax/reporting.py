"""Results files: atomic JSON writes, readable tables and the R@1 matrix plot."""

import json
import os
import tempfile
from typing import Any

import numpy as np


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file and a rename.

  A reader (or a run killed mid-write) never sees half a file.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  mode = "wb" if isinstance(data, bytes) else "w"
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix="." + os.path.basename(path) + ".")
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON."""
  write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  """Reads a JSON file written by `write_json`."""
  with open(path) as f:
    return json.load(f)


def _fmt(v: Any) -> str:
  return "–" if v is None else f"{v:.1f}"


def matrix_table(matrix: list[list[float | None]]) -> str:
  """Markdown table of R[t][j]: rows = after training task t, columns = task j."""
  t_count = len(matrix)
  head = "| after task | " + " | ".join(f"task {j + 1}" for j in range(t_count)) + " |"
  sep = "|---" * (t_count + 1) + "|"
  rows = [f"| {t + 1} | " + " | ".join(_fmt(v) for v in row) + " |"
          for t, row in enumerate(matrix)]
  return "\n".join([head, sep, *rows])


def results_markdown(results: dict) -> str:
  """A readable summary of results.json: R@1 matrices and continual summaries."""
  lines = [f"# Results: strategy `{results['config']['strategy']['name']}`, "
           f"loss `{results['config']['loss']['name']}`", ""]
  lines.append("Rows: after training task t; columns: test queries of task j. "
               "Recall@1 in percent. *fixed*: each task's gallery indexed once with "
               "the snapshot of its own task (no reindexing); *reindex*: every "
               "gallery re-embedded with the latest snapshot.")
  for regime, scopes in results["metrics"].items():
    for scope, directions in scopes.items():
      for direction in ("i2t", "t2i"):
        lines += ["", f"## {regime}, {scope.replace('_', '-')}, "
                  f"{'image→text' if direction == 'i2t' else 'text→image'} R@1", "",
                  matrix_table(directions[direction]["r1"])]
  lines += ["", "## Continual summary", "",
            "| regime | scope | metric | final average | average incremental | "
            "forgetting | backward transfer |", "|---|---|---|---|---|---|---|"]
  for regime, scopes in results["summary"].items():
    for scope, metrics in scopes.items():
      for name, s in metrics.items():
        lines.append(
            f"| {regime} | {scope} | {name} | {_fmt(s['final_average'])} | "
            f"{_fmt(s['average_incremental'])} | {_fmt(s['forgetting'])} | "
            f"{_fmt(s['backward_transfer'])} |")
  return "\n".join(lines) + "\n"


def plot_r1_matrices(results: dict, path: str) -> None:
  """Heatmaps of the task-aware R@1 matrices, one per (regime, direction), as PNG."""
  import matplotlib  # Imported here: only reporting needs it, and headless.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  regimes = list(results["metrics"])
  fig, axes = plt.subplots(2, len(regimes), figsize=(3.6 * len(regimes), 6.4),
                           squeeze=False)
  for col, regime in enumerate(regimes):
    for row, direction in enumerate(("i2t", "t2i")):
      m = np.array(results["metrics"][regime]["task_aware"][direction]["r1"],
                   dtype=float)
      ax = axes[row][col]
      ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
      for (t, j), v in np.ndenumerate(m):
        if np.isfinite(v):
          ax.text(j, t, f"{v:.0f}", ha="center", va="center",
                  color="white" if v < 60 else "black", fontsize=8)
      ax.set_title(f"{regime} {direction} R@1", fontsize=9)
      ax.set_xlabel("test task")
      ax.set_ylabel("after training task")
      ax.set_xticks(range(len(m)), [str(i + 1) for i in range(len(m))])
      ax.set_yticks(range(len(m)), [str(i + 1) for i in range(len(m))])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
