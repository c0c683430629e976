r"""Input pipeline vs train step on the pixel configs: images/s delivered and consumed.

  python -m benchmarks.input_pipeline                  # full: ~2 min on 2 idle CPU cores (4 at load 5)
  python -m benchmarks.input_pipeline --quick          # ~1 min: fewer images, batches, steps
  python -m benchmarks.input_pipeline --smoke          # seconds (tests); the numbers mean nothing
  python -m benchmarks.input_pipeline --backbones=finetune --decode_threads=1,0

The question (COCO / Flickr30K / Visual Genome with a ResNet image tower): do
host JPEG decoding and preprocessing keep up with the device? Measured in one
process, on the real code paths:

1. Data. A COCO-format manual dir of `--num_images` synthetic 640x480 JPEGs
   (COCO's typical size): a smooth random colour field plus Gaussian noise,
   quality 90, the noise sized so that a file is about as large as a COCO
   train2014 JPEG (~150 KB: 13 GB of zips over 82,783 images), with Karpathy
   split JSON, captions and instances files, laid out as ccr_jax/data/coco.py
   says. The TFDS dataset is built by the real source (`coco.load` with
   configs/coco_vsepp.py's data section, unshrunk: JPEGs stored at 256 px,
   quality 90; read back at image_size 224).
2. decode: one thread's CPU time per image (`time.process_time`: other
   processes' load does not count) of the array_record read, and of
   `images.decode_image` alone on stored bytes held in memory: the JPEG
   decode (`convert`, after PIL's draft mode) and the resize + centre crop.
3. pipeline: images/s delivered by the training batch path the train loop
   runs, `pipeline.mixed_batch` over the encoded train split (lazy
   `JpegRecords` images, `data.decode_threads` threads per batch) through
   `pipeline.prefetched`, with a consumer that takes no time, for each
   `--decode_threads` (0 = one per CPU, at most 16: the configs' setting).
   cpu_ms_per_image is the process's CPU time (every thread) per delivered
   image: one core's cost per image, the basis of the extrapolation below.
   scaling: what one process could deliver with 16 decode threads, bounded
   by Amdahl's law with the share of the one-thread CPU time that runs on
   the prefetch thread alone (`scaling_record`).
4. step: images/s the library's train step consumes
   (`train_throughput.build_train_step`: `train.make_train_step` with the
   optimizer, loss and strategy built as a run builds them) for ResNet-50 at
   224 px + the VSE++ GRU (word 300, hidden 1024, 10k-row vocabulary) with
   InfoNCE, on real batches of the pipeline, at a small batch
   (`--step_batch`; CPU); with its CPU time per image beside the wall time. `--backbones`: finetune (the whole ResNet trained,
   fwd + bwd) and/or frozen (configs/coco_vsepp.py's default:
   `freeze_backbone`, the backbone's backward is skipped). Model FLOPs
   (flops_per_step): the analytic ResNet-50 count, 4.09 G multiply-adds =
   8.18 GFLOP forward per 224² image (torchvision's "4.1 GFLOPS" are
   multiply-adds), x3 when the backbone is trained, plus the GRU's forward
   and backward over the batch's real tokens (`train_throughput.gru_flops`).
   Beside it, two cross-checks: the step's jaxpr count
   (`train_throughput.jaxpr_matmul_flops` + the GRU's, whose packed while
   loops it skips), which also counts the multiplications by the zeros that
   the backward of a strided convolution inserts (lhs dilation: ~15 % over
   the analytic count for a trained ResNet-50), and XLA's `cost_analysis()`
   (elementwise work included, each GRU loop body once). pct_of_matmul (the
   model FLOP utilisation on this CPU) is the model FLOP/s over a float32
   2048² matmul's FLOP/s measured in the same process, one matmul right
   after each timed step: the median over steps of the per-step ratio, so
   that both saw the same load of a shared machine.
5. fed: the first backbone's step fed by the pipeline itself (prefetched,
   decode_threads as the configs set it, `sharding.shard_batch` each step),
   against the same step on batches placed beforehand, interleaved round by
   round: on this CPU the two compete for the same cores.
6. ratio: delivered / consumed images/s for each decode_threads and backbone
   (> 1: the host keeps up on this machine; wall times, so the load of a
   shared machine moves it: the CPU-time ratio beside it moves less), and
   the extrapolation to GPU
   step rates: a step consuming R images/s needs R x cpu_ms_per_image / 1000
   cores of this machine's kind decoding (the one-thread pipeline's CPU
   time per image, so that thread overheads are not counted as work),
   assuming decoding scales linearly over cores, which is measured here only
   from 1 to 2. Nothing is measured on a GPU: the rates are assumptions,
   shown with the H100 utilisation each one implies (the step's FLOPs per
   image over H100 SXM's dense TF32 tensor-core peak, 495 TFLOP/s).

Prints one JSON line per measurement, then markdown tables; --write_results
writes them to benchmarks/results/input_pipeline.{json,md}.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import harness
from benchmarks import train_throughput
from ccr_jax import sharding
from ccr_jax.data import coco
from ccr_jax.data import images
from ccr_jax.data import pipeline
from ccr_jax.data import text
from ccr_jax.models import dual_encoder
from ccr_jax.models import minilm
from configs import coco_vsepp

MODULE = "benchmarks.input_pipeline"
BACKBONES = ("finetune", "frozen")
# torchvision's ResNet-50 "4.09 GFLOPS" at 224² are multiply-adds.
RESNET50_FORWARD_FLOPS = 2 * 4.09e9
# H100 SXM dense TF32 tensor-core peak (NVIDIA's datasheet; 989 with bf16):
# what a float32 JAX step's convolutions and matmuls run on by default.
H100_TF32_FLOPS_PER_S = 494.7e12
# Assumed GPU step rates (images/s) for the extrapolation; not measurements.
GPU_RATES = (1_000, 3_000, 10_000, 30_000)
# The most threads `data.decode_threads=0` gives (`images.default_threads`).
MAX_DECODE_THREADS = 16
# Made-up caption words; captions are 2 + Poisson(8.5) of them (COCO's mean
# is about 10.5 words).
_WORDS = tuple(
    "a an the man woman dog cat bus car train plate pizza table street field "
    "red blue green small large white black two three on in with of near "
    "sitting standing riding eating holding next to under over down up "
    "bench kite horse sheep road grass water sky tree room kitchen".split())


# ----------------------------------------------------------------------------
# A COCO manual dir of synthetic JPEGs.


def synthetic_photo(rng: np.random.Generator, noise: np.ndarray,
                    width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3]: a smooth random colour field plus `noise`.

  Args:
    noise: float32 [height, width, 3] Gaussian noise (shared between images,
      rolled by a random offset: drawing it anew would dominate the writing).
  """
  coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
  field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC),
                     np.float32)
  shift = rng.integers(0, [height, width])
  return np.clip(field + np.roll(noise, tuple(shift), axis=(0, 1)), 0,
                 255).astype(np.uint8)


