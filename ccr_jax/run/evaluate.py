"""--mode=evaluate: every result recomputed from a workdir's snapshots and indices,
plus the forgetting analysis (`ccr_jax.analysis`), without training anything."""

import os
from typing import Any

import ml_collections
import numpy as np

from ccr_jax import analysis
from ccr_jax import checkpoints
from ccr_jax import files
from ccr_jax import reporting
from ccr_jax import schema
from ccr_jax import sharding
from ccr_jax.run import config as config_lib
from ccr_jax.run import indices as indices_lib
from ccr_jax.run import results as results_lib
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import workdir as workdir_lib


def embed_all(setup: setup_lib.Setup, params: dict[int, Any],
              index_cache: dict | None = None):
  """Every task's test items embedded by every snapshot that has seen it.

  Args:
    setup: the workdir's setup.
    params: snapshot (1-based) -> params, for snapshots 1..T.
    index_cache: filled with the saved indices it loads, for
      `results.evaluate_after_task` to search without loading them again.

  Returns:
    queries: {(j, s): `indices.test_queries` of task j by snapshot s}, s >= j.
    galleries: {(j, s, modality): (emb float32 [N, dim], item_ids int64 [N])},
      the saved index's embeddings when index snap_s/task_j exists, else the
      fresh ones.
    max_diff: the largest |saved - fresh| over every saved gallery (0.0 when
      embedding is deterministic; None if no index is saved).
  """
  num = len(params)
  queries, galleries, diffs = {}, {}, []
  for j in range(1, num + 1):
    for s in range(j, num + 1):
      q = indices_lib.test_queries(setup, params[s], j - 1)
      queries[(j, s)] = q
      for modality in indices_lib.MODALITIES:
        path = workdir_lib.index_dir(setup.workdir, s, j, modality)
        if os.path.exists(os.path.join(path, "metadata.json")):
          ix = indices_lib.load_gallery_index(
              setup, s, j, modality, index_cache,
              expect_item_ids=q[modality]["item_ids"])
          galleries[(j, s, modality)] = (ix.embeddings, ix.item_ids)
          diffs.append(float(np.max(np.abs(ix.embeddings - q[modality]["emb"]),
                                    initial=0.0)))
        else:
          galleries[(j, s, modality)] = (q[modality]["emb"], q[modality]["item_ids"])
  return queries, galleries, max(diffs, default=None)


def evaluate_workdir(workdir: str,
                     analysis_config: ml_collections.ConfigDict | None = None) -> dict:
  """Recomputes every result from a workdir's snapshots and indices, and analyses it.

  Nothing is trained or indexed: a missing index of the regimes is an error.
  Writes results/evaluate.json (and .md, plots) beside the training run's
  results.json: the same metrics and summary, plus "analysis" (`analysis.analyze`).

  Args:
    workdir: a workdir written by `run.loop.train_and_evaluate`.
    analysis_config: overrides the workdir config's `analysis` section.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{workdir} has no config.json: it is not a ccr_jax workdir (train first "
        "with --mode=train).")
  config = config_lib.complete(ml_collections.ConfigDict(files.read_json(path)))
  opts = analysis.settings(config.analysis if analysis_config is None else
                           schema.complete(analysis.config_keys(), analysis_config))
  setup = setup_lib.build_setup(config, workdir)
  done = checkpoints.completed_snapshots(workdir)
  if not done:
    raise FileNotFoundError(f"{workdir}/snapshots holds no complete snapshot.")
  missing = sorted(set(range(1, max(done) + 1)) - set(done))
  if missing:
    raise FileNotFoundError(f"{workdir}/snapshots lacks snapshots {missing} below "
                            f"{max(done)}; resume the training run to rebuild them.")
  params = {s: setup_lib.load_snapshot(setup, s)[0] for s in done}
  index_cache: dict = {}
  queries, galleries, max_diff = embed_all(setup, params, index_cache)
  rows = []
  for t in range(max(done)):
    own = {j: queries[(j + 1, t + 1)] for j in range(t + 1)}
    rows.append(results_lib.evaluate_after_task(setup, t, params[t + 1], own,
                                               index_cache=index_cache))
    rows[-1].pop("embeddings")
  results = results_lib.aggregate(setup, rows)
  results["analysis"] = analysis.analyze(
      queries, galleries, opts, ks=tuple(config.eval.ks),
      captions_per_image=setup.captions_per_image, seed=config.seed)
  results["analysis"]["gallery_reembedding_max_abs_diff"] = max_diff
  results_lib.write_results(setup, results, name="evaluate")
  if not sharding.is_lead_process():  # Every process computed; one writes.
    return results
  out = workdir_lib.results_dir(workdir)
  files.write_atomic(
      os.path.join(out, "evaluate.md"),
      reporting.results_markdown(results) + reporting.analysis_markdown(
          results["analysis"], plots_dir="plots", name="evaluate"))
  reporting.plot_analysis(results["analysis"], os.path.join(out, "plots"), "evaluate")
  return results
