"""Mixed precision (`train.compute_dtype`): bfloat16 compute, float32 master weights.

Every test builds tiny towers of each kind through `dual_encoder.build_model`
(MiniLM with a shrunk encoder) and checks, against the float32 model with the
same parameters: the dtypes the program really computes in (its jaxpr,
traced from abstract shapes: nothing compiled), the dtypes of the state after
a step, and how far bfloat16 moves the loss, the gradients and the
embeddings. On CPU compiling dominates, so each model's parameters are
initialised once and the two dtypes' losses, gradients and embeddings come
from one compiled function each (`results`).
"""
import collections
import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.models import dual_encoder
from ccr_jax.models import minilm
from ccr_jax.run import config as config_lib
from configs import default

BATCH, MAX_LEN, DIM, VOCAB = 8, 6, 16, 20
# (image tower, text tower, gru_impl, one image's shape): every tower, and
# both GRU implementations.
TOWERS = {
    "cnn+packed": ("cnn", "gru", "packed", (8, 8, 3)),
    "precomputed+scan": ("precomputed", "gru", "scan", (4, 12)),
    "resnet18+packed": ("resnet18", "gru", "packed", (32, 32, 3)),
    "precomputed+minilm": ("precomputed", "minilm", "auto", (12,)),
}
# ResNet compiles slowly on CPU: in the jaxpr test (traced, not compiled) only.
COMPILED = ["cnn+packed", "precomputed+scan", "precomputed+minilm"]
# The compiled checks keep one setup in the fast loop (seconds of compiling each).
COMPILED_PARAMS = [pytest.param("cnn+packed", marks=pytest.mark.slow), "precomputed+scan",
                   pytest.param("precomputed+minilm", marks=pytest.mark.slow)]


def build(towers, compute_dtype):
  image_tower, text_tower, gru_impl, _ = TOWERS[towers]
  cfg = ml_collections.ConfigDict(dict(
      image_tower=image_tower, text_tower=text_tower, embed_dim=DIM, word_dim=8,
      cnn_widths=(4, 8), gru_impl=gru_impl))
  vocab = minilm.VOCAB_SIZE if text_tower == "minilm" else VOCAB
  model = dual_encoder.build_model(cfg, vocab, compute_dtype)
  if text_tower == "minilm":  # all-MiniLM-L6-v2's layout, shrunk
    model = model.clone(txt=model.txt.clone(encoder=minilm.BertEncoder(
        vocab_size=VOCAB, hidden_dim=24, num_layers=1, num_heads=2, mlp_dim=32,
        max_positions=MAX_LEN, dtype=model.txt.encoder.dtype)))
  return model


def init_fn(model, towers):
  return functools.partial(dual_encoder.init_params, model, jax.random.PRNGKey(0),
                           TOWERS[towers][3], MAX_LEN)


@functools.lru_cache(maxsize=None)
def params_for(towers):
  """The initial params, shared by both dtypes (they do not depend on it:
  `test_params_do_not_depend_on_the_compute_dtype`)."""
  return init_fn(build(towers, "float32"), towers)()


def batch_for(towers, seed=0):
  shape = TOWERS[towers][3]
  rng = np.random.default_rng(seed)
  if len(shape) == 3:
    images = rng.integers(0, 256, (BATCH, *shape), dtype=np.uint8)
  else:
    images = rng.normal(size=(BATCH, *shape)).astype(np.float32)
  lengths = rng.integers(2, MAX_LEN + 1, (BATCH,)).astype(np.int32)
  tokens = rng.integers(1, VOCAB, (BATCH, MAX_LEN)).astype(np.int32)
  tokens[np.arange(MAX_LEN)[None, :] >= lengths[:, None]] = 0
  return {"images": images, "tokens": tokens, "lengths": lengths,
          "image_ids": np.array([0, 0, 1, 2, 3, 4, 5, 6], np.int32)}


LOSS = ml_collections.ConfigDict(dict(name="vse0", margin=0.2, reduction="sum"))
OPTIM = ml_collections.ConfigDict(dict(learning_rate=1e-3, grad_clip=2.0, decay_at=0.5,
                                       decay_factor=0.1))


def recording_transform(seen):
  """An identity optax transform that records the dtypes of the updates it gets.

  It is the strategy's slot of `make_optimizer`, the first transform of the
  chain: what it sees is the gradient as the optimizer receives it.
  """
  def update(updates, state, params=None):
    del params
    seen.extend(x.dtype for x in jax.tree.leaves(updates))
    return updates, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def train_step_and_state(model, towers, transform=None, abstract=False):
  """(train step, initial state, placed batch); `abstract`: the state as
  `jax.ShapeDtypeStruct`s (enough to trace the step, nothing compiled)."""
  mesh = sharding.make_mesh()
  optimizer = train_lib.make_optimizer(OPTIM, 4, transform or optax.identity())
  step = train_lib.make_train_step(model, optimizer, train_lib.make_loss(LOSS), mesh)
  if abstract:
    state = jax.eval_shape(lambda: (lambda p: {"params": p, "opt": optimizer.init(p),
                                               "step": jnp.int32(0)})(
                                                   init_fn(model, towers)()))
  else:
    state = train_lib.create_train_state(params_for(towers), optimizer, mesh)
  return step, state, sharding.shard_batch(batch_for(towers), mesh)


