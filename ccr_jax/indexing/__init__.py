"""Nearest-neighbour indices over gallery embeddings, behind pluggable backends.

A gallery (the images or the captions of one task, embedded with one model
snapshot) becomes an `Index`, searched by dot product (cosine: embeddings
are L2-normalised), best first. The package's modules, each importing only
those above it:

  base           the `Index`, `IndexMetadata` and `Backend` types, the
                 errors, the on-disk format version and file names.
  exact          the exact backend (blocked matmul + top-k) and its block
                 helpers, which `ccr_jax.evaluation` shares.
  scann_backend  the ScaNN backend (the default) and its parameter rule.
  registry       the backends by name (`names`, `get_backend`), the fallback
                 backend and the `index` config section (`config_keys`).
  searching      `build_index`, `search`, `search_many` (the union of
                 several indices), `recall_against_exact`.
  storage        `save_index` (atomic) and `load_index` (checked against
                 the manifest and the caller's expectations); the on-disk
                 layout.

This module only re-exports their public names.
"""

from ccr_jax.indexing.base import (Backend, BuildError, FORMAT_VERSION, Index,
                                   IndexMetadata, IndexMismatchError,
                                   MODALITIES)
from ccr_jax.indexing.exact import (DEFAULT_BLOCK_SIZE, exact_search,
                                    map_query_blocks)
from ccr_jax.indexing.registry import (FALLBACK_BACKEND, config_keys,
                                       get_backend, names)
from ccr_jax.indexing.scann_backend import BRUTE_FORCE_MAX_COUNT, scann_parameters
from ccr_jax.indexing.searching import (build_index, recall_against_exact,
                                        search, search_many)
from ccr_jax.indexing.storage import load_index, save_index

__all__ = [
    "BRUTE_FORCE_MAX_COUNT", "Backend", "BuildError", "DEFAULT_BLOCK_SIZE",
    "FALLBACK_BACKEND", "FORMAT_VERSION", "Index", "IndexMetadata",
    "IndexMismatchError", "MODALITIES", "build_index", "config_keys",
    "exact_search", "get_backend", "load_index", "map_query_blocks", "names",
    "recall_against_exact", "save_index", "scann_parameters", "search",
    "search_many",
]
