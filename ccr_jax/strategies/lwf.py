"""Learning without forgetting (`lwf`): distillation from the previous snapshot.

Similarity distributions (LwF, Mod-X) and, optionally, the embeddings themselves.

Both take the current model's embeddings of a batch and the previous
snapshot's embeddings of the same batch (computed by the train step with the
old params, no gradient), all `[batch, dim]` and L2-normalised.

Scale. The similarities are cosines in [-1, 1]; LwF's classic temperature 2
with Hinton's tau^2 factor is meant for classifier logits of scale ~10, and
on cosines leaves both softmaxes nearly uniform (measured: a term 1e-3 of the
ranking loss, a gradient 3e-4 of it, benchmarks/studies/lwf_gradient.py). The logits
here are cosine / temperature with a contrastive temperature (default 0.05,
logits in [-20, 20], as InfoNCE/CLIP), without the tau^2 factor (which would
shrink the gradient by tau^2 at small tau), and the KL is reduced over query
rows the way the training loss reduces over pairs ('sum' as VSE++ or
'mean'), so strength 1 weighs a query's distillation like its ranking loss.
"""

import jax
import jax.numpy as jnp

from ccr_jax import losses
from ccr_jax import schema
from ccr_jax.strategies import base


def _masked(logits: jax.Array, image_ids: jax.Array | None) -> jax.Array:
  """`logits` `[B, B]` with off-diagonal entries of the same image set to -inf.

  Captions of one image are positives of each other's image, not negatives:
  the losses exclude them from the ranking, so the distributions do too.
  """
  if image_ids is None:
    return logits
  same = image_ids[:, None] == image_ids[None, :]
  off_diagonal = ~jnp.eye(logits.shape[0], dtype=bool)
  return jnp.where(same & off_diagonal, -jnp.inf, logits)


def _kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Per row KL(softmax(teacher) || softmax(student)), `[B, B]` logits -> `[B]`.

  Entries that are -inf in both (masked) contribute 0.
  """
  t_logp = jax.nn.log_softmax(teacher_logits, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits, axis=-1)
  finite = jnp.isfinite(t_logp)
  terms = jnp.where(finite, jnp.exp(t_logp) * (t_logp - jnp.where(finite, s_logp, 0.0)),
                    0.0)
  return jnp.sum(terms, axis=-1)


def similarity_distillation(img: jax.Array, txt: jax.Array, old_img: jax.Array,
                            old_txt: jax.Array, *, temperature: float,
                            image_ids: jax.Array | None = None,
                            reduction: str = "sum") -> jax.Array:
  """KL between the old and new in-batch similarity distributions, both directions.

  With S = img @ txt.T / tau (new) and S' = old_img @ old_txt.T / tau (old),
  pairs sharing an image masked off the diagonal, the loss is
    reduce_i KL(softmax(S'_i) || softmax(S_i))  +  reduce_j KL(softmax(S'^T_j) || softmax(S^T_j))
  (image->text rows, then text->image columns; reduce = sum or mean over the
  B queries), the LwF form applied to cross-modal similarity distributions as
  in Mod-X. Zero, with zero gradient, when the models agree.

  Args:
    img, txt: `[B, dim]` current embeddings. old_img, old_txt: `[B, dim]` old ones.
    temperature: tau, applied to cosines (0.05: logits in [-20, 20]).
    image_ids: `[B]` image of each pair, or None when every pair has its own.
    reduction: 'sum' or 'mean' over query rows, as the training loss.
  """
  s_new = _masked(img @ txt.T / temperature, image_ids)
  s_old = _masked(jax.lax.stop_gradient(old_img @ old_txt.T) / temperature, image_ids)
  per_query = _kl_rows(s_old, s_new) + _kl_rows(s_old.T, s_new.T)
  return jnp.sum(per_query) if reduction == "sum" else jnp.mean(per_query)


def embedding_distillation(img: jax.Array, txt: jax.Array, old_img: jax.Array,
                           old_txt: jax.Array) -> jax.Array:
  """Mean over the batch of (1 - cos(new, old)) per modality, summed over modalities.

  Args: all `[B, dim]`, unit norm (so the dot product is the cosine).
  """
  old_img, old_txt = jax.lax.stop_gradient(old_img), jax.lax.stop_gradient(old_txt)
  return (jnp.mean(1.0 - jnp.sum(img * old_img, axis=-1))
          + jnp.mean(1.0 - jnp.sum(txt * old_txt, axis=-1)))


def lwf_strategy(strength: float, temperature: float, embedding_strength: float = 0.0,
                 reduction: str = "sum") -> base.Strategy:
  """strength * similarity KL + embedding_strength * embedding distance to the
  previous snapshot's embeddings of the same batch."""

  def loss_term(img, txt, old, batch, step, loss_params, state=None):
    del step, loss_params, state
    kl = similarity_distillation(img, txt, *old, temperature=temperature,
                                 image_ids=batch["image_ids"], reduction=reduction)
    emb = embedding_distillation(img, txt, *old)
    return strength * kl + embedding_strength * emb, {"lwf_kl": kl, "lwf_embedding": emb}

  return base.Strategy(
      name="lwf", settings={"lwf": {"strength": strength,
                                    "embedding_strength": embedding_strength,
                                    "temperature": temperature}},
      loss_term=loss_term, needs_old_model=True)


base.register(
    "lwf", lambda c, loss_fn: lwf_strategy(c.strength, c.temperature,
                                           c.embedding_strength,
                                           losses.reduction_of(loss_fn)),
    # 0.1: chosen on the validation split (benchmarks/results/strategies.md);
    # at 1 the term's gradient is ~6x the ranking loss's and training stalls.
    keys={"strength": schema.Key(0.1, "weight of the similarity-distribution KL "
                                 "(chosen on validation, both settings)"),
          "embedding_strength": schema.Key(0.0, "weight of the cosine embedding "
                                           "distillation (0: off)"),
          "temperature": schema.Key(0.05, "softmax temperature on the cosine "
                                    "similarities (contrastive scale: 0.05 gives "
                                    "logits in [-20, 20])", schema.greater_than(0))})
