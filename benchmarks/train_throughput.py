r"""Train-step throughput: pairs/s, step time, compile time, FLOPs, peak memory.

  python -m benchmarks.train_throughput            # full: ~4 min on 2 idle CPU cores
  python -m benchmarks.train_throughput --quick    # ~75 s: 6 timed steps instead of 20

Two setups, each on 1 and 2 host devices:
  default  configs/default.py: small CNN + GRU on 32x32 uint8 images, batch 128.
  vsepp    VSE++ on precomputed features: image_tower='precomputed' (2048 -> 1024),
           GRU word 300 / hidden 1024, vocabulary 10k, captions of COCO-like
           lengths (about 12.5 tokens, at most 32), batch 128.
Inputs are random arrays of those shapes. The step is the library's own
(`train.make_train_step` over `sharding.make_mesh()`, with `make_optimizer`,
`make_loss`, `strategies.get_strategy` and `create_train_state`), compiled
ahead of time (`lower(...).compile()`) so compilation is timed apart from the
steps, which then run the very executable that was timed.

Every (setup, devices) runs in its own worker process: the host device count
is fixed when JAX starts, and each measurement gets a peak RSS of its own.

Keys: pairs_per_s (batch / step_s), step_s (median over timed steps, each
blocked on), compile_s, flops_per_step (matmul + convolution FLOPs of the
step as if every caption ran to the padded length: `jaxpr_matmul_flops`
outside the GRU plus `gru_flops`),
flops_per_s (flops_per_step / step_s), peak_rss_mb (the worker's), devices;
xla_flops_per_step (XLA's `cost_analysis()` of the compiled step, summed over
devices; it counts each GRU while-loop body once, so it is far lower);
also matmul_flops_per_s (a square float32 matmul on the same process, the
practical limit of this CPU) and fraction_of_matmul (flops_per_s over it).
real_flops_per_step counts the GRU's work on real tokens only (padding is
not work), real_flops_per_s = real_flops_per_step / step_s, and
real_fraction_of_matmul = real_flops_per_s / matmul_flops_per_s.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from absl import app
from absl import flags
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import harness
from ccr_jax.run import setup as setup_lib
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib
from ccr_jax.models import dual_encoder
from configs import default

MODULE = "benchmarks.train_throughput"
SETUPS = ("default", "vsepp")
# The default benchmark's vocabulary size (results.json `vocabulary_size` of a
# default run); it only sizes the word-embedding table.
DEFAULT_VOCAB_SIZE = 121
# COCO captions average ~10.5 words; with <start> and <end> ~12.5 tokens.
COCO_MEAN_TOKENS = 12.5


@dataclasses.dataclass(frozen=True)
class Setup:
  """One model and input shape to time.

  Attributes:
    name: 'default' or 'vsepp'.
    config: a full experiment config (model, loss, optim, train, strategy).
    vocab_size: word-embedding rows.
    image_shape: one image's input shape without the batch dim.
    image_dtype: 'uint8' pixels or 'float32' features.
    max_len: caption length bucket (tokens per caption, padded).
    mean_len: mean true caption length in tokens.
  """
  name: str
  config: ml_collections.ConfigDict
  vocab_size: int
  image_shape: tuple[int, ...]
  image_dtype: str
  max_len: int
  mean_len: float

  @property
  def batch_size(self) -> int:
    return int(self.config.train.batch_size)


def make_setup(name: str, smoke: bool = False) -> Setup:
  """The setup `name`; `smoke` shrinks it to seconds (same code paths)."""
  if name == "default":
    config = default.get_config("tiny" if smoke else None)
    return Setup(name, config, 97 if smoke else DEFAULT_VOCAB_SIZE,
                 (config.data.image_size,) * 2 + (3,), "uint8",
                 config.data.max_caption_len, COCO_MEAN_TOKENS)
  if name == "vsepp":
    config = default.get_config()
    config.model.image_tower = "precomputed"
    config.model.embed_dim = 32 if smoke else 1024  # VSE++: joint space = GRU hidden
    config.model.word_dim = 16 if smoke else 300
    config.train.batch_size = 16 if smoke else 128
    return Setup(name, config, 100 if smoke else 10_000,
                 (64,) if smoke else (2048,), "float32",
                 8 if smoke else 32, 5.0 if smoke else COCO_MEAN_TOKENS)
  raise ValueError(f"unknown setup {name!r}; valid: {SETUPS}")


def caption_lengths(rng: np.random.Generator, n: int, mean_len: float,
                    max_len: int) -> np.ndarray:
  """COCO-like caption lengths in tokens: 2 + Poisson(mean - 2), in [3, max_len].

  Returns int32 [n]. COCO's word counts have mean ~10.5 and sd ~2.5, which a
  Poisson of that mean matches closely; the rare long tail is clipped at the
  length bucket as the pipeline truncates.
  """
  lengths = 2 + rng.poisson(max(mean_len - 2.0, 0.0), size=n)
  return np.clip(lengths, min(3, max_len), max_len).astype(np.int32)


def synthetic_batch(rng: np.random.Generator, setup: Setup) -> dict[str, np.ndarray]:
  """A random batch with the shapes and dtypes `pipeline.train_batch` returns.

  Returns images [B, *image_shape] (uint8 pixels or float32 features),
  tokens [B, max_len] int32 (0 = padding past each length), lengths [B]
  int32 and image_ids [B] int32 (all distinct: every other pair a negative).
  """
  b = setup.batch_size
  if setup.image_dtype == "uint8":
    images = rng.integers(0, 256, (b, *setup.image_shape), dtype=np.uint8)
  else:
    images = rng.standard_normal((b, *setup.image_shape), dtype=np.float32)
  lengths = caption_lengths(rng, b, setup.mean_len, setup.max_len)
  tokens = rng.integers(1, setup.vocab_size, (b, setup.max_len)).astype(np.int32)
  tokens[np.arange(setup.max_len)[None, :] >= lengths[:, None]] = 0
  return {"images": images, "tokens": tokens, "lengths": lengths,
          "image_ids": np.arange(b, dtype=np.int32)}


def xla_cost(compiled) -> dict[str, float | None]:
  """XLA's estimates for one run of a compiled program on one device.

  Returns xla_flops, xla_bytes (bytes accessed) from `cost_analysis()`, and
  temp_mb, argument_mb from `memory_analysis()`; None where XLA gives none.
  XLA's cost analysis counts a while loop's body once, whatever its trip
  count, and `lax.scan` lowers to a while loop: for the GRU models this
  undercounts. See `jaxpr_matmul_flops` for the count that multiplies loop
  bodies out.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  memory = compiled.memory_analysis()
  as_float = lambda x: None if x is None else float(x)
  return {"xla_flops": as_float(cost.get("flops")),
          "xla_bytes": as_float(cost.get("bytes accessed")),
          "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else None,
          "argument_mb": memory.argument_size_in_bytes / 2**20 if memory else None}


