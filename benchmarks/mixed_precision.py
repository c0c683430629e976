r"""Mixed precision (`train.compute_dtype`): train-step time and R@1, float32 vs bfloat16.

  python -m benchmarks.mixed_precision --write_results   # ~10 min on 2 CPU cores
  python -m benchmarks.mixed_precision --quick            # ~3 min: seed 0, fewer steps
  python -m benchmarks.mixed_precision --smoke            # seconds (tiny; numbers mean nothing)

Two measurements, both in this one process:

speed   The library's train step (`train.make_train_step`, as
        benchmarks/train_throughput.py builds it: its `make_setup`,
        `synthetic_batch`, `with_gru_impl` and `time_steps_interleaved`) for
        the `default` and `vsepp` setups, compiled once with each compute
        dtype from the same initial params, then timed interleaved: each
        round runs one step of float32 then one of bfloat16 on the same
        batch, so both see the same background load. `step_ratio` is the
        median over rounds of bfloat16's step time over float32's in the
        same round. The GRU is `model.gru_impl` "auto" (packed on CPU).
recall  The default experiment (configs/default.py) with the experiment
        scripts' short tasks (`harness.short_tasks`: 200 steps at batch 64)
        run end to end (`run.loop.train_and_evaluate`) with each compute dtype
        and seed; the final average R@1 (task-aware; reindex and fixed;
        image->text and text->image) of each run, and bfloat16 minus float32
        per seed.

On a CPU, bfloat16 matmuls and convolutions have no native units: XLA
converts to float32 around them (or runs slower emulated kernels), so
bfloat16 is expected to be slower here. The speed-up it is for needs an
accelerator with bfloat16 matrix units (GPU tensor cores, TPU MXU).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import harness
from benchmarks import train_throughput
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib
from ccr_jax.models import dual_encoder
from ccr_jax.run import setup as setup_lib
from configs import default

MODULE = "benchmarks.mixed_precision"
DTYPES = ("float32", "bfloat16")
REGIMES = ("reindex", "fixed")
DIRECTIONS = ("i2t", "t2i")


def build_step(config, setup: train_throughput.Setup, compute_dtype: str, mesh, params):
  """The library's train step for `setup` in `compute_dtype`, and its state from `params`.

  As `train_throughput.build_train_step`, with the model built in
  `compute_dtype` (`dual_encoder.build_model`) and the initial params given,
  so both dtypes start from the same float32 params.
  """
  model = dual_encoder.build_model(config.model, setup.vocab_size, compute_dtype)
  loss_fn = train_lib.make_loss(config.loss)
  strategy = strategies.get_strategy(config.strategy, loss_fn)
  optimizer = train_lib.make_optimizer(config.optim, config.train.steps_per_task,
                                       strategy.transform)
  train_step = train_lib.make_train_step(model, optimizer, loss_fn, mesh,
                                         strategy.loss_term)
  # A copy per dtype: each state is donated to its own step.
  state = train_lib.create_train_state(jax.tree.map(lambda x: x.copy(), params),
                                       optimizer, mesh)
  return train_step, state


def measure_speed(name: str, *, smoke: bool, warmup: int, steps: int) -> list[dict]:
  """Compiles the f32 and bf16 train steps of setup `name`; times them interleaved."""
  setup = train_throughput.make_setup(name, smoke=smoke)
  config = setup.config
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batches = [sharding.shard_batch(train_throughput.synthetic_batch(rng, setup), mesh)
             for _ in range(4)]
  model = dual_encoder.build_model(config.model, setup.vocab_size)
  params = jax.jit(lambda r: setup_lib.with_loss_params(
      dual_encoder.init_params(model, r, setup.image_shape, setup.max_len), config),
      out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  runs, compile_s = {}, {}
  for dtype in DTYPES:
    train_step, state = build_step(config, setup, dtype, mesh, params)
    compile_s[dtype], compiled = harness.timed(
        lambda: train_step.lower(state, batches[0]).compile())
    runs[dtype] = (compiled, state)
  load_before = harness.load_average()
  times, metrics, _ = train_throughput.time_steps_interleaved(runs, batches, warmup=warmup,
                                                              steps=steps)
  records = []
  for dtype in DTYPES:
    loss = float(metrics[dtype]["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{name} ({dtype}): loss {loss}")
    step_s = statistics.median(times[dtype])
    records.append({
        "benchmark": "mixed_precision", "kind": "speed", "setup": name,
        "compute_dtype": dtype, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "batch_size": setup.batch_size,
        "step_s": step_s, "step_s_min": min(times[dtype]),
        "step_s_max": max(times[dtype]), "timed_steps": len(times[dtype]),
        "pairs_per_s": setup.batch_size / step_s, "compile_s": compile_s[dtype],
        # bfloat16's step over float32's, per round (1.0 for float32 itself).
        "step_ratio": harness.paired_ratio(times[dtype], times[DTYPES[0]]),
        "final_loss": loss, "load_average_before": load_before,
        "load_average": harness.load_average()})
  return records


def run_experiment(workroot: str, seed: int, dtype: str, smoke: bool) -> dict:
  """The default experiment with short tasks in `dtype`; its final R@1s."""
  # pylint: disable=import-outside-toplevel
  from ccr_jax.run import loop
  config = default.get_config("tiny" if smoke else None)
  if not smoke:
    harness.short_tasks(config)
  config.seed = seed
  config.train.compute_dtype = dtype
  config.data.data_dir = os.path.join(workroot, "tfds")
  workdir = os.path.join(workroot, f"{dtype}_s{seed}")
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, workdir)
  wall_s = time.perf_counter() - start
  with open(os.path.join(workdir, "results", "timing.json")) as f:
    timing = json.load(f)
  summary = results["summary"]
  record = {"benchmark": "mixed_precision", "kind": "recall", "compute_dtype": dtype,
            "seed": seed, "steps_per_task": config.train.steps_per_task,
            "batch_size": config.train.batch_size, "num_tasks": results["tasks_completed"],
            "wall_s": wall_s, "train_s": timing.get("train_s"),
            "load_average": harness.load_average(), "commit": harness.git_commit()}
  for regime in REGIMES:
    for d in DIRECTIONS:
      record[f"{regime}_{d}_r1"] = summary[regime]["task_aware"][f"{d}_r1"]["final_average"]
  return record


SPEED_COLUMNS = (
    ("setup", "setup"), ("backend", "backend"), ("batch_size", "batch"),
    ("compute_dtype", "compute dtype"), ("step_ms", "step ms (median)"),
    ("step_ms_min", "min"), ("step_ms_max", "max"), ("timed_steps", "timed steps"),
    ("step_ratio", "step / float32's (paired)"), ("pairs_per_s", "pairs/s"),
    ("compile_s", "compile s"), ("load", "load avg before → after"),
)
RECALL_COLUMNS = (
    ("seed", "seed"), ("compute_dtype", "compute dtype"),
    *((f"{r}_{d}_r1", f"{r} {d}") for r in REGIMES for d in DIRECTIONS),
    ("train_s", "train s"), ("wall_s", "wall s"),
)


def speed_row(record: dict) -> dict:
  return {**record, "step_ms": 1e3 * record["step_s"],
          "step_ms_min": 1e3 * record["step_s_min"], "step_ms_max": 1e3 * record["step_s_max"],
          "load": f"{record['load_average_before'][0]} → {record['load_average'][0]}"}


def recall_rows(records: list[dict]) -> list[dict]:
  """Each run, then per dtype the mean over seeds, then bfloat16 − float32."""
  keys = [f"{r}_{d}_r1" for r in REGIMES for d in DIRECTIONS]
  rows = sorted(records, key=lambda r: (r["seed"], DTYPES.index(r["compute_dtype"])))
  seeds = sorted({r["seed"] for r in records})
  by = {(r["seed"], r["compute_dtype"]): r for r in records}
  means = {}
  for dtype in DTYPES:
    mine = [by[(s, dtype)] for s in seeds if (s, dtype) in by]
    if mine:
      means[dtype] = {k: float(np.mean([r[k] for r in mine])) for k in keys}
      rows.append({"seed": "mean", "compute_dtype": dtype, **means[dtype]})
  if len(means) == 2:
    rows.append({"seed": "mean", "compute_dtype": "bfloat16 − float32",
                 **{k: means["bfloat16"][k] - means["float32"][k] for k in keys}})
  return rows


NOTES = """
Speed: each setup's two train steps (the library's, `train.make_train_step`,
built as benchmarks/train_throughput.py builds it, on one device) are compiled
from the same float32 params, then run interleaved, one step of each per
round on the same placed batch, each blocked on, after warm-up rounds;
`step / float32's` is the median over rounds of the per-round ratio, the
figure to quote (the machine is shared: absolute times move with the load,
which is recorded before and after the timed rounds). default: configs/default.py
(small CNN + GRU, 32x32 uint8 images, batch 128); vsepp: precomputed
2048-d features -> 1024, GRU 300 / 1024, vocabulary 10k, COCO-like
captions, batch 128. The GRU is the packed one (model.gru_impl auto on CPU).

