"""Image towers: a small CNN over pixels and a projection of precomputed features.

Both map a batch of images to unnormalised embeddings `[batch, embed_dim]`; the
dual encoder applies the L2 normalisation. Neither uses dropout or batch
statistics, so `apply` needs no rngs and no mutable collections.
"""
from collections.abc import Sequence
import math

import flax.linen as nn
import jax.numpy as jnp


def scale_pixels(images):
  """Maps uint8 pixels to float32 in [-1, 1]; float input is taken as already scaled.

  Args:
    images: `[batch, height, width, channels]`, uint8 in [0, 255] or float.

  Returns:
    `[batch, height, width, channels]` float32 (or the input float dtype).
  """
  # Scaling here rather than in the data path lets the pipeline ship uint8,
  # a quarter of the bytes of float32 across host->device transfer.
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  return images


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """Flax's default conv init (LeCun normal), drawn as a matrix and reshaped.

  LeCun normal depends only on fan_in = prod(shape[:-1]), which the
  `[prod(shape[:-1]), out]` matrix shares with the `[kh, kw, in, out]` kernel,
  so the distribution is the same; but XLA on CPU compiles the 4-D draw several
  times slower (seconds per kernel shape), which dominated model init.

  Args:
    key: PRNG key.
    shape: kernel shape `[kh, kw, in_channels, out_channels]`.
    dtype: parameter dtype.

  Returns:
    A kernel of `shape`.
  """
  matrix_shape = (math.prod(shape[:-1]), shape[-1])
  return nn.initializers.lecun_normal()(key, matrix_shape, dtype).reshape(shape)


class SmallCNN(nn.Module):
  """Stride-2 Conv3x3 + ReLU stages, then a Dense over the flattened final map.

  Sized for the embedded synthetic benchmark (32x32 images) on CPU. Stride-2
  convolutions instead of conv + max-pool: on XLA's CPU backend the pooled
  version's backward pass was 3x slower per step for the same number of
  multiply-adds. The head sees the whole final map, not its spatial mean,
  because captions name where the object is (a global average pool would
  throw the position away).

  Attributes:
    embed_dim: output embedding size.
    widths: channels of each stage; each stage halves the spatial size.
  """
  embed_dim: int
  widths: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, images):
    """Embeds images.

    Args:
      images: `[batch, height, width, 3]`, uint8 in [0, 255] or float in [-1, 1].

    Returns:
      `[batch, embed_dim]` float32, not normalised.
    """
    x = scale_pixels(images)
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME",
                  kernel_init=conv_kernel_init, name=f"conv{i}")(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.embed_dim, name="head")(x)


class PrecomputedProjection(nn.Module):
  """VSE++ "precomp" image encoder: a linear map of precomputed CNN features.

  Attributes:
    embed_dim: output embedding size.
  """
  embed_dim: int

  @nn.compact
  def __call__(self, features):
    """Projects features.

    Args:
      features: `[batch, feature_dim]` (one pooled vector per image) or
        `[batch, regions, feature_dim]` (region features, averaged first).

    Returns:
      `[batch, embed_dim]`, not normalised.

    Raises:
      ValueError: if `features` is neither 2-D nor 3-D.
    """
    # Features may be stored in float16 to halve their size; average in float32.
    features = features.astype(jnp.float32)
    if features.ndim == 3:
      features = jnp.mean(features, axis=1)
    elif features.ndim != 2:
      raise ValueError(
          "PrecomputedProjection expects [batch, dim] or [batch, regions, dim] "
          f"features, got shape {features.shape}")
    # VSE++ initialises its fc layer with Xavier-uniform weights and zero bias.
    return nn.Dense(self.embed_dim, kernel_init=nn.initializers.xavier_uniform(),
                    name="fc")(features)
