"""Tests for ccr_jax.losses against plain-loop NumPy references."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccr_jax import losses
from ccr_jax import schema


def reference_hinge(img, txt, ids, margin, hardest, reduction):
  """Loop-by-loop VSE0/VSE++ loss and its gradients, in float64 NumPy.

  Returns (loss, d loss / d img, d loss / d txt). The gradient uses
  d S[a, b] / d img[a] = txt[b] and d S[a, b] / d txt[b] = img[a]; for the
  hardest variant only the (unique, given random data) argmax is active.
  """
  img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  n = img.shape[0]
  s = img @ txt.T
  d_s = np.zeros_like(s)
  total = 0.0
  for i in range(n):
    # Image i as query over captions j, then caption i as query over images j.
    for direction in ("i2t", "t2i"):
      costs = []
      for j in range(n):
        if ids[j] == ids[i]:
          continue
        neg = (i, j) if direction == "i2t" else (j, i)
        cost = margin + s[neg] - s[i, i]
        costs.append((max(cost, 0.0), neg))
      if not costs:
        continue
      chosen = [max(costs, key=lambda c: c[0])] if hardest else costs
      for cost, neg in chosen:
        if cost > 0.0:
          total += cost
          d_s[neg] += 1.0
          d_s[i, i] -= 1.0
  scale = 1.0 if reduction == "sum" else 1.0 / n
  return total * scale, d_s @ txt * scale, d_s.T @ img * scale


def random_embeddings(seed, n, dim):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(n, dim))
  # Weakly correlated pairs: about half of the hinges are active, so both the
  # active and the clipped branches of relu are exercised.
  txt = img + 3.0 * rng.normal(size=(n, dim))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  return img.astype(np.float32), txt.astype(np.float32)


IDS_UNIQUE = np.arange(6)
IDS_DUPLICATE = np.array([0, 0, 1, 2, 2, 3])  # rows 0,1 and 3,4 share an image
CASES = [
    (name, reduction, ids_name, ids)
    for name in ("vse0", "vse_pp")
    for reduction in ("sum", "mean")
    for ids_name, ids in (("unique", IDS_UNIQUE), ("duplicate", IDS_DUPLICATE))
]


@pytest.mark.parametrize("name,reduction,ids_name,ids", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_loss_and_grads_match_numpy_reference(name, reduction, ids_name, ids):
  del ids_name
  img, txt = random_embeddings(3, 6, 8)
  loss_fn = functools.partial(losses.get_loss(name), image_ids=jnp.asarray(ids),
                              margin=0.2, reduction=reduction, step=0)
  (loss, extras), (g_img, g_txt) = jax.jit(
      jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(img, txt)
  want, want_g_img, want_g_txt = reference_hinge(
      img, txt, ids, 0.2, hardest=(name == "vse_pp"), reduction=reduction)
  # float32 sums of ~60 terms of magnitude <= 2.2: errors ~1e-6, so 1e-5 is tight.
  assert want > 0.0
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(extras["i2t"] + extras["t2i"], loss, rtol=1e-6)
  np.testing.assert_allclose(g_img, want_g_img, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_txt, want_g_txt, rtol=1e-5, atol=1e-5)


def test_reference_cases_are_discriminative():
  # Guards the data of the test above: with it, VSE0 differs from VSE++ and
  # the duplicate ids change the loss, so a mask or reduction bug would show.
  img, txt = random_embeddings(3, 6, 8)
  value = lambda name, ids: losses.get_loss(name)(img, txt, image_ids=ids)[0]
  assert abs(value("vse0", IDS_UNIQUE) - value("vse_pp", IDS_UNIQUE)) > 1.0
  for name in ("vse0", "vse_pp"):
    assert abs(value(name, IDS_UNIQUE) - value(name, IDS_DUPLICATE)) > 0.1


@pytest.mark.parametrize("name", ["vse0", "vse_pp"])
def test_grads_match_finite_differences_in_float64(name):
  with jax.enable_x64(True):
    img, txt = (x.astype(np.float64) for x in random_embeddings(1, 5, 4))
    ids = jnp.asarray([0, 1, 1, 2, 3])
    loss_fn = functools.partial(losses.get_loss(name), image_ids=ids, margin=0.2,
                                reduction="sum", step=0)
    scalar = jax.jit(lambda a, b: loss_fn(a, b)[0])
    g_img, g_txt = jax.grad(scalar, argnums=(0, 1))(img, txt)
    assert g_img.dtype == jnp.float64
    h = 1e-6
    for arg, grad in ((0, g_img), (1, g_txt)):
      numeric = np.zeros_like(np.asarray(grad))
      for idx in np.ndindex(*numeric.shape):
        plus = [np.array(img), np.array(txt)]
        minus = [np.array(img), np.array(txt)]
        plus[arg][idx] += h
        minus[arg][idx] -= h
        numeric[idx] = (scalar(*plus) - scalar(*minus)) / (2 * h)
      # The loss is piecewise linear in each coordinate (bilinear scores), so
      # central differences are exact up to float64 rounding (~1e-10) unless a
      # hinge sits within h of its kink, which these seeds avoid.
      np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_hand_computed_two_by_two():
  img = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  txt = jnp.array([[1.0, 0.0], [0.6, 0.8]])
  # S = [[1, .6], [0, .8]], margin .5:
  #   i2t row 0: relu(.5 + .6 - 1) = .1;   row 1: relu(.5 + 0 - .8) = 0
  #   t2i col 0: relu(.5 + 0 - 1) = 0;     col 1: relu(.5 + .6 - .8) = .3
  # One negative per row, so VSE0 and VSE++ agree: .4 summed, .2 averaged.
  for name in ("vse0", "vse_pp"):
    loss_fn = losses.get_loss(name)
    loss, extras = jax.jit(functools.partial(loss_fn, margin=0.5, reduction="sum", step=0))(
        img, txt, image_ids=jnp.array([0, 1]))
    # 1e-6: float32 rounding of 0.6 and 0.8.
    np.testing.assert_allclose(loss, 0.4, atol=1e-6)
    np.testing.assert_allclose(extras["i2t"], 0.1, atol=1e-6)
    np.testing.assert_allclose(extras["t2i"], 0.3, atol=1e-6)
    np.testing.assert_allclose(extras["mean_positive"], 0.9, atol=1e-6)
    loss, _ = jax.jit(functools.partial(loss_fn, margin=0.5, reduction="mean", step=0))(
        img, txt, image_ids=jnp.array([0, 1]))
    np.testing.assert_allclose(loss, 0.2, atol=1e-6)
    # Both captions of one image: no negatives at all, zero loss and gradient.
    same = functools.partial(loss_fn, image_ids=jnp.array([7, 7]), margin=0.5,
                             reduction="sum", step=0)
    loss, grads = jax.jit(jax.value_and_grad(lambda a, b: same(a, b)[0], argnums=(0, 1)))(
        img, txt)
    assert loss == 0.0
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_vse_pp_warmup_switches_under_jit_without_retracing():
  img, txt = random_embeddings(2, 6, 8)
  ids = jnp.asarray(IDS_DUPLICATE)
  vse0_value = losses.vse0(img, txt, image_ids=ids, margin=0.2)[0]
  hardest_value = losses.contrastive_hinge(img, txt, image_ids=ids, margin=0.2,
                                           hardest=True)[0]
  assert abs(vse0_value - hardest_value) > 0.1  # the two phases are distinguishable

  traces = []
  loss_fn = functools.partial(losses.get_loss("vse_pp"), margin=0.2, reduction="sum",
                              warmup_steps=3)

  @jax.jit
  def step_fn(a, b, step):
    traces.append(1)  # runs once per trace, not per call
    return jax.value_and_grad(lambda x, y: loss_fn(x, y, image_ids=ids, step=step),
                              argnums=(0, 1), has_aux=True)(a, b)

  for step in range(6):
    (loss, extras), _ = step_fn(img, txt, jnp.asarray(step, jnp.int32))
    want = vse0_value if step < 3 else hardest_value
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert extras["hardest"] == float(step >= 3)
  assert len(traces) == 1


def test_vse_pp_without_warmup_is_hardest_and_needs_no_step():
  img, txt = random_embeddings(3, 4, 8)
  ids = jnp.arange(4)
  loss, _ = losses.vse_pp(img, txt, image_ids=ids)
  want, _, _ = reference_hinge(img, txt, np.arange(4), 0.2, hardest=True, reduction="sum")
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  with pytest.raises(ValueError, match="step"):
    losses.vse_pp(img, txt, image_ids=ids, warmup_steps=2)


def test_bfloat16_embeddings_are_scored_in_float32():
  img, txt = random_embeddings(4, 6, 8)
  loss, _ = losses.vse0(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16),
                        image_ids=jnp.arange(6))
  assert loss.dtype == jnp.float32


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="vse0.*vse_pp"):
    losses.get_loss("infonce_typo")
  img, txt = random_embeddings(5, 2, 4)
  with pytest.raises(ValueError, match="reduction"):
    losses.vse0(img, txt, image_ids=jnp.arange(2), reduction="max")


# ------------------------------------------------------------ InfoNCE, SigLIP


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def reference_infonce(img, txt, ids, scale, reduction="mean"):
  """CLIP's symmetric cross-entropy, loop by loop in float64 NumPy.

  Row i's softmax runs over i itself and the j with another image id.
  """
  s = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
  n = len(ids)
  i2t, t2i = [], []
  for i in range(n):
    allowed = [j for j in range(n) if j == i or ids[j] != ids[i]]
    i2t.append(np.log(sum(np.exp(scale * s[i, j]) for j in allowed)) - scale * s[i, i])
    t2i.append(np.log(sum(np.exp(scale * s[j, i]) for j in allowed)) - scale * s[i, i])
  reduce = np.mean if reduction == "mean" else np.sum
  return 0.5 * (reduce(i2t) + reduce(t2i))


def reference_siglip(img, txt, ids, scale, bias, reduction="mean"):
  """SigLIP's pairwise sigmoid loss, loop by loop in float64 NumPy."""
  s = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
  n = len(ids)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i == j:
        total -= _log_sigmoid(scale * s[i, j] + bias)
      elif ids[i] != ids[j]:
        total -= _log_sigmoid(-(scale * s[i, j] + bias))
  return total / n if reduction == "mean" else total


