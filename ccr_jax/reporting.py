"""Results files: readable tables, plots and the report over workdirs."""

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from ccr_jax import files
from ccr_jax import stats

DIRECTION_NAMES = {"i2t": "image→text", "t2i": "text→image"}
SCOPE_NAMES = {"task_aware": "task-aware", "task_agnostic": "task-agnostic",
               "task_agnostic_as_learnt": "task-agnostic, galleries as learnt"}


def metric_label(name: str) -> str:
  """A results.json metric key as a reader's name.

  "r1" -> "R@1" (the index's search), "exact_r5" -> "R@5 (exact)",
  "fold_r1" -> "R@1 (1K folds)", "i2t_r1" -> "image→text R@1", "medr" ->
  "median rank", "index_recall_at_10" -> "index recall@10"; an unknown key is
  returned as it is.
  """
  if name[:4] in ("i2t_", "t2i_"):
    return f"{DIRECTION_NAMES[name[:3]]} {metric_label(name[4:])}"
  for prefix, note in (("exact_", " (exact)"), ("fold_", " (1K folds)")):
    if name.startswith(prefix):
      return metric_label(name[len(prefix):]) + note
  if m := re.fullmatch(r"r(\d+)", name):
    return f"R@{m[1]}"
  if m := re.fullmatch(r"index_recall_at_(\d+)", name):
    return f"index recall@{m[1]}"
  return {"medr": "median rank", "meanr": "mean rank"}.get(name, name)


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
  growth = results.get("gallery_growth") or {}
  if any(v is not None for by_metric in growth.values() for v in by_metric.values()):
    lines += ["", "## What the growing gallery costs", "",
              "Old tasks' R@1 with the final model over the galleries seen when each "
              "was learnt minus over every gallery (mean over old tasks): the part "
              "of task-agnostic forgetting that the gallery's growth alone explains; "
              "the rest is the model's forgetting at a fixed gallery.", "",
              "| regime | metric | task-agnostic forgetting | of which gallery growth "
              "| of which the model |", "|---|---|---|---|---|"]
    for regime, by_metric in growth.items():
      for name, value in by_metric.items():
        total = results["summary"][regime]["task_agnostic"][name]["forgetting"]
        rest = None if value is None or total is None else total - value
        lines.append(f"| {regime} | {name} | {_fmt(total)} | {_fmt(value)} | "
                     f"{_fmt(rest)} |")
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib  # Imported here: only reporting needs it, and headless.
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _is_empty(ax) -> bool:
  return not (ax.lines or ax.images or ax.collections or ax.patches)


