"""Forgetting analysis from a workdir's snapshots and indices (no retraining).

Where does a continual retrieval model forget? Four instruments, all read off
one table of embeddings: every task's test items embedded by every snapshot
that has seen the task (queries: freshly embedded; galleries: the embeddings
the saved index holds when one exists, else freshly embedded).

* Compatibility `C_j[q][g]`: Recall@K on task j with queries embedded by
  snapshot q against the gallery embedded by snapshot g. Its diagonal is the
  reindex regime and its column g = j the fixed regime, so both regimes are
  entries of this one computation (`evaluation.exact_metrics`, the
  function `run.results.evaluate_after_task` calls for its exact ranks).
* Tower attribution `A_j[a][b]`: the image tower of snapshot a paired with the
  text tower of snapshot b. In a dual encoder a query is embedded by one tower
  and the gallery by the other, so A is C arranged by tower instead of by role
  (i2t: A[a][b] = C[a][b]; t2i: A[a][b] = C[b][a]); tests check this against
  models assembled from two snapshots' towers.
* Drift and alignment: the mean cosine between old and new embeddings of the
  same items (per modality), the mean positive-pair cosine, and uniformity
  (Wang & Isola, 2020), with how they track the fixed and reindex recalls.
* Partial reindexing: a fraction of an old gallery re-embedded with the newest
  snapshot (chosen at random or by largest drift), from 0 % (fixed) to 100 %
  (reindex). Its ends are C_j[T][j] and C_j[T][T] exactly.

All recalls here are exact (brute-force ranks of the gallery embeddings): an
index only approximates them, and a mixed gallery has no index. They equal
the `exact_r*` metrics of results.json; the regimes' `r*` come from the index
(identical under 10k items, where ScaNN scores by brute force).

Indices in JSON: tasks and snapshots are 1-based keys/labels; matrices are
lists indexed from 0, with None where a snapshot has not yet seen the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ccr_jax import evaluation
from ccr_jax import schema

DIRECTIONS = {"i2t": ("images", "texts"), "t2i": ("texts", "images")}
DEFAULTS = {
    "budgets": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
    "policies": ("random", "drift"),
    # Random orders per (old task, budget): the curve is their mean and the
    # spread over draws shows how much one draw can mislead.
    "draws": 5,
    "uniformity_t": 2.0,
    # Uniformity averages over all pairs: a fixed subset bounds its cost
    # ([n, n] scores) at COCO-5K's 25k captions.
    "uniformity_items": 2048,
}
POLICIES = ("random", "drift")


def config_keys() -> dict[str, schema.Key]:
  """The `analysis` config section (--mode=evaluate), `DEFAULTS` with their meaning."""
  docs = {"budgets": "fractions of each old gallery re-embedded by the newest snapshot",
          "policies": f"how the re-embedded items are chosen: {', '.join(POLICIES)}",
          "draws": "random orders per old task and budget (policy 'random'); "
                   "curves are their mean, with the std over draws",
          "uniformity_t": "the temperature t of the uniformity loss (Wang & Isola)",
          "uniformity_items": "items per task the uniformity averages over (a fixed "
                              "seeded subset bounds its [n, n] cost)"}
  return {k: schema.Key(v, docs[k]) for k, v in DEFAULTS.items()}


def settings(section) -> dict:
  """The checked settings of a complete `analysis` config section (every key
  of `config_keys()` present: `schema.complete` fills them where it is loaded).

  Raises:
    ValueError: an unknown key, a budget outside [0, 1] or an unknown policy.
  """
  out = dict(section)
  unknown = sorted(set(out) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.analysis keys {unknown}; valid: {sorted(DEFAULTS)}.")
  budgets = [float(b) for b in out["budgets"]]
  if not budgets or any(not 0.0 <= b <= 1.0 for b in budgets):
    raise ValueError(f"config.analysis.budgets={out['budgets']}: give fractions in "
                     "[0, 1], e.g. (0, 0.5, 1).")
  if not isinstance(out["draws"], int) or out["draws"] < 1:
    raise ValueError(f"config.analysis.draws={out['draws']}: give an integer >= 1.")
  bad = [p for p in out["policies"] if p not in POLICIES]
  if bad:
    raise ValueError(f"config.analysis.policies has {bad}; valid: {list(POLICIES)}.")
  return {**out, "budgets": sorted(set(budgets)), "policies": list(out["policies"])}


# ------------------------------------------------------------ pure metrics


def item_cosines(old, new) -> np.ndarray:
  """Per-item cosine between two embeddings of the same items.

  Args:
    old, new: float [N, dim], rows in the same item order (unit norm or not).

  Returns:
    float64 [N].
  """
  old = np.asarray(old, np.float64)
  new = np.asarray(new, np.float64)
  if old.shape != new.shape:
    raise ValueError(f"drift needs the same items on both sides, got {old.shape} "
                     f"and {new.shape}.")
  norms = np.linalg.norm(old, axis=1) * np.linalg.norm(new, axis=1)
  return np.sum(old * new, axis=1) / np.maximum(norms, 1e-30)


def alignment(image_emb, text_emb, image_ids, text_owner) -> float:
  """Mean cosine between each caption and its image (positive pairs).

  Args:
    image_emb: float [N, dim]; text_emb: float [M, dim], unit norm.
    image_ids: int [N]; text_owner: int [M], the image id of each caption.
  """
  row_of = {int(i): r for r, i in enumerate(np.asarray(image_ids))}
  rows = np.array([row_of[int(o)] for o in np.asarray(text_owner)], np.int64)
  return float(np.mean(item_cosines(np.asarray(image_emb)[rows], text_emb)))


def uniformity(emb, t: float = 2.0) -> float:
  """log mean_{i != j} exp(-t ||x_i - x_j||^2) (Wang & Isola, 2020); lower = more uniform.

  Args:
    emb: float [N, dim], N >= 2, unit norm.
    t: the kernel's scale (2 in the paper).
  """
  x = np.asarray(emb, np.float64)
  n = x.shape[0]
  if n < 2:
    raise ValueError("uniformity needs at least 2 items")
  sq = np.sum(x * x, axis=1)
  dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
  k = np.exp(-t * dist)
  return float(np.log((k.sum() - np.trace(k)) / (n * (n - 1))))


def reindex_order(old, new, policy: str, seed: int) -> np.ndarray:
  """The order in which gallery items are re-embedded under a budget.

  Args:
    old, new: float [N, dim], the gallery embedded by the old and new snapshot.
    policy: 'random' (a seeded permutation) or 'drift' (smallest old/new
      cosine first; ties keep item order).
    seed: for 'random'.

  Returns:
    int64 [N], a permutation of the rows: a budget b re-embeds the first
    round(b * N).
  """
  if policy == "random":
    return np.random.default_rng(seed).permutation(len(old)).astype(np.int64)
  if policy == "drift":
    return np.argsort(item_cosines(old, new), kind="stable").astype(np.int64)
  raise ValueError(f"unknown reindexing policy {policy!r}; valid: {list(POLICIES)}.")


def mixed_gallery(old, new, order, budget: float) -> np.ndarray:
  """The gallery with the first round(budget * N) rows of `order` re-embedded.

  Args:
    old, new: float [N, dim]; order: int [N] (`reindex_order`); budget in [0, 1].

  Returns:
    float32 [N, dim]: `new` rows where re-embedded, `old` rows elsewhere.
  """
  take = np.zeros(len(old), bool)
  take[np.asarray(order)[:int(round(budget * len(old)))]] = True
  return np.where(take[:, None], new, old).astype(np.float32)


def pearson(x, y) -> float | None:
  """Pearson correlation of two equal-length sequences (None if undefined)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return None
  return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------ the workdir


