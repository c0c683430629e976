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


def _pyplot():
  import matplotlib  # Imported here: only reporting needs it, and headless.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save_figure(fig, path: str) -> None:
  """Saves a figure as PNG through a temporary file and a rename, then closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.png"
  fig.tight_layout()
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def _heatmap(ax, matrix, title: str, xlabel: str, ylabel: str,
             vmax: float | None = 100.0, fmt: str = "{:.0f}") -> None:
  """One annotated heatmap; None / NaN cells stay blank. Labels are 1-based."""
  m = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
  finite = m[np.isfinite(m)]
  vmin = 0.0 if vmax == 100.0 else (finite.min() if finite.size else 0.0)
  top = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
  ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=top, cmap="viridis")
  mid = (vmin + top) / 2
  for (r, c), v in np.ndenumerate(m):
    if np.isfinite(v):
      ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8,
              color="white" if v < mid else "black")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_xticks(range(m.shape[1]), [str(i + 1) for i in range(m.shape[1])])
  ax.set_yticks(range(m.shape[0]), [str(i + 1) for i in range(m.shape[0])])


def plot_r1_matrices(results: dict, path: str) -> None:
  """Heatmaps of the task-aware R@1 matrices, one per (regime, direction), as PNG."""
  plt = _pyplot()
  regimes = list(results["metrics"])
  fig, axes = plt.subplots(2, len(regimes), figsize=(3.6 * len(regimes), 6.4),
                           squeeze=False)
  for col, regime in enumerate(regimes):
    for row, direction in enumerate(("i2t", "t2i")):
      _heatmap(axes[row][col], results["metrics"][regime]["task_aware"][direction]["r1"],
               f"{regime} {direction} R@1", "test task", "after training task")
  _save_figure(fig, path)


ANALYSIS_PLOTS = ("compatibility", "towers", "drift", "partial_reindex")


def plot_analysis(analysis: dict, plots_dir: str, name: str) -> list[str]:
  """The forgetting analysis's figures (`ANALYSIS_PLOTS`) as <name>_<plot>.png.

  Returns the paths written.
  """
  plt = _pyplot()
  metric = _first_recall(analysis)
  tasks = sorted(analysis["compatibility"]["task_aware"]["i2t"], key=int)
  paths = []
  for kind, labels in (("compatibility", ("gallery snapshot g", "query snapshot q")),
                       ("towers", ("text-tower snapshot", "image-tower snapshot"))):
    source = (analysis["compatibility"]["task_aware"] if kind == "compatibility"
              else analysis["towers"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 6.2),
                             squeeze=False)
    for col, j in enumerate(tasks):
      for row, direction in enumerate(("i2t", "t2i")):
        _heatmap(axes[row][col], source[direction][j][metric],
                 f"task {j} {direction} {metric}", *labels)
    paths.append(os.path.join(plots_dir, f"{name}_{kind}.png"))
    _save_figure(fig, paths[-1])

  drift = analysis["drift"]
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
  panels = (("images", "image drift: cos(snapshot j, snapshot s)"),
            ("texts", "text drift: cos(snapshot j, snapshot s)"),
            ("alignment", "alignment: mean positive cosine"))
  for ax, (key, title) in zip(axes, panels):
    for j in tasks:
      values = (drift[key][j] if key == "alignment"
                else drift[key][j][int(j) - 1])
      xs = [s + 1 for s, v in enumerate(values) if v is not None]
      ax.plot(xs, [v for v in values if v is not None], marker="o", label=f"task {j}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("snapshot s")
    ax.set_xticks(range(1, len(tasks) + 1))
  axes[0].legend(fontsize=7)
  paths.append(os.path.join(plots_dir, f"{name}_drift.png"))
  _save_figure(fig, paths[-1])

  partial = analysis["partial_reindex"]
  fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
  budgets = [100 * b for b in partial["budgets"]]
  for ax, direction in zip(axes, ("i2t", "t2i")):
    for policy, by_direction in partial["curves"].items():
      curves = by_direction[direction]
      if "mean" in curves:
        ax.plot(budgets, curves["mean"][metric], marker="o", label=f"{policy} (mean)")
    ax.set_title(f"{direction} {metric} of old galleries vs reindex budget "
                 f"(queries: snapshot {partial['query_snapshot']})", fontsize=8)
    ax.set_xlabel("gallery re-embedded (%)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
  paths.append(os.path.join(plots_dir, f"{name}_partial_reindex.png"))
  _save_figure(fig, paths[-1])
  return paths


def _first_recall(analysis: dict) -> str:
  any_task = next(iter(analysis["compatibility"]["task_aware"]["i2t"].values()))
  return sorted((k for k in any_task if k.startswith("exact_r")),
                key=lambda k: int(k[len("exact_r"):]))[0]


def _grid(matrix: list[list[float | None]], row_label: str, col_label: str) -> str:
  """Markdown table of a square matrix with 1-based row and column labels."""
  n = len(matrix)
  head = f"| {row_label} \\ {col_label} | " + " | ".join(str(c + 1) for c in range(n)) + " |"
  rows = [f"| {r + 1} | " + " | ".join(_fmt(v) for v in row) + " |"
          for r, row in enumerate(matrix)]
  return "\n".join([head, "|---" * (n + 1) + "|", *rows])


def _fmt3(v: Any) -> str:
  return "–" if v is None else f"{v:.3f}"


def analysis_markdown(analysis: dict, plots_dir: str, name: str) -> str:
  """The forgetting analysis as markdown sections, with its figures linked."""
  metric = _first_recall(analysis)
  fig = lambda kind: f"![{kind}]({plots_dir}/{name}_{kind}.png)"  # noqa: E731
  lines = ["", "# Forgetting analysis", "",
           "Exact recalls (brute-force ranks over the gallery embeddings), in percent.",
           "", "## Compatibility C[q][g] (task-aware)", "",
           f"{metric} of task j's test queries embedded by snapshot q (rows) against "
           "task j's gallery embedded by snapshot g (columns). The diagonal is the "
           "reindex regime; column g = j is the fixed regime.", "", fig("compatibility")]
  for scope, directions in analysis["compatibility"].items():
    for direction, per_task in directions.items():
      for j, mats in sorted(per_task.items(), key=lambda kv: int(kv[0])):
        lines += ["", f"### {scope.replace('_', '-')}, {direction}, task {j}", "",
                  _grid(mats[metric], "q", "g")]
  lines += ["", "## Tower attribution", "",
            "Image tower of snapshot a with the text tower of snapshot b. *own*: both "
            "from the task's own snapshot; *new image tower*: the last snapshot's "
            "image tower with the task's own text tower; and so on.", "",
            fig("towers"), "",
            "| task | direction | own | new image tower | new text tower | both new |",
            "|---|---|---|---|---|---|"]
  for r in analysis["attribution"]:
    lines.append(f"| {r['task']} | {r['direction']} | {_fmt(r['own'])} | "
                 f"{_fmt(r['new_image_tower'])} | {_fmt(r['new_text_tower'])} | "
                 f"{_fmt(r['both_new'])} |")
  drift = analysis["drift"]
  lines += ["", "## Drift and alignment", "",
            "Drift: *image cos* and *text cos* are the mean cosine between an "
            "item's embedding by the task's own snapshot j and by snapshot s (1 = "
            "no drift). Alignment: mean cosine of "
            "positive pairs. Uniformity: log mean exp(-2 d²) over pairs (lower = "
            "more uniform).", "", fig("drift"), "",
            f"| task | snapshot | image cos | text cos | alignment | "
            f"image unif. | text unif. | fixed i2t | reindex i2t | fixed t2i | "
            f"reindex t2i |", "|---" * 11 + "|"]
  for r in drift["tracking"]:
    lines.append(
        f"| {r['task']} | {r['snapshot']} | {_fmt3(r['image_cosine'])} | "
        f"{_fmt3(r['text_cosine'])} | {_fmt3(r['alignment'])} | "
        f"{_fmt3(r['image_uniformity'])} | {_fmt3(r['text_uniformity'])} | "
        f"{_fmt(r[f'fixed_i2t_{metric}'])} | {_fmt(r[f'reindex_i2t_{metric}'])} | "
        f"{_fmt(r[f'fixed_t2i_{metric}'])} | {_fmt(r[f'reindex_t2i_{metric}'])} |")
  corr = drift["correlations"]
  lines += ["", f"Pearson correlations over the {corr['points']} (task, later "
            "snapshot) points with the drop from the task's own recall (a negative "
            "correlation with a cosine: more drift, more forgetting):", "",
            "| quantity | correlation |", "|---|---|"]
  lines += [f"| {k} | {_fmt3(v)} |" for k, v in corr.items() if k != "points"]
  partial = analysis["partial_reindex"]
  lines += ["", "## Partial reindexing", "",
            f"Old galleries (tasks 1..{partial['query_snapshot'] - 1}) with a fraction "
            f"re-embedded by snapshot {partial['query_snapshot']}, queried by it; "
            f"{metric}, mean over old tasks. 0 % is the fixed regime, 100 % reindex.",
            "", fig("partial_reindex"), ""]
  cols = [(p, d) for p in partial["curves"] for d in ("i2t", "t2i")]
  lines += ["| budget | " + " | ".join(f"{p} {d}" for p, d in cols) + " |",
            "|---" * (len(cols) + 1) + "|"]
  for i, b in enumerate(partial["budgets"]):
    cells = []
    for p, d in cols:
      mean = partial["curves"][p][d].get("mean")
      cells.append(_fmt(mean[metric][i]) if mean else "–")
    lines.append(f"| {100 * b:.0f} % | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