bfloat16 on a CPU: XLA's CPU backend runs every bfloat16 dot and
convolution as a float32 one, converting the operands back (in the compiled
HLO of the bfloat16 step every dot and convolution is float32, beside about
50 converts): the step pays bfloat16's rounding and the converts and gains
nothing, so it is slower here, and the wider the matmuls the more (vsepp's
1024-wide GRU). Mixed precision exists for accelerators with bfloat16
matrix units (GPU tensor cores, TPU MXUs); this machine has none, and no
accelerator number is claimed.

Recall: configs/default.py with `harness.short_tasks` (200 steps per task
at batch 64, 4 tasks), trained and evaluated end to end
(`run.loop.train_and_evaluate`) with each compute dtype; final average
R@1 over the 4 tasks after the last one, task-aware galleries, both
regimes (reindex: galleries re-embedded by the last model; fixed: each
task's gallery kept as embedded after its own task) and both directions.
Evaluation embeds with the training compute dtype (`make_embed_fns`), the
embeddings themselves are float32. bfloat16 changes every rounding, hence
the whole trajectory, as another seed would: read the differences against
the seeds' own spread (seed 0 vs seed 1 in float32 differ by 5 to 11 points
here), not as an effect. train s / wall s are not interleaved (one run after
another on a shared machine): indicative only.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  smoke = mode == "smoke"
  # Timed rounds per setup: a default step takes ~50 ms on 2 CPU cores, a
  # vsepp one ~1 s; more rounds where they are cheap.
  rounds = {"full": {"default": 40, "vsepp": 12}, "quick": {"default": 12, "vsepp": 4},
            "smoke": {"default": 2, "vsepp": 2}}[mode]
  warmup = 1 if smoke else 2
  seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else (
      [0, 1] if mode == "full" else [0])
  records = []
  if "speed" in FLAGS.parts:
    for name in FLAGS.setups:
      steps = FLAGS.steps or rounds[name]
      for record in measure_speed(name, smoke=smoke, warmup=warmup, steps=steps):
        record["mode"] = mode
        harness.emit(record)
        records.append(record)
  if "recall" in FLAGS.parts:
    for seed in seeds:
      for dtype in DTYPES:
        record = run_experiment(FLAGS.workroot, seed, dtype, smoke)
        record["mode"] = mode
        harness.emit(record)
        records.append(record)
  speed = [speed_row(r) for r in records if r["kind"] == "speed"]
  recall = [r for r in records if r["kind"] == "recall"]
  tables = []
  if speed:
    tables += ["Train-step time, float32 vs bfloat16 (interleaved, one process):", "",
               harness.markdown_table(speed, SPEED_COLUMNS)]
  if recall:
    tables += ["", "Final average R@1, task-aware (default experiment, short tasks):", "",
               harness.markdown_table(recall_rows(recall), RECALL_COLUMNS)]
  harness.publish("mixed_precision", records, "\n".join(tables), module=MODULE,
                  mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_list("parts", ["speed", "recall"], "Which measurements: speed, recall.")
  flags.DEFINE_list("setups", list(train_throughput.SETUPS),
                    f"Speed: which of {train_throughput.SETUPS} to time.")
  flags.DEFINE_integer("steps", 0, "Speed: timed rounds (0: default 40 / vsepp 12 full, "
                       "12 / 4 quick, 2 smoke).")
  flags.DEFINE_list("seeds", [], "Recall: training seeds (empty: 0,1 full; 0 otherwise).")
  flags.DEFINE_string("workroot", "/tmp/ccr_mixed_precision", "Recall: one workdir per run.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