def _matrix(num: int) -> list[list[Any]]:
  return [[None] * num for _ in range(num)]


def analyze(queries: dict, galleries: dict, opts: dict, *, ks: Sequence[int],
            captions_per_image: int, seed: int) -> dict:
  """Every instrument of the module docstring, for snapshots 1..T.

  Args:
    queries: {(j, s): task j's evaluation items embedded by snapshot s} for
      s >= j (1-based), each {"images" | "texts": {"emb" [N, D], "item_ids"
      [N], "owners" [N]}}.
    galleries: {(j, s, modality): (emb float32 [N, D], item_ids int64 [N])},
      task j's gallery as embedded by snapshot s (`run.evaluate.embed_all`).
    opts: `settings(config)`.
    ks: the recall cut-offs (config.eval.ks).
    captions_per_image: captions of each image (caption ids are id * C + c).
    seed: the experiment's seed (uniformity subsets, random reindexing order).

  Returns:
    {"compatibility", "towers", "attribution", "drift", "partial_reindex",
     "settings"}; see README "Forgetting analysis".
  """
  num = max(s for _, s in queries)
  ks = tuple(ks)
  cpi = captions_per_image

  def gallery(tasks, g, modality):
    embs, ids = zip(*(galleries[(j, g, modality)] for j in tasks))
    ids = np.concatenate(ids)
    return np.concatenate(embs), evaluation.owner_of(modality, ids, cpi)

  compatibility: dict = {}
  for scope in ("task_aware", "task_agnostic"):
    for direction, (qm, gm) in DIRECTIONS.items():
      per_task = compatibility.setdefault(scope, {}).setdefault(direction, {})
      for j in range(1, num + 1):
        mats: dict = {}
        for q in range(j, num + 1):
          query = queries[(j, q)][qm]
          tasks = [j] if scope == "task_aware" else list(range(1, q + 1))
          for g in range(j, num + 1):
            if scope == "task_agnostic" and g < q:
              # Tasks j+1..q have no embedding by snapshot g < their own; the
              # agnostic gallery is only defined once g has seen them all.
              continue
            emb, owner = gallery(tasks, g, gm)
            m, _ = evaluation.exact_metrics(query["emb"], emb, query["owners"], owner, ks)
            for name, v in m.items():
              mats.setdefault(name, _matrix(num))[q - 1][g - 1] = v
        per_task[str(j)] = mats

  aware = compatibility["task_aware"]
  towers: dict = {}
  for direction in DIRECTIONS:
    towers[direction] = {}
    for j in range(1, num + 1):
      c = aware[direction][str(j)]
      towers[direction][str(j)] = {
          name: [[mat[a][b] if direction == "i2t" else mat[b][a]
                  for b in range(num)] for a in range(num)]
          for name, mat in c.items()}
  r1 = f"exact_r{ks[0]}"
  attribution = []
  for j in range(1, num + 1):
    for direction in DIRECTIONS:
      a = towers[direction][str(j)][r1]
      attribution.append({
          "task": j, "direction": direction, "metric": r1,
          "own": a[j - 1][j - 1], "new_image_tower": a[num - 1][j - 1],
          "new_text_tower": a[j - 1][num - 1], "both_new": a[num - 1][num - 1]})

  drift = _drift(queries, num, opts, seed)
  tracking = []
  for j in range(1, num + 1):
    for s in range(j, num + 1):
      row = {"task": j, "snapshot": s,
             "image_cosine": drift["images"][str(j)][j - 1][s - 1],
             "text_cosine": drift["texts"][str(j)][j - 1][s - 1],
             "alignment": drift["alignment"][str(j)][s - 1],
             "image_uniformity": drift["uniformity"]["images"][str(j)][s - 1],
             "text_uniformity": drift["uniformity"]["texts"][str(j)][s - 1]}
      for direction in DIRECTIONS:
        mat = aware[direction][str(j)][r1]
        row[f"fixed_{direction}_{r1}"] = mat[s - 1][j - 1]
        row[f"reindex_{direction}_{r1}"] = mat[s - 1][s - 1]
      tracking.append(row)
  later = [r for r in tracking if r["snapshot"] > r["task"]]
  correlations = {"points": len(later)}
  for direction in DIRECTIONS:
    own = {j: aware[direction][str(j)][r1][j - 1][j - 1] for j in range(1, num + 1)}
    for regime in ("fixed", "reindex"):
      drop = [own[r["task"]] - r[f"{regime}_{direction}_{r1}"] for r in later]
      for key in ("image_cosine", "text_cosine", "alignment"):
        correlations[f"{key}_vs_{regime}_{direction}_drop"] = pearson(
            [r[key] for r in later], drop)
  drift["tracking"] = tracking
  drift["correlations"] = correlations

  partial = _partial_reindex(queries, galleries, num, ks, cpi, opts, seed)
  return {"compatibility": compatibility, "towers": towers, "attribution": attribution,
          "drift": drift, "partial_reindex": partial,
          "settings": {k: list(v) if isinstance(v, (list, tuple)) else v
                       for k, v in opts.items()}}


