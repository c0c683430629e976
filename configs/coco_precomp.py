r"""VSE++ on precomputed COCO features (VSE++/SCAN coco_precomp), one task or SE-COCO.

  python -m ccr_jax.main --config=configs/coco_precomp.py --workdir=/tmp/ccr_coco_precomp \
      --config.data.features_dir=/data/vsepp/data/coco_precomp

Image features from `{train,dev,testall}_ims.npy` ([N, D] pooled CNN features,
or [N, 36, 2048] SCAN regions, averaged by the projection) with their
`*_caps.txt` (ccr_jax/data/precomputed.py); the image tower is VSE++'s linear
projection (`model.image_tower="precomputed"`). testall is the 5,000-image
COCO-5K test set; use --config.data.split_prefixes.test=test for VSE++'s 1K
files. 30 epochs of 113,287 images x 5 captions at batch 128 is 132,758
steps (configs/coco_vsepp.py).

`get_config("secoco")` splits the features into configs/secoco.py's 3 tasks;
this needs `{split}_ids.txt` files holding COCO image ids and the COCO
instances annotations for the categories:
  python -m ccr_jax.main --config=configs/coco_precomp.py:secoco --workdir=/tmp/ccr_secoco_precomp \
      --config.data.features_dir=/data/coco_precomp \
      --config.data.instances_files='("/data/coco/annotations/instances_train2014.json","/data/coco/annotations/instances_val2014.json")'

`get_config("tiny")` (or "secoco,tiny") shrinks everything to a seconds-long
smoke test; point it at a fixture with --config.data.features_dir.
"""

import ml_collections

from ccr_jax import schema
from configs import coco_vsepp
from configs import secoco


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """VSE++ on COCO features; arg: comma-separated 'secoco' and/or 'tiny'."""
  options = schema.variant_options(arg, ("secoco", "tiny"), "configs/coco_precomp.py")
  config = coco_vsepp.get_config()
  data = config.data
  data.name = "precomputed"
  data.features_dir = ""  # the directory of the *_ims.npy / *_caps.txt files
  data.split_prefixes = {"train": "train", "val": "dev", "test": "testall"}
  data.categories_file = ""  # optional JSON (precomputed.py); or:
  data.instances_files = ()  # COCO instances JSONs, matched through *_ids.txt
  data.mmap = True  # memory-map the features instead of reading them into RAM
  for field in ("manual_dir", "stored_image_size", "use_restval"):
    del data[field]  # pixel sources only
  config.model.image_tower = "precomputed"
  del config.model.resnet_weights, config.model.freeze_backbone
  if "secoco" in options:
    config.eval.fold_size = 0  # COCO-1K folds are a single-task protocol
    data.num_tasks = len(secoco.TASK_GROUPS)
    data.task_categories = [list(group) for group in secoco.TASK_GROUPS]
    config.train.steps_per_task = 20_000
  if "tiny" in options:
    coco_vsepp.shrink(config)
  return config
