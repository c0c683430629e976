"""Every continual strategy, trained on a real two-task run, does what it is for.

tests/test_strategies.py checks each strategy's parts in isolation against
closed forms; a part can pass there and still do nothing in training (a
strength that never reaches the step, a state installed as zeros, a memory
never mixed in). These tests train the tiny config's two tasks (two shapes
each) through the run stages, chained as run/loop.py chains them, and compare
each strategy with fine-tuning from the same task-1 snapshot, on the same
batches: the strategy is the only difference, so each test fails when its
strategy is made a no-op (the slow `test_inert_strategy_fails_its_check`
shows it).

Task 1 is learnt once, by fine-tuning, and every strategy continues from that
snapshot with its own state after task 1 (its `end_of_task` on snapshot 1).
That is what each strategy would reach itself: none of those tested acts
during task 1 (no previous snapshot, no importance yet, an empty memory,
freezing from task 2; `freeze` trains both tasks itself to show that).

Margins are ratios to fine-tuning's value, chosen between what a no-op gives
(1.0: the same batches from the same snapshot give fine-tuning's params) and
what the strategy reaches; the values in comments were measured on 2 CPU
cores with seeds 0, 1 and 2 (`seed` and `data.seed`) of this config; the
tests use seed 0.
"""

import copy
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ccr_jax import checkpoints
from ccr_jax import losses
from ccr_jax import train as train_lib
from ccr_jax.data import pipeline
from ccr_jax.run import config as config_lib
from ccr_jax.run import setup as setup_lib
from ccr_jax.run import training as training_lib
from configs import default

STEPS = 300

# Strengths far above the defaults (chosen on validation for plasticity, see
# docs/strategies.md): with Adam normalising every step, a regulariser that
# works dominates the update at these; one that is inert changes nothing at
# any strength.
HIGH = {
    "ewc": {"ewc": {"strength": 3e5}},
    "online_ewc": {"ewc": {"strength": 3e5}},
    "mas": {"mas": {"strength": 1e6}},
    "l2": {"l2": {"strength": 1e4}},
    "si": {"si": {"strength": 5e3}},  # c: the pull 2c/2 = 1e4/2, as l2's
    "der": {"der": {"alpha": 100.0}},
    "lwf": {"lwf": {"strength": 1e3}},
    "compat": {"compat": {"strength": 100.0}},
}
IMPORTANCE = ("ewc", "online_ewc", "mas", "l2", "si")
# Spelled out, not the defaults: the test is about the image tower from task 2.
FREEZE = {"freeze": {"patterns": ("img/.*",), "from_task": 2}}

# Each check passes below this fraction of fine-tuning's value; see the check.
DRIFT_RATIO = 0.5
LOSS_RATIO = 0.8
GAP_RATIO = 0.5


def experiment_config():
  """The tiny config's 2 tasks x 2 shapes, grown until drift and forgetting show.

  The tiny config's 4 steps over 32 images per task barely move the model;
  300 steps over 128 images per task at 1e-3 (~1 s of training) learn task 1
  (mean rank of the match 19 on its test split, chance 64 text->image and
  ~107 image->text) and let task 2 move it measurably.
  """
  config = default.get_config("tiny")
  config.seed = 0
  config.data.train_per_category = 64   # 128 training images (640 pairs) per task
  config.data.test_per_category = 64    # a 128-image task-1 gallery: ranks resolve
  config.train.steps_per_task = STEPS
  config.train.log_every = STEPS
  # No mid-task state: nothing a later run could resume from by mistake.
  config.train.checkpoint_every = 0
  config.optim.learning_rate = 1e-3
  # The importance estimate's batches (default 20) only cost time here.
  config.strategy.ewc.batches = 4
  config.strategy.mas.batches = 4
  return config


# ------------------------------------------------------------------ the runs


@dataclasses.dataclass(frozen=True)
class Runs:
  """The shared experiment: data and model built once, task 1 learnt once.

  Attributes:
    root: where each run gets its own workdir.
    initial: the params before task 1.
    snapshot1: the params after task 1 (fine-tuning).
    finished: `run_key` -> params after task 2, filled on demand.
  """
  setup: setup_lib.Setup
  root: Any
  initial: Any
  snapshot1: Any
  finished: dict


