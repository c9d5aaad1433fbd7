"""Running across devices: a 1-D `data` mesh, batch sharding and parameter replication.

Everything in `sam_jax.inference` is a `jax.jit` function whose sharding follows its inputs
(no pmap): put the batch on the mesh with `shard_batch`, the variables with `replicate`, and
the same jitted call runs data-parallel over every device of the mesh.
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with one `data` axis over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
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