def _numeric_grad(fn, args, h=1e-6):
  """Central differences of a float64 NumPy function w.r.t. every entry of args."""
  grads = []
  for a, arg in enumerate(args):
    arg = np.asarray(arg, np.float64)
    grad = np.zeros_like(arg)
    for idx in np.ndindex(*arg.shape):
      plus = [np.array(x, np.float64) for x in args]
      minus = [np.array(x, np.float64) for x in args]
      plus[a][idx] += h
      minus[a][idx] -= h
      grad[idx] = (fn(*plus) - fn(*minus)) / (2 * h)
    grads.append(grad)
  return grads


SMOOTH_CASES = [(name, reduction, ids_name, ids)
                for name in ("infonce", "siglip")
                for reduction in ("mean", "sum")
                for ids_name, ids in (("unique", IDS_UNIQUE), ("duplicate", IDS_DUPLICATE))]


@pytest.mark.parametrize("name,reduction,ids_name,ids", SMOOTH_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in SMOOTH_CASES])
def test_smooth_losses_and_grads_match_numpy_reference(name, reduction, ids_name, ids):
  """Values and gradients (embeddings and learnable temperature / bias)."""
  del ids_name
  img, txt = random_embeddings(4, 6, 8)
  log_scale, bias = np.log(1 / 0.1), -2.0
  params = {"log_scale": jnp.float32(log_scale)}
  if name == "siglip":
    params["bias"] = jnp.float32(bias)

  def loss_of(a, b, p):
    return losses.get_loss(name)(a, b, image_ids=jnp.asarray(ids), reduction=reduction,
                                 loss_params=p)[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_of, argnums=(0, 1, 2)))(img, txt, params)
  if name == "infonce":
    ref = lambda a, b, ls: reference_infonce(a, b, ids, np.exp(ls), reduction)
    ref_args = (img, txt, np.array(log_scale))
  else:
    ref = lambda a, b, ls, bb: reference_siglip(a, b, ids, np.exp(ls), bb, reduction)
    ref_args = (img, txt, np.array(log_scale), np.array(bias))
  # float32 logits up to 10 summed over 36 pairs: ~1e-6 relative error.
  np.testing.assert_allclose(loss, ref(*ref_args), rtol=1e-5)
  want = _numeric_grad(ref, ref_args)
  got = [grads[0], grads[1], grads[2]["log_scale"]]
  if name == "siglip":
    got.append(grads[2]["bias"])
  for g, w in zip(got, want):
    # Gradient entries are O(1-10) (logit scale 10); float32 accumulation and
    # the O(h^2) = 1e-12 difference error stay far below 1e-4.
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  # The learnable scalars do receive gradient.
  assert all(abs(float(x)) > 1e-4 for x in jax.tree.leaves(grads[2]))


