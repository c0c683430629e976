"""The whole config schema, assembled from every registry's section, and its validation.

Each key is declared once (`schema.Key`: default, doc, check): the sections of
the run itself here, `pretrain` by its stage (run/pretrain.py), `data` by
the dataset registry, `loss` by the losses, `index` by the index backends,
`strategy` by the strategies and `analysis` by the forgetting analysis. `configs/default.py` takes its values from
`default_config()`; `validate_config` derives every check from the same
declarations.
"""

import json

import ml_collections

from ccr_jax import analysis
from ccr_jax import indexing
from ccr_jax import losses
from ccr_jax import schema
from ccr_jax import strategies
from ccr_jax.data import registry as data_registry
from ccr_jax.models import dual_encoder
from ccr_jax.models import text_towers
from ccr_jax.run import pretrain

# Keys holding user mappings (task name -> categories, split -> file prefix),
# checked by the dataset that reads them.
FREE_FORM = ("data.categories", "data.split_prefixes")


def _ks(v) -> str | None:
  ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v)
  return None if ok else "a non-empty list of positive integers, e.g. '(1, 5, 10)'"


def run_keys() -> dict:
  """The sections of the run itself: seed, model, optim, train, mesh, eval."""
  Key = schema.Key  # pylint: disable=invalid-name
  positive = schema.at_least(1, integer=True)
  return {
      "seed": Key(0, "seeds the initial params, batch order and every sampled subset"),
      "model": dual_encoder.config_keys(),
      "optim": {
          "learning_rate": Key(5e-4, "Adam's learning rate", schema.at_least(0)),
          "grad_clip": Key(2.0, "global-norm gradient clip", schema.greater_than(0)),
          "decay_at": Key(0.5, "fraction of each task's steps before decaying",
                          schema.fraction),
          "decay_factor": Key(0.1, "learning-rate factor after decay_at",
                              schema.at_least(0)),
      },
      "train": {
          "batch_size": Key(128, "global training batch (pairs)", positive),
          "steps_per_task": Key(400, "optimizer steps per task", positive),
          "checkpoint_every": Key(200, "steps between resumable state checkpoints "
                                  "(0: none)", schema.at_least(0, integer=True)),
          "log_every": Key(50, "steps between logged metric windows", positive),
          # Mixed precision: params, gradients and Adam's state stay float32.
          "compute_dtype": Key(
              "float32", "'float32' or 'bfloat16': dtype of the towers' matmuls and "
              "convs (forward and backward; training and evaluation's embedding) "
              "and of the loss's score matmuls; params, norms, softmax, loss sums, "
              "the GRU state and the embeddings stay float32",
              schema.one_of(dual_encoder.COMPUTE_DTYPES)),
      },
      # Devices (ccr_jax/sharding.py): one mesh over every device of every
      # process. Not part of the experiment: a workdir resumes on any mesh.
      "mesh": {
          "model_axis_size": Key(1, "devices each large parameter (and its optimizer "
                                 "state) is split over, FSDP-style; 1 = replicated",
                                 positive),
      },
      "eval": {
          "ks": Key((1, 5, 10), "Recall@K cut-offs", _ks),
          "batch_size": Key(256, "embedding batch", positive),
          "save_embeddings": Key(False, "write every evaluation's query and gallery "
                                 "embeddings to <workdir>/embeddings"),
          "split": Key("test", "'val' to tune hyperparameters without the test set",
                       schema.one_of(("val", "test"))),
          "fold_size": Key(0, "> 0: also task-aware metrics averaged over folds of "
                           "this many images (1000: COCO-1K)",
                           schema.at_least(0, integer=True)),
      },
  }


def config_schema() -> dict:
  """Every section of a config, each key declared once."""
  keys = run_keys()
  return {"seed": keys["seed"], "data": data_registry.config_keys(),
          "model": keys["model"], "loss": losses.config_keys(),
          "optim": keys["optim"], "train": keys["train"],
          "pretrain": pretrain.config_keys(), "mesh": keys["mesh"],
          "strategy": strategies.config_keys(), "index": indexing.config_keys(),
          "eval": keys["eval"], "analysis": analysis.config_keys()}


def default_config() -> ml_collections.ConfigDict:
  """A config holding every declared key at its default (the default experiment)."""
  return schema.defaults(config_schema())


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the keys it lacks at their defaults, filled once where a
  config is loaded (a run's start, a workdir's config.json in evaluate mode),
  so that no reader needs a fallback of its own."""
  return schema.complete(config_schema(), json.loads(config.to_json()))


def valid_config_keys() -> list[str]:
  """Every dotted key a config may hold."""
  return schema.key_paths(config_schema())


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks a config before any work: unknown keys, types, ranges and names.

  Raises:
    ValueError: listing every problem, each with the key and the fix (the
      nearest valid key for a typo, the valid values for a bad one).
  """
  problems = schema.problems(config_schema(), json.loads(config.to_json()),
                             free_form=FREE_FORM)
  if not problems:
    problems += pretrain.config_problems(complete(config))
  if not problems:
    try:  # What single keys cannot say: strategies that cannot be combined.
      strategies.get_strategy(config.strategy, losses.make_loss(config.loss))
    except ValueError as e:
      problems.append(str(e))
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def describe_config(config: ml_collections.ConfigDict) -> str:
  """The resolved config, one `key = value  # meaning (default ...)` line per key."""
  return "\n".join(schema.describe(config_schema(), json.loads(config.to_json())))


def config_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """Valid settings that do something a user may not expect, one line each."""
  out = []
  if config.train.checkpoint_every == 0:
    out.append("train.checkpoint_every=0: no state checkpoints within a task, so "
               "a killed run restarts the interrupted task from its first step.")
  elif config.train.checkpoint_every >= config.train.steps_per_task:
    out.append(f"train.checkpoint_every={config.train.checkpoint_every} >= "
               f"steps_per_task={config.train.steps_per_task}: no state "
               "checkpoints within a task (a killed run restarts the task).")
  if config.train.log_every > config.train.steps_per_task:
    out.append(f"train.log_every={config.train.log_every} > steps_per_task: one "
               "log line per task, at its last step.")
  out += strategies.combination_warnings(
      strategies.get_strategy(config.strategy, losses.make_loss(config.loss)))
  return out


DEFAULTS_HEADER = """Every config key at its default, with what it means: the values that
configs/default.py and every other config start from.

Generated from the declarations (each key is declared once, in the module of
what reads it; ccr_jax/run/config.py assembles them) by

  python -m ccr_jax.run.config > configs/defaults.py

and checked against them by tests/test_config.py. It imports no JAX, so a
config loads (and shows its values) in a fraction of a second.
"""


if __name__ == "__main__":
  print(schema.render_python(config_schema(), DEFAULTS_HEADER), end="")
