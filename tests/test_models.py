"""Tests for the image towers, the text tower and the dual encoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccr_jax.models import dual_encoder
from ccr_jax.models import image_towers
from ccr_jax.models import text_towers
from ccr_jax.models.dual_encoder import DualEncoder

VOCAB = 30
DIM = 16



def assert_leaves_close(got_tree, want_tree, rel_atol):
  """Every leaf of `got_tree` within rel_atol * max|leaf| of `want_tree`'s (same keys)."""
  for path, got in jax.tree_util.tree_leaves_with_path(got_tree):
    want = want_tree
    for key in path:
      want = want[key.key]
    np.testing.assert_allclose(got, want, atol=rel_atol * float(jnp.max(jnp.abs(want))),
                               err_msg=jax.tree_util.keystr(path))

def model_config(**overrides):
  fields = dict(image_tower="cnn", text_tower="gru", embed_dim=DIM, word_dim=8,
                cnn_widths=(4, 8))
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def random_batch(seed, batch, image_shape, max_len, dtype=np.uint8):
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    images = rng.integers(0, 256, size=(batch, *image_shape), dtype=np.uint8)
  else:
    images = rng.normal(size=(batch, *image_shape)).astype(dtype)
  lengths = rng.integers(1, max_len + 1, size=(batch,)).astype(np.int32)
  tokens = rng.integers(1, VOCAB, size=(batch, max_len)).astype(np.int32)
  tokens[np.arange(max_len)[None, :] >= lengths[:, None]] = 0  # <pad>
  return jnp.asarray(images), jnp.asarray(tokens), jnp.asarray(lengths)


@pytest.fixture(scope="module")
def cnn_model_and_params():
  # Built once: on CPU, compiling the initialisers dominates these tests.
  model = dual_encoder.build_model(model_config(), vocab_size=VOCAB)
  return model, dual_encoder.init_params(model, jax.random.key(0), (32, 32, 3), max_len=7)


@pytest.mark.parametrize("tower,image_shape,dtype", [
    ("cnn", (32, 32, 3), np.uint8),
    ("precomputed", (12,), np.float32),
    ("precomputed", (5, 12), np.float32),
])
def test_dual_encoder_shapes_norms_and_param_tree(tower, image_shape, dtype,
                                                  cnn_model_and_params):
  if tower == "cnn":
    model, params = cnn_model_and_params
  else:
    model = dual_encoder.build_model(model_config(image_tower=tower), vocab_size=VOCAB)
    params = dual_encoder.init_params(model, jax.random.key(0), image_shape, max_len=7)
  assert set(params) == {"img", "txt"}
  images, tokens, lengths = random_batch(0, 4, image_shape, 7, dtype)

  img_emb, txt_emb = jax.jit(model.apply)({"params": params}, images, tokens, lengths)
  assert img_emb.shape == txt_emb.shape == (4, DIM)
  # float32 normalisation: norms are 1 to within a few ulps.
  np.testing.assert_allclose(jnp.linalg.norm(img_emb, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(txt_emb, axis=1), 1.0, atol=1e-5)

  # The single-modality methods give the same embeddings (gallery embedding).
  alone = model.apply({"params": params}, images, method=DualEncoder.embed_images)
  np.testing.assert_allclose(alone, img_emb, atol=1e-6)
  alone = model.apply({"params": params}, tokens, lengths, method=DualEncoder.embed_texts)
  np.testing.assert_allclose(alone, txt_emb, atol=1e-6)


def test_init_params_works_under_eval_shape(cnn_model_and_params):
  model, params = cnn_model_and_params
  shapes = jax.eval_shape(lambda r: dual_encoder.init_params(model, r, (32, 32, 3), 7),
                          jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert shapes["txt"]["embed"]["embedding"].shape == (VOCAB, 8)
  gru = shapes["txt"]["gru"]
  assert gru["recurrent_kernel"].shape == (DIM, 3 * DIM)  # hidden = joint dim, gates fused
  assert gru["input_kernel"].shape == (8, 3 * DIM)
  assert gru["input_bias"].shape == gru["recurrent_bias"].shape == (3 * DIM,)


def test_gru_ignores_padding(cnn_model_and_params):
  _, params = cnn_model_and_params
  encoder = text_towers.GRUTextEncoder(vocab_size=VOCAB, hidden_dim=DIM, word_dim=8)
  params = {"params": params["txt"]}
  caption = np.array([5, 7, 9], np.int32)
  apply = jax.jit(encoder.apply)

  def embed(max_len, filler):
    tokens = np.full((1, max_len), filler, np.int32)
    tokens[0, :3] = caption
    return apply(params, jnp.asarray(tokens), jnp.array([3], jnp.int32))[0]

  base = embed(3, 0)
  # More padding, and padding of real (non-<pad>) ids, must not change the
  # state at length 3. The same arithmetic runs on the same prefix, so this is
  # exact up to XLA reassociation across shapes (1e-6).
  for max_len, filler in ((5, 0), (12, 0), (12, 11)):
    np.testing.assert_allclose(embed(max_len, filler), base, atol=1e-6)
  # And the output is the state at the true length, not at the end.
  full = apply(params, jnp.asarray([[5, 7, 9, 11, 11]], jnp.int32), jnp.array([5]))[0]
  assert np.max(np.abs(full - base)) > 1e-3

  # Per-example lengths in a mixed batch: each row matches its solo embedding
  # (same padded width, so one compilation serves all rows).
  _, tokens, lengths = random_batch(2, 6, (1,), 9)
  batched = apply(params, tokens, lengths)
  for i in range(6):
    solo = apply(params, tokens[i:i + 1], lengths[i:i + 1])[0]
    np.testing.assert_allclose(batched[i], solo, atol=1e-6)


def numpy_gru(params, tokens, lengths):
  """Float64 GRU, one caption and one step at a time: [batch, hidden]."""
  table = np.asarray(params["embed"]["embedding"], np.float64)
  gru = {k: np.asarray(v, np.float64) for k, v in params["gru"].items()}
  hidden = gru["recurrent_kernel"].shape[0]

  def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))

  out = []
  for caption, length in zip(np.asarray(tokens), np.asarray(lengths)):
    h = np.zeros(hidden)
    for token in caption[:max(int(length), 1)]:
      x_r, x_z, x_n = np.split(table[token] @ gru["input_kernel"] + gru["input_bias"], 3)
      h_r, h_z, h_n = np.split(h @ gru["recurrent_kernel"] + gru["recurrent_bias"], 3)
      r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
      n = np.tanh(x_n + r * h_n)
      h = (1.0 - z) * n + z * h
    out.append(h)
  return np.stack(out)