def test_duplicates_change_the_smooth_losses():
  # Guards the case above: the masking is visible in the values.
  img, txt = random_embeddings(4, 6, 8)
  for name in ("infonce", "siglip"):
    value = lambda ids: losses.get_loss(name)(img, txt, image_ids=jnp.asarray(ids))[0]
    assert abs(value(IDS_UNIQUE) - value(IDS_DUPLICATE)) > 1e-3


def test_infonce_hand_computed_two_by_two():
  # S = [[1, 0], [0, 1]] at temperature 1: every row and column is
  # log(e + 1) - 1; both directions equal, so the loss is that too.
  eye = jnp.eye(2)
  loss, extras = losses.infonce(eye, eye, image_ids=jnp.arange(2), temperature=1.0)
  np.testing.assert_allclose(loss, np.log(np.e + 1) - 1, rtol=1e-6)
  np.testing.assert_allclose(extras["temperature"], 1.0, rtol=1e-6)
  # SigLIP at t=1, b=0: 2 positives of -log sigmoid(1), 2 negatives of
  # -log sigmoid(-0) = log 2, divided by B = 2.
  loss, _ = losses.siglip(eye, eye, image_ids=jnp.arange(2), temperature=1.0, bias=0.0)
  np.testing.assert_allclose(loss, (-2 * _log_sigmoid(1.0) + 2 * np.log(2)) / 2,
                             rtol=1e-6)


