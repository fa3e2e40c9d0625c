"""S_t = S_{t-1} + phi(k_t) v_tᵀ,  z_t = z_{t-1} + phi(k_t),  o_t = S_tᵀ phi(q_t) / (phi(q_t)·z_t + eps),
phi(x) = [1, x / d^(1/4), vec(x xᵀ) / (sqrt(2) sqrt(d))]   (2nd-order Taylor approximation of exp(q·k / sqrt(d))).

Paper: "Simple linear attention language models balance the recall-throughput tradeoff" (Arora et al., 2024).
Based's linear layer: q and k projected to a feature dimension d = 16 per head, the Taylor feature map (1 + d + d²
= 273 features), normalised linear attention. It is `LinearAttention` with Based's defaults; Based models pair it
with BaseConv and sliding-window layers through the model's mixer pattern (`configs/mqar.py:based`).

Decode cache: `RecurrentCache` with state [B, H, 273, d_v + 1] float32 (the last column is the key sum z).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from seqlab.mixers.linear_attention import LinearAttention

BASED_FEATURE_DIM = 16


class Based(LinearAttention):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        feature_dim: int = BASED_FEATURE_DIM,
        head_dim: int | None = None,
        eps: float = 1e-6,
        impl: str = "chunked",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(
            d_model, num_heads, feature_map="taylor", feature_dim=feature_dim, head_dim=head_dim, normalize=True,
            eps=eps, impl=impl, chunk_size=chunk_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip
