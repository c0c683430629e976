r"""What the default experiment's train step becomes for a GPU, read without a GPU.

  python -m benchmarks.lowered_program                   # ~20 s on 2 CPU cores
  python -m benchmarks.lowered_program --write_results   # also benchmarks/results/
  python -m benchmarks.lowered_program --setups=default,vsepp --platforms=cuda,tpu

Builds the library's train step as `train_throughput.build_train_step` does
(the experiment's model, loss, strategy, optimizer and `train.make_train_step`
on a 1-device mesh) once per GRU variant, and lowers it for CUDA on this
CPU-only machine: `jit(...).trace(*args).lower(lowering_platforms=("cuda",))`
needs JAX's lowering rules, not a GPU or the CUDA jaxlib plugin. (Should it
fail, the error is recorded and the step is lowered for the CPU instead,
marked as such. JAX 0.10.2 registers its CUDA-specific lowering rules, e.g.
for cumsum, scatter-add and convolutions, without the plugin; a primitive
that a CUDA machine would lower to a plugin's custom call, e.g. the PRNG's
threefry2x32, lowers to plain StableHLO here instead: none is in this step.)
Then, from the StableHLO, before any XLA optimisation:

  while      `stablehlo.while` loops, each with its trip count when it is a
             compile-time constant (the loop counter starts at a constant,
             steps by a constant and is compared with a constant), else
             "dynamic": on GPU a loop without a known trip count can read its
             predicate back to the host every iteration; one with a known
             count need not.
  case       `stablehlo.case` / `stablehlo.if` conditionals, split into those
             whose branch index is a compile-time constant (the
             platform-dependent switches of `jnp.diagonal`'s lowering, in the
             loss; XLA folds them away) and data-dependent ones, which on GPU
             can read the index back to the host each time they run (the
             packed GRU's per-step `lax.switch`).
  custom     `stablehlo.custom_call`s by target name: calls JAX emits itself
             (sharding annotations, callbacks, kernels of JAX's own); the
             cuBLAS / cuDNN calls XLA's GPU compiler makes later are not here.
  host       host transfers: send/recv, infeed/outfeed, host callbacks
             (custom calls whose target names a callback) and buffers placed
             in host memory.

Variants: packed (`text_towers.packed_gru`), scan (`text_towers.scan_gru`,
unroll 1) and scan_unrolled (the scan fully unrolled: no time loop at all).
XLA's later passes may still change the program (fold constant conditionals,
unroll short loops); what is counted is what XLA is given.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

from absl import app
from absl import flags
import jax
from jax._src.lib.mlir import ir  # the MLIR bindings `Lowered.compiler_ir` returns
import numpy as np

from benchmarks import harness
from benchmarks import train_throughput
from ccr_jax import sharding

MODULE = "benchmarks.lowered_program"
# name -> (gru_impl, gru_unroll)
VARIANTS = {"packed": ("packed", 1), "scan": ("scan", 1), "scan_unrolled": ("scan", True)}
HOST_TRANSFER_OPS = ("stablehlo.send", "stablehlo.recv", "stablehlo.infeed",
                     "stablehlo.outfeed")
CONDITIONAL_OPS = ("stablehlo.case", "stablehlo.if")


def _walk(op):
  """Every operation nested in `op`'s regions, depth first, in program order."""
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield child.operation
        yield from _walk(child.operation)


def _terminator(block):
  operations = list(block.operations)
  return operations[-1].operation if operations else None


def _source(op) -> str:
  """Where `op` comes from: the end of its name stack, forward or backward
  pass, and the innermost Python frame of its location, e.g. 'txt/gru/while,
  backward, text_towers.py:422 (PackedGRU.__call__)'."""
  location = str(op.location)
  parts = []
  names = re.match(r'loc\("([^"]+)"', location)
  if names:
    stack = names.group(1)
    parts.append("/".join(stack.split("/")[-3:]))
    if "/" in stack:  # a bare name ("cond") has no pass to tell
      parts.append("backward" if "transpose(" in stack else "forward")
  frame = re.search(r'"([^"]+)"\("([^"]+)":(\d+)', location)
  if frame:
    function, path, line = frame.groups()
    parts.append(f"{path.rsplit('/', 1)[-1]}:{line} ({function})")
  return ", ".join(parts) or "?"


