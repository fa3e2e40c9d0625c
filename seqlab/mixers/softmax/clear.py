"""CLEAR's local attention for 2-d tokens — "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
Transformers Up" (Liu et al., 2024).

    o_x = Σ_{y : ‖c(x) − c(y)‖ <= r} softmax_y(q_x·k_y / √d) v_y

c(x): the grid coordinates of token x (raster order over ``grid``); each query sees the tokens of a circular
window of radius r around it, like a convolution's receptive field — the paper's replacement for a pre-trained
DiT's global attention (fine-tuned or distilled from it), linear in the number of tokens for a fixed r. The mask
is ``seqlab.core.masks.CircularWindow``; the op visits only the key tiles the circles reach. Non-causal (a
diffusion model's tokens see each other both ways): no decode cache.
"""

from __future__ import annotations

from typing import Any

from seqlab.core import masks
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


@register(
    "clear",
    kind="softmax",
    paper="CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up",
    examples={"2d": dict(num_heads=2, radius=2.5, grid=(8, 8))},
)
class ClearAttention(MaskedAttention):
    """radius r and grid (the token grid's shape, e.g. (H, W)); non-causal. Other arguments: `SoftmaxAttention`'s."""

    causal = False
    takes_documents = False  # non-causal

    def __init__(self, d_model: int, num_heads: int, *, grid: tuple[int, ...], radius: float = 8.0,
                 causal: bool = False, **kwargs: Any):
        if causal:
            raise ValueError("causal: CLEAR's circular windows are non-causal; causal must be False")
        super().__init__(d_model, num_heads, causal=False, **kwargs)
        self.mask = masks.CircularWindow(radius=radius, grid=tuple(grid) if isinstance(grid, (tuple, list)) else grid)

    def attention_mask(self) -> masks.Mask:
        return self.mask