def _sub_jaxprs(value):
  for v in value if isinstance(value, (tuple, list)) else (value,):
    if isinstance(v, jax_core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax_core.Jaxpr):
      yield v


def matmul_dtypes(jaxpr, counts=None):
  """(primitive, operand dtypes, output dtype) -> count, for every dot_general
  and conv_general_dilated of `jaxpr` and the jaxprs nested in it (the jitted
  step, loops, switch branches, the GRU's forward and backward)."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      counts[(eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars),
              str(eqn.outvars[0].aval.dtype))] += 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        matmul_dtypes(sub, counts)
  return counts


def test_config_key_declared_and_validated():
  assert config_lib.default_config().train.compute_dtype == "float32"
  config = default.get_config("tiny")
  config.train.compute_dtype = "bfloat16"
  config_lib.validate_config(config)
  config.train.compute_dtype = "float16"
  with pytest.raises(ValueError, match=r"train\.compute_dtype='float16' must be one of \['bfloat16', 'float32'\]"):
    config_lib.validate_config(config)
  with pytest.raises(ValueError, match="Unknown compute_dtype 'float16'"):
    dual_encoder.build_model(config.model, 20, "float16")


@pytest.mark.parametrize("towers", list(TOWERS))
def test_params_do_not_depend_on_the_compute_dtype(towers):
  shapes = {dtype: jax.eval_shape(init_fn(build(towers, dtype), towers))
            for dtype in ("float32", "bfloat16")}
  assert shapes["bfloat16"] == shapes["float32"]  # tree, shapes and dtypes
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes["bfloat16"]))
  # The initializers draw with the parameter dtype (float32) from the same
  # keys, so the values are equal too; checked on the cheapest model.
  if towers == "precomputed+scan":
    model = build(towers, "bfloat16")
    for a, b in zip(jax.tree.leaves(init_fn(model, towers)()),
                    jax.tree.leaves(params_for(towers))):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("towers", list(TOWERS))
def test_bfloat16_step_computes_in_bfloat16_and_float32_step_never(towers):
  counts = {}
  for dtype in ("float32", "bfloat16"):
    step, state, batch = train_step_and_state(build(towers, dtype), towers, abstract=True)
    counts[dtype] = matmul_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr)
  # The float32 program has no bfloat16 matmul or convolution at all.
  assert all(ins == ("float32", "float32") and out == "float32"
             for (_, ins, out) in counts["float32"]), counts["float32"]
  bf16 = counts["bfloat16"]
  has_convs = TOWERS[towers][0] != "precomputed"
  # Every convolution, forward and backward, takes bfloat16 operands.
  convs = {k: n for k, n in bf16.items() if k[0] == "conv_general_dilated"}
  assert bool(convs) == has_convs
  assert all(ins == ("bfloat16", "bfloat16") for (_, ins, _) in convs), convs
  # Every matmul has a bfloat16 operand, but one: the float32 score_std metric
  # (train.make_train_step). The (float32, bfloat16) ones are the transposes
  # of the matmuls that accumulate into float32 (the loss's scores, the GRU's
  # and MiniLM's attention scores): their cotangent is float32.
  float32_dots = sum(n for (p, ins, _), n in bf16.items()
                     if p == "dot_general" and "bfloat16" not in ins)
  assert float32_dots == 1, bf16
  both_bf16 = sum(n for (p, ins, _), n in bf16.items()
                  if p == "dot_general" and ins == ("bfloat16", "bfloat16"))
  # At least the GRU's 2 forward and 4 backward matmuls (or MiniLM's
  # projections), the image head's forward and weight gradient, and the
  # loss's score matmul.
  assert both_bf16 >= 9, bf16


@pytest.mark.slow  # Compiles a whole train step (seconds).
@pytest.mark.parametrize("towers", ["cnn+packed"])
def test_bfloat16_keeps_float32_params_gradients_and_optimizer_state(towers):
  seen = []
  model = build(towers, "bfloat16")
  step, state, batch = train_step_and_state(model, towers, recording_transform(seen))
  assert seen == []  # recorded when the step is traced
  before = jax.tree.map(np.asarray, state["params"])
  state, metrics = step(state, batch)
  # Gradients reach the optimizer in float32, one per parameter.
  assert seen and all(d == jnp.float32 for d in seen), set(seen)
  assert len(seen) == len(jax.tree.leaves(before))
  for tree in (state["params"], state["opt"]):
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert jax.tree.structure(state["params"]) == jax.tree.structure(before)
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  # The step moved the float32 master weights by float32-sized updates.
  moved = [np.max(np.abs(np.asarray(a) - b))
           for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before))]
  assert max(moved) > 0


@functools.lru_cache(maxsize=None)
def results(towers, dtype):
  """(loss, (img [B, DIM], txt [B, DIM])), grads of the train step's loss,
  embeddings and gradient (`pair_embedder`, the loss at the model's dtype),
  computed in `dtype` from the shared initial params."""
  model = build(towers, dtype)
  embed = train_lib.pair_embedder(model, sharding.make_mesh())
  loss_fn = train_lib.loss_in_compute_dtype(train_lib.make_loss(LOSS), model.dtype)
  batch = jax.tree.map(jnp.asarray, batch_for(towers, seed=1))

  def loss(params):
    img, txt = embed(params, batch)
    value, _ = loss_fn(img, txt, image_ids=batch["image_ids"], step=0, loss_params=None)
    return value, (img, txt)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params_for(towers))


@pytest.mark.parametrize("towers", COMPILED_PARAMS)
def test_bfloat16_loss_and_gradients_close_to_float32(towers):
  (loss32, _), grads32 = results(towers, "float32")
  (loss16, _), grads16 = results(towers, "bfloat16")
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  # bfloat16 keeps 8 significant bits (about 3 decimal digits): rounding a
  # matmul operand moves it by up to 2^-8 ~ 0.4% relative. The errors of a
  # few layers, the GRU's steps and the loss's score matmul partly cancel;
  # measured on these models: loss within 0.2%, gradient within 1.6% (global
  # relative norm), cosine to the float32 gradient >= 0.9998. The bounds
  # leave 3-6x room yet fail for a precision bug (a float16 overflow, a lost
  # GRU state update, a missed cast back to float32), which is off by far more.
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-2)
  g32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
  g16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
  assert np.linalg.norm(g16 - g32) / np.linalg.norm(g32) < 0.05
  assert np.dot(g16, g32) / (np.linalg.norm(g16) * np.linalg.norm(g32)) > 0.998


@pytest.mark.parametrize("towers", list(TOWERS))
def test_evaluation_embedders_compute_in_the_dtype_and_return_float32(towers):
  mesh = sharding.make_mesh()
  batch = sharding.shard_batch(batch_for(towers), mesh)
  params = jax.eval_shape(init_fn(build(towers, "float32"), towers))
  for dtype in ("float32", "bfloat16"):
    embed_images, embed_texts = train_lib.make_embed_fns(build(towers, dtype), mesh)
    for fn, args in ((embed_images, (batch["images"],)),
                     (embed_texts, (batch["tokens"], batch["lengths"]))):
      jaxpr = jax.make_jaxpr(fn)(params, *args)
      (out,) = jaxpr.out_avals
      assert out.dtype == jnp.float32 and out.shape == (BATCH, DIM)
      operands = {d for (_, ins, _) in matmul_dtypes(jaxpr.jaxpr) for d in ins}
      assert ("bfloat16" in operands) == (dtype == "bfloat16"), operands


@pytest.mark.parametrize("towers", COMPILED_PARAMS)
def test_bfloat16_embeddings_are_float32_unit_norm_and_close(towers):
  (_, out32), _ = results(towers, "float32")
  (_, out16), _ = results(towers, "bfloat16")
  for emb16, emb32 in zip(out16, out32):
    assert emb16.dtype == jnp.float32 and emb16.shape == (BATCH, DIM)
    # Normalised in float32: unit norm to float32 rounding.
    np.testing.assert_allclose(np.linalg.norm(emb16, axis=1), 1.0, atol=1e-5)
    # A direction off by a relative error e has cosine 1 - e^2 / 2: with e of
    # a percent (the gradient test's budget) 0.99995; measured >= 0.99997.
    cosine = np.sum(np.asarray(emb16) * np.asarray(emb32), axis=1)
    assert np.min(cosine) > 0.999, cosine


@pytest.mark.slow
def test_tiny_experiment_trains_and_evaluates_in_bfloat16(tmp_path):
  from ccr_jax.run import loop  # pylint: disable=import-outside-toplevel
  config = default.get_config("tiny")
  config.train.compute_dtype = "bfloat16"
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert results["tasks_completed"] == 2
  assert results["config"]["train"]["compute_dtype"] == "bfloat16"
  for regime in ("fixed", "reindex"):
    for direction in ("i2t", "t2i"):
      r1 = np.array(results["metrics"][regime]["task_aware"][direction]["r1"], float)
      assert np.isfinite(r1[1]).all() and ((0 <= r1[1]) & (r1[1] <= 100)).all()
