"""Text towers: the VSE++ GRU caption encoder.

Maps padded token ids `[batch, max_len]` plus true lengths `[batch]` to
unnormalised embeddings `[batch, hidden_dim]`; the dual encoder normalises.

Two implementations of the same GRU, with the same parameters (snapshots
load into either), chosen by `GRUTextEncoder.gru_impl` (`model.gru_impl`):
"packed" (`packed_gru`, for CPU) and "scan" (`scan_gru`, for GPU and TPU);
"auto" picks by `jax.default_backend()` (`resolve_gru_impl`).

"packed": the GRU does no work on padding. Captions are sorted longest
first, so at step t the captions still running are the first `active[t]`
rows, and their real tokens are packed step-major into one `[capacity,
word_dim]` array (PyTorch's `pack_padded_sequence` layout, padded to a static
capacity). Then:
  * the input projection of every real token is one hoisted matmul (run in
    row blocks up to the number of real tokens, not over the padded batch);
  * each step runs one fused `[rows, hidden] @ [hidden, 3 * hidden]` matmul
    on the smallest of a few static row counts that covers the running rows;
  * the loop stops at the batch's longest caption.
Trip counts are dynamic (`while` loops), so reverse-mode autodiff cannot go
through them; `packed_gru` has a hand-written VJP, which also hoists the
weight gradients into large matmuls over all real tokens after the loop.
Shapes stay static: one compilation per `[batch, max_len]`.

"scan": a fixed trip count of `max_len` steps over the padded, unsorted batch,
each caption's state frozen after its length. The input projection of every
token (padding included) is one `[max_len * batch, word_dim]` matmul before
the loop, each step one `[batch, hidden] @ [hidden, 3 * hidden]` matmul, and
`scan_gru`'s hand-written VJP runs the backward as another fixed-length scan
with one `[batch, 3 * hidden] @ [3 * hidden, hidden]` matmul per step, the
weight gradients as single matmuls over all tokens after it (cuDNN's RNN
backward also leaves them to a separate pass). It spends FLOPs on padding,
but on an accelerator a loop whose trip count and shapes are static needs
nothing from the host between iterations, where the packed GRU's
data-dependent `while` bounds and per-step `lax.switch` can each cost a
device-to-host round trip per iteration on GPU.

Compute dtype (`GRUTextEncoder.dtype`, `train.compute_dtype`): every matmul
of both implementations, forward and backward (input projection, recurrent
matmul, and the weight and input gradients), takes its operands in that
dtype and accumulates and returns float32 (`preferred_element_type`). The
rest stays float32 whatever the dtype: the parameters and word vectors as
given (each matmul casts its copy), the biases, the gate nonlinearities, the
state and its gradient, and the saved residuals. The state because it is an
accumulator: h' = h + (1 - z) (n - h) adds an increment that, with z near 1
(a gate remembering), falls below half a bfloat16 ulp of h (about 2^-8 |h|)
and would be lost; the gates and residuals because they are
[batch, 3 * hidden] elementwise work per step, small next to the matmuls.
With float32 every cast is the identity: the program is the float32 one.
"""
import functools
from typing import Any

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


def _matmul(a, b, dtype, dimension_numbers=(((1,), (0,)), ((), ()))):
  """`lax.dot_general(a, b)` on operands cast to `dtype`, accumulated and returned in float32.

  The default contracts `a`'s last axis with `b`'s first (`a @ b` for
  matrices); `(((1,), (1,)), ((), ()))` multiplies by `b.T` without
  materialising it.
  """
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dimension_numbers,
                         preferred_element_type=jnp.float32)


