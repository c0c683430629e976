r"""What each contrastive loss costs once XLA has compiled it, and what it learns.

  python -m launch.ablate_losses --quick      # 4 losses x 2 variants at batch 256: ~1-2 min, 2 CPU cores
  python -m launch.ablate_losses --batch_sizes=128,512,2048 \
      --variants=dense,dense_bf16,dense_remat,blocked,blocked_remat
  python -m launch.ablate_losses --losses=vse0,infonce --variants=dense --train
  python -m launch.ablate_losses --write_results                # -> benchmarks/results/

For every (loss, variant, batch size) the real train step of the config
(`--config`, default configs/default.py: the embedded benchmark's model,
optimizer and strategy) is built with `train.make_train_step`, lowered and
compiled ahead of time, then run on random inputs of that batch size:

  compile_s          `lower(...).compile()` of the train step
  step_s             median wall time of `--steps` steps after a warm-up
  step_xla_flops, step_xla_bytes    XLA `cost_analysis()` of the step
  step_temp_mb, step_argument_mb    XLA `memory_analysis()` of the step
  loss_xla_flops, loss_xla_bytes, loss_temp_mb   the same for the loss and
                     its gradient alone (value_and_grad over [B, D]
                     embeddings), where the variants differ most
  loss_matmul_gflops the score matmuls the variant really runs per
                     value_and_grad: 2 B^2 D forward, twice that backward, and
                     once more forward under remat

XLA's cost analysis counts a while loop's body once whatever its trip count;
`lax.scan` lowers to one, so the blocked variants' loss FLOPs/bytes are those
of one block (and the GRU's recurrence is counted once in every step figure).
`loss_matmul_gflops` is the count to compare FLOPs by.

With --train each (loss, variant) also trains the embedded benchmark (the
config, `--train_steps` per task) and reports the final task-aware R@1 of both
directions under reindexing (`final_r1_i2t`, `final_r1_t2i`), with the batch
size of the config. Output: one JSON object per line and a markdown table;
--write_results writes both to benchmarks/results/ablate_losses.{json,md}.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from benchmarks import harness
from benchmarks import train_throughput
from ccr_jax import losses
from ccr_jax import sharding
from ccr_jax.run import loop

MODULE = "launch.ablate_losses"
# name -> (blocked, matmul_dtype, remat); a blocked variant uses --block_size.
VARIANTS = {
    "dense": (False, "float32", False),
    "dense_bf16": (False, "bfloat16", False),
    "dense_remat": (False, "float32", True),
    "blocked": (True, "float32", False),
    "blocked_remat": (True, "float32", True),
    "blocked_remat_bf16": (True, "bfloat16", True),
}
QUICK = dict(batch_sizes=(256,), variants=("dense", "blocked_remat"),
             steps=2, train_config="tiny", train_steps=0)
FULL = dict(batch_sizes=(128, 512, 2048),
            variants=("dense", "dense_bf16", "dense_remat", "blocked", "blocked_remat"),
            steps=5, train_config="", train_steps=200)
# Token ids of the random captions are drawn below this (the embedded
# benchmark's vocabulary is ~120 words; the table's size does not matter).
VOCAB_SIZE = 128

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(harness.REPO, "configs", "default.py"),
    "Experiment config whose model, optimizer and strategy the step uses.",
    lock_config=False)
flags.DEFINE_list("losses", list(losses.LOSSES), "Losses to ablate.")
flags.DEFINE_list("variants", [], f"Among {list(VARIANTS)} (empty: by mode).")
flags.DEFINE_list("batch_sizes", [], "Global batch sizes (empty: by mode).")
flags.DEFINE_integer("block_size", 128, "Caption block of the blocked variants"
                     " (at most batch / 4, so that a batch has several blocks).")
flags.DEFINE_integer("steps", 0, "Timed steps per measurement (0: by mode).")
flags.DEFINE_bool("train", False, "Also train the embedded benchmark per (loss, variant).")
flags.DEFINE_integer("train_steps", -1, "Steps per task with --train (-1: by mode;"
                     " 0: the config's).")
flags.DEFINE_string("train_workdir", "", "Where --train runs go (empty: a temp dir).")
flags.DEFINE_string("results_name", "ablate_losses", "--write_results writes"
                    " benchmarks/results/<results_name>.{json,md}.")
harness.define_common_flags(flags)


def loss_config(base: ml_collections.ConfigDict, name: str, variant: str,
                block_size: int) -> ml_collections.ConfigDict:
  """`base` (a config's loss section) with the loss and compiled variant set.

  InfoNCE and SigLIP learn their temperature (SigLIP also its bias), from
  CLIP's 0.07 and SigLIP's 0.1 / -10, with the batch-mean reduction their
  papers use; the hinge losses keep the config's margin and reduction.
  """
  blocked, dtype, remat = VARIANTS[variant]
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.name = name
  if name in ("infonce", "siglip"):
    cfg.learn_temperature = True
    cfg.temperature = 0.07 if name == "infonce" else 0.1
    cfg.reduction = "mean"
  cfg.block_size = block_size if blocked else 0
  cfg.matmul_dtype = dtype
  cfg.remat = remat
  return cfg


def random_batch(rng: np.random.Generator, batch: int, image_shape, max_len: int
                 ) -> dict[str, np.ndarray]:
  """A host batch of the embedded benchmark's shapes with random content.

  Returns images uint8 [B, H, W, 3], tokens int32 [B, max_len], lengths
  int32 [B] in [4, max_len], image_ids int32 [B] (every pair its own image).
  """
  lengths = rng.integers(4, max_len + 1, size=batch).astype(np.int32)
  tokens = rng.integers(1, VOCAB_SIZE, size=(batch, max_len)).astype(np.int32)
  tokens[np.arange(max_len)[None, :] >= lengths[:, None]] = 0
  return {"images": rng.integers(0, 256, size=(batch, *image_shape), dtype=np.uint8),
          "tokens": tokens, "lengths": lengths,
          "image_ids": np.arange(batch, dtype=np.int32)}


def measure_step(config: ml_collections.ConfigDict, batch_size: int, steps: int,
                 mesh) -> dict:
  """Compile time, XLA cost and memory, and median time of the real train step."""
  image_shape = (config.data.image_size, config.data.image_size, 3)
  max_len = config.data.max_caption_len
  train_step, state, _ = train_throughput.build_train_step(
      config, VOCAB_SIZE, image_shape, max_len, mesh)
  rng = np.random.default_rng(0)
  batches = [sharding.shard_batch(random_batch(rng, batch_size, image_shape, max_len),
                                  mesh) for _ in range(2)]
  compile_s, compiled = harness.timed(
      lambda: train_step.lower(state, batches[0]).compile())
  times, metrics, _ = train_throughput.time_steps(compiled, state, batches, warmup=1,
                                                  steps=steps)
  cost = train_throughput.xla_cost(compiled)
  return {"compile_s": compile_s, "step_s": statistics.median(times),
          "pairs_per_s": batch_size / statistics.median(times),
          "final_loss": float(metrics["loss"]),
          **{f"step_{k}": v for k, v in cost.items()}}


def measure_loss(config: ml_collections.ConfigDict, batch_size: int) -> dict:
  """XLA cost and memory of the loss and its gradient alone, on [B, D] embeddings."""
  dim = config.model.embed_dim
  loss_fn = losses.make_loss(config.loss)
  params = losses.initial_params(config.loss)
  emb = jax.ShapeDtypeStruct((batch_size, dim), jnp.float32)
  ids = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  grad = jax.jit(jax.value_and_grad(
      lambda a, b, i, p: loss_fn(a, b, image_ids=i, step=0, loss_params=p)[0],
      argnums=(0, 1, 3)))
  compiled = grad.lower(emb, emb, ids, params).compile()
  passes = 3 + (1 if config.loss.remat else 0)  # forward, 2 backward, recompute
  return {"loss_matmul_gflops": passes * 2 * batch_size**2 * dim / 1e9,
          **{f"loss_{k}": v for k, v in train_throughput.xla_cost(compiled).items()}}


def train_record(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates the embedded benchmark; final task-aware reindex R@1."""
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, workdir)
  summary = results["summary"]["reindex" if config.index.reindex else "fixed"]
  return {"train_wall_s": time.perf_counter() - start,
          "final_r1_i2t": summary["task_aware"]["i2t_r1"]["final_average"],
          "final_r1_t2i": summary["task_aware"]["t2i_r1"]["final_average"]}


