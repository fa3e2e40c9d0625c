"""VAN's large kernel attention (non-causal), per token of a 2-D token grid (or of a 1-D sequence):

    u = GELU(x W_1 + b_1)                                   proj_1 (a 1×1 conv) and the exact (erf) GELU
    a = DW_{7, dilation 3}(DW_5(u)) W_c + b_c               LKA: 5×5 depthwise, 7×7 depthwise with dilation 3, 1×1 conv
    y = (u ⊙ a) W_2 + b_2 + x                               proj_2, plus the layer's own shortcut (``shortcut=True``)

x, y [B, T, D]; on a ``grid`` (rows, cols) the tokens are a raster-order grid [B, rows, cols, D] (T = rows·cols) and
DW_k is a k×k depthwise convolution with bias and zero "same" padding (2 for the 5×5, 9 for the dilated 7×7: a 19×19
receptive field per pixel, LKA's decomposition of a 21×21 kernel). With grid None the 2-D convolutions become 1-D
convolutions over the sequence with the same sizes, dilation and padding (this module's extension).

Paper: "Visual Attention Network" (Guo, Lu, Liu, Liu, Cheng and Hu, 2022). Read from Visual-Attention-Network/
VAN-Classification `models/van.py`: `LKA` (`AttentionModule` in an earlier version) is conv0 (5×5 depthwise, padding
2), conv_spatial (7×7 depthwise, dilation 3, padding 9) and conv1 (1×1, all channels), every one with PyTorch's
default bias, its output multiplying its input; `Attention` (`SpatialAttention` earlier) is proj_1 (1×1) → GELU →
LKA → proj_2 (1×1), with biases, and adds its input back (``x + shortcut``). Initialisation as there: weights
N(0, 2 / fan_out) with fan_out = kernel area · out channels / groups, biases zero.
Shortcut: the official layer adds its own input, and VAN's block adds a residual around it too (x + ls ·
Attention(BN(x))); seqlab's block is x + mixer(norm(x)). ``shortcut=True`` (default) keeps the layer's shortcut, so
the block is x + norm(x) + proj_2(...), the official block at layer scale 1; ``shortcut=False`` leaves the block's
residual alone. Deviations: the 1×1 convolutions are Linear maps; the kernel sizes and dilation are arguments
(``conv_size``, ``dilated_size``, ``dilation``; the defaults are the official ones); the block's BatchNorm, layer
scale and MLP are not part of the mixer.

Causality: none (no decode cache, no packed rows). On a sequence split over devices (`sequence_axis`) the
convolutions all-gather u.
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


def _check_odd(name: str, value: Any) -> None:
    check_positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd (a centred convolution), got {value}")


@register(
    "van_lka",
    kind="conv",
    paper="Visual Attention Network",
    examples={"default": dict(num_heads=1), "small": dict(num_heads=1, conv_size=3, dilated_size=5, dilation=2,
                                                         shortcut=False)},
)  # 2-d (whole grids only): tests/mixers/test_van_lka.py
class VANAttention(Mixer):
    """VAN's spatial attention with large kernel attention (non-causal), x [B, T, D] -> [B, T, D]; grid: (rows, cols)
    of 2-D tokens (None: a 1-D sequence). num_heads is accepted for the uniform mixer constructor (unused), like
    `impl` (no op)."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        grid: tuple[int, int] | None = None,
        conv_size: int = 5,
        dilated_size: int = 7,
        dilation: int = 3,
        shortcut: bool = True,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.grid = check_grid(grid)
        _check_odd("conv_size", conv_size)
        _check_odd("dilated_size", dilated_size)
        check_positive_int("dilation", dilation)
        if not isinstance(shortcut, bool):
            raise ValueError(f"shortcut must be a bool, got {shortcut!r}")
        self.shortcut = shortcut
        axes, d = (1 if self.grid is None else 2), d_model
        pointwise = dict(kernel_init=jax.nn.initializers.normal((2.0 / d) ** 0.5), use_bias=True)
        self.proj_1 = self._linear(d, d, rngs, **pointwise)
        self.conv0 = self._depthwise(conv_size, 1, axes, rngs)
        self.conv_spatial = self._depthwise(dilated_size, dilation, axes, rngs)
        self.conv1 = self._linear(d, d, rngs, **pointwise)
        self.proj_2 = self._linear(d, d, rngs, **pointwise)

    def _depthwise(self, size: int, dilation: int, axes: int, rngs: nnx.Rngs) -> nnx.Conv:
        return nnx.Conv(self.d_model, self.d_model, (size,) * axes, kernel_dilation=dilation, padding="SAME",
                        feature_group_count=self.d_model, use_bias=True, bias_init=jax.nn.initializers.zeros,
                        kernel_init=jax.nn.initializers.normal((2.0 / size**axes) ** 0.5), dtype=self.dtype,
                        param_dtype=self.param_dtype, rngs=rngs)

    def _forward(self, x: jax.Array, cache: Any):
        u = jax.nn.gelu(self.proj_1(x), approximate=False)
        y = self.proj_2(self._on_whole_sequence(self.lka, u))
        return (y + x.astype(y.dtype) if self.shortcut else y), cache

    def lka(self, u: jax.Array) -> jax.Array:
        """u ⊙ conv1(DW_dilated(DW(u))) for the whole sequence u [B, T, D] (on the grid, [B, rows, cols, D] inside)."""
        image = u.reshape(u.shape[0], *spatial_shape(u.shape[1], self.grid), -1)
        return (image * self.conv1(self.conv_spatial(self.conv0(image)))).reshape(u.shape)
