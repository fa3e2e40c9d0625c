"""Small numerically careful building blocks for ``chunk_terms`` functions (shapes per chunk of C tokens).

Packed documents: when a row holds several documents, the engine adds the input ``DOCUMENT`` to every chunk, each
token's document index within its chunk (float32 [..., C]; 0 is the document the incoming state belongs to, and
it grows by one at every document start). A family then builds its pair masks with ``visible_pairs`` (causal
and within one document) and writes only the chunk's last document into its outgoing state (``last_document_rows``);
the engine itself zeroes the incoming-state read of later documents and resets the transition of a chunk in which
a document starts (``recurrence``). Without ``DOCUMENT`` both helpers are the plain causal ones.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

DOCUMENT = "document"  # the engine input holding each token's document index within its chunk


def document_index(starts: Array, axis: int = -1) -> Array:
    """Each token's ``DOCUMENT`` index within its chunk, float32: the document starts (bool, chunk layout along
    ``axis``) counted from the chunk's first token."""
    return jnp.cumsum(starts.astype(jnp.float32), axis=axis)


def causal_mask(length: int, *, strict: bool = False) -> Array:
    """[C, C] bool, True where key j is visible to query i (j <= i, or j < i when strict)."""
    rows = jnp.arange(length)[:, None]
    cols = jnp.arange(length)[None, :]
    return cols < rows if strict else cols <= rows


def visible_pairs(x: Mapping[str, Array], length: int, *, strict: bool = False) -> Array:
    """[..., C, C] bool: key j is visible to query i (causal, strictly when `strict`) and, when the chunk inputs
    `x` hold ``DOCUMENT``, in the same document; [C, C] without documents."""
    mask = causal_mask(length, strict=strict)
    document = x.get(DOCUMENT)
    if document is None:
        return mask
    return mask & (document[..., :, None] == document[..., None, :])


def last_document_rows(x: Mapping[str, Array], rows: Array) -> Array:
    """`rows` [..., C, F] with the rows of tokens outside the chunk's last document zeroed: the keys the outgoing
    state is written from (all of them without ``DOCUMENT``)."""
    document = x.get(DOCUMENT)
    if document is None:
        return rows
    return jnp.where((document == document[..., -1:])[..., None], rows, 0.0)


def decay_matrix(log_cumsum: Array, mask: Array | None = None) -> Array:
    """exp(b_i - b_j) where `mask` ([..., C, C] bool; default causal, j <= i) holds and 0 elsewhere:
    [..., C] -> [..., C, C]. The mask is applied before the exponential, so only non-positive differences are
    exponentiated (a mask must not hold above the diagonal)."""
    diff = log_cumsum[..., :, None] - log_cumsum[..., None, :]
    mask = causal_mask(log_cumsum.shape[-1]) if mask is None else mask
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
