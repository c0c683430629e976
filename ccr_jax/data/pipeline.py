"""Batches for one host: caption encoding, deterministic training batches, query arrays.

Training batches are a pure function of (seed, task, step): an epoch is a
permutation of every (image, caption) pair of the pool, so a resumed run
draws exactly the batches an uninterrupted run would have drawn. In a
multi-process run every process computes the same global batch's pair indices
(cheap) and reads the images of its own rows only (`rows`), so the global
batch is the same whatever the process count.
"""

import concurrent.futures
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Sequence

import numpy as np

from ccr_jax.data import tasks
from ccr_jax.data.tasks import Split
from ccr_jax.data.text import Vocabulary


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
  """A split with its captions tokenised.

  Attributes:
    images: [num_images, H, W, 3] uint8 pixels (or [num_images, ...] features),
      a NumPy array or a `tasks.LazyImages` that reads rows on indexing.
    tokens: [num_images, captions_per_image, max_len] int32 token ids.
    lengths: [num_images, captions_per_image] int32 true lengths.
    ids: [num_images] int64 stable image ids.
  """
  images: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray
  ids: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def captions_per_image(self) -> int:
    return self.tokens.shape[1]


def encode_split(split: Split, vocab: Vocabulary, max_len: int) -> tuple[EncodedSplit, int]:
  """Tokenises every caption of `split`; returns it and the number truncated."""
  per_image = {len(c) for c in split.captions}
  if len(per_image) != 1:
    raise ValueError(
        f"every image needs the same number of captions, found {sorted(per_image)}; "
        "keep the first 5 captions per image as the Karpathy splits do.")
  (c,) = per_image
  flat = [caption for caps in split.captions for caption in caps]
  tokens, lengths, truncated = vocab.encode(flat, max_len)
  n = len(split.ids)
  return EncodedSplit(
      images=split.images, tokens=tokens.reshape(n, c, max_len),
      lengths=lengths.reshape(n, c), ids=np.asarray(split.ids, np.int64)), truncated


def concatenate(parts: Sequence[EncodedSplit]) -> EncodedSplit:
  """One EncodedSplit holding `parts` in order (a pool over several tasks)."""
  # Lazily read images stay lazy: a real dataset's pool does not fit in RAM.
  return EncodedSplit(*(
      tasks.concatenate_images([p.images for p in parts]) if f.name == "images"
      else np.concatenate([getattr(p, f.name) for p in parts])
      for f in dataclasses.fields(EncodedSplit)))


def _pair_indices(pool: EncodedSplit, batch_size: int, *, seed: int, task: int,
                  step: int) -> tuple[np.ndarray, np.ndarray]:
  """(image rows [batch], caption indices [batch]) of `train_batch`'s pairs."""
  c = pool.captions_per_image
  num_pairs = len(pool) * c
  positions = step * batch_size + np.arange(batch_size)
  epochs, within = np.divmod(positions, num_pairs)
  pairs = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, task, int(epoch)]).permutation(num_pairs)
    sel = epochs == epoch
    pairs[sel] = perm[within[sel]]
  return np.divmod(pairs, c)


def _gather(split: EncodedSplit, rows: np.ndarray, caps: np.ndarray,
            id_offset: int = 0) -> dict[str, np.ndarray]:
  return {
      "images": split.images[rows],
      "tokens": split.tokens[rows, caps],
      "lengths": split.lengths[rows, caps],
      "image_ids": (rows + id_offset).astype(np.int32),
  }


