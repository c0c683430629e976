r"""Every continual strategy on the embedded benchmark, over seeds: the comparison table.

  # 1. choose each regulariser's strength on the validation split (seed 0):
  python benchmarks/strategies.py --stage=select --workroot=/tmp/ccr_strategies
  # 2. run every strategy with the chosen strengths on the test split, 3 seeds:
  python benchmarks/strategies.py --stage=final --workroot=/tmp/ccr_strategies

Prints one JSON object per run, then a markdown table (mean ± std over seeds) of
final average R@1, forgetting and backward transfer in both indexing regimes and
both gallery scopes; writes benchmarks/results/strategies.{md,json} and
strategies_selection.json. The runs use `configs/default.py` with shorter tasks
(see `sweep_config`) so that 48 runs fit in well under an hour on 2 CPU cores.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from ccr_jax.run import loop  # noqa: E402
from configs import default  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "final", ["select", "final", "table"],
                  "select: strengths on val; final: every strategy on test over "
                  "--seeds; table: the table from the JSON lines in --logs.")
flags.DEFINE_list("logs", [], "--stage=table: files holding final-stage JSON lines.")
flags.DEFINE_string("workroot", "/tmp/ccr_strategies", "One workdir per run under here.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of the final stage.")
flags.DEFINE_list("strategies", ["finetune", "joint", "freeze", "ewc", "online_ewc",
                                 "mas", "l2", "lwf", "replay", "compat", "ewc+replay"],
                  "Strategies of the final stage.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "results"), "Where tables and JSON go.")
flags.DEFINE_bool("quick", False, "Tiny config, 2 strategies, 1 seed: a smoke test.")

# Strength grids searched on the validation split; section.field -> candidates.
# Centred where the penalty is comparable to the summed VSE0 loss (~25 at batch
# 64) for the parameter change one fine-tuning task causes, measured on the
# default run: sum F*dtheta^2 = 0.0075 (EWC), sum Omega*dtheta^2 = 0.0037 (MAS),
# sum dtheta^2 = 49 (L2); then one decade either side.
GRID = {
    "ewc": ("ewc.strength", (300.0, 3000.0, 30000.0)),
    "mas": ("mas.strength", (1000.0, 10000.0, 100000.0)),
    "l2": ("l2.strength", (0.03, 0.3, 3.0)),
    "lwf": ("lwf.strength", (1.0, 10.0, 100.0)),
    "compat": ("compat.strength", (0.1, 0.3, 1.0)),
}
# online_ewc shares EWC's strength section (config.strategy.ewc).
SHARES = {"online_ewc": "ewc", "ewc+replay": "ewc"}


def sweep_config(quick: bool):
  """configs/default.py with 200-step tasks and batch 64 (about 1 minute a run)."""
  config = default.get_config("tiny" if quick else None)
  # One rendered benchmark for every run (it is the same data).
  config.data.data_dir = os.path.join(FLAGS.workroot, "tfds")
  if not quick:
    config.train.steps_per_task = 200
    config.train.batch_size = 64
    config.train.checkpoint_every = 0  # short runs: no mid-task state
  return config


def _set(config, dotted: str, value) -> None:
  section, field = dotted.split(".")
  config.strategy[section][field] = value


def selection_score(results: dict) -> float:
  """Mean task-aware final-average R@1 over both regimes and directions."""
  s = results["summary"]
  return float(np.mean([s[r]["task_aware"][f"{d}_r1"]["final_average"]
                        for r in s for d in ("i2t", "t2i")]))


def run(name: str, seed: int, split: str, overrides: dict, quick: bool) -> dict:
  """One experiment; returns its JSON line (summary numbers + settings)."""
  config = sweep_config(quick)
  config.seed = seed
  config.strategy.name = name
  config.eval.split = split
  for dotted, value in overrides.items():
    _set(config, dotted, value)
  tag = "_".join([name.replace("+", "-"), split, f"s{seed}"] +
                 [f"{k.split('.')[0]}{v:g}" for k, v in sorted(overrides.items())])
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, os.path.join(FLAGS.workroot, tag))
  line = {"strategy": name, "seed": seed, "split": split, "overrides": overrides,
          "wall_s": round(time.perf_counter() - start, 1),
          "summary": results["summary"], "settings": results["strategy"]}
  print(json.dumps(line), flush=True)
  return line


def select(quick: bool) -> dict:
  """Chooses each regulariser's strength by `selection_score` on the val split."""
  chosen, lines = {}, []
  for name, (dotted, grid) in GRID.items():
    if quick:
      grid = grid[:1]
    scores = {}
    for value in grid:
      line = run(name, 0, "val", {dotted: value}, quick)
      scores[value] = selection_score(line)
      lines.append(line)
    best = max(scores, key=scores.get)
    chosen[name] = {"field": dotted, "value": best, "val_scores": scores}
  return {"chosen": chosen, "runs": lines}


