"""S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t),  o_t = S_t^T phi(q_t) / (phi(q_t) . z_t + eps).

Paper: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (Katharopoulos et al.,
2020). With feature_map="taylor" (feature_dim 16) this is Based's linear layer ("Simple linear attention language
models balance the recall-throughput tradeoff", Arora et al., 2024); with "hedgehog" it is "The Hedgehog & the
Porcupine" (Zhang et al., 2024). See `seqlab.layers.feature_maps` for the maps.

Defaults follow Katharopoulos et al.: elu+1, denominator on (normalize=True, eps 1e-6), no 1/sqrt(d) (scale=1;
the denominator cancels any scale anyway), no positional encoding, no output norm. Layer: q = phi(x W_q),
k = phi(x W_k) with `feature_dim` inputs per head (default d_model / H, 16 for taylor), v = x W_v (d_model / H per
head), op `linear_attn`, then W_o. fla's `LinearAttention` layer (no denominator, RMSNorm output, d^-1/2) is a
different model and not this one.

Decode cache: `RecurrentCache` with state [B, H, F, d_v + 1] float32 (F = phi's feature count; the last column is
the key sum z when normalize=True, otherwise [B, H, F, d_v]).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.feature_maps import make_feature_map
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "linear_attn",
    kind="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    examples={
        "elu1": dict(num_heads=2),
        "relu": dict(num_heads=2, feature_map="relu", normalize=False),
        "identity": dict(num_heads=2, feature_map="identity", normalize=False),
        "taylor": dict(num_heads=2, feature_map="taylor", feature_dim=8),
        "hedgehog": dict(num_heads=2, feature_map="hedgehog", num_features=8),
    },
)
class LinearAttention(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        feature_map: str = "elu1",
        feature_dim: int | None = None,
        num_features: int | None = None,
        value_dim: int | None = None,
        normalize: bool = True,
        eps: float = 1e-6,
        scale: float = 1.0,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        if feature_dim is None and feature_map == "taylor":
            feature_dim = 16
        self.feature_dim = resolve_dim("feature_dim", feature_dim, d_model, "d_model", num_heads, "num_heads")
        self.value_dim = resolve_dim("value_dim", value_dim, d_model, "d_model", num_heads, "num_heads")
        check_positive("eps", eps)
        check_positive("scale", scale)
        self.normalize, self.eps, self.scale = normalize, eps, scale
        fm = dict(num_heads=num_heads, num_features=num_features, rngs=rngs, param_dtype=param_dtype)
        self.q_map = make_feature_map(feature_map, self.feature_dim, **fm)
        self.k_map = make_feature_map(feature_map, self.feature_dim, **fm)
        H = num_heads
        self.q_proj = self._linear(d_model, H * self.feature_dim, rngs)
        self.k_proj = self._linear(d_model, H * self.feature_dim, rngs)
        self.v_proj = self._linear(d_model, H * self.value_dim, rngs)
        self.o_proj = self._linear(H * self.value_dim, d_model, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        v = self.value_dim + int(self.normalize)
        return RecurrentCache.empty((batch, self.num_heads, self.q_map.out_dim, v))

    def features(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """phi(q), phi(k) [B, T, H, F] of x [B, T, d_model] (what attention distillation compares)."""
        q = self.q_map(self._heads(self.q_proj(x), self.feature_dim))
        k = self.k_map(self._heads(self.k_proj(x), self.feature_dim))
        return q, k

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        q, k = self.features(x)
        v = self._heads(self.v_proj(x), self.value_dim)
        o, state = ops.linear_attn(
            q, k, v, scale=self.scale, normalize=self.normalize, eps=self.eps,
            **self._op_kwargs(None if cache is None else cache.state, documents),
        )  # fmt: skip
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache
