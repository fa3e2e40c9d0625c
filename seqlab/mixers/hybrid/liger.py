"""o_t = mix · SWA_t + (1 − mix) · GLA_t, then W_o, where
    SWA_t = Σ_{t−w < s <= t} softmax_s(RoPE(q)_t · RoPE(k)_s / √d) v_s                 (sliding window w = 64)
    GLA_t = S_tᵀ φ(q_t),   S_t = diag(α_t) S_{t−1} + φ(k_t) v_tᵀ,   log α_t = logsigmoid(k_t) / 16,
    φ(x) = softmax(x) over the head dimension, q_t = x_t W_q, k_t = x_t W_k (pre-RoPE), v_t = x_t W_v.

Paper: "Liger: Linearizing Large Language Models to Gated Recurrent Structures" (Lan et al., 2025). Official code:
OpenSparseLLMs/Linearization (`liger/models/liger_gla/modeling_liger_gla.py`, `configs/liger_gla.yaml`), taken
here from the project's reference notes (families.md §10), not re-read.

Liger adds no projections: it reuses a trained attention layer's W_q, W_k, W_v and W_o (`from_softmax`). The
gate is the key projection itself: the official code pools x W_k with AdaptiveAvgPool1d to H_kv · d outputs, the
identity for GLA, so G = x W_k (before RoPE) and log α = logsigmoid(G) / gate_logit_normalizer (16), one gate per
key dim. The GLA branch (op `gla`) runs on φ(q), φ(k) with scale 1, no normaliser and no output norm; the
sliding-window branch (op `softmax_attn`, window w: the query and the w − 1 keys before it) on RoPE'd q, k.
Defaults as the official Liger-GLA: window 64, mix 0.5 (o = 0.5 SWA + 0.5 GLA), every layer hybrid. Here a
window of w keys includes the query (`SlidingWindowAttention`'s convention); whether the official flash-attention
call sees 64 keys or 64 + itself was not checked. With grouped-query heads the GLA branch repeats φ(k), v and
the gate to the query heads.

Decode cache (`HybridCache` without φk): the sliding window's ring buffer of the last min(window, max_len) keys
(post-RoPE) and values [B, L, H_kv, d] with their positions [L], as `SlidingWindowAttention`'s, and the GLA state
[B, H, d, d] float32.

On a sequence split over devices (`shard_sequence`) both branches run their ops' sequence-parallel forms: the GLA
state by LASP-2 summaries, the window by a halo of window − 1 keys from the previous device.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_fraction, check_positive, check_positive_int
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import HybridCache
from seqlab.mixers.from_softmax import SoftmaxAttention, copy_projections, softmax_layout
from seqlab.mixers.registry import register
from seqlab.ops.lolcats_attn import repeat_heads


@register(
    "liger",
    kind="hybrid",
    paper="Liger: Linearizing Large Language Models to Gated Recurrent Structures",
    examples={"default": dict(num_heads=4, num_kv_heads=2, window=8)},
)
class LigerAttention(Mixer):
    """Sliding-window softmax attention mixed with gated linear attention on the same projections (see the module
    docstring)."""

    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int = 64,
        mix: float = 0.5,
        gate_logit_normalizer: float = 16.0,
        rope: bool = True,
        rope_base: float = 10000.0,
        rope_interleaved: bool = False,
        use_bias: bool = False,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self._attention_projections(
            num_kv_heads=num_kv_heads, head_dim=head_dim, rope=rope, rope_base=rope_base,
            rope_interleaved=rope_interleaved, use_bias=use_bias, rngs=rngs,
        )  # fmt: skip
        check_positive_int("window", window)
        check_fraction("mix", mix)
        check_positive("gate_logit_normalizer", gate_logit_normalizer)
        self.window, self.mix, self.gate_logit_normalizer = window, mix, gate_logit_normalizer

    @classmethod
    def from_softmax(
        cls,
        attn: SoftmaxAttention,
        *,
        window: int = 64,
        mix: float = 0.5,
        gate_logit_normalizer: float = 16.0,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
    ) -> LigerAttention:
        """The Liger layer of a trained full-attention layer: its heads, RoPE and q, k, v, o weights (Liger has no
        other parameters; rngs only seeds the projections' initialisation before the copy)."""
        layout = softmax_layout(attn)
        mixer = cls(
            attn.d_model, attn.num_heads, window=window, mix=mix, gate_logit_normalizer=gate_logit_normalizer,
            impl=impl, chunk_size=chunk_size, rngs=rngs, **layout,
        )  # fmt: skip
        copy_projections(attn, mixer)
        return mixer

    def init_cache(self, batch: int, max_len: int) -> HybridCache:
        self._check_cache_args(batch, max_len)
        slots = min(self.window, max_len)
        return HybridCache.empty(
            (batch, slots, self.num_kv_heads, self.head_dim),
            (batch, self.num_heads, self.head_dim, self.head_dim),
            self.dtype or jnp.float32,
        )

    def _forward(self, x: jax.Array, cache: HybridCache | None, documents: Documents | None = None):
        T = x.shape[1]
        sequence_axis = None if cache is not None else self.sequence_axis
        q = self._heads(self.q_proj(x), self.head_dim)
        k = self._heads(self.k_proj(x), self.head_dim)
        v = self._heads(self.v_proj(x), self.head_dim)
        o_gla, state = self._gla(q, k, v, None if cache is None else cache.state, documents)
        if self.rope is not None:
            pos = self._positions(cache, T, documents)
            q, k = self.rope(q, pos), self.rope(k, pos)
        if cache is not None:
            cache = cache.write(k, v).replace(state=state)
        if cache is not None and T == 1:  # a decode step attends to the ring buffer
            o_swa = ops.softmax_decode_step(
                q[:, 0], cache.k, cache.v, cache.key_positions, cache.pos - 1, window=self.window
            )[:, None]
        else:
            o_swa = ops.softmax_attn(
                q, k, v, causal=True, window=self.window, impl=self.impl, sequence_axis=sequence_axis,
                segment_ids=None if documents is None else documents.segment_ids,
            )  # fmt: skip
        o = self.mix * o_swa.astype(jnp.float32) + (1.0 - self.mix) * o_gla.astype(jnp.float32)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def _gla(self, q: jax.Array, k: jax.Array, v: jax.Array, state: jax.Array | None, documents: Documents | None):
        """The GLA branch on pre-RoPE q [B, T, H, d], k, v [B, T, H_kv, d] (restarting at `documents`) -> (o
        [B, T, H, d], final state or None)."""
        log_alpha = jax.nn.log_sigmoid(k.astype(jnp.float32)) / self.gate_logit_normalizer
        phi_q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
        phi_k = jax.nn.softmax(k.astype(jnp.float32), axis=-1)
        H = self.num_heads
        return ops.gla(
            phi_q, repeat_heads(phi_k, H), repeat_heads(v, H), repeat_heads(log_alpha, H), scale=1.0,
            **self._op_kwargs(state, documents),
        )  # fmt: skip