def copy_params(params: Any) -> Any:
  # The train step donates the params it starts from; the shared ones must survive.
  return jax.tree.map(lambda x: x.copy(), params)


def run_key(name: str, settings: dict) -> str:
  """'ewc' or 'ewc-strength=300000.0': a run's cache key and workdir name."""
  flat = [f"{k}={v}" for section in sorted(settings)
          for k, v in sorted(settings[section].items())]
  # Settings may hold regexes ('img/.*'): keep the name one path component.
  return re.sub(r"[^\w.=-]", "_", "-".join([name, *flat]))


def strategy_setup(runs: Runs, name: str, settings: dict) -> setup_lib.Setup:
  """The shared setup with `config.strategy.name = name` and `settings`
  ({section: {key: value}}) applied, in a workdir of its own."""
  config = copy.deepcopy(runs.setup.config)
  config.strategy.name = name
  for section, values in settings.items():
    for key, value in values.items():
      config.strategy[section][key] = value
  config_lib.validate_config(config)
  workdir = runs.root / run_key(name, settings)
  workdir.mkdir(exist_ok=True)
  return dataclasses.replace(runs.setup, config=config, workdir=str(workdir))


def initial_state(training: training_lib.Training, params: Any) -> dict | None:
  """The strategy's state before task 1, as run/loop.py makes it."""
  if training.strategy.init_state is None:
    return None
  return training.strategy.init_state(params, training.context)


def learn_task(setup: setup_lib.Setup, training: training_lib.Training, t: int,
               params: Any, state: dict | None) -> tuple[Any, dict | None]:
  """Task t (0-based) as run/loop.py learns it: (params, strategy state after it)."""
  params, state = training_lib.train_one_task(setup, training, t, copy_params(params),
                                              state)
  return params, training_lib.end_of_task(training, t, params, state)


