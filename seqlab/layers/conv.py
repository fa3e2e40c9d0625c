"""The depthwise causal short convolution over time (DeltaNet, Mamba2, BaseConv, InLine, SLAB, LiT), and one
convolution shared by the heads (each head run as a sequence of its own)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice, check_positive_int
from seqlab.core.documents import Documents
from seqlab.core.halo import previous_segment_tail


class ShortConv(nnx.Module):
    """Depthwise causal 1-D convolution over time (kernel 4 by default), optionally followed by SiLU.

    y_t[c] = sum_{i<K} w[i, c] * x_{t-K+1+i}[c] (+ b[c]), with zeros before the first token.
    The decode cache holds the last K-1 inputs, [B, K-1, C]. Init as PyTorch's Conv1d: U(+-1/sqrt(K)).
    On a sequence split over devices (`shard_sequence`), a shard's first K-1 inputs come from the previous shard.
    With packed documents a tap reads only inputs of the output's own document: the
    convolution restarts, with zeros before, at every document start.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 4,
        use_bias: bool = False,
        activation: str | None = "silu",
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
    ):
        check_positive_int("channels", channels)
        check_positive_int("conv_size", kernel_size)
        check_choice("activation", activation, {None, "silu"})
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        self.sequence_axis: str | None = None
        bound = 1.0 / math.sqrt(kernel_size)
        init = jax.nn.initializers.uniform(2 * bound)
        self.weight = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype) - bound)
        self.bias = nnx.Param(init(rngs.params(), (channels,), param_dtype) - bound) if use_bias else None

    def init_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), self.dtype or jnp.float32)

    def __call__(
        self, x: jax.Array, state: jax.Array | None = None, documents: Documents | None = None
    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """x [B, T, C], state [B, K-1, C] or None (start of sequence), documents: the packed documents of the rows
        (training path) or None -> (y [B, T, C], new state [B, K-1, C])."""
        B, T, C = x.shape
        K = self.kernel_size
        if state is None and self.sequence_axis is not None and K > 1:
            state = previous_segment_tail(x, K - 1, self.sequence_axis)
        elif state is None:
            state = jnp.zeros((B, K - 1, C), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, T+K-1, C]
        w = self.weight[...].astype(x.dtype)
        if documents is None:
            y = sum(xp[:, i : i + T] * w[i] for i in range(K))
        else:
            segment_ids = documents.segment_ids
            ids = self._padded_ids(segment_ids)  # [B, T+K-1]
            y = sum(jnp.where((ids[:, i : i + T] == segment_ids)[..., None], xp[:, i : i + T], 0) * w[i]
                    for i in range(K))  # fmt: skip
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.activation == "silu":
            y = jax.nn.silu(y)
        return y, xp[:, T:].astype(state.dtype)

    def _padded_ids(self, segment_ids: jax.Array) -> jax.Array:
        """segment_ids [B, T] after the ids of the K-1 inputs before them: the previous device's (sequence
        parallel), else -1 (no document: zeros before the row)."""
        K = self.kernel_size
        if self.sequence_axis is not None and K > 1:
            before = previous_segment_tail(segment_ids, K - 1, self.sequence_axis)
            first = jax.lax.axis_index(self.sequence_axis) == 0
            before = jnp.where(first, -1, before)
        else:
            before = jnp.full((segment_ids.shape[0], K - 1), -1, segment_ids.dtype)
        return jnp.concatenate([before.astype(segment_ids.dtype), segment_ids], axis=1)


def fold_heads(v: jax.Array) -> jax.Array:
    """[B, T, H, d] -> [B·H, T, d] (row b·H + h: head h of sequence b), each head a sequence of its own."""
    b, t, h, d = v.shape
    return jnp.swapaxes(v, 1, 2).reshape(b * h, t, d)


def unfold_heads(y: jax.Array, num_heads: int) -> jax.Array:
    """[B·H, T, d] -> [B, T, H, d] (the inverse of `fold_heads`)."""
    return jnp.swapaxes(y.reshape(-1, num_heads, *y.shape[1:]), 1, 2)


def head_shared_conv(conv: ShortConv, v: jax.Array, state: jax.Array | None,
                     documents: Documents | None) -> tuple[jax.Array, jax.Array]:
    """One d-channel conv shared by the heads: v [B, T, H, d], state [B·H, K − 1, d] or None -> (y [B, T, H, d],
    new state [B·H, K − 1, d]); the heads run as extra sequences (restarting at the documents of their row)."""
    heads = v.shape[2]
    if documents is not None:
        documents = Documents(*(jnp.repeat(a, heads, axis=0) for a in documents))
    y, state = conv(fold_heads(v), state, documents)
    return unfold_heads(y, heads), state
