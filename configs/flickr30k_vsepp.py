r"""VSE++ on Flickr30K (Karpathy splits, one task): the non-continual reference.

  python -m ccr_jax.main --config=configs/flickr30k_vsepp.py --workdir=/tmp/ccr_f30k_vsepp \
      --config.data.manual_dir=/data/flickr30k --config.data.data_dir=/data/tfds \
      --config.model.resnet_weights=/data/weights/resnet152.npz

VSE++'s hyperparameters (configs/coco_vsepp.py) on Karpathy's Flickr30K split:
29,000 train / 1,014 val / 1,000 test images, 5 captions each; 30 epochs of
145,000 pairs at batch 128 is 33,984 steps, decayed x0.1 after 15. The
ResNet-152 backbone is frozen (VSE++'s first stage); VSE++'s published
fine-tuned numbers (image->text R@1 52.9, text->image 39.6) need a second stage
with --config.model.freeze_backbone=False.

The manual dir holds dataset_flickr30k.json and flickr30k-images/
(ccr_jax/data/flickr30k.py). `get_config("tiny")` shrinks everything to a
seconds-long smoke test; point it at a fixture with --config.data.manual_dir /
--config.data.data_dir.
"""

import ml_collections

from configs import coco_vsepp

F30K_STEPS = 30 * 29_000 * 5 // 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VSE++ on Flickr30K; `arg='tiny'` shrinks it to a smoke test."""
  config = coco_vsepp.get_config()
  # Flickr30K's test set is 1,000 images: one gallery, no folds.
  config.eval.fold_size = 0
  config.data.name = "flickr30k"
  config.data.manual_dir = ""  # dataset_flickr30k.json + flickr30k-images/
  del config.data.use_restval  # COCO only
  config.train.steps_per_task = F30K_STEPS
  config.train.checkpoint_every = 1_000
  if arg == "tiny":
    coco_vsepp.shrink(config)
  return config
