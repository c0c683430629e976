r"""Sequential Visual Genome: 3 tasks of object synsets, VSE++ on ResNet-152.

  python -m ccr_jax.main --config=configs/sevige.py --workdir=/tmp/ccr_sevige \
      --config.data.manual_dir=/data/visual_genome --config.data.data_dir=/data/tfds \
      --config.model.resnet_weights=/data/weights/resnet152.npz

The second continual setting of Wang, Herranz & van de Weijer (CVPR-W 2021),
whose exact splits are not public: the rules and groups are ours. The manual
dir is laid out as ccr_jax/data/visual_genome.py describes (image_data.json,
objects.json, region_descriptions.json, VG_100K/, VG_100K_2/).

How Visual Genome becomes a retrieval dataset (visual_genome.py):
- texts: the 5 largest region descriptions of each image with at least 3 words,
  distinct after tokenising (images with fewer are left out);
- splits: image_id % 20 == 0 -> test, == 1 -> val, otherwise train;
- categories: the synsets below; an object adds its box area to each category
  one of its objects.json synsets belongs to ("a|b" = either synset).

Tasks: an image goes to the group whose synsets cover the largest object area
in it, ties to the earlier task (tasks.DOMINANT_GROUP_RULE):
  1 animals: dog, cat, horse, elephant, giraffe, zebra, sheep, cow, bird, bear
  2 vehicles: car, bus, truck, train, airplane, boat, motorcycle, bicycle
  3 indoor: table, chair, bed, sofa, laptop, plate, pizza, toilet
Why these: countable "things" that VG annotates often and whose scenes differ
(outdoor nature / streets / rooms), the same domains as configs/secoco.py so
the two benchmarks can be compared. Stuff and parts (sky, wall, grass, shirt,
hand) and people are in no group: they are in almost every image and cover
large areas, so they would decide the task of nearly every image. Images
with none of these synsets are left out; results.json counts them and lists
images per category (a category with 0 images logs a warning: check the synset
name against objects.json).

Model and optimisation are VSE++'s (configs/coco_vsepp.py) with the backbone
frozen; 10,000 steps per task is about 15 epochs of ~15k images x 5 texts.
`get_config("tiny")` shrinks everything to a seconds-long smoke test; point it
at a fixture with --config.data.manual_dir / --config.data.data_dir.
"""

import ml_collections

from configs import coco_vsepp

# WordNet synsets as objects.json names them; "a|b" = one category, either synset.
TASK_GROUPS = (
    ("dog.n.01", "cat.n.01", "horse.n.01", "elephant.n.01", "giraffe.n.01",
     "zebra.n.01", "sheep.n.01", "cow.n.01|beef.n.01", "bird.n.01",
     "bear.n.01"),
    ("car.n.01", "bus.n.01", "truck.n.01", "train.n.01", "airplane.n.01",
     "boat.n.01", "motorcycle.n.01", "bicycle.n.01"),
    ("table.n.02|table.n.01|dining_table.n.01", "chair.n.01", "bed.n.01",
     "sofa.n.01", "laptop.n.01", "plate.n.04", "pizza.n.01",
     "toilet.n.02|toilet.n.01"),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Sequential Visual Genome; `arg='tiny'` shrinks it to a smoke test."""
  config = coco_vsepp.get_config()
  # Folds (COCO-1K) are a single-task protocol: per-task test sets are not 5,000.
  config.eval.fold_size = 0
  data = config.data
  data.name = "visual_genome"
  data.manual_dir = ""  # the raw VG files; read only when building
  data.categories = tuple(c for group in TASK_GROUPS for c in group)
  data.num_tasks = len(TASK_GROUPS)
  data.task_categories = [list(group) for group in TASK_GROUPS]
  del data.use_restval  # COCO only
  config.train.steps_per_task = 10_000
  if arg == "tiny":
    coco_vsepp.shrink(config)
  return config
