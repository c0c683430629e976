"""The GRU's two implementations: the scan GRU (GPU/TPU) against the float64
NumPy reference and against the packed GRU (CPU), and how one is chosen."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import lowered_program
from ccr_jax.models import text_towers
from test_models import assert_leaves_close  # tests/ is on sys.path under pytest
from test_models import mixed_captions
from test_models import numpy_gru

WORD_DIM = 4
HIDDEN = 5


def encoder(gru_impl, vocab_size, **kwargs):
  return text_towers.GRUTextEncoder(vocab_size=vocab_size, hidden_dim=HIDDEN,
                                    word_dim=WORD_DIM, gru_impl=gru_impl, **kwargs)


def init_params(model, tokens, lengths, seed=1):
  """The encoder's params with non-zero biases, so that every bias is checked."""
  params = jax.jit(model.init)(jax.random.key(seed), tokens, lengths)["params"]
  return jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                      params)


def numpy_gradients(params, tokens, lengths, cotangent, step=1e-6):
  """d sum(numpy_gru * cotangent) / d params by central differences in float64.

  float64 throughout: truncation error ~step^2 and rounding ~1e-16 / step,
  both far below the float32 errors the comparison tolerates.
  """
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  leaves, tree = jax.tree.flatten(params)

  def loss(leaves):
    return float(np.sum(numpy_gru(jax.tree.unflatten(tree, leaves), tokens, lengths)
                        * cotangent))

  grads = []
  for i, leaf in enumerate(leaves):
    grad = np.zeros_like(leaf)
    for index in np.ndindex(leaf.shape):
      shifted = [l.copy() for l in leaves]
      shifted[i][index] += step
      up = loss(shifted)
      shifted[i][index] -= 2 * step
      grad[index] = (up - loss(shifted)) / (2 * step)
    grads.append(grad)
  return jax.tree.unflatten(tree, grads)


# Batch 6, max_len 5: all length 1, all full length, and mixed (1 and 5
# included, in no particular order).
LENGTH_CASES = {"all_1": [1] * 6, "all_max": [5] * 6, "mixed": [3, 1, 5, 2, 5, 4]}


# unroll 2 does not divide max_len 5: lax.scan runs a remainder step.
# The mixed case (lengths 1 and max included) stays in the fast loop; the
# rest are slow (finite differences: seconds each).
@pytest.mark.parametrize("case,unroll", [
    pytest.param("all_1", 1, marks=pytest.mark.slow),
    pytest.param("all_max", 1, marks=pytest.mark.slow), ("mixed", 1),
    pytest.param("mixed", 2, marks=pytest.mark.slow),
    pytest.param("mixed", True, marks=pytest.mark.slow)])
def test_scan_gru_matches_numpy_values_and_gradients(case, unroll):
  batch, max_len = 6, 5
  lengths = jnp.asarray(LENGTH_CASES[case], jnp.int32)
  # Every position its own token id, padding included: the gradient of an
  # embedding row is then the gradient of that position's input vector.
  tokens = jnp.arange(batch * max_len, dtype=jnp.int32).reshape(batch, max_len)
  model = encoder("scan", batch * max_len, gru_unroll=unroll)
  params = init_params(model, tokens, lengths)

  out = jax.jit(model.apply)({"params": params}, tokens, lengths)
  # float32 against float64: states stay in (-1, 1) and 5 steps do not
  # amplify rounding; observed <= 3e-8, the bound is test_models' 1e-6.
  np.testing.assert_allclose(out, numpy_gru(params, tokens, lengths), atol=1e-6)

  cotangent = np.random.default_rng(6).normal(size=out.shape)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(
      model.apply({"params": p}, tokens, lengths) * cotangent.astype(np.float32))))(params)
  expected = numpy_gradients(params, tokens, lengths, cotangent)
  for path, got in jax.tree_util.tree_leaves_with_path(grads):
    want = expected
    for key in path:
      want = want[key.key]
    # float32 gradients against float64 differences (themselves within ~1e-10):
    # observed within 3.2e-7 of the leaf's largest entry; bound ~6x that.
    np.testing.assert_allclose(got, want, atol=2e-6 * np.max(np.abs(want)),
                               err_msg=jax.tree_util.keystr(path))
  if case == "all_1":  # the only step starts from the zero state
    assert not np.any(grads["gru"]["recurrent_kernel"])
  # Input gradients: a position at or past its caption's length is ignored,
  # exactly (its gate gradients are masked to 0, not merely small).
  d_words = np.asarray(grads["embed"]["embedding"]).reshape(batch, max_len, WORD_DIM)
  padding = np.arange(max_len)[None, :] >= np.asarray(lengths)[:, None]
  assert not np.any(d_words[padding])
  assert np.all(np.any(d_words[~padding] != 0, axis=-1))


def test_scan_gru_reads_length_0_as_1_and_keeps_compilations():
  tokens, lengths = mixed_captions(3, batch=7, max_len=6)
  model = encoder("scan", 30)
  params = init_params(model, tokens, lengths)
  traces = []

  def embed(p, t, l):
    traces.append(None)
    return model.apply({"params": p}, t, l)

  embed = jax.jit(embed)
  other = lengths.at[0].set(0)
  np.testing.assert_allclose(embed(params, tokens, other),  # float32 vs 64, as above
                             numpy_gru(params, tokens, other), atol=1e-6)
  embed(params, tokens, lengths)
  assert len(traces) == 1  # new lengths, same shapes: no new compilation


