"""Causal softmax attention over vector-quantised keys in linear time ("Transformer-VQ: Linear-Time Transformers
via Vector Quantization", Lingle, 2023; the attention of LongVQ).

Every key is replaced by its nearest code of a codebook E [H, S, K] (z_j = argmin_s ‖k_j − e_s‖, k̂_j = e_{z_j}):

    o_t = Σ_{j <= t} exp(q_t·k̂_j · scale) v_j / Σ_{j <= t} exp(q_t·k̂_j · scale)

Keys that share a code share a score, so the keys far behind a query enter through S per-code sums. In blocks of
L = ``block_size`` tokens, a query of block n reads the L keys of block n − 1 and the causal keys of its own block
one by one (the slab), and every older key through the codebook:

    n_s = #{j in blocks <= n − 2 : z_j = s},   m_s = Σ_{j in blocks <= n − 2, z_j = s} v_j / n_s
    o_t = softmax over [ q_t·e_s·scale + log n_s  (s: n_s > 0)  |  q_t·k̂_j·scale  (j in the slab, j <= t) ]
          applied to [ m_s | v_j ]

which is exactly the quadratic form above at cost T·(2L + S) per head. The per-block code counts and value sums
are float32 prefix sums over blocks (a sequence split over devices adds the earlier devices' totals and takes the
previous device's last block as its first slab half, one ppermute).

Gradients: q and v get their exact gradients. Keys are quantised with the straight-through estimator
(k̂ = k + sg(e_z − k), `quantize`), so a key gets its gradient from the queries of its own and the next block,
whose slabs hold it; older queries reach it only through its code's count, which has none (as in Transformer-VQ's
aggregated cache). The codebook gets no gradient (it is learnt by k-means, outside the op).

``vq_attn_step`` decodes one query against a ring of the last 2L keys and the codebook sums (`VQCache` in
``seqlab.mixers.caches`` keeps them) with the same split, so decode and the training form agree in value and
gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import masks
from seqlab.core.halo import key_slabs, previous_segment_tail

Array = jax.Array
__all__ = ["nearest_codes", "quantize", "code_sums", "vq_attn", "vq_attn_step"]


def nearest_codes(k: Array, codebook: Array) -> Array:
    """z [B, T, H] int32: the nearest code (Euclidean) of each key k [B, T, H, K] in codebook [H, S, K]."""
    e = jax.lax.stop_gradient(codebook.astype(jnp.float32))
    # ‖k − e‖² = ‖k‖² − 2 k·e + ‖e‖²: the first term is the same for every code
    distance = jnp.sum(e * e, axis=-1) - 2.0 * jnp.einsum("bthk,hsk->bths", k.astype(jnp.float32), e)
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)


def quantize(k: Array, codebook: Array, codes: Array) -> Array:
    """k̂ [B, T, H, K] float32: the codes' vectors in value, with the straight-through gradient to k."""
    e = jax.lax.stop_gradient(codebook.astype(jnp.float32))
    k = k.astype(jnp.float32)
    chosen = jnp.take_along_axis(e[None, None], codes[..., None, None], axis=3)[..., 0, :]  # [B, T, H, K]
    return k + jax.lax.stop_gradient(chosen - k)


