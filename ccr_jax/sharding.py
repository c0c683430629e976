"""Multi-process start-up, the device mesh, shardings and per-process batches.

JAX's multi-controller runtime is the distributed engine: every process runs
the same program, `initialize_distributed` joins them, and one global `Mesh`
spans every device of every process. `jax.jit` over that mesh inserts the
collectives, so the train step is the same code on 1 device or a pod.

The mesh has two axes:
  data   batches are split along it (data parallelism);
  model  each parameter (and its optimizer state) is split along it
         (FSDP-style: `param_sharding`), and batches are split along it too,
         so no device repeats another's work; size 1 (the default) keeps
         every parameter replicated.
Batches are split over both axes, in (data, model) order. Devices are ordered
process by process, so each process holds one contiguous block of rows of a
global batch (`process_rows`): it reads only those rows, and
`shard_batch` assembles the global array from every process's block.
"""

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Parameters with fewer elements stay replicated on a model axis: splitting
# biases and norms saves no memory worth the extra all-gathers.
FSDP_MIN_SIZE = 1024
DISTRIBUTED_MODES = ("auto", "on", "off")


def cluster_launched(environ: Mapping[str, str] | None = None) -> bool:
  """Whether a cluster launcher started this process as one of several.

  SLURM (srun / sbatch with several tasks), Open MPI (mpirun -n N > 1) and TPU
  pods on GKE (several TPU_WORKER_HOSTNAMES) say so in the environment; a
  TPU VM pod reached through `gcloud ... ssh --worker=all` does not (pass
  --distributed=on there, as launch/tpu_pod.py does).
  """
  env = os.environ if environ is None else environ
  slurm_tasks = env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))
  return ("SLURM_JOB_ID" in env and int(slurm_tasks) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins this process to a multi-process run; call before any other JAX call.

  Args:
    mode: "off" never initialises (one process); "on" always calls
      `jax.distributed.initialize`, which detects TPU pods, SLURM and Open MPI
      and fills in whatever of the three values below is not given; "auto"
      initialises when any value is given or `cluster_launched()` is true.
    coordinator_address: host:port of process 0's coordinator service.
    num_processes: how many processes the run has.
    process_id: this process's index in [0, num_processes).
  Returns:
    Whether the distributed runtime is initialised (by this call or before).
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode!r}; valid: {DISTRIBUTED_MODES}.")
  if jax.distributed.is_initialized():
    return True
  explicit = any(v is not None for v in (coordinator_address, num_processes,
                                         process_id))
  if mode == "off" or (mode == "auto" and not explicit and not cluster_launched()):
    return False
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info("process %d of %d: %d local devices of %d; CPU collectives: %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.config.jax_cpu_collectives_implementation)
  return True


def make_mesh(devices: list | None = None, model_axis_size: int = 1) -> Mesh:
  """A (data, model) mesh over `devices` (default: every device of every process).

  Devices are grouped by process (a stable sort: each process's own order is
  kept), so a model group never straddles two processes unless it must.
  """
  devices = jax.devices() if devices is None else devices
  if model_axis_size < 1 or len(devices) % model_axis_size:
    raise ValueError(
        f"--config.mesh.model_axis_size={model_axis_size} must divide the "
        f"{len(devices)} devices.")
  devices = sorted(devices, key=lambda d: d.process_index)
  return Mesh(np.asarray(devices).reshape(-1, model_axis_size),
              (DATA_AXIS, MODEL_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy of an array on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding that splits an array's leading (batch) axis over every device."""
  return NamedSharding(mesh, P((DATA_AXIS, MODEL_AXIS)))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces a batch is split into (the mesh's device count)."""
  return mesh.shape[DATA_AXIS] * mesh.shape[MODEL_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh,
                     name: str = "train.batch_size") -> None:
  """Raises ValueError unless `batch_size` splits evenly over the mesh's devices."""
  n = batch_shards(mesh)
  if batch_size % n:
    raise ValueError(
        f"batch size {batch_size} does not divide over {n} devices; set "
        f"--config.{name} to a multiple of {n}.")


def param_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Where a parameter (or optimizer-state leaf) of `shape` lives.

  Replicated when the model axis has size 1 or the leaf is small; otherwise
  its largest dimension that divides evenly is split over the model axis
  (the first such on ties). Shape alone decides, so Adam's moments and the
  a strategy's parameter-shaped state lands exactly where its parameter does.
  """
  m = mesh.shape[MODEL_AXIS]
  if m == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return replicated(mesh)
  dims = [i for i in range(len(shape)) if shape[i] % m == 0]
  if not dims:
    return replicated(mesh)
  split = max(dims, key=lambda i: shape[i])
  return NamedSharding(mesh, P(*(MODEL_AXIS if i == split else None
                                 for i in range(len(shape)))))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """`param_sharding` of every leaf (arrays or ShapeDtypeStructs) of `tree`."""
  return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh), tree)


def constrain(tree: Any, mesh: Mesh) -> Any:
  """Inside jit: pins every leaf of `tree` to its `param_sharding`."""
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


def place(tree: Any, mesh: Mesh) -> Any:
  """Puts every leaf of `tree` (the same values on every process) where
  `param_sharding` says."""
  return jax.device_put(tree, tree_shardings(tree, mesh))


def per_batch_shard(fn: Any, mesh: Mesh) -> Any:
  """`fn(params, *batched)` run by every device on its own rows of `batched`.

  For per-example functions (the towers): each device embeds its shard and
  the [batch, ...] outputs stay split over the devices. Without it XLA may
  gather the whole batch first: the packed GRU sorts its batch by length, a
  gather that then runs every caption's recurrence on every device. Split
  params are gathered on entry (FSDP); their gradients are summed back.
  Returns `fn` itself on a one-device mesh (the same program as before).
  """
  if batch_shards(mesh) == 1:
    return fn
  rows = P((DATA_AXIS, MODEL_AXIS))

  def mapped(params, *batched):
    # check_vma=False: the packed GRU's hand-written backward loops start from
    # replicated zeros and carry per-device values, which the varying-axes
    # type check rejects; nothing inside communicates, so it has nothing to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(),) + (rows,) * len(batched),
                         out_specs=rows, check_vma=False)(params, *batched)

  return mapped


def process_rows(batch_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch of `batch_size` that this process supplies.

  The union of the rows of this process's devices under `batch_sharded`: all
  of them on one process, one contiguous block per process otherwise.
  """
  index_map = batch_sharded(mesh).addressable_devices_indices_map((batch_size,))
  blocks = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  lo, hi = blocks[0][0], blocks[-1][1]
  if sum(b - a for a, b in blocks) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {blocks} of the "
                     "batch, not one block; order the mesh's devices by process.")
  return slice(lo, hi)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch from this process's rows of it (`process_rows`).

  With one process `batch` is the whole batch, placed split over the mesh.
  """
  return jax.make_array_from_process_local_data(batch_sharded(mesh), batch)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) array as a NumPy array, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
  """Waits until every process reaches this point (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def is_lead_process() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` replicated on the mesh."""
  return jax.device_put(tree, replicated(mesh))
