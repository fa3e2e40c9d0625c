"""TransNormer: NormAttention (linear, no denominator, output norm) and DiagAttention (block-local).

Paper: "The Devil in Linear Transformer" (Qin et al., EMNLP 2022); read from OpenNLPLab/fairseq-evo
(`norm_linear_attention.py`, `norm_local_attention.py`, `urpe.py`, `rms_norm.py`, the `norm_transformer_lm` archs).

NormAttention (per head, q_t = URPE(φ(x_t W_q + b_q)), k_t = URPE(φ(x_t W_k + b_k)), v_t = x_t W_v + b_v):

    S_t = S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t            (no 1/√d, no denominator)
    y_t = SRMSNorm(concat_h o_t) W_o + b_o

DiagAttention (per head, q, k = URPE(x W + b) on the raw projections, no φ): causal attention inside
non-overlapping blocks of 64 tokens, nothing across blocks (`seqlab.ops.block_local_attn`), logits q·k/√d;

    T1: weights relu(logits) (unnormalised), then SRMSNorm over the concatenated heads, then W_o;
    T2: softmax inside the block, no output norm, then W_o.

SRMSNorm(x) = x / (‖x‖₂ · D^(-1/2) + 1e-8) over all D = H·d features, no weights (fairseq-evo's SimpleRMSNorm).
It is `transnormer_srms_norm` below, not `layers.norms.srms_norm` (x / sqrt(mean(x²) + eps), TransNormerLLM's form):
the eps sits outside the square root.

Variants (`variant`): "t1" (the code's T1: φ = plain ELU, which can be negative; ReLU block weights + norm) and
"t2" (φ = 1 + ELU; softmax blocks). URPE (`use_urpe`, default True as in the LM archs) is applied to q and k after
φ in both layer types; each layer has one URPE shared by q and k. Projections carry biases (`use_bias`, default
True as fairseq's Linear). The LM layout puts DiagAttention in the first half of the layers and NormAttention in
the second (`transnormer_layout`).

Decode caches: NormAttention, `RecurrentCache` with state [B, H, d, d] float32. DiagAttention, `BlockCache`: the
keys and values of the current block ([B, block_size, H, d] float32) and the position counter; a new block starts
over at every position % block_size == 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_choice, check_positive, check_positive_int, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.lrpe import URPE
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import BlockCache, RecurrentCache
from seqlab.mixers.registry import register
from seqlab.ops.block_local_attn import block_local_attn, block_local_attn_cached

VARIANTS = ("t1", "t2")


def transnormer_srms_norm(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """TransNormer's SimpleRMSNorm over the last axis: x / (‖x‖₂ · D^(-1/2) + eps), computed in float32 and cast
    back to x.dtype. x: [..., D] with D = all heads concatenated.

    A zero row (T1's ReLU weights can zero a whole output) maps to zero with the finite gradient 1/eps: the square
    root is only taken of positive sums, so no inf · 0 reaches the backward pass."""
    x32 = x.astype(jnp.float32)
    sum_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
    positive = sum_sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
    return (x32 / (norm * x.shape[-1] ** -0.5 + eps)).astype(x.dtype)


def transnormer_layout(num_layers: int, variant: str = "t1") -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """The TransNormer LM layout: (mixer of every layer, mixer_args).

    The first num_layers // 2 layers are "transnormer_diag" and the rest "transnormer_norm" (an odd count gives
    NormAttention the extra layer; fairseq-evo's list only covers even counts). mixer_args sets `variant` on both.
    """
    check_positive_int("num_layers", num_layers)
    check_choice("variant", variant, VARIANTS)
    local = num_layers // 2
    pattern = ("transnormer_diag",) * local + ("transnormer_norm",) * (num_layers - local)
    return pattern, {"transnormer_diag": {"variant": variant}, "transnormer_norm": {"variant": variant}}


class _TransNormerMixer(Mixer):
    """q, k, v, o projections with biases and the optional URPE, shared by both layer types."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        variant: str,
        use_urpe: bool,
        use_bias: bool,
        norm_eps: float,
        impl: str,
        chunk_size: int | None,
        rngs: nnx.Rngs | None,
        dtype: Any,
        param_dtype: Any,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_choice("variant", variant, VARIANTS)
        check_positive("norm_eps", norm_eps)
        self.variant, self.norm_eps = variant, norm_eps
        self.head_dim = resolve_dim("head_dim", None, d_model, "d_model", num_heads, "num_heads")
        self.urpe = URPE(self.head_dim, rngs=rngs, param_dtype=param_dtype) if use_urpe else None
        self._projections(self.head_dim, self.head_dim, rngs, use_bias=use_bias)

    def _position_encode(
        self, q: jax.Array, k: jax.Array, cache: Any, documents: Documents | None = None
    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """URPE on q, k [B, T, H, d] at their positions (within each document of packed rows; identity without
        URPE)."""
        if self.urpe is None:
            return q, k
        pos = self._positions(cache, q.shape[1], documents)
        return self.urpe(q, pos), self.urpe(k, pos)


@register(
    "transnormer_norm",
    kind="linear",
    paper="The Devil in Linear Transformer",
    examples={"t1": dict(num_heads=2), "t2": dict(num_heads=2, variant="t2")},
)
class NormAttention(_TransNormerMixer):
    """TransNormer's linear layer: additive linear attention (φ = ELU for T1, 1 + ELU for T2), SRMSNorm, W_o."""

    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        variant: str = "t1",
        use_urpe: bool = True,
        use_bias: bool = True,
        norm_eps: float = 1e-8,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(
            d_model, num_heads, variant=variant, use_urpe=use_urpe, use_bias=use_bias, norm_eps=norm_eps, impl=impl,
            chunk_size=chunk_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip

    def feature_map(self, x: jax.Array) -> jax.Array:
        """φ: ELU (T1) or 1 + ELU (T2)."""
        phi = jax.nn.elu(x)
        return phi + 1.0 if self.variant == "t2" else phi

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.head_dim, self.head_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        q = self.feature_map(self._heads(self.q_proj(x), self.head_dim))
        k = self.feature_map(self._heads(self.k_proj(x), self.head_dim))
        q, k = self._position_encode(q, k, cache, documents)
        v = self._heads(self.v_proj(x), self.head_dim)
        o, state = ops.linear_attn(
            q, k, v, scale=1.0, normalize=False, **self._op_kwargs(None if cache is None else cache.state, documents)
        )
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        o = transnormer_srms_norm(self._merge_heads(o.astype(x.dtype)), self.norm_eps)
        return self.o_proj(o), cache


@register(
    "transnormer_diag",
    kind="softmax",
    paper="The Devil in Linear Transformer",
    examples={"t1": dict(num_heads=2, block_size=8), "t2": dict(num_heads=2, block_size=8, variant="t2")},
)
class DiagAttention(_TransNormerMixer):
    """TransNormer's block-local layer: causal attention inside blocks of `block_size` tokens.

    `impl` is accepted for the uniform mixer constructor; the block-local op has one (dense per block) form and no
    chunk size. On a sequence split over devices (`shard_sequence`) every shard must hold whole blocks.
    """

    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        variant: str = "t1",
        block_size: int = 64,
        use_urpe: bool = True,
        use_bias: bool = True,
        norm_eps: float = 1e-8,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("block_size", block_size)
        super().__init__(
            d_model, num_heads, variant=variant, use_urpe=use_urpe, use_bias=use_bias, norm_eps=norm_eps, impl=impl,
            chunk_size=None, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip
        self.block_size = block_size

    @property
    def weights(self) -> str:
        """Block weighting: "relu" (T1) or "softmax" (T2)."""
        return "relu" if self.variant == "t1" else "softmax"

    def init_cache(self, batch: int, max_len: int) -> BlockCache:
        self._check_cache_args(batch, max_len)
        shape = (batch, self.block_size, self.num_heads, self.head_dim)
        zeros = jnp.zeros(shape, jnp.float32)
        return BlockCache(k=zeros, v=zeros, pos=jnp.zeros((), jnp.int32))

    def _forward(self, x: jax.Array, cache: BlockCache | None, documents: Documents | None = None):
        T = x.shape[1]
        if cache is None:
            self._check_shard_length(T)
        q = self._heads(self.q_proj(x), self.head_dim)
        k = self._heads(self.k_proj(x), self.head_dim)
        q, k = self._position_encode(q, k, cache, documents)
        v = self._heads(self.v_proj(x), self.head_dim)
        if cache is None and documents is not None:  # blocks restart with every document
            o = block_local_attn(q, k, v, block_size=self.block_size, weights=self.weights,
                                 positions=documents.positions, sequence_axis=self.sequence_axis)  # fmt: skip
        elif cache is None:
            o = block_local_attn(q, k, v, block_size=self.block_size, weights=self.weights)
        else:
            o, k_block, v_block = block_local_attn_cached(q, k, v, cache.k, cache.v, cache.pos, weights=self.weights)
            cache = BlockCache(k=k_block, v=v_block, pos=cache.pos + T)
        o = self._merge_heads(o.astype(x.dtype))
        if self.variant == "t1":
            o = transnormer_srms_norm(o, self.norm_eps)
        return self.o_proj(o), cache

    def _check_shard_length(self, length: int) -> None:
        if self.sequence_axis is not None and length % self.block_size:
            raise ValueError(
                f"x: a sequence shard of {length} tokens must hold whole blocks of block_size={self.block_size} "
                f"tokens (blocks do not cross shards)"
            )
