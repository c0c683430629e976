"""Learning without forgetting (`lwf`): distillation from the previous snapshot.

Similarity distributions (LwF, Mod-X) and, optionally, the embeddings themselves.

Both take the current model's embeddings of a batch and the previous
snapshot's embeddings of the same batch (computed by the train step with the
old params, no gradient), all `[batch, dim]` and L2-normalised.
"""

import jax
import jax.numpy as jnp

from ccr_jax import schema
from ccr_jax.strategies import base


def _kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Sum over rows of KL(softmax(teacher) || softmax(student)), `[B, B]` logits."""
  t_logp = jax.nn.log_softmax(teacher_logits, axis=-1)
  s_logp = jax.nn.log_softmax(student_logits, axis=-1)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp))


def similarity_distillation(img: jax.Array, txt: jax.Array, old_img: jax.Array,
                            old_txt: jax.Array, *, temperature: float) -> jax.Array:
  """KL between the old and new in-batch similarity distributions, both directions.

  With S = img @ txt.T (new) and S' = old_img @ old_txt.T (old), the loss is
  tau^2 / B * [sum_i KL(softmax(S'_i/tau) || softmax(S_i/tau))           (image->text rows)
               + sum_j KL(softmax(S'^T_j/tau) || softmax(S^T_j/tau))]    (text->image columns),
  the LwF form (tau^2 keeps gradient scale independent of tau, as Hinton et
  al.) applied to cross-modal similarity distributions as in Mod-X. Zero, with
  zero gradient, when the models agree.

  Args:
    img, txt: `[B, dim]` current embeddings. old_img, old_txt: `[B, dim]` old ones.
  """
  s_new = img @ txt.T / temperature
  s_old = jax.lax.stop_gradient(old_img @ old_txt.T) / temperature
  b = img.shape[0]
  return temperature ** 2 / b * (_kl_rows(s_old, s_new) + _kl_rows(s_old.T, s_new.T))


def embedding_distillation(img: jax.Array, txt: jax.Array, old_img: jax.Array,
                           old_txt: jax.Array) -> jax.Array:
  """Mean over the batch of (1 - cos(new, old)) per modality, summed over modalities.

  Args: all `[B, dim]`, unit norm (so the dot product is the cosine).
  """
  old_img, old_txt = jax.lax.stop_gradient(old_img), jax.lax.stop_gradient(old_txt)
  return (jnp.mean(1.0 - jnp.sum(img * old_img, axis=-1))
          + jnp.mean(1.0 - jnp.sum(txt * old_txt, axis=-1)))


def lwf_strategy(strength: float, temperature: float,
                 embedding_strength: float = 0.0) -> base.Strategy:
  """strength * similarity KL + embedding_strength * embedding distance to the
  previous snapshot's embeddings of the same batch."""

  def loss_term(img, txt, old, batch, step, loss_params):
    del batch, step, loss_params
    kl = similarity_distillation(img, txt, *old, temperature=temperature)
    emb = embedding_distillation(img, txt, *old)
    return strength * kl + embedding_strength * emb, {"lwf_kl": kl, "lwf_embedding": emb}

  return base.Strategy(
      name="lwf", settings={"lwf": {"strength": strength,
                                    "embedding_strength": embedding_strength,
                                    "temperature": temperature}},
      loss_term=loss_term, needs_old_model=True)


base.register(
    "lwf", lambda c, _: lwf_strategy(c.strength, c.temperature, c.embedding_strength),
    keys={"strength": schema.Key(1.0, "weight of the similarity-distribution KL"),
          "embedding_strength": schema.Key(0.0, "weight of the cosine embedding "
                                           "distillation (0: off)"),
          "temperature": schema.Key(2.0, "softmax temperature of the similarities",
                                    schema.greater_than(0))})
