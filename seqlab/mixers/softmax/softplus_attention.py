"""Softplus attention with length scaling and re-weighting (LSSA / LSSAR) — "Softplus Attention with Re-weighting
Boosts Length Extrapolation in Large Language Models" (Gao & Spratling, 2025).

    a_ij = softplus(κ_i s_ij) / Σ_{j' <= i} softplus(κ_i s_ij'),   s_ij = q_i·k_j / √d,   κ_i = log n_i / log L

Softmax is a positive map followed by an ℓ1 row normalisation; the paper keeps the normalisation and replaces
exp with softplus, scaled by a length factor κ_i from invariance entropy (n_i = p_i + 1 visible keys, L =
``length_base``; κ_i = 1 for ``length_base=None``). Here softplus(x) = exp(log softplus(x)), so LSSA is softmax
attention with the score rewrite ``log softplus`` (an elementwise score_mod) and κ_i folded into q: every form of
the softmax op, its masks, decode cache and sequence parallelism apply, and the float32 running max keeps the sums
bounded. Re-weighting (LSSAR, applied at inference without retraining): w_ij = (n_i a_ij)^p where n_i a_ij >= 1
(at or above the uniform weight), 0 below, renormalised — a second pass over the row's normaliser, computed
densely here (O(T²) scores; no sequence parallelism). The exact κ and re-weighting formulas are reconstructed from
the paper's description, not from its code (unavailable): κ = log_L n and w = (n a)^p·[n a >= 1] are this
implementation's reading.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.mixers.caches import KVCache
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention

UNIFORM_TOLERANCE = 1e-5  # LSSAR keeps weights with n·a >= 1 − this (n·a of a lone key rounds to 1 − 2^-24)
_LINEAR_BELOW = -30.0  # log softplus(x) = x + log1p(-e^x / 2 ...) ≈ x below this (error < e^-30)


def log_softplus(x: jax.Array) -> jax.Array:
    """log(softplus(x)), finite for every finite x (≈ x far below 0)."""
    return jnp.where(x < _LINEAR_BELOW, x, jnp.log(jax.nn.softplus(jnp.maximum(x, _LINEAR_BELOW))))


def softplus_scores(scores: jax.Array, q_idx: jax.Array, k_idx: jax.Array, head: jax.Array) -> jax.Array:
    """The score_mod of softplus attention: scores -> log softplus(scores) (exp of it is softplus)."""
    return log_softplus(scores)


@register(
    "softplus_attn",
    kind="softmax",
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
    examples={"lssa": dict(num_heads=2, length_base=16.0), "lssar": dict(num_heads=2, reweight_power=3.0)},
)
class SoftplusAttention(SoftmaxAttention):
    """length_base L of κ_i = log n_i / log L (None: κ = 1, plain softplus attention); reweight_power p (None: LSSA,
    a number: LSSAR). Other arguments: `SoftmaxAttention`'s (RoPE, GQA, window, block size)."""

    takes_documents = True

    def __init__(self, d_model: int, num_heads: int, *, length_base: float | None = 512.0,
                 reweight_power: float | None = None, **kwargs: Any):
        for name, value in (("length_base", length_base), ("reweight_power", reweight_power)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
                                      or (name == "length_base" and value <= 1)):
                least = "> 1" if name == "length_base" else "> 0"
                raise ValueError(f"{name} must be None or a number {least}, got {value!r}")
        super().__init__(d_model, num_heads, **kwargs)
        self.length_base, self.reweight_power = length_base, reweight_power

    def length_scale(self, pos: jax.Array) -> jax.Array:
        """κ at positions pos [T] or [B, T] (n = pos + 1 visible keys), float32."""
        if self.length_base is None:
            return jnp.ones(jnp.shape(pos), jnp.float32)
        return jnp.log1p(pos.astype(jnp.float32)) / jnp.log(jnp.float32(self.length_base))

    def queries_keys(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, H, d] (RoPE, then κ) and k [B, T, H_kv, d] of x [B, T, d_model] at positions pos."""
        q, k = super().queries_keys(x, pos)
        return (q.astype(jnp.float32) * self.length_scale(pos)[..., None, None]).astype(q.dtype), k

    def score_mod(self) -> masks.ScoreMod:
        return softplus_scores

    def _forward(self, x: jax.Array, cache: KVCache | None, documents: Documents | None = None):
        if self.reweight_power is None:
            return super()._forward(x, cache, documents)
        if cache is None and self.sequence_axis is not None:
            raise ValueError("reweight_power: LSSAR's dense re-weighting has no sequence-parallel form; shard LSSA "
                             "(reweight_power=None) or run LSSAR on whole sequences")
        T = x.shape[1]
        q, k, v, cache = self._queries_keys_values(x, cache, documents)
        if cache is not None and T == 1:
            k_all, v_all, key_pos, q_pos = cache.k, cache.v, cache.key_positions, cache.pos - 1 + jnp.zeros(1, int)
        else:
            k_all, v_all, key_pos, q_pos = k, v, jnp.arange(T), jnp.arange(T)
        segments = None if documents is None else documents.segment_ids
        o = self.reweighted(q, k_all, v_all, q_pos, key_pos, segments)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def reweighted(self, q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                   segment_ids: jax.Array | None) -> jax.Array:
        """LSSAR: q [B, Tq, H, d] at positions q_pos [Tq] against k, v [B, Tk, H_kv, d] at k_pos [Tk] (-1: empty
        slot) under this layer's mask (and documents: segment_ids [B, T], Tq = Tk) -> o [B, Tq, H, d]."""
        group = self.num_heads // self.num_kv_heads
        qg = q.astype(jnp.float32).reshape(*q.shape[:2], self.num_kv_heads, group, -1).transpose(0, 2, 3, 1, 4)
        kt, vt = (a.astype(jnp.float32).transpose(0, 2, 1, 3) for a in (k, v))
        scores = jnp.einsum("bhgqd,bhkd->bhgqk", qg * self.head_dim**-0.5, kt)
        mask, segments = self.attention_mask(), None
        if segment_ids is not None:
            mask, segments = mask & masks.Document(), (segment_ids, segment_ids)
        visible = masks.head_pairwise(mask, self.num_kv_heads, group, q_pos, k_pos, segments=segments)
        weights = jnp.where(visible, jax.nn.softplus(scores), 0.0)
        count = jnp.sum(visible, axis=-1, keepdims=True)  # n_i, the keys the query sees
        total = jnp.sum(weights, axis=-1, keepdims=True)
        ratio = count * weights / jnp.where(total > 0, total, 1.0)  # n_i a_ij: 1 is the uniform weight
        top = jnp.max(ratio, axis=-1, keepdims=True)  # (ratio / top)^p renormalises to the same weights, <= 1
        kept = ratio >= 1.0 - UNIFORM_TOLERANCE  # the uniform weight itself survives float32 rounding
        sharpened = jnp.where(kept, ratio / jnp.where(top > 0, top, 1.0), 0.0) ** self.reweight_power
        norm = jnp.sum(sharpened, axis=-1, keepdims=True)
        o = jnp.einsum("bhgqk,bhkd->bhgqd", sharpened / jnp.where(norm > 0, norm, 1.0), vt)
        return o.transpose(0, 3, 1, 2, 4).reshape(*q.shape[:2], self.num_heads, -1)