class StableHLOProgram:
  """A lowered module, with what constant propagation across calls needs.

  Attributes:
    module: the `ir.Module`.
    funcs: symbol name -> `func.func` op.
    calls: callee name -> the `func.call` ops that call it.
  """

  def __init__(self, module: ir.Module):
    self.module = module
    self.funcs, self.calls = {}, collections.defaultdict(list)
    for op in _walk(module.operation):
      if op.name == "func.func":
        self.funcs[ir.StringAttr(op.attributes["sym_name"]).value] = op
      elif op.name == "func.call":
        self.calls[ir.FlatSymbolRefAttr(op.attributes["callee"]).value].append(op)

  def constant(self, value, depth: int = 0) -> float | None:
    """The scalar `value` holds whatever the inputs, or None.

    Follows constants through reshapes and conversions, integer arithmetic,
    function arguments (the same constant at every call site), call results,
    `case` results (every branch returns the same constant, or the index is
    constant) and loop-invariant `while` operands.
    """
    if depth > 64:
      return None
    owner = value.owner
    if isinstance(owner, ir.Block):
      return self._block_argument_constant(owner, ir.BlockArgument(value).arg_number, depth)
    op = owner.operation
    name = op.name
    recurse = lambda v: self.constant(v, depth + 1)
    if name == "stablehlo.constant":  # scalars and splats: dense<24> : tensor<i32>
      match = re.fullmatch(r"dense<([^>,\[\]]+)> : tensor<[^>]*>", str(op.attributes["value"]))
      if not match:
        return None
      text = match.group(1)
      try:
        return {"true": 1.0, "false": 0.0}[text] if text in ("true", "false") else float(text)
      except ValueError:  # a hex float bit pattern (NaN): no use as a bound or index
        return None
    if name in ("stablehlo.convert", "stablehlo.reshape", "stablehlo.broadcast_in_dim"):
      return recurse(op.operands[0])
    if name in ("stablehlo.add", "stablehlo.subtract", "stablehlo.multiply",
                "stablehlo.minimum", "stablehlo.maximum"):
      a, b = recurse(op.operands[0]), recurse(op.operands[1])
      if a is None or b is None:
        return None
      return {"stablehlo.add": a + b, "stablehlo.subtract": a - b,
              "stablehlo.multiply": a * b, "stablehlo.minimum": min(a, b),
              "stablehlo.maximum": max(a, b)}[name]
    index = ir.OpResult(value).result_number
    if name == "func.call":
      callee = self.funcs.get(ir.FlatSymbolRefAttr(op.attributes["callee"]).value)
      if callee is None:
        return None
      return recurse(_terminator(callee.regions[0].blocks[0]).operands[index])
    if name in CONDITIONAL_OPS:
      branches = [_terminator(region.blocks[0]).operands[index] for region in op.regions]
      selector = recurse(op.operands[0])
      if selector is not None and name == "stablehlo.case":
        # Out-of-range indices run the last branch.
        branch = int(selector) if 0 <= selector < len(branches) else len(branches) - 1
        return recurse(branches[branch])
      values = {recurse(v) for v in branches}
      return values.pop() if len(values) == 1 else None
    return None

  def _block_argument_constant(self, block, arg: int, depth: int) -> float | None:
    parent = block.owner.operation
    if parent.name == "func.func":
      name = ir.StringAttr(parent.attributes["sym_name"]).value
      sites = self.calls.get(name, [])
      values = {self.constant(call.operands[arg], depth + 1) for call in sites}
      return values.pop() if len(values) == 1 else None  # no call site: the entry
    if parent.name == "stablehlo.while" and self._loop_invariant(parent, arg):
      return self.constant(parent.operands[arg], depth + 1)
    return None

  @staticmethod
  def _loop_invariant(while_op, arg: int) -> bool:
    """Whether the body hands loop-carried value `arg` on unchanged."""
    body = while_op.regions[1].blocks[0]
    returned = _terminator(body).operands[arg]
    return (isinstance(returned.owner, ir.Block) and returned.owner == body
            and ir.BlockArgument(returned).arg_number == arg)

  def trip_count(self, while_op) -> int | None:
    """The loop's trip count if it is a compile-time constant, else None.

    Recognises `counter < bound` (or `>`) loops whose counter starts at a
    constant and steps by a constant each iteration, as `lax.scan` and
    `lax.fori_loop` emit them.
    """
    cond = while_op.regions[0].blocks[0]
    predicate = _terminator(cond).operands[0]
    if isinstance(predicate.owner, ir.Block):
      return None
    compare = predicate.owner.operation
    if compare.name != "stablehlo.compare":
      return None
    direction = re.search(r"comparison_direction (\w+)",
                          str(compare.attributes["comparison_direction"])).group(1)
    lhs, rhs = compare.operands
    if direction in ("GT", "GE"):
      lhs, rhs = rhs, lhs
      direction = {"GT": "LT", "GE": "LE"}[direction]
    if direction not in ("LT", "LE") or not (
        isinstance(lhs.owner, ir.Block) and lhs.owner == cond):
      return None
    counter = ir.BlockArgument(lhs).arg_number
    bound, start = self.constant(rhs), self.constant(while_op.operands[counter])
    body = while_op.regions[1].blocks[0]
    update = _terminator(body).operands[counter]
    step = None
    if not isinstance(update.owner, ir.Block) and update.owner.operation.name == "stablehlo.add":
      a, b = update.owner.operation.operands
      for x, y in ((a, b), (b, a)):
        if (isinstance(x.owner, ir.Block) and x.owner == body
            and ir.BlockArgument(x).arg_number == counter):
          step = self.constant(y)
    if bound is None or start is None or not step or step < 0:
      return None
    end = bound + (1 if direction == "LE" else 0)
    return max(0, math.ceil((end - start) / step))

  def reachable(self, op) -> list:
    """Every operation `op`'s regions run, following calls into their callees."""
    seen, out = set(), []

    def visit(op):
      for child in _walk(op):
        out.append(child)
        if child.name == "func.call":
          name = ir.FlatSymbolRefAttr(child.attributes["callee"]).value
          if name not in seen and name in self.funcs:
            seen.add(name)
            visit(self.funcs[name])

    visit(op)
    return out


