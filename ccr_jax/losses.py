"""Contrastive losses for dual encoders, behind one registry.

Every registered loss is a pure, jit-compatible function

  loss_fn(img_emb, txt_emb, *, image_ids, step, loss_params, <settings>)
      -> (loss, extras)

with `img_emb`, `txt_emb` `[B, D]` L2-normalised embeddings where row i of each
is a positive pair, `image_ids` `[B]` ints (rows with equal ids share an image
and are never negatives of each other), `step` the (possibly traced) global
step, `loss_params` the loss's own trainable parameters (`initial_params`:
InfoNCE's and SigLIP's learnable temperature and bias; None for the hinge
losses or a fixed temperature), `loss` a float scalar and `extras` a dict of
float scalars for logging. Each is a `Loss` entry of `LOSSES` holding the
function, the `config.loss` keys it reads and its learnable initial
parameters; `make_loss` binds the config's values and `initial_params` builds
the parameters from the entry, so neither names a loss. `config_keys`
declares the whole `loss` config section.

Compiled variants (settings of every loss; the same loss mathematically):
  block_size   0: the dense [B, B] score matrix. b > 0: the caption side in
               blocks of b, scanned, so the scores live as [B, b] blocks; with
               `remat` the backward pass recomputes each block instead of
               storing it, and temporary memory grows with B * b, not B^2.
  matmul_dtype 'float32' (HIGHEST precision) or 'bfloat16' (inputs rounded to
               bfloat16, products accumulated in float32).
  remat        wrap the score computation in `jax.checkpoint`.
In the blocked form the positive scores come from a row-wise dot product
rather than the matrix diagonal: equal up to float rounding.

Each loss is a score-block function: given a block of scores (all image rows,
a block of caption columns) it returns a per-image partial (combined across
blocks by sum, max or logaddexp) and complete per-caption values. The dense
form is the one-block case of the same function.
"""
import dataclasses
import functools
import math
import types
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ccr_jax import schema

REDUCTIONS = ("sum", "mean")
MATMUL_DTYPES = ("float32", "bfloat16")
# CLIP clips its learnable logit scale at 100 (temperature 0.01) for stability.
MAX_LOGIT_SCALE = 100.0


class _Block(NamedTuple):
  """How a loss reduces one block of scores; see the module docstring.

  fn(scores [B, c], pos_row [B], pos_col [c], negative [B, c] bool,
     diagonal [B, c] bool) -> (row partial [B], column values [c]).
  """
  fn: Callable
  row_identity: float
  row_combine: Callable


def _scores(img, txt, matmul_dtype):
  if matmul_dtype == "bfloat16":
    return jnp.matmul(img.astype(jnp.bfloat16), txt.astype(jnp.bfloat16).T,
                      preferred_element_type=jnp.float32)
  # HIGHEST avoids TF32/bf16 passes on accelerators.
  return jnp.matmul(img, txt.T, precision=jax.lax.Precision.HIGHEST)


def _reduce_scores(img_emb, txt_emb, image_ids, block: _Block, *, block_size=0,
                   matmul_dtype="float32", remat=False):
  """Runs `block.fn` over the score matrix, densely or in caption blocks.

  Returns (rows [B], cols [B], positive [B]): the combined per-image values,
  the per-caption values, and the positive-pair scores.
  """
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"Unknown matmul_dtype {matmul_dtype!r}; valid: {list(MATMUL_DTYPES)}")
  # At least float32 even for bf16 embeddings: the hinge compares score
  # differences of order 1e-2 against the margin.
  dtype = jnp.promote_types(jnp.result_type(img_emb, txt_emb), jnp.float32)
  img, txt = img_emb.astype(dtype), txt_emb.astype(dtype)
  image_ids = jnp.asarray(image_ids)
  n = img.shape[0]
  if not block_size or block_size >= n:
    def dense(img, txt):
      scores = _scores(img, txt, matmul_dtype)  # [B, B]
      positive = jnp.diagonal(scores)
      negative = image_ids[:, None] != image_ids[None, :]
      rows, cols = block.fn(scores, positive, positive, negative,
                            jnp.eye(n, dtype=bool))
      return rows, cols, positive

    return (jax.checkpoint(dense) if remat else dense)(img, txt)
  if n % block_size:
    raise ValueError(f"block_size {block_size} must divide the batch size {n}")
  num_blocks = n // block_size
  rounded = ((img, txt) if matmul_dtype == "float32" else
             (img.astype(jnp.bfloat16).astype(dtype), txt.astype(jnp.bfloat16).astype(dtype)))
  positive = jnp.einsum("bd,bd->b", *rounded, precision=jax.lax.Precision.HIGHEST)

  def body(rows, xs):
    txt_block, ids_block, pos_block, first = xs
    scores = _scores(img, txt_block, matmul_dtype)  # [B, block]
    negative = image_ids[:, None] != ids_block[None, :]
    diagonal = jnp.arange(n)[:, None] == first + jnp.arange(block_size)[None, :]
    part, cols = block.fn(scores, positive, pos_block, negative, diagonal)
    return block.row_combine(rows, part), cols

  xs = (txt.reshape(num_blocks, block_size, -1), image_ids.reshape(num_blocks, -1),
        positive.reshape(num_blocks, -1), jnp.arange(num_blocks) * block_size)
  rows, cols = jax.lax.scan(jax.checkpoint(body) if remat else body,
                            jnp.full((n,), block.row_identity, dtype), xs)
  return rows, cols.reshape(n), positive