def _save_figure(fig, path: str) -> None:
  """Saves a figure as PNG through a temporary file and a rename, then closes it.

  Panels left without anything drawn (a grid larger than its content) are
  removed first, so no figure shows an empty frame.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for ax in list(fig.axes):
    if _is_empty(ax):
      fig.delaxes(ax)
  tmp = path + ".tmp.png"
  fig.tight_layout()
  try:
    with files.writing(path):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      fig.savefig(tmp, dpi=110)
      os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)


def _heatmap(ax, matrix, title: str, xlabel: str, ylabel: str,
             vmax: float | None = 100.0, fmt: str = "{:.0f}",
             value_label: str = "%") -> None:
  """One annotated heatmap with its colorbar; None / NaN cells stay blank.

  Args:
    matrix: [rows][columns] of float or None.
    title: should name the metric and the scope (task-aware / -agnostic).
    vmax: 100.0 for percentages (colour scale 0..100), None for the data's range.
    value_label: the colorbar's label.
  Row and column labels are 1-based integers (tasks or snapshots).
  """
  m = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
  finite = m[np.isfinite(m)]
  vmin = 0.0 if vmax == 100.0 else (finite.min() if finite.size else 0.0)
  top = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
  image = ax.imshow(np.ma.masked_invalid(m), vmin=vmin, vmax=top, cmap="viridis")
  ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(
      value_label, fontsize=8)
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
  fig, axes = plt.subplots(2, len(regimes), figsize=(4.3 * len(regimes), 6.6),
                           squeeze=False)
  for col, regime in enumerate(regimes):
    for row, direction in enumerate(("i2t", "t2i")):
      _heatmap(axes[row][col], results["metrics"][regime]["task_aware"][direction]["r1"],
               f"{regime}: {DIRECTION_NAMES[direction]} R@1\n(task-aware)",
               "test task", "after training task", value_label="R@1 (%)")
  _save_figure(fig, path)


ANALYSIS_PLOTS = ("compatibility", "towers", "drift", "partial_reindex")


def _has_partial_reindex(analysis: dict) -> bool:
  # Partial reindexing needs an old gallery: with one task it has no curve.
  return any("mean" in curves for by_direction in
             analysis["partial_reindex"]["curves"].values()
             for curves in by_direction.values())


def analysis_plots(analysis: dict) -> tuple[str, ...]:
  """The `ANALYSIS_PLOTS` that `plot_analysis` draws for this analysis."""
  return tuple(k for k in ANALYSIS_PLOTS
               if k != "partial_reindex" or _has_partial_reindex(analysis))


def plot_analysis(analysis: dict, plots_dir: str, name: str) -> list[str]:
  """The forgetting analysis's figures (`analysis_plots`) as <name>_<plot>.png.

  Returns the paths written. The partial-reindexing figure is left out when
  there is no old gallery (one task).
  """
  plt = _pyplot()
  metric = _first_recall(analysis)
  label = metric_label(metric)
  tasks = sorted(analysis["compatibility"]["task_aware"]["i2t"], key=int)
  paths = []
  for kind, labels in (("compatibility", ("gallery snapshot g", "query snapshot q")),
                       ("towers", ("text-tower snapshot", "image-tower snapshot"))):
    # analysis.py computes the towers from the task-aware compatibility.
    source = (analysis["compatibility"]["task_aware"] if kind == "compatibility"
              else analysis["towers"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.0 * len(tasks), 6.6),
                             squeeze=False)
    for col, j in enumerate(tasks):
      for row, direction in enumerate(("i2t", "t2i")):
        _heatmap(axes[row][col], source[direction][j][metric],
                 f"task {j}: {DIRECTION_NAMES[direction]} {label}\n(task-aware)",
                 *labels, value_label=f"{label} (%)")
    paths.append(os.path.join(plots_dir, f"{name}_{kind}.png"))
    _save_figure(fig, paths[-1])

  drift = analysis["drift"]
  fig, axes = plt.subplots(1, 3, figsize=(11.5, 3.6))
  panels = (("images", "image drift: cos(snapshot j, snapshot s)", "mean cosine"),
            ("texts", "text drift: cos(snapshot j, snapshot s)", "mean cosine"),
            ("alignment", "alignment: mean positive-pair cosine", "mean cosine"))
  for ax, (key, title, ylabel) in zip(axes, panels):
    for j in tasks:
      values = (drift[key][j] if key == "alignment"
                else drift[key][j][int(j) - 1])
      xs = [s + 1 for s, v in enumerate(values) if v is not None]
      ax.plot(xs, [v for v in values if v is not None], marker="o", label=f"task {j}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("snapshot s (after training task s)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(1, len(tasks) + 1))
    ax.legend(fontsize=7, title="task j", title_fontsize=7)
  paths.append(os.path.join(plots_dir, f"{name}_drift.png"))
  _save_figure(fig, paths[-1])

  if _has_partial_reindex(analysis):
    paths.append(os.path.join(plots_dir, f"{name}_partial_reindex.png"))
    plot_partial_reindex(analysis["partial_reindex"], metric, paths[-1])
  return paths


def plot_partial_reindex(partial: dict, metric: str, path: str) -> None:
  """Recall of the old galleries against the share re-embedded, one line per policy.

  Args:
    partial: analysis["partial_reindex"]: {"budgets": [B] fractions,
      "query_snapshot": int, "curves": {policy: {direction: {"mean": {metric:
      [B]}, optional "std": {metric: [B]}, task: ...}}}, optional "draws":
      {policy: int}}. "mean" is over the old tasks; a policy with "std" and
      draws > 1 (several random orders per budget) gets a mean ± std band.
    metric: the recall to plot, e.g. "exact_r1".
  """
  plt = _pyplot()
  draws = partial.get("draws", {})
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
  budgets = np.array([100 * b for b in partial["budgets"]])
  label = metric_label(metric)
  banded = False
  for ax, direction in zip(axes, ("i2t", "t2i")):
    for policy, by_direction in partial["curves"].items():
      curves = by_direction[direction]
      if "mean" not in curves:
        continue
      mean = np.array(curves["mean"][metric], float)
      n = int(draws.get(policy, 1))
      std = curves.get("std", {}).get(metric)
      if std is not None and n > 1:
        (line,) = ax.plot(budgets, mean, marker="o",
                          label=f"{policy} (mean ± std, {n} draws)")
        ax.fill_between(budgets, mean - np.array(std, float),
                        mean + np.array(std, float), color=line.get_color(),
                        alpha=0.2, lw=0)
        banded = True
      else:
        ax.plot(budgets, mean, marker="o", label=f"{policy} (1 draw)")
    ax.set_title(f"{DIRECTION_NAMES[direction]} {label} of old galleries (task-aware)\n"
                 f"queries: snapshot {partial['query_snapshot']}; mean over old tasks",
                 fontsize=8)
    ax.set_xlabel("gallery re-embedded (%)")
    ax.legend(fontsize=7)
  axes[0].set_ylabel(f"{label} (%)")
  if not banded:
    # Said on the figure: a flat line is one draw, not an estimate of spread.
    fig.text(0.5, 0.005, "one draw per budget: no spread over draws to show",
             ha="center", va="bottom", fontsize=7, color="grey")
  _save_figure(fig, path)


def _first_recall(analysis: dict) -> str:
  any_task = next(iter(analysis["compatibility"]["task_aware"]["i2t"].values()))
  return sorted((k for k in any_task if k.startswith("exact_r")),
                key=lambda k: int(k[len("exact_r"):]))[0]


def _grid(matrix: list[list[float | None]], row_label: str, col_label: str) -> str:
  """Markdown table of a square matrix with 1-based row and column labels."""
  n = len(matrix)
  head = (f"| {row_label} \\ {col_label} | " + " | ".join(str(c + 1) for c in range(n))
          + " |")
  rows = [f"| {r + 1} | " + " | ".join(_fmt(v) for v in row) + " |"
          for r, row in enumerate(matrix)]
  return "\n".join([head, "|---" * (n + 1) + "|", *rows])


def _fmt3(v: Any) -> str:
  return "–" if v is None else f"{v:.3f}"


def analysis_markdown(analysis: dict, plots_dir: str, name: str) -> str:
  """The forgetting analysis as markdown sections, with its figures linked."""
  metric = _first_recall(analysis)
  label = metric_label(metric)
  fig = lambda kind: f"![{kind}]({plots_dir}/{name}_{kind}.png)"  # noqa: E731
  lines = ["", "# Forgetting analysis", "",
           "Exact recalls (brute-force ranks over the gallery embeddings), in percent.",
           "", "## Compatibility C[q][g] (task-aware)", "",
           f"{label} of task j's test queries embedded by snapshot q (rows) against "
           "task j's gallery embedded by snapshot g (columns). The diagonal is the "
           "reindex regime; column g = j is the fixed regime.", "", fig("compatibility")]
  for scope, directions in analysis["compatibility"].items():
    for direction, per_task in directions.items():
      for j, mats in sorted(per_task.items(), key=lambda kv: int(kv[0])):
        lines += ["", f"### {SCOPE_NAMES.get(scope, scope)}, "
                  f"{DIRECTION_NAMES[direction]}, task {j}", "",
                  _grid(mats[metric], "q", "g")]
  lines += ["", "## Tower attribution", "",
            "Image tower of snapshot a with the text tower of snapshot b. *own*: both "
            "from the task's own snapshot; *new image tower*: the last snapshot's "
            "image tower with the task's own text tower; and so on.", "",
            fig("towers"), "",
            "| task | direction | own | new image tower | new text tower | both new |",
            "|---|---|---|---|---|---|"]
  for r in analysis["attribution"]:
    lines.append(f"| {r['task']} | {DIRECTION_NAMES[r['direction']]} | {_fmt(r['own'])} | "
                 f"{_fmt(r['new_image_tower'])} | {_fmt(r['new_text_tower'])} | "
                 f"{_fmt(r['both_new'])} |")
  drift = analysis["drift"]
  lines += ["", "## Drift and alignment", "",
            "Drift: *image cos* and *text cos* are the mean cosine between an "
            "item's embedding by the task's own snapshot j and by snapshot s (1 = "
            "no drift). Alignment: mean cosine of "
            "positive pairs. Uniformity: log mean exp(-2 d²) over pairs (lower = "
            "more uniform).", "", fig("drift"), "",
            "| task | snapshot | image cos | text cos | alignment | "
            "image unif. | text unif. | fixed image→text | reindex image→text | "
            "fixed text→image | reindex text→image |", "|---" * 11 + "|"]
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
  lines += ["", "## Partial reindexing", ""]
  if not _has_partial_reindex(analysis):
    lines.append("(No old gallery to reindex: the run learned one task.)")
    return "\n".join(lines) + "\n"
  draws = partial.get("draws", {})
  lines += [f"Old galleries (tasks 1..{partial['query_snapshot'] - 1}) with a fraction "
            f"re-embedded by snapshot {partial['query_snapshot']}, queried by it; "
            f"{label}, task-aware, mean over old tasks. 0 % is the fixed regime, "
            "100 % reindex. "
            + (f"Random orders per budget: {draws}; ± is the std over them."
               if any(n > 1 for n in draws.values())
               else "One draw (random order) per budget: no spread over draws."),
            "", fig("partial_reindex"), ""]
  cols = [(p, d) for p in partial["curves"] for d in ("i2t", "t2i")]
  lines += ["| budget | " + " | ".join(f"{p} {DIRECTION_NAMES[d]}" for p, d in cols)
            + " |", "|---" * (len(cols) + 1) + "|"]
  for i, b in enumerate(partial["budgets"]):
    cells = []
    for p, d in cols:
      curves = partial["curves"][p][d]
      mean, std = curves.get("mean"), curves.get("std", {}).get(metric)
      cell = _fmt(mean[metric][i]) if mean else "–"
      if mean and std is not None and draws.get(p, 1) > 1:
        cell += f" ± {_fmt(std[i])}"
      cells.append(cell)
    lines.append(f"| {100 * b:.0f} % | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ report.md

REPORT_PLOTS = ("r1", "forgetting", "training")


def plot_forgetting_curves(results: dict, path: str) -> None:
  """Each task's task-aware R@1 after every later task; fixed and reindex side by side.

  One panel per (direction, regime), sharing the y axis within a direction,
  one line per task j from the task it was learned on.
  """
  plt = _pyplot()
  regimes = list(results["metrics"])
  fig, axes = plt.subplots(2, len(regimes), figsize=(3.8 * len(regimes), 6.0),
                           squeeze=False, sharey="row")
  for row, direction in enumerate(("i2t", "t2i")):
    for col, regime in enumerate(regimes):
      ax = axes[row][col]
      m = results["metrics"][regime]["task_aware"][direction]["r1"]
      for j in range(len(m)):
        ts = [t + 1 for t in range(j, len(m)) if m[t][j] is not None]
        ax.plot(ts, [m[t - 1][j] for t in ts], marker="o", label=f"task {j + 1}")
      ax.set_title(f"{regime}: {DIRECTION_NAMES[direction]} R@1 (task-aware)",
                   fontsize=9)
      ax.set_xlabel("after training task")
      ax.set_xticks(range(1, len(m) + 1))
      ax.legend(fontsize=7, title="test task", title_fontsize=7)
      if col == 0:
        ax.set_ylabel("R@1 (%)")
  _save_figure(fig, path)


def loss_series(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> list[str]:
  """The scalars a training-curve plot shows: "train/loss" and its terms.

  Diagnostics (`progress.DIAGNOSTICS`: gradient norm, learning rate,
  temperature, ...) are not losses and stay out; "train/loss" comes first.
  """
  from ccr_jax import progress  # pylint: disable=g-import-not-at-top
  names = [n for n in scalars if n.startswith("train/")
           and n[len("train/"):] not in progress.DIAGNOSTICS]
  return sorted(names, key=lambda n: (n != "train/loss", n))


def plot_training_curves(scalars: dict[str, list[tuple[int, float]]], path: str,
                         steps_per_task: int) -> None:
  """Training loss and its terms (log-window means) over global steps, tasks marked.

  The y axis is logarithmic (losses are positive and fall over decades);
  when some value is <= 0 it is symmetric-log instead and its label says so.
  The total loss is the thick black line. Dotted lines are task boundaries
  and the top axis names each task at the middle of its steps.
  """
  plt = _pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 3.6))
  last, smallest, nonpositive = 0, np.inf, False
  drawn: dict = {}
  for name in loss_series(scalars):
    steps, values = zip(*scalars[name])
    values = np.array(values, float)
    total = name == "train/loss"
    # The total is wide and under the terms: a term equal to it (the
    # contrastive loss without a strategy term) still shows on top.
    label = name[len("train/"):] + (" (total)" if total else "")
    ax.plot(steps, values, label=label + _same_as(drawn, label, (steps, values)),
            color="black" if total else None, lw=3.0 if total else 1.2,
            alpha=0.6 if total else 1.0, zorder=2 if total else 3)
    last = max(last, max(steps))
    nonpositive |= bool(np.any(values[np.isfinite(values)] <= 0))
    positive = np.abs(values[np.isfinite(values) & (values != 0)])
    smallest = min(smallest, positive.min()) if positive.size else smallest
  if nonpositive:
    ax.set_yscale("symlog", linthresh=float(smallest) if np.isfinite(smallest) else 1.0)
    ax.set_ylabel("loss (log-window mean;\nsymlog: some values <= 0)")
  else:
    ax.set_yscale("log")
    # Plain numbers (50, 60, ...), and the minor ticks labelled when the
    # losses span under a decade, as they often do within a run.
    ax.yaxis.set_major_formatter(ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.set_ylabel("loss (log-window mean, log scale)")
  for boundary in range(steps_per_task, last, steps_per_task):
    ax.axvline(boundary, color="grey", lw=0.6, ls=":")
  num_tasks = max(1, -(-last // steps_per_task))
  ax.set_xlim(0, num_tasks * steps_per_task)  # Whole tasks, from step 0.
  top = ax.secondary_xaxis("top")
  top.set_xticks([(t - 0.5) * steps_per_task for t in range(1, num_tasks + 1)],
                 [f"task {t}" for t in range(1, num_tasks + 1)], fontsize=7)
  ax.set_xlabel("global step (dotted: task boundaries)")
  ax.legend(fontsize=7)
  _save_figure(fig, path)


def _same_as(drawn: dict, label: str, values: Any) -> str:
  """" (= <label>)" when a line with exactly these values was drawn before,
  whose legend entry would otherwise name a line hidden under it; records
  this one in `drawn` (values -> first label)."""
  key = json.dumps(values, default=lambda v: np.asarray(v).tolist())
  first = drawn.setdefault(key, label)
  return "" if first == label else f" (= {first})"


def plot_strategy_comparison(runs: list[tuple[str, dict]], path: str) -> None:
  """Average task-aware R@1 over seen tasks after each task, one line per workdir."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), sharey=True)
  most = max(len(next(iter(r["metrics"].values()))["task_aware"]["i2t"]["r1"])
             for _, r in runs)
  for ax, direction in zip(axes, ("i2t", "t2i")):
    drawn: dict = {}
    for label, results in runs:
      for regime, style in (("fixed", "--"), ("reindex", "-")):
        if regime not in results["metrics"]:
          continue
        m = results["metrics"][regime]["task_aware"][direction]["r1"]
        avg = [float(np.mean([v for v in m[t][:t + 1]])) for t in range(len(m))]
        name = f"{label} {regime}"
        ax.plot(range(1, len(m) + 1), avg, ls=style, marker="o",
                label=name + _same_as(drawn, name, avg))
    ax.set_title(f"{DIRECTION_NAMES[direction]}: average R@1 over seen tasks "
                 "(task-aware)", fontsize=9)
    ax.set_xlabel("after training task")
    ax.set_xticks(range(1, most + 1))
    ax.legend(fontsize=7)
  axes[0].set_ylabel("R@1 (%)")
  _save_figure(fig, path)


