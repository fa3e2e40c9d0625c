"""DSF normalised attention: linear attention whose normaliser is a learned, query-independent scalar per head.

Paper: "Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural
Networks" (Sieber et al., NeurIPS 2024), the Dynamical Systems Framework (DSF); read from jsie7/ssm-benchmark
`models/transformer.py` (MHNA with SelfNormAttention2).

Per head, with no feature map on q or k:

    S_t = S_{t-1} + k_t v_tᵀ,   o_t = η(x_t) · S_tᵀ q_t,   η(x_t) = f(x_t W_n + b_n)  (one scalar per head)

    norm_fn="exp" (default):  f(n) = e^{-n}
            "softplus":       f(n) = 1 / softplus(n)
            "sigmoid":        f(n) = 1 + e^{-n}  (= 1 / σ(n))

In DSF terms this is h_t = h_{t-1} + B_t u_t, y_t = C_t h_t with C_t = η(x_t) q_tᵀ: softmax attention's
query-dependent normaliser Σ_s φ(q_t)ᵀφ(k_s) replaced by a learned one that needs no extra state.
Scale: 1 (no d^-1/2), as in the official code; a constant scale c is absorbed by the learned normaliser (for
"exp" exactly, through the bias: e^{-(n + log c)} = e^{-n} / c).

Layer (official code): q, k = x W_q, x W_k (key_dim per head, default d_model / H), v = x W_v (d_model / H per head),
n = x W_n (H outputs), every projection with a bias; op `linear_attn` (normalize=False, scale 1); o scaled by η;
W_o with bias. Dropout is left out.

Decode cache: `RecurrentCache` with state [B, H, key_dim, d_v] float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_choice, resolve_dim
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register

NORM_FNS = {
    "exp": lambda n: jnp.exp(-n),
    "softplus": lambda n: 1.0 / jax.nn.softplus(n),
    "sigmoid": lambda n: 1.0 + jnp.exp(-n),
}


@register(
    "dsf",
    kind="linear",
    paper="Understanding the differences in Foundation Models: Attention, State Space Models, and Recurrent Neural "
    "Networks",
    examples={"default": dict(num_heads=2)},
)
class DSFAttention(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        key_dim: int | None = None,
        value_dim: int | None = None,
        norm_fn: str = "exp",
        use_bias: bool = True,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_choice("norm_fn", norm_fn, NORM_FNS)
        self.norm_fn = norm_fn
        self.key_dim = resolve_dim("key_dim", key_dim, d_model, "d_model", num_heads, "num_heads")
        self.value_dim = resolve_dim("value_dim", value_dim, d_model, "d_model", num_heads, "num_heads")
        H = num_heads
        self.q_proj = self._linear(d_model, H * self.key_dim, rngs, use_bias=use_bias)
        self.k_proj = self._linear(d_model, H * self.key_dim, rngs, use_bias=use_bias)
        self.v_proj = self._linear(d_model, H * self.value_dim, rngs, use_bias=use_bias)
        self.n_proj = self._linear(d_model, H, rngs, use_bias=use_bias)
        self.o_proj = self._linear(H * self.value_dim, d_model, rngs, use_bias=use_bias)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.key_dim, self.value_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        q = self._heads(self.q_proj(x), self.key_dim)
        k = self._heads(self.k_proj(x), self.key_dim)
        v = self._heads(self.v_proj(x), self.value_dim)
        eta = NORM_FNS[self.norm_fn](self.n_proj(x).astype(jnp.float32))  # [B, T, H]
        o, state = ops.linear_attn(
            q, k, v, scale=1.0, normalize=False, **self._op_kwargs(None if cache is None else cache.state, documents)
        )
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        o = (eta[..., None] * o.astype(jnp.float32)).astype(x.dtype)
        return self.o_proj(self._merge_heads(o)), cache
