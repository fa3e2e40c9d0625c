"""ULSAM: ultra-lightweight subspace attention (non-causal), per subspace n = 1..g of C/g channels x_n [B, T, C/g]:

    a_n = ReLU(w_n ⊙ x_n + b_n)                  depthwise 1×1 conv (one scale and bias per channel)
    m_n = MaxPool_{3×3, stride 1, pad 1}(a_n)    over the token grid (padding never wins the max)
    s_n = ReLU(m_n · v_n + c_n)                  pointwise 1×1 conv to one channel [B, T]
    A_n = softmax_t(s_n)                         over all T tokens (spatial positions): one attention map per subspace
    y_n = A_n ⊙ x_n + x_n                        the map broadcast over the subspace's channels, plus the subspace
    y = [y_1, ..., y_g]                          the subspaces concatenated: [B, T, C]

x, y [B, T, C] (C = d_model, g = num_heads); on a ``grid`` (rows, cols) the tokens are a raster-order grid
[B, rows, cols, C] (T = rows·cols) and the max-pool is 3×3 (``pool_size``); with grid None it is a 3-token max-pool over
the sequence (this module's extension of the 2-D layer). The softmax runs in float32 with its maximum subtracted.

Paper: "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks" (Saini, Jha,
Das, Mittal and Mohan, WACV 2020). Read from Nandan91/ULSAM `ulsam.py` (`SubSpace`, `ULSAM`): the channels chunked
into num_splits equal groups, each a `SubSpace`: conv_dws (1×1, groups = channels, bias) → BatchNorm → ReLU →
MaxPool2d(3, stride 1, padding 1) → conv_point (1×1 to one channel, bias) → BatchNorm → ReLU → softmax over the
flattened H·W → the map times the subspace, plus the subspace (the residual is inside the module) → concatenation.
ULSAM has no input or output projection, so the mixer is the module alone (num_heads = its num_splits).
Initialisation: PyTorch's default for those convolutions, U(±1/√fan_in) for weights and biases (fan_in 1 for the
depthwise, C/g for the pointwise convolution).
Deviations: the two BatchNorms are left out. At inference each is a per-channel affine map right after a 1×1
convolution with bias, which it folds into, so the layer computes the same family of functions; what is not
reproduced is the training-time normalisation by batch statistics (and the running statistics it would carry,
which would confine training to one device). Without it nothing keeps s from being clipped at every token (a
uniform map, no gradient into the attention path), and c_n gets a gradient only where some scores are clipped (the
softmax ignores a shift). The inner residual is kept, so in seqlab's block (x + mixer(norm(x)))
the layer adds (1 + A) ⊙ norm(x).

Causality: none (no decode cache, no packed rows). On a sequence split over devices (`sequence_axis`) the layer
all-gathers x (the pool crosses device borders and the softmax is over every token).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int
from seqlab.layers.grid_conv import check_grid, spatial_shape
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float, dtype: Any) -> nnx.Param:
    return nnx.Param(jax.random.uniform(rngs.params(), shape, dtype, -bound, bound))


@register(
    "ulsam",
    kind="conv",
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    examples={"default": dict(num_heads=4), "pool5": dict(num_heads=2, pool_size=5)},
)  # 2-d (whole grids only): tests/mixers/test_ulsam.py
class ULSAM(Mixer):
    """Subspace attention (non-causal), x [B, T, D] -> [B, T, D]; num_heads: the number of subspaces g (dividing
    d_model); grid: (rows, cols) of 2-D tokens (None: a 1-D sequence); pool_size: the max-pool's odd window."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        grid: tuple[int, int] | None = None,
        pool_size: int = 3,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.grid = check_grid(grid)
        if d_model % num_heads:
            raise ValueError(f"num_heads ({num_heads}, ULSAM's subspaces) must divide d_model ({d_model})")
        check_positive_int("pool_size", pool_size)
        if pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd (a centred max-pool), got {pool_size}")
        self.pool_size, width = pool_size, d_model // num_heads
        self.dw_kernel = _uniform(rngs, (d_model,), 1.0, param_dtype)
        self.dw_bias = _uniform(rngs, (d_model,), 1.0, param_dtype)
        self.pw_kernel = _uniform(rngs, (num_heads, width), width**-0.5, param_dtype)
        self.pw_bias = _uniform(rngs, (num_heads,), width**-0.5, param_dtype)

    def _forward(self, x: jax.Array, cache: Any):
        return self._on_whole_sequence(self.subspace_attention, x), cache

    def subspace_attention(self, x: jax.Array) -> jax.Array:
        """y [B, T, D] from the whole sequence x [B, T, D]."""
        batch, length, d = x.shape
        dtype = x.dtype if self.dtype is None else self.dtype
        x = x.astype(dtype)
        a = jax.nn.relu(x * self.dw_kernel[...].astype(dtype) + self.dw_bias[...].astype(dtype))
        spatial = spatial_shape(length, self.grid)
        half, window = self.pool_size // 2, (1, *(self.pool_size,) * len(spatial), 1)
        pooled = jax.lax.reduce_window(a.reshape(batch, *spatial, d), -jnp.inf, jax.lax.max,
                                       window, (1,) * len(window), [(0, 0), *[(half, half)] * len(spatial), (0, 0)])
        groups = pooled.reshape(batch, length, self.num_heads, -1)
        scores = jnp.einsum("btgc,gc->btg", groups, self.pw_kernel[...].astype(dtype)) + self.pw_bias[...].astype(dtype)
        scores = jax.nn.relu(scores).astype(jnp.float32)
        e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=1, keepdims=True)))
        attention = (e / jnp.sum(e, axis=1, keepdims=True)).astype(dtype)  # [B, T, g], each map sums to 1 over T
        subspaces = x.reshape(batch, length, self.num_heads, -1)
        return (subspaces + attention[..., None] * subspaces).reshape(batch, length, d)