TABLE_COLUMNS = (
    ("loss", "loss"), ("variant", "variant"), ("batch", "batch"),
    ("compile_s", "compile s"), ("step_ms", "step ms"), ("pairs_per_s", "pairs/s"),
    ("step_temp_mb", "step temp MB"), ("step_xla_gflops", "step XLA GFLOP"),
    ("loss_matmul_gflops", "loss matmul GFLOP"), ("loss_temp_mb", "loss temp MB"),
    ("loss_xla_mb_accessed", "loss XLA MB accessed"),
)
TRAIN_COLUMNS = (
    ("loss", "loss"), ("variant", "variant"), ("batch", "batch"),
    ("steps_per_task", "steps / task"), ("train_wall_s", "wall s"),
    ("final_r1_i2t", "final R@1 i2t"), ("final_r1_t2i", "final R@1 t2i"),
)

NOTES = """
Per (loss, variant, batch): the real train step of configs/default.py's model
(CNN + GRU, Adam, clip) at that global batch, on random inputs, compiled ahead
of time. step ms: median of the timed steps after a warm-up. temp MB: XLA's
`memory_analysis()` temporary buffers (step: the whole train step; loss: the
loss and its gradient alone over [B, 128] embeddings). loss matmul GFLOP: the
score matmuls each variant runs per value_and_grad (remat recomputes the
forward). XLA counts a scan's body once, so XLA FLOPs/bytes of blocked
variants are one block's. With --train, a second table: the final
task-aware reindex R@1 average after training the embedded benchmark with
that loss and variant. InfoNCE and SigLIP learn their temperature (SigLIP its bias too),
batch-mean reduction; the hinge losses use the config's margin and sum.
On CPU bfloat16 matmuls are not faster (no bf16 units): that variant is for
accelerators, and here shows only its rounding.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  defaults = dict(QUICK if mode != "full" else FULL)
  if mode == "smoke":
    defaults.update(batch_sizes=(32,), variants=("dense", "blocked_remat"), steps=1)
  variants = FLAGS.variants or list(defaults["variants"])
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants {unknown} unknown; valid: {list(VARIANTS)}")
  unknown = sorted(set(FLAGS.losses) - set(losses.LOSSES))
  if unknown:
    raise app.UsageError(f"--losses {unknown} unknown; valid: {sorted(losses.LOSSES)}")
  batch_sizes = [int(b) for b in FLAGS.batch_sizes] or list(defaults["batch_sizes"])
  steps = FLAGS.steps or defaults["steps"]
  base = _CONFIG.value
  mesh = sharding.make_mesh()
  records = []
  for name in FLAGS.losses:
    for variant in variants:
      for batch in batch_sizes:
        config = ml_collections.ConfigDict(base.to_dict())
        block = max(1, min(FLAGS.block_size, batch // 4))
        config.loss = loss_config(base.loss, name, variant, block)
        config.train.batch_size = batch
        sharding.check_batch_size(batch, mesh)
        record = {"loss": name, "variant": variant, "batch": batch,
                  "block_size": config.loss.block_size,
                  "matmul_dtype": config.loss.matmul_dtype, "remat": config.loss.remat,
                  **measure_step(config, batch, steps, mesh),
                  **measure_loss(config, batch), "devices": jax.device_count()}
        records.append(record)
        harness.emit(record)
      if FLAGS.train:
        config = ml_collections.ConfigDict(base.to_dict())
        if mode != "full" and defaults["train_config"]:
          config = experiment_config(defaults["train_config"])
        train_steps = (FLAGS.train_steps if FLAGS.train_steps >= 0
                       else defaults["train_steps"])
        if train_steps:
          config.train.steps_per_task = train_steps
          config.train.checkpoint_every = 0
        config.loss = loss_config(config.loss, name, variant,
                                  max(1, min(FLAGS.block_size,
                                             config.train.batch_size // 4)))
        root = FLAGS.train_workdir or tempfile.mkdtemp(prefix="ablate_losses_")
        workdir = os.path.join(root, f"{name}_{variant}")
        logging.info("training %s / %s into %s", name, variant, workdir)
        record = {"loss": name, "variant": variant, "batch": config.train.batch_size,
                  "steps_per_task": config.train.steps_per_task,
                  **train_record(config, workdir)}
        records.append(record)
        harness.emit(record)
  rows = [{**r, "step_ms": 1e3 * r["step_s"],
           "step_xla_gflops": (r["step_xla_flops"] / 1e9
                               if r.get("step_xla_flops") is not None else None),
           "loss_xla_mb_accessed": (r["loss_xla_bytes"] / 2**20
                                    if r.get("loss_xla_bytes") is not None else None)}
          for r in records if "step_s" in r]
  table = harness.markdown_table(rows, TABLE_COLUMNS)
  trained = [r for r in records if "final_r1_i2t" in r]
  if trained:
    table += "\n\nTrained on the embedded benchmark:\n\n" + harness.markdown_table(
        trained, TRAIN_COLUMNS)
  harness.publish(FLAGS.results_name, records, table, module=MODULE, mode=mode,
                  notes=NOTES, write=FLAGS.write_results)


def experiment_config(arg: str) -> ml_collections.ConfigDict:
  """configs/default.py's config for `arg` ('tiny' for the smoke-sized one)."""
  from configs import default
  return default.get_config(arg or None)


if __name__ == "__main__":
  app.run(main)