def _caption(rng: np.random.Generator) -> str:
  return " ".join(rng.choice(_WORDS, 2 + rng.poisson(8.5)))


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_coco_manual_dir(root: str, num_images: int, *, width: int = 640,
                          height: int = 480, noise_std: float = 20.0,
                          seed: int = 0) -> list[int]:
  """Writes a COCO manual dir (coco.py's layout) of synthetic JPEGs into root.

  Karpathy splits: 1/32 of the images each in val and test (at least one),
  1/8 in restval (at least one), the rest train. Each image has 6 captions
  (the loader keeps the first 5 by annotation id) and no instance
  annotations (category areas are zero: one task holds every image).

  Returns:
    The JPEG file sizes in bytes, in cocoid order (ids 1..num_images).
  """
  if num_images < 4:
    raise ValueError(f"num_images={num_images}: train, restval, val and test "
                     "need one image each.")
  rng = np.random.default_rng(seed)
  noise = rng.normal(0.0, noise_std, (height, width, 3)).astype(np.float32)
  n_eval = max(1, num_images // 32)
  n_restval = max(1, num_images // 8)
  splits = (["val"] * n_eval + ["test"] * n_eval + ["restval"] * n_restval)
  splits += ["train"] * (num_images - len(splits))
  karpathy, sizes = [], []
  captions = {"train2014": [], "val2014": []}
  for i, split in enumerate(splits):
    image_id = i + 1
    folder = "val2014" if split in ("val", "test") else "train2014"
    name = f"COCO_{folder}_{image_id:012d}.jpg"
    path = os.path.join(root, folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(synthetic_photo(rng, noise, width, height)).save(
        path, format="JPEG", quality=90)
    sizes.append(os.path.getsize(path))
    for k in range(6):
      captions[folder].append(dict(id=image_id * 10 + k, image_id=image_id,
                                   caption=_caption(rng)))
    karpathy.append(dict(filepath=folder, filename=name, cocoid=image_id,
                         split=split, imgid=i, sentences=[]))
  categories = [dict(id=i + 1, name=n, supercategory=s)
                for i, (n, s) in enumerate(coco.COCO_CATEGORIES)]
  for folder, entries in captions.items():
    _write_json(os.path.join(root, "annotations", f"captions_{folder}.json"),
                dict(annotations=entries))
    _write_json(os.path.join(root, "annotations", f"instances_{folder}.json"),
                dict(annotations=[], categories=categories))
  _write_json(os.path.join(root, "dataset_coco.json"),
              dict(images=karpathy, dataset="coco"))
  return sizes


def coco_data_config(manual_dir: str, *, image_size: int, decode_threads: int):
  """configs/coco_vsepp.py's `data` section (unshrunk) for this manual dir."""
  data = coco_vsepp.get_config().data
  data.manual_dir = manual_dir
  data.image_size = image_size
  data.decode_threads = decode_threads
  return data


def load_train_pool(manual_dir: str, data_dir: str, *, image_size: int,
                    decode_threads: int):
  """The encoded train split (Karpathy train + restval) through `coco.load`.

  Builds the TFDS dataset in data_dir the first time; later calls reopen it
  (with their own image_size and decode_threads, which are read-time
  settings). Captions are tokenised with a vocabulary of their own words.

  Returns:
    (pipeline.EncodedSplit with lazy images, the vocabulary).
  """
  data = coco_data_config(manual_dir, image_size=image_size,
                          decode_threads=decode_threads)
  train = coco.load(data, data_dir).splits["train"]
  vocab = text.build_vocabulary(c for caps in train.captions for c in caps)
  pool, _ = pipeline.encode_split(train, vocab, data.max_caption_len)
  return pool, vocab


# ----------------------------------------------------------------------------
# Host side: decoding alone, and the batch path.


def stored_jpegs(pool, count: int) -> list[bytes]:
  """The stored (256 px) JPEG bytes of `count` records of the pool's first source."""
  # pool.images: LazyImages over one JpegRecords per TFDS split (train, restval).
  rows = pool.images.rows[pool.images.source_index == 0][:count]
  records = pool.images.sources[0].source.__getitems__([int(r) for r in rows])
  return [r["image"] for r in records]


def measure_decode(pool, count: int, image_size: int, repeats: int) -> dict:
  """One thread: CPU ms per image of reading records, the JPEG decode and all of decode_image.

  Over `count` records of the pool's first source: read_ms is the
  array_record read (`__getitems__`, as `JpegRecords.read` does it, on the
  calling thread); the decode is what `images.decode_image` does before
  resizing (draft mode, `convert("RGB")`); resize_crop_ms is the rest
  (decode_image's time minus it). CPU time (`time.process_time`, this
  thread alone working), not wall time: what other processes on a shared
  machine take does not count, and each is the median of `repeats` rounds.
  """
  jpegs = stored_jpegs(pool, count)
  rows = [int(r) for r in pool.images.rows[pool.images.source_index == 0][:count]]
  source = pool.images.sources[0].source

  def jpeg_decode():
    for data in jpegs:
      with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (image_size, image_size))
        image.convert("RGB")

  def decode_image():
    for data in jpegs:
      images.decode_image(data, image_size)

  stages = {"read": lambda: source.__getitems__(rows), "decode": jpeg_decode,
            "decode_image": decode_image}
  times = {name: [] for name in stages}
  for _ in range(max(1, repeats)):  # interleaved, as harness.interleaved_seconds
    for name, fn in stages.items():
      start = time.process_time()
      fn()
      times[name].append(time.process_time() - start)
  read_ms = 1e3 * statistics.median(times["read"]) / len(jpegs)
  decode_ms = 1e3 * statistics.median(times["decode"]) / len(jpegs)
  total_ms = 1e3 * statistics.median(times["decode_image"]) / len(jpegs)
  return {"kind": "decode", "images": len(jpegs), "image_size": image_size,
          "threads_resolved": 1,
          "stored_kb_mean": float(np.mean([len(b) for b in jpegs]) / 1e3),
          "read_ms": read_ms, "decode_ms": decode_ms,
          "resize_crop_ms": total_ms - decode_ms,
          "cpu_ms_per_image": total_ms, "images_per_s": 1e3 / total_ms}


def measure_pipeline(pool, batch_size: int, *, warmup: int,
                     batches: int) -> dict:
  """Images/s `pipeline.prefetched(mixed_batch)` delivers to a consumer that waits on nothing.

  The consumer asks for step s as soon as it has step s - 1, as a train loop
  whose device step took no time would; every batch is a fresh draw (no
  image cached), the first `warmup` untimed.
  """

  def batch_fn(step):
    return pipeline.mixed_batch(pool, None, batch_size, 0.0, seed=0, task=0,
                                step=step)

  total = warmup + batches
  times = []
  with pipeline.prefetched(batch_fn, total) as next_batch:
    for step in range(warmup):
      next_batch(step)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    last = wall0
    for step in range(warmup, total):
      batch = next_batch(step)
      assert batch["images"].shape[0] == batch_size
      now = time.perf_counter()
      times.append(now - last)
      last = now
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  images = batches * batch_size
  return {"kind": "pipeline", "batch_size": batch_size, "batches": batches,
          "image_size": int(pool.images.shape[1]),
          "images_per_s": images / wall, "batch_ms_median": 1e3 * statistics.median(times),
          "cpu_ms_per_image": 1e3 * cpu / images,
          "cpu_utilisation": cpu / wall}


# ----------------------------------------------------------------------------
# Device side: the train step.


def step_config(backbone: str, batch_size: int, smoke: bool, text_tower: str = "gru"):
  """configs/coco_vsepp.py with ResNet-50 (smoke: ResNet-18, tiny widths) and InfoNCE.

  `text_tower` "minilm" replaces the GRU by all-MiniLM-L6-v2 (fine-tuned,
  randomly initialised: the same work as the pretrained weights).
  """
  config = coco_vsepp.get_config()
  config.model.text_tower = text_tower
  config.model.image_tower = "resnet18" if smoke else "resnet50"
  config.model.freeze_backbone = backbone == "frozen"
  if smoke:
    config.model.embed_dim, config.model.word_dim = 32, 16
  config.loss.name = "infonce"
  config.loss.reduction = "mean"  # CLIP's
  config.train.batch_size = batch_size
  return config


def make_matmul(n: int) -> tuple[Callable[[], None], float]:
  """(run a jitted float32 [n, n] @ [n, n] and block, its FLOPs); compiled here.

  The practical limit of this CPU for dense float32 work
  (`train_throughput.matmul_flops_per_s` times the same product).
  """
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  product = jax.jit(lambda x, y: x @ y)
  product(a, a).block_until_ready()
  return lambda: product(a, a).block_until_ready(), 2.0 * n ** 3


def _timed_steps(compiled, state, batch_fn, count: int,
                 after: Callable[[], None] | None = None
                 ) -> tuple[dict[str, list[float]], dict, dict]:
  """Runs `count` steps on batch_fn(i) (built and placed inside each timed step).

  With `after`, also times one call of it right after each step.

  Returns ({"wall": step wall times, "cpu": process CPU times, "after":
  `after`'s wall times}, the last state, the last metrics); `state` is donated.
  """
  times, metrics = {"wall": [], "cpu": [], "after": []}, None
  for i in range(count):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch_fn(i))
    jax.block_until_ready((state, metrics))
    times["wall"].append(time.perf_counter() - start)
    times["cpu"].append(time.process_time() - cpu_start)
    if after is not None:
      times["after"].append(harness.timed(after)[0])
  return times, state, metrics


def text_forward_flops(config, vocab_size: int, batch_size: int, max_len: int) -> float:
  """Matmul FLOPs of the text tower's forward over `[batch_size, max_len]` tokens.

  Counted in the jaxpr of `DualEncoder.embed_texts` (`jaxpr_matmul_flops`),
  traced on abstract shapes: for a transformer, whose every position is
  computed whatever the caption's length, this is its model work.
  """
  model = dual_encoder.build_model(config.model, vocab_size)
  tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
  lengths = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  embed = functools.partial(model.apply, method=dual_encoder.DualEncoder.embed_texts)
  params = jax.eval_shape(functools.partial(
      model.init, method=dual_encoder.DualEncoder.embed_texts), jax.random.key(0),
      tokens, lengths)
  return train_throughput.jaxpr_matmul_flops(
      jax.make_jaxpr(embed)(params, tokens, lengths).jaxpr)


def measure_step(config, *, vocab_size: int, image_size: int,
                 host_batches: list[dict], warmup: int, steps: int,
                 matmul: tuple[Callable[[], None], float], fed_pool=None) -> list[dict]:
  """Times the train step on placed real batches; with `fed_pool`, also fed by the pipeline.

  Returns the step record, and with `fed_pool` a "fed" record: the same
  compiled step and state, continued in rounds of a step on a placed batch
  and a step on a batch built by `pipeline.prefetched(mixed_batch)` over
  `fed_pool` (decode_threads as it was loaded with) and placed by
  `sharding.shard_batch` inside the timed step; slowdown is the median of
  the per-round ratios fed / placed.
  `matmul` (`make_matmul`) runs after each placed step, for the step's
  FLOP/s relative to it under the same load.
  """
  mesh = sharding.make_mesh()
  batch_size = config.train.batch_size
  placed = [sharding.shard_batch(b, mesh) for b in host_batches]
  real_tokens = float(np.mean([np.sum(b["lengths"]) for b in host_batches]))
  max_len = config.data.max_caption_len
  if config.model.text_tower == "gru":
    # The packed GRU's while loops are invisible to the jaxpr count: added.
    text_flops = gru = train_throughput.gru_flops(real_tokens, config.model.word_dim,
                                                  config.model.embed_dim)
  else:
    # No loops: the jaxpr counts the text tower; the model count takes its
    # forward, x3 when it trains (forward + backward).
    trains = not config.model.get("freeze_text_backbone", False)
    text_flops = (3 if trains else 1) * text_forward_flops(
        config, vocab_size, batch_size, max_len)
    gru = 0.0
  backbone = "frozen" if config.model.freeze_backbone else "finetune"
  train_step, state, _ = train_throughput.build_train_step(
      config, vocab_size, (image_size, image_size, 3),
      max_len, mesh)
  jaxpr_flops = train_throughput.jaxpr_matmul_flops(
      jax.make_jaxpr(train_step)(state, placed[0]).jaxpr) + gru
  compile_s, compiled = harness.timed(lambda: train_step.lower(state, placed[0]).compile())
  matmul_fn, matmul_flops = matmul
  times, state, metrics = _timed_steps(
      compiled, state, lambda i: placed[i % len(placed)], warmup + steps,
      after=matmul_fn)
  step_s = statistics.median(times["wall"][warmup:])
  step_cpu_s = statistics.median(times["cpu"][warmup:])
  matmul_s = times["after"][warmup:]
  # Model FLOPs: the analytic ResNet-50 count where it applies (the jaxpr
  # count also multiplies the zeros that the backward of a strided
  # convolution inserts: +15 % for a trained ResNet-50), else the jaxpr's.
  analytic = (RESNET50_FORWARD_FLOPS * (1 if backbone == "frozen" else 3)
              if config.model.image_tower == "resnet50" else None)
  flops = jaxpr_flops if analytic is None else analytic * batch_size + text_flops
  records = [{
      "kind": "step", "image_tower": config.model.image_tower,
      "backbone": backbone, "text_tower": config.model.text_tower,
      "loss": config.loss.name, "batch_size": batch_size,
      "image_size": image_size, "backend": jax.default_backend(),
      "compile_s": compile_s, "step_s": step_s, "timed_steps": steps,
      "images_per_s": batch_size / step_s,
      "cpu_ms_per_image": 1e3 * step_cpu_s / batch_size,
      "cores_busy": step_cpu_s / step_s,
      "flops_per_step": flops, "flops_per_image": flops / batch_size,
      "flops_counted_by": "jaxpr" if analytic is None else (
          f"analytic ResNet-50 + {config.model.text_tower}"),
      "gru_flops_per_step": gru, "text_flops_per_step": text_flops,
      "jaxpr_flops_per_step": jaxpr_flops,
      "xla_flops_per_step": train_throughput.xla_cost(compiled)["xla_flops"],
      "analytic_resnet50_flops_per_image": analytic,
      "flops_per_s": flops / step_s,
      "matmul_flops_per_s": matmul_flops / statistics.median(matmul_s),
      # Per step: (flops / step time) / (matmul flops / the next matmul's time).
      "fraction_of_matmul": harness.paired_ratio(
          [flops * m for m in matmul_s],
          [matmul_flops * w for w in times["wall"][warmup:]]),
      "final_loss": float(metrics["loss"]),
  }]
  if fed_pool is not None:
    def batch_fn(step):
      return pipeline.mixed_batch(fed_pool, None, batch_size, 0.0, seed=1,
                                  task=0, step=step)

    # Rounds of one step on a placed batch, then one fed by the pipeline:
    # adjacent in time, so under about the same load of a shared machine.
    # The prefetch thread builds the next fed batch during both (as it
    # overlaps the device step in a run), and the first `warmup` rounds
    # fill its queue.
    times = {"placed": [], "fed": []}
    with pipeline.prefetched(batch_fn, warmup + steps) as next_batch:
      for i in range(warmup + steps):
        placed_t, state, _ = _timed_steps(
            compiled, state, lambda _, i=i: placed[i % len(placed)], 1)
        fed_t, state, metrics = _timed_steps(
            compiled, state, lambda _, i=i: sharding.shard_batch(next_batch(i), mesh), 1)
        if i >= warmup:
          times["placed"].append(placed_t["wall"][0])
          times["fed"].append(fed_t["wall"][0])
    fed_s = statistics.median(times["fed"])
    records.append({
        "kind": "fed", "image_tower": config.model.image_tower,
        "backbone": backbone, "text_tower": config.model.text_tower,
        "batch_size": batch_size,
        "image_size": image_size, "step_s": fed_s,
        "placed_step_s": statistics.median(times["placed"]),
        "images_per_s": batch_size / fed_s,
        "slowdown": harness.paired_ratio(times["fed"], times["placed"]),
        "timed_steps": len(times["fed"]), "final_loss": float(metrics["loss"])})
  return records


# ----------------------------------------------------------------------------
# Ratios and the GPU extrapolation.


def ratio_records(pipelines: Sequence[dict], steps: Sequence[dict]) -> list[dict]:
  """delivered / consumed images/s for every (decode_threads, backbone).

  Also the CPU time per image of the pipeline over the step's: on a machine
  where both run on the same cores (this one), the share of the CPU that
  decoding takes from the step; less sensitive to other processes' load
  than the wall-time ratio.
  """
  return [{"kind": "ratio", "decode_threads": p["decode_threads"],
           "threads_resolved": p["threads_resolved"], "backbone": s["backbone"],
           "text_tower": s["text_tower"], "delivered_images_per_s": p["images_per_s"],
           "consumed_images_per_s": s["images_per_s"],
           "delivered_over_consumed": p["images_per_s"] / s["images_per_s"],
           "pipeline_cpu_over_step_cpu": p["cpu_ms_per_image"] / s["cpu_ms_per_image"]}
          for s in steps for p in pipelines]


def scaling_record(pipelines: Sequence[dict], decode: dict,
                   threads: int = MAX_DECODE_THREADS) -> dict | None:
  """What one process could deliver with `threads` decode threads (estimates).

  `JpegRecords.read` decodes a batch's images on `decode_threads` threads;
  the rest of a batch runs on the one prefetch thread: the array_record
  reads, the gathers and copies of `mixed_batch`. That serial share s is the
  one-thread pipeline's CPU ms per image minus `decode_image`'s (`decode`,
  measured alone), over the former; by Amdahl's law `threads` threads give
  at most 1 / (s + (1 - s) / threads) times one core's rate (1000 / the
  one-thread pipeline's CPU ms per image: CPU time, so that other
  processes' load does not lower it). An upper bound: the GIL-held Python
  inside each decode and each batch's wait for its slowest image are not in
  s. Also the observed 2-thread speed-up (wall time, so other processes'
  load moves it). None without a one-thread pipeline.
  """
  by_threads = {p["threads_resolved"]: p for p in pipelines}
  if 1 not in by_threads:
    return None
  one = by_threads[1]
  serial_ms = max(0.0, one["cpu_ms_per_image"] - decode["cpu_ms_per_image"])
  serial = serial_ms / one["cpu_ms_per_image"]
  amdahl = 1.0 / (serial + (1.0 - serial) / threads)
  per_core = 1e3 / one["cpu_ms_per_image"]
  return {"kind": "scaling", "one_core_images_per_s": per_core,
          "two_thread_speedup": (by_threads[2]["images_per_s"] / one["images_per_s"]
                                 if 2 in by_threads else None),
          "serial_ms_per_image": serial_ms, "serial_fraction": serial,
          "threads": threads, "amdahl_images_per_s": per_core * amdahl,
          "linear_images_per_s": per_core * threads}


def extrapolation_records(cpu_ms_per_image: float, steps: Sequence[dict],
                          rates: Sequence[float] = GPU_RATES) -> list[dict]:
  """Cores needed to decode for a GPU step consuming each assumed rate.

  Args:
    cpu_ms_per_image: CPU time per delivered image of the one-thread pipeline.
    steps: step records; each gives its FLOPs per image, for the H100
      utilisation a rate implies.
  """
  out = []
  for rate in rates:
    record = {"kind": "extrapolation", "assumed_gpu_images_per_s": rate,
              "cpu_ms_per_image": cpu_ms_per_image,
              "cores_needed": rate * cpu_ms_per_image / 1e3}
    for s in steps:
      # The GRU steps' (the columns' meaning since before MiniLM was added).
      if s["image_tower"] == "resnet50" and s["text_tower"] == "gru":
        record[f"h100_tf32_fraction_{s['backbone']}"] = (
            rate * s["flops_per_image"] / H100_TF32_FLOPS_PER_S)
    out.append(record)
  return out


# ----------------------------------------------------------------------------
# Tables.

DATASET_COLUMNS = (
    ("num_images", "JPEGs"), ("train_images", "train + restval"),
    ("original_kb_mean", "KB/file (640x480)"),
    ("stored_kb_mean", "KB/stored JPEG (256 px)"), ("write_s", "write s"),
    ("build_s", "TFDS build s"), ("nproc", "nproc"))
PIPELINE_COLUMNS = (
    ("kind", "what"), ("decode_threads", "decode_threads"),
    ("threads_resolved", "threads"), ("batch_size", "batch"),
    ("image_size", "px"), ("images_per_s", "images/s"),
    ("batch_ms_median", "ms/batch (median)"),
    ("cpu_ms_per_image", "CPU ms/image"), ("read_ms", "record read ms"),
    ("decode_ms", "of which JPEG decode"),
    ("resize_crop_ms", "of which resize + crop"),
    ("cpu_utilisation", "cores busy"), ("load_average", "load avg"))
STEP_COLUMNS = (
    ("kind", "what"), ("image_tower", "image tower"), ("backbone", "backbone"),
    ("text_tower", "text tower"),
    ("batch_size", "batch"), ("images_per_s", "images/s"), ("step_ms", "ms/step"),
    ("cpu_ms_per_image", "CPU ms/image"), ("cores_busy", "cores busy"),
    ("compile_s", "compile s"), ("gflops_per_image", "model GFLOP/image"),
    ("jaxpr_gflops_per_image", "jaxpr GFLOP/image"),
    ("xla_gflops_per_image", "XLA GFLOP/image"),
    ("gflops_per_s", "GFLOP/s"), ("matmul_gflops_per_s", "matmul GFLOP/s"),
    ("pct_of_matmul", "% of matmul"), ("slowdown", "fed / placed step"),
    ("load_average", "load avg"))
RATIO_COLUMNS = (
    ("decode_threads", "decode_threads"), ("threads_resolved", "threads"),
    ("backbone", "backbone"), ("text_tower", "text tower"),
    ("delivered_images_per_s", "delivered images/s"),
    ("consumed_images_per_s", "consumed images/s"),
    ("delivered_over_consumed", "delivered / consumed"),
    ("pipeline_cpu_over_step_cpu", "pipeline CPU / step CPU per image"))
SCALING_COLUMNS = (
    ("one_core_images_per_s", "1 core images/s (CPU time)"),
    ("two_thread_speedup", "2 threads speed-up (observed)"),
    ("serial_ms_per_image", "prefetch-thread CPU ms/image"),
    ("serial_fraction", "serial share"), ("threads", "threads"),
    ("amdahl_images_per_s", "images/s, Amdahl bound"),
    ("linear_images_per_s", "images/s, linear"))
EXTRAPOLATION_COLUMNS = (
    ("assumed_gpu_images_per_s", "assumed GPU step images/s"),
    ("cores_needed", "cores decoding (this CPU's kind)"),
    ("pct_h100_finetune", "implied H100 TF32 % (finetune)"),
    ("pct_h100_frozen", "implied H100 TF32 % (frozen)"))


def table_row(record: dict) -> dict:
  """A record with the tables' derived units (ms, GFLOP, %)."""
  def scaled(key, factor):
    return None if record.get(key) is None else record[key] * factor

  def per_image(key):
    return (None if record.get(key) is None
            else record[key] * 1e-9 / record["batch_size"])
  return {**record, "step_ms": scaled("step_s", 1e3),
          "gflops_per_image": scaled("flops_per_image", 1e-9),
          "jaxpr_gflops_per_image": per_image("jaxpr_flops_per_step"),
          "xla_gflops_per_image": per_image("xla_flops_per_step"),
          "gflops_per_s": scaled("flops_per_s", 1e-9),
          "matmul_gflops_per_s": scaled("matmul_flops_per_s", 1e-9),
          "pct_of_matmul": scaled("fraction_of_matmul", 100),
          "pct_h100_finetune": scaled("h100_tf32_fraction_finetune", 100),
          "pct_h100_frozen": scaled("h100_tf32_fraction_frozen", 100)}


def tables(records: Sequence[dict]) -> str:
  """The markdown tables: host side, device side, ratios, extrapolation."""
  by_kind = collections.defaultdict(list)
  for r in records:
    by_kind[r["kind"]].append(table_row(r))
  parts = []
  for title, kinds, columns in (
      ("Data (synthetic COCO, built by coco.load)", ("dataset",), DATASET_COLUMNS),
      ("Host: images delivered", ("decode", "pipeline"), PIPELINE_COLUMNS),
      ("Device (this CPU): images consumed", ("step", "fed"), STEP_COLUMNS),
      ("Delivered / consumed on this machine", ("ratio",), RATIO_COLUMNS),
      ("One process with more decode threads (estimates)",
       ("scaling",), SCALING_COLUMNS),
      ("Extrapolation to a GPU step (assumed rates, not measured)",
       ("extrapolation",), EXTRAPOLATION_COLUMNS)):
    rows = [r for k in kinds for r in by_kind[k]]
    if rows:
      parts.append(f"### {title}\n\n{harness.markdown_table(rows, columns)}")
  return "\n\n".join(parts)


NOTES = """
decode: one thread's CPU time per image (`time.process_time`) of the
array_record read and of `images.decode_image` over stored bytes in memory
(JPEG decode = PIL draft + convert; resize + crop = the rest); images/s =
1000 / its ms. pipeline: `pipeline.prefetched(pipeline.mixed_batch)` over
the encoded Karpathy train + restval split, images read lazily from the
built array_record dataset (in the page cache: no disk I/O), the consumer
waiting on nothing; CPU ms/image = the process's CPU time (all threads) per
delivered image; cores busy = CPU time / wall time; decode_threads 0 = one
per CPU, at most 16 (here: 2).

step: ResNet + GRU (word 300, hidden 1024, 10k-row vocabulary) + InfoNCE,
the library's train step on pipeline batches placed beforehand, median of
the timed steps after one warm-up; CPU ms/image = the process's CPU time
per image (XLA's threads included). model GFLOP/image = analytic ResNet-50
(2 x 4.09 G multiply-adds forward, x3 when trained) + the GRU's forward and
backward over the batch's real tokens; jaxpr GFLOP/image = the step's jaxpr
matmul + convolution count + the GRU's (it also multiplies the zeros that a
strided convolution's backward inserts, hence ~15 % more when the backbone
is trained); XLA GFLOP/image = XLA's cost analysis (elementwise work in,
each GRU loop body once). GFLOP/s and % of matmul use the model count; % of
matmul = over a float32 2048² matmul in the same process timed right after
each step (the median of the per-step ratios; matmul GFLOP/s = its median):
the model FLOP utilisation of this CPU. fed: the same step with each batch
built by the pipeline (decode_threads 0) on the same 2 cores, in rounds
with a step on a placed batch; fed / placed step = the median of the
per-round ratios (decoding's CPU share, the "pipeline CPU / step CPU"
column, is far below what a shared machine's load moves a step's time by).

Scaling: serial share s = (the one-thread pipeline's CPU ms/image -
decode_image's) / the former: the work of the one prefetch thread
(array_record reads, gathers, copies); Amdahl bound = one core's images/s
(1000 / the one-thread pipeline's CPU ms/image) / (s + (1 - s) / 16), an
upper bound (the GIL-held Python inside each decode and each batch's wait
for its slowest image are not in s); the observed 2-thread speed-up is wall
time on a shared machine. Extrapolation: cores = rate x the one-thread
pipeline's CPU ms/image / 1000, assuming linear scaling beyond the 2 cores
measured (the Amdahl bound says one process stops short of that); implied
H100 TF32 % = rate x model GFLOP/image over 494.7 TFLOP/s (dense TF32, H100
SXM datasheet): rates far above ~50 % are out of reach of that step.
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  smoke = mode == "smoke"
  sizes = {"full": (1024, 128, 20, 8, 4), "quick": (512, 128, 4, 8, 2),
           "smoke": (12, 4, 1, 2, 1)}[mode]
  num_images = FLAGS.num_images or sizes[0]
  batch_size = FLAGS.batch_size or sizes[1]
  batches = FLAGS.batches or sizes[2]
  step_batch = FLAGS.step_batch or sizes[3]
  steps = FLAGS.steps or sizes[4]
  image_size = 32 if smoke else 224  # ResNet configs' 224 (coco_vsepp.py)
  backbones = tuple(FLAGS.backbones)
  for b in backbones:
    if b not in BACKBONES:
      raise app.UsageError(f"--backbones: {b!r} is not one of {BACKBONES}")
  threads = [int(t) for t in FLAGS.decode_threads]

  root = FLAGS.workdir or tempfile.mkdtemp(prefix="input_pipeline_")
  manual_dir, data_dir = os.path.join(root, "manual"), os.path.join(root, "tfds")
  records = []

  def emit(record):
    record = {"benchmark": "input_pipeline", "mode": mode,
              "load_average": harness.load_average(), **record}
    harness.emit(record)
    records.append(record)

  try:
    if not os.path.isfile(os.path.join(manual_dir, "dataset_coco.json")):
      write_s, file_sizes = harness.timed(
          lambda: write_coco_manual_dir(manual_dir, num_images))
    else:
      write_s, file_sizes = 0.0, [
          os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(manual_dir)
          for f in fs if f.endswith(".jpg")]
    build_s, (pool, vocab) = harness.timed(lambda: load_train_pool(
        manual_dir, data_dir, image_size=224, decode_threads=threads[0]))
    jpegs = stored_jpegs(pool, 64)
    emit({"kind": "dataset", "num_images": len(file_sizes),
          "train_images": len(pool), "original_kb_mean": float(np.mean(file_sizes) / 1e3),
          "stored_kb_mean": float(np.mean([len(b) for b in jpegs]) / 1e3),
          "write_s": write_s, "build_s": build_s, "vocabulary": vocab.size,
          "nproc": os.cpu_count()})

    decode = measure_decode(pool, 64, 224, repeats=1 if smoke else 5)
    emit(decode)
    pipelines = []
    for t in threads:
      pool, _ = load_train_pool(manual_dir, data_dir, image_size=224,
                                decode_threads=t)
      record = {"decode_threads": t, "threads_resolved": t or images.default_threads(),
                **measure_pipeline(pool, batch_size, warmup=1, batches=batches)}
      emit(record)
      pipelines.append(record)

    step_pool, _ = load_train_pool(manual_dir, data_dir, image_size=image_size,
                                   decode_threads=0)
    host_batches = [pipeline.train_batch(step_pool, step_batch, seed=0, task=0,
                                         step=s) for s in range(2)]
    matmul = make_matmul(256 if smoke else 2048)
    step_records = []
    towers = [(b, t) for t in FLAGS.text_towers for b in backbones]
    for i, (backbone, text_tower) in enumerate(towers):
      # MiniLM reads WordPiece ids; the pipeline's ids (a smaller
      # vocabulary) are valid ones, and the work does not depend on them.
      for record in measure_step(
          step_config(backbone, step_batch, smoke, text_tower),
          vocab_size=minilm.VOCAB_SIZE if text_tower == "minilm" else 10_000,
          image_size=image_size, host_batches=host_batches, warmup=1,
          steps=steps, matmul=matmul,
          fed_pool=step_pool if i == 0 and FLAGS.fed else None):
        emit(record)
        if record["kind"] == "step":
          step_records.append(record)
    for record in ratio_records(pipelines, step_records):
      emit(record)
    scaling = scaling_record(pipelines, decode)
    if scaling is not None:
      emit(scaling)
    one_thread = [p for p in pipelines if p["threads_resolved"] == 1]
    basis = (one_thread or pipelines)[0]["cpu_ms_per_image"]
    for record in extrapolation_records(basis, step_records):
      emit(record)
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(root, ignore_errors=True)
  harness.publish("input_pipeline", records, tables(records), module=MODULE,
                  mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_integer("num_images", 0, "Synthetic COCO images (0: 1024 full, "
                       "512 quick, 12 smoke).")
  flags.DEFINE_integer("batch_size", 0, "Pipeline batch (0: 128; smoke 4).")
  flags.DEFINE_integer("batches", 0, "Timed pipeline batches per decode_threads "
                       "(0: 20 full, 4 quick, 1 smoke).")
  flags.DEFINE_list("decode_threads", ["1", "2", "0"],
                    "data.decode_threads values (0 = one per CPU, at most 16).")
  flags.DEFINE_integer("step_batch", 0, "Train-step batch on CPU (0: 8; smoke 2).")
  flags.DEFINE_integer("steps", 0, "Timed train steps (0: 4 full, 2 quick, 1 smoke).")
  flags.DEFINE_list("backbones", list(BACKBONES), f"Of {BACKBONES}: the ResNet "
                    "trained (fwd + bwd) or frozen (configs/coco_vsepp.py).")
  flags.DEFINE_list("text_towers", ["gru"], "Text towers of the train step: gru "
                    "(VSE++'s) and/or minilm (all-MiniLM-L6-v2, fine-tuned).")
  flags.DEFINE_bool("fed", True, "Also time the first backbone's step fed by "
                    "the pipeline.")
  flags.DEFINE_string("workdir", "", "Keep the manual dir and built dataset "
                      "here (reused when present); '' = a temporary dir, deleted.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