# -------------------------------------------------- comparing several workdirs

# How much training a run got: steps per task, pairs per step and pretraining
# steps. Runs that differ here are not comparable as strategies.
TRAINING_LENGTH_KEYS = ("train.steps_per_task", "train.batch_size", "pretrain.steps")


class _Absent:
  """The value of a config key a run's config does not have."""

  def __repr__(self) -> str:
    return "(absent)"


ABSENT = _Absent()


def _canonical(value: Any) -> str:
  # Lists and tuples, and int 1 vs float 1.0 as JSON writes them, compare alike.
  return "(absent)" if value is ABSENT else json.dumps(value, sort_keys=True,
                                                      default=str)


def settings_that_differ(configs: Sequence[Mapping]) -> dict[str, list[Any]]:
  """The config keys whose values differ between runs.

  Args:
    configs: each run's config (config.json's contents), nested.
  Returns:
    {dotted key: [value of run 0, value of run 1, ...]} for every key (see
    `progress.flatten_config`) whose values are not all equal, sorted by key;
    a run without the key has `ABSENT` there.
  """
  from ccr_jax import progress  # pylint: disable=g-import-not-at-top
  flat = [progress.flatten_config(c) for c in configs]
  keys = sorted(set().union(*flat))
  values = {k: [f.get(k, ABSENT) for f in flat] for k in keys}
  return {k: v for k, v in values.items() if len({_canonical(x) for x in v}) > 1}


