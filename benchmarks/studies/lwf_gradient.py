r"""LwF's pull on training, measured on a real run's snapshots.

  python benchmarks/studies/lwf_gradient.py --workdir=/tmp/ccr_strategies/<run> --task=4

Loads snapshots task-1 and task of a finished workdir, draws `--batches`
training batches of `--batch_size` pairs of that task, and compares the
gradient norms, with respect to the new snapshot's embeddings, of the
training loss and of LwF's similarity distillation at strength 1: today's
form (`lwf.similarity_distillation`, the configured temperature, masked,
reduced like the loss) and the form before it (temperature 2 on cosines
times tau^2 / B, no mask). Prints JSON and a table; the issue measured the old
ratio as 2.8e-4 on the default run's snapshots 3 -> 4.
"""

import json
import os
import sys

# benchmarks/studies/ -> benchmarks/ -> the repository root, for `ccr_jax`
# when run as `python benchmarks/studies/lwf_gradient.py`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from ccr_jax import files  # noqa: E402
from ccr_jax import losses  # noqa: E402
from ccr_jax import strategies  # noqa: E402
from ccr_jax import train as train_lib  # noqa: E402
from ccr_jax.data import pipeline  # noqa: E402
from ccr_jax.run import setup as setup_lib  # noqa: E402
from ccr_jax.strategies import lwf  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A finished run's workdir.", required=True)
flags.DEFINE_integer("task", 4, "Snapshots task-1 -> task (1-based), batches of task.")
flags.DEFINE_integer("batch_size", 64, "Pairs per batch.")
flags.DEFINE_integer("batches", 5, "Batches averaged over.")


def measure(workdir: str, task: int, batch_size: int, batches: int) -> dict:
  """Mean over batches of each term's value and embedding-gradient norm."""
  config = ml_collections.ConfigDict(files.read_json(os.path.join(workdir, "config.json")))
  setup = setup_lib.build_setup(config, workdir)
  new, _ = setup_lib.load_snapshot(setup, task)
  old, _ = setup_lib.load_snapshot(setup, task - 1)
  embed = jax.jit(train_lib.pair_embedder(setup.model, setup.mesh))
  loss_fn = losses.make_loss(config.loss)
  lwf_config = strategies.default_config()
  lwf_config.name = "lwf"
  lwf_config.lwf.strength = 1.0
  term = strategies.get_strategy(lwf_config, loss_fn).loss_term

  def legacy(img, txt, old_img, old_txt, ids):
    del ids
    return 4.0 * lwf.similarity_distillation(img, txt, old_img, old_txt,
                                             temperature=2.0, reduction="mean")

  terms = {
      "ranking": lambda i, t, oi, ot, ids: loss_fn(i, t, image_ids=ids, step=10**9)[0],
      "lwf": lambda i, t, oi, ot, ids: term(i, t, (oi, ot), {"image_ids": ids}, 0,
                                            None)[0],
      "lwf_before": legacy,
  }
  out = {name: {"value": [], "grad_norm": []} for name in terms}
  for m in range(batches):
    batch = pipeline.train_batch(setup.encoded[task - 1]["train"], batch_size,
                                 seed=12345, task=task - 1, step=m)
    img, txt = embed(new, batch)
    old_img, old_txt = embed(old, batch)
    ids = jnp.asarray(batch["image_ids"])
    for name, fn in terms.items():
      value, grads = jax.value_and_grad(fn, argnums=(0, 1))(img, txt, old_img, old_txt,
                                                            ids)
      out[name]["value"].append(float(value))
      out[name]["grad_norm"].append(float(optax.tree.norm(grads)))
  summary = {name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in out.items()}
  for name in ("lwf", "lwf_before"):
    summary[name]["grad_ratio_to_ranking"] = (summary[name]["grad_norm"]
                                              / summary["ranking"]["grad_norm"])
  return {"workdir": workdir, "task": task, "batch_size": batch_size,
          "batches": batches, "terms": summary}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = measure(FLAGS.workdir, FLAGS.task, FLAGS.batch_size, FLAGS.batches)
  print(json.dumps(result))
  print("| term | value | grad norm (embeddings) | ratio to ranking |")
  print("|---|---|---|---|")
  for name, d in result["terms"].items():
    ratio = d.get("grad_ratio_to_ranking")
    print(f"| {name} | {d['value']:.4g} | {d['grad_norm']:.4g} | "
          f"{'' if ratio is None else f'{ratio:.3g}'} |")


if __name__ == "__main__":
  app.run(main)
