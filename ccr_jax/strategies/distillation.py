"""Distillation from the previous snapshot: similarity distributions (LwF, Mod-X) and embeddings.

Both take the current model's embeddings of a batch and the previous
snapshot's embeddings of the same batch (computed by the train step with the
old params, no gradient), all `[batch, dim]` and L2-normalised.
"""

import jax
import jax.numpy as jnp


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