def after_task2(runs: Runs, name: str, settings: dict | None = None) -> Any:
  """The params after task 2 of strategy `name`, from the shared snapshot 1."""
  settings = settings or {}
  key = run_key(name, settings)
  if key not in runs.finished:
    setup = strategy_setup(runs, name, settings)
    training = training_lib.build_training(setup)
    state = initial_state(training, runs.initial)
    if training.strategy.collect is not None:
      # Its state is read off task 1's own optimizer state (SI's path
      # integral): learn task 1 itself. Its updates there are fine-tuning's
      # (no pull before an anchor), so the params equal snapshot 1.
      params1, state = learn_task(setup, training, 0, runs.initial, state)
    else:
      params1 = runs.snapshot1
      state = training_lib.end_of_task(training, 0, runs.snapshot1, state)
    runs.finished[key], _ = learn_task(setup, training, 1, params1, state)
  return runs.finished[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("strategy_behaviour")
  setup = setup_lib.build_setup(experiment_config(), str(root / "data"))
  shared = Runs(setup, root, setup_lib.initial_params(setup), None, {})
  # Fine-tuning learns task 1 for everyone, then task 2 with the same
  # compiled step (one compilation for both).
  finetune = strategy_setup(shared, "finetune", {})
  training = training_lib.build_training(finetune)
  snapshot1, _ = learn_task(finetune, training, 0, shared.initial, None)
  shared = dataclasses.replace(shared, snapshot1=snapshot1)
  shared.finished["finetune"], _ = learn_task(finetune, training, 1, snapshot1, None)
  return shared


# --------------------------------------------------------------- measurements


def embed_task1(runs: Runs, params: Any, split: str = "test"):
  """Task 1's `split` embedded by `params`: images [N, D], captions [N, C, D]."""
  data = runs.setup.encoded[0][split]
  caps = pipeline.caption_arrays(data)
  batch, mesh = runs.setup.config.eval.batch_size, runs.setup.mesh
  images = train_lib.embed_in_batches(runs.setup.embed_images, params, (data.images,),
                                      batch, mesh)
  texts = train_lib.embed_in_batches(runs.setup.embed_texts, params,
                                     (caps["tokens"], caps["lengths"]), batch, mesh)
  return images, texts.reshape(len(images), data.captions_per_image, -1)


def task1_drift(runs: Runs, params: Any) -> dict[str, float]:
  """How far `params` moved task 1's test embeddings from snapshot 1's.

  Returns {"images", "texts": 1 - mean cosine between an item's embedding by
  `params` and by snapshot 1; "scores": mean |S - S1| over every image x
  caption cosine S of task 1's test split}.
  """
  img1, txt1 = embed_task1(runs, runs.snapshot1)
  img, txt = embed_task1(runs, params)
  # Embeddings are unit norm: a row-wise dot product is the cosine.
  scores = img @ txt.reshape(-1, txt.shape[-1]).T
  scores1 = img1 @ txt1.reshape(-1, txt1.shape[-1]).T
  return {"images": float(1.0 - np.mean(np.sum(img * img1, -1))),
          "texts": float(1.0 - np.mean(np.sum(txt * txt1, -1))),
          "scores": float(np.mean(np.abs(scores - scores1)))}


def mean_rank(query_images, query_texts, gallery_images, gallery_texts) -> float:
  """Mean 0-based rank of the match, averaged over text->image and image->text.

  Args:
    query_images [N, D], query_texts [N, C, D]: the queries (row i: image i,
      its C captions); gallery_images [N, D], gallery_texts [N, C, D]: the
      gallery of the same items, possibly embedded by another model.
  A caption's match is its image among N; an image's is the best of its C
  captions among N * C (VSE++'s protocol, as Recall@K counts them).
  """
  n, c, d = query_texts.shape
  scores = query_texts.reshape(-1, d) @ gallery_images.T                    # [N*C, N]
  own = scores[np.arange(n * c), np.repeat(np.arange(n), c)]
  text_to_image = np.mean(np.sum(scores > own[:, None], axis=1))
  scores = query_images @ gallery_texts.reshape(-1, d).T                    # [N, N*C]
  best_own = scores.reshape(n, n, c)[np.arange(n), np.arange(n)].max(axis=-1)
  image_to_text = np.mean(np.sum(scores > best_own[:, None], axis=1))
  return float(text_to_image + image_to_text) / 2


def fixed_minus_reindex(runs: Runs, params: Any) -> float:
  """Task 1's mean rank in the fixed regime minus in the reindex regime.

  Queries are task 1's test items embedded by `params` (the final model); the
  fixed gallery is embedded by snapshot 1, the reindexed one by `params`.
  """
  old_img, old_txt = embed_task1(runs, runs.snapshot1)
  img, txt = embed_task1(runs, params)
  return mean_rank(img, txt, old_img, old_txt) - mean_rank(img, txt, img, txt)


def task1_training_loss(runs: Runs, params: Any) -> float:
  """The training loss of task 1's training pairs under `params`.

  Every image with its k-th caption, all task-1 images as negatives of each
  other (one batch of all of them), averaged over k.
  """
  config = runs.setup.config
  loss_fn = losses.make_loss(config.loss)
  img, txt = embed_task1(runs, params, split="train")
  n = len(img)
  # The loss at the end of any warm-up (vse_pp starts as vse0).
  step = jnp.int32(np.iinfo(np.int32).max)
  return float(np.mean([loss_fn(jnp.asarray(img), jnp.asarray(txt[:, k]),
                                image_ids=jnp.arange(n), step=step)[0]
                        for k in range(txt.shape[1])]))


def image_fingerprints(split: pipeline.EncodedSplit) -> set[bytes]:
  return {row.tobytes() for row in split.images[np.arange(len(split))]}


# ---------------------------------------------------------------- the checks


def check_embeddings_close(runs: Runs, name: str, params: Any) -> None:
  """Task 1's image, caption and score drift each below DRIFT_RATIO x fine-tuning's."""
  check_task1_close(runs, name, params, ("images", "texts", "scores"))


def check_scores_close(runs: Runs, name: str, params: Any) -> None:
  """Task 1's score drift below DRIFT_RATIO x fine-tuning's."""
  check_task1_close(runs, name, params, ("scores",))


def check_task1_close(runs: Runs, name: str, params: Any,
                      measures: tuple[str, ...], against: str = "finetune") -> None:
  """Each of `measures` of `task1_drift` below DRIFT_RATIO x that of `against`
  (a finished run's key)."""
  reference = task1_drift(runs, runs.finished[against])
  drift = task1_drift(runs, params)
  # Fine-tuning moves task 1 clearly (measured: images 0.20-0.22, texts
  # 0.17-0.19, scores 0.21-0.22); else "less than fine-tuning" says nothing.
  assert min(reference.values()) > 0.05, reference
  for m in measures:
    # Measured ratios at HIGH strength, seeds 0-2 (images / texts / scores):
    # ewc and online_ewc <= 0.11 / 0.05 / 0.28, mas <= 0.06 / 0.05 / 0.23,
    # l2 <= 0.02 / 0.07 / 0.19, lwf's scores <= 0.25; seed 0: si 0.01 /
    # 0.01 / 0.10, der against replay 0.11 / 0.03 / 0.25; at strength 1e-9
    # every one gives 1.00. Half of the reference's drift sits well between.
    assert drift[m] < DRIFT_RATIO * reference[m], (
        f"{name}: task-1 {m} drift {drift[m]:.4f} is not below {DRIFT_RATIO} x "
        f"{against}'s {reference[m]:.4f} (all: {drift} vs {reference})")


def check_closer_than_replay(runs: Runs, name: str, params: Any) -> None:
  """Task 1's embeddings drift below DRIFT_RATIO x replay's (same memory)."""
  after_task2(runs, "replay")
  check_task1_close(runs, name, params, ("images", "texts", "scores"), against="replay")


def check_lower_task1_loss(runs: Runs, name: str, params: Any) -> None:
  """Task 1's training loss after task 2 below LOSS_RATIO x fine-tuning's."""
  reference = task1_training_loss(runs, runs.finished["finetune"])
  loss = task1_training_loss(runs, params)
  # Measured ratios, seeds 0-2: replay 0.57-0.63, joint 0.43-0.52; a no-op
  # (the same task-2 batches as fine-tuning) gives 1.00. 0.8 sits between.
  assert loss < LOSS_RATIO * reference, (
      f"{name}: task-1 training loss after task 2 {loss:.3f} is not below "
      f"{LOSS_RATIO} x fine-tuning's {reference:.3f}")


def check_narrower_gap(runs: Runs, name: str, params: Any) -> None:
  """Task 1's fixed-minus-reindex mean rank below GAP_RATIO x fine-tuning's."""
  reference = fixed_minus_reindex(runs, runs.finished["finetune"])
  gap = fixed_minus_reindex(runs, params)
  # Fine-tuning opens a gap of 2.7-6.1 ranks (of 128 images, 640 captions;
  # seeds 0-2); near 0, "narrower than fine-tuning's" would say nothing.
  assert reference > 1.0, reference
  # Measured, seeds 0-2: compat at HIGH strength keeps 0.25x of fine-tuning's
  # gap, or turns it negative (-0.4x, -1.2x: the old gallery then serves the
  # new queries better than a reindexed one); at strength 1e-9 it keeps
  # 1.00x. Half sits between, the lower seed-0 value 2x below it.
  assert gap < GAP_RATIO * reference, (
      f"{name}: task-1 mean rank fixed minus reindex {gap:.3f} is not below "
      f"{GAP_RATIO} x fine-tuning's {reference:.3f}")


def label_leaves(params: Any, patterns) -> dict[str, bool]:
  """'img/conv0/kernel' -> whether a pattern matches the path (freezing's rule:
  the whole path, any pattern), computed here independently of freeze.py."""
  paths = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return {p: any(re.fullmatch(pattern, p) for pattern in patterns) for p in paths}


def leaves_by_path(params: Any) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def freeze_snapshots(runs: Runs, settings: dict) -> tuple[Any, Any, Any]:
  """(initial params, snapshot 1, snapshot 2) of `freeze` trained over both
  tasks, the snapshots written and read back as run/loop.py does."""
  setup = strategy_setup(runs, "freeze", settings)
  training = training_lib.build_training(setup)
  params, state = runs.initial, initial_state(training, runs.initial)
  for t in range(setup.num_tasks):
    params, state = learn_task(setup, training, t, params, state)
    checkpoints.save_snapshot(setup.workdir, t + 1, params,
                              setup_lib.snapshot_meta(setup, t + 1), strategy=state)
  return (runs.initial,
          *(setup_lib.load_snapshot(setup, t + 1)[0] for t in range(setup.num_tasks)))


def check_freeze(runs: Runs, settings: dict) -> None:
  """Frozen leaves move during task 1 and are bit-identical across task 2's
  snapshots; every other leaf moves in both tasks."""
  freeze = strategy_setup(runs, "freeze", settings).config.strategy.freeze
  initial, snapshot1, snapshot2 = freeze_snapshots(runs, settings)
  frozen = label_leaves(initial, freeze.patterns)
  # The default patterns freeze the image tower: both kinds of leaf exist.
  assert any(frozen.values()) and not all(frozen.values()), frozen
  before, after1, after2 = (leaves_by_path(p) for p in (initial, snapshot1, snapshot2))
  for path, is_frozen in frozen.items():
    # Every leaf gets a gradient from every batch (no unused parameter in
    # this model), so "moved" is "some element differs".
    assert not np.array_equal(before[path], after1[path]), (
        f"{path} did not move during task 1 (freezing starts at task "
        f"{freeze.from_task})")
    if is_frozen:
      # Exact: a zero gradient gives a zero Adam update, bit for bit.
      np.testing.assert_array_equal(after2[path], after1[path],
                                    err_msg=f"frozen {path} moved during task 2")
    else:
      assert not np.array_equal(after2[path], after1[path]), (
          f"trainable {path} did not move during task 2")


# ------------------------------------------------------------------ the tests


# si trains its own task 1 too (its importance is that task's path integral),
# and online_ewc, mas and ewc share l2's penalty machinery (ewc adds the
# Fisher estimate, which test_strategies checks analytically): the slow
# set, to keep the not-slow loop under 3 minutes.
SLOW_IMPORTANCE = ("si", "online_ewc", "mas", "ewc")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in SLOW_IMPORTANCE else n for n in IMPORTANCE])
def test_importance_regulariser_keeps_task1_embeddings_close(runs, name):
  """A strong EWC / online EWC / MAS / L2 pull keeps task 1's image and caption
  embeddings, and their scores, closer to snapshot 1's than fine-tuning does.

  Catches: a pull that never acts (strength not reaching the transform, the
  importance or anchor installed as zeros or not at all, an end-of-task hook
  that does not update them); each then drifts as fine-tuning does.
  """
  check_embeddings_close(runs, name, after_task2(runs, name, HIGH[name]))


