"""Backward-compatible training (`compat`; BCT, Shen et al. 2020) for the fixed index.

In the fixed (no-reindexing) regime, today's queries are embedded by the new
model and searched in galleries embedded by old snapshots. BCT adds the
retrieval loss computed across models: new queries against the previous
snapshot's gallery embeddings of the same batch. Here both modalities are
queries, so the compatibility loss is the training loss on the two cross-model
score matrices, new images x old captions and old images x new captions:
  L_compat = loss(img, stop_grad(old_txt)) + loss(stop_grad(old_img), txt),
each of which carries both ranking directions (so it also keeps old queries
meaningful against the new gallery, which partial reindexing needs).
"""

import functools
from typing import Callable

import jax

from ccr_jax import schema
from ccr_jax.strategies import base


def compatibility_loss(loss_fn: Callable, img: jax.Array, txt: jax.Array,
                       old_img: jax.Array, old_txt: jax.Array, *,
                       image_ids: jax.Array, step: jax.Array) -> jax.Array:
  """The retrieval loss between new embeddings and the old model's, both ways.

  Args:
    loss_fn: the training loss, `(img, txt, *, image_ids, step) -> (loss, extras)`.
    img, txt: `[B, dim]` new embeddings; old_img, old_txt: `[B, dim]` old ones.
    image_ids: `[B]` image of each pair (pairs sharing one are not negatives).
  """
  old_img, old_txt = jax.lax.stop_gradient(old_img), jax.lax.stop_gradient(old_txt)
  new_queries_old_texts, _ = loss_fn(img, old_txt, image_ids=image_ids, step=step)
  old_images_new_queries, _ = loss_fn(old_img, txt, image_ids=image_ids, step=step)
  return new_queries_old_texts + old_images_new_queries


def compat_strategy(strength: float, loss_fn: Callable | None) -> base.Strategy:
  """strength * `compatibility_loss` with the training loss `loss_fn`."""
  if loss_fn is None:
    raise ValueError("compat needs the training loss: pass loss_fn to get_strategy.")

  def loss_term(img, txt, old, batch, step, loss_params, state=None):
    c = compatibility_loss(functools.partial(loss_fn, loss_params=loss_params), img,
                           txt, *old, image_ids=batch["image_ids"], step=step)
    return strength * c, {"compat": c}

  return base.Strategy(name="compat", settings={"compat": {"strength": strength}},
                       loss_term=loss_term, needs_old_model=True)


base.register(
    "compat", lambda c, loss_fn: compat_strategy(c.strength, loss_fn),
    keys={"strength": schema.Key(0.03, "weight of the cross-model retrieval loss "
                                 "(chosen on validation, scratch; pretrained: 0.1)",
                                 schema.greater_than(0))})
