"""The continual experiment: train task by task, snapshot, index, evaluate.

This is the only module that knows the order of the stages (DESIGN.md). Every
stage leaves its output on disk (snapshot, indices, a results row per task),
and rerunning the same command skips what is complete and resumes the rest,
so a killed run loses at most `train.checkpoint_every` steps.

Multi-process runs (every process runs this same code over one global mesh):
every process reads only its rows of each batch and takes part in training,
embedding and Orbax saves; process 0 alone renders the data first, builds the
indices and writes config.json, result rows, embeddings and results, and the
others wait for it where they read what it wrote (`sharding.sync`). Every
process evaluates the same embeddings in the same indices, so every process
returns the same results. The workdir must be on a filesystem all processes see.

Naming: tasks and snapshots are 1-based on disk and in JSON keys
(`snapshots/task_1`, `indices/snap_2/task_1/texts`); arrays are 0-based, so
matrix entry [t][j] is task j+1's queries after training task t+1.
"""

import dataclasses
import json
import os
import platform
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ccr_jax import checkpoints
from ccr_jax import evaluation
from ccr_jax import indexing
from ccr_jax import losses
from ccr_jax import progress
from ccr_jax import reporting
from ccr_jax import sharding
from ccr_jax import strategies
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from ccr_jax.data import tasks as tasks_lib
from ccr_jax.data import text as text_lib
from ccr_jax.models import dual_encoder
from ccr_jax.strategies import regularizers

MODALITIES = ("images", "texts")
# Config sections that define the experiment: a workdir that holds results of
# other values must not be continued with these (eval settings may differ).
EXPERIMENT_SECTIONS = ("seed", "data", "model", "loss", "optim", "train",
                       "strategy", "index")


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

  @property
  def num_tasks(self) -> int:
    return len(self.sequence.tasks)


def _config_subset(config: ml_collections.ConfigDict) -> dict:
  d = json.loads(config.to_json())
  subset = {k: d[k] for k in EXPERIMENT_SECTIONS if k in d}
  # Indices and rows are built on the evaluation split: it defines the workdir.
  subset["eval_split"] = d.get("eval", {}).get("split", "test")
  return subset


# Every key a config may hold, by section: configs/default.py's, plus those the
# real data sources and pretrained towers read (configs/coco_vsepp.py and
# others set them). `strategy` is checked against strategies.default_config()
# and `analysis` against analysis.DEFAULTS. A test keeps this in step with
# every shipped config.
CONFIG_KEYS = {
    "": ("seed", "data", "model", "loss", "optim", "train", "strategy", "index",
         "eval", "analysis", "mesh"),
    "data": ("name", "data_dir", "image_size", "num_categories", "num_tasks",
             "task_categories", "train_per_category", "val_per_category",
             "test_per_category", "max_distractors", "seed", "max_caption_len",
             "vocab_min_count",
             # real sources (ccr_jax/data/{coco,flickr30k,visual_genome,precomputed}.py)
             "manual_dir", "stored_image_size", "decode_threads", "use_restval",
             "categories", "features_dir", "split_prefixes", "categories_file",
             "instances_files", "mmap"),
    "model": ("image_tower", "text_tower", "embed_dim", "word_dim", "cnn_widths",
              "resnet_weights", "freeze_backbone", "freeze_text_backbone",
              "minilm_weights"),
    "loss": ("name", "margin", "reduction", "warmup_steps", "temperature",
             "learn_temperature", "bias", "block_size", "matmul_dtype", "remat"),
    "optim": ("learning_rate", "grad_clip", "decay_at", "decay_factor"),
    "train": ("batch_size", "steps_per_task", "checkpoint_every", "log_every"),
    "index": ("backend", "reindex"),
    "eval": ("ks", "batch_size", "save_embeddings", "split", "fold_size"),
    "mesh": ("model_axis_size",),
}


def _key_paths(d: dict, prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    out.append(prefix + k)
    if isinstance(v, dict) and v:
      out += _key_paths(v, prefix + k + ".")
  return out


def nearest_key_hint(key: str, valid: list[str]) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if not close:  # Typos at the end of a long key ("steps_per_tsak").
    close = [v for v in valid if v.split(".")[-1].startswith(key.split(".")[-1][:4])
             and v.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]][:1]
  return f" Did you mean '{close[0]}'?" if close else ""


