"""Activator: a GLU MLP per token in the place of attention (no token mixing).

Per token, with a hidden width F = mlp_ratio · d_model and one LayerNorm shared by both branches (affine, eps 1e-5):

    u = LN(GELU(x W_1 + b_1)),   v = LN(x W_2 + b_2),   y = (u ⊙ v) W_3 + b_3

Paper: "Activator: GLU Activations as The Core Functions of a Vision Transformer" (Abdullah and Aydin, 2024); read
from Abdullah-88/Activator `activator.py` (`ActivatorGatingUnit`): proj_1 → exact (erf) GELU → the norm, proj_2 →
the same norm, their product, proj_3, every projection with a bias; the image model feeds it the patch embeddings
and pools by the mean, so tokens meet only in the pooling. Its d_ffn is twice d_model (mlp_ratio 2). The block's
second, plain MLP (which the paper also removes) is the seqlab block's `model.mlp`.

Causality: every output reads only its own token, so the layer is causal, decodes with a cache that holds only
the position (`PositionCache`), takes packed documents and needs nothing exchanged on a split sequence.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import PositionCache
from seqlab.mixers.registry import register


@register(
    "activator",
    kind="pointwise",
    paper="Activator: GLU Activations as The Core Functions of a Vision Transformer",
    examples={"default": dict(num_heads=1), "wide": dict(num_heads=1, mlp_ratio=3.0)},
)
class Activator(Mixer):
    """The Activator gating unit, x [B, T, D] -> [B, T, D] token by token; num_heads and impl are accepted for the
    uniform mixer constructor (unused: one head, no op)."""

    takes_documents = True

    def __init__(self, d_model: int, num_heads: int, *, mlp_ratio: float = 2.0, norm_eps: float = 1e-5,
                 impl: str = "auto", rngs: nnx.Rngs | None = None, dtype: Any = None, param_dtype: Any = jnp.float32):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_positive("mlp_ratio", mlp_ratio)
        check_positive("norm_eps", norm_eps)
        hidden = max(1, round(mlp_ratio * d_model))
        self.proj_1 = self._linear(d_model, hidden, rngs, use_bias=True)
        self.proj_2 = self._linear(d_model, hidden, rngs, use_bias=True)
        self.proj_3 = self._linear(hidden, d_model, rngs, use_bias=True)
        self.norm = nnx.LayerNorm(hidden, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> PositionCache:
        self._check_cache_args(batch, max_len)
        return PositionCache(pos=jnp.zeros((), jnp.int32))

    def _forward(self, x: jax.Array, cache: PositionCache | None, documents: Documents | None = None):
        u = self.norm(jax.nn.gelu(self.proj_1(x), approximate=False))
        y = self.proj_3(u * self.norm(self.proj_2(x)))
        return y, None if cache is None else cache.replace(pos=cache.pos + x.shape[1])
