r"""Every continual strategy on the embedded benchmark, over seeds: the comparison table.

  # 1. each tunable strategy's strength on the validation split (seed 0),
  #    grids extended until the chosen value is bracketed:
  python benchmarks/strategies.py --stage=select --setting=scratch
  python benchmarks/strategies.py --stage=select --setting=pretrained
  # 2. every strategy with the chosen strengths on the test split, 3 seeds:
  python benchmarks/strategies.py --stage=final --setting=scratch
  python benchmarks/strategies.py --stage=final --setting=pretrained
  # 3. the table (both settings) from the runs log:
  python benchmarks/strategies.py --stage=table

Every run appends one JSON line to --log (benchmarks/results/strategies_runs.jsonl);
a run whose line is already there is not run again, so an interrupted stage
resumes and stages may be split over processes (--strategies, --seeds). The
table is mean ± std over seeds of final average R@1, forgetting and backward
transfer in both indexing regimes and both gallery scopes, written with the
commit and commands that produced it to benchmarks/results/strategies.md.
Settings: `scratch` is `configs/default.py`, `pretrained` its `:pretrained`
variant (towers first trained on held-out categories), both with shorter
tasks (`sweep_config`) so a run takes about half a minute on 2 CPU cores.
"""

import json
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import harness  # noqa: E402
from ccr_jax import stats  # noqa: E402
from ccr_jax import strategies  # noqa: E402
from ccr_jax.run import loop  # noqa: E402
from configs import default  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "final", ["select", "final", "table", "sweep"],
                  "select: strengths on val; final: every strategy on test over "
                  "--seeds; table: the table from --log; sweep: print the "
                  "launch.sweep commands that run the final stage elsewhere "
                  "(a cluster: add --mode=slurm to each).")
flags.DEFINE_enum("setting", "scratch", ["scratch", "pretrained"],
                  "Towers from random init, or pretrained on held-out categories.")
flags.DEFINE_string("workroot", "/tmp/ccr_strategies", "One workdir per run under here.")
flags.DEFINE_string("log", os.path.join(HERE, "results", "strategies_runs.jsonl"),
                    "JSON lines of every run (read to skip finished runs).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of the final stage.")
flags.DEFINE_list("strategies", ["finetune", "joint", "freeze", "ewc", "online_ewc",
                                 "mas", "l2", "si", "lwf", "replay", "agem", "der",
                                 "der@der.beta=0", "compat", "query_adapter",
                                 "ewc+replay"],
                  "Strategies of the final stage (and of the table, in this order); "
                  "'name@section.field=value' is a variant with that setting fixed "
                  "(der@der.beta=0 is DER, der alone DER++).")
flags.DEFINE_list("select", None, "--stage=select: only these grids (default all).")
flags.DEFINE_list("select_seeds", ["0"], "--stage=select: training seeds each candidate "
                  "runs with; it is scored by the mean over them, and the table shows "
                  "each candidate's spread (0,1 shows whether the choice is stable).")
flags.DEFINE_integer("val_per_category", 0, "--stage=select: validation images per "
                     "shape (0: the config's, 10 = 30 per task). Train and test images "
                     "stay the same (each example is rendered from its own key).")
flags.DEFINE_string("out", os.path.join(HERE, "results"), "Where tables and JSON go.")
flags.DEFINE_integer("table_cores", 1, "--stage=table: only runs made on this many CPU "
                     "cores (pin with taskset; pairs need one count).")
flags.DEFINE_bool("quick", False, "Tiny config, 1 seed, 1-value grids: a smoke test.")