def is_seed_key(key: str) -> bool:
  """Whether a dotted config key is a random seed ("seed", "data.seed", ...)."""
  return key.rsplit(".", 1)[-1] == "seed"


def training_length_warning(differ: Mapping[str, Sequence[Any]],
                            labels: Sequence[str]) -> str | None:
  """One warning line when runs differ in `TRAINING_LENGTH_KEYS`, else None.

  Args:
    differ: `settings_that_differ`'s result.
    labels: the runs' labels, in the same order as the values.
  """
  keys = [k for k in TRAINING_LENGTH_KEYS if k in differ]
  if not keys:
    return None
  detail = "; ".join(
      f"{k}: " + ", ".join(f"{lab} {_cell(v)}" for lab, v in zip(labels, differ[k]))
      for k in keys)
  return (f"the runs differ in training length ({detail}); their "
          "recalls and forgetting differ for that reason too, not only by strategy.")


SEED_STATS = ("final_average", "forgetting")


def summary_over_seeds(runs: Sequence[dict],
                       metrics: Sequence[str] = ("i2t_r1", "t2i_r1")) -> dict:
  """Mean, sample std (ddof=1) and n of the continual summary over runs.

  Args:
    runs: results.json contents of runs that differ only in their seed.
    metrics: summary metrics to aggregate.
  Returns:
    {regime: {scope: {metric: {stat: stats.Summary}}}} for the regimes and
    scopes every run has and stat in `SEED_STATS`; None values (forgetting
    after one task) are left out of n (`stats.summarize`).
  """
  out: dict = {}
  first = runs[0]["summary"]
  for regime, scopes in first.items():
    for scope in scopes:
      if not all(scope in r["summary"].get(regime, {}) for r in runs):
        continue
      for metric in metrics:
        for stat in SEED_STATS:
          out.setdefault(regime, {}).setdefault(scope, {}).setdefault(metric, {})[
              stat] = stats.summarize([r["summary"][regime][scope][metric][stat]
                                       for r in runs])
  return out


