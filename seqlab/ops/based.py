"""Based's linear attention with the split-order state — "Simple linear attention language models balance the
recall-throughput tradeoff" (Arora et al., 2024).

    phi(x) = [1, x / d^(1/4), vec(x xᵀ) / (√2 √d)]       (2nd-order Taylor map; d = q.shape[-1], 16 in Based)
    phi(q)·phi(k) = 1 + s + s²/2,   s = q·k / √d          (always >= 1/2, so the denominator is safe)
    S_t = S_{t-1} + phi(k_t) [v_t, 1]ᵀ,   [num_t, den_t] = S_tᵀ phi(q_t),   o_t = num_t / (den_t + eps)

phi is never materialised. The state keeps the three Taylor orders apart, and the second order only over the
d(d+1)/2 pairs a <= b (the symmetric duplicates a > b folded in), so it has R = 1 + d + d(d+1)/2 rows (153 for
d = 16, against 1 + d + d² = 273 for the full map). State layout [B, H, R, V + 1], float32:

    row 0                          0th order   Σ_t [v_t, 1]
    rows 1 .. d                    1st order   Σ_t k_t[a] / d^(1/4) · [v_t, 1]
    rows 1 + d .. R - 1            2nd order   Σ_t w_ab k_t[a] k_t[b] / (√2 √d) · [v_t, 1],  pairs (a, b) with
                                   a <= b in row-major order (numpy.triu_indices), w_ab = 1 if a = b else 2
    last column (index V)          the normaliser (the key-feature sum z); columns 0 .. V-1 the numerator

so each 2nd-order row is the sum of the full map's rows (a, b) and (b, a), and a query reads it with the unweighted
q[a] q[b] / (√2 √d). Chunk form: intra-chunk weights ((1 + s + s²/2) ⊙ M) from the C×C score matrix directly;
inter-chunk, the queries read and the keys write the state through these compact order features. Built on
``seqlab.core.recurrence`` (additive state, no decay), so every form and the sequence split come from the engine.

eps defaults to 1e-6 as on flash-linear-attention's Based paths; the official HazyResearch/based layer uses 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.core import chunk_math, recurrence
from seqlab.core.recurrence import ChunkTerms, Transition
from seqlab.ops import _common

Array = jax.Array
__all__ = ["based_attn"]


def based_state_rows(feature_dim: int) -> int:
    """Rows of the split-order state for q, k of `feature_dim` features: 1 + d + d(d+1)/2."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


def taylor_order_features(x: Array, *, key: bool) -> Array:
    """The compact Taylor features [..., d] -> [..., 1 + d + d(d+1)/2]: [1, x / d^(1/4), x_a x_b / (√2 √d)] over
    the pairs a <= b, each off-diagonal pair weighted 2 when `key` (the state side), so that
    taylor_order_features(q, key=False) · taylor_order_features(k, key=True) = 1 + s + s²/2."""
    dim = x.shape[-1]
    rows, cols = np.triu_indices(dim)
    pairs = x[..., rows] * x[..., cols] / math.sqrt(2.0 * dim)
    if key:
        pairs = pairs * jnp.asarray(np.where(rows == cols, 1.0, 2.0), x.dtype)
    ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
    return jnp.concatenate([ones, x / dim**0.25, pairs], axis=-1)


def based_chunk_terms(x: Mapping[str, Array]) -> ChunkTerms:
    """Chunk terms for q, k [..., C, d] (raw, float32) and values [..., C, V + 1] (v with a column of ones)."""
    q, k, v = x["q"], x["k"], x["v"]
    scores = jnp.einsum("...ik,...jk->...ij", q, k) / math.sqrt(q.shape[-1])
    weights = jnp.where(chunk_math.visible_pairs(x, q.shape[-2]), 1.0 + scores + 0.5 * scores * scores, 0.0)
    k_write = chunk_math.last_document_rows(x, taylor_order_features(k, key=True))
    no_decay = jnp.zeros((*q.shape[:-2], 1), jnp.float32)
    s_local = jnp.einsum("...cr,...cv->...rv", k_write, v)
    return ChunkTerms(weights @ v, taylor_order_features(q, key=False), Transition(no_decay), s_local)


def based_attn(
    q: Array,
    k: Array,
    v: Array,
    *,
    eps: float = 1e-6,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Based's normalised Taylor linear attention; q, k: [B, T, H, d] (before the feature map); v: [B, T, H, V].

    initial_state: [B, H, 1 + d + d(d+1)/2, V + 1] (layout in the module docstring) or None (zeros), the state
    before each row's first document. segment_ids [B, T] or cu_seqlens [D + 1]: packed documents
    (``seqlab.core.documents``), each starting from a zero state.
    Returns o [B, T, H, V] (dtype of v) and, if ``output_final_state``, the final state (same layout, float32):
    of each row's last document (with cu_seqlens: [D, H, rows, V + 1], one per document).
    """
    _common.check_qkv(q, k, v)
    _common.check_form(impl, chunk_size)
    impl = _common.resolve_impl(impl, has_kernel=False, sequence_axis=sequence_axis, length=q.shape[1])
    starts = _common.packed_documents(q.shape, segment_ids, cu_seqlens, sequence_axis)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    batch, _, heads, dim = q.shape
    shape = (batch, heads, based_state_rows(dim), v.shape[-1] + 1)
    state = _common.initial_state_or_zeros(initial_state, shape)
    values = v.astype(jnp.float32)
    values = jnp.concatenate([values, jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)
    inputs = {"q": q.astype(jnp.float32), "k": k.astype(jnp.float32), "v": values}
    o, final = recurrence.run(based_chunk_terms, inputs, state, impl, chunk_size, sequence_axis, None, starts)
    if output_final_state and cu_seqlens is not None:
        final = _common.document_final_states(based_chunk_terms, inputs, state, chunk_size, starts, cu_seqlens)
    o = o[..., :-1] / (o[..., -1:] + eps)
    return o.astype(v.dtype), (final if output_final_state else None)