def valid_config_keys() -> list[str]:
  """Every dotted key a config may hold (`CONFIG_KEYS`, strategy, analysis)."""
  from ccr_jax import analysis  # pylint: disable=g-import-not-at-top  (imports us)
  keys = [k for k in CONFIG_KEYS[""]]
  keys += [f"{section}.{k}" for section, names in CONFIG_KEYS.items() if section
           for k in names]
  keys += _key_paths(json.loads(strategies.default_config().to_json()), "strategy.")
  keys += [f"analysis.{k}" for k in analysis.DEFAULTS]
  return keys


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a config before any work: unknown keys, types, ranges and names.

  Raises:
    ValueError: listing every problem, each with the key and the fix (the
      nearest valid key for a typo, the valid names for an unknown name).
  """
  valid = valid_config_keys()
  given = json.loads(config.to_json())
  problems = []
  for key in _key_paths(given):
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if key not in valid and (not parent or parent in valid) and not (
        # Free-form mappings: task groups and split file prefixes.
        parent in ("data.split_prefixes", "data.categories")):
      problems.append(f"unknown config key '{key}'.{nearest_key_hint(key, valid)}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))

  def check(ok, message):
    if not ok:
      problems.append(message)

  def number(key, kind=(int, float)):
    section, name = key.split(".")
    value = config[section].get(name)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    check(ok, f"--config.{key}={value!r} must be a number"
          f"{' (an integer)' if kind is int else ''}.")
    return value if ok else None

  for key, low, strict in (("optim.learning_rate", 0, False), ("optim.grad_clip", 0, True),
                           ("optim.decay_factor", 0, False)):
    v = number(key)
    if v is not None:
      check(v > low if strict else v >= low,
            f"--config.{key}={v} must be {'>' if strict else '>='} {low}.")
  v = number("optim.decay_at")
  if v is not None:
    check(0 <= v <= 1, f"--config.optim.decay_at={v} must be a fraction in [0, 1].")
  for key, low in (("train.batch_size", 1), ("train.steps_per_task", 1),
                   ("train.checkpoint_every", 0), ("train.log_every", 1),
                   ("eval.batch_size", 1), ("model.embed_dim", 1),
                   ("data.max_caption_len", 3), ("data.vocab_min_count", 1),
                   ("data.num_tasks", 1), ("data.image_size", 1),
                   ("mesh.model_axis_size", 1)):
    v = number(key, int)
    if v is not None:
      check(v >= low, f"--config.{key}={v} must be >= {low}.")
  ks = config.eval.get("ks")
  check(isinstance(ks, (list, tuple)) and len(ks) > 0 and all(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks),
        f"--config.eval.ks={ks!r} must be a non-empty list of positive integers, "
        "e.g. '(1, 5, 10)'.")
  fold = config.eval.get("fold_size", 0)
  check(isinstance(fold, int) and fold >= 0,
        f"--config.eval.fold_size={fold!r} must be an integer >= 0 (0: no folds).")
  check(config.eval.get("split") in ("val", "test"),
        f"--config.eval.split={config.eval.get('split')!r}; valid: 'val', 'test'.")
  names = (("data.name", config.data.name, tasks_lib.DATASET_NAMES),
           ("loss.name", config.loss.name, tuple(losses.LOSSES)),
           ("index.backend", config.index.backend, indexing.BACKENDS),
           ("model.image_tower", config.model.image_tower,
            tuple(dual_encoder.IMAGE_TOWERS)),
           ("model.text_tower", config.model.text_tower,
            tuple(dual_encoder.TEXT_TOWERS)))
  for key, value, options in names:
    check(value in options, f"--config.{key}={value!r} is unknown; valid: "
          f"{sorted(options)}.")
  if config.loss.name in losses.LOSSES:
    try:  # The strategy's own checks (names, strengths); compat needs the loss.
      strategies.get_strategy(config.strategy, losses.make_loss(config.loss))
    except ValueError as e:
      problems.append(str(e))
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the config in a new workdir; refuses a workdir of another experiment.

  Only process 0 writes; it writes atomically, so another process reads
  either no file or the whole one.
  """
  path = os.path.join(workdir, "config.json")
  mine = _config_subset(config)
  if os.path.exists(path):
    theirs = _config_subset(ml_collections.ConfigDict(reporting.read_json(path)))
    if theirs != mine:
      diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
      raise ValueError(
          f"workdir {workdir} holds an experiment with a different config "
          f"(sections differing: {diffs}). Use a new --workdir, or rerun with "
          "the config stored in its config.json.")
  elif sharding.is_lead_process():
    reporting.write_json(path, json.loads(config.to_json()))


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


def build_setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Loads the data, builds the vocabulary, the model and the compiled embedders."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  # Process 0 renders or builds the TFDS data first; the others then read it
  # rather than writing the same files at the same time.
  if sharding.is_lead_process():
    sequence = tasks_lib.load_task_sequence(config.data, data_dir)
  sharding.sync("data prepared")
  if not sharding.is_lead_process():
    sequence = tasks_lib.load_task_sequence(config.data, data_dir)
  # A pretrained text tower brings its own tokenizer. Otherwise the vocabulary
  # sees training captions only (VSE++), of every task: the paper's model has
  # one fixed vocabulary across the sequence.
  vocab = dual_encoder.pretrained_tokenizer(config.model)
  if vocab is None:
    vocab = text_lib.build_vocabulary(
        (c for task in sequence.tasks for caps in task.train.captions for c in caps),
        min_count=config.data.vocab_min_count)
  check_image_shapes([{name: getattr(task, name) for name in ("train", "val", "test")}
                      for task in sequence.tasks])
  encoded, truncated = [], 0
  for t, task in enumerate(sequence.tasks):
    splits = {}
    for name in ("train", "val", "test"):
      try:
        splits[name], n = pipeline.encode_split(getattr(task, name), vocab,
                                                config.data.max_caption_len)
      except ValueError as e:  # An empty or non-text caption: say where.
        raise ValueError(f"task {t + 1} {name} split of {config.data.name!r}: {e} "
                         "Fix or drop that example in the dataset.") from e
      truncated += n
    encoded.append(splits)
  if truncated:
    logging.warning("%d captions longer than max_caption_len=%d were truncated.",
                    truncated, config.data.max_caption_len)
  model = dual_encoder.build_model(config.model, vocab.size)
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
               mesh, params_template, embed_images, embed_texts)


def model_axis_size(config: ml_collections.ConfigDict) -> int:
  """`config.mesh.model_axis_size`; 1 for configs (and workdirs) without it."""
  return config.get("mesh", {}).get("model_axis_size", 1)


def param_placement(mesh: jax.sharding.Mesh):
  """leaf -> its sharding on `mesh` (`sharding.param_sharding`), for restores."""
  return lambda x: sharding.param_sharding(x.shape, mesh)


# --------------------------------------------------------------------- training


def with_loss_params(params: dict, config: ml_collections.ConfigDict) -> dict:
  """Model params {img, txt} plus the loss's own, if any, as params["loss"].

  The loss's trainable values (a learnable temperature, SigLIP's bias) train,
  snapshot and restore with the towers' params, in their own subtree.
  """
  loss_params = losses.initial_params(config.loss)
  return params if loss_params is None else {**params, "loss": loss_params}


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


def _snapshot_meta(setup: Setup, task: int) -> dict:
  return {"task": task, "vocab": setup.vocab.to_json(),
          "config": _config_subset(setup.config)}


def load_snapshot(setup: Setup, task: int, with_accumulators: bool = False) -> Any:
  """Params of snapshot `task` (1-based), checked against this setup's vocabulary.

  With `with_accumulators`, returns (params, importance accumulators saved
  with the snapshot by an EWC / MAS / L2 strategy).
  """
  template = None
  if with_accumulators:
    template = {"importance": setup.params_template,
                "weighted_anchor": setup.params_template}
  params, meta = checkpoints.restore_snapshot(
      setup.workdir, task, setup.params_template, param_placement(setup.mesh),
      strategy_template=template)
  if text_lib.tokenizer_from_json(meta["vocab"]) != setup.vocab:
    raise ValueError(
        f"snapshot {task} in {setup.workdir} was trained with another vocabulary "
        "than this config's data gives; evaluate it with the config it was "
        "trained with (the workdir's config.json).")
  if with_accumulators:
    return params, regularizers.ImportanceState(**meta["strategy"])
  return params


def verified_snapshots(setup: Setup, with_accumulators: bool) -> set[int]:
  """The completed snapshots that restore; corrupt ones are set aside and retrained.

  Orbax lists a truncated snapshot as complete and only fails when reading
  it, so every snapshot is read once here. One that fails is moved to
  <workdir>/quarantine with what was derived from it (its indices and its
  evaluation row), and the failure is logged with its path; the loop then
  retrains that task from the previous snapshot (or its saved state), which
  gives the same params on the same device count. Every process reads every
  snapshot; process 0 moves the damaged ones, and the others wait for it.
  """
  good = set()
  for task in checkpoints.completed_snapshots(setup.workdir):
    try:
      load_snapshot(setup, task, with_accumulators=with_accumulators)
      good.add(task)
    except checkpoints.CheckpointError as e:
      moved = checkpoints.quarantine_snapshot(setup.workdir, task)
      for derived in (os.path.join(setup.workdir, "indices", f"snap_{task}"),
                      os.path.join(setup.workdir, "results", "rows", f"task_{task}.json")):
        if sharding.is_lead_process() and os.path.exists(derived):
          os.replace(derived, f"{moved}_{os.path.basename(derived)}")
      logging.warning("%s\nMoved it to %s; task %d is retrained from %s.", e, moved,
                      task, f"snapshot {task - 1}" if task > 1 else "the initial params")
  # Nobody reads the rows and indices of a task before process 0 has moved them.
  sharding.sync("snapshots verified")
  return good


