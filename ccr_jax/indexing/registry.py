"""The index backends by name, and the `index` config section they feed.

Backends (`names()`), each a `base.Backend` in its own module:
  scann  (default) ScaNN: brute force below 10k items, else a tree + AH
         (`scann_backend`, whose docstring gives the parameter rule).
  exact  blocked matmul + top-k (`exact`).
Adding one is a module defining `BACKEND = base.Backend(...)` and a line in
`_REGISTRY` below. A backend that cannot index a gallery raises
`base.BuildError`; `searching.build_index` then builds `FALLBACK_BACKEND`.
"""

from __future__ import annotations

import types
from typing import Mapping

from ccr_jax import schema
from ccr_jax.indexing import exact
from ccr_jax.indexing import scann_backend
from ccr_jax.indexing.base import Backend

# name -> Backend, in the order errors list them. A read-only mapping built
# once from the backend modules' constants: no backend registers itself at
# import time, so importing one never changes another module's state.
_REGISTRY: Mapping[str, Backend] = types.MappingProxyType(
    {b.name: b for b in (scann_backend.BACKEND, exact.BACKEND)})
# The backend built when the requested one cannot index a gallery.
FALLBACK_BACKEND = "exact"


def names() -> tuple[str, ...]:
  """The registered backend names, default ('scann') first."""
  return tuple(_REGISTRY)


def get_backend(name: str) -> Backend:
  """The backend registered as `name`; ValueError listing the valid ones."""
  if name not in _REGISTRY:
    raise ValueError(f"backend must be one of {names()}, got {name!r}")
  return _REGISTRY[name]


def config_keys() -> dict[str, schema.Key]:
  """The `index` config section: name -> `schema.Key` (configs/default.py's defaults)."""
  return {
      "backend": schema.Key(
          "scann", "nearest-neighbour backend of every gallery index"
          " (scann: brute force below 10k items, else a tree; exact: matmul"
          " + top-k)", schema.one_of(names)),
      "reindex": schema.Key(
          True, "also index old galleries with the new snapshot"),
  }