def _fmt(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "–"
  return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table(lines: list[dict]) -> str:
  """Markdown: mean ± std over seeds per strategy, regime and scope."""
  rows = ["| strategy | regime | scope | final avg R@1 i2t | final avg R@1 t2i | "
          "forgetting i2t | forgetting t2i | BWT i2t | BWT t2i |",
          "|---|---|---|---|---|---|---|---|---|"]
  names = list(dict.fromkeys(l["strategy"] for l in lines))
  for name in names:
    mine = [l for l in lines if l["strategy"] == name]
    for regime in ("fixed", "reindex"):
      for scope in ("task_aware", "task_agnostic"):
        cells = []
        for key in ("final_average", "forgetting", "backward_transfer"):
          for d in ("i2t", "t2i"):
            cells.append(_fmt([l["summary"][regime][scope][f"{d}_r1"][key]
                               for l in mine]))
        rows.append(f"| {name} | {regime} | {scope.replace('_', '-')} | " +
                    " | ".join(cells) + " |")
  return "\n".join(rows)


def header(chosen: dict, lines: list[dict]) -> str:
  """How the table was made: config, seeds, strength selection."""
  seeds = sorted({l["seed"] for l in lines})
  out = ["# Continual strategies on the embedded benchmark", "",
         "`configs/default.py` (4 tasks x 3 shapes, CNN + GRU, VSE0) with 200 steps "
         "per task at batch 64 (`sweep_config` in benchmarks/strategies.py); "
         f"seeds {seeds} (training seed; the benchmark data is fixed); mean ± std "
         "over seeds. R@1 in percent; forgetting = mean over earlier tasks of "
         "max_t R[t][j] − R[T][j]; BWT = mean of R[T][j] − R[j][j]. Machine: 2 CPU "
         "cores, shared with other jobs (wall times in strategies.json).", "",
         "Commands: `python benchmarks/strategies.py --stage=select` (strengths), "
         "then `--stage=final` (runs; here split over processes and merged with "
         "`--stage=table --logs=benchmarks/results/strategies_runs.jsonl`).", "",
         "## Strengths, chosen on the validation split (seed 0)", "",
         "Score: mean over {fixed, reindex} x {i2t, t2i} of the task-aware final "
         "average R@1 on each task's validation images (the test split is never "
         "used). `online_ewc` and `ewc+replay` use EWC's strength.", "",
         "| strategy | field | candidates → validation score | chosen |",
         "|---|---|---|---|"]
  for name, c in chosen.items():
    cands = ", ".join(f"{float(v):g} → {score:.1f}" for v, score in c["val_scores"].items())
    out.append(f"| {name} | `strategy.{c['field']}` | {cands} | {float(c['value']):g} |")
  out += ["", "## Results on the test split", ""]
  return "\n".join(out) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  sel_path = os.path.join(FLAGS.out, "strategies_selection.json")
  if FLAGS.stage == "select":
    selection = select(FLAGS.quick)
    if not FLAGS.quick:
      with open(sel_path, "w") as f:
        json.dump(selection, f, indent=1)
    print(json.dumps({"chosen": selection["chosen"]}))
    return
  chosen = {}
  if os.path.exists(sel_path) and not FLAGS.quick:
    chosen = json.load(open(sel_path))["chosen"]
  lines = []
  if FLAGS.stage == "table":
    # Final-stage runs split over several processes: merge their JSON lines
    # in --strategies order.
    for path in FLAGS.logs:
      lines += [json.loads(l) for l in open(path) if l.startswith('{"strategy"')]
    order = {n: i for i, n in enumerate(FLAGS.strategies)}
    lines.sort(key=lambda l: (order.get(l["strategy"], len(order)), l["seed"]))
  else:
    names = ["finetune", "ewc"] if FLAGS.quick else FLAGS.strategies
    seeds = [0] if FLAGS.quick else [int(s) for s in FLAGS.seeds]
    for name in names:
      base = SHARES.get(name, name)
      overrides = ({chosen[base]["field"]: chosen[base]["value"]} if base in chosen
                   else {})
      for seed in seeds:
        lines.append(run(name, seed, "test", overrides, FLAGS.quick))
  md = table(lines)
  print(md)
  md = header(chosen, lines) + md
  if not FLAGS.quick:
    with open(os.path.join(FLAGS.out, "strategies.json"), "w") as f:
      json.dump({"selection": chosen, "runs": lines}, f, indent=1)
    with open(os.path.join(FLAGS.out, "strategies.md"), "w") as f:
      f.write(md + "\n")


if __name__ == "__main__":
  app.run(main)