def train_batch(pool: EncodedSplit, batch_size: int, *, seed: int, task: int,
                step: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """The training batch number `step` (0-based, within `task`) drawn from `pool`.

  Args:
    rows: which rows of the global batch to read (a process's
      `sharding.process_rows`); the batch itself depends only on `batch_size`,
      `seed`, `task` and `step`, never on how many processes share it.
  Returns a dict of host arrays (with `rows`, those rows of each):
    images: [batch, H, W, 3]; tokens: [batch, max_len] int32;
    lengths: [batch] int32; image_ids: [batch] int32, the row of each pair's
    image in `pool` (pairs with equal ids share an image: not negatives).
  """
  image_rows, caps = _pair_indices(pool, batch_size, seed=seed, task=task, step=step)
  return _gather(pool, image_rows[rows], caps[rows])


def caption_arrays(split: EncodedSplit) -> dict[str, np.ndarray]:
  """Every caption of `split` as a flat query/gallery set.

  Returns tokens [num_captions, max_len], lengths [num_captions],
  item_ids [num_captions] (image id * captions_per_image + caption index, unique)
  and owners [num_captions] (the id of each caption's image).
  """
  n, c, max_len = split.tokens.shape
  return {
      "tokens": split.tokens.reshape(n * c, max_len),
      "lengths": split.lengths.reshape(n * c),
      "item_ids": (split.ids[:, None] * c + np.arange(c)[None, :]).reshape(-1),
      "owners": np.repeat(split.ids, c),
  }


def subset(split: EncodedSplit, rows: np.ndarray) -> EncodedSplit:
  """The images `rows` of `split` with all their captions."""
  return EncodedSplit(*(
      tasks.take_rows(split.images, rows) if f.name == "images"
      else getattr(split, f.name)[rows]
      for f in dataclasses.fields(EncodedSplit)))


def mixed_batch(pool: EncodedSplit, memory: EncodedSplit | None, batch_size: int,
                ratio: float, *, seed: int, task: int, step: int,
                rows: slice = slice(None), with_slots: bool = False,
                memory_batch: int = 0) -> dict[str, np.ndarray]:
  """A training batch whose last round(ratio * batch) pairs come from `memory`.

  The current-task part follows `train_batch`'s epochs over `pool`; memory
  pairs (image, caption) are drawn uniformly from their own stream. Memory
  image ids are offset by len(pool): they are other images than the pool's.
  Without a memory (first task) the whole batch comes from `pool`. `rows`
  selects rows of the global batch, as in `train_batch`.

  With `memory_batch` > 0 (ratio 0) and a memory, the batch is instead
  batch_size current pairs (exactly `train_batch`'s) followed by
  memory_batch memory pairs: batch_size + memory_batch rows.

  With `with_slots`, the batch also has memory_slot int32 [batch]: for memory
  pairs, row * captions_per_image + caption within `memory`; -1 for the
  pool's (and every row without a memory), so the batch has the same keys
  whether or not a memory exists yet.
  """
  has_memory = memory is not None and len(memory) > 0
  if memory_batch and ratio:
    raise ValueError(f"a memory fills either a ratio of the batch ({ratio}) or a "
                     f"batch of its own ({memory_batch} pairs), not both.")
  n_memory = (memory_batch or int(round(ratio * batch_size))) if has_memory else 0
  n_pool = batch_size if memory_batch else batch_size - n_memory
  if not n_memory:
    batch = train_batch(pool, batch_size, seed=seed, task=task, step=step, rows=rows)
    if with_slots:
      batch["memory_slot"] = np.full(len(batch["image_ids"]), -1, np.int32)
    return batch
  batch_size = n_pool + n_memory
  lo, hi, _ = rows.indices(batch_size)
  image_rows, caps = _pair_indices(pool, n_pool, seed=seed, task=task, step=step)
  rng = np.random.default_rng([seed, task, step, 1])
  memory_rows = rng.integers(0, len(memory), n_memory)
  memory_caps = rng.integers(0, memory.captions_per_image, n_memory)
  # Rows [lo, hi) of the concatenation [pool part; memory part].
  own = slice(min(lo, n_pool), min(hi, n_pool))
  other = slice(max(lo, n_pool) - n_pool, max(hi, n_pool) - n_pool)
  batch = _gather(pool, image_rows[own], caps[own])
  extra = _gather(memory, memory_rows[other], memory_caps[other], len(pool))
  if with_slots:
    batch["memory_slot"] = np.full(len(batch["image_ids"]), -1, np.int32)
    extra["memory_slot"] = (memory_rows[other] * memory.captions_per_image
                            + memory_caps[other]).astype(np.int32)
  return {k: np.concatenate([batch[k], extra[k]]) for k in batch}


def insertion_slots(pool: EncodedSplit, incoming: np.ndarray, n_current: int, *,
                    seed: int, task: int, num_steps: int
                    ) -> Callable[[int], dict[str, np.ndarray]]:
  """When each pair of `pool` that enters the next memory is first seen.

  The current-task part of step s's batch is `_pair_indices(pool,
  n_current, ..., step=s)` (as `mixed_batch` draws it); a pair (image row r,
  caption c) with r in `incoming` is inserted at the first step whose batch
  holds it, and its image at the first row holding that image.

  Args:
    pool: the current task's training split (rows index it).
    incoming: `[m]` sorted rows of `pool` that the next task's memory holds.
    n_current: current-task rows of every batch.
    num_steps: the task's steps.
  Returns:
    step -> {"insert_img_slot", "insert_txt_slot"}: int32 `[n_current]`, the
    row's image position in `incoming` (resp. position * captions_per_image
    + caption) where this row inserts it, -1 elsewhere. A pair never drawn
    in `num_steps` steps is never inserted.
  """
  c = pool.captions_per_image
  position = np.full(len(pool), -1, np.int64)
  position[np.asarray(incoming, np.int64)] = np.arange(len(incoming))
  seen_img = np.zeros(len(incoming), bool)
  seen_pair = np.zeros(len(incoming) * c, bool)
  table = []
  for step in range(num_steps):
    rows, caps = _pair_indices(pool, n_current, seed=seed, task=task, step=step)
    img_slot = np.full(n_current, -1, np.int32)
    txt_slot = np.full(n_current, -1, np.int32)
    for i in np.nonzero(position[rows] >= 0)[0]:
      p = position[rows[i]]
      q = p * c + caps[i]
      if not seen_img[p]:
        seen_img[p], img_slot[i] = True, p
      if not seen_pair[q]:
        seen_pair[q], txt_slot[i] = True, q
    table.append((img_slot, txt_slot))
  return lambda step: {"insert_img_slot": table[step][0],
                       "insert_txt_slot": table[step][1]}


@contextlib.contextmanager
def prefetched(batch_fn: Callable[[int], dict], num_steps: int,
               depth: int = 2) -> Iterator[Callable[[int], dict]]:
  """`batch_fn` with the next `depth` steps' batches built on a host thread.

  Real datasets decode JPEGs per batch on the host; building step s+1 while
  the device runs step s hides that. Batches are pure functions of the step,
  so a prefetched batch is exactly the one `batch_fn` would return, and a
  resumed run (asking for any first step) gets the same batches.

  Args:
    batch_fn: step -> host batch, pure.
    num_steps: steps are in [0, num_steps); nothing past it is built.
    depth: batches built ahead.

  Yields:
    A callable with `batch_fn`'s signature and results.
  """
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batches")
  ahead: dict[int, concurrent.futures.Future] = {}

  def fetch(step: int) -> dict:
    for s in range(step, min(step + depth + 1, num_steps)):
      if s not in ahead:
        ahead[s] = pool.submit(batch_fn, s)
    for stale in [s for s in ahead if s < step]:
      ahead.pop(stale).cancel()
    return ahead.pop(step).result() if step in ahead else batch_fn(step)

  try:
    yield fetch
  finally:
    for future in ahead.values():
      future.cancel()
    pool.shutdown(wait=True)
