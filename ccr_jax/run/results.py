"""Evaluation stage: every seen task's queries searched in the saved indices after
a task, the per-task rows aggregated into results.json, and the results files."""

import datetime
import importlib.metadata
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from ccr_jax import evaluation
from ccr_jax import files
from ccr_jax import indexing
from ccr_jax import losses
from ccr_jax import reporting
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax.run import indices as indices_lib
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import workdir as workdir_lib
from ccr_jax.run.setup import Setup


# Where a task's queries search: its own gallery; every gallery seen so far;
# every gallery seen when the task was learnt (tasks 1..j, whatever t is),
# which separates forgetting from the gallery's growth (`gallery_growth`).
AS_LEARNT = "task_agnostic_as_learnt"
SCOPES = ("task_aware", "task_agnostic", AS_LEARNT)
# index_recall_at_10: the index's top 10 against exact search's.
AGREEMENT_AT = 10


def scope_gallery_tasks(scope: str, t: int, j: int) -> list[int]:
  """The tasks (0-based) whose galleries task j's queries search after task t."""
  return {"task_aware": [j], "task_agnostic": list(range(t + 1)),
          AS_LEARNT: list(range(j + 1))}[scope]


def gallery_growth(metrics: dict) -> dict:
  """What the gallery's growth alone costs at the last task, per regime.

  For each old task j (learnt at task j, T tasks in all), with the final
  model: R@1 of its queries over the galleries of tasks 1..j minus over the
  galleries of tasks 1..T; the mean over old tasks. Task-agnostic
  forgetting splits exactly into this and `forgetting - gallery_growth`
  (the loss of the model at a fixed gallery, the gallery of 1..j):
    max_t R_t[j | 1..t] - R_T[j | 1..T]
      = (max_t R_t[j | 1..t] - R_T[j | 1..j]) + (R_T[j | 1..j] - R_T[j | 1..T]).

  Args:
    metrics: results.json's "metrics" ({regime: {scope: {direction: {name:
      [T][T] matrix}}}}).
  Returns:
    {regime: {"i2t_r1": float | None, "t2i_r1": ...}}: None with one task or
    where a matrix lacks the as-learnt scope (a run begun before it existed).
  """
  out: dict = {}
  for regime, scopes in metrics.items():
    for direction in ("i2t", "t2i"):
      value = None
      if AS_LEARNT in scopes and "task_agnostic" in scopes:
        learnt = scopes[AS_LEARNT][direction]["r1"]
        full = scopes["task_agnostic"][direction]["r1"]
        last = len(full) - 1
        gaps = [learnt[last][j] - full[last][j] for j in range(last)
                if learnt[last][j] is not None and full[last][j] is not None]
        value = float(np.mean(gaps)) if last > 0 and len(gaps) == last else None
      out.setdefault(regime, {})[f"{direction}_r1"] = value
  return out


def _gallery_snapshot(regime: str, t: int, j: int) -> int:
  """1-based snapshot whose embeddings form task j's gallery after task t (0-based)."""
  return j + 1 if regime == "fixed" else t + 1


def _text_to_image(query_owners, gallery_owners, direction) -> np.ndarray:
  """For each caption row, the row of its image on the other side (-1 if absent)."""
  images, captions = ((query_owners, gallery_owners) if direction == "i2t"
                      else (gallery_owners, query_owners))
  row_of = {int(i): r for r, i in enumerate(images)}
  return np.array([row_of.get(int(o), -1) for o in captions], np.int64)