def _check_reduction(reduction):
  if reduction not in REDUCTIONS:
    raise ValueError(f"Unknown reduction {reduction!r}; valid: {list(REDUCTIONS)}")


def _hinge_block(margin, hardest) -> _Block:
  reduce = jnp.max if hardest else jnp.sum

  def fn(scores, pos_row, pos_col, negative, diagonal):
    del diagonal  # never a negative: same image id.
    # Masked entries are 0 and costs are >= 0, so a max over a row without
    # negatives is 0 and no gradient reaches a non-negative.
    cost_i2t = jnp.where(negative, jax.nn.relu(margin + scores - pos_row[:, None]), 0.0)
    cost_t2i = jnp.where(negative, jax.nn.relu(margin + scores - pos_col[None, :]), 0.0)
    return reduce(cost_i2t, axis=1), reduce(cost_t2i, axis=0)

  return _Block(fn, 0.0, jnp.maximum if hardest else jnp.add)


def contrastive_hinge(img_emb, txt_emb, *, image_ids, margin=0.2, hardest,
                      reduction="sum", block_size=0, matmul_dtype="float32",
                      remat=False):
  """Bidirectional hinge ranking loss of VSE0 (all negatives) / VSE++ (hardest).

  With scores `S = img_emb @ txt_emb.T` and positives on the diagonal:
    image->text, row i:    relu(margin + S[i, j] - S[i, i])  over negatives j
    text->image, column i: relu(margin + S[j, i] - S[i, i])  over negatives j
  where j is a negative of i iff `image_ids[j] != image_ids[i]` (this excludes
  the diagonal, and captions of the same image when a batch holds several).
  Each row's costs are summed (`hardest=False`) or maximised (`hardest=True`,
  0 if the row has no negative); both directions are added.

  Args:
    img_emb: `[B, D]` image embeddings.
    txt_emb: `[B, D]` caption embeddings; row i describes image row i.
    image_ids: `[B]` ints identifying each row's image.
    margin: hinge margin (VSE++: 0.2).
    hardest: keep only the hardest negative per query (VSE++).
    reduction: 'sum' over the batch (as VSE++) or 'mean' (sum divided by B).
    block_size, matmul_dtype, remat: the compiled variant (module docstring).

  Returns:
    `(loss, extras)`: loss a float scalar; extras {'i2t', 't2i'} (the two
    directions, reduced like the loss) and 'mean_positive' (mean of diag S).

  Raises:
    ValueError: for an unknown reduction or matmul dtype, or a block size
      that does not divide the batch.
  """
  _check_reduction(reduction)
  per_image, per_caption, positive = _reduce_scores(
      img_emb, txt_emb, image_ids, _hinge_block(margin, hardest),
      block_size=block_size, matmul_dtype=matmul_dtype, remat=remat)
  scale = 1.0 if reduction == "sum" else 1.0 / img_emb.shape[0]
  i2t = jnp.sum(per_image) * scale
  t2i = jnp.sum(per_caption) * scale
  extras = {"i2t": i2t, "t2i": t2i, "mean_positive": jnp.mean(positive)}
  return i2t + t2i, extras


