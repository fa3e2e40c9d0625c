"""h_t = exp(Delta_t A_h) h_{t-1} + B_t (Delta_t x_t)^T,  y_t = h_t^T C_t + D_h x_t  (SSD, scalar decay per head).

Paper: "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality"
(Dao & Gu, 2024); read from state-spaces/mamba `mamba_ssm/modules/mamba2.py`.

As linear attention: q = C, k = B, v = Delta x, g = Delta A (log decay), scale 1, op `simple_gla`.
Layer: in_proj (no bias) -> [z, x, B, C, dt]; depthwise causal conv (kernel 4, with bias) + SiLU on [x, B, C];
ngroups groups of B and C (default 1: shared by all heads; head h reads group h // (H / ngroups)); Delta = softplus(dt + dt_bias); A = -exp(A_log), A ~ U(1, 16);
dt_bias = inverse-softplus(logU[1e-3, 0.1] floored at 1e-4); D skip (ones, one scalar per head);
y = RMSNorm(y * SiLU(z)) over all d_inner channels (norm_before_gate=False, affine, eps 1e-5); out_proj (no bias).
Defaults: expand 2, d_state 128, value_dim P = expand * d_model / num_heads (mamba_ssm's headdim; the paper's P =
64 is num_heads = expand * d_model / 64). The paper's chunk is 256; this layer forwards `chunk_size` (default 64)
to the op.

Decode cache: `RecurrentCache` with state [B, H, d_state, P] float32 and conv [B, 3, d_inner + 2 ngroups d_state].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive_int, expand_dim
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv
from seqlab.layers.norms import RMSNorm
from seqlab.layers.ssm import init_mamba_decay, mamba_decay
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "mamba2",
    kind="linear",
    paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality",
    examples={"default": dict(num_heads=4, d_state=16), "groups": dict(num_heads=4, d_state=8, ngroups=2)},
)
class Mamba2(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        d_state: int = 128,
        expand: float = 2.0,
        ngroups: int = 1,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_positive_int("d_state", d_state)
        check_positive_int("ngroups", ngroups)
        if num_heads % ngroups:
            raise ValueError(f"ngroups must divide num_heads = {num_heads}; got {ngroups}")
        self.value_dim = expand_dim("expand", d_model, expand, num_heads)
        self.d_state, self.ngroups = d_state, ngroups
        self.d_inner = num_heads * self.value_dim
        bc_dim = ngroups * d_state  # B and C each
        self.in_proj = self._linear(d_model, 2 * self.d_inner + 2 * bc_dim + num_heads, rngs)
        self.conv = ShortConv(
            self.d_inner + 2 * bc_dim,
            kernel_size=conv_size,
            use_bias=True,
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=dtype,
        )
        self.A_log, self.dt_bias = init_mamba_decay(rngs, num_heads, a_range=(1.0, 16.0))
        self.D = nnx.Param(jnp.ones((num_heads,), jnp.float32))
        self.norm = RMSNorm(self.d_inner, eps=norm_eps, norm_before_gate=False, param_dtype=param_dtype)
        self.out_proj = self._linear(self.d_inner, d_model, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        shape = (batch, self.num_heads, self.d_state, self.value_dim)
        return RecurrentCache.empty(shape, conv=self.conv.init_state(batch))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        N, G, d_inner = self.d_state, self.ngroups, self.d_inner
        z, xbc, dt_raw = jnp.split(self.in_proj(x), [d_inner, 2 * d_inner + 2 * G * N], axis=-1)
        xbc, conv_state = self.conv(xbc, None if cache is None else cache.conv, documents)
        xs, b, c = jnp.split(xbc, [d_inner, d_inner + G * N], axis=-1)
        xs = self._heads(xs, self.value_dim)  # [B, T, H, P]
        dt, g = mamba_decay(dt_raw, self.A_log, self.dt_bias)  # [B, T, H]
        q = self._group_heads(c)  # [B, T, H, N]
        k = self._group_heads(b)
        v = xs * dt[..., None].astype(xs.dtype)
        state = None if cache is None else cache.state
        y, state = ops.simple_gla(q, k, v, g, scale=1.0, **self._op_kwargs(state, documents))
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_state, pos=cache.pos + x.shape[1])
        y = y.astype(x.dtype) + xs * self.D[...][:, None].astype(x.dtype)
        y = self.norm(self._merge_heads(y), z)
        return self.out_proj(y), cache

    def _group_heads(self, bc: jax.Array) -> jax.Array:
        """[B, T, ngroups * N] -> [B, T, H, N]: each group's B (or C) repeated for its H / ngroups heads."""
        lead, G, N = bc.shape[:2], self.ngroups, self.d_state
        per_head = jnp.broadcast_to(bc.reshape(*lead, G, 1, N), (*lead, G, self.num_heads // G, N))
        return per_head.reshape(*lead, self.num_heads, N)