def query_maps(setup: Setup, t: int, params: Any) -> Callable[[int, str], Callable | None]:
  """(gallery snapshot, query modality) -> the strategy's query map into that
  snapshot's space (`Strategy.adapt_queries`), or None: for the query snapshot
  t+1 itself and for strategies without one.

  Each map is fitted on task t's training items embedded by snapshot t+1
  (`params`) and by the gallery snapshot (loaded once), so evaluate mode
  recomputes it from the snapshots alone.
  """
  adapt = strategies.get_strategy(setup.config.strategy,
                                  losses.make_loss(setup.config.loss)).adapt_queries
  embedded: dict[int, dict[str, np.ndarray]] = {}
  maps: dict[tuple[int, str], Callable] = {}
  train = setup.encoded[t]["train"]

  def embed(snapshot):
    if snapshot not in embedded:
      p = params if snapshot == t + 1 else setup_lib.load_snapshot(setup, snapshot)[0]
      embedded[snapshot] = dict(zip(indices_lib.MODALITIES,
                                    setup_lib.embed_split(setup, p, train)))
    return embedded[snapshot]

  def get(snapshot, modality):
    if adapt is None or snapshot == t + 1:
      return None
    if (snapshot, modality) not in maps:
      maps[snapshot, modality] = adapt(embed(t + 1)[modality], embed(snapshot)[modality])
    return maps[snapshot, modality]

  return get