# Strength grids searched on the validation split: section.field -> first
# candidates. When the best is at an edge the grid grows by the same ratio on
# that side (up to MAX_EXTEND times), so the chosen value is bracketed.
GRID = {
    "ewc": ("ewc.strength", (30.0, 300.0, 3000.0)),
    "mas": ("mas.strength", (100.0, 1000.0, 10000.0)),
    "l2": ("l2.strength", (0.003, 0.03, 0.3)),
    "si": ("si.strength", (0.5, 5.0, 50.0)),  # c of Zenke et al.
    "lwf": ("lwf.strength", (0.1, 1.0, 10.0)),
    "der": ("der.alpha", (0.3, 3.0, 30.0)),
    "der@der.beta=0": ("der.alpha", (0.3, 3.0, 30.0)),
    "compat": ("compat.strength", (0.03, 0.1, 0.3)),
    # Larger ridge: closer to the identity map, i.e. fine-tuning's queries.
    "query_adapter": ("query_adapter.ridge", (0.1, 1.0, 10.0)),
}
MAX_EXTEND = 3
# Strategies reading another's section use its chosen value.
SHARES = {"online_ewc": "ewc", "ewc+replay": "ewc"}


def sweep_config(setting: str, quick: bool):
  """configs/default.py (or :pretrained) with 200-step tasks at batch 64."""
  variant = "tiny" if quick else ("pretrained" if setting == "pretrained" else None)
  config = default.get_config(variant)
  if quick and setting == "pretrained":
    config = default.get_config("pretrained,tiny")
  # One rendered benchmark for every run (it is the same data).
  config.data.data_dir = os.path.join(FLAGS.workroot, "tfds")
  if not quick:
    harness.short_tasks(config)
  return config


def _set(config, dotted: str, value) -> None:
  section, field = dotted.split(".")
  config.strategy[section][field] = value


def parse_label(label: str) -> tuple[str, dict]:
  """'der@der.beta=0' -> ('der', {'der.beta': 0.0}); 'ewc' -> ('ewc', {})."""
  name, _, fixed = label.partition("@")
  overrides = {}
  for item in filter(None, fixed.split(",")):
    key, _, value = item.partition("=")
    overrides[key] = float(value)
  return name, overrides


def selection_score(results: dict) -> float:
  """Mean task-aware final-average R@1 over both regimes and directions."""
  s = results["summary"]
  return float(np.mean([s[r]["task_aware"][f"{d}_r1"]["final_average"]
                        for r in s for d in ("i2t", "t2i")]))


def cores(line: dict) -> int:
  """CPU cores a logged run had: lines from before `cpu_cores` was recorded
  ran unpinned on the 2-core machines this benchmark has used."""
  return line.get("cpu_cores") or 2


def _key(line: dict) -> tuple:
  # The core count is part of a run's identity: XLA's CPU numerics depend on
  # its thread count, so a 1-core rerun is a different run, not a duplicate.
  return (line["setting"], line["strategy"], line["seed"], line["split"],
          json.dumps(line["overrides"], sort_keys=True), line.get("val_per_category", 0),
          cores(line))


def is_current(line: dict) -> bool:
  """Whether a logged run was made by the strategy as it is now: every setting
  it recorded is still a key of its config section. A strategy that lost a
  key was redefined (agem's `ratio` gave way to `memory_batch`, der's
  `strength` to `alpha` and `beta`): its older lines are another method's
  and are neither reused nor tabulated. (A part may record fewer keys than
  its section holds: ewc does not record online EWC's `decay`.)"""
  recorded = line.get("settings", {}).get("settings", {})
  defaults = strategies.default_config()
  for part in parse_label(line["strategy"])[0].split("+"):
    section = strategies.REGISTRY[part].section
    if section and section in recorded and (
        not set(recorded[section]) <= set(defaults[section].keys())):
      return False
  return True


def _done() -> dict:
  if not os.path.exists(FLAGS.log):
    return {}
  lines = [json.loads(l) for l in open(FLAGS.log) if l.startswith("{")]
  return {_key(l): l for l in lines if is_current(l)}


