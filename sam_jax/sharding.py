"""Running across devices: a 1-D `data` mesh, batch sharding and parameter replication.

Everything in `sam_jax.inference` is a `jax.jit` function whose sharding follows its inputs
(no pmap): put the batch on the mesh with `shard_batch`, the variables with `replicate`, and
the same jitted call runs data-parallel over every device of the mesh.

Several processes (hosts) join one run with `initialize_distributed` before anything else
touches JAX; `jax.devices()` then lists every host's devices, and `data_mesh` spans them all.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Joins this process to a multi-process run (`jax.distributed.initialize`); must come
    before any other JAX call. Empty / 0 / -1 leave a setting to JAX, which reads
    JAX_COORDINATOR_ADDRESS or detects the cluster (TPU pods, Slurm, Open MPI); elsewhere, e.g.
    several processes on one machine, give all three. A second call is a no-op, so that a
    caller which already initialized (a launcher script) can still run the training loop.

    CPU processes need a cross-process collectives backend, or their all-reduces fail at
    compile time: gloo is selected unless one is already (the default changed across JAX
    versions). The setting only concerns the CPU client, so it is harmless on TPU and GPU."""
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes if num_processes > 0 else None,
                               process_id=process_id if process_id >= 0 else None)


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Waits until every process of a multi-process run reaches the barrier `name` (a no-op
    with one process). `name` must be new for each use.

    It goes through JAX's coordination service, not a device collective, on purpose: the CPU
    collectives (gloo) give up when the processes join a new collective more than ~30 s apart
    ("Gloo context initialization failed ... GetKeyValue() timed out"), a gap easily reached
    when one process compiles the train step while another loads it from the compilation
    cache (seen), or when one prepares a dataset while the others wait."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client has no public accessor (Orbax reads it too)

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with one `data` axis over `devices` (default: all devices).

    The devices are ordered by process (stably, so one process's order is kept): process p then
    holds one contiguous block of the batch, the rows its loader reads (`TrainLoader` gives
    process p rows [p*G/P, (p+1)*G/P)), and `jax.make_array_from_process_local_data` builds the
    same global batch, row for row, as one process with as many devices would."""
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: d.process_index)
    return Mesh(np.asarray(devices), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies every leaf of `tree` (e.g. the variables) to all devices of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Splits the leading axis of every leaf over the `data` axis. The batch must divide by
    the number of devices: pad it (the prompt batches of `make_prompt_batch` are powers of two)."""
    n = mesh.shape["data"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"cannot shard a leading axis of {x.shape[:1]} over {n} devices: "
                             f"pad the batch to a multiple of {n}")
        return jax.device_put(x, NamedSharding(mesh, P("data")))

    return jax.tree.map(put, tree)
