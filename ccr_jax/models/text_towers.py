"""Text towers: the VSE++ GRU caption encoder.

Maps padded token ids `[batch, max_len]` plus true lengths `[batch]` to
unnormalised embeddings `[batch, hidden_dim]`; the dual encoder normalises.

The GRU does no work on padding. Captions are sorted longest first, so at
step t the captions still running are the first `active[t]` rows, and their
real tokens are packed step-major into one `[capacity, word_dim]` array
(PyTorch's `pack_padded_sequence` layout, padded to a static capacity). Then:
  * the input projection of every real token is one hoisted matmul (run in
    row blocks up to the number of real tokens, not over the padded batch);
  * each step runs one fused `[rows, hidden] @ [hidden, 3 * hidden]` matmul
    on the smallest of a few static row counts that covers the running rows;
  * the loop stops at the batch's longest caption.
Trip counts are dynamic (`while` loops), so reverse-mode autodiff cannot go
through them; `packed_gru` has a hand-written VJP, which also hoists the
weight gradients into large matmuls over all real tokens after the loop.
Shapes stay static: one compilation per `[batch, max_len]`.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Rows per block of the hoisted matmuls. Larger blocks run the matmuls closer
# to peak and add fewer accumulations of the weight gradients; smaller ones
# waste less on the last, partly filled block.
BLOCK_ROWS = 256


def symmetric_uniform(limit):
  """Initializer drawing uniformly from [-limit, limit) (VSE++ word vectors: 0.1)."""
  base = nn.initializers.uniform(scale=2.0 * limit)  # draws from [0, 2 * limit)

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) - jnp.asarray(limit, dtype)

  return init


def stacked_orthogonal(num_blocks):
  """Initializer for `[n, num_blocks * n]`: `num_blocks` orthogonal `[n, n]` side by side.

  The fused recurrent kernel then starts as flax's `GRUCell` (one orthogonal
  kernel per gate) would.
  """
  orthogonal = nn.initializers.orthogonal()

  def init(key, shape, dtype=jnp.float32):
    rows, cols = shape
    keys = jax.random.split(key, num_blocks)
    return jnp.concatenate(
        [orthogonal(k, (rows, cols // num_blocks), dtype) for k in keys], axis=1)

  return init


def packed_capacity(batch, max_len):
  """Rows of the packed token array for a `[batch, max_len]` caption batch.

  Every real token fits (`batch * max_len`), plus `batch` rows of slack so that
  a step can slice a full `batch` rows from its offset, rounded up to whole
  `BLOCK_ROWS` blocks.
  """
  rows = batch * max_len + batch
  return -(-rows // BLOCK_ROWS) * BLOCK_ROWS


def pack_tokens(sorted_tokens, active):
  """Packs the real tokens of length-sorted captions step-major.

  Args:
    sorted_tokens: `[batch, max_len]` int32, captions sorted longest first.
    active: `[max_len]` int32, how many captions are still running at each
      step (non-increasing).

  Returns:
    `[packed_capacity(batch, max_len)]` int32: step 0's tokens of the first
    `active[0]` captions, then step 1's of the first `active[1]`, and so on;
    zeros after the `sum(active)` real tokens.
  """
  batch, max_len = sorted_tokens.shape
  capacity = packed_capacity(batch, max_len)
  real = (jnp.arange(batch)[None, :] < active[:, None]).ravel()  # step-major [T * B]
  # nonzero keeps ascending order, which is step-major order.
  (index,) = jnp.nonzero(real, size=capacity, fill_value=0)
  packed = sorted_tokens.T.ravel()[index]
  return jnp.where(jnp.arange(capacity) < jnp.sum(active), packed, 0)


def _row_step(batch):
  """Granularity of the row counts a step's matmul runs on: about 8 counts up to batch."""
  return max(8, -(-batch // 8))


def _running_rows_matmul(a, w, running, w_contracting_dim=0):
  """`a @ w` for the first `running` rows of `a` `[batch, k]`; later rows are 0.

  Runs on the smallest static row count that covers `running` (`lax.switch`
  between a few compiled matmuls), so finished captions cost little.
  `w_contracting_dim=1` multiplies by `w.T` without materialising it.
  """
  batch = a.shape[0]
  step = _row_step(batch)
  counts = tuple(range(step, batch, step)) + (batch,)

  def branch(rows):
    def matmul(a):
      out = lax.dot_general(a[:rows], w, (((1,), (w_contracting_dim,)), ((), ())))
      return jnp.pad(out, ((0, batch - rows), (0, 0)))
    return matmul

  index = (running - 1) // step  # the first count >= running; switch clamps
  return lax.switch(index, [branch(rows) for rows in counts], a)


def _block_matmul(x, w, b, num_rows):
  """`x @ w + b` for rows below `num_rows` of `x` `[capacity, k]`, in blocks; the rest 0."""
  out = jnp.zeros((x.shape[0], w.shape[1]), w.dtype)

  def block(i, out):
    rows = lax.dynamic_slice_in_dim(x, i * BLOCK_ROWS, BLOCK_ROWS)
    return lax.dynamic_update_slice_in_dim(out, rows @ w + b, i * BLOCK_ROWS, 0)

  return lax.fori_loop(0, -(-num_rows // BLOCK_ROWS), block, out)


def _split_gates(gates):
  return jnp.split(gates, 3, axis=-1)


def _gru_forward(batch, words, active, w_i, b_i, w_h, b_h, keep_residuals):
  """The recurrence over packed tokens; see `packed_gru`.

  Returns the final states and, with `keep_residuals`, `[capacity, ...]`
  buffers in packed order: the input projection (consumed; the backward
  reuses its memory), the gates r, z, n, and the state before each step
  next to the recurrent part of n's pre-activation (h W_h[n] + b_h[n]).
  """
  hidden = w_h.shape[0]
  capacity = words.shape[0]
  offsets = jnp.cumsum(active) - active
  input_gates = _block_matmul(words, w_i, b_i, jnp.sum(active))
  rows = jnp.arange(batch)[:, None]
  residuals = ((jnp.zeros((capacity, 3 * hidden), w_h.dtype),
                jnp.zeros((capacity, 2 * hidden), w_h.dtype)) if keep_residuals else ())

  def step(t, carry):
    h, residuals = carry
    offset, running = offsets[t], active[t]
    x_r, x_z, x_n = _split_gates(lax.dynamic_slice_in_dim(input_gates, offset, batch))
    h_r, h_z, h_n = _split_gates(_running_rows_matmul(h, w_h, running) + b_h)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    new_h = jnp.where(rows < running, (1.0 - z) * n + z * h, h)
    if keep_residuals:
      # Slots past `running` get junk here, but later steps overwrite it;
      # only slots past the last token keep it.
      values = (jnp.concatenate([r, z, n], axis=1), jnp.concatenate([h, h_n], axis=1))
      residuals = tuple(lax.dynamic_update_slice_in_dim(buf, v, offset, 0)
                        for buf, v in zip(residuals, values))
    return new_h, residuals

  num_steps = jnp.sum(active > 0)  # the longest caption
  h0 = jnp.zeros((batch, hidden), w_h.dtype)
  h, residuals = lax.fori_loop(0, num_steps, step, (h0, residuals))
  return h, (input_gates, *residuals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def packed_gru(batch, words, active, w_i, b_i, w_h, b_h):
  """A GRU over step-major packed tokens (flax `GRUCell` / PyTorch `nn.GRU` math).

  r, z = sigmoid(x W_i[r,z] + b_i[r,z] + h W_h[r,z] + b_h[r,z]);
  n = tanh(x W_i[n] + b_i[n] + r * (h W_h[n] + b_h[n])); h' = (1 - z) n + z h;
  the initial state is 0. Gate order along the `3 * hidden` axis: r, z, n.

  Args:
    batch: number of captions (static).
    words: `[capacity, word_dim]` word vectors in `pack_tokens` order; rows
      past `sum(active)` are ignored.
    active: `[max_len]` int32, captions still running at each step, non-increasing.
    w_i: `[word_dim, 3 * hidden]` input kernel; b_i: `[3 * hidden]`.
    w_h: `[hidden, 3 * hidden]` recurrent kernel; b_h: `[3 * hidden]`.

  Returns:
    `[batch, hidden]`: each caption's state after its last token, captions in
    the packed (longest first) order.
  """
  h, _ = _gru_forward(batch, words, active, w_i, b_i, w_h, b_h, keep_residuals=False)
  return h


def _packed_gru_fwd(batch, words, active, w_i, b_i, w_h, b_h):
  h, residuals = _gru_forward(batch, words, active, w_i, b_i, w_h, b_h,
                              keep_residuals=True)
  return h, (words, active, w_i, w_h, *residuals)


def _packed_gru_bwd(batch, residuals, d_out):
  words, active, w_i, w_h, spent, gates, states = residuals
  hidden = w_h.shape[0]
  total = jnp.sum(active)
  offsets = jnp.cumsum(active) - active
  num_steps = jnp.sum(active > 0)
  rows = jnp.arange(batch)[:, None]

  # Backward through time, writing the gradients of the input gates'
  # pre-activations (r, z, n) into the spent input projection's memory: a
  # buffer this loop does not read otherwise, so XLA updates it in place.
  def step(i, carry):
    d_h, d_x_gates = carry
    t = num_steps - 1 - i
    offset, running = offsets[t], active[t]
    live = rows < running
    r, z, n = _split_gates(lax.dynamic_slice_in_dim(gates, offset, batch))
    saved = lax.dynamic_slice_in_dim(states, offset, batch)
    h, h_n = saved[:, :hidden], saved[:, hidden:]
    d_n = d_h * (1.0 - z) * (1.0 - n * n)
    d_r = d_n * h_n * r * (1.0 - r)
    d_z = d_h * (h - n) * z * (1.0 - z)
    d_h_gates = jnp.where(live, jnp.concatenate([d_r, d_z, d_n * r], axis=1), 0.0)
    d_h = jnp.where(live, d_h * z + _running_rows_matmul(d_h_gates, w_h, running, 1), d_h)
    # Slots past `running` belong to later steps, already done: keep them.
    old = lax.dynamic_slice_in_dim(d_x_gates, offset, batch)
    d_x = jnp.where(live, jnp.concatenate([d_r, d_z, d_n], axis=1), old)
    return d_h, lax.dynamic_update_slice_in_dim(d_x_gates, d_x, offset, 0)

  _, d_x_gates = lax.fori_loop(0, num_steps, step, (d_out, spent))

  # Weight gradients as a few large matmuls over all real tokens. Slots past
  # the last token hold junk (finite), masked out here.
  def block(i, acc):
    d_w_i, d_b_i, d_w_h, d_b_h, d_words = acc
    start = i * BLOCK_ROWS
    real = (start + jnp.arange(BLOCK_ROWS))[:, None] < total
    x = lax.dynamic_slice_in_dim(words, start, BLOCK_ROWS)
    h = lax.dynamic_slice_in_dim(states, start, BLOCK_ROWS)[:, :hidden]
    r = lax.dynamic_slice_in_dim(gates, start, BLOCK_ROWS)[:, :hidden]
    d_x = jnp.where(real, lax.dynamic_slice_in_dim(d_x_gates, start, BLOCK_ROWS), 0.0)
    d_hg = jnp.concatenate([d_x[:, :2 * hidden], d_x[:, 2 * hidden:] * r], axis=1)
    d_words = lax.dynamic_update_slice_in_dim(
        d_words, lax.dot_general(d_x, w_i, (((1,), (1,)), ((), ()))), start, 0)
    return (d_w_i + x.T @ d_x, d_b_i + d_x.sum(0), d_w_h + h.T @ d_hg,
            d_b_h + d_hg.sum(0), d_words)

  zeros = functools.partial(jnp.zeros, dtype=w_h.dtype)
  acc = (zeros(w_i.shape), zeros(w_i.shape[1]), zeros(w_h.shape), zeros(w_h.shape[1]),
         zeros(words.shape))
  d_w_i, d_b_i, d_w_h, d_b_h, d_words = lax.fori_loop(
      0, -(-total // BLOCK_ROWS), block, acc)
  return d_words, None, d_w_i, d_b_i, d_w_h, d_b_h


packed_gru.defvjp(_packed_gru_fwd, _packed_gru_bwd)


class PackedGRU(nn.Module):
  """The GRU's parameters (kernels with the 3 gates fused) applied with `packed_gru`.

  Attributes:
    hidden_dim: GRU hidden size.
  """
  hidden_dim: int

  @nn.compact
  def __call__(self, words, active, batch):
    """Runs `packed_gru`.

    Args:
      words: `[capacity, word_dim]` packed word vectors (`pack_tokens` order).
      active: `[max_len]` int32 captions running at each step.
      batch: number of captions (static).

    Returns:
      `[batch, hidden_dim]`, captions longest first.
    """
    gates = 3 * self.hidden_dim
    # GRUCell's initialisers: lecun_normal input kernels, orthogonal recurrent
    # kernels per gate, zero biases.
    w_i = self.param("input_kernel", nn.initializers.lecun_normal(),
                     (words.shape[1], gates))
    b_i = self.param("input_bias", nn.initializers.zeros_init(), (gates,))
    w_h = self.param("recurrent_kernel", stacked_orthogonal(3), (self.hidden_dim, gates))
    b_h = self.param("recurrent_bias", nn.initializers.zeros_init(), (gates,))
    return packed_gru(batch, words, active, w_i, b_i, w_h, b_h)


class GRUTextEncoder(nn.Module):
  """Word embedding -> 1-layer GRU -> hidden state at each caption's true length.

  As in VSE++ the GRU hidden size is the joint embedding size, and the final
  hidden state is the caption embedding (no projection on top). Parameters:
  `embed/embedding` `[vocab, word_dim]`, `gru/input_kernel` `[word_dim, 3 *
  hidden]`, `gru/input_bias`, `gru/recurrent_kernel` `[hidden, 3 * hidden]`,
  `gru/recurrent_bias`, gates in PyTorch's order (r, z, n). The recurrent bias
  of r and z is redundant with the input bias but kept, as in PyTorch's GRU.

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
      lengths: `[batch]` int32 true lengths, in [1, max_len]; a length of 0
        is read as 1.

    Returns:
      `[batch, hidden_dim]` float32, not normalised, rows in input order.
    """
    batch, max_len = tokens.shape
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, max_len)
    order = jnp.argsort(lengths, descending=True)  # stable
    active = jnp.sum(lengths[None, :] > jnp.arange(max_len)[:, None], axis=1)
    packed = pack_tokens(tokens[order], active)
    words = nn.Embed(self.vocab_size, self.word_dim, name="embed",
                     embedding_init=symmetric_uniform(0.1))(packed)
    hidden = PackedGRU(self.hidden_dim, name="gru")(words, active, batch)
    return jnp.zeros_like(hidden).at[order].set(hidden)
