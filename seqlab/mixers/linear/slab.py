"""SLAB's simplified linear attention, per head (d = head_dim, p_t the learnable absolute position embedding):

    q̃_t = ReLU(q_t),   k̃_t = ReLU(k_t + p_t)
    S_t = S_{t−1} + k̃_t v_tᵀ,   z_t = z_{t−1} + k̃_t
    o_t = S_tᵀ q̃_t / (q̃_t·z_t + eps) + DWConv(v)_t,   eps = 1e-6
    DWConv(v)_t = Σ_{i<K} w_i ⊙ v_{t−K+1+i} + b   (depthwise over the d channels of a head, one filter shared by
                                                   all heads; zeros before the first token)

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization" (Guo et al., ICML 2024); read from xinghaochen/SLAB `classification/models/slab_deit.py`,
`slab_swin.py`. The paper's PRepBN (which replaces LayerNorm) is `seqlab.models.prepbn.PRepBN`.

Defaults follow the official code: ReLU kernel on q and on k + p (p [max_len, H·d], one entry per channel, zero
init), normalised linear attention in float32 with eps 1e-6 and no 1/√d (`linear_attn`, normalize=True, scale=1;
the official `focusing_factor` is stored but unused, so it is absent here), the depthwise conv with bias,
channels = head_dim shared across heads. The official conv is a 5×5 2-D conv on the image grid (centred, so
non-causal); here it is a 1-D causal conv over time (one d-channel `ShortConv`, each head run through it as its own
sequence) with kernel `conv_size` = 5, in both modes. `causal=False` (the paper's vision setting) is
global normalised linear attention: o_i = q̃_iᵀ(Σ_j k̃_j v_jᵀ) / (q̃_i·Σ_j k̃_j + eps) over all N tokens, from the
engine's final state (`global_means`); it has no decode cache.

Positions: p is indexed by absolute position (continuing from the cache's counter when decoding), so a sequence
may hold at most `max_len` tokens: longer inputs and caches raise ValueError; a decode step past max_len (whose
position is only known at run time) yields NaN.

Decode cache: `RecurrentCache` with state [B, H, d, d + 1] float32 (the key sum z in the last column) and conv
[B·H, conv_size − 1, d] (the last values of each head, batch-major: row b·H + h).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, check_positive_int, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv, head_shared_conv
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.global_means import global_means, normalized_readout
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "slab",
    kind="linear",
    paper="SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch "
    "Normalization",
    examples={"default": dict(num_heads=2, max_len=64), "noncausal": dict(num_heads=2, causal=False, max_len=64)},
)
class SLAB(Mixer):
    """SLAB's simplified linear attention plus the head-shared depthwise conv, x [B, T, D] -> [B, T, D]."""

    takes_documents = True  # in its causal form

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = True,
        head_dim: int | None = None,
        max_len: int = 2048,
        conv_size: int = 5,
        eps: float = 1e-6,
        use_bias: bool = False,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.causal = causal
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        check_positive_int("max_len", max_len)
        check_positive("eps", eps)
        self.max_len, self.eps = max_len, eps
        H, d = num_heads, self.head_dim
        self.kernel = make_feature_map("relu", d, num_heads=H, rngs=rngs)
        self._projections(d, d, rngs, use_bias=use_bias)
        self.pos_embedding = nnx.Param(jnp.zeros((max_len, H * d), param_dtype))
        self.conv = ShortConv(
            d, kernel_size=conv_size, use_bias=True, activation=None, rngs=rngs, param_dtype=param_dtype, dtype=dtype
        )

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        self._check_length("max_len", max_len)
        H, d = self.num_heads, self.head_dim
        return RecurrentCache.empty((batch, H, d, d + 1), conv=self.conv.init_state(batch * H))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        T = x.shape[1]
        sequence_axis = None if cache is not None else self.sequence_axis
        self._check_length("x", T * (1 if sequence_axis is None else jax.lax.axis_size(sequence_axis)))
        pos = self._positions(cache, T, documents)
        q = self.kernel(self._heads(self.q_proj(x), self.head_dim))
        k = self.kernel(self._heads(self.k_proj(x) + self._position_embedding(pos, x.dtype), self.head_dim))
        v = self._heads(self.v_proj(x), self.head_dim)
        if self.causal:
            o, state = ops.linear_attn(
                q, k, v.astype(jnp.float32), scale=1.0, normalize=True, eps=self.eps,
                **self._op_kwargs(None if cache is None else cache.state, documents),
            )  # fmt: skip
        else:
            o, state = self._global(q, k, v), None
        local, conv_state = head_shared_conv(self.conv, v, None if cache is None else cache.conv, documents)
        y = self._merge_heads(o.astype(x.dtype) + local)
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + T)
        return self.o_proj(y), cache

    def _check_length(self, name: str, length: int) -> None:
        if length > self.max_len:
            raise ValueError(
                f"{name}: {length} positions exceed the position embedding's max_len={self.max_len}; "
                f"build SLAB with a larger max_len"
            )

    def _position_embedding(self, pos: jax.Array, dtype: Any) -> jax.Array:
        """p at the positions pos [T] (absolute) or [B, T] (within documents) -> [(B,) T, H·d]; NaN rows for
        positions >= max_len."""
        table = self.pos_embedding[...].astype(jnp.float32)
        return jnp.take(table, pos, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)

    def _global(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Non-causal: q, k, v [B, T, H, d] -> o [B, T, H, d] float32 = q̃ᵀ(Σ k̃ vᵀ) / (q̃·Σ k̃ + eps), written with means
        (both sums divided by N, eps by N)."""
        means = global_means(k, v, **self._op_kwargs(None))
        return normalized_readout(q, means, self.eps / means.length)