@pytest.mark.parametrize("batch,max_len", [(20, 9), pytest.param(33, 12, marks=pytest.mark.slow)])
def test_scan_equals_packed_on_the_same_params(batch, max_len):
  tokens, lengths = mixed_captions(batch, batch=batch, max_len=max_len)
  packed, scan = encoder("packed", 30), encoder("scan", 30)
  params = init_params(packed, tokens, lengths)  # the packed GRU's own params
  cotangent = jnp.asarray(np.random.default_rng(9).normal(size=(batch, HIDDEN)),
                          jnp.float32)
  results = {}
  for name, model in (("packed", packed), ("scan", scan)):
    def loss(p, model=model):
      out = model.apply({"params": p}, tokens, lengths)
      return jnp.sum(out * cotangent), out
    results[name] = jax.jit(jax.grad(loss, has_aux=True))(params)
  (grads_p, out_p), (grads_s, out_s) = results["packed"], results["scan"]
  # Both float32 with the same elementwise math per caption; only the matmuls
  # differ (row counts, blocking, hence possibly summation order), a few ulps
  # per step that the recurrence does not amplify. Observed equal on this
  # CPU; the bound is test_models' 1e-6 for other backends' matmuls.
  np.testing.assert_allclose(out_s, out_p, atol=1e-6)
  # Sums over tokens in different orders (all tokens at once vs in packed
  # blocks): observed within 3.7e-7 of the leaf's largest entry; bound ~5x.
  assert_leaves_close(grads_s, grads_p, rel_atol=2e-6)


def test_param_trees_are_identical():
  tokens, lengths = mixed_captions(4, batch=5, max_len=7)
  trees = {impl: jax.jit(encoder(impl, 30).init)(jax.random.key(0), tokens, lengths)
           for impl in ("packed", "scan")}
  assert jax.tree.structure(trees["packed"]) == jax.tree.structure(trees["scan"])
  # Same names and shapes, so flax draws the same initial values from one key:
  # a snapshot of either loads into the other.
  jax.tree.map(np.testing.assert_array_equal, trees["packed"], trees["scan"])
  gru = trees["scan"]["params"]["gru"]
  assert sorted(gru) == ["input_bias", "input_kernel", "recurrent_bias",
                         "recurrent_kernel"]
  assert gru["recurrent_kernel"].shape == (HIDDEN, 3 * HIDDEN)


def _gru_primitive(model, tokens, lengths, params):
  """Which GRU a model traces: the name of its custom-VJP function."""
  jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, lengths))(params)
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "custom_vjp_call":
        names.add(eqn.params["call_jaxpr"].jaxpr.debug_info.func_name)
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            visit(inner)

  visit(jaxpr.jaxpr)
  return names


def test_auto_picks_packed_on_cpu_and_scan_elsewhere():
  assert jax.default_backend() == "cpu"  # conftest.py keeps tests on the CPU
  assert text_towers.resolve_gru_impl("auto") == "packed"
  assert text_towers.resolve_gru_impl("auto", backend="cpu") == "packed"
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert text_towers.resolve_gru_impl("auto", backend=backend) == "scan"
  for impl in ("packed", "scan"):  # an explicit choice holds on any backend
    assert text_towers.resolve_gru_impl(impl, backend="gpu") == impl
    assert text_towers.resolve_gru_impl(impl, backend="cpu") == impl
  with pytest.raises(ValueError, match=r"gru_impl 'cudnn'.*'auto', 'packed', 'scan'"):
    text_towers.resolve_gru_impl("cudnn")

  # And the encoder runs what it resolves: the default ("auto") traces
  # packed_gru here.
  tokens, lengths = mixed_captions(1, batch=4, max_len=5)
  params = jax.jit(encoder("packed", 30).init)(jax.random.key(0), tokens, lengths)["params"]
  assert text_towers.GRUTextEncoder(30, HIDDEN).gru_impl == "auto"
  for impl, name in (("auto", "packed_gru"), ("packed", "packed_gru"), ("scan", "scan_gru")):
    assert _gru_primitive(encoder(impl, 30), tokens, lengths, params) == {name}, impl


# The packed GRU's program is the reason "auto" avoids it off the CPU: its
# loops' trip counts and per-step `lax.switch` indices are data.
@pytest.mark.parametrize("variant", ["scan", pytest.param("packed", marks=pytest.mark.slow)])
def test_train_step_lowered_for_cuda_has_static_loops_with_scan(variant):
  # The real train step (configs/default.py shrunk), lowered for CUDA here
  # without a GPU, as benchmarks/lowered_program.py does.
  record = lowered_program.measure("default", variant, "cuda", smoke=True)
  assert record["lowered_for"] == "cuda", record["lowering_error"]
  assert record["host_transfer_ops"] == record["host_callbacks"] == 0
  if variant == "scan":
    # One loop forward, one backward, each of max_len (24) steps, one matmul per step.
    assert [(l["trip_count"], l["dot_generals_in_body"]) for l in record["loops"]] == [
        (24, 1), (24, 1)]
    assert record["data_dependent_conditionals"] == 0
  else:
    assert record["dynamic_while_loops"] == record["while_loops"] == 4
    assert record["data_dependent_conditionals"] == 2  # the step matmul's switch, fwd and bwd
