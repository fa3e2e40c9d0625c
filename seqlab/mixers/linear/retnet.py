"""S_t = gamma_h S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t,  gamma_h = 1 - 2^(-5-h)  (multi-scale retention).

Paper: "Retentive Network: A Successor to Transformer for Large Language Models" (Sun et al., 2023); read from
torchscale's MultiScaleRetention / RetNetRelPos.

Layer: q, k = x W_q, x W_k (d_k = d_model / H per head), rotated RoPE-style on interleaved pairs with angles
10000^(-linspace(0, 1, d_k/2)) (no xPos length scaling); k is scaled by d_k^-1/2, which we pass to the op as its
`scale` (it multiplies q; same product, applied once). v = x W_v with d_v = value_factor * d_model / H (2 by
default). Op `simple_gla` with the constant log-decay g = log gamma_h. Output: per-head RMSNorm without affine
weights (eps 1e-6), times swish(x W_g), then W_o. The official parallel-form decay normalisations are dropped:
the per-head norm is scale-invariant, so they do not change the output (up to its eps).

Decode cache: `RecurrentCache` with state [B, H, d_k, d_v] float32 and the position counter (for the rotation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_divisible, check_even, check_positive_int
from seqlab.core.documents import Documents
from seqlab.layers.norms import RMSNorm
from seqlab.layers.positional import RoPE
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "retnet",
    kind="linear",
    paper="Retentive Network: A Successor to Transformer for Large Language Models",
    examples={"default": dict(num_heads=4)},
)
class RetNet(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        value_factor: int = 2,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-6,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_divisible("d_model", d_model, num_heads, "num_heads")
        check_positive_int("value_factor", value_factor)
        self.key_dim = d_model // num_heads
        check_even("d_model / num_heads", self.key_dim)
        self.value_dim = value_factor * self.key_dim
        self.rope = RoPE(self.key_dim, base=rope_base, interleaved=True, freqs="retnet")
        H = num_heads
        self.q_proj = self._linear(d_model, H * self.key_dim, rngs)
        self.k_proj = self._linear(d_model, H * self.key_dim, rngs)
        self.v_proj = self._linear(d_model, H * self.value_dim, rngs)
        self.g_proj = self._linear(d_model, H * self.value_dim, rngs)
        self.o_proj = self._linear(H * self.value_dim, d_model, rngs)
        self.norm = RMSNorm(self.value_dim, eps=norm_eps, affine=False)

    def log_decay(self) -> jax.Array:
        """log gamma_h = log(1 - 2^(-5-h)), h = 0..H-1, [H] float32."""
        h = jnp.arange(self.num_heads, dtype=jnp.float32)
        return jnp.log1p(-(2.0 ** (-5.0 - h)))

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.key_dim, self.value_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        B, T, _ = x.shape
        pos = self._positions(cache, T, documents)
        q = self.rope(self._heads(self.q_proj(x), self.key_dim), pos)
        k = self.rope(self._heads(self.k_proj(x), self.key_dim), pos)
        v = self._heads(self.v_proj(x), self.value_dim)
        g = jnp.broadcast_to(self.log_decay(), (B, T, self.num_heads))
        o, state = ops.simple_gla(
            q, k, v, g, scale=self.key_dim**-0.5, **self._op_kwargs(None if cache is None else cache.state, documents)
        )
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + T)
        gate = self._heads(self.g_proj(x), self.value_dim)
        o = self.norm(o.astype(x.dtype), gate)
        return self.o_proj(self._merge_heads(o)), cache
