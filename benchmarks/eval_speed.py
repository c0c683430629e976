r"""Recall@K evaluation at COCO-5K size: the library's path, the matmul, the VSE++ loop.

  python -m benchmarks.eval_speed            # full: ~3 min on 2 CPU cores
  python -m benchmarks.eval_speed --quick    # ~70 s: loop timed on 500 images, extrapolated

COCO-5K: 5,000 images and 25,000 captions, 1024-d (VSE++'s joint space).
Embeddings are random but structured as retrieval embeddings are: image
embeddings are unit Gaussian directions, each caption is its image's
embedding plus noise, renormalised, so recalls land in a realistic range.

Three timings on the same machine, in the same process:
  eval_s    the full evaluation as the library runs it for this protocol:
            `evaluation.paired_ranks` (one score matrix ranked along both
            axes: image->text and text->image), then `recall_at_k` and
            `rank_stats` (median of repeats after a compiling warm-up),
            from NumPy embeddings (copied to the device: on a GPU that copy
            of 120 MB crosses the host link).
  eval_device_s  the same from embeddings already on the device (JAX
            arrays, as the model leaves them and as the matmul gets them).
  matmul_s  the limit: one jitted [5000, 1024] @ [1024, 25000] similarity
            matmul (the evaluation needs these scores once).
  per_direction_s  the continual experiment's path, where queries and
            gallery come from different snapshots and so form two different
            matrices: `evaluation.exact_ranks_and_topk` (ranks + exact top-10
            for the index-agreement check, one pass) once per direction.
  loop_s    a per-query NumPy loop like VSE++'s `evaluation.py` `i2t`/`t2i`
            (what users run today); with --quick on a subset of images, its
            time scaled to the full query count (`loop_extrapolated`).
The ranks of the library's path are checked equal to the loop's on every
query the loop computed (`ranks_match`).
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from ccr_jax import evaluation

MODULE = "benchmarks.eval_speed"


def synthetic_embeddings(rng: np.random.Generator, num_images: int,
                         captions_per_image: int, dim: int, noise: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Paired unit embeddings: captions = their image + noise, renormalised.

  Args:
    noise: norm of the isotropic noise added to each unit image vector. A
      caption then scores 1/sqrt(1 + noise^2) with its image and ~N(0, 1/dim)
      with the others: 10 at 1024-d gives i2t R@1 ~60% and t2i R@1 ~30%,
      VSE++'s range on COCO-5K (41 / 30 with ResNet features).

  Returns:
    images float32 [num_images, dim], captions float32 [num_images * C, dim]
    (caption c belongs to image c // C, as in VSE++), caption_owner int64
    [num_images * C].
  """
  images = rng.standard_normal((num_images, dim), dtype=np.float32)
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  owner = np.repeat(np.arange(num_images), captions_per_image)
  captions = images[owner] + (noise / np.sqrt(dim)) * rng.standard_normal(
      (len(owner), dim), dtype=np.float32)
  captions /= np.linalg.norm(captions, axis=1, keepdims=True)
  return images, captions, owner


