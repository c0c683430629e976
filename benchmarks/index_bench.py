r"""ScaNN against exact search: build time, QPS, recall@10, size on disk, the curve.

  python -m benchmarks.index_bench --real_workdir=/tmp/ccr_default  # 100k + 1M, ~15 min
  python -m benchmarks.index_bench --quick                          # 20k + 100k, ~3 min
  python -m benchmarks.index_bench --sizes=100000 --noflat --noreal # 100k only, ~1 min

Galleries:
  clustered  N unit 256-d embeddings in clusters of ~100 (N/100 cluster
             centres), the centres grouped under sqrt(N/100) topics
             (`clustered_gallery`); queries are gallery items moved by noise
             plus one shared offset (a modality gap: queries come from the
             other tower, a distribution the tree was not trained on).
  clustered_flat
             the same without topics: N/100 independent uniform centres. A
             worst case for a partition tree, kept to show what it costs (see
             "Data model" below); --noflat skips it.
  real_*     embeddings from an embedded-benchmark run: the last snapshot's
             caption galleries of every task (real_texts, queried by the
             images) and image galleries (real_images, queried by the
             captions), read from `<workdir>/indices/snap_<T>/task_*/`. Without
             --real_workdir, the tiny (quick/smoke) or default (full) config is
             trained first with `run.loop.train_and_evaluate` into a temp dir.
Every index is built with `indexing.build_index` (the library's ScaNN rule,
`indexing.scann_parameters`) and searched with `indexing.search`; the exact
backend is the same calls with backend='exact'. Galleries below
`indexing.BRUTE_FORCE_MAX_COUNT` get ScaNN brute force by that rule, so real
galleries are also built with mode='tree_ah' forced, to measure the tree on
real cross-modal queries.

Three searches of each gallery are timed in the same process, interleaved
round by round (`interleaved_search_seconds`): 'fast exact', a bare jitted
matmul + `lax.top_k` over the gallery already on the device
(`fast_exact_top_k`, the reference: what exact search costs here), the exact
backend (`indexing.search` of a backend='exact' index) and ScaNN.

Keys (every line): items, build_s, qps (queries / median search time),
exact_qps, fast_exact_qps, exact_over_fast (the exact backend's time over fast
exact's, median of per-round ratios), exact_matches_fast (same ids and scores),
speedup_vs_fast and speedup_vs_exact (ScaNN's, per-round ratios likewise),
recall_at_10 (mean |ScaNN top-10 ∩ exact top-10| / 10, as
`indexing.recall_against_exact`), bytes_on_disk (the `save_index` directory),
plus the query-time parameters. `measurement` is 'default' (the library's
parameters) or 'curve' (the same searcher with `num_leaves_to_search` and
`reorder_num_neighbors` overridden in its metadata, which is where
`indexing.search` reads them: the tree is not rebuilt per point). build_cpu_s
is the build's CPU time over all threads: on a shared machine, a build_s above
it means the build waited for a core.

Data model. Real embeddings are organised at several scales (a category, its
sub-categories, near-duplicate items; captions of one image), and that is what
lets a k-means tree with fewer leaves than there are clusters keep
neighbourhoods together: leaves group related clusters. The flat model has no
scale above its clusters: 10k independent directions of the 256-d sphere at
1M items (participation ratio of its covariance ~230 of 256 dims; the real
galleries of a default run: ~10 of 128). Measured at 1M with the library's
1000 leaves, k-means cuts its clusters apart: each cluster's ~100 points fall
into ~38 leaves (the largest holding 25%) and a query's exact top-10 into 7
leaves whose centroids mostly stand for unrelated clusters, so recall@10
grows slowly with the leaves searched (0.62 at 50 of 1000, 0.86 at 200).
Other trees did not change that (2000 leaves, 100k training sample, 50
searched): 0.65; with spherical k-means, 0.74 from k-means++ centres and 0.82
with SOAR spilling, building 1.7-2.4x longer. With topics, clusters are
split too (6.8 leaves each; a query's top-10 in 3.6) but those leaves lie in
the query's topic and rank first. The topic level is the one assumption that
changes this, and recall depends on its strength: at 1M, 1000 leaves, 50 /
200 searched, recall@10 was 0.62 / 0.86 with topic similarity 0 (flat), 0.70
/ 0.90 with 0.3, 1.0 / 1.0 with 0.5 and 0.7. The default 0.5 puts two
clusters of one topic at cosine ~0.25 (items of one cluster: ~0.5; unrelated
items: ~0 +- 0.06).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from ccr_jax import indexing
from ccr_jax.indexing import scann_backend
from ccr_jax.run import loop
from configs import default

MODULE = "benchmarks.index_bench"
K = 10
# Seconds of rest before each timed search (`interleaved_search_seconds`).
PAUSE_S = 0.2
# Default cosine of a cluster centre with its topic (see `clustered_gallery`).
TOPIC_SIMILARITY = 0.5
# The synthetic galleries: name -> topic similarity.
SYNTHETIC = {"clustered": TOPIC_SIMILARITY, "clustered_flat": 0.0}


def clustered_gallery(rng: np.random.Generator, count: int, dim: int,
                      num_clusters: int, spread: float = 1.0,
                      topic_similarity: float = TOPIC_SIMILARITY) -> np.ndarray:
  """Unit embeddings in a topic -> cluster -> item hierarchy: float32 [count, dim].

  Each point is its cluster centre plus isotropic noise of norm ~`spread`, so
  it scores ~1/sqrt(1 + spread^2) with its centre: clusters overlap as
  categories of real embeddings do. The cluster centres lie around
  round(sqrt(num_clusters)) random topic centres, each scoring
  ~`topic_similarity` with its topic (two clusters of a topic score
  ~topic_similarity^2). `topic_similarity=0` is the flat model: independent
  uniform centres, the same draws as without topics.
  """
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  if topic_similarity:
    num_topics = max(1, round(math.sqrt(num_clusters)))
    topics = rng.standard_normal((num_topics, dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    # A random unit vector is nearly orthogonal to its topic in high dim, so
    # this mix scores ~topic_similarity with the topic.
    centres *= math.sqrt(1 - topic_similarity**2)
    centres += topic_similarity * topics[rng.integers(0, num_topics, num_clusters)]
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  points = rng.standard_normal((count, dim), dtype=np.float32)
  points *= spread / math.sqrt(dim)
  points += centres[rng.integers(0, num_clusters, count)]
  points /= np.linalg.norm(points, axis=1, keepdims=True)
  return points


def cross_modal_queries(rng: np.random.Generator, gallery: np.ndarray, num_queries: int,
                        noise: float = 0.5, shift: float = 0.3) -> np.ndarray:
  """Queries from the 'other modality': float32 [num_queries, dim], unit rows.

  Gallery items plus noise of norm ~`noise` plus one offset of norm `shift`
  shared by every query (the modality gap of dual encoders).
  """
  dim = gallery.shape[1]
  offset = rng.standard_normal(dim).astype(np.float32)
  offset *= shift / np.linalg.norm(offset)
  rows = rng.choice(len(gallery), num_queries, replace=False)
  queries = gallery[rows] + offset + (noise / math.sqrt(dim)) * rng.standard_normal(
      (num_queries, dim), dtype=np.float32)
  return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def recall_vs_exact(found_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean over queries of |found ∩ exact| / k; both int [num_queries, k].

  The formula of `indexing.recall_against_exact`, on results already computed
  (the exact search is the expensive part and is shared by every curve point).
  """
  hits = (exact_ids[:, :, None] == found_ids[:, None, :]).any(axis=2)
  return float(hits.mean())


