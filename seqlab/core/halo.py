"""The halo exchange of sequence parallelism: a layer that needs the last few tokens before its segment (a short
convolution, a sliding window's keys, LoLCATs' band) gets them from the previous device along the mesh axis; and
the slabs of keys that blocks of queries read from such a front-padded sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def previous_segment_tail(x: jax.Array, size: int, sequence_axis: str) -> jax.Array:
    """The last `size` tokens of the previous device's segment of x [B, T_local, ...] (zeros on the first device):
    one ppermute along `sequence_axis`. Needs T_local >= size."""
    if x.shape[1] < size:
        raise ValueError(f"x: a sequence shard of {x.shape[1]} tokens is shorter than the {size} tokens of context "
                         f"this layer needs from the previous shard; use fewer devices on {sequence_axis!r}")
    num = jax.lax.axis_size(sequence_axis)
    return jax.lax.ppermute(x[:, x.shape[1] - size :], sequence_axis, [(i, i + 1) for i in range(num - 1)])


def key_slabs(x: jax.Array, num_blocks: int, block: int, back: int) -> jax.Array:
    """[B, (back + N)·W, ...] -> [B, N, (back + 1)·W, ...] (W = ``block``): for query block n, the key blocks
    n .. n + back of x, which holds the ``back`` blocks of tokens before the queries first (a halo, or zeros)."""
    blocks = x.reshape(x.shape[0], num_blocks + back, block, *x.shape[2:])
    return jnp.concatenate([blocks[:, o : o + num_blocks] for o in range(back + 1)], axis=2)