def _cell(value: Any) -> str:
  """A config value in a markdown table cell."""
  text = value if isinstance(value, str) else _canonical(value)
  return text.replace("|", "\\|")


def _labels(workdirs: list[str]) -> list[str]:
  """Short, unique, file-name-safe labels for workdirs (their base names)."""
  labels = []
  for w in workdirs:
    base = "".join(c if c.isalnum() or c in "-_" else "_"
                   for c in os.path.basename(os.path.normpath(w))) or "run"
    label, n = base, 2
    while label in labels:
      label, n = f"{base}_{n}", n + 1
    labels.append(label)
  return labels


def _summary_rows(label: str, results: dict,
                  scopes: Sequence[str] = ("task_aware", "task_agnostic")) -> list[str]:
  rows = []
  for regime, by_scope in results["summary"].items():
    for scope, metrics in by_scope.items():
      if scope not in scopes:
        continue
      for name in ("i2t_r1", "t2i_r1"):
        s = metrics[name]
        rows.append(f"| {label} | {regime} | {SCOPE_NAMES.get(scope, scope)} | "
                    f"{metric_label(name)} | "
                    f"{_fmt(s['final_average'])} | {_fmt(s['average_incremental'])} | "
                    f"{_fmt(s['forgetting'])} | {_fmt(s['backward_transfer'])} |")
  return rows


