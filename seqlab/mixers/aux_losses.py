"""Auxiliary training losses a mixer adds to the task's loss (commitment terms of learnt codebooks and centroids,
load-balancing terms): a mixer's training path calls ``add(name, value)`` with a scalar already weighted by its
coefficient, and whoever trains the model collects them around the forward pass:

    with aux_losses.collect() as losses:      # {name: float32 scalar}, summed over the layers that add one
        logits = model(inputs)
    loss = task_loss + aux_losses.total(losses)

Outside ``collect`` (evaluation, decoding, a mixer called on its own) ``add`` does nothing. The values are traced
arrays of the trace that runs the forward, so open the block inside the same ``jit`` (or ``shard_map``) as the
model call and read it there. Under sequence parallelism each device adds the loss of its own tokens; the launcher
averages the devices' values (its shards are equal in size, so that is the mean over the whole batch).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp

_COLLECTOR: contextvars.ContextVar[dict[str, jax.Array] | None] = contextvars.ContextVar("seqlab_aux_losses",
                                                                                         default=None)


@contextlib.contextmanager
def collect() -> Iterator[dict[str, jax.Array]]:
    """Collects the auxiliary losses added in the block into the dict it yields (nested blocks: the innermost)."""
    losses: dict[str, jax.Array] = {}
    token = _COLLECTOR.set(losses)
    try:
        yield losses
    finally:
        _COLLECTOR.reset(token)


def add(name: str, value: jax.Array) -> None:
    """Adds the scalar ``value`` to the loss ``name`` of the innermost ``collect`` block, if one is open."""
    losses = _COLLECTOR.get()
    if losses is None:
        return
    if jnp.ndim(value) != 0:
        raise ValueError(f"aux loss {name!r}: the value must be a scalar, got shape {jnp.shape(value)}")
    value = jnp.asarray(value, jnp.float32)
    losses[name] = losses[name] + value if name in losses else value


def total(losses: dict[str, jax.Array]) -> jax.Array:
    """The sum of the collected losses (0.0 for none)."""
    return sum(losses.values(), jnp.zeros((), jnp.float32))
