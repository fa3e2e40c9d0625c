"""Linear attention with a scalar (per head, per token) decay: RetNet, Lightning Attention, Mamba2/SSD.

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t),   g_t <= 0.

Chunk form (b = within-chunk cumsum of g, float32): o = ((Q Kᵀ) ⊙ exp(b_i - b_j) ⊙ M) V + (Q ⊙ e^b) S_in,
S_out = e^{b_C} S_in + (K ⊙ e^{b_C - b})ᵀ V.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from seqlab.core import chunk_math
from seqlab.core.recurrence import ChunkTerms, DiagonalGate, Transition
from seqlab.ops import _common

Array = jax.Array


def scalar_decay_chunk_terms(x: Mapping[str, Array]) -> ChunkTerms:
    """Chunk terms for q, k [..., C, K], v [..., C, V] and an optional log decay g [..., C] (absent: no decay);
    packed documents through ``chunk_math.DOCUMENT``."""
    q, k, v = x["q"], x["k"], x["v"]
    pairs = chunk_math.visible_pairs(x, q.shape[-2])
    scores = jnp.einsum("...ik,...jk->...ij", q, k)
    if "g" not in x:
        zero = jnp.zeros((*q.shape[:-2], 1), jnp.float32)
        s_local = jnp.einsum("...ck,...cv->...kv", chunk_math.last_document_rows(x, k), v)
        return ChunkTerms(jnp.where(pairs, scores, 0.0) @ v, q, Transition(zero), s_local)
    b = chunk_math.chunk_cumsum(x["g"])
    b_last = b[..., -1:]
    o_local = (scores * chunk_math.decay_matrix(b, pairs)) @ v
    q_read = q * jnp.exp(b)[..., None]
    k_write = chunk_math.last_document_rows(x, k * jnp.exp(b_last - b)[..., None])
    return ChunkTerms(o_local, q_read, Transition(b_last), jnp.einsum("...ck,...cv->...kv", k_write, v))


@_common.linear_op(gates={"g": _common.Gate("head", "log")}, kernel="linear_attention")
def simple_gla(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
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
    """Scalar-decay linear attention.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay (<= 0); initial_state: [B, H, K, V].
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    segment_ids [B, T] or cu_seqlens [D + 1]: packed documents (``seqlab.core.documents``); each starts from a zero
    state (the row's first from initial_state) and the final state is each row's last document's ([D, H, K, V],
    one per document, with cu_seqlens).
    """
    _common.check_qkv(q, k, v)
    _common.check_gate("g", g, q.shape[:3])
    o, state = _common.run_linear_op(
        scalar_decay_chunk_terms, q, k, v, {"g": g}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        gate=DiagonalGate("g"),
    )
    return o.astype(v.dtype), state
