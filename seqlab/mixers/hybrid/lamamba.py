"""LaMamba: local attention plus a multi-directional 2-D Mamba (SSD) scan, summed (non-causal).

Per token i of a raster-order grid (or a 1-D sequence), x [B, T, D]:

    a_i = W_o^att Σ_{j ∈ N(i)} softmax_j(q_i·k_j / √d) v_j        local attention, N(i) the k × k neighbourhood
    [z, u, B, C, Δ_raw] = x W_in;  u, B, C ← SiLU(DWConv_3×3([u, B, C]))   (centred depthwise conv, bias)
    per order r:  Δ^r = softplus(Δ_raw^r + b_Δ^r),  h^r_i = exp(−e^{A_log} Δ^r_i) h^r_{i−1} + B_i (Δ^r_i u_i)ᵀ
                  m^r_i = h^r_iᵀ C_i                                 (the scan in order r; one Δ per order)
    m_i = mean_r m^r_i + D ⊙ u_i;   s_i = W_out RMSNorm(m_i ⊙ SiLU(z_i))
    y_i = a_i + s_i

Paper: "LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba" (Fu, Chen and
Yu, 2024). Its code (yunxiangfu2001/LaMamba-Diff) was not readable here, so the wiring is this module's reading of
the paper's description: a local (neighbourhood) softmax attention for the fine detail and a Mamba scan over the
grid for the global context, as two parallel branches summed, each with its own projections. The Mamba branch is
Mamba2's SSD parametrisation (`seqlab.mixers.linear.mamba2`: scalar decay per head, A ~ U(1, 16), D skip, gated
RMSNorm) with the causal conv replaced by a centred 3×3 depthwise conv and the scan run over `orders` (default the
four-way VMamba / Mamba-YOLO 2-D scan: raster, column and both reversed; 1-D: raster and reversed) in one call
(`seqlab.core.grid.scan_orders`), each order with its own Δ projection and bias, the orders averaged. Unverified:
the parallel sum (vs. a sequence of the two), the per-order Δ, the kernel sizes (window 7, conv 3).
The local attention is ``seqlab.core.masks.Neighborhood`` on the grid (shifted inward at the borders, NATTEN's
rule) and ``Bidirectional`` (|i − j| ≤ window // 2) on a 1-D sequence, through the blockwise softmax op.

Causality: none; no decode cache. On a sequence split over devices (`sequence_axis`) the attention exchanges keys
and values like every masked attention, and the scan branch all-gathers the sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive_int, expand_dim
from seqlab.core import grid as grid_orders
from seqlab.core import masks
from seqlab.layers.grid_conv import CentredConv, check_grid, spatial_shape
from seqlab.layers.norms import RMSNorm
from seqlab.layers.ssm import init_mamba_decay, mamba_decay
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention

FOUR_WAY = ("raster", "raster_reversed", "column", "column_reversed")


class LocalAttention(MaskedAttention):
    """Non-causal softmax attention under a fixed mask: LaMamba's local branch."""

    def __init__(self, d_model: int, num_heads: int, *, mask: masks.Mask, **kwargs: Any):
        super().__init__(d_model, num_heads, causal=False, **kwargs)
        self.mask = mask

    def attention_mask(self) -> masks.Mask:
        return self.mask


@register(
    "lamamba",
    kind="hybrid",
    paper="LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba",
    examples={"default": dict(num_heads=2, window=5, d_state=8), "one_way": dict(num_heads=2, window=3, d_state=8,
                                                                                 orders=("raster",))},
)  # 2-d grids: tests/mixers/test_lamamba.py
class LaMamba(Mixer):
    """Local attention + multi-directional SSD scan (non-causal), x [B, T, D] -> [B, T, D]; grid: (rows, cols) of
    2-D tokens in raster order (None: a 1-D sequence)."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        grid: tuple[int, int] | None = None,
        window: int = 7,
        orders: tuple[str, ...] | None = None,
        d_state: int = 16,
        expand: float = 2.0,
        conv_size: int = 3,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.grid = check_grid(grid)
        check_positive_int("window", window)
        if window % 2 == 0:
            raise ValueError(f"window must be odd (a centred neighbourhood), got {window}")
        if self.grid is not None and window > min(self.grid):
            raise ValueError(f"window: a {window} × {window} neighbourhood must fit the grid {self.grid}")
        default = ("raster", "raster_reversed") if self.grid is None else FOUR_WAY
        self.orders = grid_orders.check_orders(default if orders is None else orders, self.grid)
        check_positive_int("d_state", d_state)
        self.value_dim = expand_dim("expand", d_model, expand, num_heads)
        self.d_state, self.d_inner = d_state, num_heads * self.value_dim
        mask = (masks.Bidirectional(window // 2 + 1) if self.grid is None
                else masks.Neighborhood(kernel=window, causal=False, grid=self.grid))
        self.attention = LocalAttention(d_model, num_heads, mask=mask, impl=impl, rngs=rngs, dtype=dtype,
                                        param_dtype=param_dtype)
        inner, bc = self.d_inner, 2 * d_state
        self.in_proj = self._linear(d_model, 2 * inner + bc + len(self.orders) * num_heads, rngs)
        self.conv = CentredConv(inner + bc, conv_size, self.grid, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.A_log, self.dt_bias = init_mamba_decay(rngs, num_heads, a_range=(1.0, 16.0))
        self.dt_bias = nnx.Param(jnp.tile(self.dt_bias[...], (len(self.orders), 1)))  # [O, H]: per order and head
        self.D = nnx.Param(jnp.ones((num_heads,), jnp.float32))
        self.norm = RMSNorm(inner, eps=norm_eps, norm_before_gate=False, param_dtype=param_dtype)
        self.out_proj = self._linear(inner, d_model, rngs)

    def _forward(self, x: jax.Array, cache: None) -> tuple[jax.Array, None]:
        spatial_shape(x.shape[1], self.grid)
        return self.attention(x) + self._on_whole_sequence(self._scan_branch, x), None

    def _scan_branch(self, x: jax.Array) -> jax.Array:
        """The multi-directional SSD branch s: x [B, T, D] (the whole sequence) -> [B, T, D]."""
        H, N, inner, n_orders = self.num_heads, self.d_state, self.d_inner, len(self.orders)
        z, ubc, dt_raw = jnp.split(self.in_proj(x), [inner, 2 * inner + 2 * N], axis=-1)
        u, b, c = jnp.split(jax.nn.silu(self.conv(ubc)), [inner, inner + N], axis=-1)
        u = self._heads(u, self.value_dim)  # [B, T, H, P]
        dt, log_decay = mamba_decay(dt_raw.reshape(*x.shape[:2], n_orders, H), self.A_log, self.dt_bias)
        dt, log_decay = jnp.moveaxis(dt, 2, 0), jnp.moveaxis(log_decay, 2, 0)  # [O, B, T, H] each
        shared = (jnp.repeat(c[:, :, None], H, axis=2), jnp.repeat(b[:, :, None], H, axis=2), u)  # q, k, u

        def ssd(q, k, u, dt, g):
            v = u * dt[..., None].astype(u.dtype)
            return ops.simple_gla(q, k, v, g, scale=1.0, impl=self.impl, chunk_size=self.chunk_size)[0]

        grid = (1, *spatial_shape(x.shape[1], self.grid))[-2:]  # a 1-D sequence is one row
        m = grid_orders.scan_orders(ssd, grid, self.orders, shared, (dt, log_decay)).mean(0)  # [B, T, H, P]
        m = m.astype(x.dtype) + u * self.D[...][:, None].astype(x.dtype)
        return self.out_proj(self.norm(self._merge_heads(m), z))
