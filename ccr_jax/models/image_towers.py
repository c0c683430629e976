"""Image towers: a small CNN and a ResNet over pixels, a projection of precomputed features.

Each maps a batch of images to unnormalised embeddings `[batch, embed_dim]`;
the dual encoder applies the L2 normalisation. None uses dropout or batch
statistics, so `apply` needs no rngs and no mutable collections.

ResNet (`ResNetTower`, VSE++'s image encoder over pixels): torchvision's
ResNet-18/50/152 (v1.5: the stride of a bottleneck sits on its 3x3 conv),
global average pool, then a linear map `proj` to the joint space. Parameters
live under `backbone/` (named after torchvision's modules: `conv1`, `bn1`,
`layer1_0/conv1`, `layer1_0/downsample_conv`, ...) and `proj/`, so a freezing
pattern `img/backbone/.*` selects the pretrained part.

Pixels: uint8 in [0, 255] is divided by 255; float input is taken in [-1, 1]
(what `scale_pixels` gives, the convention of the other pixel towers) and
mapped to [0, 1]. Then the ImageNet mean and std that torchvision's weights
were trained with are applied inside the tower, so the data path ships raw
pixels for every tower alike.

Compute dtype: every tower takes `dtype` (Flax's name for the computation
dtype; `train.compute_dtype`), float32 by default. Parameters stay float32
(`param_dtype`) and are cast at use by the Flax layers; the scaled pixels or
features are cast to `dtype` before the first layer, so with bfloat16 the
convolutions and matmuls, forward and backward, run in bfloat16. What stays
float32: the pixel scaling and ImageNet normalisation themselves (cast after),
the averaging of region features, and each FrozenBatchNorm's folded
multiplier (`scale * rsqrt(var + eps)`, computed in float32 from float32
statistics, then cast). The output is in `dtype`; the dual encoder
normalises in float32.

BatchNorm is in inference mode with frozen statistics (`FrozenBatchNorm`): the
running mean and variance are leaves of the `params` tree (`mean`, `var`),
read through `stop_gradient`, so their gradient is exactly zero and Adam
(no weight decay in our optimizer) leaves them bit-identical; the affine
`scale` and `bias` train. Why: our train step applies `params` only (no
mutable `batch_stats`), per-device batches of retrieval fine-tuning are small
and their batch statistics noisy, and task-by-task training would otherwise
drag the statistics towards the current task. Detectron's FrozenBatchNorm2d
makes the same choice when fine-tuning a pretrained backbone. With random
weights (`resnet_weights=""`, tests and smoke runs) the statistics are 0 and 1
and the last BN of every residual branch starts at scale 0 (torchvision's
`zero_init_residual`), so each block starts as the identity and activations
stay bounded without batch statistics; real runs load pretrained weights.

`freeze_backbone` puts `stop_gradient` on the pooled features: the backbone's
gradient is exactly zero (and its backward pass is not computed), only `proj`
trains.

Weights file (no download at run time; produced offline once): an `.npz` (or
`.safetensors`) whose keys and arrays are torchvision's `state_dict` as is,
`conv1.weight` `[out, in, kh, kw]`, `bn1.weight`, `bn1.bias`,
`bn1.running_mean`, `bn1.running_var`, `layer1.0.conv1.weight`,
`layer1.0.downsample.0.weight`, `layer1.0.downsample.1.running_var`, ...;
`fc.*` and `*.num_batches_tracked` are ignored, any other key that the depth
does not use is an error (a file for another depth). `load_resnet_weights`
converts OIHW kernels to Flax's HWIO. Written with torch and torchvision:

  import numpy as np, torchvision
  model = torchvision.models.resnet50(weights="IMAGENET1K_V2")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  np.savez("resnet50_imagenet.npz", **state)
"""
from collections.abc import Sequence
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def scale_pixels(images, dtype=jnp.float32):
  """Maps uint8 pixels to [-1, 1] in `dtype`; float input is taken as already scaled.

  Args:
    images: `[batch, height, width, channels]`, uint8 in [0, 255] or float.
    dtype: the output dtype (the tower's compute dtype). uint8 is scaled in
      float32, then cast.

  Returns:
    `[batch, height, width, channels]` in `dtype`.
  """
  # Scaling here rather than in the data path lets the pipeline ship uint8,
  # a quarter of the bytes of float32 across host->device transfer.
  if images.dtype == jnp.uint8:
    return (images.astype(jnp.float32) / 127.5 - 1.0).astype(dtype)
  # Cast explicitly: a float32 input times bfloat16 kernels would promote the
  # whole tower back to float32.
  return images.astype(dtype)


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
    dtype: compute dtype (module docstring); parameters stay float32.
  """
  embed_dim: int
  widths: Sequence[int] = (32, 64, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """Embeds images.

    Args:
      images: `[batch, height, width, 3]`, uint8 in [0, 255] or float in [-1, 1].

    Returns:
      `[batch, embed_dim]` in `dtype`, not normalised.
    """
    x = scale_pixels(images, self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME",
                  kernel_init=conv_kernel_init, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="head")(x)


class PrecomputedProjection(nn.Module):
  """VSE++ "precomp" image encoder: a linear map of precomputed CNN features.

  Attributes:
    embed_dim: output embedding size.
    dtype: compute dtype of the projection (module docstring).
  """
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    """Projects features.

    Args:
      features: `[batch, feature_dim]` (one pooled vector per image) or
        `[batch, regions, feature_dim]` (region features, averaged first).

    Returns:
      `[batch, embed_dim]` in `dtype`, not normalised.

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
                    dtype=self.dtype, name="fc")(features.astype(self.dtype))


