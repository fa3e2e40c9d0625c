"""Multi-query self-attention — "Collaboration and Transition: Distilling Item Transitions into Multi-Query
Self-Attention for Sequential Recommendation" (Zhu, Xu and Ng, WSDM 2024, MQSA-TED): causal softmax attention whose
query at t pools the window of the last L items, a long-query and a short-query attention mixed.

    q_s = x_s W_q,   k_s = x_s W_k,   v_s = x_s W_v                       (per head: [B, T, H, d])
    q̄^L_t = (1 / n^L_t) Σ_{t − L < s <= t} q_s,     n^L_t = |{s : t − L < s <= t, s >= 0}|  (fewer at the start)
    o^L_t = Σ_{s <= t} softmax_s(q̄^L_t · k_s / √d) v_s
    y_t = (α o^{L_long}_t + (1 − α) o^{L_short}_t) W_o

L = 1 is ordinary self-attention (SASRec's single-item query). From the paper (its abstract): the L-query
self-attention, whose query is built from a window of items instead of one, and the multi-query attention that
combines a long-query and a short-query self-attention to balance bias and variance. Our reading, where we could
not confirm the paper's text: the window is mean-pooled (over the items of the window that exist: at the start of
the sequence, and of each document of a packed row, n^L_t < L); both queries share W_q and both attentions share
the keys and values; the two are mixed convexly by a fixed hyper-parameter α (default 0.5, before W_o, which is
the same as after it); the defaults long_window=4, short_window=1. The mixer adds no positions (SASRec-style
recommenders add learned position embeddings to their input); with ``rope=True`` RoPE rotates each q_s at its own
position before pooling, so q̄^L_t · k_s is the window's mean relative score. TED (transition-aware embedding
distillation) is a training objective on item embeddings and is not part of the mixer.

On the engine: one fixed-weight causal convolution (`ShortConv` with a `FixedVector` of ones on each window's last
L taps) sums [q_s, 1] over both windows, giving the sums and the counts n^L_t; it restarts at document starts and
takes its halo of L_long − 1 inputs from the previous device on a split sequence. The two pooled queries of head h
are query heads 2h and 2h + 1 over h's key/value head (GQA), one ``ops.softmax_attn`` pass under ``Causal()`` in
every form, packed rows (segment ids) and sequence parallelism (all-gather or ring). The other arguments are
`SoftmaxAttention`'s (num_kv_heads, head_dim, rope, block_size, sequence_parallel, impl; window: an attention
window on the keys, t − w < s <= t, not the paper's).

Decode cache (`MultiQueryCache`): the `KVCache` of the keys and values and the pooling convolution's last
L_long − 1 inputs, so decode from any prompt, shorter than the window too, equals the forward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_fraction, check_positive_int
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv
from seqlab.layers.lrpe import FixedVector
from seqlab.mixers.caches import MultiQueryCache
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention


@register(
    "mqsa",
    kind="softmax",
    paper="Collaboration and Transition: Distilling Item Transitions into Multi-Query Self-Attention for Sequential "
    "Recommendation",
    examples={"windows": dict(num_heads=2, long_window=3, short_window=1),
              "gqa_rope": dict(num_heads=4, num_kv_heads=2, long_window=5, short_window=2, alpha=0.3, rope=True)},
)
class MultiQuerySelfAttention(SoftmaxAttention):
    """Causal softmax attention with window-pooled queries (module docstring): long_window, short_window: the
    windows L_long >= L_short of the two queries; alpha: α, the long-query attention's share of the output."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        long_window: int = 4,
        short_window: int = 1,
        alpha: float = 0.5,
        rope: bool = False,
        rngs: nnx.Rngs | None = None,
        **kwargs: Any,
    ):
        check_positive_int("long_window", long_window)
        check_positive_int("short_window", short_window)
        if short_window > long_window:
            raise ValueError(f"short_window must be at most long_window={long_window}, got {short_window}")
        check_fraction("alpha", alpha)
        rngs = self._rngs(rngs)
        super().__init__(d_model, num_heads, rope=rope, rngs=rngs, **kwargs)
        self.long_window, self.short_window, self.alpha = long_window, short_window, alpha
        width = self.num_heads * self.head_dim + 1  # the queries and a count channel, once per window
        self.query_pool = ShortConv(2 * width, kernel_size=long_window, activation=None, rngs=rngs, dtype=self.dtype)
        reach = jnp.repeat(jnp.asarray([long_window, short_window]), width)  # [2 width]: each channel's window L
        taps = jnp.arange(long_window)[:, None] >= long_window - reach  # tap i reads input t − L_long + 1 + i
        self.query_pool.weight = FixedVector(taps.astype(jnp.float32))  # [L_long, 2 width], not trained

    def init_cache(self, batch: int, max_len: int) -> MultiQueryCache:
        kv = super().init_cache(batch, max_len)
        return MultiQueryCache(k=kv.k, v=kv.v, key_positions=kv.key_positions, pos=kv.pos,
                               window=self.query_pool.init_state(batch))

    def _forward(self, x: jax.Array, cache: MultiQueryCache | None, documents: Documents | None = None):
        q, k, v, cache = self._queries_keys_values(x, cache, documents)
        q, window = self.pooled_queries(q, None if cache is None else cache.window, documents)
        o = self._attend(q, k, v, cache, documents, self.score_mod())  # [B, T, 2H, d]
        o = o.reshape(*o.shape[:2], self.num_heads, 2, self.head_dim)
        o = self.alpha * o[..., 0, :] + (1 - self.alpha) * o[..., 1, :]
        cache = None if cache is None else cache.replace(window=window)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def pooled_queries(self, q: jax.Array, window: jax.Array | None,
                       documents: Documents | None) -> tuple[jax.Array, jax.Array]:
        """q [B, T, H, d] and the pool's state (None: the training path) -> (the window means [B, T, 2H, d], query
        head 2h the long and 2h + 1 the short window of head h; the pool's new state [B, L_long − 1, 2 (H d + 1)])."""
        B, T, H, d = q.shape
        flat = jnp.concatenate([q.reshape(B, T, H * d), jnp.ones((B, T, 1), q.dtype)], axis=-1)
        sums, window = self.query_pool(jnp.tile(flat, 2), window, documents)
        sums = sums.reshape(B, T, 2, H * d + 1).astype(jnp.float32)
        means = (sums[..., :-1] / sums[..., -1:]).astype(q.dtype)  # [B, T, 2, H d]
        return jnp.swapaxes(means.reshape(B, T, 2, H, d), 2, 3).reshape(B, T, 2 * H, d), window
