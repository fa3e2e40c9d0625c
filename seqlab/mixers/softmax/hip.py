"""HiP attention — "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning" (Lee et
al., 2024).

    o_t = Σ_{s ∈ K(t)} softmax_s(q_t·k_s / √d) v_s,  K(t): the local tiles and the top_k tiles HiP's pruning keeps

Hierarchical pruning (``seqlab.core.block_select.hierarchical_tiles``), per query tile and key/value head: the
candidate tiles (the complete tiles before the local ones) start as top_k equal spans; each round halves every
kept span and scores each half by its first tile's mean key against the tile's representative query (its first
query; the maximum over the head group's queries), keeping the top_k halves, until each span is one tile:
⌈log2 ⌈n / top_k⌉⌉ rounds of 2·top_k dot products, so the selection costs O(T/b · top_k · log n) per head and
the attention (top_k + local) · b keys per query. HiP prunes at token granularity within its query blocks and
is applied training-free to pretrained models; here the pruning works on tiles of b keys, the unit the blockwise
op reads. The layer, its decode and its sequence-parallel form: ``seqlab.mixers.softmax.selected_tiles``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import block_select
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.selected_tiles import TileSelectingAttention


@register(
    "hip",
    kind="softmax",
    paper="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
    examples={"gqa": dict(num_heads=4, num_kv_heads=2, block_size=4, top_k=2)},
)
class HiPAttention(TileSelectingAttention):
    """Causal softmax attention over the local tiles and the top_k tiles of HiP's hierarchical pruning."""

    def __init__(self, d_model: int, num_heads: int, **kwargs):
        if kwargs.get("causal", True) is not True:
            raise ValueError(f"causal: HiP prunes the causal past of each query tile; causal must be True, got "
                             f"{kwargs['causal']!r}")
        super().__init__(d_model, num_heads, **kwargs)

    def select(self, q_rep: jax.Array, k: jax.Array, rows: jax.Array) -> jax.Array:
        means = block_select.tile_sums(k, self.block_size) / self.block_size  # [B, Hkv, n, d]; complete tiles
        num_tiles = means.shape[2]

        def span_score(first: jax.Array) -> jax.Array:  # first [B|1, Hkv|1, R, 2k] -> [B, Hkv, R, 2k]
            first = jnp.broadcast_to(first, (*means.shape[:2], *first.shape[2:]))
            reps = jnp.take_along_axis(means[:, :, None], first[..., None], axis=3)  # [B, Hkv, R, 2k, d]
            return jnp.einsum("bhrgd,bhrsd->bhrgs", q_rep, reps).max(axis=3)

        counts = jnp.maximum(rows - self.local + 1, 0)  # candidates [0, counts): the tiles before the local ones
        return block_select.hierarchical_tiles(span_score, counts, num_tiles, self.top_k)