# ------------------------------------------------------------------- ResNet

# depth -> (block kind, blocks per stage), as torchvision's resnet18/50/152.
RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
RESNET_WIDTHS = (64, 128, 256, 512)  # 3x3 conv channels of each stage
BOTTLENECK_EXPANSION = 4
# The statistics torchvision's ImageNet weights were trained with, on [0, 1] RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default


def imagenet_normalize(images):
  """Pixels to ImageNet-normalised float32 (see the module docstring).

  Args:
    images: `[batch, H, W, 3]`, uint8 in [0, 255] or float in [-1, 1].

  Returns:
    `[batch, H, W, 3]` float32, `(rgb01 - IMAGENET_MEAN) / IMAGENET_STD`.
  """
  if images.dtype == jnp.uint8:
    rgb01 = images.astype(jnp.float32) / 255.0
  else:
    rgb01 = (images.astype(jnp.float32) + 1.0) / 2.0
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (rgb01 - mean) / std


def he_normal_kernel_init(key, shape, dtype=jnp.float32):
  """He (fan-in, ReLU gain) normal for conv kernels, drawn as a matrix (see `conv_kernel_init`)."""
  matrix_shape = (math.prod(shape[:-1]), shape[-1])
  return nn.initializers.he_normal()(key, matrix_shape, dtype).reshape(shape)


class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm whose statistics are untrained leaves of `params`.

  y = (x - mean) / sqrt(var + eps) * scale + bias, per channel, with `mean`
  and `var` behind `stop_gradient` (see the module docstring for why).

  Attributes:
    zero_scale: start `scale` at 0 instead of 1 (last BN of a residual branch).
    dtype: compute dtype; the folded multiplier and shift are computed in
      float32 and cast to it.
  """
  zero_scale: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Normalises `x` `[..., channels]`; returns the same shape."""
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.zeros_init() if self.zero_scale
                       else nn.initializers.ones_init(), (channels,))
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
    mean = jax.lax.stop_gradient(
        self.param("mean", nn.initializers.zeros_init(), (channels,)))
    var = jax.lax.stop_gradient(
        self.param("var", nn.initializers.ones_init(), (channels,)))
    multiplier = scale * jax.lax.rsqrt(var + BN_EPS)
    return (x * multiplier.astype(self.dtype)
            + (bias - mean * multiplier).astype(self.dtype))


def _conv(features, size, stride, name, dtype):
  # Explicit symmetric padding as torch's Conv2d(padding=size // 2): "SAME"
  # pads a stride-2 conv of an even input on the bottom/right only, which
  # would shift every feature map against the pretrained weights.
  pad = size // 2
  return nn.Conv(features, (size, size), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=he_normal_kernel_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs, projection shortcut when the shape changes.

  Attributes:
    width: output channels.
    stride: stride of the first conv (and of the shortcut).
    dtype: compute dtype.
  """
  width: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """`[batch, H, W, C]` -> `[batch, H / stride, W / stride, width]`."""
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = functools.partial(FrozenBatchNorm, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.width, 3, self.stride, "conv1")(x)))
    y = bn(zero_scale=True, name="bn2")(conv(self.width, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.width:
      x = bn(name="downsample_bn")(conv(self.width, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """ResNet-50/101/152 block (v1.5): 1x1, 3x3 (strided), 1x1 to 4 x width.

  Attributes:
    width: channels of the 3x3 conv; the output has 4 x width.
    stride: stride of the 3x3 conv (and of the shortcut).
    dtype: compute dtype.
  """
  width: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """`[batch, H, W, C]` -> `[batch, H / stride, W / stride, 4 * width]`."""
    out = self.width * BOTTLENECK_EXPANSION
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = functools.partial(FrozenBatchNorm, dtype=self.dtype)
    y = nn.relu(bn(name="bn1")(conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(bn(name="bn2")(conv(self.width, 3, self.stride, "conv2")(y)))
    y = bn(zero_scale=True, name="bn3")(conv(out, 1, 1, "conv3")(y))
    if self.stride != 1 or x.shape[-1] != out:
      x = bn(name="downsample_bn")(conv(out, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class ResNetBackbone(nn.Module):
  """torchvision's ResNet up to the global average pool (no `fc`).

  Attributes:
    depth: 18, 50 or 152 (`RESNET_STAGES`).
    dtype: compute dtype.
  """
  depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """ImageNet-normalised `[batch, H, W, 3]` -> pooled features `[batch, C]`.

    C is 512 for ResNet-18 and 2048 for ResNet-50/152; H and W may be any
    size the five stride-2 stages leave non-empty (32 or more). The input is
    cast to `dtype`; the output is in `dtype`.
    """
    if self.depth not in RESNET_STAGES:
      raise ValueError(f"ResNet depth {self.depth} unknown; valid: {sorted(RESNET_STAGES)}")
    kind, blocks = RESNET_STAGES[self.depth]
    block_cls = BasicBlock if kind == "basic" else BottleneckBlock
    x = x.astype(self.dtype)
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(
        _conv(64, 7, 2, "conv1", self.dtype)(x)))
    # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax's max_pool does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, num_blocks) in enumerate(zip(RESNET_WIDTHS, blocks)):
      for i in range(num_blocks):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block_cls(width, stride, self.dtype, name=f"layer{stage + 1}_{i}")(x)
    # jnp.mean accumulates a bfloat16 input in float32.
    return jnp.mean(x, axis=(1, 2))


class ResNetTower(nn.Module):
  """ImageNet normalisation -> ResNet backbone -> global average pool -> `proj`.

  Attributes:
    depth: 18, 50 or 152.
    embed_dim: output embedding size.
    freeze_backbone: stop the gradient at the pooled features, so only `proj`
      trains.
    dtype: compute dtype (module docstring); parameters stay float32.
  """
  depth: int
  embed_dim: int
  freeze_backbone: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """Embeds images.

    Args:
      images: `[batch, H, W, 3]`, uint8 in [0, 255] or float in [-1, 1].

    Returns:
      `[batch, embed_dim]` in `dtype`, not normalised.
    """
    features = ResNetBackbone(self.depth, self.dtype, name="backbone")(
        imagenet_normalize(images))
    if self.freeze_backbone:
      features = jax.lax.stop_gradient(features)
    # VSE++ initialises its fc layer with Xavier-uniform weights and zero bias.
    return nn.Dense(self.embed_dim, kernel_init=nn.initializers.xavier_uniform(),
                    dtype=self.dtype, name="proj")(features)


def resnet_backbone_shapes(depth: int) -> dict:
  """The backbone's parameter tree as `jax.ShapeDtypeStruct`s (nothing allocated).

  Parameter shapes do not depend on the image size.
  """
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(ResNetBackbone(depth).init, jax.random.key(0), images)["params"]


_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}


def torchvision_key(path: Sequence[str]) -> str:
  """torchvision `state_dict` key of a backbone leaf, e.g.

  ("layer1_0", "downsample_bn", "var") -> "layer1.0.downsample.1.running_var".
  """
  *modules, leaf = path
  parts = []
  for module in modules:
    if module == "downsample_conv":
      parts += ["downsample", "0"]
    elif module == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts += module.split("_")  # layer1_0 -> layer1, 0
  parts.append("weight" if leaf == "kernel" else _BN_LEAVES[leaf])
  return ".".join(parts)


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ResNet weights file {path!r} does not exist "
                            "(model.resnet_weights; see image_towers' docstring "
                            "for how to write one).")
  try:
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      return load_file(path)
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except Exception as e:  # the format's own error says little about which file
    raise ValueError(f"Cannot read ResNet weights file {path!r} as .npz or "
                     f".safetensors: {e}") from e


def load_resnet_weights(path: str, depth: int) -> dict:
  """Reads a torchvision-layout weights file into the backbone's parameter tree.

  Args:
    path: `.npz` or `.safetensors` file keyed by torchvision `state_dict`
      names (module docstring).
    depth: 18, 50 or 152.

  Returns:
    The `backbone` params, float32 NumPy arrays (kernels converted from OIHW
    to HWIO), the tree of `resnet_backbone_shapes(depth)`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable file, a missing or mis-shaped key, or keys the
      depth does not use; the message names the key and the file.
  """
  state = _read_state_dict(path)
  template = resnet_backbone_shapes(depth)
  used = set()

  def convert(key_path, leaf):
    names = tuple(str(getattr(k, "key", k)) for k in key_path)
    key = torchvision_key(names)
    if key not in state:
      raise ValueError(f"ResNet-{depth} weights file {path!r} has no key {key!r} "
                       f"(needed for backbone/{'/'.join(names)}).")
    value = np.asarray(state[key])
    expected = leaf.shape
    if len(expected) == 4:
      expected = (expected[3], expected[2], expected[0], expected[1])  # HWIO -> OIHW
    if value.shape != expected:
      raise ValueError(f"ResNet-{depth} weights file {path!r}: {key!r} has shape "
                       f"{value.shape}, expected {expected} (torchvision layout).")
    used.add(key)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return value.astype(np.float32)

  params = jax.tree_util.tree_map_with_path(convert, template)
  unexpected = sorted(k for k in state if k not in used and not k.startswith("fc.")
                      and not k.endswith("num_batches_tracked"))
  if unexpected:
    raise ValueError(f"ResNet-{depth} weights file {path!r} has keys this depth "
                     f"does not use (weights of another depth?): {unexpected[:5]}")
  return params
