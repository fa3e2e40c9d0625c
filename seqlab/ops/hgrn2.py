"""HGRN2 — "HGRN2: Gated Linear RNNs with State Expansion" (Qin et al., 2024).

Per head, with the forget gate f_t ∈ (0, 1)^K given in log space (g_t = log f_t <= 0), the input gate tied to it
(1 - f_t) and the input i_t ∈ R^V (the value):

    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ,   o_t = S_tᵀ (scale · q_t),   S_t ∈ R^{K×V}

This is GLA with the key k_t = 1 - f_t = -expm1(g_t). The op derives k in float32 (accurate for f_t near 1) outside
the engine and runs ``gla``, so the gate enters the engine only through exp(G_t - G_s) of its running sum G:
HGRN2 is diagonal-gated (``DiagonalGate("gk")``) and has the engine's backward pass, sequence parallelism and the
Pallas linear-attention kernels with no code of its own. The gradient through k = -expm1(g) is plain autodiff,
added to the gate gradient the engine returns.

Scale: the default is K^-1/2, as in flash-linear-attention's HGRN2 layer (``fla.layers.hgrn2`` passes no scale to
its GLA ops, whose default is K^-1/2); the official OpenNLPLab implementation runs the recurrence unscaled, which
is ``scale=1.0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.ops import _common
from seqlab.ops.gla import gla

Array = jax.Array


@_common.linear_op(gates={"g": _common.Gate("key", "log")}, kernel="linear_attention")
def hgrn2(
    q: Array,
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
    """HGRN2's gated linear RNN with state expansion.

    q: [B, T, H, K] queries (the paper's output gate); v: [B, T, H, V] inputs i_t; g: [B, T, H, K] log forget
    gates (<= 0); initial_state: [B, H, K, V]. The keys k = 1 - exp(g) are computed in float32 and fed in q's dtype.
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    segment_ids [B, T] or cu_seqlens [D + 1]: packed documents (``seqlab.core.documents``); each starts from a zero
    state (the row's first from initial_state) and the final state is each row's last document's ([D, H, K, V],
    one per document, with cu_seqlens).
    """
    _common.check_qv(q, v)
    _common.check_gate("g", g, q.shape)
    k = (-jnp.expm1(g.astype(jnp.float32))).astype(q.dtype)
    return gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
               impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis, segment_ids=segment_ids,
               cu_seqlens=cu_seqlens)