_SUMMARY_HEAD = ["| run | regime | scope | metric | final average | average incremental "
                 "| forgetting | backward transfer |", "|---" * 8 + "|"]


def _run_config(workdir: str, results: dict) -> dict:
  # config.json is the workdir's own record (every key, defaults filled in);
  # results.json's copy stands in for a workdir copied without it.
  path = os.path.join(workdir, "config.json")
  return files.read_json(path) if os.path.exists(path) else results["config"]


def seed_groups(differ: Mapping[str, Sequence[Any]], count: int) -> dict[str, list[int]]:
  """Runs that differ only in seed keys, grouped: {setting: run indices}.

  Args:
    differ: `settings_that_differ`'s result over `count` runs.
  Returns:
    One group per combination of the non-seed settings that differ, named
    "key=value, ..." ("every run" when only seeds differ), in first-run order.
  """
  other = [k for k in differ if not is_seed_key(k)]
  groups: dict[str, list[int]] = {}
  for i in range(count):
    name = ", ".join(f"{k}={_cell(differ[k][i])}" for k in other) or "every run"
    groups.setdefault(name, []).append(i)
  return groups


def _over_seeds_markdown(differ: Mapping[str, Sequence[Any]], labels: Sequence[str],
                         runs: Sequence[dict]) -> list[str]:
  """Mean ± sample std over the seeds of each setting that has several, or
  nothing when no setting was run with more than one seed."""
  seeds = [k for k in differ if is_seed_key(k)]
  groups = seed_groups(differ, len(runs))
  if not seeds or all(len(ix) < 2 for ix in groups.values()):
    return []
  lines = ["", "### Mean ± std over seeds", "",
           f"Runs that differ only in {', '.join(f'`{k}`' for k in seeds)} are "
           "grouped: mean ± sample standard deviation (ddof = 1) over each group; n "
           "counts its runs with a value (`ccr_jax.stats`).", "",
           "| setting | runs | regime | scope | metric | final average | forgetting | n |",
           "|---" * 8 + "|"]
  for name, ix in groups.items():
    if len(ix) < 2:
      continue
    over = summary_over_seeds([runs[i] for i in ix])
    members = ", ".join(labels[i] for i in ix)
    for regime, by_scope in over.items():
      for scope, metrics in by_scope.items():
        for metric, by_stat in metrics.items():
          lines.append(
              f"| {name} | {members} | {regime} | {SCOPE_NAMES.get(scope, scope)} | "
              f"{metric_label(metric)} | {stats.format_summary(by_stat['final_average'])} | "
              f"{stats.format_summary(by_stat['forgetting'])} | "
              f"{by_stat['final_average'].n} |")
  return lines