@dataclasses.dataclass(frozen=True)
class Training:
  """The compiled pieces of training, built once per experiment.

  `compiled` holds the train step once compiled ahead of time ("step") and
  the seconds that took ("compile_s"); see `compiled_train_step`.
  """
  strategy: strategies.Strategy
  optimizer: Any
  train_step: Any
  importance_fns: dict
  compiled: dict = dataclasses.field(default_factory=dict)


def build_training(setup: Setup) -> Training:
  """Strategy, optimizer and the one compiled train step for the whole sequence."""
  cfg = setup.config
  sharding.check_batch_size(cfg.train.batch_size, setup.mesh)
  loss_fn = train_lib.make_loss(cfg.loss)
  strategy = strategies.get_strategy(cfg.strategy, loss_fn)
  optimizer = train_lib.make_optimizer(cfg.optim, cfg.train.steps_per_task, strategy)
  train_step = train_lib.make_train_step(setup.model, optimizer, loss_fn, setup.mesh,
                                         strategy)
  importance_fns = (train_lib.make_importance_fns(setup.model, loss_fn, setup.mesh,
                                                  cfg.loss.reduction)
                    if strategy.importance else {})
  return Training(strategy, optimizer, train_step, importance_fns)


def replay_pool(setup: Setup, strategy: strategies.Strategy,
                t: int) -> pipeline.EncodedSplit | None:
  """The replay memory available while training task t (0-based): past tasks' pairs."""
  if strategy.replay is None or t == 0:
    return None
  rows = tasks_lib.replay_memory(
      [len(setup.encoded[j]["train"]) for j in range(t)], strategy.replay.memory_size,
      strategy.replay.policy, setup.config.seed)
  return pipeline.concatenate([pipeline.subset(setup.encoded[j]["train"], r)
                               for j, r in enumerate(rows)])


def compiled_train_step(setup: Setup, training: Training, state: dict,
                        batch: dict) -> Any:
  """The train step compiled ahead of time on first use, then reused by every task.

  A compiled executable accepts only the shapes and shardings it was compiled
  for, so a task whose state or batch would need a second compilation fails
  loudly instead of silently compiling again (the sequence compiles once).

  Args:
    state: a train state as `train_lib.create_train_state` returns it.
    batch: a host batch (images [B, ...], tokens [B, L], lengths [B],
      image_ids [B]).
  """
  if "step" not in training.compiled:
    start = time.perf_counter()
    training.compiled["step"] = training.train_step.lower(
        state, sharding.shard_batch(batch, setup.mesh)).compile()
    training.compiled["compile_s"] = time.perf_counter() - start
  return training.compiled["step"]


def train_one_task(setup: Setup, training: Training, t: int, params: Any,
                   accumulators: regularizers.ImportanceState | None,
                   writer: progress.ScalarWriter | None = None) -> Any:
  """Trains task index t (0-based) from `params`, resuming a saved state if any.

  With a `writer`, the logged loss terms and learning rate go to the
  workdir's live scalars at global steps t * steps_per_task + step.
  """
  cfg, strategy = setup.config, training.strategy
  steps = cfg.train.steps_per_task
  strategy_state = None
  if strategy.needs_old_model:
    # A copy: the train step donates params, the old model must survive it.
    old = jax.tree.map(lambda x: x.copy(), params) if t > 0 else None
    strategy_state = train_lib.old_model_state(old, params)
  state = train_lib.create_train_state(
      params, training.optimizer, setup.mesh, step=t * steps,
      strategy_state=strategy_state, accumulators=accumulators,
      freeze_active=strategy.freeze_active(t))
  first_step = 0
  resumed = checkpoints.restore_latest_state(
      setup.workdir, jax.eval_shape(lambda: state), param_placement(setup.mesh))
  if resumed is not None and resumed[1]["task"] == t + 1:
    state, first_step = resumed[0], resumed[1]["next_step"]
    logging.info("task %d: resuming at step %d from %s/state", t + 1, first_step,
                 setup.workdir)
  pool = pipeline.concatenate(
      [setup.encoded[i]["train"] for i in strategy.training_tasks(t)])
  memory = replay_pool(setup, strategy, t)
  ratio = strategy.replay.ratio if strategy.replay else 0.0

  def save(state, next_step):
    checkpoints.save_state(setup.workdir, state, {"task": t + 1, "next_step": next_step})

  rows = sharding.process_rows(cfg.train.batch_size, setup.mesh)

  def batch_fn(s):
    return pipeline.mixed_batch(pool, memory, cfg.train.batch_size, ratio,
                                seed=cfg.seed, task=t, step=s, rows=rows)

  step_fn = compiled_train_step(setup, training, state, batch_fn(0))
  try:
    with pipeline.prefetched(batch_fn, steps) as next_batch:
      state = train_lib.train_task(
          state, step_fn, next_batch,
          first_step=first_step, num_steps=steps, mesh=setup.mesh,
          checkpoint_every=cfg.train.checkpoint_every, checkpoint_fn=save,
          log_every=cfg.train.log_every, task=t + 1, writer=writer,
          learning_rate_fn=train_lib.learning_rate_schedule(cfg.optim, steps))
  except FloatingPointError as e:
    latest = checkpoints.latest_state_step(setup.workdir)
    last_good = (f"the state checkpoint at {setup.workdir}/state/{latest} (step "
                 f"{latest - t * steps} of task {t + 1})"
                 if latest is not None and latest > t * steps else
                 f"snapshot {t} at {checkpoints.snapshot_dir(setup.workdir, t)}"
                 if t > 0 else "none yet (the task started from the initial params)")
    raise FloatingPointError(f"{e} Last good checkpoint: {last_good}.") from e
  return state["params"]


