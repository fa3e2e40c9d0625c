"""S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (q_t d_k^-1/2)  (the delta rule).

Paper: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (Yang et al., 2024); read from
fla's `fla/layers/delta_net.py`.

Layer (fla defaults): q, k, v = SiLU(ShortConv_4(x W)) (depthwise causal, no bias; one conv over the concatenated
[q, k, v] channels, which is the same as three), expand_k = expand_v = 1; q and k L2-normalised per head;
beta_t = sigmoid(x W_beta), one scalar per head, times 2 with allow_neg_eigval (eigenvalues of the transition in
(-1, 1)). Op `delta_rule` with its default scale d_k^-1/2. Output: per-head RMSNorm (affine, eps 1e-5), or with
use_gate the RMSNorm gated by swish(x W_g); then W_o.

Decode cache: `RecurrentCache` with state [B, H, d_k, d_v] float32 and conv [B, 3, 2 H d_k + H d_v] (the last
conv_size - 1 projected inputs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.mixers.base import Mixer, RecurrentCache, RMSNorm, ShortConv, default_rngs, expand_dim, l2_normalize


class DeltaRuleMixer(Mixer):
    """Layers shared by DeltaNet and GatedDeltaNet; subclasses call `_build` and may override `_log_decay`."""

    def _build(self, *, key_dim, head_dim, conv_size, use_gate, allow_neg_eigval, norm_eps, rngs):
        D, H = self.d_model, self.num_heads
        self.key_dim, self.head_dim = key_dim, head_dim
        self.allow_neg_eigval = allow_neg_eigval
        self.q_proj = self._linear(D, H * key_dim, rngs)
        self.k_proj = self._linear(D, H * key_dim, rngs)
        self.v_proj = self._linear(D, H * head_dim, rngs)
        self.b_proj = self._linear(D, H, rngs)
        self.conv = ShortConv(
            H * (2 * key_dim + head_dim), kernel_size=conv_size, rngs=rngs, param_dtype=self.param_dtype, dtype=self.dtype
        )
        self.g_proj = self._linear(D, H * head_dim, rngs) if use_gate else None
        self.norm = RMSNorm(head_dim, eps=norm_eps, param_dtype=self.param_dtype)
        self.o_proj = self._linear(H * head_dim, D, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        shape = (batch, self.num_heads, self.key_dim, self.head_dim)
        return RecurrentCache.empty(shape, conv=self.conv.init_state(batch))

    def _log_decay(self, x: jax.Array) -> jax.Array | None:
        """Per-head log forget gate [B, T, H]; none for the plain delta rule."""
        return None

    def _forward(self, x: jax.Array, cache: RecurrentCache | None):
        H, dk = self.num_heads, self.key_dim
        qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        qkv, conv_state = self.conv(qkv, None if cache is None else cache.conv)
        q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
        q = l2_normalize(self._heads(q, dk))
        k = l2_normalize(self._heads(k, dk))
        v = self._heads(v, self.head_dim)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = self._log_decay(x)
        kw = self._op_kwargs(None if cache is None else cache.state)
        if g is None:
            o, state = ops.delta_rule(q, k, v, beta, **kw)
        else:
            o, state = ops.gated_delta_rule(q, k, v, g, beta, **kw)
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + x.shape[1])
        gate = None if self.g_proj is None else self._heads(self.g_proj(x), self.head_dim)
        o = self.norm(o.astype(x.dtype), gate)
        return self.o_proj(self._merge_heads(o)), cache


class DeltaNet(DeltaRuleMixer):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        conv_size: int = 4,
        use_gate: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        self._build(
            key_dim=expand_dim("expand_k", d_model, expand_k, num_heads),
            head_dim=expand_dim("expand_v", d_model, expand_v, num_heads),
            conv_size=conv_size,
            use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval,
            norm_eps=norm_eps,
            rngs=default_rngs(rngs),
        )
