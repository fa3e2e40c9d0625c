"""InLine (injective linear) attention, φ = identity, s = d^-1/2 (d = head_dim), per head:

Non-causal (the paper; N tokens, k̄ = Σ_j k_j / N, v̄ = Σ_j v_j / N):
    w_ij = s q_i·k_j / N − s q_i·k̄ / N + 1/N            (Σ_j w_ij = 1 exactly; weights may be negative)
    o_i  = Σ_j w_ij v_j = s q_iᵀ (Σ_j k_j v_jᵀ / N) + (1 − s q_i·k̄) v̄
Causal (derived here, not in the paper: the non-causal formula on each prefix j <= t, N = t), with the additive
states S_t = Σ_{j<=t} k_j v_jᵀ, z_t = Σ_{j<=t} k_j, u_t = Σ_{j<=t} v_j:
    o_t = (s/t) S_tᵀ q_t − (s/t²)(q_t·z_t) u_t + u_t / t  =  [s S_tᵀ q_t + (1 − s q_t·z_t / t) u_t] / t

Paper: "Bridging the Divide: Reconsidering Softmax and Linear Attention" (Han et al., NeurIPS 2024); read from
LeapLabTHU/InLine `models/inline_deit.py`.

Engine: the states are those of the augmented recurrence Σ_j [k_j; 1][v_j; 1]ᵀ = [[S, z], [uᵀ, t]]. The causal form
reads them with two `seqlab.ops.linear_attn` calls (normalize=False, scale=1) on the values [v, 1]: keys k and query q
give [S_tᵀ q_t, q_t·z_t]; keys and queries of ones give [u_t, t]. No division by a data-dependent normaliser, so no
eps. The non-causal form takes the final state of one call on the keys [k, 1] / √N and values [v, 1] / √N
(`global_means`): the official code's √(s/N) on each factor of KᵀV, with s applied to q instead.

Layer: q, k, v = x W_q, x W_k, x W_v (d = d_model / H per head), the InLine output, plus a local term, then W_o.
Local module: the paper's is a per-sample dynamic 3×3 depthwise conv on V (2-D and non-causal, its kernel predicted
from mean-pooled x). A 1-D static depthwise causal conv on V (`ShortConv`, no bias, no activation, one filter per
channel, kernel `local_conv_size`, default 3; 0 = off) replaces it here, in both modes. Defaults follow the official
code: s = d^-1/2, φ = identity, the local module on. `causal=False` is the paper's (vision) form; it has no decode
cache.

Decode cache: `RecurrentCache` with state [B, H, d + 1, d + 1] float32 = [[S, z], [uᵀ, t]] per head and, with the
local module, conv [B, local_conv_size − 1, H·d].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.core.documents import Documents
from seqlab.ops import _common as ops_common
from seqlab.checks import check_positive, check_positive_int, resolve_dim
from seqlab.layers.conv import ShortConv
from seqlab.layers.global_means import global_means
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


def inline_output(q_kv: jax.Array, q_k: jax.Array, v_mean: jax.Array, scale: float) -> jax.Array:
    """o = s·q_kv + (1 − s·q_k)·v_mean, with q_kv = qᵀ(Σ k vᵀ / N) [..., V], q_k = q·k̄ [..., 1], v_mean = v̄."""
    return scale * q_kv + (1.0 - scale * q_k) * v_mean


@register(
    "inline",
    kind="linear",
    paper="Bridging the Divide: Reconsidering Softmax and Linear Attention",
    examples={"default": dict(num_heads=2), "noncausal": dict(num_heads=2, causal=False)},
)
class InLineAttention(Mixer):
    """InLine attention (causal by default; causal=False is the paper's global form), x [B, T, D] -> [B, T, D]."""

    takes_documents = True  # in its causal form

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        causal: bool = True,
        head_dim: int | None = None,
        scale: float | None = None,
        local_conv_size: int = 3,
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
        if scale is not None:
            check_positive("scale", scale)
        self.scale = self.head_dim**-0.5 if scale is None else scale
        if local_conv_size != 0:
            check_positive_int("local_conv_size", local_conv_size)
        H, d = num_heads, self.head_dim
        self._projections(d, d, rngs, use_bias=use_bias)
        conv = dict(kernel_size=local_conv_size, activation=None, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.local_conv = ShortConv(H * d, **conv) if local_conv_size else None

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        d = self.head_dim
        conv = None if self.local_conv is None else self.local_conv.init_state(batch)
        return RecurrentCache.empty((batch, self.num_heads, d + 1, d + 1), conv=conv)

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        v_flat = self.v_proj(x)
        q = self._heads(self.q_proj(x), self.head_dim)
        k = self._heads(self.k_proj(x), self.head_dim)
        v = self._heads(v_flat, self.head_dim)
        if self.causal:
            o, state = self._causal(q, k, v, None if cache is None else cache.state, documents)
        else:
            o, state = self._non_causal(q, k, v), None
        y = self._merge_heads(o).astype(x.dtype)
        conv_state = None
        if self.local_conv is not None:
            local, conv_state = self.local_conv(v_flat, None if cache is None else cache.conv, documents)
            y = y + local
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + x.shape[1])
        return self.o_proj(y), cache

    def _causal(
        self, q: jax.Array, k: jax.Array, v: jax.Array, state: jax.Array | None, documents: Documents | None = None
    ):
        """q, k [B, T, H, d], v [B, T, H, d]; state [B, H, d + 1, d + 1] or None -> (o [B, T, H, d] float32, new
        state or None). Reads [S_tᵀq_t, q_t·z_t] and [u_t, t] from the engine (two calls on the values [v, 1]);
        with documents, t counts from each document's start."""
        d = self.head_dim
        values = ops_common.with_ones(v)
        ones = jnp.ones((*v.shape[:-1], 1), jnp.float32)
        kv_state, sums_state = (None, None) if state is None else (state[..., :d, :], state[..., d:, :])
        read, kv_state = ops.linear_attn(q, k, values, scale=1.0, **self._op_kwargs(kv_state, documents))
        sums, sums_state = ops.linear_attn(ones, ones, values, scale=1.0, **self._op_kwargs(sums_state, documents))
        count = sums[..., -1:]
        o = inline_output(read[..., :-1] / count, read[..., -1:] / count, sums[..., :-1] / count, self.scale)
        return o, None if state is None else jnp.concatenate([kv_state, sums_state], axis=-2)

    def _non_causal(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q, k, v [B, T, H, d] -> o [B, T, H, d] float32 (every token sees the whole sequence)."""
        means = global_means(k, v, **self._op_kwargs(None))
        q32 = q.astype(jnp.float32)
        q_kv = jnp.einsum("bthk,bhkv->bthv", q32, means.kv)
        q_k = jnp.einsum("bthk,bhk->bth", q32, means.k)[..., None]
        return inline_output(q_kv, q_k, means.v[:, None], self.scale)
