"""y_i = [γ_h Σ_{j∈W(i)} e^{s_ij − m_i} v_j + λ_h Σ_{j≤i, j∉W(i)} φq_i·φk_j v_j]
      / [γ_h Σ_{j∈W(i)} e^{s_ij − m_i} + λ_h Σ_{j≤i, j∉W(i)} φq_i·φk_j],   s_ij = q_i·k_j / √d,  m_i = max_{W(i)} s_ij.

Paper: "LoLCATs: On Low-Rank Linearizing of Large Language Models" (Zhang et al., 2024); read from
HazyResearch/lolcats (`linear_window_attention_tk.py`, `_sw.py`, `feature_map.py`). The op, its windows and its
decomposition are documented in `seqlab.ops.lolcats_attn`.

Layer: q = RoPE(x W_q), k = RoPE(x W_k) with num_kv_heads (GQA) heads, v = x W_v, the layer's softmax attention
with its weights unchanged; φ is the Hedgehog map ("The Hedgehog & the Porcupine", LoLCATs normalisation: two
softmaxes over f features each, see `layers.feature_maps`), untied for q and k, per head, applied AFTER RoPE and the
GQA repeat. Window factor γ_h = σ(w_h), w_h a learnt logit per head (parameter `window_factor`, the official
`window_factors`) initialised to −2.1972 (γ ≈ 0.1); linear factor λ_h = 1 (the paper's main configuration) or
1 − γ_h with `affine_attention_factors=True` (an option of the official code). Then W_o.

Defaults (the LoLCATs Llama 3 8B configuration `distill_llama3_8b_lk_smd_wtk64_fd64_w01`): kind "tk" (the query's
block of 64 plus the previous block), window 64, f = 64 (128 features per head). "sw" (a true sliding window of
64) is the other variant of the official code. Where the official code differs from the paper or from itself:
- it aligns the "tk" blocks to the end of the sequence; here they are aligned to position 0 (the same when T is a
  multiple of the window, as in LoLCATs' 1024-token training chunks; only this way does a token's output not
  depend on how many tokens follow it);
- its "tk" generation path decodes with a sliding window of 64, not with the training path's blocks; here decoding
  reproduces the training path exactly.

Linearising (`from_softmax`, `transfer_outputs`): stage 1 ("attention transfer") trains only the feature maps and
the window factors, with loss 1000 · MSE(y_hybrid, y_softmax) on every layer's outputs before W_o, where y_softmax
is the same q, k, v under full causal softmax attention (the teacher; no gradient flows into it, as the official
code computes it under no_grad). Stage 2 fine-tunes with LoRA on the projections (outside this module).

Decode cache (`HybridCache`): a ring buffer of the last R = window ("sw") or 2 · window ("tk") tokens' keys
(post-RoPE) and values [B, R, H_kv, d] and feature-mapped keys φk [B, R, H, 2f] float32, token p in slot p % R,
with their positions [R] (−1 = empty); the linear state (S | z) [B, H, 2f, d + 1] float32 of every token before
the ring (z in the last column); the position counter. A step first folds the token it evicts (position p − R,
which every later query reads through the linear term) into the state with one `linear_attn` step, then writes
its own key. For "tk" the ring also holds the tokens of block b − 2 that left the window but not the ring; the
step reads them with the linear term from the cached φk, exactly as the training path's band does. A prompt
(T > 1, into a fresh cache) runs the training path and keeps its last R tokens and the state of the rest. The ring
has min(R, max_len) slots; as with `SoftmaxAttention`'s cache, decode at most max_len tokens.

On a sequence split over devices (`shard_sequence`) the op takes the band's first R tokens from the previous
device and runs its linear part sequence-parallel; each device's segment must hold at least R tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.core.documents import Documents
from seqlab.ops import _common as ops_common
from seqlab.checks import check_choice, check_finite, check_input, check_positive_int
from seqlab.layers.feature_maps import make_feature_map
from seqlab.layers.positional import positions
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import HybridCache
from seqlab.mixers.from_softmax import SoftmaxAttention, copy_projections, softmax_layout
from seqlab.mixers.registry import register
from seqlab.ops.lolcats_attn import (
    KINDS,
    lolcats_attn,
    lolcats_decode_step,
    repeat_heads,
    window_reach,
)

WINDOW_FACTOR_INIT = -2.1972  # sigmoid(-2.1972) = 0.1


@register(
    "lolcats",
    kind="hybrid",
    paper="LoLCATs: On Low-Rank Linearizing of Large Language Models",
    examples={
        "tk": dict(num_heads=4, num_kv_heads=2, window=8, num_features=4),
        "sw": dict(num_heads=4, num_kv_heads=2, window=8, num_features=4, kind="sw"),
    },
)
class LoLCATsAttention(Mixer):
    """Softmax attention over a window plus Hedgehog linear attention over everything before it (see the module
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
        kind: str = "tk",
        num_features: int = 64,
        affine_attention_factors: bool = False,
        window_factor_init: float = WINDOW_FACTOR_INIT,
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
        check_choice("kind", kind, KINDS)
        check_finite("window_factor_init", window_factor_init)
        self.window, self.kind = window, kind
        self.affine_attention_factors = affine_attention_factors
        fm = dict(num_heads=num_heads, num_features=num_features, rngs=rngs, param_dtype=param_dtype)
        self.q_map = make_feature_map("hedgehog", self.head_dim, **fm)
        self.k_map = make_feature_map("hedgehog", self.head_dim, **fm)
        self.window_factor = nnx.Param(jnp.full((num_heads,), window_factor_init, param_dtype))  # the logit w_h of γ_h

    @classmethod
    def from_softmax(
        cls,
        attn: SoftmaxAttention,
        *,
        window: int = 64,
        kind: str = "tk",
        num_features: int = 64,
        affine_attention_factors: bool = False,
        window_factor_init: float = WINDOW_FACTOR_INIT,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
    ) -> LoLCATsAttention:
        """The LoLCATs layer of a trained full-attention layer: its heads, RoPE and q, k, v, o weights, with fresh
        feature maps and window factors (to be trained by attention transfer)."""
        layout = softmax_layout(attn)
        mixer = cls(
            attn.d_model, attn.num_heads, window=window, kind=kind, num_features=num_features,
            affine_attention_factors=affine_attention_factors, window_factor_init=window_factor_init, impl=impl,
            chunk_size=chunk_size, rngs=rngs, **layout,
        )  # fmt: skip
        copy_projections(attn, mixer)
        return mixer

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """(γ, λ), each [H] float32: window factors σ(w_h) and linear factors (1, or 1 − γ if affine)."""
        gamma = jax.nn.sigmoid(self.window_factor[...].astype(jnp.float32))
        return gamma, (1.0 - gamma) if self.affine_attention_factors else jnp.ones_like(gamma)

    def init_cache(self, batch: int, max_len: int) -> HybridCache:
        self._check_cache_args(batch, max_len)
        slots = min(window_reach(self.window, self.kind), max_len)
        features = self.q_map.out_dim
        return HybridCache.empty(
            (batch, slots, self.num_kv_heads, self.head_dim),
            (batch, self.num_heads, features, self.head_dim + 1),
            self.dtype or jnp.float32,
            phi_k_shape=(batch, slots, self.num_heads, features),
        )

    def transfer_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Attention-transfer targets for x [B, T, d_model]: (y_hybrid, y_softmax), each [B, T, H, d] before W_o.

        y_softmax is the teacher, full causal softmax attention on the same q, k, v (gradient stopped)."""
        check_input(x, self.d_model, rank=3, name="x")
        q, k, v, phi_q, phi_k = self._project(x, positions(None, x.shape[1], self.sequence_axis))
        gamma, lam = self.factors()
        y_hybrid, _ = lolcats_attn(
            q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=self.window, kind=self.kind,
            **self._op_kwargs(None),
        )  # fmt: skip
        y_softmax = ops.softmax_attn(q, k, v, causal=True, impl=self.impl, sequence_axis=self.sequence_axis)
        return y_hybrid.astype(x.dtype), jax.lax.stop_gradient(y_softmax).astype(x.dtype)

    def _project(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, ...]:
        """q [B, T, H, d], k, v [B, T, H_kv, d] (q, k rotated to positions pos), and φq, φk [B, T, H, 2f] (φk of the
        GQA-repeated keys)."""
        q = self._heads(self.q_proj(x), self.head_dim)
        k = self._heads(self.k_proj(x), self.head_dim)
        v = self._heads(self.v_proj(x), self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v, self.q_map(q), self.k_map(repeat_heads(k, self.num_heads))

    def _forward(self, x: jax.Array, cache: HybridCache | None, documents: Documents | None = None):
        T = x.shape[1]
        q, k, v, phi_q, phi_k = self._project(x, self._positions(cache, T, documents))
        gamma, lam = self.factors()
        if cache is not None and T == 1:
            o, cache = self._decode_step(q, k, v, phi_q, phi_k, cache, gamma, lam)
        else:
            packed = {} if documents is None else dict(positions=documents.positions)
            o, state = lolcats_attn(
                q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=self.window, kind=self.kind,
                **self._op_kwargs(None if cache is None else cache.state, documents), **packed,
            )  # fmt: skip
            if cache is not None:
                cache = cache.write(k, v, phi_k).replace(state=state)
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def _decode_step(
        self, q: jax.Array, k: jax.Array, v: jax.Array, phi_q: jax.Array, phi_k: jax.Array, cache: HybridCache,
        gamma: jax.Array, lam: jax.Array,
    ) -> tuple[jax.Array, HybridCache]:
        """One token (T = 1; q, k, v, φq, φk as `_project`'s; γ, λ [H]): fold the token leaving the ring into the
        linear state, write the new token, attend over the ring plus the state. Returns o [B, 1, H, d]."""
        slot = cache.pos % cache.k.shape[1]
        evicted_phi_k = cache.phi_k[:, slot][:, None]  # [B, 1, H, F]; zero for a still-empty slot
        evicted_v1 = ops_common.with_ones(repeat_heads(cache.v[:, slot][:, None], self.num_heads))  # [B, 1, H, d + 1]
        linear_numerator, state = ops.linear_attn(
            phi_q, evicted_phi_k, evicted_v1, scale=1.0, **self._op_kwargs(cache.state)
        )  # φq · (S | z) over every token up to position pos − R
        cache = cache.write(k, v, phi_k).replace(state=state)
        o = lolcats_decode_step(
            q[:, 0], phi_q[:, 0], cache.k, cache.v, cache.phi_k, cache.key_positions, cache.pos - 1,
            linear_numerator[:, 0], gamma, linear_factor=lam, window=self.window, kind=self.kind,
        )  # fmt: skip
        return o[:, None], cache