def library_ranks(images: np.ndarray, captions: np.ndarray, caption_owner: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks by `evaluation.paired_ranks`: i2t int64 [N], t2i int64 [N * C]."""
  return evaluation.paired_ranks(images, captions, np.arange(len(images)),
                                 caption_owner)


def per_direction_ranks(images: np.ndarray, captions: np.ndarray,
                        caption_owner: np.ndarray, k: int = 10
                        ) -> tuple[np.ndarray, np.ndarray]:
  """The continual path: ranks + exact top-k per direction, each its own matrix."""
  image_ids = np.arange(len(images))
  i2t, _ = evaluation.exact_ranks_and_topk(images, captions, image_ids,
                                           caption_owner, k)
  t2i, _ = evaluation.exact_ranks_and_topk(captions, images, caption_owner,
                                           image_ids, k)
  return i2t, t2i


def library_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
  """VSE++'s report from ranks: r1/r5/r10, medr, meanr per direction, rsum."""
  out = {}
  for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
    for key, value in {**evaluation.recall_at_k(ranks), **evaluation.rank_stats(ranks)
                       }.items():
      out[f"{direction}_{key}"] = value
  out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
  return out


def vsepp_i2t_loop(images: np.ndarray, captions: np.ndarray, num_queries: int,
                   captions_per_image: int = 5) -> np.ndarray:
  """VSE++ `i2t`: per image, score every caption, argsort, best rank of its own.

  Returns int64 [num_queries], 0-based ranks of images 0..num_queries-1.
  """
  ranks = np.zeros(num_queries, np.int64)
  for index in range(num_queries):
    d = np.dot(images[index:index + 1], captions.T).flatten()
    inds = np.argsort(d)[::-1]
    rank = 1e20
    for i in range(captions_per_image * index, captions_per_image * (index + 1)):
      tmp = np.where(inds == i)[0][0]
      rank = min(rank, tmp)
    ranks[index] = rank
  return ranks


def vsepp_t2i_loop(images: np.ndarray, captions: np.ndarray, num_images: int,
                   captions_per_image: int = 5) -> np.ndarray:
  """VSE++ `t2i`: per image, score its captions against every image, argsort each.

  Returns int64 [num_images * C], 0-based ranks of the captions of images
  0..num_images-1.
  """
  c = captions_per_image
  ranks = np.zeros(c * num_images, np.int64)
  for index in range(num_images):
    d = np.dot(captions[c * index:c * (index + 1)], images.T)
    for i in range(len(d)):
      inds = np.argsort(d[i])[::-1]
      ranks[c * index + i] = np.where(inds == index)[0][0]
  return ranks


def bare_matmul(images: np.ndarray, captions: np.ndarray):
  """A zero-argument callable running the jitted [N, D] @ [D, N*C] and blocking.

  Same precision as the evaluation's (HIGHEST: float32 throughout).
  """
  x, y = jnp.asarray(images), jnp.asarray(captions)
  f = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
  return lambda: f(x, y).block_until_ready()


def measure(*, num_images: int, captions_per_image: int, dim: int, noise: float,
            repeats: int, loop_images: int, seed: int = 0) -> dict:
  """Times the library's evaluation, the bare matmul and the VSE++ loop."""
  rng = np.random.default_rng(seed)
  images, captions, owner = synthetic_embeddings(rng, num_images, captions_per_image,
                                                 dim, noise)

  def evaluate(images=images, captions=captions):
    i2t, t2i = library_ranks(images, captions, owner)
    return i2t, t2i, library_metrics(i2t, t2i)

  eval_first_s, (i2t, t2i, metrics) = harness.timed(evaluate)  # includes compiling
  # The same evaluation of embeddings already on the device, as the model
  # leaves them and as the matmul's operands are: no host-to-device copy.
  on_device = jax.block_until_ready(jax.device_put((images, captions)))
  device_equal = all(np.array_equal(a, b) for a, b in
                     zip(evaluate(*on_device)[:2], (i2t, t2i)))
  matmul = bare_matmul(images, captions)
  matmul()  # compile
  # Interleaved rounds: the machine is shared, and eval_over_matmul is taken
  # per round, under the same load.
  per_direction = per_direction_ranks(images, captions, owner)  # compiles
  per_direction_equal = all(np.array_equal(a, b) for a, b in
                            zip(per_direction, (i2t, t2i)))
  times = harness.interleaved_seconds({
      "eval": evaluate, "eval_device": lambda: evaluate(*on_device), "matmul": matmul,
      "per_direction": lambda: per_direction_ranks(images, captions, owner),
  }, repeats)
  eval_s, matmul_s = (statistics.median(times[k]) for k in ("eval", "matmul"))

  loop_images = min(loop_images or num_images, num_images)
  start = time.perf_counter()
  loop_i2t = vsepp_i2t_loop(images, captions, loop_images, captions_per_image)
  loop_t2i = vsepp_t2i_loop(images, captions, loop_images, captions_per_image)
  measured_loop_s = time.perf_counter() - start
  # Both loops do the same work per image, so the full time scales with images.
  loop_s = measured_loop_s * num_images / loop_images
  mismatches = int(np.sum(loop_i2t != i2t[:loop_images])
                   + np.sum(loop_t2i != t2i[:loop_images * captions_per_image]))

  flops = 2.0 * num_images * len(captions) * dim
  return {
      "benchmark": "eval_speed", "images": num_images, "captions": len(captions),
      "dim": dim, "noise": noise,
      "eval_s": eval_s, "eval_first_s": eval_first_s, "eval_s_all": times["eval"],
      "per_direction_s": statistics.median(times["per_direction"]),
      "per_direction_over_matmul": harness.paired_ratio(times["per_direction"],
                                                        times["matmul"]),
      "per_direction_ranks_equal": per_direction_equal,
      "matmul_s": matmul_s, "matmul_s_all": times["matmul"],
      "matmul_flops_per_s": flops / matmul_s,
      "loop_s": loop_s, "loop_measured_s": measured_loop_s,
      "loop_images": loop_images, "loop_extrapolated": loop_images < num_images,
      "eval_over_matmul": harness.paired_ratio(times["eval"], times["matmul"]),
      "eval_device_s": statistics.median(times["eval_device"]),
      "eval_device_over_matmul": harness.paired_ratio(times["eval_device"],
                                                      times["matmul"]),
      "eval_device_ranks_equal": device_equal,
      "loop_over_eval": loop_s / eval_s,
      "ranks_checked": int(loop_images * (1 + captions_per_image)),
      "rank_mismatches": mismatches, "ranks_match": mismatches == 0,
      **metrics, "peak_rss_mb": harness.peak_rss_mb(),
      "load_average": harness.load_average(),
  }


TABLE_COLUMNS = (
    ("images", "images"), ("captions", "captions"), ("dim", "dim"),
    ("eval_s", "eval s (both directions)"), ("eval_first_s", "first eval s (compiling)"),
    ("matmul_s", "1 matmul s"), ("eval_over_matmul", "eval / matmul"),
    ("eval_device_s", "eval s, on device"),
    ("eval_device_over_matmul", "on device / matmul"),
    ("loop_s", "VSE++ loop s"), ("loop_extrapolated", "loop extrapolated"),
    ("loop_over_eval", "loop / eval"), ("ranks_match", "ranks equal"),
    ("per_direction_s", "per-direction + top-10 s"),
    ("per_direction_over_matmul", "per-direction / matmul"),
    ("i2t_r1", "i2t R@1"), ("t2i_r1", "t2i R@1"), ("peak_rss_mb", "peak RSS MB"),
)

NOTES = """
eval = `paired_ranks` (image->text and text->image from one 5000 x 25000
score matrix, ranked along rows and columns) + `recall_at_k` + `rank_stats`,
from NumPy embeddings, median of repeats after one compiling call; "on
device" = the same from JAX arrays already on the device (the model's
output; the matmul's operands are placed the same way), which evaluation
ranks there without a host round trip (equal ranks checked); eval / matmul is the median of
per-round ratios (eval, matmul and per-direction are timed in interleaved
rounds, so each ratio is taken under the same background load). The matmul
is the floor; the rest of eval is four memory-bound passes over the 500 MB
score matrix (best positive and count, per axis). per-direction = the
continual experiment's path (`exact_ranks_and_topk` with k=10 per
direction: queries and gallery come from different snapshots there, so the
two directions are two different matrices and cost two matmuls plus top-k). The VSE++ loop is NumPy per query (dot, argsort, where);
extrapolated = measured on the first `loop_images` images (and their captions)
and scaled by images / loop_images; its ranks equal the library's on every
query it computed.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  sizes = {"full": (5000, 1024, 3, 0), "quick": (5000, 1024, 2, 500),
           "smoke": (200, 64, 1, 20)}[mode]
  num_images, dim, repeats, loop_images = sizes
  record = measure(num_images=FLAGS.num_images or num_images, captions_per_image=5,
                   dim=FLAGS.dim or dim, noise=FLAGS.noise,
                   repeats=FLAGS.repeats or repeats,
                   loop_images=FLAGS.loop_images if FLAGS.loop_images >= 0 else loop_images)
  record["mode"] = mode
  harness.emit(record)
  harness.publish("eval_speed", [record], harness.markdown_table([record], TABLE_COLUMNS),
                  module=MODULE, mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_integer("num_images", 0, "Images (0: 5000; smoke 200).")
  flags.DEFINE_integer("dim", 0, "Embedding size (0: 1024; smoke 64).")
  flags.DEFINE_float("noise", 10.0, "Caption noise norm (see synthetic_embeddings).")
  flags.DEFINE_integer("repeats", 0, "Timed repeats (0: 3 full, 2 quick, 1 smoke).")
  flags.DEFINE_integer("loop_images", -1, "Images the VSE++ loop runs on (0: all;"
                       " -1: all in full mode, 500 quick, 20 smoke).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
