r"""Default experiment: the embedded synthetic benchmark, fine-tuning, CPU, minutes.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default

4 tasks x 3 shape categories, a small CNN + GRU dual encoder trained with the
VSE0 hinge loss, every task's gallery indexed with ScaNN, evaluated with and
without reindexing. See README.md for the numbers it reaches.
Joint training (the upper bound): add --config.strategy.name=joint.

`:pretrained` starts from pretrained towers, as the paper does:

  python -m ccr_jax.main --config=configs/default.py:pretrained --workdir=/tmp/ccr_pretrained

16 shapes are rendered; the same 4 tasks of 3 are learned over shapes 0..11
after 800 steps of training on shapes 12..15, which belong to no task
(docs/datasets.md; its from-scratch baseline on the same data:
--config.pretrain.steps=0).

Every key, its default and its meaning is declared once, in the module of
what reads it (ccr_jax/run/config.py assembles them): this file starts from
configs/defaults.py, which lists them all with their values and imports no
JAX. `:tiny` shrinks it to a seconds-long smoke
test that unit tests and the real-data configs start from; `:pretrained,tiny`
shrinks the pretrained variant alike.
"""

import ml_collections

from ccr_jax import schema
from configs import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; arg: comma-separated 'pretrained' and/or 'tiny'.

  'pretrained' pretrains on held-out shapes before task 1; 'tiny' shrinks
  either to a seconds-long smoke test.
  """
  options = schema.variant_options(arg, ("pretrained", "tiny"), "configs/default.py")
  config = defaults.get_config()
  if "pretrained" in options:
    config.data.num_categories = 16  # every shape the benchmark can render
    # The default's 4 tasks of 3 shapes; shapes 12..15 are in no task.
    config.data.task_categories = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    config.pretrain.categories = (12, 13, 14, 15)
    config.pretrain.steps = 800  # two tasks' worth; 800 images x 5 captions
  if "tiny" in options:
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
    if "pretrained" in options:  # 2 tasks of 2 shapes, then 2 held out
      config.data.num_categories = 6
      config.data.task_categories = [[0, 1], [2, 3]]
      config.pretrain.categories = (4, 5)
      config.pretrain.steps = 4
  return config
