"""The report and its figures (ccr_jax/reporting.py), on hand-built results.

No experiment runs here: results.json, config.json, scalars.jsonl and the
forgetting analysis are built from small literal values (the analysis by
`analysis.analyze` on random embeddings), so each test takes about a second.
Figures are checked as matplotlib objects, caught on their way to PNG.
"""

import json
import logging
import os
import re

import numpy as np
import pytest

from ccr_jax import analysis as analysis_lib
from ccr_jax import reporting
from ccr_jax import stats

DIRECTIONS = ("i2t", "t2i")


def _matrix(num_tasks: int, base: float) -> list[list[float | None]]:
  """A lower-triangular R[t][j] with distinct values, None above the diagonal."""
  return [[base + 10 * t - 3 * j if j <= t else None for j in range(num_tasks)]
          for t in range(num_tasks)]


def _summary(final: float, forgetting: float | None) -> dict:
  stats = lambda f, g: {"final_average": f, "average_incremental": f + 1,  # noqa: E731
                        "forgetting": g, "backward_transfer": None if g is None else -g}
  return {regime: {scope: {"i2t_r1": stats(final, forgetting),
                           "t2i_r1": stats(final / 2, forgetting),
                           "rsum": stats(3 * final, forgetting)}
                   for scope in ("task_aware", "task_agnostic")}
          for regime in ("fixed", "reindex")}


def _config(**changes) -> dict:
  config = {"seed": 0, "strategy": {"name": "finetune", "lwf": {"strength": 0.1}},
            "loss": {"name": "vse0"}, "data": {"name": "synthetic", "seed": 0},
            "train": {"steps_per_task": 4, "batch_size": 16, "log_every": 2},
            "eval": {"ks": [1, 5, 10]}}
  for dotted, value in changes.items():
    *path, key = dotted.split(".")
    node = config
    for part in path:
      node = node[part]
    node[key] = value
  return config


def _results(config: dict, num_tasks: int = 3, final: float = 40.0,
             forgetting: float | None = 5.0) -> dict:
  metrics = {regime: {scope: {d: {"r1": _matrix(num_tasks, 20.0 + i)}
                              for i, d in enumerate(DIRECTIONS)}
                      for scope in ("task_aware", "task_agnostic")}
             for regime in ("fixed", "reindex")}
  tasks = [{"name": f"task_{t + 1}", "category_names": [f"c{t}"], "num_train": 8,
            "num_val": 2, "num_test": 4} for t in range(num_tasks)]
  return {"config": config, "metrics": metrics, "summary": _summary(final, forgetting),
          "tasks_completed": num_tasks, "devices": {"count": 1, "kind": "cpu"},
          "task_split": {"num_tasks": num_tasks, "tasks": tasks,
                         "assignment_rule": "dominant category"}}


def _workdir(root, name: str, config: dict, results: dict | None = None) -> str:
  workdir = os.path.join(str(root), name)
  os.makedirs(os.path.join(workdir, "results"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "results", "results.json"), "w") as f:
    json.dump(results or _results(config), f)
  return workdir


