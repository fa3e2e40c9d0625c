"""Gated linear attention — "Gated Linear Attention Transformers with Hardware-Efficient Training".

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t),   gk_t <= 0 (one gate per key dim).

Chunk form with b = within-chunk cumsum of gk (float32):
    intra: P_ij = Σ_d q_id k_jd exp(b_id - b_jd) (j <= i),  o_local = P V
    inter: q_read = Q ⊙ e^b;  S_out = e^{b_C} ⊙ S_in + (K ⊙ e^{b_C - b})ᵀ V.
P is built by halving (see ``_intra_scores``): in a block of 2s rows, the pairs with the query in the second half and
the key in the first are one matmul of (q ⊙ e^{b - b_r}) and (k ⊙ e^{b_r - b}), b_r the gate sum at the last row of
the first half, so both exponents are <= 0; the two halves recurse, down to the diagonal. Every pair is exact and
each level costs O(C·K) elementwise work plus a batched matmul, instead of a [C, sub-chunk, K] tensor.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from seqlab.core import chunk_math
from seqlab.core.recurrence import ChunkTerms, DiagonalGate, Transition
from seqlab.ops import _common

Array = jax.Array


def _intra_scores(q: Array, k: Array, b: Array) -> Array:
    """P [..., C, C] (lower triangular, diagonal included) for q, k, b: [..., C, K] with C a power of two."""
    *lead, length, key_dim = q.shape
    scores = jnp.sum(q * k, axis=-1)[..., None, None]  # [..., C, 1, 1]: the diagonal, blocks of one row
    size = 1
    while size < length:
        count = length // (2 * size)
        qs, ks, bs = (a.reshape(*lead, count, 2, size, key_dim) for a in (q, k, b))
        ref = bs[..., 0, -1:, :]  # [..., count, 1, K]: gate sum at the last row of each first half
        q_hat = qs[..., 1, :, :] * jnp.exp(bs[..., 1, :, :] - ref)
        k_hat = ks[..., 0, :, :] * jnp.exp(ref - bs[..., 0, :, :])
        corner = jnp.einsum("...ik,...jk->...ij", q_hat, k_hat)  # [..., count, size, size]
        halves = scores.reshape(*lead, count, 2, size, size)
        top = jnp.concatenate([halves[..., 0, :, :], jnp.zeros_like(corner)], axis=-1)
        bottom = jnp.concatenate([corner, halves[..., 1, :, :]], axis=-1)
        scores = jnp.concatenate([top, bottom], axis=-2)  # [..., count, 2 size, 2 size]
        size *= 2
    return scores.reshape(*lead, length, length)


def vector_gate_chunk_terms(x: Mapping[str, Array]) -> ChunkTerms:
    """Chunk terms for q, k, gk [..., C, K] and v [..., C, V]; packed documents through ``chunk_math.DOCUMENT``."""
    q, k, v = x["q"], x["k"], x["v"]
    b = chunk_math.chunk_cumsum(x["gk"], axis=-2)
    b_last = b[..., -1, :]
    length = q.shape[-2]
    pad = (1 << (length - 1).bit_length()) - length
    # zero q, k but edge-padded b up to a power of two: padded rows then decay by nothing, so no exponent turns positive
    widths = [(0, 0)] * (q.ndim - 2) + [(0, pad), (0, 0)]
    padded = [jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(b, widths, mode="edge")]
    scores = jnp.where(chunk_math.visible_pairs(x, length), _intra_scores(*padded)[..., :length, :length], 0.0)
    k_write = chunk_math.last_document_rows(x, k * jnp.exp(b_last[..., None, :] - b))
    return ChunkTerms(scores @ v, q * jnp.exp(b), Transition(b_last), jnp.einsum("...ck,...cv->...kv", k_write, v))


@_common.linear_op(gates={"gk": _common.Gate("key", "log")}, kernel="linear_attention")
def gla(
    q: Array,
    k: Array,
    v: Array,
    gk: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Vector-gated linear attention.

    q, k: [B, T, H, K]; v: [B, T, H, V]; gk: [B, T, H, K] log gates (<= 0); initial_state: [B, H, K, V].
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    segment_ids [B, T] or cu_seqlens [D + 1]: packed documents (``seqlab.core.documents``); each starts from a zero
    state (the row's first from initial_state) and the final state is each row's last document's ([D, H, K, V],
    one per document, with cu_seqlens).
    """
    _common.check_qkv(q, k, v)
    _common.check_gate("gk", gk, q.shape)
    o, state = _common.run_linear_op(
        vector_gate_chunk_terms, q, k, v, {"gk": gk}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        gate=DiagonalGate("gk"),
    )
    return o.astype(v.dtype), state
