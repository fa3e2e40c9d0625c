"""Routing Transformer — "Efficient Content-Based Sparse Attention with Routing Transformers" (Roy et al., TACL
2021): causal attention within content clusters (routing heads) mixed with local window heads, shared QK.

    q_t = x_t W_q (per head, [B, T, H, d]),  k_t = q_t / ‖q_t‖,  v_t = x_t W_v
    routing head h:  c_t = argmax_c μ_{h,c}·k_t      (μ_h [C, d]: unit-norm centroids, no gradient)
                     o_t = Σ_{s <= t, c_s = c_t} softmax_s(σ_ts) v_s
    local head h:    o_t = Σ_{t − W < s <= t} softmax_s(σ_ts) v_s
    σ_ts = q_t·k_s / √d for s ≠ t;  σ_tt = SELF_SCORE  (a self-match counts only when nothing else is visible)
    online k-means (train mode): μ_c ← normalise(λ μ_c + (1 − λ) normalise(Σ_{t: c_t = c} k_t)),  λ = 0.999
    commitment loss (train mode):   β · mean_{t, h, i} (k_t − sg(μ_{c_t}))_i²,  β = 1e-4

The first ``local_heads`` heads are local, the others route; the output concatenates the heads through W_o.
Keys are the normalised queries (shared QK, which routes a query and the keys it may see with one assignment),
so q_t·k_t = ‖q_t‖ would dominate its own row: the self score is pushed down (a score_mod).

On the engine: the routing heads are folded into the batch, each head's clusters its segment ids, under
``Causal() & Document()``; the local heads run ``Causal(window)``; both are ``ops.softmax_attn`` in every form,
the decode step against the cache (`RoutingCache`: a full KV cache and each slot's cluster per routing head) and
sequence parallelism (the op's, with the clusters as this device's segment ids; the k-means sums are psum-ed).
The centroids are an ``nnx.BatchStat``: frozen while ``use_running_average`` (the default, and eval mode), updated
by each training-path call otherwise, which the launcher carries between steps like BatchNorm statistics (on one
device; model.eval() freezes them).

Not the paper's: it routes queries and keys to the top-w of each cluster (balanced clusters of w = T / C tokens,
O(T^1.5) work, a sorted gather and scatter); that choice ranks each cluster's members over the whole sequence,
so a token's output would depend on later tokens' scores, and here each token goes to its nearest centroid
instead (clusters of any size, exactly causal, decode = forward). The blockwise op visits every causal tile (the
clusters are runtime segment ids), so the work is that of causal attention; what routing changes is which keys
each query sees. The commitment loss, with the centroids the tokens were routed by, is added through
``seqlab.mixers.aux_losses`` ("routing_commitment") by every call that updates the centroids; the launcher adds it
to the task loss, so it pulls the keys (hence W_q) towards their centroids.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import (check_fraction, check_nonnegative, check_optional_positive_int, check_positive_int,
                           resolve_dim)
from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.layers.conv import fold_heads, unfold_heads
from seqlab.layers.norms import l2_normalize
from seqlab.mixers import aux_losses
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RoutingCache
from seqlab.mixers.registry import register

SELF_SCORE = -5e4  # a token's score against itself: any other visible key outweighs it


def self_match_pushed_down(scores: jax.Array, q_idx: jax.Array, k_idx: jax.Array, head: jax.Array) -> jax.Array:
    """score_mod: σ_tt = SELF_SCORE, every other score as it is."""
    return jnp.where(q_idx == k_idx, SELF_SCORE, scores)


def heads_as_rows(x: jax.Array) -> jax.Array:
    """[B, T, H, d] -> [B·H, T, 1, d]: each head a one-head batch row (row b·H + h)."""
    return fold_heads(x)[:, :, None]


@register(
    "routing",
    kind="softmax",
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    examples={"mixed": dict(num_heads=4, local_heads=2, num_clusters=3, window=4),
              "all_routing": dict(num_heads=2, local_heads=0, num_clusters=2)},
)
class RoutingAttention(Mixer):
    """num_clusters: C centroids per routing head; local_heads: heads attending to a causal window of ``window``
    tokens (the rest route); centroid_decay: λ of the online k-means; use_running_average: freeze the centroids
    (True: the default and eval mode; False: train mode updates them); commitment: β of the commitment loss (0:
    none)."""

    documents_refused = "its clusters are the segment ids of the routed attention"
    single_device_state = "its k-means centroids"

    def __init__(self, d_model: int, num_heads: int, *, num_clusters: int = 4, local_heads: int | None = None,
                 window: int = 64, centroid_decay: float = 0.999, use_running_average: bool = True,
                 commitment: float = 1e-4, head_dim: int | None = None, impl: str = "auto",
                 block_size: int | None = None, rngs: nnx.Rngs | None = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32):
        check_positive_int("num_clusters", num_clusters)
        check_positive_int("window", window)
        check_fraction("centroid_decay", centroid_decay)
        check_nonnegative("commitment", commitment)
        check_optional_positive_int("block_size", block_size)
        if impl == "pallas":
            raise ValueError("impl: 'pallas' is not available for routing (its self-score rule is a score_mod, which "
                             "the Pallas kernel does not take); use 'auto', 'chunked' or 'parallel'")
        local_heads = num_heads // 2 if local_heads is None else local_heads
        if not isinstance(local_heads, int) or not 0 <= local_heads < num_heads:
            raise ValueError(f"local_heads must be an int in [0, num_heads={num_heads}) (at least one head routes), "
                             f"got {local_heads!r}")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        self.local_heads, self.window, self.decay = local_heads, window, centroid_decay
        self.block_size, self.use_running_average, self.commitment = block_size, use_running_average, commitment
        width = num_heads * self.head_dim
        self.q_proj = self._linear(d_model, width, rngs)
        self.v_proj = self._linear(d_model, width, rngs)
        self.o_proj = self._linear(width, d_model, rngs)
        centroids = jax.random.normal(rngs.params(), (num_heads - local_heads, num_clusters, self.head_dim))
        self.centroids = nnx.BatchStat(l2_normalize(centroids))  # μ [H_r, C, d] float32

    def init_cache(self, batch: int, max_len: int) -> RoutingCache:
        self._check_cache_args(batch, max_len)
        shape = (batch, max_len, self.num_heads, self.head_dim)
        dtype = self.dtype or jnp.float32
        kv = RoutingCache.empty(shape, dtype)
        return kv.replace(clusters=jnp.zeros((batch, max_len, self.num_heads - self.local_heads), jnp.int32))

    def _forward(self, x: jax.Array, cache: RoutingCache | None, documents: Documents | None = None):
        q = self._heads(self.q_proj(x), self.head_dim)
        k = l2_normalize(q.astype(jnp.float32)).astype(q.dtype)
        v = self._heads(self.v_proj(x), self.head_dim)
        clusters = self.route(k[:, :, self.local_heads:])
        if cache is None and not self.use_running_average:
            self._add_commitment_loss(k[:, :, self.local_heads:], clusters)
            self._update_centroids(k[:, :, self.local_heads:], clusters)
        if cache is not None:
            cache = cache.write_routed(k, v, clusters)
        if cache is not None and x.shape[1] == 1:
            o = self._decode(q[:, 0], clusters[:, 0], cache)[:, None]
        else:
            o = self._attend(q, k, v, clusters, None if cache is not None else self.sequence_axis)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def route(self, k: jax.Array) -> jax.Array:
        """The nearest centroid c_t [B, T, H_r] int32 of the routing heads' keys k [B, T, H_r, d]."""
        similarity = jnp.einsum("bthd,hcd->bthc", k.astype(jnp.float32), jax.lax.stop_gradient(self.centroids[...]))
        return jnp.argmax(similarity, axis=-1).astype(jnp.int32)

    def _add_commitment_loss(self, k: jax.Array, clusters: jax.Array) -> None:
        """β · the mean squared distance of the routing heads' keys k [B, T, H_r, d] to their centroids (none for
        β = 0)."""
        if not self.commitment:
            return
        centroids = jax.lax.stop_gradient(self.centroids[...])
        routed_to = jnp.einsum("bthc,hcd->bthd", jax.nn.one_hot(clusters, centroids.shape[1]), centroids)
        aux_losses.add("routing_commitment", self.commitment * jnp.mean((k.astype(jnp.float32) - routed_to) ** 2))

    def _update_centroids(self, k: jax.Array, clusters: jax.Array) -> None:
        """One online k-means step: each centroid moves towards its members' normalised mean (none: it stays)."""
        members = jax.nn.one_hot(clusters, self.centroids.shape[1], dtype=jnp.float32)  # [B, T, H_r, C]
        sums = jnp.einsum("bthc,bthd->hcd", members, jax.lax.stop_gradient(k.astype(jnp.float32)))
        counts = jnp.sum(members, axis=(0, 1))[..., None]  # [H_r, C, 1]
        if self.sequence_axis is not None:
            sums, counts = jax.lax.psum((sums, counts), self.sequence_axis)
        old = self.centroids[...]
        moved = l2_normalize(self.decay * old + (1 - self.decay) * l2_normalize(sums))
        self.centroids[...] = jnp.where(counts > 0, moved, old)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, clusters: jax.Array,
                sequence_axis: str | None) -> jax.Array:
        """o [B, T, H, d]: the local heads under Causal(window), the routing heads within their clusters."""
        common = dict(score_mod=self_match_pushed_down, impl=self.impl, block_size=self.block_size,
                      sequence_axis=sequence_axis)
        n = self.local_heads
        segment_ids = jnp.swapaxes(clusters, 1, 2).reshape(-1, clusters.shape[1])  # [B·H_r, T]
        routed = ops.softmax_attn(*(heads_as_rows(a[:, :, n:]) for a in (q, k, v)),
                                  mask=masks.Causal() & masks.Document(), segment_ids=segment_ids, **common)
        routed = unfold_heads(routed[:, :, 0], self.num_heads - n)
        if not n:
            return routed
        local = ops.softmax_attn(q[:, :, :n], k[:, :, :n], v[:, :, :n], mask=masks.Causal(self.window), **common)
        return jnp.concatenate([local, routed], axis=2)

    def _decode(self, q: jax.Array, clusters: jax.Array, cache: RoutingCache) -> jax.Array:
        """One step: q [B, H, d] and its clusters [B, H_r] against the cache (already written) -> [B, H, d]."""
        n, pos = self.local_heads, cache.pos - 1
        step = dict(score_mod=self_match_pushed_down)
        key_clusters = jnp.swapaxes(cache.clusters, 1, 2).reshape(-1, cache.clusters.shape[1])  # [B·H_r, L]
        routed = ops.softmax_decode_step(
            q[:, n:].reshape(-1, 1, self.head_dim), heads_as_rows(cache.k[:, :, n:]), heads_as_rows(cache.v[:, :, n:]),
            cache.key_positions, pos, mask=masks.Causal() & masks.Document(),
            segment_ids=(clusters.reshape(-1), key_clusters), **step)
        routed = routed.reshape(q.shape[0], -1, self.head_dim)
        if not n:
            return routed
        local = ops.softmax_decode_step(q[:, :n], cache.k[:, :, :n], cache.v[:, :, :n], cache.key_positions, pos,
                                        mask=masks.Causal(self.window), **step)
        return jnp.concatenate([local, routed], axis=1)