def end_of_task(setup: Setup, training: Training, t: int, params: Any,
                accumulators: regularizers.ImportanceState | None
                ) -> regularizers.ImportanceState | None:
  """The importance accumulators after task t (None for strategies without them).

  The estimate averages over `importance_batches` batches of task t's training
  data, drawn from a stream other than the training order's (seed + 1).
  """
  kind = training.strategy.importance
  if kind is None:
    return None
  task_importance = None
  if kind != "l2":
    cfg = setup.config
    pool = setup.encoded[t]["train"]
    rows = sharding.process_rows(cfg.train.batch_size, setup.mesh)
    batches = (sharding.shard_batch(pipeline.train_batch(
        pool, cfg.train.batch_size, seed=cfg.seed + 1, task=t, step=m, rows=rows),
                                    setup.mesh)
               for m in range(training.strategy.importance_batches))
    if kind == "mas":
      task_importance = regularizers.mas_importance(
          training.importance_fns["similarity"], params, batches)
    else:
      task_importance = regularizers.fisher_diagonal(
          training.importance_fns["loss"], params, batches, cfg.train.batch_size)
  return regularizers.accumulate(kind, accumulators, task_importance, params,
                                 training.strategy.importance_decay)


# --------------------------------------------------------------------- indexing


def index_dir(workdir: str, snapshot: int, task: int, modality: str) -> str:
  """Where the index of task `task`'s gallery embedded by `snapshot` lives."""
  return os.path.join(workdir, "indices", f"snap_{snapshot}", f"task_{task}", modality)


def test_queries(setup: Setup, params: Any, j: int) -> dict[str, dict[str, np.ndarray]]:
  """Task j's (0-based) evaluation images and captions embedded with `params`.

  The split is `eval.split`: 'test' for reported numbers, 'val' to choose
  hyperparameters (strategy strengths) without looking at the test set.

  Returns {"images": {"emb" [N, D], "item_ids" [N], "owners" [N]},
           "texts": {"emb" [C*N, D], "item_ids" [C*N], "owners" [C*N]}}.
  """
  if setup.config.eval.split not in ("val", "test"):
    raise ValueError(f"--config.eval.split={setup.config.eval.split!r}; valid: "
                     "'val', 'test'.")
  test = setup.encoded[j][setup.config.eval.split]
  bs = setup.config.eval.batch_size
  caps = pipeline.caption_arrays(test)
  return {
      "images": {"emb": train_lib.embed_in_batches(
          setup.embed_images, params, (test.images,), bs, setup.mesh),
                 "item_ids": test.ids, "owners": test.ids},
      "texts": {"emb": train_lib.embed_in_batches(
          setup.embed_texts, params, (caps["tokens"], caps["lengths"]), bs, setup.mesh),
                "item_ids": caps["item_ids"], "owners": caps["owners"]},
  }


def build_indices(setup: Setup, snapshot: int, params: Any,
                  queries: dict[int, dict] | None = None) -> list[dict]:
  """Builds (or keeps, when complete on disk) the indices of snapshot `snapshot`.

  The gallery of task `snapshot` always (the fixed regime's index); with
  `index.reindex`, every earlier task's gallery too. Returns their metadata.
  Process 0 builds and saves them (every process holds the same embeddings);
  the others wait until they are on disk.
  """
  tasks = range(1, snapshot + 1) if setup.config.index.reindex else [snapshot]
  built = []
  for task in tasks:
    emb = None
    for modality in MODALITIES:
      path = index_dir(setup.workdir, snapshot, task, modality)
      if (sharding.is_lead_process() and
          not os.path.exists(os.path.join(path, "metadata.json"))):
        if emb is None:
          emb = (queries or {}).get(task - 1) or test_queries(setup, params, task - 1)
        index = indexing.build_index(
            emb[modality]["emb"], emb[modality]["item_ids"],
            backend=setup.config.index.backend, snapshot=snapshot, task=task,
            modality=modality)
        indexing.save_index(index, path)
      built.append({"snapshot": snapshot, "task": task, "modality": modality,
                    "path": os.path.relpath(path, setup.workdir)})
  sharding.sync(f"indices of snapshot {snapshot} built")
  return built


