"""Device mesh and shardings: data-parallel over every device, parameters replicated.

One `Mesh` with a `data` axis spans all devices (all hosts, once multi-host
initialisation lands). Batches are split along their leading axis; parameters
and optimizer state are replicated. `jax.jit` with these shardings lets XLA
insert the collectives, so the train step is the same code on 1 or N devices.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: every device)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading (batch) axis over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless `batch_size` splits evenly over the data axis."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(
        f"batch size {batch_size} does not divide over {n} devices; set "
        f"--config.train.batch_size to a multiple of {n}.")


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch (leading axis = global batch) split over `data`."""
  sharding = batch_sharded(mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))