def test_learnable_logit_scale_is_clipped_like_clip():
  img, txt = random_embeddings(4, 4, 8)
  big = {"log_scale": jnp.float32(np.log(1000.0))}
  _, extras = losses.infonce(img, txt, image_ids=jnp.arange(4), loss_params=big)
  np.testing.assert_allclose(extras["temperature"], 1 / losses.MAX_LOGIT_SCALE, rtol=1e-6)


# -------------------------------------------------------- compiled variants

ALL_LOSSES = ("vse0", "vse_pp", "infonce", "siglip")
VARIANTS = [dict(block_size=b, remat=r) for b in (0, 4, 8) for r in (False, True)]


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"b{v['block_size']}-r{v['remat']}")
def test_float32_variants_equal_dense(name, variant):
  img, txt = random_embeddings(6, 16, 8)
  ids = jnp.asarray(np.repeat(np.arange(8), 2))  # every image twice
  params = losses.initial_params(ml_collections.ConfigDict(dict(
      name=name, temperature=0.1, learn_temperature=True, bias=-2.0)))

  def run(**v):
    fn = functools.partial(losses.get_loss(name), image_ids=ids, loss_params=params, **v)
    return jax.jit(jax.value_and_grad(lambda a, b: fn(a, b)[0], argnums=(0, 1)))(img, txt)

  (want, want_grads), (got, got_grads) = run(), run(**variant)
  # The blocked form takes positives from a row-wise dot product instead of
  # the matrix diagonal: equal up to float32 rounding (~1e-7 per score).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("block_size", [0, 4])
def test_bfloat16_matmul_variant_is_close_to_float32(name, block_size):
  img, txt = random_embeddings(7, 16, 32)
  ids = jnp.arange(16)
  value = lambda dtype: losses.get_loss(name)(
      img, txt, image_ids=ids, matmul_dtype=dtype, block_size=block_size)[0]
  want, got = value("float32"), value("bfloat16")
  # bfloat16 keeps 8 mantissa bits: each input rounds by up to 2^-9 relative,
  # so a unit-norm dot product moves by ~2^-8; the losses are sums of smooth or
  # piecewise-linear functions of scores with slope <= 1/T = 14, so 5% bounds it.
  np.testing.assert_allclose(got, want, rtol=5e-2)
  assert got != want  # the variant really rounds


def test_block_size_must_divide_the_batch():
  img, txt = random_embeddings(1, 6, 4)
  with pytest.raises(ValueError, match="divide"):
    losses.vse0(img, txt, image_ids=jnp.arange(6), block_size=4)


@pytest.mark.parametrize("field,value,match", [
    ("reduction", "max", "reduction"), ("matmul_dtype", "float16", "matmul_dtype"),
    ("block_size", -1, "block_size"), ("temperature", 0.0, "temperature")])
def test_make_loss_rejects_bad_settings(field, value, match):
  cfg = ml_collections.ConfigDict(dict(
      name="infonce", margin=0.2, reduction="mean", warmup_steps=0, temperature=0.07,
      learn_temperature=False, bias=-10.0, block_size=0, matmul_dtype="float32",
      remat=False))
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    losses.make_loss(cfg)


# ------------------------------------------------------------------ registry


