"""Joining a multi-process (multi-host) run with JAX's own distributed runtime.

`maybe_initialize()` calls ``jax.distributed.initialize`` when the environment describes a cluster, before any
other JAX call:
- explicitly: JAX_COORDINATOR_ADDRESS ("host:port"), JAX_NUM_PROCESSES and JAX_PROCESS_ID (and optionally
  JAX_LOCAL_DEVICE_IDS, comma-separated), e.g. set by a launch script on each host;
- or a scheduler JAX detects itself: Slurm (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1), Cloud TPU
  pods (several TPU_WORKER_HOSTNAMES).
A single process with none of these runs on its local devices.
"""

from __future__ import annotations

import os

import jax


def cluster_environment(env: dict[str, str] | None = None) -> str | None:
    """The kind of cluster the environment describes ("explicit", "slurm", "mpi", "tpu") or None."""
    env = os.environ if env is None else env
    if "JAX_COORDINATOR_ADDRESS" in env:
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    return None


def maybe_initialize() -> bool:
    """Join the cluster the environment describes; returns whether a distributed runtime was started."""
    kind = cluster_environment()
    if kind is None:
        return False
    if kind == "explicit":
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(_required("JAX_NUM_PROCESSES")),
            process_id=int(_required("JAX_PROCESS_ID")),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
    else:
        jax.distributed.initialize()
    return True


def _required(name: str) -> str:
    if name not in os.environ:
        raise ValueError(f"{name}: must be set with JAX_COORDINATOR_ADDRESS for a multi-process run")
    return os.environ[name]