def analyze(module: ir.Module, text: str) -> dict[str, Any]:
  """Loops, conditionals, custom calls and host transfers of a lowered module.

  Args:
    module: the StableHLO `ir.Module` (`Lowered.compiler_ir("stablehlo")`).
    text: its text (`Lowered.as_text()`), searched for host memory spaces.

  Returns:
    while_loops, static_while_loops, dynamic_while_loops, loops (one dict per
    while: trip_count or None, nesting depth, the data-dependent conditionals
    and dot_generals in its body, calls followed and every branch counted,
    and source);
    conditionals, constant_conditionals, data_dependent_conditionals (and
    their sources); custom_calls (target -> count); host_transfer_ops,
    host_callbacks, host_memory_annotations.
  """
  program = StableHLOProgram(module)
  ops = list(_walk(module.operation))
  counts = collections.Counter(op.name for op in ops)

  def constant_index(op):
    return program.constant(op.operands[0]) is not None

  loops = []
  for op in ops:
    if op.name != "stablehlo.while":
      continue
    inner = program.reachable(op)
    depth, parent = 0, op.parent
    while parent is not None and parent.name != "builtin.module":
      depth += parent.name == "stablehlo.while"
      parent = parent.parent
    loops.append({
        "trip_count": program.trip_count(op), "nesting_depth": depth,
        "dot_generals_in_body": sum(o.name == "stablehlo.dot_general" for o in inner),
        "data_dependent_conditionals_in_body": sum(
            o.name in CONDITIONAL_OPS and not constant_index(o) for o in inner),
        "source": _source(op)})
  conditionals = [op for op in ops if op.name in CONDITIONAL_OPS]
  dynamic = [op for op in conditionals if not constant_index(op)]
  custom = collections.Counter(
      ir.StringAttr(op.attributes["call_target_name"]).value
      for op in ops if op.name == "stablehlo.custom_call")
  return {
      "while_loops": len(loops),
      "static_while_loops": sum(l["trip_count"] is not None for l in loops),
      "dynamic_while_loops": sum(l["trip_count"] is None for l in loops),
      "loops": loops,
      "conditionals": len(conditionals),
      "constant_conditionals": len(conditionals) - len(dynamic),
      "data_dependent_conditionals": len(dynamic),
      "data_dependent_conditional_sources": sorted({_source(op) for op in dynamic}),
      "custom_calls": dict(sorted(custom.items())),
      "host_transfer_ops": sum(counts[name] for name in HOST_TRANSFER_OPS),
      "host_callbacks": sum(n for target, n in custom.items() if "callback" in target.lower()),
      "host_memory_annotations": len(re.findall(r"pinned_host|unpinned_host", text)),
      "dot_generals": counts["stablehlo.dot_general"],
      "operations": len(ops),
  }


def lower(train_step, state, batch, platform: str):
  """(`Lowered` for `platform`, the platform it was lowered for, the error if that failed).

  Falls back to lowering for the CPU when `platform` fails.
  """
  try:
    return train_step.trace(state, batch).lower(lowering_platforms=(platform,)), platform, None
  except Exception as e:  # pylint: disable=broad-except
    error = f"{type(e).__name__}: {e}"
    return train_step.trace(state, batch).lower(lowering_platforms=("cpu",)), "cpu", error