def scan_gru(params, tokens, lengths):
  """The same GRU as a plain `lax.scan` over the padded batch (autodiff reference)."""
  gru = params["gru"]
  words = params["embed"]["embedding"][tokens]  # [batch, max_len, word_dim]

  def step(h, inputs):
    x, t = inputs
    x_r, x_z, x_n = jnp.split(x @ gru["input_kernel"] + gru["input_bias"], 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ gru["recurrent_kernel"] + gru["recurrent_bias"], 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return jnp.where((t < lengths)[:, None], (1.0 - z) * n + z * h, h), None

  h0 = jnp.zeros((tokens.shape[0], gru["recurrent_kernel"].shape[0]))
  h, _ = jax.lax.scan(step, h0, (words.swapaxes(0, 1), jnp.arange(tokens.shape[1])))
  return h


def mixed_captions(seed, batch, max_len):
  """Unsorted lengths covering 1 and max_len; padding holds non-zero garbage ids."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len + 1, size=batch).astype(np.int32)
  lengths[:2] = [1, max_len]
  rng.shuffle(lengths)
  tokens = rng.integers(1, VOCAB, size=(batch, max_len)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(lengths)


# Block size 8 splits the hoisted matmuls into many blocks; the default runs one.
@pytest.mark.parametrize("block_rows", [8, pytest.param(text_towers.BLOCK_ROWS,
                                                     marks=pytest.mark.slow)])
def test_gru_matches_references(block_rows, monkeypatch):
  monkeypatch.setattr(text_towers, "BLOCK_ROWS", block_rows)
  # Batch 20: the step matmul switches between row counts 8, 16 and 20.
  tokens, lengths = mixed_captions(5, batch=20, max_len=9)
  encoder = text_towers.GRUTextEncoder(vocab_size=VOCAB, hidden_dim=DIM, word_dim=8)
  params = jax.jit(encoder.init)(jax.random.key(1), tokens, lengths)["params"]
  # Non-zero biases, so that every bias is checked.
  params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                        params)
  traces = []

  def embed(p, t, l):
    traces.append(None)
    return encoder.apply({"params": p}, t, l)

  embed = jax.jit(embed)
  out = embed(params, tokens, lengths)
  # float32 against float64: states stay in (-1, 1) and the recurrence does
  # not amplify errors here; observed max error 6e-8, bound ~15x that.
  np.testing.assert_allclose(out, numpy_gru(params, tokens, lengths), atol=1e-6)
  np.testing.assert_allclose(out, scan_gru(params, tokens, lengths), atol=1e-6)

  # Other lengths, same shapes: no new compilation; a length of 0 reads as 1.
  other = lengths.at[0].set(0)
  np.testing.assert_allclose(embed(params, tokens, other),
                             numpy_gru(params, tokens, other), atol=1e-6)
  assert len(traces) == 1

  # The hand-written VJP against autodiff of the scan, for every parameter.
  cotangent = jnp.asarray(np.random.default_rng(6).normal(size=out.shape), jnp.float32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(embed(p, tokens, lengths) * cotangent)))(params)
  expected = jax.grad(lambda p: jnp.sum(scan_gru(p, tokens, lengths) * cotangent))(params)
  # Both float32, summed in different orders: observed within 3e-7 of the
  # largest entry; bound ~7x that.
  assert_leaves_close(grads, expected, rel_atol=2e-6)
  assert float(jnp.max(jnp.abs(grads["gru"]["recurrent_kernel"]))) > 0.0


def test_gru_keeps_row_order(cnn_model_and_params):
  _, params = cnn_model_and_params
  encoder = text_towers.GRUTextEncoder(vocab_size=VOCAB, hidden_dim=DIM, word_dim=8)
  tokens, lengths = mixed_captions(7, batch=10, max_len=7)
  apply = jax.jit(encoder.apply)
  out = apply({"params": params["txt"]}, tokens, lengths)
  permutation = np.random.default_rng(8).permutation(10)
  permuted = apply({"params": params["txt"]}, tokens[permutation], lengths[permutation])
  np.testing.assert_allclose(permuted, out[permutation], atol=1e-6)  # same math per row


def test_gru_init_is_gru_cell_like(cnn_model_and_params):
  _, params = cnn_model_and_params
  gru = params["txt"]["gru"]
  for block in np.split(np.asarray(gru["recurrent_kernel"]), 3, axis=1):
    np.testing.assert_allclose(block.T @ block, np.eye(DIM), atol=1e-5)  # orthogonal per gate
  assert not np.any(gru["input_bias"]) and not np.any(gru["recurrent_bias"])


def test_word_embedding_init_is_vse_uniform(cnn_model_and_params):
  _, params = cnn_model_and_params
  table = np.asarray(params["txt"]["embed"]["embedding"])
  assert table.min() >= -0.1 and table.max() <= 0.1
  draws = np.asarray(text_towers.symmetric_uniform(0.1)(jax.random.key(0), (20000,)))
  # 20k draws from U(-0.1, 0.1): the extremes come within 1e-3 of the limits
  # with probability 1 - 2 * exp(-100), and the mean is 0 to within 5 sigma.
  assert draws.min() >= -0.1 and draws.max() <= 0.1
  assert draws.min() < -0.099 and draws.max() > 0.099
  assert abs(draws.mean()) < 5 * 0.2 / np.sqrt(12 * 20000)


def test_precomputed_projection_averages_regions():
  projection = image_towers.PrecomputedProjection(embed_dim=DIM)
  regions = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 10)), jnp.float32)
  params = projection.init(jax.random.key(0), regions[:, 0])
  out_regions = projection.apply(params, regions)
  out_pooled = projection.apply(params, regions.mean(axis=1))
  assert out_regions.shape == (3, DIM)
  np.testing.assert_allclose(out_regions, out_pooled, atol=1e-6)  # float32 rounding
  with pytest.raises(ValueError, match="regions"):
    projection.apply(params, regions[None])


def test_cnn_scales_uint8_to_unit_interval(cnn_model_and_params):
  _, params = cnn_model_and_params
  cnn = image_towers.SmallCNN(embed_dim=DIM, widths=(4, 8))
  params = {"params": params["img"]}
  pixels = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), np.uint8))
  scaled = pixels.astype(jnp.float32) / 127.5 - 1.0
  np.testing.assert_allclose(cnn.apply(params, pixels), cnn.apply(params, scaled), atol=1e-6)
  assert image_towers.scale_pixels(jnp.array([0, 255], jnp.uint8)).tolist() == [-1.0, 1.0]


def test_l2_normalize_is_safe_for_zero_rows():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(dual_encoder.l2_normalize(x), [[0.0, 0.0], [0.6, 0.8]], atol=1e-7)
  grad = jax.grad(lambda v: dual_encoder.l2_normalize(v).sum())(x)
  assert np.all(np.isfinite(grad))


def test_gradients_reach_both_towers(cnn_model_and_params):
  model, params = cnn_model_and_params
  images, tokens, lengths = random_batch(4, 4, (32, 32, 3), 7)

  def loss(p):
    img_emb, txt_emb = model.apply({"params": p}, images, tokens, lengths)
    return -jnp.sum(img_emb * txt_emb)

  grads = jax.jit(jax.grad(loss))(params)
  for tower in ("img", "txt"):
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads[tower])]
    assert all(np.isfinite(norms)) and max(norms) > 0.0


@pytest.mark.parametrize("field,name", [("image_tower", "resnet9000"), ("text_tower", "lstm")])
def test_unknown_tower_raises_with_valid_names(field, name):
  with pytest.raises(ValueError, match=r"valid: \[.*'"):
    dual_encoder.build_model(model_config(**{field: name}), vocab_size=VOCAB)
  with pytest.raises(ValueError, match="cnn" if field == "image_tower" else "gru"):
    dual_encoder.build_model(model_config(**{field: name}), vocab_size=VOCAB)
