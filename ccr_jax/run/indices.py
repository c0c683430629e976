"""Indexing stage: embed a task's evaluation items, build each snapshot's indices,
and load saved ones checked against what they should hold."""

import os
from typing import Any

import numpy as np

from ccr_jax import indexing
from ccr_jax import sharding
from ccr_jax.data import pipeline
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import workdir as workdir_lib

MODALITIES = ("images", "texts")


def test_queries(setup: setup_lib.Setup, params: Any,
                 j: int) -> dict[str, dict[str, np.ndarray]]:
  """Task j's (0-based) evaluation images and captions embedded with `params`.

  The split is `eval.split`: 'test' for reported numbers, 'val' to choose
  hyperparameters (strategy strengths) without looking at the test set.

  Returns {"images": {"emb" [N, D], "item_ids" [N], "owners" [N]},
           "texts": {"emb" [C*N, D], "item_ids" [C*N], "owners" [C*N]}}.
  """
  test = setup.encoded[j][setup.config.eval.split]
  caps = pipeline.caption_arrays(test)
  images, texts = setup_lib.embed_split(setup, params, test)
  return {
      "images": {"emb": images, "item_ids": test.ids, "owners": test.ids},
      "texts": {"emb": texts, "item_ids": caps["item_ids"], "owners": caps["owners"]},
  }


def build_indices(setup: setup_lib.Setup, snapshot: int, params: Any,
                  queries: dict[int, dict] | None = None) -> list[dict]:
  """Builds (or keeps, when complete on disk) the indices of snapshot `snapshot`.

  The gallery of task `snapshot` always (the fixed regime's index); with
  `index.reindex`, every earlier task's gallery too. Returns their metadata.
  Process 0 builds and saves them (every process holds the same embeddings);
  the others wait until they are on disk.
  """
  built = []
  for task in _indexed_tasks(setup, snapshot):
    emb = None
    for modality in MODALITIES:
      path = workdir_lib.index_dir(setup.workdir, snapshot, task, modality)
      if sharding.is_lead_process() and index_problem(setup, snapshot, task,
                                                      modality) is not None:
        if emb is None:
          emb = (queries or {}).get(task - 1) or test_queries(setup, params, task - 1)
        index = indexing.build_index(
            emb[modality]["emb"], emb[modality]["item_ids"],
            backend=setup.config.index.backend, snapshot=snapshot, task=task,
            modality=modality)
        indexing.save_index(index, path)
      built.append({"snapshot": snapshot, "task": task, "modality": modality,
                    "path": os.path.relpath(path, setup.workdir)})
  sharding.sync(f"indices of snapshot {snapshot} built")
  return built


def _indexed_tasks(setup: setup_lib.Setup, snapshot: int) -> list[int]:
  return (list(range(1, snapshot + 1)) if setup.config.index.reindex
          else [snapshot])


def index_problem(setup: setup_lib.Setup, snapshot: int, task: int,
                  modality: str) -> str | None:
  """Why the saved index of (snapshot, task, modality) cannot be used as is
  (missing, incomplete, corrupt: checked file by file against its manifest,
  with checksums), or None when it is intact."""
  try:
    load_gallery_index(setup, snapshot, task, modality)
  except indexing.IndexMismatchError as e:
    return str(e)
  return None


def damaged_indices(setup: setup_lib.Setup, snapshot: int) -> list[str]:
  """The problems of the indices snapshot `snapshot` should have built (its
  own task's gallery; every earlier one too with `index.reindex`), one line
  each; empty when all are intact. A resumed run rebuilds these."""
  return [problem for task in _indexed_tasks(setup, snapshot) for modality in MODALITIES
          if (problem := index_problem(setup, snapshot, task, modality)) is not None]


def load_gallery_index(setup: setup_lib.Setup, snapshot: int, task: int, modality: str,
                       cache: dict | None = None,
                       expect_item_ids: np.ndarray | None = None) -> indexing.Index:
  """The saved index of task `task`'s gallery embedded by `snapshot`, checked.

  Args:
    cache: when given, {(snapshot, task, modality): Index}; an index already in
      it is returned as is, a loaded one is added (one load, with checksums,
      per index however many evaluations search it).
    expect_item_ids: int [count], checked against the index's ids on load.

  Raises:
    IndexMismatchError: the index is missing, corrupt, or not the one expected.
  """
  key = (snapshot, task, modality)
  if cache is not None and key in cache:
    return cache[key]
  index = indexing.load_index(
      workdir_lib.index_dir(setup.workdir, snapshot, task, modality),
      expect_snapshot=snapshot, expect_task=task, expect_modality=modality,
      expect_dim=setup.config.model.embed_dim, expect_item_ids=expect_item_ids)
  if cache is not None:
    cache[key] = index
  return index
