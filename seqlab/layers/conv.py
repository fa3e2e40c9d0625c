"""The depthwise causal short convolution over time (DeltaNet, Mamba2, BaseConv, InLine, SLAB)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice, check_positive_int
from seqlab.core.halo import previous_segment_tail


class ShortConv(nnx.Module):
    """Depthwise causal 1-D convolution over time (kernel 4 by default), optionally followed by SiLU.

    y_t[c] = sum_{i<K} w[i, c] * x_{t-K+1+i}[c] (+ b[c]), with zeros before the first token.
    The decode cache holds the last K-1 inputs, [B, K-1, C]. Init as PyTorch's Conv1d: U(+-1/sqrt(K)).
    On a sequence split over devices (`shard_sequence`), a shard's first K-1 inputs come from the previous shard.
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

    def __call__(self, x: jax.Array, state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, C], state [B, K-1, C] or None (start of sequence) -> (y [B, T, C], new state [B, K-1, C])."""
        B, T, C = x.shape
        K = self.kernel_size
        if state is None and self.sequence_axis is not None and K > 1:
            state = previous_segment_tail(x, K - 1, self.sequence_axis)
        elif state is None:
            state = jnp.zeros((B, K - 1, C), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, T+K-1, C]
        w = self.weight[...].astype(x.dtype)
        y = sum(xp[:, i : i + T] * w[i] for i in range(K))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.activation == "silu":
            y = jax.nn.silu(y)
        return y, xp[:, T:].astype(state.dtype)
