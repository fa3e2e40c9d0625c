"""The centred (non-causal) depthwise convolution over the tokens of a 1-D sequence or of a 2-D token grid read in
raster order (RALA's LePE, LiT's value convolution), and the check of a ``grid`` argument."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int
from seqlab.core.grid import check_grid_shape


def check_grid(grid: Any) -> tuple[int, int] | None:
    """grid as a tuple, or None (a 1-D sequence); ValueError unless it is None or (rows, cols) positive ints."""
    if grid is None:
        return None
    try:
        return check_grid_shape(grid)
    except ValueError:
        raise ValueError(f"grid must be None or (rows, cols) positive ints, got {grid!r}") from None


def spatial_shape(length: int, grid: tuple[int, int] | None) -> tuple[int, ...]:
    """The token layout of a sequence of `length` tokens: (length,) for a 1-D sequence (grid None), else the grid,
    or ValueError naming x when the grid does not hold `length` tokens."""
    if grid is None:
        return (length,)
    if length != grid[0] * grid[1]:
        raise ValueError(f"x: the grid {grid} takes {grid[0] * grid[1]} tokens, got {length}")
    return tuple(grid)


class CentredConv(nnx.Module):
    """y = DWConv(x) (+ a bias unless use_bias=False), zero "same" padding: x [B, T, C] -> [B, T, C], kernel K over
    time (grid None) or K × K over the grid (T = rows·cols, raster order); one filter per channel. K must be odd."""

    def __init__(self, channels: int, kernel_size: int, grid: tuple[int, int] | None, *, rngs: nnx.Rngs,
                 use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("conv_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_size must be odd (a centred convolution), got {kernel_size}")
        self.grid = grid
        kernel = (kernel_size,) * (1 if grid is None else 2)
        self.conv = nnx.Conv(channels, channels, kernel, feature_group_count=channels, padding="SAME",
                             use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x.reshape(x.shape[0], *spatial_shape(x.shape[1], self.grid), -1)).reshape(x.shape)