def test_lwf_keeps_task1_similarities_close(runs):
  """A strong LwF keeps the cross-modal scores of task 1's items closer to
  snapshot 1's than fine-tuning does.

  Catches: a distillation term too weak to act (a logit scale that leaves
  both softmaxes uniform), one never switched on after task 1, or distilling
  the new model into itself. LwF matches in-batch similarity distributions,
  not the embeddings themselves: they may turn together (measured: its image
  embeddings drift 0.8x fine-tuning's while the scores drift 0.25x), so the
  scores are what it must keep.
  """
  check_scores_close(runs, "lwf", after_task2(runs, "lwf", HIGH["lwf"]))


def test_freeze_keeps_frozen_leaves_bit_identical_and_trains_the_rest(runs):
  """`freeze` (image tower, from task 2) leaves every frozen leaf bit-identical
  between snapshots 1 and 2 while every other leaf moves, and freezes nothing
  during task 1.

  Catches: freezing never switched on (the frozen leaves move in task 2, as
  they do under fine-tuning from the same snapshot: checked first), switched
  on from task 1, or freezing everything.
  """
  finetuned = leaves_by_path(runs.finished["finetune"])
  snapshot1 = leaves_by_path(runs.snapshot1)
  frozen = label_leaves(runs.snapshot1, FREEZE["freeze"]["patterns"])
  # Without freezing, task 2 moves the image tower: bit-identity below is news.
  assert all(not np.array_equal(finetuned[p], snapshot1[p])
             for p, is_frozen in frozen.items() if is_frozen)
  check_freeze(runs, FREEZE)


