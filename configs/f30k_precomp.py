r"""VSE++ on precomputed Flickr30K features (VSE++/SCAN f30k_precomp), one task.

  python -m ccr_jax.main --config=configs/f30k_precomp.py --workdir=/tmp/ccr_f30k_precomp \
      --config.data.features_dir=/data/vsepp/data/f30k_precomp

Image features from `{train,dev,test}_ims.npy` with their `*_caps.txt`
(ccr_jax/data/precomputed.py) through VSE++'s linear projection
(`model.image_tower="precomputed"`); VSE++'s hyperparameters, 30 epochs of
29,000 images x 5 captions at batch 128 (configs/flickr30k_vsepp.py).
`get_config("tiny")` shrinks everything to a seconds-long smoke test; point it
at a fixture with --config.data.features_dir.
"""

import ml_collections

from configs import coco_precomp
from configs import coco_vsepp
from configs import flickr30k_vsepp


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VSE++ on Flickr30K features; `arg='tiny'` shrinks it to a smoke test."""
  config = coco_precomp.get_config()
  config.data.split_prefixes = {"train": "train", "val": "dev", "test": "test"}
  config.train.steps_per_task = flickr30k_vsepp.F30K_STEPS
  config.train.checkpoint_every = 1_000
  config.eval.fold_size = 0  # Flickr30K's test set is 1,000 images: no folds
  if arg == "tiny":
    coco_vsepp.shrink(config)
  return config
