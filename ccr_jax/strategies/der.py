"""Dark Experience Replay++ (`der`; Buzzega et al. 2020) for embeddings.

A replay memory (`replay.replay_memory`) whose pairs are trained on with the
ranking loss (the '++' part) and, in addition, pulled towards the embeddings
the model gave them when they were stored (DER's logit targets; a retrieval
model's outputs are its embeddings):
  strength * reduce_{memory rows} (||img - img*||^2 + ||txt - txt*||^2),
reduce as the training loss reduces ('sum' or 'mean'), img*/txt* the stored
embeddings of that image and caption. Targets are taken at the end of the
task a pair belongs to (its snapshot, where DER takes them while training on
it) and kept while the pair stays in memory: a reservoir or balanced memory
never re-admits a pair it dropped, so each later memory is a subset of the
earlier one and its targets carry over.
"""

from typing import Callable

import jax.numpy as jnp
import numpy as np

from ccr_jax import losses
from ccr_jax import schema
from ccr_jax.strategies import base
from ccr_jax.strategies import replay


def distillation(img, txt, slots, targets_img, targets_txt, captions_per_image: int,
                 reduction: str = "sum"):
  """Squared distance of memory rows' embeddings to their stored targets.

  Args:
    img, txt: `[B, dim]` embeddings of the batch.
    slots: `[B]` int32 memory slot of each row (row * captions_per_image +
      caption), -1 for current-task rows (which contribute nothing).
    targets_img: `[M, dim]`; targets_txt: `[M * captions_per_image, dim]`.
  """
  mask = (slots >= 0).astype(img.dtype)
  safe = jnp.maximum(slots, 0)
  d_img = jnp.sum((img - targets_img[safe // captions_per_image]) ** 2, axis=-1)
  d_txt = jnp.sum((txt - targets_txt[safe]) ** 2, axis=-1)
  per_row = mask * (d_img + d_txt)
  if reduction == "sum":
    return jnp.sum(per_row)
  return jnp.sum(per_row) / jnp.maximum(jnp.sum(mask), 1.0)


def carried_positions(old_rows: list[np.ndarray], new_rows: list[np.ndarray]) -> np.ndarray:
  """For each pair of the new memory from a task the old memory covered, its
  position in the old memory's concatenated rows.

  Args:
    old_rows: per task before t, sorted rows (the memory while task t trained).
    new_rows: per task before t + 1 (the next memory); its first len(old_rows)
      tasks' rows must be subsets of the old ones.
  Raises:
    ValueError: a kept pair was not in the old memory.
  """
  offsets = np.cumsum([0, *(len(r) for r in old_rows)])
  positions = []
  for j, (old, new) in enumerate(zip(old_rows, new_rows)):
    at = np.searchsorted(old, new)
    if len(new) and (at.max() >= len(old) or np.any(old[at] != new)):
      raise ValueError(f"the memory re-admitted pairs of task {j + 1} it had dropped; "
                       "der keeps targets only for pairs it never dropped.")
    positions.append(offsets[j] + at)
  return np.concatenate(positions) if positions else np.zeros(0, np.int64)


def der_strategy(memory_size: int, ratio: float, policy: str, strength: float,
                 reduction: str = "sum") -> base.Strategy:
  """Replay with a memory of `memory_size` pairs plus `strength` * target distillation."""
  memory = replay.replay_strategy(memory_size, ratio, policy).memory

  def init_state(params, ctx):
    del params
    return {"der_img": jnp.zeros((memory_size, ctx.embed_dim), jnp.float32),
            "der_txt": jnp.zeros((memory_size * ctx.captions_per_image, ctx.embed_dim),
                                 jnp.float32)}

  def end_of_task(ctx, task, params, state):
    cpi = ctx.captions_per_image
    old_rows, new_rows = ctx.memory_rows(task), ctx.memory_rows(task + 1)
    kept = carried_positions(old_rows, new_rows[:task])
    old_img, old_txt = np.asarray(state["der_img"]), np.asarray(state["der_txt"])
    img = [old_img[kept]]
    txt = [old_txt.reshape(memory_size, cpi, -1)[kept]]
    if len(new_rows[task]):
      new_img, new_txt = ctx.embed_rows(params, task, new_rows[task])
      img.append(np.asarray(new_img))
      txt.append(np.asarray(new_txt))
    img, txt = np.concatenate(img), np.concatenate(txt)
    pad = memory_size - len(img)
    img = np.pad(img, ((0, pad), (0, 0)))
    txt = np.pad(txt, ((0, pad), (0, 0), (0, 0))).reshape(memory_size * cpi, -1)
    return {"der_img": jnp.asarray(img, jnp.float32),
            "der_txt": jnp.asarray(txt, jnp.float32)}

  def loss_term(img, txt, old, batch, step, loss_params, state):
    del old, step, loss_params
    cpi = state["der_txt"].shape[0] // state["der_img"].shape[0]
    d = distillation(img, txt, batch["memory_slot"], state["der_img"], state["der_txt"],
                     cpi, reduction)
    return strength * d, {"der": d}

  return base.Strategy(
      name="der", settings={"der": {"memory_size": memory_size, "ratio": ratio,
                                    "policy": policy, "strength": strength}},
      memory=memory, loss_term=loss_term, loss_reads_state=True,
      state_keys=("der_img", "der_txt"), init_state=init_state,
      end_of_task=end_of_task)


def _factory(c, loss_fn: Callable | None) -> base.Strategy:
  return der_strategy(int(c.memory_size), float(c.ratio), c.policy, float(c.strength),
                      losses.reduction_of(loss_fn))


base.register(
    "der", _factory,
    keys={**replay.MEMORY_KEYS,
          "strength": schema.Key(3.0, "weight of the squared distance to the stored "
                                 "embeddings", schema.greater_than(0))})