def build_train_step(config: ml_collections.ConfigDict, vocab_size: int,
                     image_shape: tuple[int, ...], max_len: int, mesh):
  """The library's train step for `config`, with its initial state, on `mesh`.

  Built as the experiment builds it (`losses.make_loss`, the strategy, the
  optimizer, `train.make_train_step`, `train.create_train_state`), with params
  from PRNGKey(0) plus the loss's own (`setup_lib.with_loss_params`).

  Returns:
    (train_step: jitted, not yet compiled; state; params).
  """
  model = dual_encoder.build_model(config.model, vocab_size)
  loss_fn = train_lib.make_loss(config.loss)
  strategy = strategies.get_strategy(config.strategy, loss_fn)
  optimizer = train_lib.make_optimizer(config.optim, config.train.steps_per_task, strategy.transform)
  train_step = train_lib.make_train_step(model, optimizer, loss_fn, mesh,
                                         strategy.loss_term)
  params = jax.jit(
      lambda rng: setup_lib.with_loss_params(
          dual_encoder.init_params(model, rng, image_shape, max_len), config),
      out_shardings=sharding.replicated(mesh))(jax.random.PRNGKey(0))
  return train_step, train_lib.create_train_state(params, optimizer, mesh), params


def time_steps(compiled, state: dict, batches: list[dict], *, warmup: int,
               steps: int) -> tuple[list[float], dict]:
  """Runs `warmup + steps` steps cycling through placed `batches`, each blocked on.

  Returns the wall times of the `steps` timed steps and the last metrics.
  """
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batches[i % len(batches)])
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times, metrics


def _sub_jaxprs(value) -> list:
  """The jaxprs inside one equation parameter (a jaxpr, or a tuple of them)."""
  values = value if isinstance(value, (tuple, list)) else (value,)
  out = []
  for v in values:
    if isinstance(v, jax_core.ClosedJaxpr):
      out.append(v.jaxpr)
    elif isinstance(v, jax_core.Jaxpr):
      out.append(v)
  return out


def jaxpr_matmul_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of a jaxpr, scans times their length, `while` loops not.

  The usual "model FLOPs" of MFU figures: 2 * multiply-adds of every
  `dot_general` and `conv_general_dilated`; elementwise work is not counted.
  `cond` counts its costliest branch, `shard_map` its body times the devices
  it runs on. A `while` loop is not counted at all:
  its trip count is not static. In these train steps the only `while` loops
  are the GRU's (`text_towers.packed_gru`), counted by `gru_flops` instead.

  Args:
    jaxpr: a `jax.extend.core.Jaxpr` (e.g. `jax.make_jaxpr(f)(*args).jaxpr`).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
          [lhs[d] for d in contract])
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      # Each output element sums (input features per group) x (kernel window).
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_features
    elif name != "while":
      per_param = [[jaxpr_matmul_flops(j) for j in _sub_jaxprs(v)]
                   for v in eqn.params.values()]
      inner = sum(max(f) for f in per_param if f)
      if name == "scan":
        inner *= eqn.params["length"]
      elif name == "shard_map":  # Its body is one device's share: count all of them.
        inner *= math.prod(eqn.params["mesh"].shape[a]
                           for a in eqn.params["newly_manual_axes"])
      total += inner
  return float(total)


def gru_flops(num_tokens: float, word_dim: int, hidden_dim: int) -> float:
  """Matmul FLOPs of a train step's GRU (forward and backward) over `num_tokens` tokens.

  Per token the forward runs the input projection [word_dim] @ [word_dim,
  3 * hidden_dim] and the recurrent one [hidden_dim] @ [hidden_dim, 3 *
  hidden_dim]. The backward runs two matmuls per forward matmul, of the same
  size (the gradient of the weights, and of the input: the word vectors are
  trained, and the state feeds the previous step), so a step costs 3x the
  forward. What this counts is the model's work, whatever the implementation
  does: e.g. the step-0 recurrent matmul on the zero state counts.
  """
  forward = 2.0 * 3 * hidden_dim * (word_dim + hidden_dim)
  return 3.0 * forward * num_tokens


def matmul_flops_per_s(n: int, repeats: int) -> float:
  """FLOP/s of a jitted float32 [n, n] @ [n, n] on the default device.

  The practical limit of this CPU for dense float32 work: what a step
  made of perfectly efficient matmuls could reach.
  """
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()  # compile
  median, _ = harness.median_seconds(lambda: f(a, a).block_until_ready(), repeats)
  return 2.0 * n ** 3 / median


def measure(setup: Setup, *, warmup: int, steps: int, matmul_n: int) -> dict:
  """Compiles the library's train step for `setup` and times `steps` steps.

  Runs on every device JAX sees (the worker's host device count).
  """

  cfg = setup.config
  mesh = sharding.make_mesh()
  sharding.check_batch_size(setup.batch_size, mesh)
  train_step, state, params = build_train_step(cfg, setup.vocab_size, setup.image_shape,
                                               setup.max_len, mesh)
  rng = np.random.default_rng(0)
  # A few distinct batches, placed before timing: the step is measured, not
  # the host-side batch assembly (the pipeline's numpy indexing).
  batches = [sharding.shard_batch(synthetic_batch(rng, setup), mesh) for _ in range(4)]

  compile_s, compiled = harness.timed(
      lambda: train_step.lower(state, batches[0]).compile())
  per_device_xla_flops = xla_cost(compiled)["xla_flops"]
  # The global batch's FLOPs (the same on any device count): the jaxpr's
  # outside the GRU's loops, plus the GRU's over padded or over real tokens.
  # The timed steps cycle through `batches`: their mean token count is the
  # real work.
  if cfg.model.text_tower != "gru":
    raise ValueError(f"FLOPs are counted for the GRU text tower, not {cfg.model.text_tower!r}")
  outside_gru = jaxpr_matmul_flops(jax.make_jaxpr(train_step)(state, batches[0]).jaxpr)
  real_tokens = float(np.mean([np.sum(b["lengths"]) for b in batches]))
  flops, real_flops = (
      outside_gru + gru_flops(tokens, cfg.model.word_dim, cfg.model.embed_dim)
      for tokens in (setup.batch_size * setup.max_len, real_tokens))

  times, metrics = time_steps(compiled, state, batches, warmup=warmup, steps=steps)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{setup.name}: loss {loss} after {warmup + steps} steps")

  step_s = statistics.median(times)
  devices = jax.device_count()
  limit = matmul_flops_per_s(matmul_n, repeats=5)
  return {
      "benchmark": "train_throughput", "setup": setup.name, "devices": devices,
      "batch_size": setup.batch_size, "pairs_per_s": setup.batch_size / step_s,
      "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
      "timed_steps": len(times), "compile_s": compile_s,
      "flops_per_step": flops, "flops_per_s": flops / step_s,
      "xla_flops_per_step": None if per_device_xla_flops is None
      else per_device_xla_flops * devices,
      "xla_flops_per_device_step": per_device_xla_flops,
      "matmul_flops_per_s": limit, "fraction_of_matmul": flops / step_s / limit,
      "real_tokens_per_step": real_tokens, "real_flops_per_step": real_flops,
      "real_flops_per_s": real_flops / step_s,
      "real_fraction_of_matmul": real_flops / step_s / limit,
      "param_count": int(sum(x.size for x in jax.tree.leaves(params))),
      "final_loss": loss, "peak_rss_mb": harness.peak_rss_mb(),
      "load_average": harness.load_average(),
  }


