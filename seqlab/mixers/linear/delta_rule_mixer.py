"""The layer shared by DeltaNet and Gated DeltaNet (`deltanet.py`, `gated_deltanet.py`):

    q, k, v = SiLU(ShortConv(x W_q | x W_k | x W_v)),  q, k L2-normalised per head,  beta = sigmoid(x W_beta) (× 2
    with allow_neg_eigval),  o = delta_rule (or gated_delta_rule with the subclass's log forget gate),
    y = RMSNorm(o) (gated by swish(x W_g) with use_gate) W_o.

Decode cache: `RecurrentCache` with state [B, H, d_k, d_v] float32 and conv [B, conv_size − 1, H (2 d_k + d_v)].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv
from seqlab.layers.norms import RMSNorm, l2_normalize
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache


class DeltaRuleMixer(Mixer):
    """Layers shared by DeltaNet and GatedDeltaNet; subclasses call `_build` and may override `_log_decay`."""

    takes_documents = True

    def _build(
        self, *, key_dim: int, value_dim: int, conv_size: int, use_gate: bool, allow_neg_eigval: bool,
        norm_eps: float, rngs: nnx.Rngs,
    ) -> None:  # fmt: skip
        """q, k projections of key_dim per head, v of value_dim, the short conv over [q, k, v], beta, the optional
        output gate, the per-head norm and W_o."""
        D, H = self.d_model, self.num_heads
        self.key_dim, self.value_dim = key_dim, value_dim
        self.allow_neg_eigval = allow_neg_eigval
        self.q_proj = self._linear(D, H * key_dim, rngs)
        self.k_proj = self._linear(D, H * key_dim, rngs)
        self.v_proj = self._linear(D, H * value_dim, rngs)
        self.b_proj = self._linear(D, H, rngs)
        self.conv = ShortConv(
            H * (2 * key_dim + value_dim), kernel_size=conv_size, rngs=rngs, param_dtype=self.param_dtype,
            dtype=self.dtype,
        )
        self.g_proj = self._linear(D, H * value_dim, rngs) if use_gate else None
        self.norm = RMSNorm(value_dim, eps=norm_eps, param_dtype=self.param_dtype)
        self.o_proj = self._linear(H * value_dim, D, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        shape = (batch, self.num_heads, self.key_dim, self.value_dim)
        return RecurrentCache.empty(shape, conv=self.conv.init_state(batch))

    def _log_decay(self, x: jax.Array) -> jax.Array | None:
        """Per-head log forget gate [B, T, H]; none for the plain delta rule."""
        return None

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        H, dk = self.num_heads, self.key_dim
        qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        qkv, conv_state = self.conv(qkv, None if cache is None else cache.conv, documents)
        q, k, v = jnp.split(qkv, [H * dk, 2 * H * dk], axis=-1)
        q = l2_normalize(self._heads(q, dk))
        k = l2_normalize(self._heads(k, dk))
        v = self._heads(v, self.value_dim)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        g = self._log_decay(x)
        kw = self._op_kwargs(None if cache is None else cache.state, documents)
        if g is None:
            o, state = ops.delta_rule(q, k, v, beta, **kw)
        else:
            o, state = ops.gated_delta_rule(q, k, v, g, beta, **kw)
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + x.shape[1])
        gate = None if self.g_proj is None else self._heads(self.g_proj(x), self.value_dim)
        o = self.norm(o.astype(x.dtype), gate)
        return self.o_proj(self._merge_heads(o)), cache