def _analysis(num_tasks: int = 3) -> dict:
  """A real forgetting analysis of random embeddings: 4 images, 2 captions each."""
  rng = np.random.default_rng(0)
  cpi, dim, ks = 2, 6, (1, 5)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  queries, galleries = {}, {}
  for j in range(1, num_tasks + 1):
    image_ids = np.arange(4) + 10 * j
    text_ids = np.repeat(image_ids, cpi) * cpi + np.tile(np.arange(cpi), 4)
    images, texts = rng.normal(size=(4, dim)), rng.normal(size=(8, dim))
    for s in range(j, num_tasks + 1):
      # Later snapshots drift the embeddings a little more each time.
      img = unit(images + 0.3 * (s - j) * rng.normal(size=images.shape))
      txt = unit(texts + 0.3 * (s - j) * rng.normal(size=texts.shape))
      queries[(j, s)] = {"images": {"emb": img, "item_ids": image_ids,
                                    "owners": image_ids},
                         "texts": {"emb": txt, "item_ids": text_ids,
                                   "owners": text_ids // cpi}}
      galleries[(j, s, "images")] = (img.astype(np.float32), image_ids)
      galleries[(j, s, "texts")] = (txt.astype(np.float32), text_ids)
  opts = analysis_lib.settings({**analysis_lib.DEFAULTS, "budgets": (0.0, 0.5, 1.0),
                                "uniformity_items": 8})
  return analysis_lib.analyze(queries, galleries, opts, ks=ks, captions_per_image=cpi,
                              seed=0)


def _scalars_jsonl(workdir: str, steps_per_task: int, num_tasks: int,
                   term: float = 0.5) -> None:
  path = os.path.join(workdir, "logs", "scalars.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for step in range(2, steps_per_task * num_tasks + 1, 2):
      scalars = {"train/loss": 10.0 / step + term, "train/contrastive": 10.0 / step,
                 "train/lwf_kl": term, "train/grad_norm": 100.0,
                 "train/learning_rate": 1e-3, "perf/pairs_per_s": 500.0}
      f.write(json.dumps({"step": step, "time": 0.0, "scalars": scalars}) + "\n")


@pytest.fixture
def figures(monkeypatch):
  """{file name: figure} of every figure saved; the PNGs are still written."""
  caught = {}
  save = reporting._save_figure

  def catching_save(fig, path):
    save(fig, path)  # Removes empty panels first, as the real output does.
    caught[os.path.basename(path)] = fig

  monkeypatch.setattr(reporting, "_save_figure", catching_save)
  return caught


# Keys of results.json a reader should not have to decode in a figure.
RAW_NAME = re.compile(r"\b(i2t|t2i|exact_r\d+|r\d+|task_aware|task_agnostic|"
                      r"medr|meanr)\b")


def _texts(ax) -> list[str]:
  return [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]


def _check_readable(name: str, fig) -> None:
  """The rules every report figure follows (see the reporting module)."""
  for ax in fig.axes:
    colorbar = hasattr(ax, "_colorbar")
    assert colorbar or ax.lines or ax.images or ax.collections, f"{name}: empty panel"
    for text in _texts(ax):
      assert not RAW_NAME.search(text), f"{name}: raw key in {text!r}"
    if ax.images:  # A heatmap: its colorbar and its scope.
      assert ax.images[0].colorbar is not None, f"{name}: heatmap without colorbar"
      assert re.search(r"task-(aware|agnostic)", ax.get_title()), ax.get_title()
    if ax.lines:
      assert ax.get_legend() is not None, f"{name}: line plot without legend"
      labels = [t.get_text() for t in ax.get_legend().get_texts()]
      assert all(labels) and not any(RAW_NAME.search(t) for t in labels), labels
    for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
      if re.search(r"task|snapshot", label) and "step" not in label:
        ticks = [t.get_text() for t in axis.get_ticklabels()]
        # Integer task (snapshot) numbers 1..T, every one, nothing else.
        assert ticks == [str(i) for i in range(1, len(ticks) + 1)], (name, label, ticks)


# --------------------------------------------------------------------- names


def test_metric_labels_are_reader_names():
  assert reporting.metric_label("r1") == "R@1"
  assert reporting.metric_label("exact_r10") == "R@10 (exact)"
  assert reporting.metric_label("fold_r5") == "R@5 (1K folds)"
  assert reporting.metric_label("i2t_r1") == "image→text R@1"
  assert reporting.metric_label("t2i_exact_r1") == "text→image R@1 (exact)"
  assert reporting.metric_label("medr") == "median rank"
  assert reporting.metric_label("fold_meanr") == "mean rank (1K folds)"
  assert reporting.metric_label("index_recall_at_10") == "index recall@10"
  assert reporting.metric_label("rsum") == "rsum"  # Already a reader's name.


# ------------------------------------------------------------------- figures


def test_every_report_figure_is_readable(tmp_path, figures):
  workdir = _workdir(tmp_path, "run", _config())
  _scalars_jsonl(workdir, steps_per_task=4, num_tasks=3)
  with open(os.path.join(workdir, "results", "evaluate.json"), "w") as f:
    json.dump({"analysis": _analysis()}, f)
  reporting.report([workdir], str(tmp_path / "out"))
  assert set(figures) == {f"run_{k}.png" for k in (
      "r1", "forgetting", "training", "evaluate_compatibility", "evaluate_towers",
      "evaluate_drift", "evaluate_partial_reindex")}
  for name, fig in figures.items():
    _check_readable(name, fig)
  # 2 x 2 heatmaps (direction x regime, or x task) each with its colorbar.
  assert len(figures["run_r1.png"].axes) == 8
  assert len(figures["run_evaluate_compatibility.png"].axes) == 2 * 3 * 2
  titles = [ax.get_title() for ax in figures["run_r1.png"].axes if ax.images]
  assert "fixed: image→text R@1\n(task-aware)" in titles
  compat = [ax.get_title() for ax in figures["run_evaluate_compatibility.png"].axes]
  assert "task 2: text→image R@1 (exact)\n(task-aware)" in compat


def test_a_grid_panel_left_empty_is_removed(tmp_path):
  plt = reporting._pyplot()
  fig, axes = plt.subplots(1, 3)
  axes[0].plot([1, 2], [1, 2])
  reporting._heatmap(axes[1], [[1.0]], "t (task-aware)", "x", "y")
  path = str(tmp_path / "f.png")
  kept = [axes[0], axes[1]]
  reporting._save_figure(fig, path)
  assert axes[2] not in fig.axes and all(ax in fig.axes for ax in kept)
  assert os.path.getsize(path) > 1000


def test_training_curves_are_log_scale_with_tasks_named(tmp_path, figures):
  path = str(tmp_path / "training.png")
  scalars = {"train/loss": [(2, 3.0), (4, 2.0), (6, 1.5)],
             "train/contrastive": [(2, 2.9), (4, 1.9), (6, 1.4)],
             "train/lwf_kl": [(2, 0.1), (4, 0.1), (6, 0.1)],
             "train/grad_norm": [(2, 50.0), (4, 40.0), (6, 30.0)],
             "train/temperature": [(2, 0.07), (4, 0.07), (6, 0.07)],
             "perf/pairs_per_s": [(2, 100.0), (4, 100.0), (6, 100.0)]}
  reporting.plot_training_curves(scalars, path, steps_per_task=3)
  (ax,) = figures["training.png"].axes
  assert ax.get_yscale() == "log"
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  # Diagnostics are not losses: no gradient norm or temperature on a loss axis.
  assert legend == ["loss (total)", "contrastive", "lwf_kl"]
  assert ax.get_xlim() == (0.0, 6.0)  # Two whole tasks of 3 steps.
  (top,) = ax.child_axes
  assert [t.get_text() for t in top.get_xticklabels()] == ["task 1", "task 2"]
  np.testing.assert_allclose(top.get_xticks(), [1.5, 4.5])  # Task midpoints.
  # A term at or below zero cannot go on a log axis: symlog, and the label says so.
  scalars["train/lwf_kl"] = [(2, 0.1), (4, 0.0), (6, -0.05)]
  reporting.plot_training_curves(scalars, path, steps_per_task=3)
  (ax,) = figures["training.png"].axes
  assert ax.get_yscale() == "symlog" and "symlog" in ax.get_ylabel()


def _partial(draws: dict | None) -> dict:
  mean = {"exact_r1": [10.0, 20.0, 30.0]}
  std = {"exact_r1": [1.0, 2.0, 4.0]}
  curves = {"random": {d: {"1": mean, "mean": mean, "std": std} for d in DIRECTIONS},
            "drift": {d: {"1": mean, "mean": mean} for d in DIRECTIONS}}
  out = {"query_snapshot": 2, "budgets": [0.0, 0.5, 1.0], "curves": curves}
  if draws is not None:
    out["draws"] = draws
  return out


def test_partial_reindex_band_is_mean_plus_minus_std_over_draws(tmp_path, figures):
  reporting.plot_partial_reindex(_partial({"random": 5, "drift": 1}), "exact_r1",
                                 str(tmp_path / "p.png"))
  fig = figures["p.png"]
  _check_readable("p.png", fig)
  for ax in fig.axes:
    (band,) = ax.collections  # Only the random policy has several draws.
    lower_upper = band.get_paths()[0].vertices[:, 1]
    assert lower_upper.min() == pytest.approx(9.0)  # 10 - 1 at 0 %.
    assert lower_upper.max() == pytest.approx(34.0)  # 30 + 4 at 100 %.
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["random (mean ± std, 5 draws)", "drift (1 draw)"]
  assert not fig.texts  # No "one draw" note when a band is drawn.
  # Today's analysis: one draw per budget, so no band and a note saying why.
  reporting.plot_partial_reindex(_partial(None), "exact_r1", str(tmp_path / "p.png"))
  fig = figures["p.png"]
  assert not any(ax.collections for ax in fig.axes)
  assert "one draw per budget" in fig.texts[0].get_text()
  md = reporting.analysis_markdown(_analysis(2) | {"partial_reindex": _partial(
      {"random": 5})}, "plots", "x")
  assert "| 50 % | 20.0 ± 2.0 | 20.0 ± 2.0 | 20.0 | 20.0 |" in md


def test_one_task_analysis_has_no_partial_reindex_figure(tmp_path, figures):
  one = _analysis(num_tasks=1)
  assert reporting.analysis_plots(one) == ("compatibility", "towers", "drift")
  paths = reporting.plot_analysis(one, str(tmp_path), "e")
  assert sorted(os.path.basename(p) for p in paths) == [
      "e_compatibility.png", "e_drift.png", "e_towers.png"]
  for name, fig in figures.items():
    _check_readable(name, fig)
  md = reporting.analysis_markdown(one, "plots", "e")
  assert "e_partial_reindex.png" not in md and "No old gallery" in md


# --------------------------------------------------- several workdirs compared


def test_settings_that_differ_are_dotted_keys_with_each_runs_value():
  a = _config()
  b = _config(**{"train.steps_per_task": 8, "strategy.name": "lwf"})
  b["eval"]["ks"] = (1, 5, 10)  # A tuple equals config.json's list.
  b["train"]["new_key"] = 1
  differ = reporting.settings_that_differ([a, b])
  assert list(differ) == ["strategy.name", "train.new_key", "train.steps_per_task"]
  assert differ["train.steps_per_task"] == [4, 8]
  assert differ["train.new_key"] == [reporting.ABSENT, 1]
  assert reporting.settings_that_differ([a, _config()]) == {}


def test_report_warns_when_training_length_differs(tmp_path, figures, caplog):
  short = _workdir(tmp_path, "short", _config())
  long = _workdir(tmp_path, "long", _config(**{"train.steps_per_task": 8,
                                               "strategy.name": "lwf"}))
  with caplog.at_level(logging.WARNING):
    out = reporting.report([short, long], str(tmp_path / "out"))
  md = open(out).read()
  warning = ("the runs differ in training length (train.steps_per_task: "
             "short 4, long 8)")
  assert f"**Warning: {warning}" in md and warning in caplog.text
  assert "WARNING:" not in caplog.text.replace("WARNING  ", "")  # Not twice.
  section = md[md.index("## Settings that differ"):md.index("## Comparison")]
  assert "| setting | short | long |" in section
  assert "| `train.steps_per_task` | 4 | 8 |" in section
  assert "| `strategy.name` | finetune | lwf |" in section
  assert "seed" not in section
  assert "Mean ± std" not in md  # Not seeds of one experiment.
  assert "comparison.png" in figures
  for name, fig in figures.items():
    _check_readable(name, fig)


def test_no_warning_when_only_other_settings_differ():
  configs = [_config(), _config(**{"strategy.name": "lwf"})]
  runs = [_results(c) for c in configs]
  md = reporting.comparison_markdown(["a", "b"], ["/a", "/b"], runs, configs)
  assert "WARNING" not in md
  assert "| `strategy.name` | finetune | lwf |" in md


def test_runs_differing_only_in_seed_get_mean_and_sample_std(tmp_path):
  finals, forgettings = [40.0, 44.0, 49.0], [5.0, 2.0, 8.0]
  configs = [_config(seed=s) for s in (0, 1, 2)]
  configs[2]["data"]["seed"] = 7  # A data seed is a seed too.
  workdirs = [_workdir(tmp_path, f"seed{i}", c, _results(c, final=f, forgetting=g))
              for i, (c, f, g) in enumerate(zip(configs, finals, forgettings))]
  md = open(reporting.report(workdirs, str(tmp_path / "out"))).read()
  assert "| `seed` | 0 | 1 | 2 |" in md and "| `data.seed` | 0 | 0 | 7 |" in md
  # Independent reference: NumPy's sample std of the hand-set values.
  fa = f"{np.mean(finals):.1f} ± {np.std(finals, ddof=1):.1f}"
  fg = f"{np.mean(forgettings):.1f} ± {np.std(forgettings, ddof=1):.1f}"
  assert fa == "44.3 ± 4.5" and fg == "5.0 ± 3.0"
  assert "### Mean ± std over seeds" in md
  every = "| every run | seed0, seed1, seed2 |"
  assert f"{every} fixed | task-aware | image→text R@1 | {fa} | {fg} | 3 |" in md
  half = [f / 2 for f in finals]
  fa_t2i = f"{np.mean(half):.1f} ± {np.std(half, ddof=1):.1f}"
  assert f"{every} reindex | task-agnostic | text→image R@1 | {fa_t2i} | {fg} | 3 |" in md
  # Per-run rows stay.
  for i, f in enumerate(finals):
    assert f"| seed{i} | fixed | task-aware | image→text R@1 | {f:.1f} |" in md


def test_strategies_times_seeds_get_mean_and_std_per_strategy(tmp_path):
  # Issue 25 D7: a finetune,ewc x seeds 0,1 sweep report had no mean ± std.
  cells = [("finetune", 0, 40.0), ("finetune", 1, 44.0), ("ewc", 0, 50.0),
           ("ewc", 1, 53.0)]
  workdirs = []
  for name, seed, final in cells:
    config = _config(**{"strategy.name": name, "seed": seed})
    workdirs.append(_workdir(tmp_path, f"{name}{seed}", config,
                             _results(config, final=final, forgetting=1.0)))
  md = open(reporting.report(workdirs, str(tmp_path / "out"))).read()
  for name, finals in (("finetune", [40.0, 44.0]), ("ewc", [50.0, 53.0])):
    fa = f"{np.mean(finals):.1f} ± {np.std(finals, ddof=1):.1f}"
    assert (f"| strategy.name={name} | {name}0, {name}1 | fixed | task-aware | "
            f"image→text R@1 | {fa} | 1.0 ± 0.0 | 2 |") in md, md


def test_summary_over_seeds_counts_only_runs_with_a_value():
  runs = [_results(_config(), final=f, forgetting=g)
          for f, g in ((10.0, None), (20.0, 4.0), (30.0, None))]
  s = reporting.summary_over_seeds(runs)["fixed"]["task_aware"]["i2t_r1"]
  assert (s["final_average"].mean, s["final_average"].n) == (20.0, 3)
  assert s["final_average"].std == pytest.approx(10.0)  # ddof = 1
  assert s["forgetting"] == stats.Summary(4.0, None, 1)  # One value: no std.
  assert stats.format_summary(s["forgetting"]) == "4.0"


def test_gallery_growth_is_old_tasks_as_learnt_minus_full_gallery_at_the_end():
  from ccr_jax.run import results as results_lib  # pylint: disable=import-outside-toplevel
  n = None
  # Three tasks; rows: after task t; columns: task j. As learnt, task j's
  # queries search galleries 1..j; task-agnostic, galleries 1..t.
  agnostic = [[50.0, n, n], [40.0, 60.0, n], [30.0, 45.0, 70.0]]
  as_learnt = [[50.0, n, n], [48.0, 60.0, n], [44.0, 52.0, 70.0]]
  metrics = {"fixed": {
      "task_agnostic": {"i2t": {"r1": agnostic}, "t2i": {"r1": agnostic}},
      "task_agnostic_as_learnt": {"i2t": {"r1": as_learnt}, "t2i": {"r1": as_learnt}}},
      "reindex": {"task_agnostic": {"i2t": {"r1": agnostic}, "t2i": {"r1": agnostic}}}}
  growth = results_lib.gallery_growth(metrics)
  # Old tasks 1 and 2 after task 3: (44 - 30) and (52 - 45), mean 10.5.
  assert growth["fixed"] == {"i2t_r1": 10.5, "t2i_r1": 10.5}
  # A run begun before the as-learnt scope existed has none.
  assert growth["reindex"] == {"i2t_r1": None, "t2i_r1": None}


def test_a_line_identical_to_an_earlier_one_says_so_in_the_legend():
  # Identical lines (fixed = reindex after one task, a term equal to the
  # total loss) hid each other behind two legend entries.
  drawn = {}
  assert reporting._same_as(drawn, "a fixed", [1.0, 2.0]) == ""  # pylint: disable=protected-access
  assert reporting._same_as(drawn, "a reindex", [1.0, 2.0]) == " (= a fixed)"  # pylint: disable=protected-access
  assert reporting._same_as(drawn, "b fixed", [1.0, 2.5]) == ""  # pylint: disable=protected-access