def vse0(img_emb, txt_emb, *, image_ids, margin=0.2, reduction="sum", step=None,
         loss_params=None, **variant):
  """VSE0: hinge loss summed over all negatives. See `contrastive_hinge`.

  Args:
    img_emb: `[B, D]`; txt_emb: `[B, D]`; image_ids: `[B]` ints.
    margin, reduction: as `contrastive_hinge`.
    step, loss_params: unused; accepted so all registered losses share one
      signature.
    **variant: block_size, matmul_dtype, remat (module docstring).

  Returns:
    `(loss, extras)` as `contrastive_hinge`.
  """
  del step, loss_params
  return contrastive_hinge(img_emb, txt_emb, image_ids=image_ids, margin=margin,
                           hardest=False, reduction=reduction, **variant)


def vse_pp(img_emb, txt_emb, *, image_ids, margin=0.2, reduction="sum", step=None,
           warmup_steps=0, loss_params=None, **variant):
  """VSE++: hinge loss on the hardest negative, after `warmup_steps` of VSE0.

  Trained from scratch, the hardest-negative loss tends to collapse all
  embeddings together; warming up with the all-negatives loss avoids it. The
  switch is a `lax.cond` on the traced `step`, so one compiled step serves both
  phases.

  Args:
    img_emb: `[B, D]`; txt_emb: `[B, D]`; image_ids: `[B]` ints.
    margin, reduction: as `contrastive_hinge`.
    step: int scalar (Python or traced): the global step; required when
      `warmup_steps > 0`.
    warmup_steps: Python int; VSE0 is used while `step < warmup_steps`.
    loss_params: unused.
    **variant: block_size, matmul_dtype, remat (module docstring).

  Returns:
    `(loss, extras)` as `contrastive_hinge`, plus extras['hardest'] (1.0 when
    the hardest-negative loss was used, else 0.0).

  Raises:
    ValueError: if `warmup_steps > 0` and no step is given.
  """
  del loss_params
  hinge = functools.partial(contrastive_hinge, image_ids=image_ids, margin=margin,
                            reduction=reduction, **variant)
  if warmup_steps <= 0:
    loss, extras = hinge(img_emb, txt_emb, hardest=True)
    return loss, {**extras, "hardest": jnp.ones((), loss.dtype)}
  if step is None:
    raise ValueError("vse_pp with warmup_steps > 0 needs the step")
  use_hardest = jnp.asarray(step) >= warmup_steps
  loss, extras = jax.lax.cond(
      use_hardest,
      lambda a, b: hinge(a, b, hardest=True),
      lambda a, b: hinge(a, b, hardest=False),
      img_emb, txt_emb)
  return loss, {**extras, "hardest": use_hardest.astype(loss.dtype)}


def _logit_scale(loss_params, temperature):
  """exp(log_scale) from the learnable params, clipped; else 1 / temperature."""
  if loss_params is not None and "log_scale" in loss_params:
    return jnp.minimum(jnp.exp(loss_params["log_scale"]), MAX_LOGIT_SCALE)
  return jnp.float32(1.0 / temperature)


def infonce(img_emb, txt_emb, *, image_ids, temperature=0.07, reduction="mean",
            step=None, loss_params=None, **variant):
  """Symmetric InfoNCE (CLIP): cross-entropy over captions and over images.

  With logits `L = S / T` (T the temperature, learnable when `loss_params`
  holds 'log_scale' = log(1/T), clipped at 1/T <= 100 as CLIP does):
    image->text, row i:    logsumexp_j L[i, j] - L[i, i]
    text->image, column i: logsumexp_j L[j, i] - L[i, i]
  where j ranges over i itself and the negatives of i: other rows with the
  same image id are left out of the softmax (they are not negatives, and
  they are not this row's target either). The loss is the mean of the two
  directions' cross-entropies.

  Args:
    img_emb: `[B, D]`; txt_emb: `[B, D]`; image_ids: `[B]` ints.
    temperature: the fixed temperature when not learnable (CLIP: 0.07).
    reduction: 'mean' over the batch (CLIP) or 'sum'.
    step: unused.
    loss_params: None or {'log_scale': float scalar}.
    **variant: block_size, matmul_dtype, remat (module docstring).

  Returns:
    `(loss, extras)`: extras {'i2t', 't2i', 'mean_positive', 'temperature'}.
  """
  del step
  _check_reduction(reduction)
  scale = _logit_scale(loss_params, temperature)

  def fn(scores, pos_row, pos_col, negative, diagonal):
    del pos_row, pos_col
    logits = jnp.where(negative | diagonal, scores * scale, -jnp.inf)
    return (jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0))

  row_lse, col_lse, positive = _reduce_scores(
      img_emb, txt_emb, image_ids, _Block(fn, -jnp.inf, jnp.logaddexp), **variant)
  reduce = jnp.mean if reduction == "mean" else jnp.sum
  i2t = reduce(row_lse - scale * positive)
  t2i = reduce(col_lse - scale * positive)
  extras = {"i2t": i2t, "t2i": t2i, "mean_positive": jnp.mean(positive),
            "temperature": 1.0 / scale}
  return 0.5 * (i2t + t2i), extras


