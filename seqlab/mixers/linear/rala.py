"""RALA: rank-augmented linear attention (non-causal), per head, over all N tokens (d = head_dim, s = d^-1/2):

    φ(x) = elu(x) + 1,   q_i = φ(x_i W_q),   k_j = φ(x_j W_k),   v_j = x_j W_v,   g_i = x_i W_g
    q̄ = (1/N) Σ_i q_i                                   the global query [B, H, d]
    α_j = N · softmax_j(s q̄·k_j)                        KV-buffer rank augmentation: one weight per key [B, N, H]
    o_i = (R_i q_i)ᵀ ((1/N) Σ_j α_j R_j k_j v_jᵀ) / (q_i·(1/N) Σ_j α_j k_j + eps),   eps = 1e-6
    y_i = W_o [(o_i + LePE(v)_i) ⊙ g_i]                 output rank augmentation: the token-wise gate g [B, N, H·d]

R_i: the 2-D rotary embedding of token i (on the numerator only): on a ``grid`` (rows, cols) read in raster order the
first d/2 features rotate their adjacent pairs by the token's row, the last d/2 by its column, at the frequencies
10000^-linspace(0, 1, d/4); on a 1-D sequence all d features rotate by the token index, at 10000^-linspace(0, 1,
d/2). LePE: a depthwise convolution of v over all H·d channels with bias, kernel `conv_size` (default 5; 5×5 on a
grid, zero "same" padding). The softmax over tokens subtracts its maximum and runs in float32, like the states.

Paper: "Breaking the Low-Rank Dilemma of Linear Attention" (Fan, Huang and He, CVPR 2025; the RAVLT backbone); read
from qhfan/RALA `classfication/RALA.py` (`GateLinearAttentionNoSilu`). Followed there: elu+1 on q and k, the mean of
φ(q) as the global query, α from φ(k) with the scale d^-1/2 and the factor N, the gate g a plain linear map of x
(no activation) multiplying the sum of the attention output and LePE, biases on every projection, the 2-D RoPE on
the numerator's q and α-weighted k only, the mean-normalised eps 1e-6, LePE 5×5.
Deviations: the official 1×1 convolutions are Linear maps, its one fused qkvo projection four Linears; the 1-D
sequence (its RoPE, a 1-D LePE of kernel `conv_size`) is this module's extension of the 2-D layer; ``rope=False``
drops the RoPE (R = identity: rank augmentation without the code's positional encoding). The backbone's block (its
conditional position conv, norms, FFN) is not part of the mixer. Engine: both means come from one final state of
`global_means` on the keys [α R k, α k] (2d features; without rope, α k alone), so `impl` / `chunk_size` pick the
form that sums over tokens.

Causality: none. α_j depends on the global query, so a causal form would reweight every earlier key whenever the
running mean query moves (exp(s q̄_t·k_j) does not factorise over t and j): no fixed-size state holds it, and
``causal=True`` is refused. No decode cache, no packed rows. On a sequence split over devices (`sequence_axis`) the
means q̄, the softmax's max and sum and the state means are taken over all devices (pmean / pmax / psum and the
engine's LASP-2 final state, `global_means`); LePE all-gathers v.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive, resolve_dim
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.global_means import global_means
from seqlab.layers.grid_conv import CentredConv, check_grid
from seqlab.layers.positional import RoPE
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register


@register(
    "rala",
    kind="linear",
    paper="Breaking the Low-Rank Dilemma of Linear Attention",
    examples={"default": dict(num_heads=2), "norope": dict(num_heads=2, rope=False, conv_size=3)},
)  # 2-d (whole grids only): tests/mixers/test_rala.py
class RALA(Mixer):
    """Rank-augmented linear attention (non-causal), x [B, T, D] -> [B, T, D]; grid: (rows, cols) of 2-D tokens
    (None: a 1-D sequence)."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = False,
        grid: tuple[int, int] | None = None,
        head_dim: int | None = None,
        rope: bool = True,
        conv_size: int = 5,
        eps: float = 1e-6,
        use_bias: bool = True,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        if causal:
            raise ValueError("causal: RALA is non-causal only (its key weights use the global mean query); "
                             "give causal=False")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.grid = check_grid(grid)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        check_positive("eps", eps)
        self.eps, self.scale = eps, self.head_dim**-0.5
        d, width = self.head_dim, num_heads * self.head_dim
        axes = 1 if self.grid is None else 2
        if rope and d % (2 * axes):
            raise ValueError(f"head_dim must be divisible by {2 * axes} for RALA's rotary embedding on "
                             f"{axes} axis(es), got {d}")
        self.rope = RoPE(d // axes, interleaved=True, freqs="retnet") if rope else None
        self.kernel = make_feature_map("elu1", d, num_heads=num_heads, rngs=rngs)
        self._projections(d, d, rngs, use_bias=use_bias)
        self.g_proj = self._linear(d_model, width, rngs, use_bias=use_bias)
        self.lepe = CentredConv(width, conv_size, self.grid, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def init_cache(self, batch: int, max_len: int) -> None:
        """Always raises ValueError: a non-causal layer has no decode cache."""
        self._check_cache_args(batch, max_len)

    def _forward(self, x: jax.Array, cache: Any):
        length = x.shape[1] * (1 if self.sequence_axis is None else jax.lax.axis_size(self.sequence_axis))
        d = self.head_dim
        q = self.kernel(self._heads(self.q_proj(x), d).astype(jnp.float32))
        k = self.kernel(self._heads(self.k_proj(x), d).astype(jnp.float32))
        v_flat = self.v_proj(x)
        weighted = self.key_weights(q, k, length)[..., None] * k
        pos = self._positions(None, x.shape[1], None)
        keys = weighted if self.rope is None else jnp.concatenate([self._rotate(weighted, pos), weighted], axis=-1)
        means = global_means(keys, self._heads(v_flat, d).astype(jnp.float32), **self._op_kwargs(None))
        numerator = jnp.einsum("bthk,bhkv->bthv", self._rotate(q, pos), means.kv[..., :d, :])
        denominator = jnp.einsum("bthk,bhk->bth", q, means.k[..., -d:])[..., None] + self.eps
        local = self._on_whole_sequence(self.lepe, v_flat)  # LePE all-gathers v
        y = (self._merge_heads(numerator / denominator).astype(x.dtype) + local) * self.g_proj(x)
        return self.o_proj(y), cache

    def key_weights(self, q: jax.Array, k: jax.Array, length: int) -> jax.Array:
        """α [B, T, H] float32 = N softmax over all N tokens of s q̄·k_j, from q, k [B, T, H, d] float32 (over every
        device of a split sequence)."""
        axis = self.sequence_axis
        q_mean = jnp.mean(q, axis=1)
        if axis is not None:
            q_mean = jax.lax.pmean(q_mean, axis)
        scores = jnp.einsum("bhd,bthd->bth", q_mean, k) * self.scale
        peak = jnp.max(jax.lax.stop_gradient(scores), axis=1, keepdims=True)
        if axis is not None:
            peak = jax.lax.pmax(peak, axis)
        e = jnp.exp(scores - peak)
        total = jnp.sum(e, axis=1, keepdims=True)
        if axis is not None:
            total = jax.lax.psum(total, axis)
        return length * e / total

    def _rotate(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """R x for x [B, T, H, d] at the global token indices pos [T] (identity without rope): 1-D, one rotation
        by the index; on the grid, the first d/2 features by the row and the last d/2 by the column."""
        if self.rope is None:
            return x
        if self.grid is None:
            return self.rope(x, pos)
        half = self.head_dim // 2
        rows, cols = jnp.divmod(pos, self.grid[1])
        return jnp.concatenate([self.rope(x[..., :half], rows), self.rope(x[..., half:], cols)], axis=-1)
