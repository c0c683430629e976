"""Text towers: the VSE++ GRU caption encoder.

Maps padded token ids `[batch, max_len]` plus true lengths `[batch]` to
unnormalised embeddings `[batch, hidden_dim]`; the dual encoder normalises.
"""
import flax.linen as nn
import jax.numpy as jnp


def symmetric_uniform(limit):
  """Initializer drawing uniformly from [-limit, limit) (VSE++ word vectors: 0.1)."""
  base = nn.initializers.uniform(scale=2.0 * limit)  # draws from [0, 2 * limit)

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) - jnp.asarray(limit, dtype)

  return init


class GRUTextEncoder(nn.Module):
  """Word embedding -> 1-layer GRU -> hidden state at each caption's true length.

  As in VSE++ the GRU hidden size is the joint embedding size, and the final
  hidden state is the caption embedding (no projection on top).

  Attributes:
    vocab_size: number of token ids, including `<pad>`.
    word_dim: word embedding size (VSE++: 300).
    hidden_dim: GRU hidden size = output embedding size.
  """
  vocab_size: int
  hidden_dim: int
  word_dim: int = 300

  @nn.compact
  def __call__(self, tokens, lengths):
    """Embeds captions.

    Args:
      tokens: `[batch, max_len]` int32 token ids; positions at or past a
        caption's length are padding and do not affect its embedding.
      lengths: `[batch]` int32 true lengths, in [1, max_len].

    Returns:
      `[batch, hidden_dim]` float32, not normalised.
    """
    words = nn.Embed(self.vocab_size, self.word_dim, name="embed",
                     embedding_init=symmetric_uniform(0.1))(tokens)
    # nn.RNN selects the carry at index length-1; a length of 0 would wrap to
    # the last (padding) position, so empty captions read their first step.
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, tokens.shape[1])
    # nn.RNN shares the cell's parameters over time, so they appear once, as txt/gru.
    cell = nn.GRUCell(self.hidden_dim, name="gru")
    hidden, _ = nn.RNN(cell, return_carry=True)(words, seq_lengths=lengths)
    return hidden