def siglip(img_emb, txt_emb, *, image_ids, temperature=0.1, bias=-10.0,
           reduction="mean", step=None, loss_params=None, **variant):
  """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023).

  With logits `L = S * t + b` (t = exp(log_scale), b the bias, both learnable
  from `loss_params`; else t = 1 / temperature and b = `bias`):
    sum over pairs (i, j) of -log sigmoid(z_ij * L[i, j]),
  z = +1 on the diagonal, -1 for negatives; pairs of different rows with the
  same image id are left out (neither positive nor negative).
  'mean' divides by B, as SigLIP does; 'sum' does not.

  Args:
    img_emb: `[B, D]`; txt_emb: `[B, D]`; image_ids: `[B]` ints.
    temperature, bias: fixed values when `loss_params` is None (SigLIP's
      initialisation: t = 10, b = -10).
    reduction: 'mean' or 'sum'.
    step: unused.
    loss_params: None or {'log_scale': scalar, 'bias': scalar}.
    **variant: block_size, matmul_dtype, remat (module docstring).

  Returns:
    `(loss, extras)`: extras {'positive_term', 'negative_term',
    'mean_positive', 'temperature', 'bias'}; the terms sum to the loss.
  """
  del step
  _check_reduction(reduction)
  scale = _logit_scale(loss_params, temperature)
  b = loss_params["bias"] if loss_params is not None and "bias" in loss_params else bias

  def fn(scores, pos_row, pos_col, negative, diagonal):
    del pos_row, pos_col
    logits = scores * scale + b
    neg_cost = jnp.where(negative, -jax.nn.log_sigmoid(-logits), 0.0)
    # Positives' costs go in a column value so that the two terms can be
    # reported apart; each column holds at most one diagonal entry.
    pos_cost = jnp.where(diagonal, -jax.nn.log_sigmoid(logits), 0.0)
    return jnp.sum(neg_cost, axis=1), jnp.sum(pos_cost, axis=0)

  negative_rows, positive_cols, positive = _reduce_scores(
      img_emb, txt_emb, image_ids, _Block(fn, 0.0, jnp.add), **variant)
  scale_out = 1.0 / img_emb.shape[0] if reduction == "mean" else 1.0
  pos_term = jnp.sum(positive_cols) * scale_out
  neg_term = jnp.sum(negative_rows) * scale_out
  extras = {"positive_term": pos_term, "negative_term": neg_term,
            "mean_positive": jnp.mean(positive), "temperature": 1.0 / scale,
            "bias": jnp.asarray(b, jnp.float32)}
  return pos_term + neg_term, extras


# ----------------------------------------------------------------- registry


def _learnt_temperature(config) -> dict[str, Any] | None:
  """{'log_scale': log(1 / temperature)} when `config.learn_temperature`, else None."""
  if not config.learn_temperature:
    return None
  return {"log_scale": jnp.float32(math.log(1.0 / config.temperature))}


def _learnt_temperature_and_bias(config) -> dict[str, Any] | None:
  """`_learnt_temperature` plus {'bias': config.bias} (SigLIP learns both)."""
  params = _learnt_temperature(config)
  if params is not None:
    params["bias"] = jnp.float32(config.bias)
  return params


@dataclasses.dataclass(frozen=True)
class Loss:
  """A registered loss.

  Attributes:
    name: what `config.loss.name` says.
    fn: `fn(img_emb [B, D], txt_emb [B, D], *, image_ids [B], step,
      loss_params, **settings, **variant) -> (loss, extras)`.
    settings: the `config.loss` keys bound to `fn` by name (beyond
      `VARIANT_SETTINGS`, which every loss reads).
    initial_params: config.loss -> the loss's trainable parameters at
      initialisation (a dict of float32 scalars), or None when it has none.
  """
  name: str
  fn: Callable
  settings: tuple[str, ...]
  initial_params: Callable[[Any], dict[str, Any] | None] = lambda config: None


