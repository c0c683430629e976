r"""Default experiment: the embedded synthetic benchmark, fine-tuning, CPU, minutes.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default

4 tasks x 3 shape categories, a small CNN + GRU dual encoder trained with the
VSE0 hinge loss, every task's gallery indexed with ScaNN, evaluated with and
without reindexing. See README.md for the numbers it reaches.
Joint training (the upper bound): add --config.strategy.name=joint.
"""

import ml_collections

from ccr_jax import strategies


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg='tiny'` shrinks it to a seconds-long smoke test."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"
  config.data.data_dir = ""  # "" = <workdir>/tfds (rendered locally, no download)
  config.data.image_size = 32
  config.data.num_categories = 12
  config.data.num_tasks = 4
  config.data.task_categories = ml_collections.FieldReference(None, field_type=list)
  config.data.train_per_category = 200
  config.data.val_per_category = 10
  config.data.test_per_category = 40
  config.data.max_distractors = 1
  config.data.seed = 0
  config.data.max_caption_len = 24  # <start> + words + <end>; covers 99% of the grammar
  config.data.vocab_min_count = 1  # VSE++ uses 4 on COCO; the grammar is small

  config.model = ml_collections.ConfigDict()
  config.model.image_tower = "cnn"
  config.model.text_tower = "gru"
  config.model.embed_dim = 128  # VSE++ uses 1024 with pretrained features
  config.model.word_dim = 300
  config.model.cnn_widths = (16, 32, 64)

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "vse0"  # VSE++'s hardest negatives collapse from scratch
  config.loss.margin = 0.2
  config.loss.reduction = "sum"
  config.loss.warmup_steps = 0  # vse_pp only: VSE0 steps before hardest negatives
  # infonce / siglip: the logit temperature (CLIP 0.07; SigLIP starts at 0.1),
  # learnt from that start when learn_temperature; siglip's bias starts at `bias`.
  config.loss.temperature = 0.07
  config.loss.learn_temperature = False
  config.loss.bias = -10.0
  # Compiled variant, the same loss (ccr_jax/losses.py): 0 = dense [B, B]
  # scores, b > 0 = caption blocks of b; float32 or bfloat16 matmuls; remat
  # recomputes the scores in the backward pass instead of storing them.
  config.loss.block_size = 0
  config.loss.matmul_dtype = "float32"
  config.loss.remat = False

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 5e-4
  config.optim.grad_clip = 2.0
  config.optim.decay_at = 0.5  # fraction of each task's steps before decaying
  config.optim.decay_factor = 0.1

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.steps_per_task = 400
  config.train.checkpoint_every = 200
  config.train.log_every = 50

  # Devices (ccr_jax/sharding.py): one mesh over every device of every process.
  # Batches are split over all devices; model_axis_size > 1 also splits each
  # large parameter and its optimizer state over groups of that many devices
  # (FSDP-style). Not part of the experiment: a workdir resumes on any mesh.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.model_axis_size = 1

  # name: finetune | joint | freeze | ewc | online_ewc | mas | l2 | lwf | replay |
  # compat, combined with '+' (e.g. ewc+replay); settings per component below.
  config.strategy = strategies.default_config()

  config.index = ml_collections.ConfigDict()
  config.index.backend = "scann"
  config.index.reindex = True  # also index old galleries with the new snapshot

  config.eval = ml_collections.ConfigDict()
  config.eval.ks = (1, 5, 10)
  config.eval.batch_size = 256
  config.eval.save_embeddings = False
  config.eval.split = "test"  # 'val' to tune hyperparameters without the test set
  # > 0: also report task-aware metrics averaged over folds of this many test
  # images (fold_r1 ...), e.g. 1000 for COCO-1K beside COCO-5K.
  config.eval.fold_size = 0

  # --mode=evaluate's forgetting analysis (ccr_jax/analysis.py): fractions of
  # each old gallery re-embedded by the newest snapshot, and how they are chosen.
  config.analysis = ml_collections.ConfigDict()
  config.analysis.budgets = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
  config.analysis.policies = ("random", "drift")
  config.analysis.uniformity_t = 2.0
  config.analysis.uniformity_items = 2048

  if arg == "tiny":
    config.data.num_categories = 4
    config.data.num_tasks = 2
    config.data.train_per_category = 16
    config.data.val_per_category = 2
    config.data.test_per_category = 4
    config.model.embed_dim = 32
    config.model.word_dim = 16
    config.model.cnn_widths = (8, 16)
    config.train.batch_size = 16
    config.train.steps_per_task = 4
    config.train.checkpoint_every = 2
    config.train.log_every = 2
    config.eval.batch_size = 32
  return config
