r"""When does not reindexing beat reindexing? Fine-tuning from scratch and from
pretrained towers, fixed vs reindex, with the forgetting analysis.

  python benchmarks/studies/reindex_question.py            # runs, analyses, table
  python benchmarks/studies/reindex_question.py --quick    # tiny smoke test

Runs fine-tuning in `configs/default.py` (scratch) and `:pretrained` with the
comparison's short tasks (benchmarks/strategies.py `sweep_config`), plus the
pretrained setting with the honest tries the paper's regime suggests: a lower
learning rate, a frozen image tower, fewer steps; 5 seeds each. Every
workdir is then analysed from its snapshots (`--mode=evaluate`:
`run.evaluate.evaluate_workdir`). Writes benchmarks/results/reindex_question.{json,md}:
mean ± sample std over seeds, and the fixed − reindex gap paired by seed
(`ccr_jax.stats`: 95 % t interval and p), (final average R@1, both
scopes), the old tasks' drift (cosine of snapshot j's and the last snapshot's
embeddings of task j's items), the last snapshot's alignment, and the tower
attribution of old tasks (R@1 with each tower swapped for the newest).
"""

import json
import os
import sys
import time

# benchmarks/studies/ -> benchmarks/ -> the repository root, for `benchmarks`,
# `ccr_jax` and `configs` when run as `python benchmarks/studies/<study>.py`.
BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(BENCHMARKS))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from benchmarks import harness  # noqa: E402
from ccr_jax import stats  # noqa: E402
from ccr_jax.run import evaluate as evaluate_lib  # noqa: E402
from ccr_jax.run import loop  # noqa: E402
from configs import default  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workroot", "/tmp/ccr_reindex", "One workdir per run under here.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds (runs already "
                  "in reindex_question.json are not run again).")
flags.DEFINE_string("out", os.path.join(BENCHMARKS, "results"), "Where the table goes.")
flags.DEFINE_bool("quick", False, "Tiny configs, one seed: a smoke test.")
flags.DEFINE_bool("table_only", False, "Rewrite the table from reindex_question.json "
                  "and the runs appended to reindex_question_runs.jsonl.")
flags.DEFINE_list("variants", None, "Run only these variants (default all); the "
                  "table then waits for --table_only.")


def _freeze_images(config):
  config.strategy.name = "freeze"
  config.strategy.freeze.from_task = 1
  config.strategy.freeze.patterns = ("img/.*",)


def _lower_lr(config):
  config.pretrain.learning_rate = config.optim.learning_rate
  config.optim.learning_rate = 1e-4


# name -> (setting, what the variant changes, how)
VARIANTS = {
    "scratch": ("scratch", "fine-tuning from random towers", lambda c: None),
    "pretrained": ("pretrained", "fine-tuning from pretrained towers", lambda c: None),
    "pretrained_lr1e-4": ("pretrained", "learning rate 1e-4 on the tasks (default "
                          "5e-4; pretraining unchanged)", _lower_lr),
    "pretrained_frozen_images": ("pretrained", "image tower frozen from task 1",
                                 _freeze_images),
    "pretrained_50_steps": ("pretrained", "50 steps per task (default 200)",
                            lambda c: setattr(c.train, "steps_per_task", 50)),
}


def config_for(name: str, seed: int):
  setting, _, change = VARIANTS[name]
  if FLAGS.quick:
    config = default.get_config("pretrained,tiny" if setting == "pretrained" else "tiny")
  else:
    config = default.get_config("pretrained" if setting == "pretrained" else None)
    harness.short_tasks(config)
  config.data.data_dir = os.path.join(FLAGS.workroot, "tfds")
  config.seed = seed
  change(config)
  return config


def _mean_old(matrix_by_task: dict, num: int, pick) -> float:
  return float(np.mean([pick(matrix_by_task[str(j)], j) for j in range(1, num)]))


def summarize(results: dict) -> dict:
  """The numbers of one analysed run (evaluate mode's results)."""
  s, a = results["summary"], results["analysis"]
  out = {}
  for scope in ("task_aware", "task_agnostic"):
    for d in ("i2t", "t2i"):
      fixed = s["fixed"][scope][f"{d}_r1"]["final_average"]
      reindex = s["reindex"][scope][f"{d}_r1"]["final_average"]
      out[f"{scope}_{d}_fixed"] = fixed
      out[f"{scope}_{d}_reindex"] = reindex
      out[f"{scope}_{d}_gap"] = fixed - reindex
  num = len(a["drift"]["alignment"])
  for modality in ("images", "texts"):
    out[f"drift_{modality}"] = _mean_old(a["drift"][modality], num,
                                         lambda m, j: m[j - 1][num - 1])
  out["alignment_last"] = float(np.mean([a["drift"]["alignment"][str(j)][num - 1]
                                         for j in range(1, num + 1)]))
  old = [r for r in a["attribution"] if r["task"] < num]
  for key in ("own", "new_image_tower", "new_text_tower", "both_new"):
    out[f"towers_{key}"] = float(np.mean([r[key] for r in old]))
  return out


def run(name: str, seed: int) -> dict:
  workdir = os.path.join(FLAGS.workroot, f"{name}_s{seed}")
  config = config_for(name, seed)
  fill = (harness.shared_pretraining(
      os.path.join(FLAGS.workroot, f"pretrained_cache_s{seed}"), workdir)
          if config.pretrain.steps else lambda: None)
  start = time.perf_counter()
  loop.train_and_evaluate(config, workdir)
  fill()
  results = evaluate_lib.evaluate_workdir(workdir)
  line = {"variant": name, "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
          **summarize(results)}
  print(json.dumps(line), flush=True)
  return line


