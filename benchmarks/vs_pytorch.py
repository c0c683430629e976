r"""The VSE++ training step, ours against the PyTorch original, side by side.

  python -m benchmarks.vs_pytorch --torch_python=/path/to/venv/bin/python
  python -m benchmarks.vs_pytorch --torch_python=... --batch_sizes=128,512,2048 --rounds=3
  JAX_PLATFORMS=cuda python -m benchmarks.vs_pytorch --torch_python=python3 --device=cuda

ccr_jax does not depend on PyTorch: the reference runs in the interpreter
given by --torch_python (a venv with torch and numpy, e.g. `python -m venv
/tmp/torch && /tmp/torch/bin/pip install torch numpy`). Each round runs, per
batch size, one PyTorch worker (`benchmarks/vsepp_torch_step.py`: cuDNN/
oneDNN GRU over packed sequences, hardest-negative hinge, Adam, clipping)
and one of ours (`benchmarks.train_throughput --setups=vsepp --worker`: the
library's own train step on the same model, loss and optimizer, 1 device),
alternating which goes first, so that both see about the same background
load. Both draw COCO-like caption lengths the same way (2 + Poisson, mean
12.5 tokens, at most 32) and time the median of their steps after a warm-up;
`ratio` = our pairs/s over PyTorch's in the same round, and the summary row
per batch size gives the median and range of the per-round ratios.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags

from benchmarks import harness

MODULE = "benchmarks.vs_pytorch"
TORCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "vsepp_torch_step.py")


def torch_step(python: str, batch_size: int, steps: int, device: str) -> dict:
  """One PyTorch reference worker's record (its JSON line).

  Raises:
    RuntimeError: the worker failed (no torch in `python`, ...), with its stderr.
  """
  proc = subprocess.run(
      [python, TORCH_SCRIPT, "--batch", str(batch_size), "--steps", str(steps),
       "--device", device], capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    raise RuntimeError(f"PyTorch reference `{python} {TORCH_SCRIPT}` exited with "
                       f"{proc.returncode}; is torch installed in that interpreter? "
                       f"(--torch_python)\n{proc.stderr[-3000:]}")
  (record,) = harness.parse_json_lines(proc.stdout)
  return record


def our_step(batch_size: int, steps: int, smoke: bool) -> dict:
  """One `train_throughput` worker's record for the vsepp setup on 1 device."""
  (record,) = harness.run_worker(
      "benchmarks.train_throughput",
      ["--setups=vsepp", "--worker", f"--steps={steps}", f"--batch_sizes={batch_size}",
       f"--smoke={smoke}"], host_devices=1)
  return record


def summarize(rounds: list[dict]) -> list[dict]:
  """Per batch size: medians over rounds and the median and range of the ratios."""
  out = []
  for batch_size in sorted({r["batch_size"] for r in rounds}):
    rows = [r for r in rounds if r["batch_size"] == batch_size]
    ratios = [r["ratio"] for r in rows]
    out.append({
        "benchmark": "vs_pytorch", "summary": True, "batch_size": batch_size,
        "rounds": len(rows), "device": rows[0]["device"], "backend": rows[0]["backend"],
        "torch": rows[0]["torch"], "torch_threads": rows[0]["torch_threads"],
        "ours_pairs_per_s": statistics.median(r["ours_pairs_per_s"] for r in rows),
        "torch_pairs_per_s": statistics.median(r["torch_pairs_per_s"] for r in rows),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ours_mean_len": statistics.mean(r["ours_mean_len"] for r in rows),
        "torch_mean_len": statistics.mean(r["torch_mean_len"] for r in rows),
    })
  return out


TABLE_COLUMNS = (
    ("batch_size", "batch"), ("device", "device"), ("rounds", "rounds"),
    ("ours_pairs_per_s", "ccr_jax pairs/s"), ("torch_pairs_per_s", "PyTorch pairs/s"),
    ("ratio", "ratio (median)"), ("ratio_min", "min"), ("ratio_max", "max"),
    ("ours_mean_len", "tokens/caption (ours)"),
    ("torch_mean_len", "tokens/caption (PyTorch)"),
)

NOTES = """
ratio = ccr_jax pairs/s / PyTorch pairs/s within one round (the two workers
ran back to back, alternating which went first); median, min and max over
rounds. Each pairs/s is batch / the median step time of that worker's timed
steps. Same model (2048 -> 1024 image projection, 300-d words, 1024-d GRU,
10k vocabulary), loss (VSE++ max-violation hinge), optimizer (Adam, clipping
2.0) and caption-length distribution; different random token ids and a
different initialisation, which do not change the work.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  steps = FLAGS.steps or {"full": 20, "quick": 6, "smoke": 2}[mode]
  batch_sizes = [int(b) for b in FLAGS.batch_sizes]
  rounds = []
  for round_index in range(FLAGS.rounds):
    for batch_size in batch_sizes:
      order = ("torch", "ours") if round_index % 2 == 0 else ("ours", "torch")
      got = {}
      for side in order:
        got[side] = (torch_step(FLAGS.torch_python, batch_size, steps, FLAGS.device)
                     if side == "torch" else our_step(batch_size, steps, mode == "smoke"))
      ours, ref = got["ours"], got["torch"]
      record = {
          "benchmark": "vs_pytorch", "summary": False, "round": round_index,
          "batch_size": batch_size, "first": order[0], "device": FLAGS.device,
          "backend": ours["backend"], "device_kind": ours["device_kind"],
          "torch": ref["torch"], "torch_threads": ref["threads"],
          "ours_pairs_per_s": ours["pairs_per_s"], "torch_pairs_per_s": ref["pairs_per_s"],
          "ratio": ours["pairs_per_s"] / ref["pairs_per_s"],
          "ours_mean_len": ours["real_tokens_per_step"] / batch_size,
          "torch_mean_len": ref["mean_len"], "load_average": harness.load_average(),
      }
      harness.emit(record)
      rounds.append(record)
  summary = summarize(rounds)
  for record in summary:
    record["mode"] = mode
    harness.emit(record)
  harness.publish("vs_pytorch", rounds + summary,
                  harness.markdown_table(summary, TABLE_COLUMNS), module=MODULE,
                  mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_string("torch_python", sys.executable,
                      "An interpreter with torch and numpy installed.")
  flags.DEFINE_string("device", "cpu", "PyTorch's device: cpu or cuda (ours follows "
                      "JAX_PLATFORMS, cpu by default: set JAX_PLATFORMS=cuda too).")
  flags.DEFINE_list("batch_sizes", ["128"], "Batch sizes, e.g. 128,512,2048.")
  flags.DEFINE_integer("rounds", 3, "Rounds (each runs both sides at every batch size).")
  flags.DEFINE_integer("steps", 0, "Timed steps per worker (0: 20 full, 6 quick, 2 smoke).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
