"""ViG: bidirectional gated linear attention with direction-wise gating and 2-D locality injection (non-causal).

Per token i of a raster-order grid (or a 1-D sequence), H heads, d_k = expand_k·d_model/H, d_v = d_model/H:

    l_i = SiLU(DWConv_3×3(x)_i)                           local features [B, T, d_model] (depthwise, no bias)
    q_i, k_i, v_i = l_i W_q, l_i W_k, l_i W_v              shared by both directions
    log α→_i, log α←_i = logsigmoid(l_i W_1 W_2 + b) / 16  one gate per direction [B, T, H, d_k] each
    S→_i = diag(α→_i) S→_{i-1} + k_i v_iᵀ   (raster order)      o→_i = S→_iᵀ q_i d_k^-1/2
    S←_i = diag(α←_i) S←_{i+1} + k_i v_iᵀ   (reversed order)    o←_i = S←_iᵀ q_i d_k^-1/2
    o_i = (o→_i + o←_i) / 2                                 (token i's own pair is read by both directions)
    g_i = σ(l_i W_g + b_g)                                  the 2-D gating locality injection
    y_i = W_o [g_i ⊙ RMSNorm(o_i) + (1 − g_i) ⊙ RMSNorm(l_i)]   (per-head RMSNorms, affine, eps 1e-5)

Paper: "ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention" (Liao et al., 2024); read from
hustvl/ViG `classification/models/vig.py` (`GatedLinearAttention`). Followed there: the 3×3 depthwise conv without
bias and its SiLU as the input of every projection, q/k/v without bias, expand_k 0.5 with d_v = d_model / H (the
locality injection mixes o with l per head, so expand_v is 1), one low-rank gate projection (d_model → 16 → 2·H·d_k,
bias on the second) split into the forward and backward gates, logsigmoid / 16, the mean of the two directions, the
sigmoid gate with bias, separate RMSNorms of o and l, W_o without bias. Not taken: the class token and RoPE options
(seqlab's backbone pools instead), the fused bidirectional kernel (here the engine's GLA op runs both directions in
one call via `seqlab.core.grid.scan_orders`). On a 1-D sequence (grid None) the conv is 1-D (kernel 3), this
module's extension. `orders` names the scan directions (default raster and raster_reversed, ViG's; any orders of
`seqlab.core.grid.ORDERS`, one gate each, averaged), e.g. four-way ("raster", "raster_reversed", "column",
"column_reversed").

Causality: none; no decode cache. On a sequence split over devices (`sequence_axis`) the layer all-gathers the
sequence and keeps its own tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, check_positive_int, expand_dim
from seqlab.core import grid as grid_orders
from seqlab.layers.grid_conv import CentredConv, check_grid, spatial_shape
from seqlab.layers.norms import RMSNorm
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register


@register(
    "vig",
    kind="linear",
    paper="ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention",
    examples={"default": dict(num_heads=2), "wide_keys": dict(num_heads=4, expand_k=1.0, conv_size=5)},
)  # 2-d grids and four-way orders: tests/mixers/test_vig.py
class ViG(Mixer):
    """Bidirectional GLA with 2-D locality injection (non-causal), x [B, T, D] -> [B, T, D]; grid: (rows, cols) of
    2-D tokens in raster order (None: a 1-D sequence)."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        grid: tuple[int, int] | None = None,
        orders: tuple[str, ...] = ("raster", "raster_reversed"),
        expand_k: float = 0.5,
        conv_size: int = 3,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
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
        self.orders = grid_orders.check_orders(orders, self.grid)
        self.key_dim = expand_dim("expand_k", d_model, expand_k, num_heads)
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads}): the values are the "
                             "local features split into heads")
        self.value_dim = d_model // num_heads
        check_positive_int("gate_low_rank_dim", gate_low_rank_dim)
        check_positive("gate_logit_normalizer", gate_logit_normalizer)
        self.gate_logit_normalizer = gate_logit_normalizer
        H, dk = num_heads, self.key_dim
        self.local = CentredConv(d_model, conv_size, self.grid, rngs=rngs, use_bias=False, dtype=dtype,
                                 param_dtype=param_dtype)
        self.q_proj = self._linear(d_model, H * dk, rngs)
        self.k_proj = self._linear(d_model, H * dk, rngs)
        self.v_proj = self._linear(d_model, d_model, rngs)
        self.gk_down = self._linear(d_model, gate_low_rank_dim, rngs)
        self.gk_up = self._linear(gate_low_rank_dim, len(self.orders) * H * dk, rngs, use_bias=True)
        self.g_proj = self._linear(d_model, d_model, rngs, use_bias=True)
        self.o_proj = self._linear(d_model, d_model, rngs)
        self.o_norm = RMSNorm(self.value_dim, eps=norm_eps, param_dtype=param_dtype)
        self.l_norm = RMSNorm(self.value_dim, eps=norm_eps, param_dtype=param_dtype)

    def _forward(self, x: jax.Array, cache: None) -> tuple[jax.Array, None]:
        return self._on_whole_sequence(self._mix, x), None

    def _mix(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] (the whole sequence) -> [B, T, D]."""
        grid = (1, *spatial_shape(x.shape[1], self.grid))[-2:]  # a 1-D sequence is one row
        local = jax.nn.silu(self.local(x))
        q, k = self._heads(self.q_proj(local), self.key_dim), self._heads(self.k_proj(local), self.key_dim)
        v = self._heads(self.v_proj(local), self.value_dim)
        gates = jax.nn.log_sigmoid(self.gk_up(self.gk_down(local)).astype(jnp.float32)) / self.gate_logit_normalizer
        gates = jnp.moveaxis(gates.reshape(*x.shape[:2], len(self.orders), -1), 2, 0)  # [O, B, T, H·d_k]
        gates = gates.reshape(*gates.shape[:3], self.num_heads, self.key_dim)

        def gla(q, k, v, gk):
            return ops.gla(q, k, v, gk, impl=self.impl, chunk_size=self.chunk_size)[0]

        o = grid_orders.scan_orders(gla, grid, self.orders, (q, k, v), (gates,)).mean(0)  # [B, T, H, d_v]
        g = jax.nn.sigmoid(self._heads(self.g_proj(local), self.value_dim))
        mixed = g * self.o_norm(o.astype(x.dtype)) + (1 - g) * self.l_norm(self._heads(local, self.value_dim))
        return self.o_proj(self._merge_heads(mixed))
