"""S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T (q_t d_k^-1/2)  (gated delta rule).

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz & Hatamizadeh, 2025); read from
fla's `fla/layers/gated_deltanet.py`.

Everything of `DeltaNet` (ShortConv_4 + SiLU on q, k, v; L2-normalised q, k; beta = sigmoid(x W_beta)) plus the
Mamba2-style scalar forget gate per head:
    log alpha_t = -exp(A_log_h) * softplus(x W_a + dt_bias_h),
with A ~ U(0, 16), A_log = log A, and dt ~ logU(1e-3, 0.1) floored at 1e-4, dt_bias = inverse-softplus(dt)
(both float32). Output: RMSNorm (affine, eps 1e-5) gated by swish(x W_g), then W_o. Op `gated_delta_rule`.
Defaults: expand_v 2 (d_v = 2 d_k); the paper's head dim (its key dim d_k) is 256 with 6 heads (key width 0.75
d_model at d_model 2048); here key_dim defaults to d_model / num_heads so the layer scales with any d_model.

Decode cache: `RecurrentCache` with state [B, H, d_k, 2 d_k] float32 and the short-conv inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import expand_dim, resolve_dim
from seqlab.layers.ssm import init_mamba_decay, mamba_decay
from seqlab.mixers.linear.delta_rule_mixer import DeltaRuleMixer
from seqlab.mixers.registry import register


@register(
    "gated_deltanet",
    kind="linear",
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule",
    examples={"default": dict(num_heads=2)},
)
class GatedDeltaNet(DeltaRuleMixer):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        key_dim: int | None = None,
        expand_v: float = 2.0,
        conv_size: int = 4,
        use_gate: bool = True,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(
            d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype
        )
        rngs = self._rngs(rngs)
        key_dim = resolve_dim("key_dim", key_dim, d_model, "d_model", num_heads, "num_heads")
        self._build(
            key_dim=key_dim,
            value_dim=expand_dim(
                "expand_v", num_heads * key_dim, expand_v, num_heads, base_name="num_heads * key_dim"
            ),
            conv_size=conv_size,
            use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval,
            norm_eps=norm_eps,
            rngs=rngs,
        )
        self.a_proj = self._linear(d_model, num_heads, rngs)
        self.A_log, self.dt_bias = init_mamba_decay(rngs, num_heads, a_range=(0.0, 16.0))

    def _log_decay(self, x: jax.Array) -> jax.Array:
        _, log_alpha = mamba_decay(self.a_proj(x), self.A_log, self.dt_bias)
        return log_alpha
