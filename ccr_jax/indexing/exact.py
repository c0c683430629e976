"""The exact backend: blocked matmul + top-k over the gallery embeddings.

Its state is the gallery embeddings as a device array (`device_gallery`),
placed once when the index is built or loaded: a search then runs only the
jitted matmul + top-k. Copying the gallery to the device on every search (as
`exact_search` does for a NumPy gallery, and this backend once did) made a
search of 1M x 256 take 1.55x the time of a bare jitted matmul + top-k on
CPU, where the copy is a 1 GB memcpy into fresh memory; without it, ~1.07x
(benchmarks/index_bench.py, 'fast exact'). On an accelerator the copy would
cross the host link and dominate. On CPU the state is a second copy of the
embeddings in host memory, unless XLA's CPU client shares the NumPy buffer
(jax 0.10 does for 64-byte aligned arrays). The backend writes no files of
its own: loading places embeddings.npy on the device again.

Its block helpers (`query_blocks`, `map_query_blocks`) also serve
`ccr_jax.evaluation`, which ranks whole galleries the same way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ccr_jax.indexing import base

# Query block: [block, count] float32 scores stay small (1024 x 100k = 400 MB)
# while one matmul still amortises the dispatch.
DEFAULT_BLOCK_SIZE = 1024


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_block(queries: jax.Array, gallery: jax.Array, k: int):
  # HIGHEST: accelerators otherwise multiply float32 in bfloat16, which would
  # reorder near-ties and make "exact" search inexact.
  scores = jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(scores, k)


def query_blocks(num_queries: int, block_size: int) -> tuple[int, int]:
  """Returns (block, num_blocks) for scoring `num_queries` in padded blocks.

  Fewer queries than `block_size` use the next power of two, so tiny query sets
  do not pay for a full block while the number of compiled shapes stays
  logarithmic.
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  block = min(block_size, 1 << max(0, num_queries - 1).bit_length())
  return block, -(-num_queries // block)


@functools.partial(jax.jit, static_argnames=("block", "num_blocks", "fill"))
def _device_blocks(array, block, num_blocks, fill):
  # Jitted, so that padding and slicing a device array copy nothing to or
  # from the host (`fill` and the bounds are constants of the program).
  pad = [(0, block * num_blocks - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
  return tuple(jnp.split(jnp.pad(array, pad, constant_values=fill), num_blocks))


def map_query_blocks(fn: Callable, per_query: Sequence[tuple[Any, Any]],
                     shared: Sequence[Any], block_size: int) -> list[np.ndarray]:
  """Runs `fn(*query_block_arrays, *shared)` over padded query blocks.

  Every block has the same shape (`query_blocks`), so one compiled program
  serves any query count; every block is dispatched before any is read back,
  so the device stays busy. Query arrays already on the device (JAX arrays,
  e.g. fresh embeddings) are padded and cut into blocks there; NumPy ones on
  the host, each block then copied over explicitly. Only the outputs come
  back to the host.

  Args:
    fn: a jitted function returning a tuple of arrays with a leading query axis.
    per_query: (array [num_queries, ...], pad value) pairs, NumPy or JAX, sliced
      per block.
    shared: arguments passed whole to every block (e.g. the gallery).
    block_size: queries per compiled block.

  Returns:
    Each output of `fn`, concatenated over blocks and cut to num_queries rows.
  """
  num_queries = len(per_query[0][0])
  block, num_blocks = query_blocks(num_queries, block_size)
  blocked = []
  for array, fill in per_query:
    if isinstance(array, jax.Array):
      blocked.append(_device_blocks(array, block, num_blocks, fill))
    else:
      full = np.full((block * num_blocks, *array.shape[1:]), fill, array.dtype)
      full[:num_queries] = array
      blocked.append(jax.device_put(np.split(full, num_blocks)))
  results = [fn(*(p[b] for p in blocked), *shared) for b in range(num_blocks)]
  host = jax.device_get(results)
  return [np.concatenate([r[i] for r in host])[:num_queries]
          for i in range(len(results[0]))]


def float32_rows(x):
  """`x` as float32, where it is: a JAX array stays on its device (no host
  round trip), anything else becomes a NumPy array."""
  if isinstance(x, jax.Array):
    return x.astype(jnp.float32)  # The same array when already float32.
  return np.asarray(x, np.float32)


def device_gallery(gallery) -> jax.Array:
  """The gallery as a float32 device array, for repeated `exact_search` calls.

  Args:
    gallery: float [num_gallery, dim], a NumPy or JAX array.

  Returns:
    float32 [num_gallery, dim] on the default device; `gallery` itself when it
    already is one (no copy).
  """
  # device_put, not jnp.asarray: on CPU it shares a 64-byte aligned buffer
  # instead of copying it, and copies others in half the time (measured); a
  # JAX array already on the default device is returned as it is.
  return jax.device_put(float32_rows(gallery))


def exact_search(queries, gallery, k: int, *,
                 block_size: int = DEFAULT_BLOCK_SIZE
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by dot product.

  Queries are scored in blocks of a fixed size (the last one zero-padded), so
  one compiled program (per gallery shape and k) serves every query count.

  Args:
    queries: float [num_queries, dim], NumPy or JAX (searched where it is).
    gallery: float [num_gallery, dim]. A NumPy gallery is copied to the device
      on every call; pass `device_gallery(gallery)` to search it repeatedly.
    k: neighbours wanted; clamped to num_gallery.
    block_size: queries per compiled block.

  Returns:
    scores: float32 [num_queries, min(k, num_gallery)], best first.
    indices: int64 [num_queries, min(k, num_gallery)], rows of `gallery`; equal
      scores keep the lower gallery index first (`lax.top_k`'s order, that of
      a stable argsort of -scores).
  """
  queries, gallery = float32_rows(queries), float32_rows(gallery)
  if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
    raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} must"
                     " be [num_queries, dim] and [num_gallery, dim]")
  num_queries = queries.shape[0]
  k = min(int(k), gallery.shape[0])
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if k == 0 or num_queries == 0:
    return (np.zeros((num_queries, k), np.float32),
            np.zeros((num_queries, k), np.int64))
  scores, indices = map_query_blocks(
      lambda q, g: _top_k_block(q, g, k), [(queries, 0.0)],
      [device_gallery(gallery)], block_size)
  return scores.astype(np.float32), indices.astype(np.int64)


def _parameters(count: int, options: Mapping[str, Any]) -> dict[str, Any]:
  del count  # Exact search has nothing to tune.
  if options:
    raise ValueError(f"the exact backend takes no options, got {sorted(options)}")
  return {}


def _build(embeddings: np.ndarray, params: Mapping[str, Any]) -> jax.Array:
  del params
  return device_gallery(embeddings)


def _search(index: base.Index, queries: np.ndarray, k: int, block_size: int
            ) -> tuple[np.ndarray, np.ndarray]:
  # An Index assembled by hand (state None) still searches, copying per call.
  gallery = index.embeddings if index.state is None else index.state
  return exact_search(queries, gallery, k, block_size=block_size)


def _save(index: base.Index, directory: str) -> None:
  del index, directory  # embeddings.npy, written for every backend, is all.


def _load(directory: str, metadata: base.IndexMetadata, embeddings: np.ndarray
          ) -> jax.Array:
  del directory, metadata
  return device_gallery(embeddings)


BACKEND = base.Backend(name="exact", parameters=_parameters, build=_build,
                       search=_search, save=_save, load=_load)
