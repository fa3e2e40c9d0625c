"""Softmax attention over key tiles selected from the data: the shared layer of HiP and SEA.

    o_t = Σ_{s ∈ K(t)} softmax_s(q_t·k_s / √d) v_s,   K(t) = {s visible from t : ⌊s / b⌋ ∈ L(i) ∪ S(i)},  i = ⌊t / b⌋

The sequence is cut into tiles of b = ``block_size`` tokens. Query tile i always reads its ``local`` tiles L(i)
(causal: i − local < j <= i; non-causal: |i − j| < local) and ``top_k`` more, S(i), which the family selects by
scoring the candidate key tiles against a representative query of the tile (``seqlab.core.block_select``): its
first query when causal (so that a decode step, which has seen only that one, selects the same tiles), the mean of
its queries otherwise. Causal candidates are the complete tiles before the local ones. The selection is a
discrete choice with no gradient; the attention over the selected tiles is exact softmax attention, and the op
reads only those tiles (``seqlab.core.masks.BlockIndex`` in the blockwise form: (top_k + local) · b keys per
query, not T).

Decode cache (`SelectionCache`): a full KV cache and the query that opened the current tile; each step selects
the tile's key tiles from the cache's keys. Under sequence parallelism each device all-gathers q, k and v and
computes its own rows of the whole sequence's attention (the selection ranks the whole row's tiles). Packed
documents are refused: the selection ranks tiles across the row's documents.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from seqlab import ops
from seqlab.checks import check_positive_int
from seqlab.core import block_select, masks
from seqlab.core.documents import Documents
from seqlab.mixers.caches import SelectionCache
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


class TileSelectingAttention(MaskedAttention):
    """top_k: key tiles selected per query tile; local: tiles always read (the query's own tile and the
    local − 1 before it, or either side when non-causal); block_size: the tile b (every form's tile)."""

    takes_documents = False
    documents_refused = "its tile selection ranks the key tiles of the whole row, across documents"

    def __init__(self, d_model: int, num_heads: int, *, top_k: int = 4, local: int = 1, block_size: int = 64,
                 **kwargs: Any):
        check_positive_int("top_k", top_k)
        check_positive_int("local", local)
        check_positive_int("block_size", block_size)
        super().__init__(d_model, num_heads, block_size=block_size, **kwargs)
        self.top_k, self.local = top_k, local

    def attention_mask(self) -> masks.Mask:
        return masks.Causal() if self.causal else masks.Bidirectional()

    def select(self, q_rep: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
        """The top_k key tiles [B, Hkv, R, top_k] int32 (the sentinel nk for none) of query tiles ``rows`` [R]
        from their representative queries q_rep [B, Hkv, R, G, d] and the keys k [B, Hkv, L, d] float32 (L >= the
        candidates' keys; a decode step passes its whole cache)."""
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int) -> SelectionCache:
        self._check_cache_args(batch, max_len)
        dtype = self.dtype or jnp.float32
        return SelectionCache.empty((batch, max_len, self.num_kv_heads, self.head_dim),
                                    (batch, self.num_heads, self.head_dim), dtype)

    def _forward(self, x: jax.Array, cache: SelectionCache | None, documents: Documents | None = None):
        q, k, v, cache = self._queries_keys_values(x, cache, documents)
        if cache is not None:
            cache = self._remember_opening_query(cache, q)
        o = self._attend(q, k, v, cache, documents, self.score_mod())
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def _remember_opening_query(self, cache: SelectionCache, q: jax.Array) -> SelectionCache:
        """The cache (already advanced past q's T tokens) holding the query that opened the last token's tile, if
        that tile opened among q [B, T, H, d]."""
        first, last = cache.pos - q.shape[1], cache.pos - 1
        opening = last // self.block_size * self.block_size
        index = jnp.clip(opening - first, 0, q.shape[1] - 1)
        query = jax.lax.dynamic_index_in_dim(q, index, axis=1, keepdims=False).astype(cache.opening_query.dtype)
        return cache.replace(opening_query=jnp.where(opening >= first, query, cache.opening_query))

    def _grouped(self, q: jax.Array) -> jax.Array:
        """[B, R, H, d] -> [B, Hkv, R, G, d] float32 (query head h = i·G + g)."""
        b, r, h, d = q.shape
        q = q.astype(jnp.float32).reshape(b, r, self.num_kv_heads, h // self.num_kv_heads, d)
        return q.transpose(0, 2, 1, 3, 4)

    def representatives(self, q: jax.Array) -> jax.Array:
        """The representative query of every tile of q [B, T, H, d]: [B, Hkv, nq, G, d] float32 (causal: the
        tile's first query; non-causal: the mean of its queries)."""
        if self.causal:
            return self._grouped(q[:, :: self.block_size])
        sums = block_select.tile_sums(q.astype(jnp.float32).transpose(0, 2, 1, 3), self.block_size)  # [B,H,nq,d]
        counts = jnp.minimum(self.block_size, q.shape[1] - self.block_size * jnp.arange(sums.shape[2]))
        return self._grouped((sums / counts[:, None]).transpose(0, 2, 1, 3))

    def tile_index(self, q_rep: jax.Array, k: jax.Array, rows: jax.Array, num_tiles: int) -> masks.BlockIndex:
        """The BlockIndex (rows ``rows`` [R]) of the selected and local tiles; k [B, Hkv, L, d] float32."""
        selected = self.select(q_rep, k, rows)
        local = block_select.local_tiles(rows, self.local, self.causal)
        return block_select.block_index(selected, local, num_tiles, self.block_size)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: SelectionCache | None,
                documents: Documents | None, score_mod: masks.ScoreMod | None) -> jax.Array:
        if cache is not None and q.shape[1] == 1:
            pos = cache.pos - 1
            keys = cache.k.astype(jnp.float32).transpose(0, 2, 1, 3)
            q_rep = self._grouped(cache.opening_query[:, None])
            rows = (pos // self.block_size)[None]
            index = self.tile_index(q_rep, keys, rows, -(-keys.shape[2] // self.block_size))
            o = ops.softmax_decode_step(q[:, 0], cache.k, cache.v, cache.key_positions, pos,
                                        mask=self.attention_mask(), score_mod=score_mod, block_index=index)
            return o[:, None]
        if cache is None and self.sequence_axis is not None:
            return self._on_whole_rows(q, k, v, score_mod)
        return self._selected_attention(q, k, v, score_mod)

    def _selected_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                            score_mod: masks.ScoreMod | None) -> jax.Array:
        """o [B, T, H, d] of whole rows q [B, T, H, d], k, v [B, T, H_kv, d]."""
        num_tiles = -(-q.shape[1] // self.block_size)
        keys = k.astype(jnp.float32).transpose(0, 2, 1, 3)
        index = self.tile_index(self.representatives(q), keys, jnp.arange(num_tiles), num_tiles)
        return ops.softmax_attn(q, k, v, mask=self.attention_mask(), score_mod=score_mod, impl=self.impl,
                                block_index=index)

    def _on_whole_rows(self, q: jax.Array, k: jax.Array, v: jax.Array,
                       score_mod: masks.ScoreMod | None) -> jax.Array:
        """This device's rows of the attention over the whole sequence (q, k, v all-gathered along the axis)."""
        t_local, axis = q.shape[1], self.sequence_axis
        whole = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (q, k, v)]
        o = self._selected_attention(*whole, score_mod)
        return jax.lax.dynamic_slice_in_dim(o, jax.lax.axis_index(axis) * t_local, t_local, axis=1)
