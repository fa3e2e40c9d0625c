"""SEA — "SEA: Sparse Linear Attention with Estimated Attention Mask" (Lee et al., ICLR 2024).

    Â_ij = φ(q̂_i)·Σ_{s in tile j} φ(k_s)            (the linear-attention estimate of query tile i's mass on tile j)
    o_t = Σ_{s ∈ K(t)} softmax_s(q_t·k_s / √d) v_s,   K(t): the local tiles and the top_k tiles of Â's row ⌊t/b⌋

φ = elu + 1 (kernel-based linear attention); q̂_i is the tile's representative query (causal: its first query;
non-causal: the mean), Â summed over the head group's queries. The estimate costs O(T/b · n · d) per head: one
row of tile scores per query tile, each against the tiles' summed features. Its row normaliser does not change
the ranking, so none is taken. SEA estimates a compressed attention matrix per query with a learnt decoder
distilled from a teacher's attention and selects by grouped top-k per query; here the estimate is the linear
attention of the layer's own q and k (nothing to distil, no gradient through the choice), per tile of b queries,
the unit the blockwise op reads. The layer, its decode and its sequence-parallel form:
``seqlab.mixers.softmax.selected_tiles``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import block_select
from seqlab.layers.feature_maps import Elu1
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.selected_tiles import TileSelectingAttention


@register(
    "sea",
    kind="softmax",
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask",
    examples={"gqa": dict(num_heads=4, num_kv_heads=2, block_size=4, top_k=2),
              "bidirectional": dict(num_heads=2, block_size=8, top_k=1, causal=False)},
)
class SEAAttention(TileSelectingAttention):
    """Softmax attention over the local tiles and the top_k tiles of a linear-attention estimate."""

    def __init__(self, d_model: int, num_heads: int, **kwargs):
        super().__init__(d_model, num_heads, **kwargs)
        self.feature_map = Elu1(self.head_dim)

    def select(self, q_rep: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
        features = block_select.tile_sums(self.feature_map(k), self.block_size)  # [B, Hkv, n, d]
        estimate = jnp.einsum("bhrgd,bhnd->bhrn", self.feature_map(q_rep), features)
        allowed = block_select.candidates(rows, features.shape[2], self.local, self.causal)
        return block_select.top_tiles(estimate, allowed, self.top_k)
