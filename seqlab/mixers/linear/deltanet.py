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

import jax.numpy as jnp
from flax import nnx

from seqlab.checks import expand_dim
from seqlab.mixers.linear.delta_rule_mixer import DeltaRuleMixer
from seqlab.mixers.registry import register


@register(
    "deltanet",
    kind="linear",
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
    examples={"default": dict(num_heads=2), "negeig_gate": dict(num_heads=2, allow_neg_eigval=True, use_gate=True)},
)
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
            value_dim=expand_dim("expand_v", d_model, expand_v, num_heads),
            conv_size=conv_size,
            use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval,
            norm_eps=norm_eps,
            rngs=self._rngs(rngs),
        )