def code_sums(codes: Array, v: Array, num_codes: int) -> Array:
    """[..., H, S, V + 1] float32: Σ v_j and the count (last column) of the tokens with each code, over the
    token axis of codes [..., T, H] and v [..., T, H, V] (codes outside [0, S) count nowhere)."""
    one_hot = jax.nn.one_hot(codes, num_codes, dtype=jnp.float32)
    values = jnp.concatenate([v.astype(jnp.float32), jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)
    return jnp.einsum("...thc,...thv->...hcv", one_hot, values)


def _check(q: Array, k_hat: Array, codes: Array, v: Array, codebook: Array, block_size: int) -> None:
    if q.ndim != 4 or k_hat.shape != q.shape:
        raise ValueError(f"q, k_hat must be [batch, time, heads, key_dim] of one shape, got {q.shape}, {k_hat.shape}")
    if codes.shape != q.shape[:3]:
        raise ValueError(f"codes must be [batch, time, heads] {q.shape[:3]}, got {codes.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, time, heads, value_dim] with (batch, time, heads) = {q.shape[:3]}, "
                         f"got {v.shape}")
    if codebook.ndim != 3 or codebook.shape[0] != q.shape[2] or codebook.shape[2] != q.shape[3]:
        raise ValueError(f"codebook must be [heads, codes, key_dim] with heads {q.shape[2]} and key_dim "
                         f"{q.shape[3]}, got {codebook.shape}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _code_terms(q_scaled: Array, codebook: Array, sums: Array) -> tuple[Array, Array]:
    """The codebook half of the scores and values: logits [..., S] of queries q_scaled [..., H, K] against the
    codes (log-count bias; codes with no token masked) and the per-code mean values [..., H, S, V] of sums
    [..., H, S, V + 1]."""
    count = sums[..., -1]
    e = jax.lax.stop_gradient(codebook.astype(jnp.float32))
    logits = jnp.einsum("...hk,hsk->...hs", q_scaled, e) + jnp.log(jnp.maximum(count, 1.0))
    return masks.masked_fill(logits, count > 0), sums[..., :-1] / jnp.maximum(count, 1.0)[..., None]


def _softmax(logits: Array) -> Array:
    """Max-subtracted softmax over the last axis (masked entries hold masks.MASKED)."""
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return p / jnp.sum(p, axis=-1, keepdims=True)


def vq_attn(
    q: Array, k_hat: Array, codes: Array, v: Array, codebook: Array, *, block_size: int = 64,
    scale: float | None = None, sequence_axis: str | None = None,
) -> Array:
    """Causal attention over quantised keys (module docstring).

    q [B, T, H, K]; k_hat [B, T, H, K] the quantised keys (`quantize`), codes [B, T, H] int32 their codes
    (`nearest_codes`); v [B, T, H, V]; codebook [H, S, K]. scale: default K^-1/2. sequence_axis: a mesh axis of a
    sequence split contiguously over devices (inside shard_map; each device's T a multiple of block_size).
    Returns o [B, T, H, V] in v's dtype.
    """
    _check(q, k_hat, codes, v, codebook, block_size)
    b, t, h, d = q.shape
    lb, num_codes = block_size, codebook.shape[1]
    if sequence_axis is not None and t % lb:
        raise ValueError(f"block_size: a sequence shard of {t} tokens must be a multiple of block_size={lb} on "
                         f"{sequence_axis!r}")
    n = -(-t // lb)
    pad = n * lb - t
    scale = d**-0.5 if scale is None else scale

    def extended(x: Array, fill) -> Array:  # [B, L + n·L, ...]: the block before the segment, x, padding
        x = jnp.concatenate([x, jnp.full((b, pad, *x.shape[2:]), fill, x.dtype)], axis=1)
        if sequence_axis is not None:
            before = previous_segment_tail(x, lb, sequence_axis)
            if fill:  # the first device has no block before it: no codes there
                first = jax.lax.axis_index(sequence_axis) == 0
                before = jnp.where(first, fill, before)
        else:
            before = jnp.full((b, lb, *x.shape[2:]), fill, x.dtype)
        return jnp.concatenate([before, x], axis=1)

    k_ext, v_ext = extended(k_hat.astype(jnp.float32), 0.0), extended(v.astype(jnp.float32), 0.0)
    z_ext = extended(codes, num_codes)  # num_codes: no token
    block_sums = code_sums(z_ext.reshape(b, n + 1, lb, h), v_ext.reshape(b, n + 1, lb, h, -1), num_codes)
    # The segment's block m is extended block m + 1; it reads blocks <= m − 2 through the codebook: the segment's
    # own ones are extended blocks 1 .. m − 1, the Σ over e < m less the halo (extended 0, zero on one device). On
    # a split sequence the earlier devices' totals add every block before the segment, the halo included, which
    # is right for m >= 1; at m = 0 the halo is in the slab, and the subtraction leaves it out.
    before = (jnp.cumsum(block_sums, axis=1) - block_sums)[:, :n] - block_sums[:, :1]  # [B, n, H, S, V + 1]
    if sequence_axis is not None:
        before = before + _earlier_devices(block_sums[:, 1:].sum(axis=1), sequence_axis)[:, None]
    queries = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, n, lb, h, d) * scale
    code_logits, code_values = _code_terms(queries, codebook, before[:, :, None])  # [B, n, L, H, S], [B, n, 1, H, S, V]
    slab_logits = jnp.einsum("bnihk,bnjhk->bnihj", queries, key_slabs(k_ext, n, lb, back=1))
    slab_codes = key_slabs(z_ext, n, lb, back=1)  # [B, n, 2L, H]
    causal = jnp.arange(2 * lb)[None, :] <= jnp.arange(lb)[:, None] + lb  # [L, 2L]: key j of the slab, query i
    visible = causal[None, None, :, None, :] & (jnp.swapaxes(slab_codes, 2, 3)[:, :, None] < num_codes)
    p = _softmax(jnp.concatenate([code_logits, masks.masked_fill(slab_logits, visible)], axis=-1))
    o = jnp.einsum("bnihs,bnhsv->bnihv", p[..., :num_codes], code_values[:, :, 0])
    o = o + jnp.einsum("bnihj,bnjhv->bnihv", p[..., num_codes:], key_slabs(v_ext, n, lb, back=1))
    return o.reshape(b, n * lb, h, v.shape[-1])[:, :t].astype(v.dtype)


def _earlier_devices(totals: Array, sequence_axis: str) -> Array:
    """Σ of `totals` [B, ...] over the devices before this one along `sequence_axis`."""
    gathered = jax.lax.all_gather(totals, sequence_axis)  # [N, B, ...]
    earlier = jnp.arange(gathered.shape[0]) < jax.lax.axis_index(sequence_axis)
    return jnp.tensordot(earlier.astype(gathered.dtype), gathered, axes=1)


def vq_attn_step(
    q: Array, ring_k: Array, ring_v: Array, key_positions: Array, codebook: Array, sums: Array, pos: Array,
    *, block_size: int, scale: float | None = None,
) -> Array:
    """One decode query q [B, H, K] at position `pos` (block n = pos // block_size) -> o [B, H, V] in ring_v's dtype.

    ring_k, ring_v: [B, R, H, K] / [B, R, H, V] the quantised keys and values of the last R >= 2·block_size
    positions, this one included (key_positions [R], -1 = empty); sums [B, H, S, V + 1]: `code_sums` of the
    positions before block n − 1. The ring's keys of blocks n − 1 and n are read one by one, the rest through the
    codebook, as in `vq_attn`.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_scaled = q.astype(jnp.float32) * scale
    code_logits, code_values = _code_terms(q_scaled, codebook, sums)  # [B, H, S], [B, H, S, V]
    slab_logits = jnp.einsum("bhk,brhk->bhr", q_scaled, ring_k.astype(jnp.float32))
    slab_start = (pos // block_size - 1) * block_size
    visible = (key_positions >= jnp.maximum(slab_start, 0)) & (key_positions <= pos)
    p = _softmax(jnp.concatenate([code_logits, masks.masked_fill(slab_logits, visible)], axis=-1))
    num_codes = codebook.shape[1]
    o = jnp.einsum("bhs,bhsv->bhv", p[..., :num_codes], code_values)
    o = o + jnp.einsum("bhr,brhv->bhv", p[..., num_codes:], ring_v.astype(jnp.float32))
    return o.astype(ring_v.dtype)
