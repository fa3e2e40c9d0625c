"""Combiner — "Combiner: Full Attention Transformer with Sparse Computation Cost" (Ren et al., NeurIPS 2021), the
Combiner-Fixed factorisation (spans of s = ``span`` tokens):

    o_t = [Σ_{u ∈ Ω₀(t)} e^{q_t·k_u/√d} v_u + Σ_{j ∈ R(t)} e^{q_t·k̂_j/√d} v̂_j] / Z_t,
    Z_t = Σ_{u ∈ Ω₀(t)} e^{q_t·k_u/√d} + Σ_{j ∈ R(t)} e^{q_t·k̂_j/√d}
    k̂_j = max_{u ∈ span j} k_u,  q̂_j = max_{u ∈ span j, g} q_{u,g},  v̂_j = Σ_{u ∈ span j} softmax_u(q̂_j·k_u/√d) v_u

(max elementwise; q [B, T, H, d], k, v [B, T, H_kv, d]; g runs over the query heads of a key/value head.) The
direct support Ω₀(t) is t's own span (causal: up to t); every other span j in R(t) (causal: the spans completed
before t's own, j < ⌊t/s⌋) is reached through its abstraction. That is Combiner's structured factorisation
p(u | t) = p(Ω_j | t) · q(u | Ω_j): the region's probability, from its max-pooled key, jointly normalised with the
direct keys, times a local expectation v̂_j that does not depend on t. Every query keeps full support (each key
is reached directly or through its span) at O(T·(s + T/s)) cost, O(T√T) at s = √T.

On the engine: one softmax attention over an extended sequence, the T tokens then one summary slot per span
(keys k̂_j, values v̂_j; the slots' queries see nothing), under ``masks.SpanSummaries``: Z_t is the op's own
normaliser, and every form runs it (blockwise over the mask's tile map, where a query tile reads its span's tiles
and the summary tiles only; parallel; recurrent; the Pallas flash kernel). Sequence parallelism all-gathers the
input (every device needs every span's summary). Packed documents are refused: a span may straddle documents.

Decode cache (`CombinerCache`): the current span's keys and values (a ring of s slots), the abstraction of every
completed span and the running max of the current span's queries: O(s + T/s) keys per head, not O(T). The step
that completes a span computes its abstraction from the ring.

Not the paper's: its Combiner-Fixed also attends directly to the Fixed pattern's stride positions, and it has
Logsparse, Axial and Mixture factorisations; here the direct support is the own span only. RoPE is refused (the
abstractions pool keys across positions).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqlab import ops
from seqlab.checks import check_positive_int
from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.mixers.caches import CombinerCache, KVCache
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention
from seqlab.ops.softmax_attn import default_block_size


def span_abstractions(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, scale: float) -> tuple:
    """Each span's abstraction key and local expectation, from its tokens' q [B, n, s, H_kv, G, d], k, v
    [B, n, s, H_kv, d] (valid [n, s]: which tokens exist): (k̂, v̂ [B, n, H_kv, d] float32)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    tokens = valid[None, :, :, None, None]
    k_hat = jnp.max(jnp.where(tokens, k, -jnp.inf), axis=2)
    q_hat = jnp.max(jnp.where(tokens[..., None], q, -jnp.inf), axis=(2, 4))
    scores = jnp.where(tokens, jnp.einsum("bnhd,bnshd->bnsh", q_hat, k)[..., None] * scale, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=2)
    return k_hat, jnp.sum(weights * v, axis=2)


