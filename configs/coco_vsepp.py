r"""VSE++ on MS-COCO (Karpathy splits, one task): the non-continual reference.

  python -m ccr_jax.main --config=configs/coco_vsepp.py --workdir=/tmp/ccr_coco_vsepp \
      --config.data.manual_dir=/data/coco --config.data.data_dir=/data/tfds \
      --config.model.resnet_weights=/data/weights/resnet152.npz

Faghri et al.'s VSE++ (REFERENCES.md): embed 1024, word 300, GRU, hinge loss
with the hardest negative (margin 0.2), Adam 2e-4 decayed x0.1 after 15 of 30
epochs, gradient-norm clip 2.0, batch 128, vocabulary of training words seen at
least 4 times. Train = Karpathy train + restval (113,287 images), test = the
5,000 Karpathy test images (the COCO-5K protocol); 30 epochs of 566,435
(image, caption) pairs at batch 128 is 132,758 steps. The ResNet-152 backbone
is frozen, VSE++'s first stage; its published fine-tuned numbers (COCO-5K
image->text R@1 41.3, text->image 30.3) need a second stage with
--config.model.freeze_backbone=False and a lower learning rate.

The manual dir is laid out as ccr_jax/data/coco.py describes. `get_config
("tiny")` shrinks everything to a seconds-long smoke test; point it at a
fixture with --config.data.manual_dir / --config.data.data_dir.
"""

import ml_collections

from configs import default

# VSE++: 30 epochs over every (image, caption) pair of the 113,287 training images.
COCO_STEPS = 30 * 113_287 * 5 // 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VSE++ on COCO; `arg='tiny'` shrinks it to a smoke test."""
  config = default.get_config()
  data = config.data
  data.name = "coco"
  data.data_dir = ""  # "" = <workdir>/tfds; share one across runs to build once.
  data.manual_dir = ""  # the raw COCO files; read only when building
  data.image_size = 224  # what the ResNet sees: shorter side resized, centre crop
  data.stored_image_size = 256  # JPEGs in the TFDS dataset (0 = original files)
  data.decode_threads = 0  # 0 = one per CPU core, at most 16
  data.use_restval = True  # Karpathy restval joins train, as in VSE++
  data.num_tasks = 1  # one task holding every image (tasks.SINGLE_TASK_RULE)
  data.task_categories = None
  config.model.image_tower = "resnet152"
  config.model.resnet_weights = ""  # path to ImageNet weights; "" = random init
  config.model.freeze_backbone = True
  vsepp(config, steps=COCO_STEPS)
  # COCO-1K (5 folds of the 1,000 test images) beside COCO-5K (the whole set).
  config.eval.fold_size = 1000
  if arg == "tiny":
    shrink(config)
  return config


def vsepp(config: ml_collections.ConfigDict, steps: int) -> None:
  """VSE++'s text model, loss and optimisation, for `steps` steps per task."""
  config.data.max_caption_len = 32  # <start> + words + <end>; ~10 words typical
  config.data.vocab_min_count = 4
  config.model.text_tower = "gru"
  config.model.embed_dim = 1024
  config.model.word_dim = 300
  config.loss.name = "vse_pp"
  config.loss.margin = 0.2
  config.loss.reduction = "sum"
  config.optim.learning_rate = 2e-4
  config.optim.grad_clip = 2.0
  config.optim.decay_at = 0.5  # x0.1 after 15 of 30 epochs
  config.optim.decay_factor = 0.1
  config.train.batch_size = 128
  config.train.steps_per_task = steps
  config.train.checkpoint_every = 2_000
  config.train.log_every = 200
  config.eval.batch_size = 256


def shrink(config: ml_collections.ConfigDict) -> None:
  """Seconds-long sizes for smoke tests on a tiny fixture (every real config)."""
  if config.data.name != "precomputed":
    config.data.image_size = 32
    config.data.stored_image_size = 0  # fixtures are tiny: keep their bytes
  config.data.decode_threads = 1
  config.data.vocab_min_count = 1
  if config.model.image_tower.startswith("resnet"):
    config.model.image_tower = "resnet18"
  config.model.embed_dim = 32
  config.model.word_dim = 16
  config.train.batch_size = 4
  config.train.steps_per_task = 2
  config.train.checkpoint_every = 1
  config.train.log_every = 1
  config.eval.batch_size = 8
  config.eval.fold_size = 0  # fixtures hold a handful of test images
