"""Flowformer: attention as a conservation flow network between sources (keys) and sinks (queries).

Paper: "Flowformer: Linearizing Transformers with Conservation Flows" (Wu et al., ICML 2022); read from
thuml/Flowformer `Flow_Attention.py` (`Flow_Attention`, `Flow_Attention_Causal`).

Per head, with φ = sigmoid on q and k (ε = 1e-6, t 1-based, prefix sums in the causal form):
    causal:     I_t = t / (φq_t · Σ_{j<=t} φk_j),   O_t = t / (φk_t · Σ_{i<=t} φq_i),
                Î_t = φq_t · Σ_{j<=t} φk_j O_j / t,   Ô_t = clamp(φk_t · Σ_{i<=t} φq_i I_i / t, ±1),
                a_t = σ(Î_t),   c_t = t · e^{Ô_t} / Σ_{j<=t} e^{Ô_j},
                o_t = a_t · (φq_t I_t / t)ᵀ S_t,   S_t = S_{t-1} + φk_t (c_t v_t)ᵀ;
    non-causal: the same flows with whole-sequence sums and no division by t, allocation σ(Î · N/M), competition
                softmax(Ô) · M (N = M = T).
ε (a guard for the divisions) is added where the official code adds it: to φq, φk and to every sum inside the
dot products (see `seqlab.ops.flow_attn`).

Layer (official code): q, k, v = x W_q, x W_k, x W_v with biases, d_model / H per head; op `flow_attn`; W_o with
bias. Dropout is left out. `causal=False` is the bidirectional Flow-Attention (vision, classification): the mixer
then has no decode path (`self.causal = False`).

Decode cache (`FlowCache`): the op's `FlowState` — Σφk, Σφq, Σφk·O, Σφq·I [B, H, d] float32, Σe^{Ô} [B, H]
float32, S [B, H, d, d] float32 — and the position counter (t of the next token is pos + 1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive, resolve_dim
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import FlowCache
from seqlab.mixers.registry import register
from seqlab.ops.flow_attn import FlowState, flow_attn


@register(
    "flowformer",
    kind="linear",
    paper="Flowformer: Linearizing Transformers with Conservation Flows",
    examples={"default": dict(num_heads=2), "noncausal": dict(num_heads=2, causal=False)},
)
class FlowAttention(Mixer):
    takes_documents = True  # in its causal form

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = True,
        head_dim: int | None = None,
        eps: float = 1e-6,
        use_bias: bool = True,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        check_positive("eps", eps)
        self.causal = causal
        self.eps = eps
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        self._projections(self.head_dim, self.head_dim, rngs, use_bias=use_bias)

    def init_cache(self, batch: int, max_len: int) -> FlowCache:
        self._check_cache_args(batch, max_len)
        prefix = FlowState.zeros(batch, self.num_heads, self.head_dim, self.head_dim)
        return FlowCache(prefix=prefix, pos=jnp.zeros((), jnp.int32))

    def _forward(self, x: jax.Array, cache: FlowCache | None, documents: Documents | None = None):
        q = jax.nn.sigmoid(self._heads(self.q_proj(x), self.head_dim))
        k = jax.nn.sigmoid(self._heads(self.k_proj(x), self.head_dim))
        v = self._heads(self.v_proj(x), self.head_dim)
        if cache is None:
            o, _ = flow_attn(q, k, v, causal=self.causal, eps=self.eps, **self._op_kwargs(None, documents))
        else:
            o, prefix = flow_attn(q, k, v, eps=self.eps, offset=cache.pos, **self._op_kwargs(cache.prefix))
            cache = cache.replace(prefix=prefix, pos=cache.pos + x.shape[1])
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache
