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
  tasks = range(1, snapshot + 1) if setup.config.index.reindex else [snapshot]
  built = []
  for task in tasks:
    emb = None
    for modality in MODALITIES:
      path = workdir_lib.index_dir(setup.workdir, snapshot, task, modality)
      if (sharding.is_lead_process() and
          not os.path.exists(os.path.join(path, "metadata.json"))):
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