def run(name: str, seed: int, split: str, overrides: dict, quick: bool) -> dict:
  """One experiment (or its logged line); returns its JSON line."""
  line = {"setting": FLAGS.setting, "strategy": name, "seed": seed, "split": split,
          "overrides": overrides,
          # XLA's CPU results depend on its thread count: a run pinned to
          # one core (taskset) differs from a 2-core one by up to ~1 point
          # of R@1 per seed, so paired comparisons need equal counts.
          "cpu_cores": len(os.sched_getaffinity(0))}
  if split == "val" and FLAGS.val_per_category:
    line["val_per_category"] = FLAGS.val_per_category
  done = {} if quick else _done()
  if _key(line) in done:
    return done[_key(line)]
  config = sweep_config(FLAGS.setting, quick)
  config.seed = seed
  config.strategy.name = parse_label(name)[0]
  config.eval.split = split
  if line.get("val_per_category"):
    config.data.val_per_category = line["val_per_category"]
  for dotted, value in overrides.items():
    _set(config, dotted, value)
  tag = "_".join([FLAGS.setting, name.split("@")[0].replace("+", "-"), split, f"s{seed}"]
                 + [f"{k.replace('.', '-')}{v:g}" for k, v in sorted(overrides.items())]
                 # Not the workdir of the same run on another core count.
                 + ([] if cores(line) == 2 else [f"c{cores(line)}"]))
  workdir = os.path.join(FLAGS.workroot, tag)
  # Every pretrained run of one seed pretrains identically: pretrain once.
  fill = harness.shared_pretraining(
      os.path.join(FLAGS.workroot, f"pretrained_cache_s{seed}"), workdir)
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, workdir)
  fill()
  line.update(wall_s=round(time.perf_counter() - start, 1),
              summary=results["summary"], settings=results["strategy"],
              gallery_growth=results.get("gallery_growth"),
              commit=harness.git_commit())
  print(json.dumps(line), flush=True)
  if not quick:
    with open(FLAGS.log, "a") as f:
      f.write(json.dumps(line) + "\n")
  return line


def select_one(name: str, quick: bool, seeds: tuple[int, ...] = (0,),
               val_per_category: int = 0) -> dict:
  """The best value of `name`'s grid on val (mean score over `seeds`), the
  grid grown until it is bracketed; `val_per_category` is recorded (`run`
  reads the flag)."""
  dotted, grid = GRID[name]
  grid = list(grid[:1] if quick else grid)
  ratio = grid[1] / grid[0] if len(grid) > 1 else 10.0
  seeds = [0] if quick else list(seeds)
  by_seed: dict = {}
  scores = {}
  for _ in range(MAX_EXTEND + 1):
    for value in grid:
      if value not in scores:
        by_seed[value] = [selection_score(run(name, seed, "val", {
            **parse_label(name)[1], dotted: value}, quick)) for seed in seeds]
        scores[value] = float(np.mean(by_seed[value]))
    best = max(scores, key=scores.get)
    values = sorted(scores)
    if quick or values[0] < best < values[-1]:
      break
    grid = [best / ratio] if best == values[0] else [best * ratio]
  best = max(scores, key=scores.get)
  values = sorted(scores)
  # The choice each seed alone would make: equal when selection is stable.
  per_seed_best = [max(values, key=lambda v, i=i: by_seed[v][i]) for i in range(len(seeds))]
  return {"field": dotted, "value": best,
          "val_scores": {f"{v:g}": scores[v] for v in values},
          "val_scores_by_seed": {f"{v:g}": by_seed[v] for v in values},
          "seeds": seeds, "val_per_category": val_per_category or None,
          "best_per_seed": [float(v) for v in per_seed_best],
          "bracketed": bool(values[0] < best < values[-1])}


def _selection_path(setting: str) -> str:
  return os.path.join(FLAGS.out, f"strategies_selection_{setting}.json")