@functools.partial(jax.jit, static_argnames=("k",))
def fast_exact_top_k(queries: jax.Array, gallery: jax.Array, k: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The reference ('fast exact'): one jitted matmul + `lax.top_k`, nothing else.

  No query blocks, no padding, no checks; the gallery is placed on the device
  once by the caller. What exact search costs on this machine, against which
  the exact backend (`exact_over_fast`) and ScaNN (`speedup_vs_fast`) are
  measured.

  Args:
    queries: float32 [num_queries, dim].
    gallery: float32 [count, dim], on the device.
    k: neighbours wanted, <= count.

  Returns:
    scores: float32 [num_queries, k], best first.
    rows: int32 [num_queries, k], gallery rows (equal scores: lower row first).
  """
  # HIGHEST, as the exact backend: accelerators would otherwise multiply in
  # bfloat16 (on CPU float32 is float32 anyway).
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def interleaved_search_seconds(references: dict[str, Callable[[], Any]],
                               searches: dict[str, Callable[[], Any]], repeats: int
                               ) -> dict[str, list[float]]:
  """Wall seconds of `repeats` rounds, each calling every search once.

  `harness.interleaved_seconds`, arranged against order effects measured on
  this machine. Each call follows an untimed rest of `PAUSE_S`: a ScaNN search
  timed right after a jitted matmul took 1.25x as long as after a 50 ms rest
  (200k items; presumably XLA's CPU threads still spinning). Even after the
  rest, the first ScaNN search after the jitted ones ran 1.2-1.6x slower than
  its place on the curve (100k and 1M items; caches and memory the 4 GB score
  block evicted), so each round times the references first (in alternating
  order), then runs one search untimed, then times `searches` starting one
  place later each round.

  Args:
    references: the jitted exact searches (fast exact, the exact backend).
    searches: the ScaNN searches.
    repeats: rounds.

  Returns:
    name -> wall seconds of each round, for every name of both dicts.
  """
  names = list(searches)
  times: dict[str, list[float]] = {name: [] for name in [*references, *names]}
  for round_ in range(max(1, repeats)):
    order = list(references) if round_ % 2 == 0 else list(references)[::-1]
    for name in order:
      time.sleep(PAUSE_S)  # not timed
      times[name].append(harness.timed(references[name])[0])
    start = round_ % len(names) if names else 0
    rotated = names[start:] + names[:start]
    if rotated:
      time.sleep(PAUSE_S)
      searches[rotated[0]]()  # untimed: takes the slowdown after the references
    for name in rotated:
      time.sleep(PAUSE_S)
      times[name].append(harness.timed(searches[name])[0])
  return times


def with_query_params(index: indexing.Index, leaves: int, reorder: int
                      ) -> indexing.Index:
  """The same searcher with other query-time `num_leaves_to_search` / reorder depth.

  `indexing.search` reads both from the metadata at query time, so this equals
  `build_index(..., options={'num_leaves_to_search': leaves,
  'reorder_num_neighbors': reorder})` with the same tree, without retraining it.
  """
  params = {**index.metadata.backend_params, "num_leaves_to_search": int(leaves),
            "reorder_num_neighbors": int(reorder)}
  return dataclasses.replace(
      index, metadata=dataclasses.replace(index.metadata, backend_params=params))


def effective_query_params(params: dict, count: int) -> tuple[int | None, int | None]:
  """(leaves searched, candidates reordered) for K, as `indexing.search` derives them.

  `scann_backend.query_parameters`: at least 10*K candidates are reordered,
  and enough leaves are searched to hold twice the candidates on average.
  (None, None) for brute force.
  """
  return scann_backend.query_parameters(params, count, K) or (None, None)


def dir_bytes(path: str) -> int:
  """Total size of the files under `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def saved_size(index: indexing.Index, scratch: str) -> tuple[int, float]:
  """(bytes on disk, save seconds) of `indexing.save_index` into `scratch`."""
  path = os.path.join(scratch, f"{index.metadata.backend}_{index.metadata.count}")
  save_s, _ = harness.timed(lambda: indexing.save_index(index, path))
  size = dir_bytes(path)
  shutil.rmtree(path, ignore_errors=True)
  return size, save_s


def bench_gallery(name: str, gallery: np.ndarray, queries: np.ndarray, *,
                  repeats: int, scann_options: Sequence[dict | None],
                  curve_fractions: list[float], curve_reorder: list[int],
                  scratch: str) -> list[dict]:
  """ScaNN trees (library rule or options, then their curves) against exact search.

  Every search of the gallery (fast exact, the exact backend, each tree's
  default and curve points) is timed in the same rounds
  (`interleaved_search_seconds`), and the ratios are medians of per-round
  ratios, so they compare the searches under the same background load.

  Args:
    gallery: float32 [count, dim], unit rows.
    queries: float32 [num_queries, dim], unit rows.
    scann_options: one tree per entry, each passed to `build_index` (None:
      the library's rule); an entry that resolves to the parameters of an
      earlier one is skipped.
  Returns:
    Per tree, one record for its parameters ('default'), then one per curve
    point (tree_ah only).
  """
  count, dim = gallery.shape
  ids = np.arange(count, dtype=np.int64)
  build = lambda backend, **kw: indexing.build_index(  # noqa: E731
      gallery, ids, backend=backend, snapshot=1, task=1, modality="texts", **kw)
  exact = build("exact")
  exact_bytes, _ = saved_size(exact, scratch)
  # The reference's own device copy: it must not lean on the backend it measures.
  device_gallery = jax.device_put(gallery)
  fast = lambda: tuple(np.asarray(x) for x in  # noqa: E731
                       fast_exact_top_k(queries, device_gallery, K))
  exact_search = lambda: indexing.search(exact, queries, K)  # noqa: E731
  # First calls compile (not timed); their results check the exact backend.
  fast_scores, fast_rows = fast()
  exact_scores, exact_ids = exact_search()
  exact_matches_fast = bool(np.array_equal(exact_scores, fast_scores)
                            and np.array_equal(exact_ids, ids[fast_rows]))

  trees, built = [], []
  for options in scann_options:
    if indexing.scann_parameters(count, options) in built:
      continue
    built.append(indexing.scann_parameters(count, options))
    cpu_start = time.process_time()
    build_s, scann = harness.timed(functools.partial(build, "scann", options=options))
    build_cpu_s = time.process_time() - cpu_start
    scann_bytes, save_s = saved_size(scann, scratch)
    params = scann.metadata.backend_params
    trees.append({
        "scann": scann, "backend": scann.metadata.backend,
        "scann_options": None if options is None else ",".join(
            f"{key}={json.dumps(value)}" for key, value in sorted(options.items())),
        "scann_mode": params.get("mode"), "num_leaves": params.get("num_leaves"),
        "dims_per_block": params.get("dims_per_block"),
        "build_s": build_s, "build_cpu_s": build_cpu_s, "save_s": save_s,
        "bytes_on_disk": scann_bytes})

  # (tree, index, measurement, extra keys) of every ScaNN point, defaults first.
  points = []
  for tree in trees:
    scann = tree["scann"]
    params = scann.metadata.backend_params
    points.append((tree, scann, "default", {}))
    if params.get("mode") != "tree_ah":
      continue
    num_leaves = int(params["num_leaves"])
    seen = {effective_query_params(params, count)}
    for fraction in curve_fractions:
      leaves = min(num_leaves, max(1, math.ceil(fraction * num_leaves)))
      for reorder in curve_reorder:
        index = with_query_params(scann, leaves, reorder)
        # Small galleries clamp many grid points to the same search: time it once.
        effective = effective_query_params(index.metadata.backend_params, count)
        if effective in seen:
          continue
        seen.add(effective)
        points.append((tree, index, "curve", {"leaves_fraction": fraction}))
  searches, found = {}, []
  for i, (_, index, _, _) in enumerate(points):
    searches[f"scann_{i}"] = lambda index=index: indexing.search(index, queries, K)
    found.append(searches[f"scann_{i}"]()[1])  # warm-up: ScaNN starts its threads
  load_before = harness.load_average()
  times = interleaved_search_seconds({"fast": fast, "exact": exact_search}, searches,
                                     repeats)
  qps = lambda name: len(queries) / statistics.median(times[name])  # noqa: E731
  common = {
      "benchmark": "index_bench", "gallery": name, "items": count, "dim": dim,
      "queries": len(queries), "k": K, "exact_bytes_on_disk": exact_bytes,
      "repeats": repeats, "fast_exact_qps": qps("fast"), "exact_qps": qps("exact"),
      "exact_over_fast": harness.paired_ratio(times["exact"], times["fast"]),
      "exact_matches_fast": exact_matches_fast,
      "peak_rss_mb": harness.peak_rss_mb(), "load_average_before": load_before,
      "load_average": harness.load_average(),
  }
  records = []
  for i, (tree, index, measurement, extra) in enumerate(points):
    leaves, reorder = effective_query_params(index.metadata.backend_params, count)
    records.append({
        **common, **{k: v for k, v in tree.items() if k != "scann"}, **extra,
        "measurement": measurement, "qps": qps(f"scann_{i}"),
        "speedup_vs_exact": harness.paired_ratio(times["exact"], times[f"scann_{i}"]),
        "speedup_vs_fast": harness.paired_ratio(times["fast"], times[f"scann_{i}"]),
        "recall_at_10": recall_vs_exact(found[i], exact_ids),
        "leaves_to_search_set": index.metadata.backend_params.get("num_leaves_to_search"),
        "leaves_to_search": leaves, "reorder": reorder})
  return records


def parse_options(text: str) -> dict[str, Any]:
  """`build_index` options from 'key=value,key=value' (values JSON: 2, 0.05, null).

  Not a JSON object on the command line: the results' recorded command
  (`harness.command_line`) does not quote arguments.
  """
  options = {}
  for item in text.split(","):
    key, _, value = item.partition("=")
    options[key.strip()] = json.loads(value)
  return options


def real_embeddings(workdir: str) -> dict[str, np.ndarray]:
  """The last snapshot's galleries of every task, from `<workdir>/indices/`.

  Returns {"images": float32 [N, D], "texts": float32 [C*N, D]}: the rows of
  `indices/snap_<T>/task_<j>/<modality>/embeddings.npy` for every j, in task
  order (with index.reindex=False only task T's gallery exists there).
  """
  root = os.path.join(workdir, "indices")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{workdir} has no indices/: not a ccr_jax workdir, or "
                            "its indexing stage has not run.")
  snap = max(int(d.split("_")[1]) for d in os.listdir(root) if d.startswith("snap_"))
  snap_dir = os.path.join(root, f"snap_{snap}")
  tasks = sorted((d for d in os.listdir(snap_dir) if d.startswith("task_")),
                 key=lambda d: int(d.split("_")[1]))
  return {m: np.concatenate([np.load(os.path.join(snap_dir, t, m, "embeddings.npy"))
                             for t in tasks]) for m in ("images", "texts")}


def train_real_workdir(config_name: str, workdir: str) -> None:
  """Runs the embedded-benchmark experiment (configs/default.py, 'tiny' or 'default')."""
  loop.train_and_evaluate(
      default.get_config(None if config_name == "default" else config_name), workdir)


def real_records(workdir: str, config_name: str, worker_flags: list[str]) -> list[dict]:
  """Records of the real galleries of `workdir`, or of a run trained for them.

  Training and benchmarking run in worker processes (the benchmark's peak RSS
  is its own); a trained temp workdir is deleted afterwards.
  """
  temp = None
  if not workdir:
    workdir = temp = tempfile.mkdtemp(prefix="index_bench_real_")
    harness.run_worker(MODULE, [f"--train_real={temp}", f"--real_config={config_name}"])
  try:
    records = harness.run_worker(MODULE, ["--worker=real", f"--real_workdir={workdir}",
                                          *worker_flags])
  finally:
    if temp:
      shutil.rmtree(temp, ignore_errors=True)
  source = f"trained configs/default.py:{config_name}" if temp else workdir
  return [{**r, "real_source": source} for r in records]


TABLE_COLUMNS = (
    ("gallery", "gallery"), ("items", "items"), ("dim", "dim"),
    ("scann_options", "ScaNN options"), ("measurement", "params"),
    ("scann_mode", "ScaNN mode"), ("dims_per_block", "AH dims"),
    ("leaves", "leaves searched / total"), ("reorder", "reorder"),
    ("build_s", "build s"), ("build_cpu_s", "build CPU s"), ("qps", "ScaNN QPS"),
    ("fast_exact_qps", "fast exact QPS"), ("exact_qps", "exact QPS"),
    ("exact_over_fast", "exact time / fast exact"),
    ("speedup_vs_fast", "ScaNN QPS / fast exact"), ("speedup_vs_exact", "ScaNN QPS / exact"),
    ("recall_at_10", "recall@10 vs exact"),
    ("mb_on_disk", "MB on disk"), ("exact_mb", "exact MB"), ("peak_rss_mb", "peak RSS MB"),
)


def table_row(record: dict) -> dict:
  leaves = (None if record.get("leaves_to_search") is None
            else f"{record['leaves_to_search']} / {record['num_leaves']}")
  return {**record, "leaves": leaves, "mb_on_disk": record["bytes_on_disk"] / 2**20,
          "exact_mb": record["exact_bytes_on_disk"] / 2**20}


NOTES = """
QPS = queries / median wall time of one search call over all queries (ScaNN:
`search_batched_parallel`, every core; exact: the exact backend's jitted
matmul + top-k over its device-resident gallery, blocks of 1024 queries;
fast exact: one bare jitted matmul + `lax.top_k`, the reference). All are
timed in the same rounds (`interleaved_search_seconds`: an untimed 0.2 s
rest before each call, the exact searches first, then one untimed ScaNN
search, then every ScaNN search, starting one place later each round), and
the ratios are medians of per-round ratios: "exact time / fast exact" is the
exact backend's overhead (its ids and scores equal fast exact's:
`exact_matches_fast`), "ScaNN QPS / fast exact" ScaNN's speed-up over exact
search done as fast as this machine does it. recall@10 = overlap of ScaNN's top-10 with exact top-10.
'default' rows use the library's parameters (`indexing.scann_parameters`:
L = sqrt(N) leaves, min(2·sqrt(L), max(24, 2% of L)) searched, reorder 100,
plain AH with 2 dimensions a block, 4 from 1M items) or, where "ScaNN
options" says so, those parameters with the options' overrides (`--compare`:
a second tree, timed in the same rounds); 'curve' rows override leaves
searched and reorder depth on the same tree. `indexing.search` never
reorders fewer than 10·k = 100 candidates and searches at least enough
leaves to hold twice them, so the curve's low end is clamped there ("leaves
searched" is the effective value; grid points clamped to a search already
timed are skipped).
clustered is topic -> cluster -> item data, clustered_flat the same without
topics (a worst case for a partition tree; see the data model in the module
docstring of benchmarks/index_bench.py).
MB on disk = the `save_index` directory (embeddings.npy, item ids and the
ScaNN assets, which read the float32 dataset from embeddings.npy). Peak RSS
includes every tree, the exact index's device copy of the gallery and fast
exact's own, and the [1024, N] float32 score block (4 GB at 1M).
"""


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  mode = harness.run_mode(FLAGS.quick, FLAGS.smoke)
  sizes = FLAGS.sizes or {"full": ["100000", "1000000"], "quick": ["20000", "100000"],
                          "smoke": ["12000"]}[mode]
  repeats = FLAGS.repeats or {"full": 7, "quick": 5, "smoke": 1}[mode]
  num_queries = FLAGS.num_queries or (200 if mode == "smoke" else 1000)
  dim = 32 if mode == "smoke" and FLAGS.dim == 256 else FLAGS.dim
  curve = dict(curve_fractions=[float(x) for x in FLAGS.curve_fractions],
               curve_reorder=[int(x) for x in FLAGS.curve_reorder])
  if mode == "smoke":
    curve = dict(curve_fractions=[0.05, 0.2], curve_reorder=[100])

  if FLAGS.train_real:
    train_real_workdir(FLAGS.real_config, FLAGS.train_real)
    return
  if FLAGS.worker:  # one gallery in this process (its own peak RSS)
    with tempfile.TemporaryDirectory(prefix="index_bench_") as scratch:
      if FLAGS.worker == "real":
        emb = real_embeddings(FLAGS.real_workdir)
        # Galleries of one modality, queried by the other (as the experiment does).
        for gallery_m, query_m in (("texts", "images"), ("images", "texts")):
          for record in bench_gallery(
              f"real_{gallery_m}", emb[gallery_m], emb[query_m], repeats=repeats,
              scann_options=[None, {"mode": "tree_ah"}], scratch=scratch, **curve):
            harness.emit(record)
      else:
        name, count = FLAGS.worker.split(":")
        count = int(count)
        rng = np.random.default_rng(0)
        gallery = clustered_gallery(rng, count, dim, max(1, count // 100),
                                    topic_similarity=SYNTHETIC[name])
        queries = cross_modal_queries(rng, gallery, num_queries)
        compare = [parse_options(options) for options in FLAGS.compare]
        for record in bench_gallery(name, gallery, queries, repeats=repeats,
                                    scann_options=[None, *compare], scratch=scratch,
                                    **curve):
          harness.emit({**record, "topic_similarity": SYNTHETIC[name]})
    return

  worker_flags = [f"--quick={FLAGS.quick}", f"--smoke={FLAGS.smoke}",
                  f"--repeats={repeats}", f"--num_queries={num_queries}", f"--dim={dim}",
                  f"--curve_fractions={','.join(FLAGS.curve_fractions)}",
                  f"--curve_reorder={','.join(FLAGS.curve_reorder)}",
                  *(f"--compare={options}" for options in FLAGS.compare)]
  records = []
  flat = mode != "smoke" if FLAGS.flat is None else FLAGS.flat
  for name in ["clustered"] + (["clustered_flat"] if flat else []):
    for size in sizes:
      records += harness.run_worker(MODULE, [f"--worker={name}:{int(size)}",
                                             *worker_flags])
  if FLAGS.real:
    records += real_records(FLAGS.real_workdir,
                            FLAGS.real_config or ("tiny" if mode != "full" else "default"),
                            worker_flags)
  for record in records:
    record["mode"] = mode
    harness.emit(record)
  harness.publish("index_bench", records,
                  harness.markdown_table([table_row(r) for r in records], TABLE_COLUMNS),
                  module=MODULE, mode=mode, notes=NOTES, write=FLAGS.write_results)


def define_flags():
  harness.define_common_flags(flags)
  flags.DEFINE_list("sizes", [], "Clustered gallery sizes (default: 100k,1M full;"
                    " 20k,100k quick; 12k smoke).")
  flags.DEFINE_integer("dim", 256, "Clustered embedding size (smoke: 32).")
  flags.DEFINE_integer("num_queries", 0, "Queries (0: 1000; smoke 200).")
  flags.DEFINE_integer("repeats", 0, "Rounds of interleaved timed searches (0: 7"
                       " full, 5 quick, 1 smoke).")
  flags.DEFINE_list("curve_fractions",
                    ["0.005", "0.01", "0.015", "0.02", "0.05", "0.1", "0.2"],
                    "Fractions of the leaves searched on the recall/QPS curve.")
  flags.DEFINE_list("curve_reorder", ["100", "1000"], "Reorder depths on the curve.")
  flags.DEFINE_multi_string(
      "compare", [], "ScaNN options of another tree built and timed beside the"
      " library's on the synthetic galleries, as key=value[,key=value] with"
      " JSON values (dims_per_block=2); skipped where it equals the library's.")
  flags.DEFINE_bool("flat", None, "Also benchmark the flat clustered model (no"
                    " topics: a worst case for a partition tree, see the docstring);"
                    " default: yes but with --smoke.")
  flags.DEFINE_bool("real", True, "Also benchmark real embeddings of a ccr_jax run.")
  flags.DEFINE_string("real_workdir", "", "A ccr_jax workdir whose indices/ give the"
                      " real embeddings; empty: train one into a temp dir.")
  flags.DEFINE_string("real_config", "", "configs/default.py argument to train when"
                      " --real_workdir is empty: 'tiny' or 'default' (empty: tiny for"
                      " --quick/--smoke, default otherwise).")
  flags.DEFINE_string("worker", "", "Internal: 'clustered:SIZE',"
                      " 'clustered_flat:SIZE' or 'real'.")
  flags.DEFINE_string("train_real", "", "Internal: train the real run into this dir.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
