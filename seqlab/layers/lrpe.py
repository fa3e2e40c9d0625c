"""Relative positional encodings of the TransNormer family, applied per head to q and k [B, T, H, d].

URPE — "The Devil in Linear Transformer" (Qin et al., EMNLP 2022), read from fairseq-evo's `urpe.py` with the
language-model settings core_matrix=1 (rotation), p_matrix=3 (Householder), theta_learned=True,
householder_learned=False:

    x_t ↦ R(t Θ) H x_t,   H = I − 2 u uᵀ,   R(tΘ) rotates the pairs (x_2i, x_2i+1) by the angle t θ_i.

u is a fixed random unit vector (drawn from `rngs` at construction, not trained: an `nnx.Variable` outside
`nnx.Param`, so the optimiser leaves it alone and a model rebuilt from the same seed has the same u). Θ [d/2] is
learnable, initialised to θ_i = 10000^(−2i/d), and shared by the heads. H and R are orthogonal, so the map is an
isometry, and (R(tΘ)H q)·(R(sΘ)H k) depends on t − s only.

LRPE — TransNormerLLM ("TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer", Qin et
al., 2023), read from the HF `modeling_transnormer.py` (`Lrpe`):

    x_t ↦ [x_t ⊙ cos(θ t), x_t ⊙ sin(θ t)]   (doubles the feature dim),

θ [H, 1, d] learnable (the official layout), initialised to 10000^(−2m/(H·d)) with m = h·d + i, so each head gets
its own band of frequencies. Then q'_t·k'_s = Σ_i q_ti k_si cos(θ_i (t − s)).

Positions are absolute token indices, `seqlab.layers.positional.positions(cache, T, sequence_axis)` in the mixers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_even, check_positive_int
from seqlab.layers.positional import rotate_pairs


class FixedVector(nnx.Variable):
    """A constant array of a module: part of its state, never a trained parameter."""


def _angles(theta: jax.Array, pos: jax.Array) -> jax.Array:
    """pos [T] or [B, T] int, theta [..., n] -> angles pos_t * theta [(B,) T, ..., n] float32."""
    pos = pos.astype(jnp.float32).reshape(*pos.shape, *([1] * theta.ndim))
    return pos * theta.astype(jnp.float32)


class URPE(nnx.Module):
    """x [B, T, H, d] ↦ R(tΘ) H x, per head (d even)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, base: float = 10000.0, param_dtype: Any = jnp.float32):
        check_positive_int("head_dim", dim)
        check_even("head_dim", dim)
        self.dim = dim
        exponent = jnp.arange(dim // 2, dtype=jnp.float32) * 2.0 / dim
        self.theta = nnx.Param((base ** (-exponent)).astype(param_dtype))
        u = jax.random.normal(rngs.params(), (dim,), jnp.float32)
        self.householder = FixedVector(u / jnp.linalg.norm(u))

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """x [B, T, H, d], pos [T] or [B, T] int -> [B, T, H, d] (x's dtype), computed in float32."""
        x32 = x.astype(jnp.float32)
        u = self.householder[...]
        reflected = x32 - 2.0 * jnp.sum(x32 * u, axis=-1, keepdims=True) * u
        angle = _angles(self.theta[...], pos)[..., None, :]  # [(B,) T, 1, d/2]
        return rotate_pairs(reflected, angle, interleaved=True).astype(x.dtype)


class LRPE(nnx.Module):
    """x [B, T, H, d] ↦ [x ⊙ cos(θ t), x ⊙ sin(θ t)]: [B, T, H, 2d]."""

    def __init__(self, num_heads: int, dim: int, *, base: float = 10000.0, param_dtype: Any = jnp.float32):
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", dim)
        self.num_heads, self.dim = num_heads, dim
        m = jnp.arange(num_heads * dim, dtype=jnp.float32).reshape(num_heads, 1, dim)
        self.theta = nnx.Param((base ** (-2.0 * m / (num_heads * dim))).astype(param_dtype))

    @property
    def out_dim(self) -> int:
        return 2 * self.dim

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """x [B, T, H, d], pos [T] or [B, T] int -> [B, T, H, 2d] (x's dtype), computed in float32."""
        angle = _angles(self.theta[...][:, 0], pos)  # [(B,) T, H, d]
        x32 = x.astype(jnp.float32)
        return jnp.concatenate([x32 * jnp.cos(angle), x32 * jnp.sin(angle)], axis=-1).astype(x.dtype)