@register(
    "combiner",
    kind="softmax",
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
    examples={"gqa": dict(num_heads=4, num_kv_heads=2, span=4),
              "bidirectional": dict(num_heads=2, span=3, causal=False)},
)
class CombinerAttention(MaskedAttention):
    """span: the tokens of a span s (each query's direct support; every other span is one abstraction);
    block_size: the op's tile (None: s rounded up to a power of two, at least 16, at most 512)."""

    takes_documents = False
    documents_refused = "a span's abstraction pools tokens that may belong to different documents"

    def __init__(self, d_model: int, num_heads: int, *, span: int = 64, block_size: int | None = None,
                 **kwargs: Any):
        check_positive_int("span", span)
        if kwargs.get("rope"):
            raise ValueError("rope: Combiner's abstractions max-pool keys across positions; rope must be False, got "
                             f"{kwargs['rope']!r}")
        super().__init__(d_model, num_heads, block_size=default_block_size(span) if block_size is None else block_size,
                         **kwargs)
        self.span = span

    def span_mask(self, tokens: int) -> masks.SpanSummaries:
        """The extended sequence's mask for ``tokens`` tokens."""
        return masks.SpanSummaries(self.span, tokens, self.causal)

    def init_cache(self, batch: int, max_len: int) -> CombinerCache:
        self._check_cache_args(batch, max_len)
        dtype = self.dtype or jnp.float32
        summaries = (batch, -(-max_len // self.span), self.num_kv_heads, self.head_dim)
        return CombinerCache(local=KVCache.empty((batch, self.span, self.num_kv_heads, self.head_dim), dtype),
                             summary_k=jnp.zeros(summaries, dtype), summary_v=jnp.zeros(summaries, dtype),
                             span_query=jnp.zeros((batch, self.num_kv_heads, self.head_dim), jnp.float32))

    def _forward(self, x: jax.Array, cache: CombinerCache | None, documents: Documents | None = None):
        if cache is None:
            return self._on_whole_sequence(lambda x: self._combined(x)[0], x), None
        if x.shape[1] == 1:
            return self._step(x, cache)
        return self._prefill(x, cache)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B, T, H, d], k, v [B, T, H_kv, d] of x [B, T, d_model]."""
        q, k = self.queries_keys(x, jnp.arange(x.shape[1]))
        return q, k, self._heads(self.v_proj(x), self.head_dim)

    def _grouped(self, q: jax.Array) -> jax.Array:
        """[..., H, d] -> [..., H_kv, G, d] (query head h = i·G + g)."""
        return q.reshape(*q.shape[:-2], self.num_kv_heads, -1, q.shape[-1])

    def _combined(self, x: jax.Array) -> tuple[jax.Array, tuple]:
        """y [B, T, d_model] of whole rows x, and (q, k, v, k̂, v̂) for a cache."""
        q, k, v = self._qkv(x)
        T, s = x.shape[1], self.span
        n = -(-T // s)
        spans = [jnp.pad(a, ((0, 0), (0, n * s - T)) + ((0, 0),) * (a.ndim - 2)).reshape(a.shape[0], n, s,
                                                                                           *a.shape[2:])
                 for a in (self._grouped(q), k, v)]
        valid = (jnp.arange(n * s) < T).reshape(n, s)
        k_hat, v_hat = span_abstractions(*spans, valid, self.head_dim ** -0.5)
        q_ext = jnp.concatenate([q, jnp.zeros((q.shape[0], n, *q.shape[2:]), q.dtype)], axis=1)
        k_ext, v_ext = (jnp.concatenate([a, b.astype(a.dtype)], axis=1) for a, b in ((k, k_hat), (v, v_hat)))
        o = ops.softmax_attn(q_ext, k_ext, v_ext, mask=self.span_mask(T), impl=self.impl,
                             block_size=self.block_size)[:, :T]
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), (q, k, v, k_hat, v_hat)

    def _prefill(self, x: jax.Array, cache: CombinerCache) -> tuple[jax.Array, CombinerCache]:
        """A prompt into a fresh cache: the training path, then the ring, the completed spans' abstractions and
        the open span's query max."""
        T, s = x.shape[1], self.span
        if T > cache.summary_k.shape[1] * s:
            raise ValueError(f"x: a prompt of {T} tokens does not fit a Combiner cache of "
                             f"{cache.summary_k.shape[1] * s} tokens (max_len rounded up to whole spans)")
        y, (q, k, v, k_hat, v_hat) = self._combined(x)
        done = T // s
        open_queries = self._grouped(q[:, done * s:].astype(jnp.float32))  # [B, T mod s, H_kv, G, d]
        span_query = jnp.max(open_queries, axis=(1, 3)) if T % s else cache.span_query
        return y, cache.replace(
            local=cache.local.write(k, v),
            summary_k=cache.summary_k.at[:, :done].set(k_hat[:, :done].astype(cache.summary_k.dtype)),
            summary_v=cache.summary_v.at[:, :done].set(v_hat[:, :done].astype(cache.summary_v.dtype)),
            span_query=span_query)

    def _step(self, x: jax.Array, cache: CombinerCache) -> tuple[jax.Array, CombinerCache]:
        """One token: write it, close its span if it is the span's last, attend over the span and the summaries."""
        q, k, v = self._qkv(x)
        pos, s = cache.pos, self.span
        query = jnp.max(self._grouped(q[:, 0].astype(jnp.float32)), axis=2)  # [B, H_kv, d]
        span_query = jnp.where(pos % s == 0, query, jnp.maximum(cache.span_query, query))
        cache = cache.replace(local=cache.local.write(k, v), span_query=span_query)
        cache = jax.lax.cond((pos + 1) % s == 0, self._close_span, lambda c: c, cache)
        capacity = cache.summary_k.shape[1] * s
        slots = jnp.arange(cache.summary_k.shape[1], dtype=jnp.int32)
        summary_positions = jnp.where(slots < (pos + 1) // s, capacity + slots, -1)
        o = ops.softmax_decode_step(
            q[:, 0], jnp.concatenate([cache.local.k, cache.summary_k], axis=1),
            jnp.concatenate([cache.local.v, cache.summary_v], axis=1),
            jnp.concatenate([cache.local.key_positions, summary_positions]), pos, mask=self.span_mask(capacity))
        return self.o_proj(self._merge_heads(o[:, None].astype(x.dtype))), cache

    def _close_span(self, cache: CombinerCache) -> CombinerCache:
        """The cache with the just-completed span's abstraction (its s tokens fill the ring, in some order) in its
        slot."""
        k, v = cache.local.k[:, None], cache.local.v[:, None]  # [B, 1, s, H_kv, d]
        q = cache.span_query[:, None, None, :, None]  # its max already: [B, 1, 1, H_kv, 1, d]
        k_hat, v_hat = span_abstractions(q, k, v, jnp.ones((1, self.span), bool), self.head_dim ** -0.5)
        j = (cache.pos - 1) // self.span
        return cache.replace(
            summary_k=jax.lax.dynamic_update_slice_in_dim(cache.summary_k, k_hat.astype(cache.summary_k.dtype), j, 1),
            summary_v=jax.lax.dynamic_update_slice_in_dim(cache.summary_v, v_hat.astype(cache.summary_v.dtype), j, 1))
