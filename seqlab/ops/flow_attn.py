"""Flow-Attention — "Flowformer: Linearizing Transformers with Conservation Flows" (Wu et al., ICML 2022).

Inputs are the non-negative feature maps φq, φk [B, T, H, K] (Flowformer uses φ = sigmoid) and v [B, T, H, V];
ε = 1e-6 as in the official code (thuml/Flowformer `Flow_Attention.py`), which adds ε where written below.

Non-causal (N = M = T tokens; sums over all tokens):
    incoming  I_i = 1 / ((φq_i + ε) · (Σ_j φk_j + ε))        outgoing  O_j = 1 / ((φk_j + ε) · (Σ_i φq_i + ε))
    sink      Î_i = (φq_i + ε) · (Σ_j φk_j O_j + ε)          source    Ô_j = clamp((φk_j + ε) · (Σ_i φq_i I_i + ε), ±1)
    allocation a_i = σ(Î_i · N/M) = σ(Î_i)                    competition c_j = softmax_j(Ô_j) · M
    o_i = a_i · (φq_i I_i)ᵀ Σ_j φk_j (c_j v_j)ᵀ

Causal (t 1-based; every Σ is a prefix sum up to t; the official code's approximation of the conservation):
    I_t = t / ((φq_t + ε) · (Σ φk_j + ε))                    O_t = t / ((φk_t + ε) · (Σ φq_i + ε))
    Î_t = (φq_t + ε) · (Σ φk_j O_j + ε) / t                  Ô_t = clamp((φk_t + ε) · (Σ φq_i I_i + ε) / t, ±1)
    a_t = σ(Î_t)                                             c_t = t · e^{Ô_t} / Σ_{j<=t} e^{Ô_j}
    o_t = a_t · (φq_t I_t / t)ᵀ S_t,                          S_t = S_{t-1} + φk_t (c_t v_t)ᵀ

c_t is final at time t, so the causal form is a single causal pass: five vector prefix sums (float32 cumsums,
carried in `FlowState`) and the matrix state S, which runs on `linear_attn` (normalize=False, scale 1) in any of
its forms. Ô is clamped to [-1, 1], so e^{Ô} needs no max-subtraction.

On a sequence split over devices (`sequence_axis`, inside shard_map) the causal prefix sums add the totals of the
earlier segments (one all-gather of [B, H, K] or [B, H] totals per prefix sum) and `linear_attn` exchanges its
state summaries; the non-causal sums are psums.

Packed rows (causal, ``segment_ids``): every prefix sum and t restart at each document
(``seqlab.core.documents.document_scan``) and S restarts in `linear_attn`, so each document flows alone.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqlab.core import documents
from seqlab.ops import _common
from seqlab.ops.linear_attn import linear_attn

Array = jax.Array
__all__ = ["flow_attn"]


class FlowState(NamedTuple):
    """Prefix sums of causal Flow-Attention after some tokens (all float32).

    k_sum, q_sum: [B, H, K]  Σ φk_j, Σ φq_i.
    k_flow, q_flow: [B, H, K]  Σ φk_j O_j, Σ φq_i I_i.
    source_sum: [B, H]  Σ e^{Ô_j}.
    kv: [B, H, K, V]  S = Σ φk_j (c_j v_j)ᵀ.
    """

    k_sum: Array
    q_sum: Array
    k_flow: Array
    q_flow: Array
    source_sum: Array
    kv: Array

    @classmethod
    def zeros(cls, batch: int, heads: int, key_dim: int, value_dim: int) -> FlowState:
        """The state before the first token."""
        vec = jnp.zeros((batch, heads, key_dim), jnp.float32)
        kv = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
        return cls(vec, vec, vec, vec, jnp.zeros((batch, heads), jnp.float32), kv)


def flow_attn(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = True,
    eps: float = 1e-6,
    offset: int | Array = 0,
    initial_state: FlowState | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, FlowState | None]:
    """Flow-Attention on feature-mapped q, k [B, T, H, K] (non-negative) and v [B, T, H, V].

    causal=True: `offset` tokens precede this call (the first token is t = offset + 1) with prefix sums
    `initial_state`; impl / chunk_size pick the form of the S part. segment_ids [B, T] (causal only): packed
    documents, each from zero prefix sums (`offset` and `initial_state` belong to the row's first document).
    Returns o [B, T, H, V] (dtype of v) and, if `output_final_state`, the FlowState after the last token (of the
    last document). causal=False: one bidirectional pass (no state).
    """
    _common.check_qkv(q, k, v)
    _common.check_form(impl, chunk_size)
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if sequence_axis is not None and (initial_state is not None or output_final_state):
        raise ValueError("sequence_axis: a sequence split over devices runs the training path only "
                         "(no initial_state, no output_final_state)")  # fmt: skip
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    if not causal:
        if initial_state is not None or output_final_state:
            raise ValueError("initial_state / output_final_state: non-causal Flow-Attention has no recurrent state")
        if segment_ids is not None:
            raise ValueError("segment_ids: packed documents need causal=True")
        return _bidirectional(q32, k32, v32, eps, sequence_axis).astype(v.dtype), None
    batch, _, heads, key_dim = q.shape
    if initial_state is None:
        initial_state = FlowState.zeros(batch, heads, key_dim, v.shape[-1])
    starts = None
    if segment_ids is not None:
        segment_ids = documents.check_segment_ids(segment_ids, batch, q.shape[1])
        starts = documents.document_starts(segment_ids, sequence_axis)
    o, final = _causal(q32, k32, v32, eps, offset, initial_state, output_final_state, impl, chunk_size, sequence_axis,
                       segment_ids, starts)  # fmt: skip
    return o.astype(v.dtype), final


def _dot(a: Array, b: Array) -> Array:
    """Σ_k a[..., k] b[..., k]: [B, T, H, K] x [B, T or 1, H, K] -> [B, T, H]."""
    return jnp.sum(a * b, axis=-1)


def _causal(q, k, v, eps, offset, state: FlowState, output_final_state, impl, chunk_size, sequence_axis,
            segment_ids: Array | None, starts: Array | None):
    """The causal form on float32 inputs; returns o [B, T, H, V] float32 and the final FlowState or None."""
    length = q.shape[1]
    if starts is None:
        start = offset if sequence_axis is None else offset + jax.lax.axis_index(sequence_axis) * length
        t = (start + jnp.arange(1, length + 1)).astype(jnp.float32)[None, :, None]  # [1, T, 1]
    else:  # 1, 2, ... within each document; the row's first document continues from offset
        ones = jnp.ones(q.shape[:2] + (1,), jnp.float32)
        first = jnp.full((q.shape[0], 1), offset, jnp.float32)
        t = documents.document_scan(ones, starts, jnp.add, 0.0, sequence_axis, first)  # [B, T, 1]

    def prefix_sum(x: Array, carry: Array) -> Array:
        if starts is None:
            return _prefix_sum(x, carry, sequence_axis)
        return documents.document_scan(x, starts, jnp.add, 0.0, sequence_axis, carry)

    k_sum = prefix_sum(k, state.k_sum)
    q_sum = prefix_sum(q, state.q_sum)
    incoming = t / _dot(q + eps, k_sum + eps)  # [B, T, H]
    outgoing = t / _dot(k + eps, q_sum + eps)
    k_flow = prefix_sum(k * outgoing[..., None], state.k_flow)
    q_flow = prefix_sum(q * incoming[..., None], state.q_flow)
    sink = _dot(q + eps, k_flow + eps) / t
    source = jnp.clip(_dot(k + eps, q_flow + eps) / t, -1.0, 1.0)
    exp_source = jnp.exp(source)
    source_sum = prefix_sum(exp_source, state.source_sum)
    competition = t * exp_source / source_sum
    o, kv = linear_attn(
        q * (incoming / t)[..., None], k, v * competition[..., None], scale=1.0, normalize=False,
        initial_state=state.kv, output_final_state=output_final_state,
        impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis, segment_ids=segment_ids,
    )  # fmt: skip
    o = jax.nn.sigmoid(sink)[..., None] * o
    if not output_final_state:
        return o, None
    last = [a[:, -1] for a in (k_sum, q_sum, k_flow, q_flow, source_sum)]
    return o, FlowState(*last, kv)


def _prefix_sum(x: Array, carry: Array, sequence_axis: str | None) -> Array:
    """Inclusive float32 cumsum over time of x [B, T, ...] starting from carry [B, ...] plus, on a split sequence,
    the totals of the segments on the devices before this one (one all-gather)."""
    if sequence_axis is not None:
        totals = jax.lax.all_gather(jnp.sum(x, axis=1), sequence_axis)  # [P, B, ...]
        earlier = jnp.arange(totals.shape[0]) < jax.lax.axis_index(sequence_axis)
        carry = carry + jnp.einsum("p,p...->...", earlier.astype(jnp.float32), totals)
    return carry[:, None] + jnp.cumsum(x, axis=1)


def _bidirectional(q, k, v, eps, sequence_axis):
    """The non-causal form on float32 inputs: o [B, T, H, V] float32."""

    def total(x: Array) -> Array:  # Σ over all tokens of the (split) sequence, keeping a time axis of 1
        s = jnp.sum(x, axis=1, keepdims=True)
        return s if sequence_axis is None else jax.lax.psum(s, sequence_axis)

    num_tokens = q.shape[1] if sequence_axis is None else q.shape[1] * jax.lax.axis_size(sequence_axis)
    incoming = 1.0 / _dot(q + eps, total(k) + eps)  # [B, T, H]
    outgoing = 1.0 / _dot(k + eps, total(q) + eps)
    sink = _dot(q + eps, total(k * outgoing[..., None]) + eps)
    source = jnp.clip(_dot(k + eps, total(q * incoming[..., None]) + eps), -1.0, 1.0)
    exp_source = jnp.exp(source)
    competition = num_tokens * exp_source / total(exp_source)
    kv = jnp.einsum("bthk,bthv->bhkv", k, v * competition[..., None])
    if sequence_axis is not None:
        kv = jax.lax.psum(kv, sequence_axis)
    o = jnp.einsum("bthk,bhkv->bthv", q * incoming[..., None], kv)
    return jax.nn.sigmoid(sink)[..., None] * o