# configs/default.py's loss section, written out: the declared defaults must
# reproduce it exactly.
DEFAULT_LOSS_SECTION = dict(
    name="vse0", margin=0.2, reduction="sum", warmup_steps=0, temperature=0.07,
    learn_temperature=False, bias=-10.0, block_size=0, matmul_dtype="float32",
    remat=False)


def _default_loss_config(**overrides):
  cfg = schema.defaults(losses.config_keys())
  cfg.update(overrides)
  return cfg


def test_config_keys_are_the_default_config_section():
  keys = losses.config_keys()
  defaults = {name: key.default for name, key in keys.items()}
  assert defaults == DEFAULT_LOSS_SECTION
  assert [type(v) for v in defaults.values()] == [
      type(v) for v in DEFAULT_LOSS_SECTION.values()]  # 0.2 is no 0, False no 0
  for name in losses.names():
    # Every key a loss binds is declared (with a doc), and none is a variant key.
    entry = losses.get(name)
    assert set(entry.settings) <= keys.keys() - set(losses.VARIANT_SETTINGS), name
  assert set(losses.VARIANT_SETTINGS) <= keys.keys()
  assert all(key.doc for key in keys.values())
  assert keys["name"].check("siglip") is None and keys["name"].check("clip")


def test_registry_names_every_loss_once():
  assert losses.names() == tuple(losses.LOSSES) == ALL_LOSSES
  assert {losses.get(name).name for name in losses.names()} == set(ALL_LOSSES)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_make_loss_binds_the_settings_the_entry_names(name):
  # Settings away from every function default, so an unbound one would show.
  cfg = _default_loss_config(name=name, margin=0.35, reduction="mean",
                             warmup_steps=0, temperature=0.2, bias=-1.5)
  img, txt = random_embeddings(8, 6, 8)
  ids = jnp.asarray(IDS_DUPLICATE)
  got, _ = losses.make_loss(cfg)(img, txt, image_ids=ids, step=0)
  explicit = {"vse0": dict(margin=0.35, reduction="mean"),
              "vse_pp": dict(margin=0.35, reduction="mean", warmup_steps=0),
              "infonce": dict(temperature=0.2, reduction="mean"),
              "siglip": dict(temperature=0.2, bias=-1.5, reduction="mean")}[name]
  want, _ = losses.get_loss(name)(img, txt, image_ids=ids, step=0, **explicit)
  np.testing.assert_array_equal(got, want)
  if name in ("vse0", "vse_pp"):
    want = reference_hinge(img, txt, IDS_DUPLICATE, 0.35, hardest=name == "vse_pp",
                           reduction="mean")[0]
  elif name == "infonce":
    want = reference_infonce(img, txt, IDS_DUPLICATE, 1 / 0.2)
  else:
    want = reference_siglip(img, txt, IDS_DUPLICATE, 1 / 0.2, -1.5)
  # float32 against float64 references: ~1e-6 relative.
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_initial_params_come_from_the_entries():
  for name in ("vse0", "vse_pp"):
    assert losses.initial_params(_default_loss_config(
        name=name, learn_temperature=True)) is None
  for name in ("infonce", "siglip"):
    assert losses.initial_params(_default_loss_config(name=name)) is None
  infonce = losses.initial_params(_default_loss_config(
      name="infonce", learn_temperature=True, temperature=0.07))
  assert infonce.keys() == {"log_scale"}
  np.testing.assert_allclose(infonce["log_scale"], np.log(1 / 0.07), rtol=1e-6)
  siglip = losses.initial_params(_default_loss_config(
      name="siglip", learn_temperature=True, temperature=0.1, bias=-10.0))
  assert siglip.keys() == {"log_scale", "bias"}
  assert all(v.dtype == jnp.float32 for v in siglip.values())
  np.testing.assert_allclose(siglip["log_scale"], np.log(10.0), rtol=1e-6)
  assert siglip["bias"] == -10.0
  with pytest.raises(ValueError, match="vse0"):
    losses.initial_params(_default_loss_config(name="clip"))


def test_make_loss_names_every_bad_setting():
  cfg = ml_collections.ConfigDict({**DEFAULT_LOSS_SECTION, "name": "vse_pp",
                                   "warmup_steps": -1, "margin": "wide"})
  with pytest.raises(ValueError) as error:
    losses.make_loss(cfg)
  message = str(error.value)
  assert "--config.loss.warmup_steps=-1" in message
  assert "--config.loss.margin='wide' must be a number" in message
