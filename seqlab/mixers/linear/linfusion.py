"""LinFusion's generalised linear attention (non-causal only), per head, over all N tokens:

    q_i = W_q (x_i + MLP_q(x_i)),   k_j = W_k (x_j + MLP_k(x_j)),   v_j = W_v x_j
    MLP = Linear(D, M) → LayerNorm(M) → LeakyReLU(0.01) → Linear(M, D)      (M = `mlp_dim`, default D)
    φ(x) = elu(x) + 1
    o_i = φ(q_i)ᵀ ((1/N) Σ_j φ(k_j) v_jᵀ) / (φ(q_i)·(1/N) Σ_j φ(k_j) + eps),   eps = 1e-4

Paper: "LinFusion: 1 GPU, 1 Minute, 16K Image" (Liu et al., 2024); read from Huage001/LinFusion
`src/linfusion/attention.py`. The paper derives the layer as a normalisation-aware, non-causal Mamba; the released
code (followed here) has no decay or gating, which collapses it to the formula above.

Defaults follow the released code: elu+1 on q and k, no 1/√d, eps 1e-4 added to the mean-normalised denominator,
N^-1/2 on each factor of the KᵀV product (the means come from the engine's final state on the keys [φk, 1] / √N and
values [v, 1] / √N, `global_means`, so impl / chunk_size pick the form that sums over tokens), MLPs with biases and
LayerNorm eps 1e-5, no position encoding. The layer is non-causal (every token sees the whole sequence; the model
replaces the self-attention of diffusion UNets): `causal` is False, and `init_cache` raises ValueError.

MLP initialisation (`mlp_zero_init`): True (default) zeros the last Linear of both MLPs, so x + MLP(x) = x at init
and a layer built from a softmax layer (`from_softmax`) starts with exactly its q, k, v projections; False
gives it Flax's default (random) init like the first Linear, closer to the released code, whose MLPs keep PyTorch's
random default init (so its converted layers do not start at x + MLP(x) = x).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive, check_positive_int, resolve_dim
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.global_means import global_means
from seqlab.layers.heads import repeat_kv_columns
from seqlab.mixers.base import Mixer
from seqlab.mixers.from_softmax import SoftmaxAttention, check_softmax
from seqlab.mixers.registry import register


class ProjectionMLP(nnx.Module):
    """x [..., D] -> Linear(D, M) → LayerNorm(M) → LeakyReLU(0.01) → Linear(M, D) [..., D]; zero_init zeros the last
    Linear (kernel and bias), so the MLP starts as the zero map."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        zero_init: bool,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        dense = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        last_init = dict(kernel_init=nnx.initializers.zeros_init()) if zero_init else {}
        self.inner = nnx.Linear(dim, hidden, **dense)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.outer = nnx.Linear(hidden, dim, **dense, **last_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.outer(jax.nn.leaky_relu(self.norm(self.inner(x)), negative_slope=0.01))


@register(
    "linfusion",
    kind="linear",
    paper="LinFusion: 1 GPU, 1 Minute, 16K Image",
    examples={"default": dict(num_heads=2)},
)
class LinFusionAttention(Mixer):
    """LinFusion's generalised linear attention (non-causal), x [B, T, D] -> [B, T, D]."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        mlp_zero_init: bool = True,
        eps: float = 1e-4,
        use_bias: bool = False,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        mlp_dim = d_model if mlp_dim is None else mlp_dim
        check_positive_int("mlp_dim", mlp_dim)
        check_positive("eps", eps)
        self.eps = eps
        H, d = num_heads, self.head_dim
        mlp = dict(zero_init=mlp_zero_init, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_mlp = ProjectionMLP(d_model, mlp_dim, **mlp)
        self.k_mlp = ProjectionMLP(d_model, mlp_dim, **mlp)
        self.kernel = make_feature_map("elu1", d, num_heads=H, rngs=rngs)
        self._projections(d, d, rngs, use_bias=use_bias)

    @classmethod
    def from_softmax(
        cls,
        attention: SoftmaxAttention,
        *,
        mlp_dim: int | None = None,
        eps: float = 1e-4,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
    ) -> LinFusionAttention:
        """A LinFusion layer initialised from a trained softmax layer (LinFusion's distillation start): copies of its
        W_q, W_k, W_v, W_o (and biases), the grouped key/value heads of GQA repeated per query head; MLPs
        zero-initialised at the output, so at first q = W_q x and k = W_k x exactly. The softmax layer's RoPE,
        window and causal mask have no counterpart here (LinFusion is global and position-free)."""
        check_softmax(attention, "attention", full=False)
        linfusion = cls(
            attention.d_model, attention.num_heads, head_dim=attention.head_dim, mlp_dim=mlp_dim, mlp_zero_init=True,
            eps=eps, use_bias=attention.q_proj.bias is not None, impl=impl, chunk_size=chunk_size, rngs=rngs,
            dtype=attention.dtype, param_dtype=attention.param_dtype,
        )  # fmt: skip
        group = attention.num_heads // attention.num_kv_heads
        for name, repeats in (("q_proj", 1), ("k_proj", group), ("v_proj", group), ("o_proj", 1)):
            source, target = getattr(attention, name), getattr(linfusion, name)
            target.kernel[...] = repeat_kv_columns(source.kernel[...], attention.head_dim, repeats)
            if source.bias is not None:
                target.bias[...] = repeat_kv_columns(source.bias[...], attention.head_dim, repeats)
        return linfusion

    def init_cache(self, batch: int, max_len: int) -> None:
        """Always raises ValueError: a non-causal layer has no decode cache."""
        self._check_cache_args(batch, max_len)

    def _forward(self, x: jax.Array, cache: Any):
        d = self.head_dim
        q = self.kernel(self._heads(self.q_proj(x + self.q_mlp(x)), d))
        k = self.kernel(self._heads(self.k_proj(x + self.k_mlp(x)), d))
        v = self._heads(self.v_proj(x), d)
        means = global_means(k, v, **self._op_kwargs(None))
        q32 = q.astype(jnp.float32)
        numerator = jnp.einsum("bthk,bhkv->bthv", q32, means.kv)
        denominator = jnp.einsum("bthk,bhk->bth", q32, means.k)[..., None] + self.eps
        return self.o_proj(self._merge_heads((numerator / denominator).astype(x.dtype))), cache