def comparison_markdown(labels: Sequence[str], workdirs: Sequence[str],
                        runs: Sequence[dict], configs: Sequence[Mapping]) -> str:
  """The report's opening over several runs: settings that differ, then results.

  Sections: a training-length warning (`training_length_warning`) when there
  is one; "Settings that differ" (`settings_that_differ`, one column per
  run); "Comparison" with the comparison plot, what each run is and the
  task-aware summary per run; and, for every setting run with several seeds
  (`seed_groups`), the summary's mean ± sample std over them
  (`summary_over_seeds`).

  Args:
    labels, workdirs, runs, configs: per run, its label, workdir,
      results.json and config.json contents.
  """
  differ = settings_that_differ(configs)
  lines = []
  warning = training_length_warning(differ, labels)
  if warning:
    lines += [f"> **Warning: {warning}**", ""]
  lines += ["## Settings that differ", ""]
  if differ:
    lines += ["| setting | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]
    lines += [f"| `{k}` | " + " | ".join(_cell(v) for v in values) + " |"
              for k, values in differ.items()]
  else:
    lines.append("None: the runs share every setting of config.json.")
  lines += ["", "## Comparison", "",
            "![comparison](plots/comparison.png)", "",
            "| run | workdir | strategy | loss | tasks |", "|---|---|---|---|---|"]
  lines += [f"| {lab} | `{w}` | {r['config']['strategy']['name']} | "
            f"{r['config']['loss']['name']} | {r['tasks_completed']} |"
            for lab, w, r in zip(labels, workdirs, runs)]
  lines += ["", *_SUMMARY_HEAD]
  for lab, r in zip(labels, runs):
    lines += _summary_rows(lab, r, scopes=("task_aware",))
  lines += _over_seeds_markdown(differ, labels, runs)
  return "\n".join(lines) + "\n"


def report(workdirs: list[str], report_dir: str) -> str:
  """Writes report_dir/report.md with every table and plot of the workdirs.

  Per workdir: what was run (strategy, loss, data, task groups), the continual
  summary, the R@1 matrices (heatmaps and tables), forgetting curves with the
  fixed and reindex regimes side by side, the training curves (from
  logs/scalars.jsonl) and, when `--mode=evaluate` has run, the forgetting
  analysis. With several workdirs, `comparison_markdown` comes first: the
  settings that differ between them (a warning, also logged, when their
  training length differs), a comparison table and plot, and the mean ± std
  over runs that differ only in their seed. Figures are PNGs under
  report_dir/plots, linked relatively, so the report reads on GitHub.

  Args:
    workdirs: one or more workdirs with results/results.json.
    report_dir: where report.md and plots/ are written.

  Returns:
    The path of report.md.

  Raises:
    FileNotFoundError: a workdir has no results/results.json.
  """
  from ccr_jax import progress  # pylint: disable=g-import-not-at-top

  runs = []
  for w in workdirs:
    path = os.path.join(w, "results", "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} not found: {w} is not a finished ccr_jax workdir (run "
          "--mode=train there first, or check the path).")
    runs.append(files.read_json(path))
  labels = _labels(workdirs)
  plots = os.path.join(report_dir, "plots")
  lines = ["# ccr_jax report", ""]
  if len(runs) > 1:
    configs = [_run_config(w, r) for w, r in zip(workdirs, runs)]
    warning = training_length_warning(settings_that_differ(configs), labels)
    if warning:
      logging.warning("%s", warning)
    plot_strategy_comparison(list(zip(labels, runs)),
                             os.path.join(plots, "comparison.png"))
    lines += [comparison_markdown(labels, workdirs, runs, configs)]
  for label, workdir, results in zip(labels, workdirs, runs):
    cfg = results["config"]
    split = results["task_split"]
    lines += [f"## {label}", "",
              f"Workdir `{workdir}`: strategy `{cfg['strategy']['name']}`, loss "
              f"`{cfg['loss']['name']}`, data `{cfg['data']['name']}`, "
              f"{results['tasks_completed']} of {split['num_tasks']} tasks, "
              f"{results['devices']['count']} × {results['devices']['kind']}.", "",
              "| task | categories | train | val | test |", "|---|---|---|---|---|"]
    lines += [f"| {t['name']} | {', '.join(map(str, t['category_names']))} | "
              f"{t['num_train']} | {t['num_val']} | {t['num_test']} |"
              for t in split["tasks"]]
    lines += ["", f"Assignment: {split['assignment_rule']}", "",
              "### Continual summary", "", *_SUMMARY_HEAD, *_summary_rows(label, results)]
    figures = {"r1": plot_r1_matrices, "forgetting": plot_forgetting_curves}
    for kind, fn in figures.items():
      fn(results, os.path.join(plots, f"{label}_{kind}.png"))
    lines += ["", "### R@1 matrices (task-aware)", "",
              "Rows: after training task t; columns: test task j.", "",
              f"![r1](plots/{label}_r1.png)", "",
              "### Forgetting curves: fixed vs reindex", "",
              f"![forgetting](plots/{label}_forgetting.png)"]
    for regime, scopes in results["metrics"].items():
      for direction in ("i2t", "t2i"):
        lines += ["", f"#### {regime}, task-aware, {DIRECTION_NAMES[direction]} R@1",
                  "", matrix_table(scopes["task_aware"][direction]["r1"])]
    scalars_file = progress.scalars_path(workdir)
    if os.path.exists(scalars_file):
      scalars = progress.read_scalars(scalars_file)
      if loss_series(scalars):
        plot_training_curves(scalars, os.path.join(plots, f"{label}_training.png"),
                             cfg["train"]["steps_per_task"])
        lines += ["", "### Training curves", "", f"![training](plots/{label}_training.png)"]
    evaluate = os.path.join(workdir, "results", "evaluate.json")
    if os.path.exists(evaluate) and "analysis" in (ev := files.read_json(evaluate)):
      plot_analysis(ev["analysis"], plots, f"{label}_evaluate")
      # Two heading levels down: the analysis sits under this run's heading.
      lines += ["##" + line if line.startswith("#") else line
                for line in analysis_markdown(ev["analysis"], "plots",
                                              f"{label}_evaluate").splitlines()]
    else:
      lines += ["", f"(No forgetting analysis: run `python -m ccr_jax.main "
                f"--mode=evaluate --workdir={workdir}` for the compatibility matrix, "
                "tower attribution, drift and partial reindexing.)"]
    lines.append("")
  out = os.path.join(report_dir, "report.md")
  files.write_atomic(out, "\n".join(lines) + "\n")
  return out
