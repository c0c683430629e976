"""What every stage shares, built once from the config: data, vocabulary, model,
mesh and embedders; and the snapshots, loaded and verified against it."""

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ccr_jax import checkpoints
from ccr_jax import losses
from ccr_jax import sharding
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from ccr_jax.data import registry as data_registry
from ccr_jax.data import tasks as tasks_lib
from ccr_jax.data import text as text_lib
from ccr_jax.models import dual_encoder
from ccr_jax.run import workdir as workdir_lib

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the stages share, built once from the config."""
  config: ml_collections.ConfigDict
  workdir: str
  sequence: tasks_lib.TaskSequence
  vocab: text_lib.Vocabulary | text_lib.WordPieceTokenizer
  encoded: tuple[dict[str, pipeline.EncodedSplit], ...]  # per task: split -> data
  truncated_captions: int
  model: dual_encoder.DualEncoder
  mesh: jax.sharding.Mesh
  params_template: Any
  embed_images: Any
  embed_texts: Any
  # The held-out categories' training pairs (`pretrain.categories`); None
  # when the config holds none out.
  pretrain_pool: pipeline.EncodedSplit | None = None

  @property
  def num_tasks(self) -> int:
    return len(self.sequence.tasks)

  @property
  def captions_per_image(self) -> int:
    return self.encoded[0]["train"].captions_per_image


def check_image_shapes(task_splits: list[dict[str, tasks_lib.Split]]) -> tuple:
  """The one image shape of every split of every task (without the batch axis).

  Args:
    task_splits: per task, {"train" | "val" | "test": Split}.

  Raises:
    ValueError: naming the first task and split whose images differ from
      task 1's training images (the model is built for one shape; features
      [D] and regions [R, D] of the same D go together).
  """
  expected = tuple(task_splits[0]["train"].images.shape[1:])

  def compatible(shape):
    # Precomputed features may be pooled [D] in one split and regions [R, D]
    # in another: the projection tower pools regions, so only D must agree.
    features = len(shape) <= 2 and len(expected) <= 2
    return shape == expected or (features and shape[-1:] == expected[-1:])

  for t, splits in enumerate(task_splits):
    for name, split in splits.items():
      shape = tuple(split.images.shape[1:])
      if len(split) and not compatible(shape):
        raise ValueError(
            f"task {t + 1} {name} images have shape {shape}, task 1 train images "
            f"{expected}: every image must have one shape (resize them, or check "
            "the dataset's features files).")
  return expected


def model_axis_size(config: ml_collections.ConfigDict) -> int:
  """`config.mesh.model_axis_size`."""
  return config.mesh.model_axis_size


def param_placement(mesh: jax.sharding.Mesh):
  """leaf -> its sharding on `mesh` (`sharding.param_sharding`), for restores."""
  return lambda x: sharding.param_sharding(x.shape, mesh)


def with_loss_params(params: dict, config: ml_collections.ConfigDict) -> dict:
  """Model params {img, txt} plus the loss's own, if any, as params["loss"].

  The loss's trainable values (a learnable temperature, SigLIP's bias) train,
  snapshot and restore with the towers' params, in their own subtree.
  """
  loss_params = losses.initial_params(config.loss)
  return params if loss_params is None else {**params, "loss": loss_params}


def pretrain_categories(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`config.pretrain.categories`."""
  return tuple(config.pretrain.categories)


def check_pretrain_categories(categories: tuple[int, ...],
                              sequence: tasks_lib.TaskSequence) -> None:
  """Raises a ValueError naming `pretrain.categories` and the fix when a held-out
  category is not the dataset's, is in a task, or has no training example."""
  key = f"--config.pretrain.categories={categories}"
  n = len(sequence.category_names)
  for c in categories:
    if not 0 <= c < n:
      raise ValueError(
          f"{key}: category {c} is not one of the dataset's {n} categories (ids "
          f"0..{n - 1}); hold out ids in that range, or give the dataset more "
          "categories (the synthetic benchmark: data.num_categories).")
    for t, task in enumerate(sequence.tasks):
      if c in task.categories:
        raise ValueError(
            f"{key}: category {c} is in task {t + 1}'s group "
            f"{list(task.categories)}; a pretraining category must be in no task: "
            "drop it from pretrain.categories or regroup data.task_categories.")
  if sequence.held_out_train is None or not len(sequence.held_out_train):
    raise ValueError(f"{key}: no training example in no task has these "
                     "categories; hold out categories the dataset has examples of.")


def build_setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Loads the data, builds the vocabulary, the model and the compiled embedders."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  held_out = pretrain_categories(config)
  # Process 0 renders or builds the TFDS data first; the others then read it
  # rather than writing the same files at the same time.
  if sharding.is_lead_process():
    sequence = data_registry.load_task_sequence(config.data, data_dir, held_out)
  sharding.sync("data prepared")
  if not sharding.is_lead_process():
    sequence = data_registry.load_task_sequence(config.data, data_dir, held_out)
  if held_out:
    check_pretrain_categories(held_out, sequence)
  # A pretrained text tower brings its own tokenizer. Otherwise the vocabulary
  # sees training captions only (VSE++), of every task: the paper's model has
  # one fixed vocabulary across the sequence. Held-out categories' captions
  # join it whenever there are any (whatever pretrain.steps), so the same
  # config with pretrain.steps=0 is the from-scratch baseline with the same
  # vocabulary and initial params.
  train_splits = [task.train for task in sequence.tasks]
  if sequence.held_out_train is not None:
    train_splits.append(sequence.held_out_train)
  vocab = dual_encoder.pretrained_tokenizer(config.model)
  if vocab is None:
    vocab = text_lib.build_vocabulary(
        (c for split in train_splits for caps in split.captions for c in caps),
        min_count=config.data.vocab_min_count)
  check_image_shapes([{name: getattr(task, name) for name in SPLITS}
                      for task in sequence.tasks])
  encoded, truncated = [], 0
  for t, task in enumerate(sequence.tasks):
    splits = {}
    for name in SPLITS:
      try:
        splits[name], n = pipeline.encode_split(getattr(task, name), vocab,
                                                config.data.max_caption_len)
      except ValueError as e:  # An empty or non-text caption: say where.
        raise ValueError(f"task {t + 1} {name} split of {config.data.name!r}: {e} "
                         "Fix or drop that example in the dataset.") from e
      truncated += n
    encoded.append(splits)
  pretrain_pool = None
  if sequence.held_out_train is not None:
    pretrain_pool, n = pipeline.encode_split(sequence.held_out_train, vocab,
                                             config.data.max_caption_len)
    truncated += n
  if truncated:
    logging.warning("%d captions longer than max_caption_len=%d were truncated.",
                    truncated, config.data.max_caption_len)
  model = dual_encoder.build_model(config.model, vocab.size,
                                   config.train.compute_dtype)
  image_shape = encoded[0]["train"].images.shape[1:]
  params_template = jax.eval_shape(
      lambda: with_loss_params(dual_encoder.init_params(
          model, jax.random.PRNGKey(0), image_shape, config.data.max_caption_len),
          config))
  mesh = sharding.make_mesh(model_axis_size=model_axis_size(config))
  sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  leaves = jax.tree.leaves(sharding.tree_shardings(params_template, mesh))
  logging.info("mesh %s over %d processes; %d of %d parameter arrays split over "
               "the model axis", dict(mesh.shape), jax.process_count(),
               sum(sharding.MODEL_AXIS in s.spec for s in leaves), len(leaves))
  embed_images, embed_texts = train_lib.make_embed_fns(model, mesh)
  return Setup(config, workdir, sequence, vocab, tuple(encoded), truncated, model,
               mesh, params_template, embed_images, embed_texts, pretrain_pool)


def check_setup(setup: Setup) -> list[str]:
  """What can only be checked once the data is loaded, before any training.

  Returns:
    Warnings, one line each: a batch larger than a task's training pairs.
  Raises:
    ValueError: `eval.fold_size` does not divide a task's evaluation split.
  """
  cfg = setup.config
  fold = cfg.eval.fold_size
  warnings = []
  for t, splits in enumerate(setup.encoded):
    n = len(splits[cfg.eval.split].ids)
    if fold and n % fold:
      raise ValueError(
          f"eval.fold_size={fold} does not divide task {t + 1}'s {cfg.eval.split} "
          f"split of {n} images; set eval.fold_size to a divisor of every task's "
          "split (or 0 for no folds).")
    pairs = len(splits["train"]) * splits["train"].captions_per_image
    if cfg.train.batch_size > pairs:
      warnings.append(
          f"train.batch_size={cfg.train.batch_size} exceeds task {t + 1}'s {pairs} "
          "training pairs: every batch repeats pairs (copies share an image, so "
          "the loss masks them as negatives), and holds no more distinct "
          "negatives than there are pairs.")
  return warnings


