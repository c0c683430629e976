r"""Sequential MS-COCO: 3 tasks of COCO supercategories, VSE++ on ResNet-152.

  python -m ccr_jax.main --config=configs/secoco.py --workdir=/tmp/ccr_secoco \
      --config.data.manual_dir=/data/coco --config.data.data_dir=/data/tfds \
      --config.model.resnet_weights=/data/weights/resnet152.npz

The continual setting of Wang, Herranz & van de Weijer (CVPR-W 2021), whose
exact splits are not public: these groups are ours. The manual dir is laid out
as ccr_jax/data/coco.py describes (Karpathy dataset_coco.json, the 2014
captions and instances annotations, train2014/, val2014/); the first run
builds the TFDS dataset in data_dir (images stored at 256 px), later runs
reuse it.

Tasks, by COCO supercategory; an image goes to the group covering the largest
annotated area in it, ties to the earlier task (tasks.DOMINANT_GROUP_RULE):
  1 street & travel: vehicle, outdoor, accessory
  2 animals & sports: animal, sports
  3 indoor & food: kitchen, food, furniture, electronic, appliance, indoor
Why these: each group is its own visual domain with its own words (roads and
vehicles / animals and playing fields / rooms and meals), so every new task
shifts both the image and the text distribution, and the groups hold roughly
similar numbers of COCO images (about 30k / 35k / 45k). "person" is in no
group: people are in about half of COCO and cover most of those images, so a
person group would swallow the other tasks. Images whose only annotations are
people, or that have none, are left out; results.json counts them
(task_split.dataset.examples_in_no_task).

Model and optimisation are VSE++'s (configs/coco_vsepp.py) with the ResNet-152
backbone frozen (--config.model.freeze_backbone=False fine-tunes it). 20,000
steps per task is about 15 epochs of a task of ~33k images x 5 captions.

`get_config("tiny")` shrinks everything to a seconds-long smoke test; point it
at a fixture with --config.data.manual_dir / --config.data.data_dir.
"""

import ml_collections

from configs import coco_vsepp

# COCO supercategory names (ccr_jax.data.coco.SUPERCATEGORIES), one group per task.
TASK_GROUPS = (
    ("vehicle", "outdoor", "accessory"),
    ("animal", "sports"),
    ("kitchen", "food", "furniture", "electronic", "appliance", "indoor"),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sequential COCO; `arg='tiny'` shrinks it to a smoke test."""
  config = coco_vsepp.get_config()
  # Folds (COCO-1K) are a single-task protocol: per-task test sets are not 5,000.
  config.eval.fold_size = 0
  config.data.num_tasks = len(TASK_GROUPS)
  config.data.task_categories = [list(group) for group in TASK_GROUPS]
  config.train.steps_per_task = 20_000
  if arg == "tiny":
    coco_vsepp.shrink(config)
  return config