def _row_step(batch):
  """Granularity of the row counts a step's matmul runs on: about 8 counts up to batch."""
  return max(8, -(-batch // 8))


def _running_rows_matmul(a, w, running, w_contracting_dim=0, dtype=jnp.float32):
  """`a @ w` for the first `running` rows of `a` `[batch, k]`; later rows are 0.

  Runs on the smallest static row count that covers `running` (`lax.switch`
  between a few compiled matmuls), so finished captions cost little.
  `w_contracting_dim=1` multiplies by `w.T` without materialising it. The
  operands are cast to `dtype`; the result is float32 (`_matmul`).
  """
  batch = a.shape[0]
  step = _row_step(batch)
  counts = tuple(range(step, batch, step)) + (batch,)

  def branch(rows):
    def matmul(a):
      out = _matmul(a[:rows], w, dtype, (((1,), (w_contracting_dim,)), ((), ())))
      return jnp.pad(out, ((0, batch - rows), (0, 0)))
    return matmul

  index = (running - 1) // step  # the first count >= running; switch clamps
  return lax.switch(index, [branch(rows) for rows in counts], a)


def _block_matmul(x, w, b, num_rows, dtype=jnp.float32):
  """`x @ w + b` for rows below `num_rows` of `x` `[capacity, k]`, in blocks; the rest 0.

  The matmul's operands are cast to `dtype`; the result is float32.
  """
  out = jnp.zeros((x.shape[0], w.shape[1]), jnp.float32)

  def block(i, out):
    rows = lax.dynamic_slice_in_dim(x, i * BLOCK_ROWS, BLOCK_ROWS)
    return lax.dynamic_update_slice_in_dim(out, _matmul(rows, w, dtype) + b,
                                           i * BLOCK_ROWS, 0)

  return lax.fori_loop(0, -(-num_rows // BLOCK_ROWS), block, out)


def _split_gates(gates):
  return jnp.split(gates, 3, axis=-1)


def _gru_forward(batch, words, active, w_i, b_i, w_h, b_h, keep_residuals, dtype):
  """The recurrence over packed tokens; see `packed_gru`.

  Returns the final states and, with `keep_residuals`, `[capacity, ...]`
  buffers in packed order: the input projection (consumed; the backward
  reuses its memory), the gates r, z, n, and the state before each step
  next to the recurrent part of n's pre-activation (h W_h[n] + b_h[n]).
  """
  hidden = w_h.shape[0]
  capacity = words.shape[0]
  offsets = jnp.cumsum(active) - active
  # Kernels cast once, outside the loops (`_matmul`'s casts are then no-ops).
  w_i, w_h = w_i.astype(dtype), w_h.astype(dtype)
  input_gates = _block_matmul(words, w_i, b_i, jnp.sum(active), dtype)
  rows = jnp.arange(batch)[:, None]
  residuals = ((jnp.zeros((capacity, 3 * hidden), jnp.float32),
                jnp.zeros((capacity, 2 * hidden), jnp.float32)) if keep_residuals else ())

  def step(t, carry):
    h, residuals = carry
    offset, running = offsets[t], active[t]
    x_r, x_z, x_n = _split_gates(lax.dynamic_slice_in_dim(input_gates, offset, batch))
    h_r, h_z, h_n = _split_gates(_running_rows_matmul(h, w_h, running, dtype=dtype) + b_h)
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
  h0 = jnp.zeros((batch, hidden), jnp.float32)
  h, residuals = lax.fori_loop(0, num_steps, step, (h0, residuals))
  return h, (input_gates, *residuals)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def packed_gru(batch, words, active, w_i, b_i, w_h, b_h, dtype=jnp.float32):
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
    dtype: the matmuls' operand dtype (static; module docstring). Inputs,
      state and result are float32 whatever it is.

  Returns:
    `[batch, hidden]` float32: each caption's state after its last token,
    captions in the packed (longest first) order.
  """
  h, _ = _gru_forward(batch, words, active, w_i, b_i, w_h, b_h, keep_residuals=False,
                      dtype=dtype)
  return h


def _packed_gru_fwd(batch, words, active, w_i, b_i, w_h, b_h, dtype):
  h, residuals = _gru_forward(batch, words, active, w_i, b_i, w_h, b_h,
                              keep_residuals=True, dtype=dtype)
  return h, (words, active, w_i, w_h, *residuals)


def _packed_gru_bwd(batch, dtype, residuals, d_out):
  words, active, w_i, w_h, spent, gates, states = residuals
  primal_dtypes = words.dtype, w_i.dtype, w_h.dtype
  w_i, w_h = w_i.astype(dtype), w_h.astype(dtype)  # once, outside the loops
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
    d_h = jnp.where(
        live, d_h * z + _running_rows_matmul(d_h_gates, w_h, running, 1, dtype), d_h)
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
        d_words, _matmul(d_x, w_i, dtype, (((1,), (1,)), ((), ()))), start, 0)
    return (d_w_i + _matmul(x.T, d_x, dtype), d_b_i + d_x.sum(0),
            d_w_h + _matmul(h.T, d_hg, dtype), d_b_h + d_hg.sum(0), d_words)

  zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
  acc = (zeros(w_i.shape), zeros(w_i.shape[1]), zeros(w_h.shape), zeros(w_h.shape[1]),
         zeros(words.shape))
  d_w_i, d_b_i, d_w_h, d_b_h, d_words = lax.fori_loop(
      0, -(-total // BLOCK_ROWS), block, acc)
  # Cotangents in the primals' dtypes (float32 in the model).
  words_dtype, w_i_dtype, w_h_dtype = primal_dtypes
  return (d_words.astype(words_dtype), None, d_w_i.astype(w_i_dtype),
          d_b_i.astype(w_i_dtype), d_w_h.astype(w_h_dtype), d_b_h.astype(w_h_dtype))


packed_gru.defvjp(_packed_gru_fwd, _packed_gru_bwd)


def _scan_gru_forward(unroll, words, lengths, w_i, b_i, w_h, b_h, keep_residuals, dtype):
  """The recurrence over time-major padded tokens; see `scan_gru`.

  Returns the final states `[batch, hidden]` and, with `keep_residuals`, the
  gates r, z, n `[max_len, batch, 3 * hidden]` and the state before each step
  next to the recurrent part of n's pre-activation (h W_h[n] + b_h[n])
  `[max_len, batch, 2 * hidden]`: the packed GRU's residuals, step-major.
  """
  max_len, batch, word_dim = words.shape
  hidden = w_h.shape[0]
  w_h = w_h.astype(dtype)  # once, outside the loop
  # Every token's input projection, padding included, as ONE matmul: on an
  # accelerator a large matmul is cheaper than skipping the padding.
  input_gates = (_matmul(words.reshape(max_len * batch, word_dim), w_i, dtype)
                 + b_i).reshape(max_len, batch, 3 * hidden)
  live = (jnp.arange(max_len)[:, None] < lengths[None, :])[..., None]  # [max_len, batch, 1]

  def step(h, inputs):
    x_gates, live_t = inputs
    x_r, x_z, x_n = _split_gates(x_gates)
    # The 3 gates' recurrent matmuls fused.
    h_r, h_z, h_n = _split_gates(_matmul(h, w_h, dtype) + b_h)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    new_h = jnp.where(live_t, (1.0 - z) * n + z * h, h)  # frozen after the caption's end
    residuals = ((jnp.concatenate([r, z, n], axis=1), jnp.concatenate([h, h_n], axis=1))
                 if keep_residuals else None)
    return new_h, residuals

  h0 = jnp.zeros((batch, hidden), jnp.float32)
  return lax.scan(step, h0, (input_gates, live), unroll=unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7))
def scan_gru(unroll, words, lengths, w_i, b_i, w_h, b_h, dtype=jnp.float32):
  """The GRU of `packed_gru` as a fixed-length masked scan over padded tokens.

  Same math, gate order (r, z, n) and parameters as `packed_gru`; padding
  costs FLOPs, but every loop has a static trip count and static shapes.

  Args:
    unroll: time steps per loop iteration, as `lax.scan`'s `unroll` (static;
      True or `max_len` unrolls the whole loop).
    words: `[max_len, batch, word_dim]` word vectors, time-major; positions at
      or past a caption's length are ignored.
    lengths: `[batch]` int32 true lengths in [1, max_len] (the number of
      steps that update each caption's state).
    w_i: `[word_dim, 3 * hidden]` input kernel; b_i: `[3 * hidden]`.
    w_h: `[hidden, 3 * hidden]` recurrent kernel; b_h: `[3 * hidden]`.
    dtype: the matmuls' operand dtype (static; module docstring).

  Returns:
    `[batch, hidden]` float32: each caption's state after its last token,
    rows in input order.
  """
  h, _ = _scan_gru_forward(unroll, words, lengths, w_i, b_i, w_h, b_h,
                           keep_residuals=False, dtype=dtype)
  return h


def _scan_gru_fwd(unroll, words, lengths, w_i, b_i, w_h, b_h, dtype):
  h, (gates, states) = _scan_gru_forward(unroll, words, lengths, w_i, b_i, w_h, b_h,
                                         keep_residuals=True, dtype=dtype)
  return h, (words, lengths, w_i, w_h, gates, states)


def _scan_gru_bwd(unroll, dtype, residuals, d_out):
  words, lengths, w_i, w_h, gates, states = residuals
  max_len, batch, word_dim = words.shape
  hidden = w_h.shape[0]
  live = (jnp.arange(max_len)[:, None] < lengths[None, :])[..., None]
  w_h_compute = w_h.astype(dtype)  # once, outside the loop

  # Backward through time: per step only the gradient of the state, one
  # [batch, 3 * hidden] @ [3 * hidden, hidden] matmul. The weight gradients,
  # which autodiff of a scan would accumulate with one small-K matmul per
  # step, are left to single matmuls over all tokens after the loop.
  def step(d_h, inputs):
    gates_t, states_t, live_t = inputs
    r, z, n = _split_gates(gates_t)
    h, h_n = states_t[:, :hidden], states_t[:, hidden:]
    d_n = d_h * (1.0 - z) * (1.0 - n * n)
    d_r = d_n * h_n * r * (1.0 - r)
    d_z = d_h * (h - n) * z * (1.0 - z)
    # Rows past their caption's end passed the state through: no gate gradients.
    d_x = jnp.where(live_t, jnp.concatenate([d_r, d_z, d_n], axis=1), 0.0)
    d_h_gates = jnp.concatenate([d_x[:, :2 * hidden], d_x[:, 2 * hidden:] * r], axis=1)
    # d_h_gates @ w_h.T without materialising the transpose.
    d_h_prev = _matmul(d_h_gates, w_h_compute, dtype, (((1,), (1,)), ((), ())))
    return jnp.where(live_t, d_h * z, d_h) + d_h_prev, d_x

  _, d_x_gates = lax.scan(step, d_out, (gates, states, live), reverse=True, unroll=unroll)

  tokens = max_len * batch
  d_x = d_x_gates.reshape(tokens, 3 * hidden)  # zero at padding
  r = gates[..., :hidden].reshape(tokens, hidden)
  d_h_gates = jnp.concatenate([d_x[:, :2 * hidden], d_x[:, 2 * hidden:] * r], axis=1)
  h = states[..., :hidden].reshape(tokens, hidden)
  x = words.reshape(tokens, word_dim)
  d_words = _matmul(d_x, w_i, dtype, (((1,), (1,)), ((), ()))).reshape(words.shape)
  # Cotangents in the primals' dtypes (float32 in the model).
  return (d_words.astype(words.dtype), None, _matmul(x.T, d_x, dtype).astype(w_i.dtype),
          d_x.sum(0).astype(w_i.dtype), _matmul(h.T, d_h_gates, dtype).astype(w_h.dtype),
          d_h_gates.sum(0).astype(w_h.dtype))


scan_gru.defvjp(_scan_gru_fwd, _scan_gru_bwd)


def _gru_params(module, word_dim, hidden_dim):
  """Declares the GRU's parameters on `module`; both implementations share them.

  Returns (w_i `[word_dim, 3 * hidden]`, b_i `[3 * hidden]`, w_h `[hidden, 3 *
  hidden]`, b_h `[3 * hidden]`), named input_kernel, input_bias,
  recurrent_kernel, recurrent_bias. Same names and shapes, hence the same
  initial values from the same key, whichever implementation declares them.
  """
  gates = 3 * hidden_dim
  # GRUCell's initialisers: lecun_normal input kernels, orthogonal recurrent
  # kernels per gate, zero biases.
  w_i = module.param("input_kernel", nn.initializers.lecun_normal(), (word_dim, gates))
  b_i = module.param("input_bias", nn.initializers.zeros_init(), (gates,))
  w_h = module.param("recurrent_kernel", stacked_orthogonal(3), (hidden_dim, gates))
  b_h = module.param("recurrent_bias", nn.initializers.zeros_init(), (gates,))
  return w_i, b_i, w_h, b_h


class PackedGRU(nn.Module):
  """The GRU's parameters (kernels with the 3 gates fused) applied with `packed_gru`.

  Attributes:
    hidden_dim: GRU hidden size.
    dtype: the matmuls' operand dtype (module docstring).
  """
  hidden_dim: int
  dtype: Any = jnp.float32

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
    w_i, b_i, w_h, b_h = _gru_params(self, words.shape[1], self.hidden_dim)
    return packed_gru(batch, words, active, w_i, b_i, w_h, b_h, self.dtype)


class ScanGRU(nn.Module):
  """The GRU's parameters (as `PackedGRU`'s) applied with `scan_gru`.

  Attributes:
    hidden_dim: GRU hidden size.
    unroll: time steps per loop iteration (`lax.scan`'s `unroll`).
    dtype: the matmuls' operand dtype (module docstring).
  """
  hidden_dim: int
  unroll: int | bool = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, words, lengths):
    """Runs `scan_gru`.

    Args:
      words: `[max_len, batch, word_dim]` time-major word vectors.
      lengths: `[batch]` int32 true lengths in [1, max_len].

    Returns:
      `[batch, hidden_dim]`, rows in input order.
    """
    w_i, b_i, w_h, b_h = _gru_params(self, words.shape[2], self.hidden_dim)
    return scan_gru(self.unroll, words, lengths, w_i, b_i, w_h, b_h, self.dtype)


GRU_IMPLS = ("auto", "packed", "scan")


def resolve_gru_impl(gru_impl: str, backend: str | None = None) -> str:
  """The GRU implementation `gru_impl` ("auto", "packed" or "scan") means on `backend`.

  "auto" is "packed" on CPU, where skipping padding and finished captions
  saves real work and a data-dependent loop bound costs nothing, and "scan"
  on any other backend (GPU, TPU), where every loop should have a static
  trip count: see the module docstring.

  Args:
    gru_impl: one of `GRU_IMPLS`.
    backend: a platform name ("cpu", "gpu", "tpu", ...); None:
      `jax.default_backend()`, read when the model is traced.

  Raises:
    ValueError: `gru_impl` is not one of `GRU_IMPLS`.
  """
  if gru_impl not in GRU_IMPLS:
    raise ValueError(f"Unknown gru_impl {gru_impl!r}; valid: {list(GRU_IMPLS)}")
  if gru_impl != "auto":
    return gru_impl
  return "packed" if (backend or jax.default_backend()) == "cpu" else "scan"


class GRUTextEncoder(nn.Module):
  """Word embedding -> 1-layer GRU -> hidden state at each caption's true length.

  As in VSE++ the GRU hidden size is the joint embedding size, and the final
  hidden state is the caption embedding (no projection on top). Parameters:
  `embed/embedding` `[vocab, word_dim]`, `gru/input_kernel` `[word_dim, 3 *
  hidden]`, `gru/input_bias`, `gru/recurrent_kernel` `[hidden, 3 * hidden]`,
  `gru/recurrent_bias`, gates in PyTorch's order (r, z, n). The recurrent bias
  of r and z is redundant with the input bias but kept, as in PyTorch's GRU.

  The implementation (`gru_impl`) changes neither the parameters nor the
  math, only the speed on each backend and float32 rounding.

  Attributes:
    vocab_size: number of token ids, including `<pad>`.
    word_dim: word embedding size (VSE++: 300).
    hidden_dim: GRU hidden size = output embedding size.
    gru_impl: "packed" (`PackedGRU`), "scan" (`ScanGRU`) or "auto" (packed
      on CPU, scan elsewhere; `resolve_gru_impl`).
    gru_unroll: "scan" only: time steps per loop iteration.
    dtype: compute dtype of the GRU's matmuls (module docstring); the word
      embeddings are looked up in float32 and the output is float32.
  """
  vocab_size: int
  hidden_dim: int
  word_dim: int = 300
  gru_impl: str = "auto"
  gru_unroll: int | bool = 1
  dtype: Any = jnp.float32

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
    embed = nn.Embed(self.vocab_size, self.word_dim, name="embed",
                     embedding_init=symmetric_uniform(0.1))
    if resolve_gru_impl(self.gru_impl) == "scan":
      # Embedding the transposed ids gives time-major words without
      # transposing the [batch, max_len, word_dim] floats.
      return ScanGRU(self.hidden_dim, self.gru_unroll, self.dtype, name="gru")(
          embed(tokens.T), lengths)
    order = jnp.argsort(lengths, descending=True)  # stable
    active = jnp.sum(lengths[None, :] > jnp.arange(max_len)[:, None], axis=1)
    packed = pack_tokens(tokens[order], active)
    hidden = PackedGRU(self.hidden_dim, self.dtype, name="gru")(embed(packed), active, batch)
    return jnp.zeros_like(hidden).at[order].set(hidden)
