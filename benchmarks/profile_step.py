r"""Where a train step's time goes: the profiler's events, summed per op.

  python -m benchmarks.profile_step                       # default setup, ~30 s on 2 CPU cores
  python -m benchmarks.profile_step --setup=vsepp --top=30
  JAX_PLATFORMS=cuda python -m benchmarks.profile_step    # on a GPU: kernels per op

Builds the library's train step as `train_throughput` does (the setup's
model, loss, strategy and optimizer over the devices the process sees
(one CPU device unless XLA_FLAGS asks for more), random batches of
its shapes placed beforehand), compiles it, times `--steps` steps, then runs
`--traced` more under `jax.profiler.trace` and sums the trace's complete
events by (timeline, name): on CPU the XLA thunks (fusions, `ynn_fusion`
matmuls, `cond`/`while` regions, which contain the ops they run: nested
events are counted in both); on GPU also the kernels on each stream. Per
event: ms per step, calls per step, and share of the median step time. The
trace itself is kept under --trace_dir (perfetto_trace.json.gz opens in
ui.perfetto.dev).

For the default experiment's step on an H100 (27 ms, slower than 2 CPU
cores: docs/benchmarks.md), this is the profile to read first.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import shutil
import statistics

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import harness
from benchmarks import train_throughput
from ccr_jax import sharding

MODULE = "benchmarks.profile_step"


def summarize_trace(path: str, steps: int) -> list[dict]:
  """Complete ("X") events of a perfetto JSON trace summed by (timeline, name).

  Args:
    path: a `perfetto_trace.json.gz` written by `jax.profiler.trace`.
    steps: how many steps the trace holds (per-step figures divide by it).

  Python-function events (named "$file:line ...") are left out.

  Returns:
    Records sorted by total duration, longest first: timeline (the process
    name the trace gives its pid, e.g. the host or a GPU stream), name,
    ms_per_step, calls_per_step.
  """
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  process = {e["pid"]: e.get("args", {}).get("name", str(e["pid"]))
             for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  total = collections.Counter()
  calls = collections.Counter()
  for e in events:
    # "$file:line function" events are the Python tracer's (the profiler's
    # own calls among them), not the step's work.
    if e.get("ph") == "X" and not e["name"].startswith("$"):
      key = (process.get(e.get("pid"), str(e.get("pid"))), e["name"])
      total[key] += e.get("dur", 0)
      calls[key] += 1
  return [{"timeline": timeline, "name": name, "ms_per_step": us / 1e3 / steps,
           "calls_per_step": calls[(timeline, name)] / steps}
          for (timeline, name), us in total.most_common()]


def measure(setup_name: str, *, steps: int, traced: int, trace_dir: str, top: int,
            smoke: bool) -> list[dict]:
  """Times and traces the setup's train step; one record per top event, plus a header."""
  setup = train_throughput.make_setup(setup_name, smoke=smoke)
  mesh = sharding.make_mesh()  # every device this process sees
  rng = np.random.default_rng(0)
  batches = [sharding.shard_batch(train_throughput.synthetic_batch(rng, setup), mesh)
             for _ in range(4)]
  step, state, _ = train_throughput.build_train_step(
      setup.config, setup.vocab_size, setup.image_shape, setup.max_len, mesh)
  compiled = step.lower(state, batches[0]).compile()
  times, _, state = train_throughput.time_steps(compiled, state, batches, warmup=2,
                                                steps=steps)
  step_ms = 1e3 * statistics.median(times)
  shutil.rmtree(trace_dir, ignore_errors=True)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    train_throughput.time_steps(compiled, state, batches, warmup=0, steps=traced)
  (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                   "perfetto_trace.json.gz"))
  header = {"benchmark": "profile_step", "setup": setup_name, "kind": "step",
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "batch_size": setup.batch_size, "step_ms": step_ms, "timed_steps": steps,
            "traced_steps": traced, "trace": path}
  records = [header]
  for event in summarize_trace(path, traced)[:top]:
    records.append({"benchmark": "profile_step", "setup": setup_name, "kind": "event",
                    **event, "share_of_step": event["ms_per_step"] / step_ms})
  return records


TABLE_COLUMNS = (("timeline", "timeline"), ("name", "event"),
                 ("ms_per_step", "ms/step"), ("calls_per_step", "calls/step"),
                 ("share_of_step", "share of step"))


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  records = measure(FLAGS.setup, steps=FLAGS.steps or (2 if mode == "smoke" else 10),
                    traced=FLAGS.traced or (1 if mode == "smoke" else 3),
                    trace_dir=FLAGS.trace_dir, top=FLAGS.top, smoke=mode == "smoke")
  for record in records:
    record["mode"] = mode
    harness.emit(record)
  header, events = records[0], records[1:]
  table = (f"{header['setup']} on {header['backend']} ({header['device_kind']}), batch "
           f"{header['batch_size']}: step {header['step_ms']:.2f} ms (median of "
           f"{header['timed_steps']})\n\n"
           + harness.markdown_table(events, TABLE_COLUMNS))
  harness.publish(f"profile_step_{FLAGS.setup}_{header['backend']}", records, table,
                  module=MODULE, mode=mode, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_enum("setup", "default", list(train_throughput.SETUPS), "Which step.")
  flags.DEFINE_integer("steps", 0, "Timed steps (0: 10; smoke 2).")
  flags.DEFINE_integer("traced", 0, "Traced steps (0: 3; smoke 1).")
  flags.DEFINE_integer("top", 40, "Events listed.")
  flags.DEFINE_string("trace_dir", "/tmp/ccr_profile_step", "Where the trace is written.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