def _drift(queries, num: int, opts: dict, seed: int) -> dict:
  out: dict = {"images": {}, "texts": {}, "alignment": {},
               "uniformity": {"images": {}, "texts": {}}}
  for j in range(1, num + 1):
    for modality in ("images", "texts"):
      mat = _matrix(num)
      for a in range(j, num + 1):
        for b in range(j, num + 1):
          mat[a - 1][b - 1] = float(np.mean(item_cosines(
              queries[(j, a)][modality]["emb"], queries[(j, b)][modality]["emb"])))
      out[modality][str(j)] = mat
      n = len(queries[(j, j)][modality]["emb"])
      subset = np.sort(np.random.default_rng([seed, j]).permutation(n)[
          :opts["uniformity_items"]])
      out["uniformity"][modality][str(j)] = [
          None if s < j else uniformity(queries[(j, s)][modality]["emb"][subset],
                                        opts["uniformity_t"])
          for s in range(1, num + 1)]
    out["alignment"][str(j)] = [
        None if s < j else alignment(
            queries[(j, s)]["images"]["emb"], queries[(j, s)]["texts"]["emb"],
            queries[(j, s)]["images"]["item_ids"], queries[(j, s)]["texts"]["owners"])
        for s in range(1, num + 1)]
  return out


def _partial_reindex(queries, galleries, num: int, ks, cpi: int, opts: dict,
                     seed: int) -> dict:
  """Recall of old task galleries partly re-embedded by the last snapshot.

  Per policy and direction: curves[str(j)][metric] [budgets] for old task j
  (the mean over `opts["draws"]` random orders; the drift order is one),
  "mean" over old tasks and, with several draws, "std": the sample std over
  draws of the old-task mean. Draw 0 uses the order of a single-draw run.
  """
  out: dict = {"query_snapshot": num, "budgets": opts["budgets"], "curves": {},
               "draws": {p: (opts["draws"] if p == "random" else 1)
                         for p in opts["policies"]}}
  r_names = [f"exact_r{k}" for k in ks]
  budgets = opts["budgets"]
  for policy in opts["policies"]:
    draws = out["draws"][policy]
    for direction, (qm, gm) in DIRECTIONS.items():
      # [draw, old task, budget] per metric.
      values = {name: np.zeros((draws, max(num - 1, 0), len(budgets)))
                for name in r_names}
      for j in range(1, num):
        old, ids = galleries[(j, j, gm)]
        new, new_ids = galleries[(j, num, gm)]
        if not np.array_equal(ids, new_ids):
          raise ValueError(f"task {j}'s {gm} galleries of snapshots {j} and {num} "
                           "hold different items; rebuild the indices.")
        query = queries[(j, num)][qm]
        owner = evaluation.owner_of(gm, ids, cpi)
        for d in range(draws):
          order = reindex_order(old, new, policy, seed=seed + j + 1000 * d)
          for b, budget in enumerate(budgets):
            m, _ = evaluation.exact_metrics(
                query["emb"], mixed_gallery(old, new, order, budget),
                query["owners"], owner, ks)
            for name in r_names:
              values[name][d, j - 1, b] = m[name]
      curves = {str(j): {name: values[name][:, j - 1].mean(axis=0).tolist()
                         for name in r_names} for j in range(1, num)}
      if curves:
        curves["mean"] = {name: values[name].mean(axis=(0, 1)).tolist()
                          for name in r_names}
        if draws > 1:
          curves["std"] = {name: values[name].mean(axis=1).std(axis=0, ddof=1).tolist()
                           for name in r_names}
      out["curves"].setdefault(policy, {})[direction] = curves
  return out