# name -> Loss, built once from the entries below: no loss registers itself.
LOSSES: Mapping[str, Loss] = types.MappingProxyType({entry.name: entry for entry in (
    Loss("vse0", vse0, ("margin", "reduction")),
    Loss("vse_pp", vse_pp, ("margin", "reduction", "warmup_steps")),
    # InfoNCE learns log(1/T) when `learn_temperature`, from CLIP's T = 0.07.
    Loss("infonce", infonce, ("temperature", "reduction"), _learnt_temperature),
    # SigLIP learns log(1/T) and the bias b (its initialisation: T = 0.1, b = -10).
    Loss("siglip", siglip, ("temperature", "bias", "reduction"),
         _learnt_temperature_and_bias),
)})
VARIANT_SETTINGS = ("block_size", "matmul_dtype", "remat")


def names() -> tuple[str, ...]:
  """The registered loss names."""
  return tuple(LOSSES)


def get(name: str) -> Loss:
  """The registry entry of the loss called `name`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name]


def get_loss(name: str) -> Callable:
  """The registered loss function called `name` (`get(name).fn`).

  Returns:
    `loss_fn(img_emb, txt_emb, *, image_ids, step, loss_params, **settings)`.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  return get(name).fn


def config_keys() -> dict[str, schema.Key]:
  """The `loss` config section: name -> `schema.Key` (configs/default.py's defaults)."""
  return {
      "name": schema.Key(
          "vse0", f"the loss, one of {list(LOSSES)}; vse0 by default because"
          " VSE++'s hardest negatives collapse from scratch", schema.one_of(names)),
      "margin": schema.Key(0.2, "vse0 / vse_pp: the hinge margin (VSE++: 0.2)"),
      "reduction": schema.Key(
          "sum", "'sum' over the batch (VSE++) or 'mean' (CLIP, SigLIP)",
          schema.one_of(REDUCTIONS)),
      "warmup_steps": schema.Key(
          0, "vse_pp only: VSE0 steps before hardest negatives",
          schema.at_least(0, integer=True)),
      "temperature": schema.Key(
          0.07, "infonce / siglip: the logit temperature (CLIP 0.07; SigLIP"
          " starts at 0.1), learnt from that start when learn_temperature",
          schema.greater_than(0)),
      "learn_temperature": schema.Key(
          False, "infonce / siglip: learn the temperature (siglip also its"
          " bias) from the configured values"),
      "bias": schema.Key(
          -10.0, "siglip: the logit bias (its start when learn_temperature)"),
      "block_size": schema.Key(
          0, "compiled variant, the same loss: 0 = dense [B, B] scores, b > 0"
          " = caption blocks of b (b must divide the batch)",
          schema.at_least(0, integer=True)),
      "matmul_dtype": schema.Key(
          "float32", "compiled variant: float32 or bfloat16 score matmuls",
          schema.one_of(MATMUL_DTYPES)),
      "remat": schema.Key(
          False, "compiled variant: recompute the scores in the backward pass"
          " instead of storing them"),
  }


def make_loss(config) -> Callable:
  """The loss `config.name` names, with its settings and variant bound.

  Args:
    config: the config's `loss` section (configs/default.py).

  Returns:
    `loss_fn(img_emb, txt_emb, *, image_ids, step, loss_params=None)`.

  Raises:
    ValueError: unknown name; a setting the loss reads that `config_keys`
      refuses (unknown reduction or matmul dtype, a negative block size, a
      non-positive temperature, ...), each named as `--config.loss.KEY=...`.
  """
  entry = get(config.name)
  keys = config_keys()
  config = schema.complete(keys, config)  # A test's or older config's omissions.
  kwargs = {key: config[key] for key in entry.settings}
  variant = {key: config[key] for key in VARIANT_SETTINGS}
  wrong = schema.problems(keys, {**kwargs, **variant}, prefix="loss.")
  if wrong:
    raise ValueError(" ".join(wrong))
  return functools.partial(entry.fn, **kwargs, **variant)


def reduction_of(loss_fn: Callable | None) -> str:
  """'sum' or 'mean': how a loss bound by `make_loss` reduces over pairs
  ('sum', the default, for an unbound or absent one)."""
  return getattr(loss_fn, "keywords", {}).get("reduction", "sum")


def initial_params(config) -> dict[str, Any] | None:
  """The loss's trainable parameters at initialisation, or None if it has none.

  Args:
    config: the config's `loss` section; the registry entry of `config.name`
      decides what it reads (InfoNCE / SigLIP: `learn_temperature`,
      `temperature`, SigLIP also `bias`).

  Returns:
    A dict of float32 scalars, or None.
  """
  return get(config.name).initial_params(schema.complete(config_keys(), config))
