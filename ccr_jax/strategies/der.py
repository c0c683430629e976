"""Dark Experience Replay (`der`; Buzzega et al. 2020), DER and DER++, for
dual encoders.

As published: every step trains on a full current-task batch and draws a
batch of `memory_batch` pairs from a reservoir memory (`Memory.separate_batch`,
`replay.replay_memory`); each memory pair carries the *logits* the model gave
it when it entered the memory, and the memory rows add
  alpha * reduce_{memory rows} (||img - img*||^2 + ||txt - txt*||^2)     (DER)
  + beta * L(memory rows)                                                 (DER++)
to the current rows' training loss L (reduce as L reduces, 'sum' or 'mean';
beta = 0 is DER). One memory batch serves both terms (the reference code
draws two; one saves an embedding pass).

What the logits are in retrieval: a classifier's logits are its outputs
before the softmax; a dual encoder's outputs are its two embeddings, and
every retrieval score (and the contrastive loss's logits, the in-batch
similarities) is a dot product of them. Matching the stored embeddings pins
every score the pair takes part in, against any gallery, which matching one
batch's similarity matrix would not.

When a pair enters the memory: the memory a task leaves is a pure function of
the task sizes and the seed (`replay.replay_memory`), so the pairs of task t
that the next memory holds are known when task t starts. Each is inserted at
the first step of task t whose batch draws it (`pipeline.insertion_slots`),
and `record` stores the embeddings that step computed (the model at that
step, before its update), as DER's reservoir stores the logits of the
forward pass that saw the example. The incoming targets travel in the train
state (mid-task checkpoints keep them, so a resumed task stores the same),
and at the task's end they join the targets of the pairs the memory keeps
(a reservoir or balanced memory never re-admits a pair it dropped, so each
later memory's old part is a subset of the earlier one and its targets carry
over). A pair the task's steps never drew (too few steps for one epoch) is
embedded by the task's final model instead (logged, and counted in the
state's `der_unseen`).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

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


def _scatter(buffer, slots, values):
  """buffer with rows `slots` (>= 0) set to `values`; rows of slot -1 dropped."""
  safe = jnp.where(slots >= 0, slots, buffer.shape[0])  # out of range: dropped
  return buffer.at[safe].set(values.astype(buffer.dtype), mode="drop")


def record_insertions(state: dict, img, txt, batch: dict) -> dict:
  """The incoming targets with the batch's inserted rows stored (`record`)."""
  img_slots, txt_slots = batch["insert_img_slot"], batch["insert_txt_slot"]
  ones = jnp.ones(img_slots.shape, jnp.float32)
  return {"der_new_img": _scatter(state["der_new_img"], img_slots, img),
          "der_new_img_set": _scatter(state["der_new_img_set"], img_slots, ones),
          "der_new_txt": _scatter(state["der_new_txt"], txt_slots, txt),
          "der_new_txt_set": _scatter(state["der_new_txt_set"], txt_slots, ones)}


