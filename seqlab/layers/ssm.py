"""Mamba2's decay parameterisation (Mamba2, Gated DeltaNet): log alpha = -exp(A_log) * softplus(dt + dt_bias)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def init_mamba_decay(
    rngs: nnx.Rngs, num_heads: int, *, a_range: tuple[float, float], dt_min=1e-3, dt_max=0.1, dt_floor=1e-4
) -> tuple[nnx.Param, nnx.Param]:
    """Mamba2's decay parameters (A_log, dt_bias), each [H] float32: A ~ U(a_range), A_log = log A;
    dt ~ logU(dt_min, dt_max) floored at dt_floor, dt_bias = inverse-softplus(dt)."""
    a = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, *a_range)
    a_log = jnp.log(jnp.maximum(a, jnp.finfo(jnp.float32).tiny))
    u = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    return nnx.Param(a_log), nnx.Param(dt_bias)


def mamba_decay(dt_raw: jax.Array, a_log: nnx.Param, dt_bias: nnx.Param) -> tuple[jax.Array, jax.Array]:
    """Delta = softplus(dt_raw + dt_bias) and log alpha = -exp(A_log) * Delta, both [..., H] float32."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias[...])
    return dt, -jnp.exp(a_log[...]) * dt
