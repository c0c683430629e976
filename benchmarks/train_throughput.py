r"""Train-step throughput: pairs/s, step time, compile time, FLOPs, peak memory.

  python -m benchmarks.train_throughput            # full: ~4 min on 2 idle CPU cores
  python -m benchmarks.train_throughput --quick    # ~75 s: 6 timed steps instead of 20
  # The GRU implementations side by side, interleaved in one process:
  python -m benchmarks.train_throughput --setups=vsepp --devices=1 --gru_impl=packed,scan
  # Larger batches (each setup at each size):
  python -m benchmarks.train_throughput --setups=vsepp --batch_sizes=128,512,2048

Two setups, each on 1 and 2 host devices:
  default  configs/default.py: small CNN + GRU on 32x32 uint8 images, batch 128.
  vsepp    VSE++ on precomputed features: image_tower='precomputed' (2048 -> 1024),
           GRU word 300 / hidden 1024, vocabulary 10k, captions of COCO-like
           lengths (about 12.5 tokens, at most 32), batch 128.
--batch_sizes replaces each setup's batch size by each size given in turn.
--gru_impl picks the text tower's GRU (`text_towers.GRUTextEncoder.gru_impl`:
auto, packed or scan); with several, one worker compiles the step once per
implementation and times them interleaved, one step of each in turn, so
that they share the machine's load; `step_ratio` is then the median over
rounds of each one's step time over the first one's in the same round.
Records say what ran: `backend` (`jax.default_backend()`), `device_kind`,
`gru_impl` (as asked) and `gru_impl_resolved` (what "auto" chose). Workers
default to JAX_PLATFORMS=cpu (`harness.worker_env`): set JAX_PLATFORMS=cuda
to time a GPU.
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
outside the GRU plus `gru_flops`; the same count for both GRU
implementations, which do the same model work),
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
from ccr_jax.models import text_towers
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


def make_setup(name: str, smoke: bool = False, batch_size: int | None = None) -> Setup:
  """The setup `name`; `smoke` shrinks it to seconds (same code paths).

  `batch_size`, if given, replaces the setup's own (config.train.batch_size).
  """
  if name == "default":
    config = default.get_config("tiny" if smoke else None)
    setup = Setup(name, config, 97 if smoke else DEFAULT_VOCAB_SIZE,
                  (config.data.image_size,) * 2 + (3,), "uint8",
                  config.data.max_caption_len, COCO_MEAN_TOKENS)
  elif name == "vsepp":
    config = default.get_config()
    config.model.image_tower = "precomputed"
    config.model.embed_dim = 32 if smoke else 1024  # VSE++: joint space = GRU hidden
    config.model.word_dim = 16 if smoke else 300
    config.train.batch_size = 16 if smoke else 128
    setup = Setup(name, config, 100 if smoke else 10_000,
                  (64,) if smoke else (2048,), "float32",
                  8 if smoke else 32, 5.0 if smoke else COCO_MEAN_TOKENS)
  else:
    raise ValueError(f"unknown setup {name!r}; valid: {SETUPS}")
  if batch_size is not None:
    config.train.batch_size = int(batch_size)
  return setup


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


def with_gru_impl(model: dual_encoder.DualEncoder, gru_impl: str | None,
                  gru_unroll: int | bool | None = None) -> dual_encoder.DualEncoder:
  """`model` with its GRU text tower's `gru_impl` / `gru_unroll` set (None: as built).

  The parameters do not depend on either, so the same state serves all.

  Raises:
    ValueError: one is given but the text tower is not the GRU.
  """
  updates = {k: v for k, v in (("gru_impl", gru_impl), ("gru_unroll", gru_unroll))
             if v is not None}
  if not updates:
    return model
  if not isinstance(model.txt, text_towers.GRUTextEncoder):
    raise ValueError(f"{updates} needs the GRU text tower, not {type(model.txt).__name__}")
  if gru_impl is not None:
    text_towers.resolve_gru_impl(gru_impl)  # checks the name
  return model.clone(txt=model.txt.clone(**updates))


def build_train_step(config: ml_collections.ConfigDict, vocab_size: int,
                     image_shape: tuple[int, ...], max_len: int, mesh,
                     gru_impl: str | None = None, gru_unroll: int | bool | None = None):
  """The library's train step for `config`, with its initial state, on `mesh`.

  Built as the experiment builds it (`losses.make_loss`, the strategy, the
  optimizer, `train.make_train_step`, `train.create_train_state`), with params
  from PRNGKey(0) plus the loss's own (`setup_lib.with_loss_params`).
  `gru_impl` ("auto", "packed", "scan") and `gru_unroll` override the GRU
  text tower's (`with_gru_impl`; None: the model's own).

  Returns:
    (train_step: jitted, not yet compiled; state; params).
  """
  model = with_gru_impl(dual_encoder.build_model(config.model, vocab_size), gru_impl,
                        gru_unroll)
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
               steps: int) -> tuple[list[float], dict, dict]:
  """Runs `warmup + steps` steps cycling through placed `batches`, each blocked on.

  Returns the wall times of the `steps` timed steps, the last metrics and the
  last state (`state` itself is donated).
  """
  times, metrics, states = time_steps_interleaved({"": (compiled, state)}, batches,
                                                  warmup=warmup, steps=steps)
  return times[""], metrics[""], states[""]


def time_steps_interleaved(runs: dict[str, tuple], batches: list[dict], *, warmup: int,
                           steps: int
                           ) -> tuple[dict[str, list[float]], dict[str, dict], dict[str, dict]]:
  """`time_steps` for several compiled steps at once, one step of each in turn.

  Args:
    runs: name -> (compiled step, its state); each state is donated to its
      step and replaced by the step's output.
    batches: placed batches, shared by every run (not donated).
    warmup, steps: untimed and timed rounds.

  Returns:
    (name -> the `steps` wall times, name -> the last metrics, name -> the
    last state). Round i of every run saw the same batch and, being adjacent
    in time, about the same background load: per-round ratios compare them
    fairly.
  """
  states = {name: state for name, (_, state) in runs.items()}
  times = {name: [] for name in runs}
  metrics = {}
  for i in range(warmup + steps):
    for name, (compiled, _) in runs.items():
      start = time.perf_counter()
      states[name], metrics[name] = compiled(states[name], batches[i % len(batches)])
      jax.block_until_ready((states[name], metrics[name]))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  return times, metrics, states


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
  are the packed GRU's (`text_towers.packed_gru`), counted by `gru_flops`
  instead; the scan GRU's (`text_towers.scan_gru`) are scans, counted here
  (exactly `gru_flops` over the padded tokens).

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


def measure(setup: Setup, *, warmup: int, steps: int, matmul_n: int,
            gru_impls: tuple[str, ...] = ("auto",)) -> list[dict]:
  """Compiles the library's train step for `setup` and times `steps` steps.

  Runs on every device JAX sees (the worker's host device count). With
  several `gru_impls`, compiles one step per implementation and times them
  interleaved (`time_steps_interleaved`) on the same batches.

  Returns:
    One record per implementation, in `gru_impls` order.
  """
  cfg = setup.config
  if cfg.model.text_tower != "gru":
    raise ValueError(f"FLOPs are counted for the GRU text tower, not {cfg.model.text_tower!r}")
  mesh = sharding.make_mesh()
  sharding.check_batch_size(setup.batch_size, mesh)
  rng = np.random.default_rng(0)
  # A few distinct batches, placed before timing: the step is measured, not
  # the host-side batch assembly (the pipeline's numpy indexing).
  batches = [sharding.shard_batch(synthetic_batch(rng, setup), mesh) for _ in range(4)]
  # The timed steps cycle through `batches`: their mean token count is the
  # real work.
  real_tokens = float(np.mean([np.sum(b["lengths"]) for b in batches]))
  padded_gru_flops, real_gru_flops = (
      gru_flops(tokens, cfg.model.word_dim, cfg.model.embed_dim)
      for tokens in (setup.batch_size * setup.max_len, real_tokens))

  runs, facts = {}, {}
  for impl in gru_impls:
    train_step, state, params = build_train_step(
        cfg, setup.vocab_size, setup.image_shape, setup.max_len, mesh, gru_impl=impl)
    compile_s, compiled = harness.timed(
        lambda: train_step.lower(state, batches[0]).compile())
    resolved = text_towers.resolve_gru_impl(impl)
    # The global batch's FLOPs (the same on any device count): the jaxpr's
    # outside the GRU, plus the GRU's over padded or over real tokens. The
    # packed GRU's loops are `while`s, which the jaxpr count skips; the scan
    # GRU's are scans, which it counts over the padded tokens: taken out here.
    outside_gru = jaxpr_matmul_flops(jax.make_jaxpr(train_step)(state, batches[0]).jaxpr)
    if resolved == "scan":
      outside_gru -= padded_gru_flops
    runs[impl] = (compiled, state)
    facts[impl] = {
        "gru_impl": impl, "gru_impl_resolved": resolved, "compile_s": compile_s,
        "flops_per_step": outside_gru + padded_gru_flops,
        "real_flops_per_step": outside_gru + real_gru_flops,
        "xla_flops_per_device_step": xla_cost(compiled)["xla_flops"],
        "param_count": int(sum(x.size for x in jax.tree.leaves(params)))}

  times, metrics, _ = time_steps_interleaved(runs, batches, warmup=warmup, steps=steps)
  devices = jax.device_count()
  limit = matmul_flops_per_s(matmul_n, repeats=5)
  first = gru_impls[0]
  records = []
  for impl in gru_impls:
    loss = float(metrics[impl]["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{setup.name} ({impl}): loss {loss} after "
                               f"{warmup + steps} steps")
    step_s = statistics.median(times[impl])
    fact = facts[impl]
    flops, real_flops = fact["flops_per_step"], fact["real_flops_per_step"]
    per_device_xla_flops = fact["xla_flops_per_device_step"]
    records.append({
        "benchmark": "train_throughput", "setup": setup.name, "devices": devices,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        **fact,
        "interleaved_with": [i for i in gru_impls if i != impl],
        # Per-round ratio to the first implementation (1.0 for itself).
        "step_ratio": harness.paired_ratio(times[impl], times[first]),
        "batch_size": setup.batch_size, "pairs_per_s": setup.batch_size / step_s,
        "step_s": step_s, "step_s_min": min(times[impl]),
        "step_s_max": max(times[impl]), "timed_steps": len(times[impl]),
        "flops_per_s": flops / step_s,
        "xla_flops_per_step": None if per_device_xla_flops is None
        else per_device_xla_flops * devices,
        "matmul_flops_per_s": limit, "fraction_of_matmul": flops / step_s / limit,
        "real_tokens_per_step": real_tokens, "real_flops_per_s": real_flops / step_s,
        "real_fraction_of_matmul": real_flops / step_s / limit,
        "final_loss": loss, "peak_rss_mb": harness.peak_rss_mb(),
        "load_average": harness.load_average(),
    })
  return records


TABLE_COLUMNS = (
    ("setup", "setup"), ("backend", "backend"), ("device_kind", "device"),
    ("devices", "devices"), ("batch_size", "batch"), ("gru", "GRU"),
    ("pairs_per_s", "pairs/s"), ("step_ms", "step ms (median)"),
    ("step_ratio", "step / first GRU's"),
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

  gru = record.get("gru_impl")
  if gru is not None and gru != record.get("gru_impl_resolved"):
    gru = f"{gru} ({record['gru_impl_resolved']})"
  return {**record, "step_ms": 1e3 * record["step_s"], "gru": gru,
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
onto every device. GRU: `model.gru_impl` as asked, with what "auto" chose
in brackets (packed on CPU, scan elsewhere); the FLOP counts are the same
for both, which do the same model work. With several GRUs in a run, each
(setup, devices, batch) compiles one step per GRU in one worker and times
them interleaved, one step of each in turn; step / first GRU's is the
median over rounds of the per-round ratio, and peak RSS is the worker's
(all of its GRUs together).
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  steps = FLAGS.steps or {"full": 20, "quick": 6, "smoke": 2}[mode]
  warmup = 1 if mode == "smoke" else 2
  matmul_n = 256 if mode == "smoke" else 2048
  gru_impls = tuple(FLAGS.gru_impl)
  for impl in gru_impls:
    text_towers.resolve_gru_impl(impl, backend="cpu")  # a bad name fails here, not in a worker
  if FLAGS.worker:
    (name,) = FLAGS.setups
    (batch_size,) = FLAGS.batch_sizes or (None,)
    setup = make_setup(name, smoke=mode == "smoke", batch_size=batch_size)
    for record in measure(setup, warmup=warmup, steps=steps, matmul_n=matmul_n,
                          gru_impls=gru_impls):
      harness.emit(record)
    return
  records = []
  for name in FLAGS.setups:
    for devices in FLAGS.devices:
      for batch_size in FLAGS.batch_sizes or (None,):
        args = [f"--setups={name}", "--worker", f"--steps={steps}",
                f"--quick={FLAGS.quick}", f"--smoke={FLAGS.smoke}",
                f"--gru_impl={','.join(gru_impls)}"]
        if batch_size is not None:
          args.append(f"--batch_sizes={batch_size}")
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
  flags.DEFINE_list("batch_sizes", [], "Batch sizes, e.g. 128,512,2048 (one worker "
                    "each); empty: each setup's own (128).")
  flags.DEFINE_list("gru_impl", ["auto"], f"GRU implementations, of {text_towers.GRU_IMPLS}; "
                    "several are timed interleaved in one worker.")
  flags.DEFINE_bool("worker", False, "Internal: time one setup in this process.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
