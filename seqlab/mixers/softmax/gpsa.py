"""Gated positional self-attention (GPSA) — "ConViT: Improving Vision Transformers with Soft Convolutional
Inductive Biases" (d'Ascoli et al., 2021).

    A_ij^h = (1 − σ(λ_h)) softmax_j(q_i^h·k_j^h / √d) + σ(λ_h) softmax_j(v_pos^h · r_ij),   o_i^h = Σ_j A_ij^h v_j^h

r_ij = (‖δ‖², δ) with δ the key's offset from the query on the token grid (δ = j − i in 1-d; (Δrow, Δcol) on a
2-d ``grid``, raster order). Both terms are softmaxes over the same visible keys (causal, or every token), so A
sums to 1 per row. Initialised as a soft convolution: v_pos^h = α (−1, 2Δ_h) makes the positional term
∝ exp(−α ‖δ − Δ_h‖²), a Gaussian around the head's centre Δ_h (the heads' centres tile a √H × √H patch on a
grid, or look back 0 .. H − 1 tokens in 1-d); α = ``locality_strength``, λ_h = 1 (σ ≈ 0.73 on position).
The positional term is a second pass of the softmax op with zero queries and the logits as a score_mod, so both
passes run every form, decode from the one KV cache, and shard like softmax attention.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.mixers.caches import KVCache
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


def head_centres(num_heads: int, ndim: int, causal: bool) -> jax.Array:
    """[H, ndim] float32: head h's initial attention centre Δ_h (key offset from the query)."""
    if ndim == 1:
        return -jnp.arange(num_heads, dtype=jnp.float32)[:, None] if causal else \
            (jnp.arange(num_heads, dtype=jnp.float32) - (num_heads - 1) // 2)[:, None]
    side = math.isqrt(num_heads - 1) + 1 if num_heads > 1 else 1
    h = jnp.arange(num_heads)
    return jnp.stack([h // side - (side - 1) // 2, h % side - (side - 1) // 2], axis=-1).astype(jnp.float32)


@register(
    "gpsa",
    kind="softmax",
    paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
    examples={"1d": dict(num_heads=2), "2d": dict(num_heads=4, grid=(8, 8), causal=False)},
)
class GatedPositionalAttention(MaskedAttention):
    """grid: the 2-d token grid (H, W) (None: a 1-d sequence); causal: keys up to the query (raster order);
    locality_strength α of the initialisation. Other arguments: `SoftmaxAttention`'s."""

    def __init__(self, d_model: int, num_heads: int, *, grid: tuple[int, int] | None = None, causal: bool = True,
                 locality_strength: float = 1.0, param_dtype: Any = jnp.float32, **kwargs: Any):
        if grid is not None and (not isinstance(grid, (tuple, list)) or len(grid) != 2
                                 or not all(isinstance(n, int) and n > 0 for n in grid)):
            raise ValueError(f"grid must be None or (H, W) positive ints, got {grid!r}")
        if isinstance(locality_strength, bool) or not isinstance(locality_strength, (int, float)):
            raise ValueError(f"locality_strength must be a number, got {locality_strength!r}")
        super().__init__(d_model, num_heads, causal=causal, param_dtype=param_dtype, **kwargs)
        self.grid = None if grid is None else tuple(grid)
        ndim = 1 if grid is None else 2
        centres = head_centres(num_heads, ndim, causal)
        weights = locality_strength * jnp.concatenate([-jnp.ones((num_heads, 1)), 2.0 * centres], axis=-1)
        self.pos_weights = nnx.Param(weights.astype(param_dtype))  # v_pos [H, 1 + ndim]
        self.gate = nnx.Param(jnp.ones((num_heads,), param_dtype))  # λ [H]

    def attention_mask(self) -> masks.Mask:
        return masks.Causal() if self.causal else masks.Bidirectional()

    def offsets(self, q_idx: jax.Array, k_idx: jax.Array) -> list[jax.Array]:
        """Per grid axis, the key's offset from the query, float32, broadcasting q_idx against k_idx."""
        if self.grid is None:
            return [(k_idx - q_idx).astype(jnp.float32)]
        width = self.grid[1]
        rows = (k_idx // width - q_idx // width).astype(jnp.float32)
        return [rows, (k_idx % width - q_idx % width).astype(jnp.float32)]

    def positional_logits(self, weights: jax.Array):
        """The score_mod of the positional pass, v_pos^h · (‖δ‖², δ) added to the (zero) scores, for the
        positional weights v_pos [H, 1 + ndim]."""
        return functools.partial(self._positional_logits, weights)

    def _positional_logits(self, weights, scores, q_idx, k_idx, head):
        weights = weights.astype(jnp.float32)[head[:, 0, 0]]  # [H, 1 + ndim]
        delta = self.offsets(q_idx, k_idx)
        logits = weights[:, 0, None, None] * sum(d * d for d in delta)
        for axis, d in enumerate(delta):
            logits = logits + weights[:, axis + 1, None, None] * d
        return scores + logits

    def _forward(self, x: jax.Array, cache: KVCache | None, documents: Documents | None = None):
        q, k, v, cache = self._queries_keys_values(x, cache, documents)
        weights = self.pos_weights[...]
        if cache is None and self.sequence_axis is not None:
            # The weights' gradient then waits for the keys': XLA:CPU runs independent collectives (its psum, the
            # all-gather's transpose) in any order on each host device, which can deadlock them.
            weights, k = jax.lax.optimization_barrier((weights, k))
        content = self._attend(q, k, v, cache, documents, None)
        position = self._attend(jnp.zeros_like(q), k, v, cache, documents, self.positional_logits(weights))
        g = jax.nn.sigmoid(self.gate[...].astype(jnp.float32))[:, None]  # [H, 1]
        o = (1.0 - g) * content.astype(jnp.float32) + g * position.astype(jnp.float32)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache
