r"""Default experiment: the embedded synthetic benchmark, fine-tuning, CPU, minutes.

  python -m ccr_jax.main --config=configs/default.py --workdir=/tmp/ccr_default

4 tasks x 3 shape categories, a small CNN + GRU dual encoder trained with the
VSE0 hinge loss, every task's gallery indexed with ScaNN, evaluated with and
without reindexing. See README.md for the numbers it reaches.
Joint training (the upper bound): add --config.strategy.name=joint.

Every key, its default and its meaning is declared once, in the module of
what reads it (ccr_jax/run/config.py assembles them; `docs/` lists them):
this file takes those defaults. `:tiny` shrinks it to a seconds-long smoke
test that unit tests and the real-data configs start from.
"""

import ml_collections

from ccr_jax.run import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default config; `arg='tiny'` shrinks it to a seconds-long smoke test."""
  config = config_lib.default_config()
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
