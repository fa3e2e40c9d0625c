"""The device mesh of a run and how batches are laid out on it.

Axes: ``data`` (the batch is split over it) and ``seq`` (each sequence is split into contiguous segments over it;
the model's mixers then run sequence-parallel, see `shard_sequence`). Parameters are replicated.
``config.mesh.data * config.mesh.seq`` devices are used, across every process of a multi-host run.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SEQUENCE_AXIS = "seq"


def make_mesh(mesh: ml_collections.ConfigDict) -> Mesh | None:
    """A (data, seq) mesh over the first data·seq devices, or None for a plain single-device run (1 x 1)."""
    size = mesh.data * mesh.seq
    if size == 1:
        return None
    if size > jax.device_count():
        raise ValueError(
            f"mesh.data * mesh.seq = {size} devices, but only {jax.device_count()} are available "
            f"({jax.process_count()} process(es))"
        )
    devices = np.asarray(jax.devices()[:size]).reshape(mesh.data, mesh.seq)
    return Mesh(devices, (DATA_AXIS, SEQUENCE_AXIS))


def batch_spec(x: np.ndarray) -> P:
    """[B] per-example arrays split over data; [B, T, ...] arrays over data and seq (time is axis 1)."""
    return P(DATA_AXIS) if x.ndim == 1 else P(DATA_AXIS, SEQUENCE_AXIS)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch (the whole global batch, identical in every process) on the mesh; each process supplies
    the pieces its own devices hold."""
    out = {}
    for key, x in batch.items():
        sharding = NamedSharding(mesh, batch_spec(x))
        out[key] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    return out


def replicate(tree, mesh: Mesh):
    """Every array of `tree` replicated on every device of the mesh (the same value in every process)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(tree):
    """Replicated device arrays as numpy (reads this process's first shard, so it works in multi-process runs)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def shard_sequence(module: nnx.Module, axis_name: str | None) -> None:
    """Run the training path of `module` (a mixer or a whole model) on a sequence split over the mesh axis
    `axis_name` — inside shard_map, each device holding a contiguous segment — or on whole sequences again with
    None. Every submodule with a ``sequence_axis`` attribute (mixers, short convolutions, the model backbone) takes
    it; ops then exchange chunk summaries (LASP-2), keys/values or halos along the axis. Decoding is unaffected."""
    for _, child in nnx.iter_modules(module):
        if hasattr(child, "sequence_axis"):
            child.sequence_axis = axis_name