def table(lines: list[dict]) -> str:
  """Markdown: per variant, the gaps, drift, alignment and tower attribution."""
  out = ["| variant | scope | n | fixed R@1 i2t / t2i | reindex R@1 i2t / t2i | "
         "fixed − reindex i2t / t2i: mean [95 % interval] p |", "|---|---|---|---|---|---|"]
  for name in VARIANTS:
    mine = [l for l in lines if l["variant"] == name]
    if not mine:
      continue
    for scope in ("task_aware", "task_agnostic"):
      cells = [" / ".join(stats.mean_std([l[f"{scope}_{d}_{k}"] for l in mine])
                          for d in ("i2t", "t2i")) for k in ("fixed", "reindex")]
      # The gap is paired by seed: the same run's two regimes.
      cells += [" / ".join(stats.format_paired(stats.paired(
          [l[f"{scope}_{d}_fixed"] for l in mine],
          [l[f"{scope}_{d}_reindex"] for l in mine])) for d in ("i2t", "t2i"))]
      out.append(f"| {name} | {scope.replace('_', '-')} | {len(mine)} | "
                 + " | ".join(cells) + " |")
  out += ["", "| variant | drift: cos(old, new) images / texts | alignment (last) | "
          "old tasks R@1: own towers | new image tower | new text tower | both new |",
          "|---|---|---|---|---|---|---|"]
  for name in VARIANTS:
    mine = [l for l in lines if l["variant"] == name]
    if not mine:
      continue
    cells = [stats.mean_std([l["drift_images"] for l in mine], 3) + " / "
             + stats.mean_std([l["drift_texts"] for l in mine], 3),
             stats.mean_std([l["alignment_last"] for l in mine], 3)]
    cells += [stats.mean_std([l[f"towers_{k}"] for l in mine])
              for k in ("own", "new_image_tower", "new_text_tower", "both_new")]
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  out += ["", "What each variant's better regime costs against unfrozen fine-tuning "
          "from pretrained towers with reindexing (`pretrained`, reindex), paired by "
          "seed: final average R@1, mean [95 % interval] p.", "",
          "| variant | regime | scope | i2t | t2i |", "|---|---|---|---|---|"]
  base = {l["seed"]: l for l in lines if l["variant"] == "pretrained"}
  for name in VARIANTS:
    mine = [l for l in lines if l["variant"] == name and l["seed"] in base]
    if not name.startswith("pretrained_") or not mine:
      continue
    for regime in ("fixed", "reindex"):
      for scope in ("task_aware", "task_agnostic"):
        cells = [stats.format_paired(stats.paired(
            [l[f"{scope}_{d}_{regime}"] for l in mine],
            [base[l["seed"]][f"{scope}_{d}_reindex"] for l in mine]))
                 for d in ("i2t", "t2i")]
        out.append(f"| {name} | {regime} | {scope.replace('_', '-')} | "
                   + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  seeds = [0] if FLAGS.quick else [int(s) for s in FLAGS.seeds]
  path = os.path.join(FLAGS.out, "reindex_question.json")
  runs_path = os.path.join(FLAGS.out, "reindex_question_runs.jsonl")

  def done() -> dict:
    # The table's JSON and the runs appended since (the later line wins).
    found = {} if FLAGS.quick or not os.path.exists(path) else {
        (l["variant"], l["seed"]): l for l in json.load(open(path))}
    if not FLAGS.quick and os.path.exists(runs_path):
      found.update({(l["variant"], l["seed"]): l for l in map(json.loads, open(runs_path))})
    return found

  if FLAGS.table_only:
    lines = sorted(done().values(), key=lambda l: (list(VARIANTS).index(l["variant"]),
                                                   l["seed"]))
    seeds = sorted({l["seed"] for l in lines})
  else:
    # Runs already made are kept (a rerun with more --seeds adds seeds); each
    # run is appended as it ends, so processes may split --variants.
    lines = []
    for name in FLAGS.variants or VARIANTS:
      for seed in seeds:
        line = done().get((name, seed))
        if line is None:
          line = run(name, seed)
          if not FLAGS.quick:
            with open(runs_path, "a") as f:
              f.write(json.dumps(line) + "\n")
        lines.append(line)
    if FLAGS.variants:  # A part of the table: the full one with --table_only.
      print(table(lines))
      return
  md = table(lines)
  print(md)
  if FLAGS.quick:
    return
  variants = "\n".join(f"- `{n}`: {v[1]}" for n, v in VARIANTS.items())
  header = ("# Fixed index vs reindexing: fine-tuning from scratch and pretrained\n\n"
            "Command: `python benchmarks/studies/reindex_question.py` (runs + `--mode=evaluate` "
            f"analysis of each workdir). Seeds {seeds}; mean ± sample std over the "
            f"n seeds; {stats.TEST_NAME}. "
            "200-step tasks at batch 64 as in the strategy comparison. R@1 in "
            "percent, final average over the 4 tasks; drift and attribution over "
            "the 3 old tasks at the last snapshot; towers: exact task-aware R@1 "
            "(image→text and text→image averaged) of an old task with its own "
            "snapshot's towers, with the newest image tower, the newest text "
            "tower, or both (= reindex).\n\nVariants:\n" + variants + "\n\n")
  with open(os.path.join(FLAGS.out, "reindex_question.md"), "w") as f:
    f.write(header + md + "\n")
  with open(os.path.join(FLAGS.out, "reindex_question.json"), "w") as f:
    json.dump(lines, f, indent=1)


if __name__ == "__main__":
  app.run(main)