def der_strategy(memory_size: int, memory_batch: int, policy: str, alpha: float,
                 beta: float, loss_fn: Callable | None = None,
                 reduction: str = "sum") -> base.Strategy:
  """DER (beta = 0) or DER++ with a memory of `memory_size` images.

  Args:
    loss_fn: the training loss, for beta's term on the memory rows (needed
      when beta > 0).
  """
  if policy not in replay.POLICIES:
    raise ValueError(f"--config.strategy.der.policy={policy!r}; valid: "
                     f"{', '.join(replay.POLICIES)}.")

  def init_state(params, ctx):
    del params
    zeros = lambda n: jnp.zeros((n, ctx.embed_dim), jnp.float32)  # noqa: E731
    m, cpi = memory_size, ctx.captions_per_image
    return {"der_img": zeros(m), "der_txt": zeros(m * cpi),
            "der_new_img": zeros(m), "der_new_txt": zeros(m * cpi),
            "der_new_img_set": jnp.zeros((m,), jnp.float32),
            "der_new_txt_set": jnp.zeros((m * cpi,), jnp.float32),
            "der_unseen": jnp.zeros((), jnp.int32)}

  def end_of_task(ctx, task, params, state):
    cpi = ctx.captions_per_image
    old_rows, new_rows = ctx.memory_rows(task), ctx.memory_rows(task + 1)
    kept = carried_positions(old_rows, new_rows[:task])
    old_img, old_txt = np.asarray(state["der_img"]), np.asarray(state["der_txt"])
    img = [old_img[kept]]
    txt = [old_txt.reshape(memory_size, cpi, -1)[kept]]
    n = len(new_rows[task])
    unseen = int(np.asarray(state["der_unseen"]))
    if n:
      new_img = np.array(state["der_new_img"])[:n]
      new_txt = np.array(state["der_new_txt"]).reshape(memory_size, cpi, -1)[:n]
      img_set = np.asarray(state["der_new_img_set"])[:n] > 0
      txt_set = np.asarray(state["der_new_txt_set"]).reshape(memory_size, cpi)[:n] > 0
      missing = ~(img_set & txt_set.all(axis=1))
      if missing.any():
        # Drawn by no step of the task: the task's final model gives them.
        late_img, late_txt = ctx.embed_rows(params, task, new_rows[task][missing])
        new_img[missing & ~img_set] = np.asarray(late_img)[~img_set[missing]]
        fill = ~txt_set[missing]
        new_txt[missing] = np.where(fill[..., None], np.asarray(late_txt),
                                    new_txt[missing])
        unseen += int(np.sum(~img_set) + np.sum(~txt_set))
        logging.info("der: %d images / %d captions of task %d's memory pairs were "
                     "drawn by no step; their targets come from the task's final "
                     "model.", np.sum(~img_set), np.sum(~txt_set), task + 1)
      img.append(new_img)
      txt.append(new_txt)
    img, txt = np.concatenate(img), np.concatenate(txt)
    pad = memory_size - len(img)
    img = np.pad(img, ((0, pad), (0, 0)))
    txt = np.pad(txt, ((0, pad), (0, 0), (0, 0))).reshape(memory_size * cpi, -1)
    fresh = init_state(None, ctx)
    return {**fresh, "der_img": jnp.asarray(img, jnp.float32),
            "der_txt": jnp.asarray(txt, jnp.float32),
            "der_unseen": jnp.asarray(unseen, jnp.int32)}

  def loss_term(img, txt, old, batch, step, loss_params, state):
    del old
    slots = batch["memory_slot"]
    cpi = state["der_txt"].shape[0] // state["der_img"].shape[0]
    d = distillation(img, txt, slots, state["der_img"], state["der_txt"], cpi, reduction)
    total, extras = alpha * d, {"der_distill": d}
    if beta > 0:
      if loss_fn is None:
        raise ValueError("der with beta > 0 (DER++) needs the training loss.")
      # The memory batch is the last memory_batch rows once a memory exists;
      # before (task 1) those rows are current-task pairs and the term is off.
      m = memory_batch
      on = jnp.all(slots[-m:] >= 0).astype(jnp.float32)
      ranking, _ = loss_fn(img[-m:], txt[-m:], image_ids=batch["image_ids"][-m:],
                           step=step, loss_params=loss_params)
      total = total + on * beta * ranking
      extras["der_ranking"] = on * ranking
    return total, extras

  return base.Strategy(
      name="der", settings={"der": {"memory_size": memory_size,
                                    "memory_batch": memory_batch, "policy": policy,
                                    "alpha": alpha, "beta": beta}},
      memory=base.Memory(
          rows=lambda sizes, seed: replay.replay_memory(sizes, memory_size, policy, seed),
          separate_batch=memory_batch),
      loss_term=loss_term, loss_reads_state=True, record=record_insertions,
      state_keys=("der_img", "der_txt", "der_new_img", "der_new_txt", "der_new_img_set",
                  "der_new_txt_set", "der_unseen"),
      init_state=init_state, end_of_task=end_of_task)


def _factory(c, loss_fn: Callable | None) -> base.Strategy:
  return der_strategy(int(c.memory_size), int(c.memory_batch), c.policy,
                      float(c.alpha), float(c.beta), loss_fn,
                      losses.reduction_of(loss_fn))


base.register(
    "der", _factory,
    keys={"memory_size": replay.MEMORY_KEYS["memory_size"],
          "memory_batch": schema.Key(
              64, "pairs drawn from the memory every step, beside a full current "
              "batch", schema.at_least(1, integer=True)),
          "policy": replay.MEMORY_KEYS["policy"],
          "alpha": schema.Key(0.03, "weight of the squared distance of memory pairs' "
                              "embeddings to those stored when they entered the "
                              "memory (DER's logit term; chosen on validation, "
                              "scratch, DER++ and DER alike; pretrained: 0.3)",
                              schema.greater_than(0)),
          "beta": schema.Key(1.0, "weight of the training loss on the memory batch "
                             "(DER++'s term; 0: DER)", schema.at_least(0.0))})