# ------------------------------------------------------------------- evaluation


def _gallery_snapshot(regime: str, t: int, j: int) -> int:
  """1-based snapshot whose embeddings form task j's gallery after task t (0-based)."""
  return j + 1 if regime == "fixed" else t + 1


def owner_of(modality: str, item_ids: np.ndarray, captions_per_image: int) -> np.ndarray:
  """The image id each gallery item belongs to (captions: id * C + c)."""
  return item_ids // captions_per_image if modality == "texts" else item_ids


def _text_to_image(query_owners, gallery_owners, direction) -> np.ndarray:
  """For each caption row, the row of its image on the other side (-1 if absent)."""
  images, captions = ((query_owners, gallery_owners) if direction == "i2t"
                      else (gallery_owners, query_owners))
  row_of = {int(i): r for r, i in enumerate(images)}
  return np.array([row_of.get(int(o), -1) for o in captions], np.int64)


def load_gallery_index(setup: Setup, snapshot: int, task: int, modality: str,
                       cache: dict | None = None,
                       expect_item_ids: np.ndarray | None = None) -> indexing.Index:
  """The saved index of task `task`'s gallery embedded by `snapshot`, checked.

  Args:
    cache: when given, {(snapshot, task, modality): Index}; an index already in
      it is returned as is, a loaded one is added (one load, with checksums,
      per index however many evaluations search it).
    expect_item_ids: int [count], checked against the index's ids on load.

  Raises:
    IndexMismatchError: the index is missing, corrupt, or not the one expected.
  """
  key = (snapshot, task, modality)
  if cache is not None and key in cache:
    return cache[key]
  index = indexing.load_index(
      index_dir(setup.workdir, snapshot, task, modality), expect_snapshot=snapshot,
      expect_task=task, expect_modality=modality,
      expect_dim=setup.config.model.embed_dim, expect_item_ids=expect_item_ids)
  if cache is not None:
    cache[key] = index
  return index


def evaluate_after_task(setup: Setup, t: int, params: Any,
                        queries: dict[int, dict] | None = None,
                        embeddings_dir: str | None = None,
                        index_cache: dict | None = None) -> dict:
  """Every metric on the test queries of tasks 0..t embedded by snapshot t+1.

  Queries are searched in indices loaded from disk: fixed (task j's gallery
  from snapshot j+1) and, with `index.reindex`, reindex (from snapshot t+1);
  task-aware (task j's gallery) and task-agnostic (the union of every seen
  gallery, searched per index and merged by score).

  Returns {regime: {scope: {direction: {str(j+1): metrics}}}} where metrics
  has r1, r5, r10 (from the index's top-k), exact_r1, exact_r5, exact_r10,
  medr, meanr (exact ranks over the same gallery embeddings, as the forgetting
  analysis computes them), index_recall_at_10 (the index's top-10 against
  exact search on the same embeddings) and, with `eval.fold_size`, the
  task-aware fold means fold_r1 ... fold_meanr (COCO-1K). With
  `embeddings_dir`, also writes the query and gallery embeddings of every
  evaluation and returns their manifest. `index_cache`: see
  `load_gallery_index`.
  """
  cfg = setup.config
  ks = tuple(cfg.eval.ks)
  k = max(ks)
  cpi = setup.encoded[0]["train"].captions_per_image
  queries = queries or {}
  regimes = ("fixed", "reindex") if cfg.index.reindex else ("fixed",)
  index_cache = {} if index_cache is None else index_cache

  metrics: dict = {}
  manifest = []
  for j in range(t + 1):
    q = queries.get(j) or test_queries(setup, params, j)
    for regime in regimes:
      for scope in ("task_aware", "task_agnostic"):
        gallery_tasks = [j] if scope == "task_aware" else list(range(t + 1))
        for direction, (qm, gm) in (("i2t", ("images", "texts")),
                                    ("t2i", ("texts", "images"))):
          indices = [load_gallery_index(setup, _gallery_snapshot(regime, t, g), g + 1, gm,
                                        index_cache)
                     for g in gallery_tasks]
          gallery_emb = np.concatenate([ix.embeddings for ix in indices])
          gallery_ids = np.concatenate([ix.item_ids for ix in indices])
          gallery_owner = owner_of(gm, gallery_ids, cpi)
          query_emb, query_owner = q[qm]["emb"], q[qm]["owners"]
          _, top_ids = indexing.search_many(indices, query_emb, k)
          ranks = evaluation.ranks_from_topk(owner_of(gm, top_ids, cpi), query_owner)
          exact, exact_rows = evaluation.exact_metrics(
              query_emb, gallery_emb, query_owner, gallery_owner, ks)
          agreement = np.mean([len(set(a) & set(b)) / k for a, b in
                               zip(top_ids.tolist(), gallery_ids[exact_rows].tolist())])
          m = {**evaluation.recall_at_k(ranks, ks), **exact,
               "index_recall_at_10": float(agreement)}
          if cfg.eval.get("fold_size", 0) and scope == "task_aware":
            # COCO-1K beside COCO-5K: the same embeddings, ranked per fold.
            m.update(evaluation.fold_metrics(
                query_emb, gallery_emb, query_owner, gallery_owner,
                setup.encoded[j][cfg.eval.split].ids, cfg.eval.fold_size, ks))
          metrics.setdefault(regime, {}).setdefault(scope, {}).setdefault(
              direction, {})[str(j + 1)] = m
          if embeddings_dir is not None:
            name = f"{direction}_q{t + 1}_{regime}_task{j + 1}_{scope}.npz"
            buf = _npz_bytes(query_emb=query_emb, gallery_emb=gallery_emb,
                             text_to_image=_text_to_image(query_owner, gallery_owner,
                                                          direction))
            if sharding.is_lead_process():
              reporting.write_atomic(os.path.join(embeddings_dir, name), buf)
            manifest.append({
                "file": name, "direction": direction, "query_snapshot": t + 1,
                "gallery_snapshots": [_gallery_snapshot(regime, t, g)
                                      for g in gallery_tasks],
                "gallery_tasks": [g + 1 for g in gallery_tasks],
                "regime": regime, "task": j + 1, "scope": scope,
                **{f"r{kk}": m[f"r{kk}"] for kk in (1, 5, 10)}})
  return {"metrics": metrics, "embeddings": manifest}


def _npz_bytes(**arrays) -> bytes:
  import io
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


# ------------------------------------------------------------------ aggregation


def _versions() -> dict:
  import flax, optax, orbax.checkpoint, scann, tensorflow_datasets  # noqa: E401
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax_checkpoint": orbax.checkpoint.__version__,
          "scann": getattr(scann, "__version__", "1.4.2"),
          "tensorflow_datasets": tensorflow_datasets.__version__,
          "numpy": np.__version__}


def aggregate(setup: Setup, rows: list[dict]) -> dict:
  """results.json's content from the per-task evaluation rows (in task order)."""
  num = len(rows)
  metrics: dict = {}
  for t, row in enumerate(rows):
    for regime, scopes in row["metrics"].items():
      for scope, directions in scopes.items():
        for direction, per_task in directions.items():
          for j_str, m in per_task.items():
            j = int(j_str) - 1
            for name, value in m.items():
              mat = metrics.setdefault(regime, {}).setdefault(scope, {}).setdefault(
                  direction, {}).setdefault(name, [[None] * num for _ in range(num)])
              mat[t][j] = value
  summary: dict = {}
  for regime, scopes in metrics.items():
    for scope, d in scopes.items():
      rsum = [[None if d["i2t"]["r1"][t][j] is None else
               sum(d[x][f"r{kk}"][t][j] for x in ("i2t", "t2i") for kk in (1, 5, 10))
               for j in range(num)] for t in range(num)]
      d["rsum"] = rsum
      summary.setdefault(regime, {})[scope] = {
          name: evaluation.continual_summary(
              np.array(mat, dtype=float))
          for name, mat in (("i2t_r1", d["i2t"]["r1"]), ("t2i_r1", d["t2i"]["r1"]),
                            ("rsum", rsum))}
  return {
      "config": json.loads(setup.config.to_json()),
      "task_split": setup.sequence.describe(),
      "vocabulary_size": setup.vocab.size,
      "truncated_captions": setup.truncated_captions,
      "tasks_completed": num,
      "metrics": metrics,
      "summary": summary,
      "versions": _versions(),
      "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind,
                  "processes": jax.process_count()},
  }


def write_results(setup: Setup, results: dict, name: str = "results") -> None:
  """results/<name>.json, <name>.md and the R@1 matrix plot (process 0 only)."""
  if not sharding.is_lead_process():
    return
  out = os.path.join(setup.workdir, "results")
  reporting.write_json(os.path.join(out, f"{name}.json"), results)
  reporting.write_atomic(os.path.join(out, f"{name}.md"),
                         reporting.results_markdown(results))
  reporting.plot_r1_matrices(results, os.path.join(out, "plots", f"{name}_r1.png"))


# ----------------------------------------------------------------- entry points


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the whole continual experiment; returns results.json's content."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_config(config, workdir)
  timing: dict[str, float] = {}

  def timed(stage, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    timing[stage] = timing.get(stage, 0.0) + time.perf_counter() - start
    return out

  setup = timed("data_s", build_setup, config, workdir)
  training = build_training(setup)
  importance = training.strategy.importance is not None
  done = verified_snapshots(setup, importance)
  rows_dir = os.path.join(workdir, "results", "rows")
  emb_dir = (os.path.join(workdir, "embeddings") if config.eval.save_embeddings
             else None)
  rows, manifest, params, accumulators = [], [], None, None
  # Process 0 appends to logs/scalars.jsonl and logs/tensorboard/; a no-op on
  # other processes.
  writer = progress.ScalarWriter(workdir)
  for t in range(setup.num_tasks):
    if t + 1 in done:
      params = None  # Loaded below only if this task's later stages are missing.
    else:
      if params is None:
        if t == 0:
          params = initial_params(setup)
          accumulators = regularizers.zeros_like(params) if importance else None
        elif importance:
          params, accumulators = load_snapshot(setup, t, with_accumulators=True)
        else:
          params = load_snapshot(setup, t)
      params = timed("train_s", train_one_task, setup, training, t, params,
                     accumulators, writer)
      accumulators = timed("strategy_s", end_of_task, setup, training, t, params,
                           accumulators)
      timed("snapshot_s", checkpoints.save_snapshot,
            workdir, t + 1, params, _snapshot_meta(setup, t + 1),
            strategy=accumulators._asdict() if accumulators is not None else None)
    row_path = os.path.join(rows_dir, f"task_{t + 1}.json")
    if os.path.exists(row_path) and emb_dir is None:
      rows.append(reporting.read_json(row_path))
      continue
    if params is None:
      params = load_snapshot(setup, t + 1)
    queries = {j: timed("embed_s", test_queries, setup, params, j) for j in range(t + 1)}
    timed("index_s", build_indices, setup, t + 1, params, queries)
    row = timed("evaluate_s", evaluate_after_task, setup, t, params, queries, emb_dir)
    manifest += row.pop("embeddings")
    # Before the row file: a kill in between rewrites the same values at the
    # same step on resume (read_scalars keeps one), never loses them.
    writer.write((t + 1) * config.train.steps_per_task,
                 recall_scalars(row, tuple(config.eval.ks)))
    if sharding.is_lead_process():
      reporting.write_json(row_path, row)
    rows.append(row)
    _log_row(t, row)
  results = aggregate(setup, rows)
  results["strategy"] = training.strategy.describe()
  if training.strategy.replay is not None:
    memory = tasks_lib.replay_memory(
        [len(e["train"]) for e in setup.encoded[:-1]],
        training.strategy.replay.memory_size, training.strategy.replay.policy,
        config.seed)
    results["strategy"]["replay_memory_per_task_at_last_task"] = [len(m) for m in memory]
  if "compile_s" in training.compiled:
    # Compiled inside the first trained task: report it as its own stage.
    timing["compile_s"] = training.compiled["compile_s"]
    timing["train_s"] -= timing["compile_s"]
  timed("report_s", write_results, setup, results)
  if sharding.is_lead_process():
    if emb_dir is not None:
      reporting.write_json(os.path.join(emb_dir, "manifest.json"), manifest)
    reporting.write_json(os.path.join(workdir, "results", "timing.json"), timing)
  writer.close()
  return results


def recall_scalars(row: dict, ks: tuple[int, ...]) -> dict:
  """A row's index recalls, nested for `progress.ScalarWriter.write`.

  Returns {"recall": {regime: {scope: {direction: {"task_<j>": {"r<k>": v}}}}}},
  which the writer flattens to names such as recall/fixed/task_aware/i2t/task_1/r1.
  """
  out: dict = {}
  for regime, scopes in row["metrics"].items():
    for scope, directions in scopes.items():
      for direction, per_task in directions.items():
        out.setdefault(regime, {}).setdefault(scope, {})[direction] = {
            f"task_{j}": {f"r{k}": m[f"r{k}"] for k in ks}
            for j, m in per_task.items()}
  return {"recall": out}


def _log_row(t: int, row: dict) -> None:
  for regime, scopes in row["metrics"].items():
    aware = scopes["task_aware"]
    logging.info("after task %d, %s, task-aware R@1 i2t %s | t2i %s", t + 1, regime,
                 " ".join(f"{m['r1']:.1f}" for m in aware["i2t"].values()),
                 " ".join(f"{m['r1']:.1f}" for m in aware["t2i"].values()))
