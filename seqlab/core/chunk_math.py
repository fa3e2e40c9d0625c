"""Small numerically careful building blocks for ``chunk_terms`` functions (shapes per chunk of C tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def causal_mask(length: int, *, strict: bool = False) -> Array:
    """[C, C] bool, True where key j is visible to query i (j <= i, or j < i when strict)."""
    rows = jnp.arange(length)[:, None]
    cols = jnp.arange(length)[None, :]
    return cols < rows if strict else cols <= rows


def decay_matrix(log_cumsum: Array) -> Array:
    """exp(b_i - b_j) for j <= i and 0 above the diagonal: [..., C] -> [..., C, C].

    The mask is applied before the exponential, so only non-positive differences are exponentiated.
    """
    diff = log_cumsum[..., :, None] - log_cumsum[..., None, :]
    mask = causal_mask(log_cumsum.shape[-1])
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def chunk_cumsum(log_gate: Array, axis: int = -1) -> Array:
    """Cumulative sum of log gates within a chunk, in float32."""
    return jnp.cumsum(log_gate.astype(jnp.float32), axis=axis)
