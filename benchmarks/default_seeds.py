r"""The README's numbers: the default experiment (fine-tuning and joint) over seeds.

  python benchmarks/default_seeds.py                 # seeds 0-4
  python benchmarks/default_seeds.py --stage=table   # the table from the JSON

Runs `configs/default.py` unchanged but for the training seed (the benchmark
data is fixed) and `strategy.name`, appends each run to
benchmarks/results/default_seeds_runs.jsonl (runs already there are not run
again, so processes may split the strategies: --strategies=joint), and writes
benchmarks/results/default_seeds.{json,md}: mean ± sample std over seeds
of final R@1 (task-aware, reindex), forgetting (reindex, both scopes), and
task 1's text->image task-agnostic R@1 after each task in both regimes.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from benchmarks import harness  # noqa: E402
from ccr_jax import stats  # noqa: E402
from ccr_jax.run import loop  # noqa: E402
from configs import default  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
flags.DEFINE_enum("stage", "run", ["run", "table"], "run: experiments then table.")
flags.DEFINE_string("workroot", "/tmp/ccr_default_seeds", "One workdir per run.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (runs already in "
                  "the JSON are not run again).")
flags.DEFINE_list("strategies", ["finetune", "joint"], "Strategies.")
JSON = os.path.join(HERE, "results", "default_seeds.json")
RUNS = os.path.join(HERE, "results", "default_seeds_runs.jsonl")


def run(name: str, seed: int) -> dict:
  config = default.get_config()
  config.seed = seed
  config.strategy.name = name
  config.data.data_dir = os.path.join(FLAGS.workroot, "tfds")
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, os.path.join(FLAGS.workroot,
                                                         f"{name}_s{seed}"))
  s, m = results["summary"], results["metrics"]
  line = {"strategy": name, "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
          "commit": harness.git_commit()}
  for d in ("i2t", "t2i"):
    line[f"final_{d}"] = s["reindex"]["task_aware"][f"{d}_r1"]["final_average"]
    for scope in ("task_aware", "task_agnostic"):
      line[f"forgetting_{scope}_{d}"] = s["reindex"][scope][f"{d}_r1"]["forgetting"]
  for regime in ("fixed", "reindex"):
    line[f"task1_t2i_agnostic_{regime}"] = [
        row[0] for row in m[regime]["task_agnostic"]["t2i"]["r1"]]
    for d in ("i2t", "t2i"):
      line[f"forgetting_task_agnostic_{regime}_{d}"] = (
          s[regime]["task_agnostic"][f"{d}_r1"]["forgetting"])
      line[f"gallery_growth_{regime}_{d}"] = results["gallery_growth"][regime][f"{d}_r1"]
  print(json.dumps(line), flush=True)
  with open(RUNS, "a") as f:  # One line per run: runs in parallel processes append.
    f.write(json.dumps(line) + "\n")
  return line


def finished() -> dict:
  """(strategy, seed) -> the logged line of every run made with the gallery
  split (older lines lack it and are run again)."""
  if not os.path.exists(RUNS):
    return {}
  lines = [json.loads(l) for l in open(RUNS) if l.startswith("{")]
  return {(l["strategy"], l["seed"]): l for l in lines if "gallery_growth_fixed_t2i" in l}


def table(lines: list[dict]) -> str:
  seeds = sorted({l["seed"] for l in lines})
  out = [f"Seeds {seeds} (n = {len(seeds)}), mean ± sample std (ddof = 1); commit(s) "
         f"{', '.join(sorted({l['commit'] for l in lines}))}; "
         "`python benchmarks/default_seeds.py`.", "",
         "Wall times are in the JSON only: these runs shared the 2 cores with "
         "other jobs, so they are not a speed measurement "
         "(benchmarks/end_to_end.py is).", "",
         "| run | R@1 after the last task, task-aware, reindex (i2t / t2i) "
         "| forgetting, reindex task-aware (i2t / t2i) | forgetting, reindex "
         "task-agnostic (i2t / t2i) |", "|---|---|---|---|"]
  for name in FLAGS.strategies:
    mine = [l for l in lines if l["strategy"] == name]
    if not mine:
      continue
    pair = lambda key: " / ".join(stats.mean_std([l[key.format(d=d)] for l in mine])  # noqa: E731
                                  for d in ("i2t", "t2i"))
    out.append(f"| {name} | {pair('final_{d}')} | "
               f"{pair('forgetting_task_aware_{d}')} | "
               f"{pair('forgetting_task_agnostic_{d}')} |")
  out += ["", "Task 1's text→image R@1, task-agnostic gallery, after each task:", "",
          "| after task | " + " | ".join(f"{n}, {r}" for n in FLAGS.strategies
                                         for r in ("fixed", "reindex")) + " |",
          "|---" * (1 + 2 * len(FLAGS.strategies)) + "|"]
  num = len(lines[0]["task1_t2i_agnostic_fixed"])
  for t in range(num):
    cells = [stats.mean_std([l[f"task1_t2i_agnostic_{r}"][t] for l in lines if l["strategy"] == n])
             for n in FLAGS.strategies for r in ("fixed", "reindex")]
    out.append(f"| {t + 1} | " + " | ".join(cells) + " |")
  out += ["", "Task-agnostic forgetting split (results.json `gallery_growth`): what "
          "the growing gallery alone costs (old tasks' R@1 with the final model "
          "over the galleries seen when each was learnt minus over all of them) "
          "and the rest, the model's forgetting at a fixed gallery "
          "(docs/outputs.md):", "",
          "| run | regime | task-agnostic forgetting (i2t / t2i) | of which the "
          "gallery's growth | of which the model |", "|---|---|---|---|---|"]
  for name in FLAGS.strategies:
    mine = [l for l in lines if l["strategy"] == name]
    for regime in ("fixed", "reindex"):
      if not mine:
        continue
      cell = lambda f: " / ".join(stats.mean_std([f(l, d) for l in mine])  # noqa: E731
                                  for d in ("i2t", "t2i"))
      total = lambda l, d, r=regime: l[f"forgetting_task_agnostic_{r}_{d}"]  # noqa: E731
      growth = lambda l, d, r=regime: l[f"gallery_growth_{r}_{d}"]  # noqa: E731
      out.append(f"| {name} | {regime} | {cell(total)} | {cell(growth)} | "
                 f"{cell(lambda l, d: total(l, d) - growth(l, d))} |")
  return "\n".join(out)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.stage == "run":
    done = finished()
    for n in FLAGS.strategies:
      for s in FLAGS.seeds:
        if (n, int(s)) not in done:
          run(n, int(s))
  lines = sorted(finished().values(), key=lambda l: (l["strategy"], l["seed"]))
  if not lines:
    raise SystemExit(f"no runs in {RUNS} yet: run --stage=run first.")
  with open(JSON, "w") as f:
    json.dump(lines, f, indent=1)
  md = "# The default experiment over seeds\n\n" + table(lines)
  print(md)
  with open(JSON.replace(".json", ".md"), "w") as f:
    f.write(md + "\n")


if __name__ == "__main__":
  app.run(main)