def table(lines: list[dict]) -> str:
  """Markdown: mean ± sample std over seeds per setting, strategy, regime and scope."""
  rows = ["| setting | strategy | regime | scope | final avg R@1 i2t | final avg R@1 t2i | "
          "forgetting i2t | forgetting t2i | BWT i2t | BWT t2i | n | seeds |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for setting in ("scratch", "pretrained"):
    for name in FLAGS.strategies:
      mine = [l for l in lines if l["strategy"] == name and l["setting"] == setting]
      if not mine:
        continue
      for regime in ("fixed", "reindex"):
        for scope in ("task_aware", "task_agnostic"):
          cells = []
          for key in ("final_average", "forgetting", "backward_transfer"):
            for d in ("i2t", "t2i"):
              cells.append(stats.mean_std([l["summary"][regime][scope][f"{d}_r1"][key]
                                           for l in mine]))
          seeds = ",".join(str(s) for s in sorted(l["seed"] for l in mine))
          rows.append(f"| {setting} | {name} | {regime} | {scope.replace('_', '-')} | "
                      + " | ".join(cells) + f" | {len(mine)} | {seeds} |")
  return "\n".join(rows)


def _score(line: dict, regime: str, scope: str) -> float:
  """Final average R@1, mean of image->text and text->image."""
  s = line["summary"][regime][scope]
  return float(np.mean([s[f"{d}_r1"]["final_average"] for d in ("i2t", "t2i")]))


def versus_finetune(lines: list[dict]) -> str:
  """Markdown: each strategy's final average R@1 (mean of both directions)
  minus fine-tuning's of the same seed (`stats.paired`): mean, 95 % t
  interval and p; bold where the interval lies above zero (beats
  fine-tuning), italic where below. Paired by seed because a seed's
  initialisation and batch order move every strategy alike (the seed-to-seed
  spread of one strategy is several points, its difference to fine-tuning
  much less)."""
  out = ["| setting | strategy | n | " + " | ".join(
      f"{r} {s.replace('_', '-')}" for r in ("fixed", "reindex")
      for s in ("task_aware", "task_agnostic")) + " |", "|---|---|---|---|---|---|---|"]
  for setting in ("scratch", "pretrained"):
    base = {l["seed"]: l for l in lines
            if l["setting"] == setting and l["strategy"] == "finetune"}
    for name in FLAGS.strategies:
      mine = [l for l in lines if l["setting"] == setting and l["strategy"] == name
              and l["seed"] in base]
      if name == "finetune" or not mine:
        continue
      cells = [stats.format_paired(stats.paired(
          [_score(l, regime, scope) for l in mine],
          [_score(base[l["seed"]], regime, scope) for l in mine]))
               for regime in ("fixed", "reindex")
               for scope in ("task_aware", "task_agnostic")]
      out.append(f"| {setting} | {name} | {len(mine)} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def fixed_versus_reindex(lines: list[dict]) -> str:
  """Markdown: each strategy's fixed-regime final average R@1 (mean of both
  directions) minus its own reindexed one, paired by seed (the same run's
  two regimes): mean [95 % interval] p per scope."""
  out = ["| setting | strategy | n | task-aware | task-agnostic |", "|---|---|---|---|---|"]
  for setting in ("scratch", "pretrained"):
    for name in FLAGS.strategies:
      mine = [l for l in lines if l["setting"] == setting and l["strategy"] == name]
      if not mine:
        continue
      cells = [stats.format_paired(stats.paired([_score(l, "fixed", scope) for l in mine],
                                                [_score(l, "reindex", scope) for l in mine]))
               for scope in ("task_aware", "task_agnostic")]
      out.append(f"| {setting} | {name} | {len(mine)} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def beats_summary(lines: list[dict]) -> str:
  """One line per setting: which strategies' intervals lie above fine-tuning's."""
  out = []
  for setting in ("scratch", "pretrained"):
    base = {l["seed"]: l for l in lines
            if l["setting"] == setting and l["strategy"] == "finetune"}
    wins = []
    for name in FLAGS.strategies:
      mine = [l for l in lines if l["setting"] == setting and l["strategy"] == name
              and l["seed"] in base]
      if name == "finetune" or not mine:
        continue
      cells = [f"{regime} {scope.replace('_', '-')}"
               for regime in ("fixed", "reindex") for scope in ("task_aware", "task_agnostic")
               if stats.paired([_score(l, regime, scope) for l in mine],
                               [_score(base[l["seed"]], regime, scope) for l in mine]).beats]
      if cells:
        wins.append(f"`{name}` ({', '.join(cells)})")
    if base:
      out.append(f"- {setting}: " + ("; ".join(wins) if wins else "none"))
  return "\n".join(out)


def header(selections: dict, lines: list[dict]) -> str:
  """How the table was made: config, seeds, commits, strength selection."""
  commits = sorted({l.get("commit", "unknown") for l in lines})
  out = ["# Continual strategies on the embedded benchmark", "",
         "`configs/default.py` (4 tasks x 3 shapes, CNN + GRU, VSE0; `scratch`) and its "
         "`:pretrained` variant (towers first trained on 4 held-out shapes) with 200 "
         "steps per task at batch 64 (`sweep_config` in benchmarks/strategies.py); "
         "mean ± sample std (ddof = 1) over the n training seeds listed per row "
         "(the benchmark data is fixed). R@1 in percent; forgetting = mean over earlier "
         "tasks of max_t R[t][j] − R[T][j]; BWT = mean of R[T][j] − R[j][j]. Every "
         f"run pinned to {FLAGS.table_cores} CPU core(s) (`taskset`; XLA's CPU "
         "numerics depend on the thread count, so paired runs share it).", "",
         f"Produced by commits {', '.join(commits)} with:", "",
         "```",
         "python benchmarks/strategies.py --stage=select --setting=scratch "
         "--select_seeds=0,1 --val_per_category=40",
         "python benchmarks/strategies.py --stage=select --setting=pretrained "
         "--select_seeds=0,1 --val_per_category=40",
         "taskset -c 1 python benchmarks/strategies.py --stage=final "
         "--setting=scratch --seeds=0,1,2,3,4",
         "taskset -c 1 python benchmarks/strategies.py --stage=final "
         "--setting=pretrained --seeds=0,1,2,3,4",
         "python benchmarks/strategies.py --stage=table",
         "```", "",
         "## Strengths, chosen on the validation split", "",
         "Score: mean over {fixed, reindex} x {i2t, t2i} of the task-aware final "
         "average R@1 on each task's validation images (the test split is never "
         "used), mean over the selection seeds (seed 0 alone unless a cell shows "
         "mean ± std over seeds and the choice each seed alone would make). "
         "`online_ewc` and `ewc+replay` use EWC's strength. A grid whose best "
         "value sat at an edge was extended by its ratio on that side. "
         "Validation is 40 images per shape (120 per task, 600 captions) and "
         "seeds 0 and 1: a difference of one image is 0.8 points of a task's "
         "i2t R@1, and where the two seeds would choose differently (\"per "
         "seed\") the grid is flat within noise.", "",
         "| setting | strategy | field | candidates → validation score | chosen | bracketed |",
         "|---|---|---|---|---|---|"]
  notes = []
  for setting, chosen in selections.items():
    for name, c in chosen.items():
      by_seed = c.get("val_scores_by_seed", {})
      cands = ", ".join(
          f"{v} → " + (stats.mean_std(by_seed[v]) if len(by_seed.get(v, [])) > 1
                       else f"{score:.1f}")
          for v, score in c["val_scores"].items())
      if len(c.get("best_per_seed", [])) > 1:
        cands += " (per seed: " + ", ".join(f"{b:g}" for b in c["best_per_seed"]) + ")"
      mark = ""
      if c.get("note"):
        notes.append(c["note"])
        mark = f" [{len(notes)}]"
      out.append(f"| {setting} | {name}{mark} | `strategy.{c['field']}` | {cands} | "
                 f"{float(c['value']):g} | {'yes' if c['bracketed'] else 'NO'} |")
  out += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
  out += ["", "## Results on the test split", ""]
  return "\n".join(out) + "\n"


def _overrides(chosen: dict, name: str) -> dict:
  """The settings a strategy (label) runs with in the final stage: its fixed
  ones and its selected value ({} if none)."""
  section = SHARES.get(name, name)
  return {**parse_label(name)[1],
          **({chosen[section]["field"]: chosen[section]["value"]} if section in chosen
             else {})}


def sweep_commands(chosen: dict) -> str:
  """The final stage as `launch.sweep` commands: one sweep per strategy (each
  has its own selected strength), every one over --seeds into one root, and
  the report over all of them (mean ± std over seeds per strategy)."""
  config = "configs/default.py" + (":pretrained" if FLAGS.setting == "pretrained"
                                   else "")
  root = os.path.join(FLAGS.workroot, f"sweep_{FLAGS.setting}")
  short = default.get_config()
  harness.short_tasks(short)
  common = [f"--config={config}", f"--root={root}/$NAME",
            f"--seeds={','.join(FLAGS.seeds)}",
            f"--overrides=train.steps_per_task={short.train.steps_per_task}",
            f"--overrides=train.batch_size={short.train.batch_size}",
            f"--overrides=train.checkpoint_every={short.train.checkpoint_every}"]
  lines = []
  for name in FLAGS.strategies:
    extra = [f"--overrides=strategy.{k}={v}" for k, v in _overrides(chosen, name).items()]
    args = [a.replace("$NAME", re.sub(r"[^\w.-]", "-", name)) for a in common]
    lines.append(shlex.join(["python", "-m", "launch.sweep", *args,
                             f"--overrides=strategy.name={parse_label(name)[0]}",
                             *extra]))
  return "\n".join(lines)


def _load_selection(setting: str) -> dict:
  path = _selection_path(setting)
  return json.load(open(path)) if os.path.exists(path) else {}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  if FLAGS.stage == "select":
    chosen = {} if FLAGS.quick else _load_selection(FLAGS.setting)
    for name in FLAGS.select or list(GRID):
      chosen[name] = select_one(name, FLAGS.quick,
                                tuple(int(s) for s in FLAGS.select_seeds),
                                FLAGS.val_per_category)
      print(json.dumps({"setting": FLAGS.setting, "chosen": {name: chosen[name]}}),
            flush=True)
      if not FLAGS.quick:
        with open(_selection_path(FLAGS.setting), "w") as f:
          json.dump(chosen, f, indent=1)
    return
  if FLAGS.stage == "sweep":
    print(sweep_commands(_load_selection(FLAGS.setting)))
    return
  if FLAGS.stage == "final":
    chosen = {} if FLAGS.quick else _load_selection(FLAGS.setting)
    names = ["finetune", "ewc"] if FLAGS.quick else FLAGS.strategies
    seeds = [0] if FLAGS.quick else [int(s) for s in FLAGS.seeds]
    lines = []
    for name in names:
      overrides = _overrides(chosen, name)
      for seed in seeds:
        lines.append(run(name, seed, "test", overrides, FLAGS.quick))
    print(table(lines))
    return
  selections = {s: _load_selection(s) for s in ("scratch", "pretrained")}
  # Only the runs made with the selected values (a grid extended after a
  # final run leaves that run in the log, unused).
  lines = [l for l in _done().values() if l["split"] == "test"
           and cores(l) == FLAGS.table_cores
           and l["overrides"] == _overrides(selections[l["setting"]], l["strategy"])]
  md = (header({s: c for s, c in selections.items() if c}, lines) + table(lines)
        + "\n\n## Against fine-tuning\n\nFinal average R@1 (mean of i2t and t2i) "
        "minus fine-tuning's with the same seed (paired: a seed's initialisation "
        f"and batch order move every strategy alike): mean [95 % interval] p, "
        f"{stats.TEST_NAME} (n seeds). **Bold**: the interval lies above zero (beats "
        "fine-tuning); *italic*: below zero (worse than fine-tuning); neither: "
        "the seeds cannot tell them apart.\n\n" + versus_finetune(lines)
        + "\n\nBeats fine-tuning (interval above zero):\n\n" + beats_summary(lines)
        + "\n\n## Fixed index against reindexing, per strategy\n\nEach strategy's "
        "fixed-regime final average R@1 (mean of i2t and t2i) minus its reindexed "
        "one, paired by seed (the two regimes of the same run): mean [95 % "
        f"interval] p, {stats.TEST_NAME}. **Bold**: the fixed index wins.\n\n"
        + fixed_versus_reindex(lines))
  print(md)
  with open(os.path.join(FLAGS.out, "strategies.md"), "w") as f:
    f.write(md + "\n")


if __name__ == "__main__":
  app.run(main)
