"""Blocked local attention with halos — "Scaling Local Self-Attention for Parameter Efficient Visual Backbones"
(Vaswani et al., 2021, HaloNet).

    o_x = Σ_{y ∈ H(x)} softmax_y(q_x·k_y / √d) v_y

H(x): queries in non-overlapping blocks of b×b tokens see the (b + 2h)×(b + 2h) haloed window around their block;
keys off the grid do not exist (the padding the paper's implementation masks). The 1-d causal analogue, for
language models: the query's block up to itself plus the h keys before the block. The mask is
``seqlab.core.masks.Halo`` on the raster order of ``grid``; the op visits only the key tiles it reaches. Defaults:
b = 8, h = 3 (14×14 windows). The paper's factorised 2-d relative logits are not built in (rope=True gives RoPE
on raster positions).
"""

from __future__ import annotations

from typing import Any

from seqlab.core import masks
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


@register(
    "halonet",
    kind="softmax",
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    examples={"1d-causal": dict(num_heads=2, block=8, halo=3), "2d": dict(num_heads=2, block=4, halo=1,
                                                                          grid=(8, 8), causal=False)},
)
class HaloAttention(MaskedAttention):
    """block, halo: one int or one per grid axis; grid: the token grid's shape (None: 1-d, causal only); causal:
    the 1-d causal halo. Other arguments: `SoftmaxAttention`'s."""

    def __init__(self, d_model: int, num_heads: int, *, block: int | tuple[int, ...] = 8,
                 halo: int | tuple[int, ...] = 3, grid: tuple[int, ...] | None = None, causal: bool = True,
                 **kwargs: Any):
        super().__init__(d_model, num_heads, causal=causal, **kwargs)
        self.mask = masks.Halo(block=block, halo=halo, causal=causal, grid=None if grid is None else tuple(grid))

    def attention_mask(self) -> masks.Mask:
        return self.mask
