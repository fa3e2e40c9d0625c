"""LiT's simplified linear attention, per head (d = head_dim), plus a depthwise convolution of the values:

    q̃_i = ReLU(x_i W_q),   k̃_j = ReLU(x_j W_k),   v_j = x_j W_v,   y_i = W_o (o_i + DWConv(v)_i)
Non-causal (the paper's; DiT tokens, N of them):
    o_i = q̃_iᵀ ((1/N) Σ_j k̃_j v_jᵀ) / (q̃_i·(1/N) Σ_j k̃_j + eps),   eps = 1e-6
    DWConv: centred, zero "same" padding, kernel K (K × K over a 2-D ``grid`` read in raster order)
Causal (derived here, not in the paper):
    S_t = S_{t−1} + k̃_t v_tᵀ,   z_t = z_{t−1} + k̃_t,   o_t = S_tᵀ q̃_t / (q̃_t·z_t + eps)
    DWConv(v)_t = Σ_{i<K} w_i ⊙ v_{t−K+1+i} + b   (zeros before the first token)
DWConv: one d-channel filter with bias shared by all heads (each head convolved as its own sequence), K =
`conv_size` (default 5).

Paper: "LiT: Delving into a Simplified Linear Diffusion Transformer for Image Generation" (Wang et al., 2025; its v2
is titled "LiT: Delving into a Simple Linear Diffusion Transformer for Image Generation"). Its guidelines: a simple
ReLU linear attention with a depthwise convolution on the values suffices for image generation, and fewer heads than
the softmax DiT (a larger per-head state at the same cost) is a free gain — pass a small `num_heads`; the count the
paper uses per model size could not be checked here. The rest of LiT (weight inheritance from DiT, hybrid
distillation) is training, not the mixer.
Defaults follow a public implementation of this layer (ReLU kernel, no 1/√d, the mean-normalised eps 1e-6, a 5×5
DWC of head_dim channels shared across heads, with bias, no q/k/v bias). Deviations: that code also adds 1e-6 to
ReLU(q) and ReLU(k) (here plain ReLU; eps keeps the denominator positive); its output projection has a bias (here
`use_bias`, default False, sets all four projections); the 1-D sequence (a centred 1-D DWC of kernel K) extends the
2-D layer; the causal variant is this module's: eps is added to the running sum q̃·z_t, not to a mean, and the
convolution becomes a causal 1-D `ShortConv` (a grid is non-causal only).

Engine: causal, `seqlab.ops.linear_attn` (normalize=True, scale=1; packed documents and sequence parallelism
through the op); non-causal, the means from the engine's final state (`global_means`, over every device of a split
sequence) with the convolution on the all-gathered values.

Decode cache (causal): `RecurrentCache` with state [B, H, d, d + 1] float32 (the key sum z in the last column) and
conv [B·H, K − 1, d] (the last values of each head, batch-major: row b·H + h).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv, fold_heads, head_shared_conv, unfold_heads
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.global_means import global_means, normalized_readout
from seqlab.layers.grid_conv import CentredConv, check_grid
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "lit",
    kind="linear",
    paper="LiT: Delving into a Simplified Linear Diffusion Transformer for Image Generation",
    examples={"default": dict(num_heads=2), "noncausal": dict(num_heads=2, causal=False, conv_size=3)},
)  # 2-d (whole grids only): tests/mixers/test_lit.py
class LiT(Mixer):
    """LiT's ReLU linear attention plus the head-shared depthwise convolution of the values (causal by default;
    causal=False is the paper's form, on a 1-D sequence or a ``grid`` (rows, cols)), x [B, T, D] -> [B, T, D]."""

    takes_documents = True  # in its causal form

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = True,
        grid: tuple[int, int] | None = None,
        head_dim: int | None = None,
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
        self.causal, self.grid = causal, check_grid(grid)
        if causal and self.grid is not None:
            raise ValueError("causal: LiT on a 2-d grid is non-causal; give causal=False")
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        check_positive("eps", eps)
        self.eps = eps
        d = self.head_dim
        self.kernel = make_feature_map("relu", d, num_heads=num_heads, rngs=rngs)
        self._projections(d, d, rngs, use_bias=use_bias)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = (ShortConv(d, kernel_size=conv_size, use_bias=True, activation=None, **layer) if causal
                     else CentredConv(d, conv_size, self.grid, **layer))

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        H, d = self.num_heads, self.head_dim
        return RecurrentCache.empty((batch, H, d, d + 1), conv=self.conv.init_state(batch * H))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        d = self.head_dim
        q = self.kernel(self._heads(self.q_proj(x), d))
        k = self.kernel(self._heads(self.k_proj(x), d))
        v = self._heads(self.v_proj(x), d)
        if not self.causal:
            local = unfold_heads(self._on_whole_sequence(self.conv, fold_heads(v)), self.num_heads)
            return self.o_proj(self._merge_heads(self._global(q, k, v).astype(x.dtype) + local)), cache
        state = None if cache is None else cache.state
        o, state = ops.linear_attn(q, k, v.astype(jnp.float32), scale=1.0, normalize=True, eps=self.eps,
                                   **self._op_kwargs(state, documents))
        local, conv_state = head_shared_conv(self.conv, v, None if cache is None else cache.conv, documents)
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + x.shape[1])
        y = o.astype(x.dtype) + local
        return self.o_proj(self._merge_heads(y)), cache

    def _global(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """Non-causal: q, k, v [B, T, H, d] -> o [B, T, H, d] float32 = q̃ᵀ(Σ k̃ vᵀ / N) / (q̃·Σ k̃ / N + eps)."""
        return normalized_readout(q, global_means(k, v, **self._op_kwargs(None)), self.eps)
