"""Linear attention — "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention".

    S_t = S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t)
    normalize=True:  z_t = z_{t-1} + k_t,   o_t = S_tᵀ q̃_t / (q̃_t · z_t + eps),   q̃_t = scale · q_t

The normaliser rides in the state as one extra value column (v extended with a column of ones), so the engine
carries S and z together: the state is [B, H, K, V + 1] with z in the last column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core.recurrence import DiagonalGate
from seqlab.ops import _common
from seqlab.ops.simple_gla import scalar_decay_chunk_terms

Array = jax.Array


@_common.linear_op(
    kernel="linear_attention",
    variants={"normalized": _common.Variant({"normalize": True}, state_columns=1, positive_features=True)},
)
def linear_attn(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Additive linear attention; q, k: [B, T, H, K]; v: [B, T, H, V].

    Returns o [B, T, H, V] and, if ``output_final_state``, the state [B, H, K, V] ([B, H, K, V + 1] with the key
    sum in the last column when ``normalize``).
    segment_ids [B, T] or cu_seqlens [D + 1]: packed documents (``seqlab.core.documents``); each starts from a zero
    state (the row's first from initial_state) and the final state is each row's last document's ([D, H, K, V],
    one per document, with cu_seqlens).
    """
    _common.check_qkv(q, k, v)
    values = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1) if normalize else v
    o, state = _common.run_linear_op(
        scalar_decay_chunk_terms, q, k, values, {}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        gate=DiagonalGate(None),
    )
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.astype(v.dtype), state
