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


TRIANGULAR_MAX = 256  # longest axis summed as a product with a triangular matrix of ones


def chunk_cumsum(log_gate: Array, axis: int = -1) -> Array:
    """Cumulative sum of log gates along a chunk axis (-1 or -2), in float32.

    Chunk-sized axes (<= ``TRIANGULAR_MAX``, e.g. the default 64) use a product with a triangular matrix of ones at
    full float32 precision: XLA lowers ``cumsum`` to a windowed reduction and fuses it into its consumers, which then
    recompute the producer once per window element, where the [C, C] product runs as one matmul. Longer axes (the
    parallel form's single chunk) use ``cumsum``.
    """
    return _triangular_sum(log_gate.astype(jnp.float32), axis, reverse=False)


def chunk_reverse_cumsum(x: Array, axis: int = -1) -> Array:
    """Σ_{j >= i} x_j along a chunk axis (-1 or -2), in float32 (as ``chunk_cumsum``, from the end)."""
    return _triangular_sum(x.astype(jnp.float32), axis, reverse=True)


def _triangular_sum(x: Array, axis: int, reverse: bool) -> Array:
    length = x.shape[axis]
    if length > TRIANGULAR_MAX:
        return jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis), axis) if reverse else jnp.cumsum(x, axis)
    ones = jnp.triu(jnp.ones((length, length), jnp.float32))  # ones[j, i] = 1 for j <= i: prefix sums
    if reverse:
        ones = ones.T
    highest = jax.lax.Precision.HIGHEST
    if axis in (-1, x.ndim - 1):
        return jnp.einsum("...j,ji->...i", x, ones, precision=highest)
    if axis in (-2, x.ndim - 2):  # as [..., K, C] @ ones: each [C, K] tile transposed in cache, then one matmul
        return jnp.swapaxes(jnp.einsum("...kj,ji->...ki", jnp.swapaxes(x, -1, -2), ones, precision=highest), -1, -2)
    raise ValueError(f"axis must be -1 or -2, got {axis}")