def _per_gallery_blocks(queries: list[np.ndarray], galleries: list[np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Embeddings whose dot products are queries[g] . galleries[g] for each gallery g.

  Queries `[Q, n * dim]` (each gallery's query version side by side) and
  galleries `[sum G_g, n * dim]` (gallery g's rows in block g, zeros
  elsewhere): exact ranking over the union, each part searched by its own
  query embedding, as `indexing.search_many` does with per-index queries.
  """
  dim = queries[0].shape[1]
  blocks = np.zeros((sum(len(g) for g in galleries), dim * len(galleries)), np.float32)
  row = 0
  for i, g in enumerate(galleries):
    blocks[row:row + len(g), i * dim:(i + 1) * dim] = g
    row += len(g)
  return np.concatenate(queries, axis=1), blocks


def evaluate_after_task(setup: Setup, t: int, params: Any,
                        queries: dict[int, dict] | None = None,
                        embeddings_dir: str | None = None,
                        index_cache: dict | None = None) -> dict:
  """Every metric on the test queries of tasks 0..t embedded by snapshot t+1.

  Queries are searched in indices loaded from disk: fixed (task j's gallery
  from snapshot j+1) and, with `index.reindex`, reindex (from snapshot t+1);
  task-aware (task j's gallery), task-agnostic (the union of every seen
  gallery, searched per index and merged by score) and task-agnostic as
  learnt (the union of the galleries of tasks 0..j, `AS_LEARNT`).

  Returns {regime: {scope: {direction: {str(j+1): metrics}}}} where metrics
  has r1, r5, r10 (from the index's top-k), exact_r1, exact_r5, exact_r10,
  medr, meanr (exact ranks over the same gallery embeddings, as the forgetting
  analysis computes them), index_recall_at_10 (the index's top-10 against
  exact search on the same embeddings) and, with `eval.fold_size`, the
  task-aware fold means fold_r1 ... fold_meanr (COCO-1K). A strategy with a
  query map (`query_maps`) has fixed-regime queries mapped into each old
  snapshot's space before they search its indices (the saved embeddings are
  then `_per_gallery_blocks`, whose dot products are the scores). With
  `embeddings_dir`, also writes the query and gallery embeddings of every
  evaluation and returns their manifest. `index_cache`: see
  `load_gallery_index`.
  """
  cfg = setup.config
  ks = tuple(cfg.eval.ks)
  # index_recall_at_10 needs the top 10 whatever the K values are.
  k = max(*ks, AGREEMENT_AT)
  cpi = setup.captions_per_image
  queries = queries or {}
  regimes = ("fixed", "reindex") if cfg.index.reindex else ("fixed",)
  index_cache = {} if index_cache is None else index_cache
  query_map = query_maps(setup, t, params)

  metrics: dict = {}
  manifest = []
  for j in range(t + 1):
    q = queries.get(j) or indices_lib.test_queries(setup, params, j)
    for regime in regimes:
      for scope in SCOPES:
        gallery_tasks = scope_gallery_tasks(scope, t, j)
        for direction, (qm, gm) in (("i2t", ("images", "texts")),
                                    ("t2i", ("texts", "images"))):
          if scope == AS_LEARNT and j == t:
            # The galleries seen when task j was learnt are every gallery now.
            metrics[regime].setdefault(scope, {}).setdefault(direction, {})[str(j + 1)] = (
                metrics[regime]["task_agnostic"][direction][str(j + 1)])
            continue
          indices = [indices_lib.load_gallery_index(setup, _gallery_snapshot(regime, t, g), g + 1, gm,
                                        index_cache)
                     for g in gallery_tasks]
          gallery_emb = np.concatenate([ix.embeddings for ix in indices])
          gallery_ids = np.concatenate([ix.item_ids for ix in indices])
          gallery_owner = evaluation.owner_of(gm, gallery_ids, cpi)
          query_emb, query_owner = q[qm]["emb"], q[qm]["owners"]
          maps = [query_map(_gallery_snapshot(regime, t, g), qm) for g in gallery_tasks]
          if any(m is not None for m in maps):
            per_index = [query_emb if m is None else m(query_emb) for m in maps]
            _, top_ids = indexing.search_many(indices, per_index, k)
            query_emb, gallery_emb = _per_gallery_blocks(
                per_index, [ix.embeddings for ix in indices])
          else:
            _, top_ids = indexing.search_many(indices, query_emb, k)
          ranks = evaluation.ranks_from_topk(evaluation.owner_of(gm, top_ids, cpi), query_owner)
          exact, exact_rows = evaluation.exact_metrics(
              query_emb, gallery_emb, query_owner, gallery_owner, ks, AGREEMENT_AT)
          agreement = np.mean([
              len(set(a) & set(b)) / AGREEMENT_AT for a, b in
              zip(top_ids[:, :AGREEMENT_AT].tolist(),
                  gallery_ids[exact_rows[:, :AGREEMENT_AT]].tolist())])
          m = {**evaluation.recall_at_k(ranks, ks), **exact,
               "index_recall_at_10": float(agreement)}
          if cfg.eval.fold_size and scope == "task_aware":
            # COCO-1K beside COCO-5K: the same embeddings, ranked per fold.
            m.update(evaluation.fold_metrics(
                query_emb, gallery_emb, query_owner, gallery_owner,
                setup.encoded[j][cfg.eval.split].ids, cfg.eval.fold_size, ks))
          metrics.setdefault(regime, {}).setdefault(scope, {}).setdefault(
              direction, {})[str(j + 1)] = m
          if embeddings_dir is not None:
            name = f"{direction}_q{t + 1}_{regime}_task{j + 1}_{scope}.npz"
            buf = _npz_bytes(query_emb=query_emb, gallery_emb=gallery_emb,
                             text_to_image=_text_to_image(query_owner, gallery_owner,
                                                          direction))
            workdir_lib.write_bytes(os.path.join(embeddings_dir, name), buf)
            manifest.append({
                "file": name, "direction": direction, "query_snapshot": t + 1,
                "gallery_snapshots": [_gallery_snapshot(regime, t, g)
                                      for g in gallery_tasks],
                "gallery_tasks": [g + 1 for g in gallery_tasks],
                "regime": regime, "task": j + 1, "scope": scope,
                **{f"r{kk}": m[f"r{kk}"] for kk in ks}})
  return {"metrics": metrics, "embeddings": manifest,
          "eval_settings": eval_settings(cfg)}


def cached_row(setup: Setup, t: int) -> dict | None:
  """Task t's saved results row if it can be reused as is, else None.

  It is reused only when it was computed with today's evaluation settings and
  every index its snapshot built is still intact (a deleted or truncated
  index is rebuilt and the row recomputed from the snapshot). Every process
  takes the same decision.
  """
  row_path = workdir_lib.row_path(setup.workdir, t + 1)
  row, reason = None, None
  if not os.path.exists(row_path):
    reason = "missing"
  else:
    try:
      row = files.read_json(row_path)
    except ValueError as e:  # Names the file, line and column.
      reason = str(e)
    if row is not None and row.get("eval_settings") != eval_settings(
        setup.config):
      reason = (f"computed with evaluation settings {row.get('eval_settings')}, "
                f"not today's {eval_settings(setup.config)}")
    if reason is None:
      damaged = indices_lib.damaged_indices(setup, t + 1)
      if damaged:
        reason = "an index of its snapshot is damaged: " + damaged[0]
  if not sharding.any_process(reason is not None):
    return row
  if reason != "missing":
    logging.warning("results row %s: %s; rebuilding what is missing and "
                    "recomputing it from snapshot %d.", row_path, reason, t + 1)
  return None


def _npz_bytes(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def eval_settings(config) -> dict:
  """The evaluation settings a results row's numbers depend on beyond the
  experiment's fingerprint: a cached row with other ones is recomputed."""
  return {"ks": [int(k) for k in config.eval.ks],
          "fold_size": int(config.eval.fold_size)}


def git_state(path: str) -> dict:
  """{"commit": full hash or None, "dirty": bool or None} of the checkout
  holding `path` (None outside a git checkout or without git)."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=path, capture_output=True,
                          text=True, check=True, timeout=10).stdout
  try:
    # Only tracked files count: a run's own outputs inside the checkout
    # (an untracked workdir) do not make the code dirty.
    return {"commit": git("rev-parse", "HEAD").strip(),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def provenance(started: float, timing: dict, argv: list[str] | None) -> dict:
  """What produced a results file: code, command, when, how long, on what.

  Args:
    started: time.time() when the run (this invocation) began.
    timing: seconds per stage of this invocation.
    argv: the command line (None: not known, e.g. called as a library).
  """
  return {
      **git_state(os.path.dirname(os.path.abspath(__file__))),
      "command_line": None if argv is None else " ".join(shlex.quote(a) for a in argv),
      "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
      "finished": datetime.datetime.now().isoformat(timespec="seconds"),
      "wall_s": round(time.time() - started, 3),
      "stage_s": {k: round(v, 3) for k, v in sorted(timing.items())},
      "devices": [str(d) for d in jax.devices()],
      "host": socket.gethostname(),
  }


def versions() -> dict:
  import flax, optax, orbax.checkpoint, scann, tensorflow_datasets  # noqa: E401
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": orbax.checkpoint.__version__,
          # scann has no __version__; the installed distribution says it.
          "scann": getattr(scann, "__version__", None) or _distribution_version("scann"),
          "tensorflow_datasets": tensorflow_datasets.__version__,
          "numpy": np.__version__}


def _distribution_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def aggregate(setup: Setup, rows: list[dict]) -> dict:
  """results.json's content from the per-task evaluation rows (in task order)."""
  num = len(rows)
  ks = tuple(setup.config.eval.ks)
  metrics: dict = {}
  for t, row in enumerate(rows):
    for regime, scopes in row["metrics"].items():
      for scope, directions in scopes.items():
        for direction, per_task in directions.items():
          for j_str, m in per_task.items():
            j = int(j_str) - 1
            for name, value in m.items():
              mat = metrics.setdefault(regime, {}).setdefault(scope, {}).setdefault(
                  direction, {}).setdefault(name, [[None] * num for _ in range(num)])
              mat[t][j] = value
  summary: dict = {}
  for regime, scopes in metrics.items():
    for scope, d in scopes.items():
      rsum = [[None if d["i2t"]["r1"][t][j] is None else
               sum(d[x][f"r{kk}"][t][j] for x in ("i2t", "t2i") for kk in ks)
               for j in range(num)] for t in range(num)]
      d["rsum"] = rsum
      summary.setdefault(regime, {})[scope] = {
          name: evaluation.continual_summary(
              np.array(mat, dtype=float))
          for name, mat in (("i2t_r1", d["i2t"]["r1"]), ("t2i_r1", d["t2i"]["r1"]),
                            ("rsum", rsum))}
  return {
      "config": json.loads(setup.config.to_json()),
      "task_split": setup.sequence.describe(),
      "vocabulary_size": setup.vocab.size,
      "truncated_captions": setup.truncated_captions,
      "tasks_completed": num,
      "metrics": metrics,
      "summary": summary,
      "gallery_growth": gallery_growth(metrics),
      "versions": versions(),
      "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind,
                  "processes": jax.process_count()},
  }


def write_results(setup: Setup, results: dict, name: str = "results") -> None:
  """results/<name>.json, <name>.md and the R@1 matrix plot (process 0 only)."""
  if not sharding.is_lead_process():
    return
  out = workdir_lib.results_dir(setup.workdir)
  files.write_json(os.path.join(out, f"{name}.json"), results)
  files.write_atomic(os.path.join(out, f"{name}.md"),
                     reporting.results_markdown(results))
  reporting.plot_r1_matrices(results, os.path.join(out, "plots", f"{name}_r1.png"))


def recall_scalars(row: dict, ks: tuple[int, ...]) -> dict:
  """A row's index recalls, nested for `progress.ScalarWriter.write`.

  Returns {"recall": {regime: {scope: {direction: {"task_<j>": {"r<k>": v}}}}}},
  which the writer flattens to names such as recall/fixed/task_aware/i2t/task_1/r1.
  """
  out: dict = {}
  for regime, scopes in row["metrics"].items():
    for scope, directions in scopes.items():
      for direction, per_task in directions.items():
        out.setdefault(regime, {}).setdefault(scope, {})[direction] = {
            f"task_{j}": {f"r{k}": m[f"r{k}"] for k in ks}
            for j, m in per_task.items()}
  return {"recall": out}


def log_row(t: int, row: dict) -> None:
  for regime, scopes in row["metrics"].items():
    aware = scopes["task_aware"]
    logging.info("after task %d, %s, task-aware R@1 i2t %s | t2i %s", t + 1, regime,
                 " ".join(f"{m['r1']:.1f}" for m in aware["i2t"].values()),
                 " ".join(f"{m['r1']:.1f}" for m in aware["t2i"].values()))


def console_summary(results: dict, workdir: str, mode: str = "train") -> str:
  """What a run prints at its end: R@1 final average and forgetting of both
  regimes and both scopes, where its outputs are, and the next commands."""
  lines = ["", f"{'regime':8s} {'scope':13s} {'i2t R@1 final':>14s} {'forgetting':>10s}"
           f" {'t2i R@1 final':>14s} {'forgetting':>10s}"]
  for regime, scopes in results["summary"].items():
    for scope in ("task_aware", "task_agnostic"):
      if scope not in scopes:
        continue
      cells = []
      for name in ("i2t_r1", "t2i_r1"):
        m = scopes[scope][name]
        cells += [_num(m.get("final_average"), 14), _num(m.get("forgetting"), 10)]
      lines.append(f"{regime:8s} {scope.replace('_', '-'):13s} " + " ".join(cells))
  out = workdir_lib.results_dir(workdir)
  name = "results" if mode == "train" else "evaluate"
  commands = [("report", "report.md with every table and plot")]
  if mode == "train":
    commands.insert(0, ("evaluate", "forgetting analysis"))
  lines += [
      "",
      f"results:     {os.path.join(out, name + '.json')} (tables: {name}.md)",
      f"plots:       {os.path.join(out, 'plots')}",
      "tensorboard: tensorboard --logdir "
      + shlex.quote(os.path.join(workdir, "logs", "tensorboard")),
  ]
  for i, (next_mode, what) in enumerate(commands):
    lines.append(("next:        " if i == 0 else " " * 13)
                 + f"python -m ccr_jax.main --mode={next_mode} --workdir="
                 + shlex.quote(workdir) + f"   ({what})")
  return "\n".join(lines)


def _num(value: float | None, width: int) -> str:
  return f"{'-':>{width}s}" if value is None else f"{value:{width}.1f}"
