"""Neighborhood attention — "Neighborhood Attention Transformer" (Hassani et al., 2023), "Dilated Neighborhood
Attention Transformer" (Hassani & Shi, 2022), "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self
Attention at the Threadblock Level" (Hassani et al., 2024).

    o_x = Σ_{y ∈ N(x)} softmax_y(q_x·k_y / √d) v_y

N(x): on every axis of the token grid, the k positions of x's dilation group nearest to it (shifted inward at the
borders so that every query sees k keys; with stride s, queries of a stride group share the window of its
centre); causal: the k positions of the group up to x. The mask is ``seqlab.core.masks.Neighborhood`` on the
raster order of ``grid`` (None: a 1-d sequence of any length, causal); it is fused through the op's tile map
(a query tile visits only the key tiles holding a neighbour), not a gather. Defaults: k = 7, dilation 1 (DiNAT
alternates 1 with larger dilations across layers), no positional bias (NATTEN dropped it).
"""

from __future__ import annotations

from typing import Any

from seqlab.core import masks
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


@register(
    "natten",
    kind="softmax",
    paper="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    examples={
        "1d-dilated": dict(num_heads=2, kernel=5, dilation=2),
        "2d-causal": dict(num_heads=2, kernel=3, grid=(8, 8)),
        "2d": dict(num_heads=2, kernel=(3, 3), dilation=(1, 2), grid=(8, 8), causal=False),
    },
)
class NeighborhoodAttention(MaskedAttention):
    """kernel, dilation, stride: one int or one per grid axis; grid: the token grid's shape (None: 1-d, causal);
    causal: every axis causal (raster order) or none. Other arguments: `SoftmaxAttention`'s."""

    def __init__(self, d_model: int, num_heads: int, *, kernel: int | tuple[int, ...] = 7,
                 dilation: int | tuple[int, ...] = 1, stride: int | tuple[int, ...] = 1,
                 grid: tuple[int, ...] | None = None, causal: bool = True, **kwargs: Any):
        super().__init__(d_model, num_heads, causal=causal, **kwargs)
        self.mask = masks.Neighborhood(kernel=kernel, dilation=dilation, stride=stride, causal=causal,
                                       grid=None if grid is None else tuple(grid))

    def attention_mask(self) -> masks.Mask:
        return self.mask