TABLE_COLUMNS = (
    ("setup", "setup"), ("devices", "devices"), ("batch_size", "batch"),
    ("pairs_per_s", "pairs/s"), ("step_ms", "step ms (median)"),
    ("compile_s", "compile s"), ("gflops_per_step", "GFLOP/step"),
    ("xla_gflops_per_step", "XLA GFLOP/step"),
    ("gflops_per_s", "GFLOP/s"), ("matmul_gflops_per_s", "matmul GFLOP/s"),
    ("pct_of_matmul", "% of matmul"), ("real_gflops_per_step", "real GFLOP/step"),
    ("real_gflops_per_s", "real GFLOP/s"), ("real_pct_of_matmul", "real % of matmul"),
    ("peak_rss_mb", "peak RSS MB"),
)


def table_row(record: dict) -> dict:
  """A record with the table's derived units (ms, GFLOP, %)."""
  def giga(key):
    return None if record.get(key) is None else record[key] / 1e9

  def pct(key):
    return None if record.get(key) is None else 100 * record[key]

  return {**record, "step_ms": 1e3 * record["step_s"],
          "gflops_per_step": giga("flops_per_step"), "gflops_per_s": giga("flops_per_s"),
          "xla_gflops_per_step": giga("xla_flops_per_step"),
          "matmul_gflops_per_s": giga("matmul_flops_per_s"),
          "pct_of_matmul": pct("fraction_of_matmul"),
          "real_gflops_per_step": giga("real_flops_per_step"),
          "real_gflops_per_s": giga("real_flops_per_s"),
          "real_pct_of_matmul": pct("real_fraction_of_matmul")}


NOTES = """
pairs/s = batch / median step time (each step blocked on, inputs already on the
device, after 2 warm-up steps). compile s = `lower(...).compile()` of the train
step. GFLOP/step: matmul and convolution FLOPs of the step for the global
batch as if every caption ran to the padded length: the step's jaxpr (image
tower, loss) plus the GRU's forward and backward matmuls, counted as 3x the
forward's per token (the GRU's loops have dynamic trip counts, which a
jaxpr cannot multiply out). real GFLOP/step: the same with only the real
tokens (the sum of the true lengths, averaged over the timed batches);
padding is not work, and the GRU skips it. XLA GFLOP/step: XLA's
`cost_analysis()` of the compiled step, summed over devices; XLA counts a
while loop's body once whatever its trip count, so it undercounts these GRU
models by about the caption length (kept for reference, not used for
GFLOP/s). matmul GFLOP/s: a float32 2048² matmul in JAX in the same process,
the practical peak of this CPU; % of matmul = GFLOP/s over it, real % of
matmul = real GFLOP/s over it. 2 devices are 2 XLA host devices on the
same 2 cores: they add no compute, only another way to run it (each device
runs its half-batch on its own thread, then the gradients are all-reduced and
the optimizer update runs on both). The towers run per device on its own
rows (`sharding.per_batch_shard`): the GRU sorts and packs only its shard's
captions, where the whole batch's sort would make XLA gather every caption
onto every device.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  steps = FLAGS.steps or {"full": 20, "quick": 6, "smoke": 2}[mode]
  warmup = 1 if mode == "smoke" else 2
  matmul_n = 256 if mode == "smoke" else 2048
  if FLAGS.worker:
    (name,) = FLAGS.setups
    harness.emit(measure(make_setup(name, smoke=mode == "smoke"), warmup=warmup,
                         steps=steps, matmul_n=matmul_n))
    return
  records = []
  for name in FLAGS.setups:
    for devices in FLAGS.devices:
      args = [f"--setups={name}", "--worker", f"--steps={steps}",
              f"--quick={FLAGS.quick}", f"--smoke={FLAGS.smoke}"]
      for record in harness.run_worker(MODULE, args, host_devices=int(devices)):
        record["mode"] = mode
        harness.emit(record)
        records.append(record)
  harness.publish("train_throughput", records,
                  harness.markdown_table([table_row(r) for r in records], TABLE_COLUMNS),
                  module=MODULE, mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_list("setups", list(SETUPS), f"Which of {SETUPS} to time.")
  flags.DEFINE_list("devices", ["1", "2"], "Host device counts (one worker each).")
  flags.DEFINE_integer("steps", 0, "Timed steps (0: 20 full, 6 quick, 2 smoke).")
  flags.DEFINE_bool("worker", False, "Internal: time one setup in this process.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
