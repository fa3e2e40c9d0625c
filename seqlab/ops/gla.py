"""Gated linear attention — "Gated Linear Attention Transformers with Hardware-Efficient Training".

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t),   gk_t <= 0 (one gate per key dim).

Chunk form with b = within-chunk cumsum of gk (float32):
    intra: P_ij = Σ_d q_id k_jd exp(b_id - b_jd) (j <= i),  o_local = P V
    inter: q_read = Q ⊙ e^b;  S_out = e^{b_C} ⊙ S_in + (K ⊙ e^{b_C - b})ᵀ V.
P is built with secondary chunking (sub-chunks of ``SUB_CHUNK``): off-diagonal sub-blocks are matmuls of
(q ⊙ e^{b - b_r}) and (k ⊙ e^{b_r - b}) with b_r the gate sum at the start of the query's sub-chunk (both exponents
<= 0); diagonal sub-blocks are evaluated elementwise, exactly.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from seqlab.core import chunk_math
from seqlab.core.recurrence import ChunkTerms, Transition
from seqlab.ops import _common

Array = jax.Array

SUB_CHUNK = 16


def _intra_scores(q: Array, k: Array, b: Array, sub: int) -> Array:
    """P [..., C, C] for q, k, b: [..., C, K] with C a multiple of ``sub``."""
    *lead, length, key_dim = q.shape
    n = length // sub
    qs, bs = (a.reshape(*lead, n, sub, key_dim) for a in (q, b))
    ks = k.reshape(*lead, n, sub, key_dim)
    ref = bs[..., :, 0, :]  # [..., n, K]: gate sum at the first row of each query sub-chunk
    q_hat = qs * jnp.exp(bs - ref[..., :, None, :])
    key_block = jnp.arange(length) // sub
    earlier = key_block[None, :] < jnp.arange(n)[:, None]  # [n, C]: key lies in a sub-chunk before the query's
    k_exp = jnp.where(earlier[:, :, None], ref[..., :, None, :] - b[..., None, :, :], -jnp.inf)
    k_hat = k[..., None, :, :] * jnp.exp(k_exp)  # [..., n, C, K]
    off_diag = jnp.einsum("...nik,...njk->...nij", q_hat, k_hat)  # [..., n, sub, C]
    diff = bs[..., :, :, None, :] - bs[..., :, None, :, :]  # [..., n, sub, sub, K]
    diff = jnp.where(chunk_math.causal_mask(sub)[:, :, None], diff, -jnp.inf)
    diag = jnp.einsum("...nik,...njk,...nijk->...nij", qs, ks, jnp.exp(diff))  # [..., n, sub, sub]
    diag = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(n, dtype=diag.dtype)).reshape(*lead, n, sub, length)
    return (off_diag + diag).reshape(*lead, length, length)


def vector_gate_chunk_terms(x: Mapping[str, Array]) -> ChunkTerms:
    """Chunk terms for q, k, gk [..., C, K] and v [..., C, V]."""
    q, k, v = x["q"], x["k"], x["v"]
    b = chunk_math.chunk_cumsum(x["gk"], axis=-2)
    b_last = b[..., -1, :]
    length = q.shape[-2]
    sub = min(SUB_CHUNK, length)
    pad = -length % sub
    # zero q, k but edge-padded b: padded rows then decay by nothing, so no exponent turns positive
    widths = [(0, 0)] * (q.ndim - 2) + [(0, pad), (0, 0)]
    padded = [jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(b, widths, mode="edge")]
    scores = _intra_scores(*padded, sub)[..., :length, :length]
    k_write = k * jnp.exp(b_last[..., None, :] - b)
    return ChunkTerms(scores @ v, q * jnp.exp(b), Transition(b_last), jnp.einsum("...ck,...cv->...kv", k_write, v))


def gla(
    q: Array,
    k: Array,
    v: Array,
    gk: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "chunked",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
) -> tuple[Array, Array | None]:
    """Vector-gated linear attention.

    q, k: [B, T, H, K]; v: [B, T, H, V]; gk: [B, T, H, K] log gates (<= 0); initial_state: [B, H, K, V].
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    """
    _common.check_qkv(q, k, v)
    _common.check_gate("gk", gk, q.shape)
    o, state = _common.run_linear_op(
        vector_gate_chunk_terms, q, k, v, {"gk": gk}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
    )
    return o.astype(v.dtype), state
