"""S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,  o_t = S_t^T (q_t d_k^-1/2),  log alpha_t = logsigmoid(x W1 W2 + b) / 16.

Paper: "Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al., 2024); read from fla's
`fla/layers/gla.py`.

Defaults (fla): expand_k 0.5, expand_v 1, so d_k = d_model / (2H) and d_v = d_model / H per head; no feature map,
no short conv, no positional encoding. The key-wise gate is low rank: W1 d_model x 16 (no bias), W2 16 x H d_k
(bias), divided by gate_logit_normalizer 16 (alpha = sigmoid^(1/16), close to 1); optional clamp_min on log alpha.
Op `gla` with its default scale d_k^-1/2. Output: per-head RMSNorm (affine, eps 1e-5) times swish(x W_g)
(fla's FusedRMSNormGated), then W_o.

Decode cache: `RecurrentCache` with state [B, H, d_k, d_v] float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, check_positive_int, expand_dim
from seqlab.core.documents import Documents
from seqlab.layers.norms import RMSNorm
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "gla",
    kind="linear",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
    examples={"default": dict(num_heads=4)},
)
class GLA(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        clamp_min: float | None = None,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.key_dim = expand_dim("expand_k", d_model, expand_k, num_heads)
        self.value_dim = expand_dim("expand_v", d_model, expand_v, num_heads)
        check_positive_int("gate_low_rank_dim", gate_low_rank_dim)
        check_positive("gate_logit_normalizer", gate_logit_normalizer)
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        H, dk, dv = num_heads, self.key_dim, self.value_dim
        self.q_proj = self._linear(d_model, H * dk, rngs)
        self.k_proj = self._linear(d_model, H * dk, rngs)
        self.v_proj = self._linear(d_model, H * dv, rngs)
        self.g_proj = self._linear(d_model, H * dv, rngs)
        self.gk_down = self._linear(d_model, gate_low_rank_dim, rngs)
        self.gk_up = self._linear(gate_low_rank_dim, H * dk, rngs, use_bias=True)
        self.o_proj = self._linear(H * dv, d_model, rngs)
        self.norm = RMSNorm(dv, eps=norm_eps, param_dtype=param_dtype)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.key_dim, self.value_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        q = self._heads(self.q_proj(x), self.key_dim)
        k = self._heads(self.k_proj(x), self.key_dim)
        v = self._heads(self.v_proj(x), self.value_dim)
        gk = jax.nn.log_sigmoid(self.gk_up(self.gk_down(x)).astype(jnp.float32)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = jnp.maximum(gk, self.clamp_min)
        gk = self._heads(gk, self.key_dim)
        o, state = ops.gla(q, k, v, gk, **self._op_kwargs(None if cache is None else cache.state, documents))
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        o = self.norm(o.astype(x.dtype), self._heads(self.g_proj(x), self.value_dim))
        return self.o_proj(self._merge_heads(o)), cache