@pytest.mark.parametrize("name", ["replay", "joint"])
def test_rehearsal_lowers_task1_loss(runs, name):
  """Replay (its memory mixed into task 2's batches) and joint training (task
  2 on both tasks' data) end with a lower training loss on task 1's pairs
  than fine-tuning.

  Catches: a memory that is empty or never mixed into the batches, a joint
  data policy the batching ignores; both then train on task 2 alone.
  """
  check_lower_task1_loss(runs, name, after_task2(runs, name))


def test_rehearsal_batches_of_task2_hold_task1_pairs(runs):
  """Task 2's batches hold task-1 training pairs: replay's memory is made of
  them and fills its share of every batch; joint's pool includes task 1.

  Catches: a memory drawn from the wrong task or left out of the batch,
  and a joint policy that lists only the current task.
  """
  task1 = image_fingerprints(runs.setup.encoded[0]["train"])
  task2 = runs.setup.encoded[1]["train"]
  setup = strategy_setup(runs, "replay", {})
  # Building it compiles nothing: the step compiles on its first batch.
  strategy = training_lib.build_training(setup).strategy
  memory = training_lib.memory_pool(setup, strategy, 1)
  assert memory is not None and len(memory) > 0
  assert image_fingerprints(memory) <= task1
  config = setup.config
  for step in range(3):
    batch = pipeline.mixed_batch(task2, memory, config.train.batch_size,
                                 strategy.memory.ratio, seed=config.seed, task=1,
                                 step=step)
    from_task1 = sum(row.tobytes() in task1 for row in batch["images"])
    share = round(strategy.memory.ratio * config.train.batch_size)
    assert share > 0 and from_task1 == share, (from_task1, share)
  joint = training_lib.build_training(strategy_setup(runs, "joint", {})).strategy
  assert 0 in joint.training_tasks(1) and 1 in joint.training_tasks(1)


@pytest.mark.slow  # two more task-2 trainings (replay's and its own)
def test_der_keeps_task1_embeddings_closer_than_replay(runs):
  """DER++ (replay plus the pull of memory pairs to the embeddings snapshot 1
  gave them) keeps task 1's embeddings closer to snapshot 1's than replay with
  the same memory does.

  Catches: targets never stored or stored as zeros, memory slots that do not
  reach the loss term, a pull whose strength is lost: DER++ is then replay.
  """
  check_closer_than_replay(runs, "der", after_task2(runs, "der", HIGH["der"]))


def test_compat_narrows_fixed_vs_reindex_gap(runs):
  """With a strong compat term, task 1's new queries searched in the gallery
  snapshot 1 embedded (fixed) rank their matches nearly as well as in a
  gallery the final model re-embeds (reindex); under fine-tuning they fall
  well behind.

  Catches: a compatibility term that is never switched on, is computed
  against the new model instead of the old one, or whose strength is lost.
  """
  check_narrower_gap(runs, "compat", after_task2(runs, "compat", HIGH["compat"]))


@pytest.mark.slow  # a task of its own (~5 s): the not-slow loop must stay short
def test_agem_learns_task1_exactly_as_finetuning(runs):
  """A-GEM has no memory during task 1: no reference batch, no projection, so
  its snapshot 1 is fine-tuning's bit for bit (the same batches, the same
  compiled arithmetic).

  Catches: a first task trained on a split batch or on summed gradients (the
  published A-GEM trains task 1 as plain SGD does), or a reference batch that
  takes rows from the current batch.
  """
  setup = strategy_setup(runs, "agem", {})
  training = training_lib.build_training(setup)
  params1, _ = training_lib.train_one_task(setup, training, 0,
                                           copy_params(runs.initial), None)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params1),
                               jax.tree.leaves(runs.snapshot1)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))


def memory_loss_change(runs: Runs, names: tuple[str, ...], lr: float = 1e-2,
                       steps: int = 4) -> dict[str, list[tuple[float, float, float]]]:
  """For task 2's first `steps` A-GEM batches from snapshot 1 and each
  strategy of `names`: (g . g_ref, dtheta . g_ref, |g| |g_ref|) of one SGD
  step of that strategy (its transform, then SGD) from snapshot 1.

  g is the gradient on the batch's current-task rows, g_ref on its memory
  rows (A-GEM's reference batch); dtheta . g_ref is the first-order change
  of the memory loss the step causes. SGD, not the run's Adam, so the
  update is the transformed gradient itself.
  """
  agem = strategy_setup(runs, "agem", {})
  memory_strategy = training_lib.build_training(agem).strategy
  memory = training_lib.memory_pool(agem, memory_strategy, 1)
  config, mesh = agem.config, agem.mesh
  batch_size = config.train.batch_size
  loss_fn = losses.make_loss(config.loss)
  model = runs.setup.model

  @jax.jit
  def grad(params, part):
    def loss(p):
      img, txt = model.apply({"params": p}, part["images"], part["tokens"],
                             part["lengths"])
      return loss_fn(img, txt, image_ids=part["image_ids"], step=0)[0]
    return jax.grad(loss)(params)

  def dot(a, b):
    return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))

  batches = [pipeline.mixed_batch(runs.setup.encoded[1]["train"], memory, batch_size,
                                  0.0, seed=config.seed, task=1, step=s,
                                  memory_batch=memory_strategy.memory.separate_batch)
             for s in range(steps)]
  grads = [(grad(runs.snapshot1, {k: v[:batch_size] for k, v in b.items()}),
            grad(runs.snapshot1, {k: v[batch_size:] for k, v in b.items()}))
           for b in batches]
  out = {}
  for name in names:
    strategy = training_lib.build_training(strategy_setup(runs, name, {})).strategy
    tx = optax.chain(strategy.transform, optax.sgd(lr))
    step = train_lib.make_train_step(
        model, tx, loss_fn, mesh, strategy.loss_term,
        current_rows=batch_size if strategy.memory_gradient else 0,
        memory_gradient=strategy.memory_gradient)
    out[name] = []
    for batch, (g, g_ref) in zip(batches, grads):
      if not strategy.memory_gradient:  # Fine-tuning trains on the current rows.
        batch = {k: v[:batch_size] for k, v in batch.items()}
      state = train_lib.create_train_state(copy_params(runs.snapshot1), tx, mesh)
      state, _ = step(state, batch)
      moved = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                           state["params"], runs.snapshot1)
      out[name].append((dot(g, g_ref), dot(moved, g_ref),
                        (dot(g, g) * dot(g_ref, g_ref)) ** 0.5))
  return out


def check_never_raises_memory_loss(name: str, changes: list[tuple[float, float, float]],
                                   lr: float = 1e-2) -> None:
  """On the batches whose gradient conflicts with the memory's (g . g_ref
  < 0), `name`'s step does not raise the memory loss to first order."""
  conflicts = [(m, scale) for d, m, scale in changes if d < 0]
  # Measured on seed 0: 2 of the first 4 task-2 batches conflict with task
  # 1's memory; without one the check would say nothing.
  assert conflicts, "no task-2 batch conflicts with the memory's gradient"
  for moved_dot, scale in conflicts:
    # A-GEM's update is orthogonal to g_ref after projection: float32
    # rounding left |dtheta . g_ref| <= 3e-8 of lr |g| |g_ref| (measured);
    # fine-tuning's is lr |g . g_ref|: 0.014 and 0.21 of it on the two
    # conflicting batches. 1e-5 sits between.
    assert moved_dot <= 1e-5 * lr * scale, (
        f"{name}: a step on a conflicting batch raises the memory loss to first "
        f"order (dtheta . g_ref = {moved_dot:.3e}, lr |g||g_ref| = {lr * scale:.3e})")


@pytest.mark.slow  # two more compiled steps and their gradients (~13 s alone)
def test_agem_steps_never_raise_the_memory_loss(runs):
  """On conflicting batches A-GEM's step leaves the memory loss unchanged to
  first order, where fine-tuning's raises it.

  Catches: a projection that never happens (no reference gradient reaching
  the transform, a reference gradient of the wrong rows, a wrong sign), or
  one against the current rows' own gradient: A-GEM then steps as
  fine-tuning does, which must fail (checked here).
  """
  changes = memory_loss_change(runs, ("agem", "finetune"))
  check_never_raises_memory_loss("agem", changes["agem"])
  with pytest.raises(AssertionError, match="finetune: a step on a conflicting batch"):
    check_never_raises_memory_loss("finetune", changes["finetune"])


def test_query_adapter_maps_rotated_queries_back_into_the_old_index(runs):
  """After a known rotation of the embedding space (the new model = snapshot
  1 followed by an orthogonal R), task 1's rotated queries searched in
  snapshot 1's gallery rank their matches as snapshot 1's own queries do once
  mapped by the adapter, and far worse unmapped.

  Catches: a map never fitted or applied (identity), fitted the wrong way
  round (old to new), or on mismatched items.
  """
  check_adapter_undoes_rotation(runs, strategy_setup(runs, "query_adapter", {}))
  # Made a no-op (a ridge that pins the map to the identity), it must fail.
  with pytest.raises(AssertionError, match="query_adapter: mapped queries"):
    check_adapter_undoes_rotation(runs, strategy_setup(
        runs, "query_adapter", {"query_adapter": {"ridge": 1e9}}))


def check_adapter_undoes_rotation(runs: Runs, setup: setup_lib.Setup) -> None:
  """The mean rank of mapped rotated queries within 10 % of the unrotated ones'."""
  adapt = training_lib.build_training(setup).strategy.adapt_queries
  gallery_img, gallery_txt = embed_task1(runs, runs.snapshot1)
  n, c, d = gallery_txt.shape
  rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
  # The items the adapter is fitted on: task 2's training split, embedded by
  # both models (the new = the old rotated).
  data = runs.setup.encoded[1]["train"]
  caps = pipeline.caption_arrays(data)
  mesh, batch = runs.setup.mesh, runs.setup.config.eval.batch_size
  fit = {"images": train_lib.embed_in_batches(runs.setup.embed_images, runs.snapshot1,
                                              (data.images,), batch, mesh),
         "texts": train_lib.embed_in_batches(runs.setup.embed_texts, runs.snapshot1,
                                             (caps["tokens"], caps["lengths"]), batch,
                                             mesh)}
  maps = {m: adapt(np.asarray(x) @ rotation, np.asarray(x)) for m, x in fit.items()}
  query_img, query_txt = gallery_img @ rotation, gallery_txt @ rotation
  own = mean_rank(gallery_img, gallery_txt, gallery_img, gallery_txt)
  unmapped = mean_rank(query_img, query_txt, gallery_img, gallery_txt)
  mapped = mean_rank(maps["images"](query_img),
                     maps["texts"](query_txt.reshape(-1, d)).reshape(n, c, d),
                     gallery_img, gallery_txt)
  # A random rotation scrambles the scores: measured on seed 0, snapshot 1's
  # own queries rank their match at 19.5 on average (of 128 images / 640
  # captions), rotated ones at 122.2 unmapped and 20.0 mapped (ridge 1; a
  # map fitted on 128 images and 640 captions of dimension 32 recovers R^T
  # up to the ridge's pull towards I). 10 % sits between.
  assert unmapped > 2 * own, (unmapped, own)
  assert mapped <= 1.1 * own + 0.5, (
      f"query_adapter: mapped queries' mean rank {mapped:.2f} is not within 10 % "
      f"of snapshot 1's own {own:.2f} (unmapped: {unmapped:.2f})")


# Each strategy made inert (a strength near 0, freezing after the last task, a
# memory share that rounds to no pair, or plain fine-tuning for joint, which
# has no setting): its check must then fail, and on its comparison (the
# message it names), not on a precondition, else it cannot catch a no-op.
INERT = [
    *[pytest.param(check_embeddings_close, name,
                   {section: {"strength": 1e-9} for section in HIGH[name]},
                   f"{name}: task-1 .* drift", id=name) for name in IMPORTANCE],
    pytest.param(check_scores_close, "lwf", {"lwf": {"strength": 1e-9}},
                 "lwf: task-1 scores drift", id="lwf"),
    pytest.param(check_narrower_gap, "compat", {"compat": {"strength": 1e-9}},
                 "compat: task-1 mean rank", id="compat"),
    pytest.param(check_closer_than_replay, "der", {"der": {"alpha": 1e-9}},
                 "der: task-1 .* drift", id="der"),
    # 0.01 x 16 rows rounds to no memory row: every batch is task 2's alone.
    pytest.param(check_lower_task1_loss, "replay", {"replay": {"ratio": 0.01}},
                 "replay: task-1 training loss", id="replay"),
    pytest.param(check_lower_task1_loss, "finetune", {},
                 "finetune: task-1 training loss", id="joint"),
    pytest.param(check_freeze, "freeze",
                 {"freeze": {**FREEZE["freeze"], "from_task": 3}},
                 "frozen .* moved during task 2", id="freeze"),
]


@pytest.mark.slow
@pytest.mark.parametrize("check, name, settings, failure", INERT)
def test_inert_strategy_fails_its_check(runs, check, name, settings, failure):
  """Each check above fails for its strategy made inert (one compilation each)."""
  with pytest.raises(AssertionError, match=failure):
    if check is check_freeze:  # It trains both tasks itself.
      check_freeze(runs, settings)
    else:
      check(runs, name, after_task2(runs, name, settings))
