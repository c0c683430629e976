"""Results files: readable tables, plots and the report over workdirs."""

import os
from typing import Any

import numpy as np

from ccr_jax import files


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
      ax.set_title(f"{regime}, {direction} R@1 (task-aware)", fontsize=9)
      ax.set_xlabel("after training task")
      ax.set_xticks(range(1, len(m) + 1))
      if col == 0:
        ax.set_ylabel("R@1 (%)")
  axes[0][0].legend(fontsize=7)
  _save_figure(fig, path)


def plot_training_curves(scalars: dict[str, list[tuple[int, float]]], path: str,
                         steps_per_task: int) -> None:
  """Training loss terms (log-window means) over global steps, tasks marked."""
  plt = _pyplot()
  names = sorted(n for n in scalars if n.startswith("train/") and
                 n not in ("train/learning_rate", "train/grad_norm",
                           "train/mean_positive"))
  fig, ax = plt.subplots(figsize=(7.5, 3.4))
  last = 0
  for name in names:
    steps, values = zip(*scalars[name])
    ax.plot(steps, values, label=name[len("train/"):])
    last = max(last, max(steps))
  for boundary in range(steps_per_task, last, steps_per_task):
    ax.axvline(boundary, color="grey", lw=0.6, ls=":")
  ax.set_xlabel("global step (dotted: task boundaries)")
  ax.set_ylabel("loss (log-window mean)")
  ax.legend(fontsize=7)
  _save_figure(fig, path)


def plot_strategy_comparison(runs: list[tuple[str, dict]], path: str) -> None:
  """Average task-aware R@1 over seen tasks after each task, one line per workdir."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6), sharey=True)
  for ax, direction in zip(axes, ("i2t", "t2i")):
    for label, results in runs:
      for regime, style in (("fixed", "--"), ("reindex", "-")):
        if regime not in results["metrics"]:
          continue
        m = results["metrics"][regime]["task_aware"][direction]["r1"]
        avg = [float(np.mean([v for v in m[t][:t + 1]])) for t in range(len(m))]
        ax.plot(range(1, len(m) + 1), avg, ls=style, marker="o",
                label=f"{label} {regime}")
    ax.set_title(f"{direction}: average R@1 over seen tasks", fontsize=9)
    ax.set_xlabel("after training task")
  axes[0].set_ylabel("R@1 (%)")
  axes[1].legend(fontsize=7)
  _save_figure(fig, path)


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


def _summary_rows(label: str, results: dict) -> list[str]:
  rows = []
  for regime, scopes in results["summary"].items():
    for scope, metrics in scopes.items():
      for name in ("i2t_r1", "t2i_r1"):
        s = metrics[name]
        rows.append(f"| {label} | {regime} | {scope} | {name} | "
                    f"{_fmt(s['final_average'])} | {_fmt(s['average_incremental'])} | "
                    f"{_fmt(s['forgetting'])} | {_fmt(s['backward_transfer'])} |")
  return rows


_SUMMARY_HEAD = ["| run | regime | scope | metric | final average | average incremental "
                 "| forgetting | backward transfer |", "|---" * 8 + "|"]


def report(workdirs: list[str], report_dir: str) -> str:
  """Writes report_dir/report.md with every table and plot of the workdirs.

  Per workdir: what was run (strategy, loss, data, task groups), the continual
  summary, the R@1 matrices (heatmaps and tables), forgetting curves with the
  fixed and reindex regimes side by side, the training curves (from
  logs/scalars.jsonl) and, when `--mode=evaluate` has run, the forgetting
  analysis. With several workdirs, a comparison table and plot come first.
  Figures are PNGs under report_dir/plots, linked relatively, so the report
  reads on GitHub.

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
    plot_strategy_comparison(list(zip(labels, runs)),
                             os.path.join(plots, "comparison.png"))
    lines += ["## Comparison", "",
              "![comparison](plots/comparison.png)", "",
              "| run | workdir | strategy | loss | tasks |", "|---|---|---|---|---|"]
    lines += [f"| {lab} | `{w}` | {r['config']['strategy']['name']} | "
              f"{r['config']['loss']['name']} | {r['tasks_completed']} |"
              for lab, w, r in zip(labels, workdirs, runs)]
    lines += ["", *_SUMMARY_HEAD]
    for lab, r in zip(labels, runs):
      lines += [row for row in _summary_rows(lab, r) if "| task_aware |" in row]
    lines.append("")
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
        lines += ["", f"#### {regime}, task-aware, {direction} R@1", "",
                  matrix_table(scopes["task_aware"][direction]["r1"])]
    scalars_file = progress.scalars_path(workdir)
    if os.path.exists(scalars_file):
      scalars = progress.read_scalars(scalars_file)
      if any(n.startswith("train/") for n in scalars):
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
