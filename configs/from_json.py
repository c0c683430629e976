r"""A config saved as JSON, e.g. a workdir's own config.json.

  python -m ccr_jax.main --config=/tmp/ccr_default/config.json --workdir=...

(`ccr_jax.main` turns a `--config=<file>.json` into
`--config=configs/from_json.py:<file>.json`.) Overrides apply on top as
usual; keys the JSON lacks (a workdir of older code) take today's defaults
when the run validates the config.
"""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict of the JSON file at `path`."""
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))
