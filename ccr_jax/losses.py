"""Contrastive losses for dual encoders, behind one registry.

Every registered loss is a pure, jit-compatible function

  loss_fn(img_emb, txt_emb, *, image_ids, margin, reduction, step) -> (loss, extras)

with `img_emb`, `txt_emb` `[B, D]` L2-normalised embeddings where row i of each
is a positive pair, `image_ids` `[B]` ints (rows with equal ids share an image
and are never negatives of each other), `step` the (possibly traced) global
step, `loss` a float scalar and `extras` a dict of float scalars for logging.
Config values are bound with `functools.partial(get_loss(name), margin=...)`.
"""
import functools

import jax
import jax.numpy as jnp

REDUCTIONS = ("sum", "mean")


def contrastive_hinge(img_emb, txt_emb, *, image_ids, margin=0.2, hardest, reduction="sum"):
  """Bidirectional hinge ranking loss of VSE0 (all negatives) / VSE++ (hardest).

  With scores `S = img_emb @ txt_emb.T` and positives on the diagonal:
    image->text, row i:    relu(margin + S[i, j] - S[i, i])  over negatives j
    text->image, column i: relu(margin + S[j, i] - S[i, i])  over negatives j
  where j is a negative of i iff `image_ids[j] != image_ids[i]` (this excludes
  the diagonal, and captions of the same image when a batch holds several).
  Each row's costs are summed (`hardest=False`) or maximised (`hardest=True`,
  0 if the row has no negative); both directions are added.

  Args:
    img_emb: `[B, D]` image embeddings.
    txt_emb: `[B, D]` caption embeddings; row i describes image row i.
    image_ids: `[B]` ints identifying each row's image.
    margin: hinge margin (VSE++: 0.2).
    hardest: keep only the hardest negative per query (VSE++).
    reduction: 'sum' over the batch (as VSE++) or 'mean' (sum divided by B).

  Returns:
    `(loss, extras)`: loss a float scalar; extras {'i2t', 't2i'} (the two
    directions, reduced like the loss) and 'mean_positive' (mean of diag S).

  Raises:
    ValueError: for an unknown reduction.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"Unknown reduction {reduction!r}; valid: {list(REDUCTIONS)}")
  # At least float32 even for bf16 embeddings: the hinge compares score
  # differences of order 1e-2 against the margin.
  dtype = jnp.promote_types(jnp.result_type(img_emb, txt_emb), jnp.float32)
  img_emb, txt_emb = img_emb.astype(dtype), txt_emb.astype(dtype)
  # HIGHEST avoids TF32/bf16 passes on accelerators; B x B x D is cheap anyway.
  scores = jnp.matmul(img_emb, txt_emb.T, precision=jax.lax.Precision.HIGHEST)  # [B, B]
  positive = jnp.diagonal(scores)  # [B]
  image_ids = jnp.asarray(image_ids)
  negative = image_ids[:, None] != image_ids[None, :]  # [B, B], symmetric

  # cost_i2t[i, j]: caption j ranked against image i's own caption.
  cost_i2t = jnp.where(negative, jax.nn.relu(margin + scores - positive[:, None]), 0.0)
  # cost_t2i[j, i]: image j ranked against caption i's own image.
  cost_t2i = jnp.where(negative, jax.nn.relu(margin + scores - positive[None, :]), 0.0)

  # Masked entries are 0 and costs are >= 0, so a max over a row without
  # negatives is 0 and no gradient reaches a non-negative.
  row_reduce = jnp.max if hardest else jnp.sum
  per_image = row_reduce(cost_i2t, axis=1)  # [B]
  per_caption = row_reduce(cost_t2i, axis=0)  # [B]

  scale = 1.0 if reduction == "sum" else 1.0 / img_emb.shape[0]
  i2t = jnp.sum(per_image) * scale
  t2i = jnp.sum(per_caption) * scale
  extras = {"i2t": i2t, "t2i": t2i, "mean_positive": jnp.mean(positive)}
  return i2t + t2i, extras


def vse0(img_emb, txt_emb, *, image_ids, margin=0.2, reduction="sum", step=None):
  """VSE0: hinge loss summed over all negatives. See `contrastive_hinge`.

  Args:
    img_emb: `[B, D]`.
    txt_emb: `[B, D]`.
    image_ids: `[B]` ints.
    margin: hinge margin.
    reduction: 'sum' or 'mean' over the batch.
    step: unused; accepted so all registered losses share one signature.

  Returns:
    `(loss, extras)` as `contrastive_hinge`.
  """
  del step
  return contrastive_hinge(img_emb, txt_emb, image_ids=image_ids, margin=margin,
                           hardest=False, reduction=reduction)


def vse_pp(img_emb, txt_emb, *, image_ids, margin=0.2, reduction="sum", step=None,
           warmup_steps=0):
  """VSE++: hinge loss on the hardest negative, after `warmup_steps` of VSE0.

  Trained from scratch, the hardest-negative loss tends to collapse all
  embeddings together; warming up with the all-negatives loss avoids it. The
  switch is a `lax.cond` on the traced `step`, so one compiled step serves both
  phases.

  Args:
    img_emb: `[B, D]`.
    txt_emb: `[B, D]`.
    image_ids: `[B]` ints.
    margin: hinge margin.
    reduction: 'sum' or 'mean' over the batch.
    step: int scalar (Python or traced): the global step; required when
      `warmup_steps > 0`.
    warmup_steps: Python int; VSE0 is used while `step < warmup_steps`.

  Returns:
    `(loss, extras)` as `contrastive_hinge`, plus extras['hardest'] (1.0 when
    the hardest-negative loss was used, else 0.0).

  Raises:
    ValueError: if `warmup_steps > 0` and no step is given.
  """
  hinge = functools.partial(contrastive_hinge, image_ids=image_ids, margin=margin,
                            reduction=reduction)
  if warmup_steps <= 0:
    loss, extras = hinge(img_emb, txt_emb, hardest=True)
    return loss, {**extras, "hardest": jnp.ones((), loss.dtype)}
  if step is None:
    raise ValueError("vse_pp with warmup_steps > 0 needs the step")
  use_hardest = jnp.asarray(step) >= warmup_steps
  loss, extras = jax.lax.cond(
      use_hardest,
      lambda a, b: hinge(a, b, hardest=True),
      lambda a, b: hinge(a, b, hardest=False),
      img_emb, txt_emb)
  return loss, {**extras, "hardest": use_hardest.astype(loss.dtype)}


LOSSES = {"vse0": vse0, "vse_pp": vse_pp}


def get_loss(name):
  """Returns the registered loss function called `name`.

  Args:
    name: a key of `LOSSES`.

  Returns:
    `loss_fn(img_emb, txt_emb, *, image_ids, margin, reduction, step)`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name]
