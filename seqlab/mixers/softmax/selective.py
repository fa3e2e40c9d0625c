"""Selective attention: causal softmax attention with a position-aware query temperature — "Selective Attention:
Enhancing Transformer through Principled Context Control" (Zhang et al., NeurIPS 2024).

    o_i = Σ_{j<=i} softmax_j(τ_i · q_i·k_j / √d) v_j,     τ_i = 1 + s(β) · log n_i

n_i = p_i + 1, the number of tokens up to the query (p_i its position; within its document on packed rows).
β is one learnt scalar per layer; s(β) = e^{-e^β} for the "pts" temperature (the official GPT-2 code's,
β initialised to 1.5) or s(β) = β for "linear" (its `_no_func` variant). Spread over a longer context, a
query's scores are sharpened by log n_i, which counters attention dilution. τ_i is a per-query scalar, so it is
folded into q (after RoPE): every form of softmax attention, its masks, Pallas kernel, decode cache and sequence
parallelism run unchanged. The paper's token-aware query and value temperatures are not implemented here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention

TEMPERATURES = ("pts", "linear")


@register(
    "selective",
    kind="softmax",
    paper="Selective Attention: Enhancing Transformer through Principled Context Control",
    examples={"pts": dict(num_heads=2), "linear": dict(num_heads=2, temperature="linear", beta_init=0.5)},
)
class SelectiveAttention(SoftmaxAttention):
    """Softmax attention whose queries are scaled by τ_i = 1 + s(β) log(p_i + 1) (module docstring); the other
    arguments are `SoftmaxAttention`'s (RoPE, GQA, window, block size, sequence parallelism)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        temperature: str = "pts",
        beta_init: float = 1.5,
        param_dtype: Any = jnp.float32,
        **kwargs: Any,
    ):
        check_choice("temperature", temperature, TEMPERATURES)
        if isinstance(beta_init, bool) or not isinstance(beta_init, (int, float)):
            raise ValueError(f"beta_init must be a number, got {beta_init!r}")
        super().__init__(d_model, num_heads, param_dtype=param_dtype, **kwargs)
        self.temperature = temperature
        self.beta = nnx.Param(jnp.asarray(beta_init, param_dtype))

    def query_temperature(self, pos: jax.Array) -> jax.Array:
        """τ at positions pos [T] or [B, T] -> the same shape, float32."""
        beta = self.beta[...].astype(jnp.float32)
        strength = jnp.exp(-jnp.exp(beta)) if self.temperature == "pts" else beta
        return 1.0 + strength * jnp.log1p(pos.astype(jnp.float32))

    def queries_keys(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, H, d] (RoPE, then τ) and k [B, T, H_kv, d] of x [B, T, d_model] at positions pos [T] or [B, T]."""
        q, k = super().queries_keys(x, pos)
        tau = self.query_temperature(pos)[..., None, None]  # [(B,) T, 1, 1]
        return (q.astype(jnp.float32) * tau).astype(q.dtype), k