def measure(setup_name: str, variant: str, platform: str, smoke: bool) -> dict:
  """Lowers `setup_name`'s train step with GRU `variant` for `platform`; `analyze`s it."""
  gru_impl, unroll = VARIANTS[variant]
  setup = train_throughput.make_setup(setup_name, smoke=smoke)
  mesh = sharding.make_mesh(jax.devices()[:1])
  train_step, state, _ = train_throughput.build_train_step(
      setup.config, setup.vocab_size, setup.image_shape, setup.max_len, mesh,
      gru_impl=gru_impl, gru_unroll=unroll)
  batch = sharding.shard_batch(
      train_throughput.synthetic_batch(np.random.default_rng(0), setup), mesh)
  seconds, (lowered, lowered_for, error) = harness.timed(
      lambda: lower(train_step, state, batch, platform))
  stats = analyze(lowered.compiler_ir("stablehlo"), lowered.as_text())
  return {"benchmark": "lowered_program", "setup": setup_name, "variant": variant,
          "gru_impl": gru_impl, "gru_unroll": unroll, "batch_size": setup.batch_size,
          "max_len": setup.max_len, "requested_platform": platform,
          "lowered_for": lowered_for, "lowering_error": error, "lower_s": seconds,
          "jax": jax.__version__, **stats}


def _loops_summary(loops: list[dict]) -> str:
  trips = collections.Counter("dyn" if l["trip_count"] is None else str(l["trip_count"])
                              for l in loops)
  return ", ".join(f"{n}×{t}" for t, n in sorted(trips.items())) or "none"


TABLE_COLUMNS = (
    ("setup", "setup"), ("variant", "GRU"), ("lowered_for", "lowered for"),
    ("while_loops", "while"), ("static_while_loops", "static"),
    ("dynamic_while_loops", "dynamic"), ("trip_counts", "trip counts"),
    ("per_iteration_conditionals", "data-dep. case in loop bodies"),
    ("conditionals", "case/if"), ("constant_conditionals", "constant index"),
    ("data_dependent_conditionals", "data-dep. index"),
    ("custom_call_summary", "custom calls"), ("host_transfer_ops", "send/recv/feed"),
    ("host_callbacks", "host callbacks"), ("host_memory_annotations", "host memory"),
)


def table_row(record: dict) -> dict:
  custom = record["custom_calls"]
  return {**record, "trip_counts": _loops_summary(record["loops"]),
          "per_iteration_conditionals": sum(
              l["data_dependent_conditionals_in_body"] for l in record["loops"]
              if l["nesting_depth"] == 0),
          "custom_call_summary": ", ".join(f"{k}×{v}" for k, v in custom.items()) or "0"}


NOTES = """
Counted in the StableHLO that XLA is given (before its optimisations), of
the library's train step (`train_throughput.build_train_step`, 1 device),
lowered with `jit(train_step).trace(state, batch).lower(lowering_platforms=
("cuda",))` on a machine without a GPU. trip counts: `N×T` = N loops of T
iterations, `dyn` = the trip count is computed at run time. A loop's count
is static when its counter starts at a constant, steps by a constant and is
compared with a constant (followed through function calls and
loop-invariant operands). data-dep. case in loop bodies: conditionals with
a run-time index that the outermost loops run per iteration (nested loops
included); on GPU each can cost a host round trip per time step. constant index:
`platform_dependent` switches (`jnp.diagonal`'s, in the loss), whose index is
fixed once the platform is; XLA removes them. Loop details (sources, matmuls
per iteration) are in lowered_program.json.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  unknown = set(FLAGS.variants) - set(VARIANTS)
  if unknown:
    raise ValueError(f"unknown variants {sorted(unknown)}; valid: {list(VARIANTS)}")
  records = []
  for setup_name in FLAGS.setups:
    for variant in FLAGS.variants:
      for platform in FLAGS.platforms:
        record = measure(setup_name, variant, platform, smoke=mode == "smoke")
        record["mode"] = mode
        harness.emit(record)
        records.append(record)
  harness.publish("lowered_program", records,
                  harness.markdown_table([table_row(r) for r in records], TABLE_COLUMNS),
                  module=MODULE, mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_list("setups", ["default"], f"Of {train_throughput.SETUPS}.")
  flags.DEFINE_list("variants", list(VARIANTS), f"GRU variants, of {list(VARIANTS)}.")
  flags.DEFINE_list("platforms", ["cuda"], "Platforms to lower for (cuda, rocm, tpu, cpu).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
