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
    """Chunk terms for q, k [..., C, K], v [..., C, V] and an optional log decay g [..., C] (absent: no decay)."""
    q, k, v = x["q"], x["k"], x["v"]
    scores = jnp.einsum("...ik,...jk->...ij", q, k)
    if "g" not in x:
        scores = jnp.where(chunk_math.causal_mask(q.shape[-2]), scores, 0.0)
        zero = jnp.zeros((*q.shape[:-2], 1), jnp.float32)
        return ChunkTerms(scores @ v, q, Transition(zero), jnp.einsum("...ck,...cv->...kv", k, v))
    b = chunk_math.chunk_cumsum(x["g"])
    b_last = b[..., -1:]
    o_local = (scores * chunk_math.decay_matrix(b)) @ v
    q_read = q * jnp.exp(b)[..., None]
    k_write = k * jnp.exp(b_last - b)[..., None]
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
) -> tuple[Array, Array | None]:
    """Scalar-decay linear attention.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay (<= 0); initial_state: [B, H, K, V].
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    """
    _common.check_qkv(q, k, v)
    _common.check_gate("g", g, q.shape[:3])
    o, state = _common.run_linear_op(
        scalar_decay_chunk_terms, q, k, v, {"g": g}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        gate=DiagonalGate("g"),
    )
    return o.astype(v.dtype), state
