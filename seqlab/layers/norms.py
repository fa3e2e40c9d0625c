"""Normalisations over the last axis: per-head RMSNorm (optionally gated by swish), SimpleRMSNorm, L2."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in float32 (fla's l2norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, optionally gated by swish(gate).

    Applied to [..., H, d] with dim=d it is a per-head norm whose weight is shared by the heads (fla's layers).
    With a gate:
      norm_before_gate=True  (fla FusedRMSNormGated):  y = rmsnorm(x) * w * silu(gate)
      norm_before_gate=False (Mamba2 RMSNormGated):    y = rmsnorm(x * silu(gate)) * w
    Computed in float32 and cast back to x.dtype.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        norm_before_gate: bool = True,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("dim", dim)
        self.dim = dim
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype)) if affine else None

    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        y = x.astype(jnp.float32)
        if gate is not None and not self.norm_before_gate:
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32)
        if gate is not None and self.norm_before_gate:
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(x.dtype)


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SimpleRMSNorm (TransNormer, TransNormerLLM): x / sqrt(mean(x^2) + eps) over the last axis, no weights.

    Computed in float32, cast back to x.dtype. Both papers apply it to all heads concatenated: x [..., H*d].
    """
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def plain_layer_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm without weight or bias (Transformer-VQ's and LongVQ's q and k): (x − mean) / sqrt(var + eps) over
    the last axis, computed in float32 and cast back to x.dtype."""
    x32 = x.astype(jnp.float32)
    return srms_norm(x32 - jnp.mean(x32, axis=-1, keepdims=True), eps).astype(x.dtype)