def embed_split(setup: Setup, params: Any, split: pipeline.EncodedSplit
                ) -> tuple[np.ndarray, np.ndarray]:
  """Every image and caption of `split` embedded by `params`, in eval batches.

  Returns images float32 [N, dim] and captions float32 [N * captions_per_image,
  dim] in `pipeline.caption_arrays` order (image-major).
  """
  bs = setup.config.eval.batch_size
  caps = pipeline.caption_arrays(split)
  return (train_lib.embed_in_batches(setup.embed_images, params, (split.images,), bs,
                                     setup.mesh),
          train_lib.embed_in_batches(setup.embed_texts, params,
                                     (caps["tokens"], caps["lengths"]), bs, setup.mesh))


def initial_params(setup: Setup) -> Any:
  """The initial params {img, txt[, loss]} from `config.seed`, placed on the mesh
  (`sharding.param_sharding`: replicated without a model axis)."""
  # One jitted init: op-by-op initialisation compiles every initializer apart.
  init = jax.jit(
      lambda rng: with_loss_params(dual_encoder.init_params(
          setup.model, rng, setup.encoded[0]["train"].images.shape[1:],
          setup.config.data.max_caption_len), setup.config),
      out_shardings=sharding.tree_shardings(setup.params_template, setup.mesh))
  params = init(jax.random.PRNGKey(setup.config.seed))
  # Pretrained parts (a ResNet weights file, MiniLM) replace their random init.
  return sharding.place(dual_encoder.load_pretrained(params, setup.config.model),
                        setup.mesh)


def snapshot_meta(setup: Setup, task: int) -> dict:
  """The JSON saved with snapshot `task`: its vocabulary and config fingerprint."""
  return {"task": task, "vocab": setup.vocab.to_json(),
          "config": workdir_lib.fingerprint(setup.config)}


def load_snapshot(setup: Setup, task: int,
                  strategy_template: Any = None) -> tuple[Any, Any]:
  """(params, strategy state) of snapshot `task` (1-based), checked against
  this setup's vocabulary.

  Args:
    strategy_template: the abstract strategy state (`jax.eval_shape` of the
      strategy's `init_state`) to restore with the params; None restores none
      and returns None for it.
  """
  params, meta = checkpoints.restore_snapshot(
      setup.workdir, task, setup.params_template, param_placement(setup.mesh),
      strategy_template=strategy_template)
  if text_lib.tokenizer_from_json(meta["vocab"]) != setup.vocab:
    raise ValueError(
        f"snapshot {task} in {setup.workdir} was trained with another vocabulary "
        "than this config's data gives; evaluate it with the config it was "
        "trained with (the workdir's config.json).")
  return params, meta.get("strategy")


def verified_snapshots(setup: Setup, strategy_template: Any = None) -> set[int]:
  """The completed snapshots that restore; corrupt ones are set aside and retrained.

  Orbax lists a truncated snapshot as complete and only fails when reading
  it, and reads a flipped byte without error, so every snapshot is checked
  against its manifest and read once here (with the strategy state, when
  `strategy_template` is given). One that fails is moved to
  <workdir>/quarantine with what was derived from it (its indices and its
  evaluation row), and the failure is logged with its path; the loop then
  retrains that task from the previous snapshot (or its saved state), which
  gives the same params on the same device count. Every process reads every
  snapshot; process 0 moves the damaged ones, and the others wait for it.
  """
  good = set()
  for task in checkpoints.completed_snapshots(setup.workdir):
    try:
      load_snapshot(setup, task, strategy_template)
      good.add(task)
      if not checkpoints.has_manifest(setup.workdir, task):
        # Saved before snapshots had manifests (or killed between Orbax's
        # finish and the manifest): it restored, so it is complete.
        checkpoints.write_snapshot_manifest(setup.workdir, task)
    except checkpoints.CheckpointError as e:
      moved = checkpoints.quarantine_snapshot(setup.workdir, task)
      workdir_lib.quarantine_derived(setup.workdir, task, moved)
      logging.warning("%s\nMoved it to %s; task %d is retrained from %s.", e, moved,
                      task, f"snapshot {task - 1}" if task > 1 else "the initial params")
  # Nobody reads the rows and indices of a task before process 0 has moved them.
  sharding.sync("snapshots verified")
  return good
