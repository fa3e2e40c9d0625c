"""S_t = S_{t-1} + phi(k_t) v_tᵀ,  z_t = z_{t-1} + phi(k_t),  o_t = S_tᵀ phi(q_t) / (phi(q_t)·z_t + eps),
phi(x) = [1, x / d^(1/4), vec(x xᵀ) / (√2 √d)]   (2nd-order Taylor approximation of exp(q·k / √d)),
so phi(q)·phi(k) = 1 + s + s²/2 with s = q·k / √d.

Paper: "Simple linear attention language models balance the recall-throughput tradeoff" (Arora et al., 2024).
Based's linear layer: q = x W_q and k = x W_k projected to a feature dimension d = 16 per head, v = x W_v
(d_model / H per head), normalised Taylor linear attention, then W_o; no decay, no positional encoding, no output
norm. Based models pair it with BaseConv and sliding-window layers through the model's mixer pattern
(`configs/mqar.py:based`).

The op is `seqlab.ops.based.based_attn`, which never materialises the 1 + d + d² = 273 Taylor features and keeps
the split-order state (0th, 1st and upper-triangle 2nd order: 1 + d + d(d+1)/2 = 153 rows for d = 16).
`LinearAttention(feature_map="taylor")` is the same layer with the features materialised (same parameter names).
eps defaults to 1e-6 (flash-linear-attention's Based paths); the official HazyResearch/based layer uses 1e-12.

Decode cache: `RecurrentCache` with state [B, H, 1 + d + d(d+1)/2, d_v + 1] float32, laid out as documented in
`seqlab.ops.based` (the last column is the normaliser).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive, check_positive_int, resolve_dim
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register
from seqlab.ops.based import based_attn, based_state_rows

BASED_FEATURE_DIM = 16


@register(
    "based",
    kind="linear",
    paper="Simple linear attention language models balance the recall-throughput tradeoff",
    examples={"default": dict(num_heads=2, feature_dim=4)},
)
class Based(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        feature_dim: int = BASED_FEATURE_DIM,
        value_dim: int | None = None,
        eps: float = 1e-6,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_positive_int("feature_dim", feature_dim)
        check_positive("eps", eps)
        self.feature_dim = feature_dim
        self.value_dim = resolve_dim("value_dim", value_dim, d_model, "d_model", num_heads, "num_heads")
        self.eps = eps
        H = num_heads
        self.q_proj = self._linear(d_model, H * feature_dim, rngs)
        self.k_proj = self._linear(d_model, H * feature_dim, rngs)
        self.v_proj = self._linear(d_model, H * self.value_dim, rngs)
        self.o_proj = self._linear(H * self.value_dim, d_model, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        rows = based_state_rows(self.feature_dim)
        return RecurrentCache.empty((batch, self.num_heads, rows, self.value_dim + 1))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        """x [B, T, d_model] -> y [B, T, d_model]; q, k [B, T, H, feature_dim], v [B, T, H, value_dim]."""
        q = self._heads(self.q_proj(x), self.feature_dim)
        k = self._heads(self.k_proj(x), self.feature_dim)
        v = self._heads(self.v_proj(x), self.value_dim)
        state = None if cache is None else cache.state
        o, state = based_attn(q, k, v, eps=self.eps, **self._op_kwargs(state, documents))
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache
