"""The continual experiment: train task by task, snapshot, index, evaluate.

The only module that knows the order of the stages (DESIGN.md). Every stage
leaves its output on disk (snapshot, indices, a results row per task), and
rerunning the same command skips what is complete and resumes the rest, so a
killed run loses at most `train.checkpoint_every` steps.

Multi-process runs (every process runs this same code over one global mesh):
every process reads only its rows of each batch and takes part in training,
embedding and Orbax saves; process 0 alone renders the data first, builds the
indices and writes config.json, result rows, embeddings and results, and the
others wait for it where they read what it wrote (`sharding.sync`). Every
process evaluates the same embeddings in the same indices, so every process
returns the same results. The workdir must be on a filesystem all processes see.
"""

import json
import os
import time
from collections.abc import Callable

import ml_collections
from absl import logging

from ccr_jax import checkpoints
from ccr_jax import progress
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.run import config as config_lib
from ccr_jax.run import indices as indices_lib
from ccr_jax.run import pretrain as pretrain_lib
from ccr_jax.run import results as results_lib
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import training as training_lib
from ccr_jax.run import workdir as workdir_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       should_stop: Callable[[], bool] | None = None,
                       argv: list[str] | None = None) -> dict:
  """Runs (or resumes) the whole continual experiment; returns results.json's content.

  Everything that can be checked before training is, before anything is
  written: a config that fails leaves a new workdir as it was (no config.json
  that would refuse the corrected rerun). One run at a time holds the workdir
  (`workdir.locked`).

  Args:
    should_stop: polled between training steps (main's SIGINT/SIGTERM flag);
      when true the state is checkpointed and `train.Interrupted` raised.
    argv: the command line, recorded in results.json's provenance.
  """
  started = time.time()
  config_lib.validate_config(config)
  config = config_lib.complete(config)
  workdir_lib.check_config(config, workdir, config_lib.complete, write=False)
  with workdir_lib.locked(workdir):
    with workdir_lib.nothing_left_on_error(workdir):
      timing: dict[str, float] = {}
      start = time.perf_counter()
      setup = setup_lib.build_setup(config, workdir)
      warnings = config_lib.config_warnings(config) + setup_lib.check_setup(setup)
      timing["data_s"] = time.perf_counter() - start
      workdir_lib.check_config(config, workdir, config_lib.complete)
    for warning in warnings:
      logging.warning("%s", warning)
    return _run(setup, timing, started, should_stop, argv)


def _run(setup: setup_lib.Setup, timing: dict, started: float,
         should_stop: Callable[[], bool] | None, argv: list[str] | None) -> dict:
  config, workdir = setup.config, setup.workdir

  def timed(stage, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
    return out

  training = training_lib.build_training(setup)
  strategy = training.strategy
  template = training.state_template(setup)
  done = setup_lib.verified_snapshots(setup, template)
  emb_dir = (os.path.join(workdir, "embeddings") if config.eval.save_embeddings
             else None)
  rows, manifest, params, state = [], [], None, None
  # Process 0 appends to logs/scalars.jsonl and logs/tensorboard/; a no-op on
  # other processes. Closed however the run ends (its events flushed).
  with progress.ScalarWriter(workdir) as writer:
    writer.write_config(json.loads(config.to_json()))
    for t in range(setup.num_tasks):
      if t + 1 in done:
        params = None  # Loaded below only if this task's later stages are missing.
      else:
        if params is None:
          if t == 0:
            params = setup_lib.initial_params(setup)
            if pretrain_lib.enabled(config):  # Trained once; a rerun restores it.
              params = timed("pretrain_s", pretrain_lib.pretrained_params, setup, params)
            state = (strategy.init_state(params, training.context)
                     if template is not None else None)
          else:
            params, state = setup_lib.load_snapshot(setup, t, template)
        params, state = timed("train_s", training_lib.train_one_task, setup, training,
                              t, params, state, writer, should_stop=should_stop)
        state = timed("strategy_s", training_lib.end_of_task, training, t, params, state)
        timed("snapshot_s", checkpoints.save_snapshot,
              workdir, t + 1, params, setup_lib.snapshot_meta(setup, t + 1),
              strategy=state)
      row_path = workdir_lib.row_path(workdir, t + 1)
      cached = results_lib.cached_row(setup, t) if emb_dir is None else None
      if cached is not None:
        rows.append(cached)
        continue
      _stop_point(should_stop, f"indexing and evaluating task {t + 1}")
      if params is None:
        params, _ = setup_lib.load_snapshot(setup, t + 1)
      queries = {j: timed("embed_s", indices_lib.test_queries, setup, params, j)
                 for j in range(t + 1)}
      timed("index_s", indices_lib.build_indices, setup, t + 1, params, queries)
      row = timed("evaluate_s", results_lib.evaluate_after_task, setup, t, params,
                  queries, emb_dir)
      manifest += row.pop("embeddings")
      # Before the row file: a kill in between rewrites the same values at the
      # same step on resume (read_scalars keeps one), never loses them.
      writer.write((t + 1) * config.train.steps_per_task,
                   results_lib.recall_scalars(row, tuple(config.eval.ks)))
      workdir_lib.write_json(row_path, row)
      rows.append(row)
      results_lib.log_row(t, row)
    _stop_point(should_stop, "writing the results")
    results = results_lib.aggregate(setup, rows)
    results["strategy"] = training_lib.describe_strategy(setup, strategy)
    if "compile_s" in training.compiled:
      # Compiled inside the first trained task: report it as its own stage.
      timing["compile_s"] = training.compiled["compile_s"]
      timing["train_s"] -= timing["compile_s"]
    results["provenance"] = results_lib.provenance(started, timing, argv)
    timed("report_s", results_lib.write_results, setup, results)
    if emb_dir is not None:
      workdir_lib.write_json(os.path.join(emb_dir, "manifest.json"), manifest)
    workdir_lib.write_json(os.path.join(workdir_lib.results_dir(workdir), "timing.json"),
                           timing)
    writer.write_summary(results["summary"], setup.num_tasks * config.train.steps_per_task)
  return results


def _stop_point(should_stop: Callable[[], bool] | None, stage: str) -> None:
  """Raises `train.Interrupted` before `stage` when a stop was requested
  (any process: every process calls this at the same point). Training polls
  between steps; this makes a signal during indexing or evaluation stop the
  run too, instead of being acknowledged and ignored."""
  if should_stop is not None and sharding.any_process(bool(should_stop())):
    raise train_lib.Interrupted(0, 0, saved=False, stage=stage)
