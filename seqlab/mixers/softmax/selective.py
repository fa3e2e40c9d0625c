"""Selective attention: causal softmax attention with a position-aware query temperature — "Selective Attention:
Enhancing Transformer through Principled Context Control" (Zhang et al., NeurIPS 2024).

    o_i = Σ_{j<=i} softmax_j(τ_i · q_i·k_j / √d) τ^v_j v_j,     τ_i = (1 + s(β) · log n_i) · τ^q_i
    τ^q_i = 1 + tanh(x_i w^q_h)  (token_temperature; else 1),   τ^v_j = 1 + tanh(x_j w^v_h)  (value_temperature)

n_i = p_i + 1, the number of tokens up to the query (p_i its position; within its document on packed rows).
β is one learnt scalar per layer; s(β) = e^{-e^β} for the "pts" temperature (the official GPT-2 code's,
β initialised to 1.5) or s(β) = β for "linear" (its `_no_func` variant). Spread over a longer context, a
query's scores are sharpened by log n_i, which counters attention dilution. τ_i is a per-query scalar, so it is
folded into q (after RoPE): every form of softmax attention, its masks, Pallas kernel, decode cache and sequence
parallelism run unchanged.

The paper's token-aware temperatures — a query temperature from the query token's embedding (sparser attention
for some tokens) and a value temperature that scales each value (suppressing noisy tokens), from small weight-
shared heads — are not in the official code read; here they are our reading: per head one linear map of the
mixer's input to a scalar, through 1 + tanh (in (0, 2), 1 at the zero initialisation, so a model starts as the
position temperature alone), d_model·(H + H_kv) parameters. The value temperature scales v before it is cached.
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
    examples={"pts": dict(num_heads=2), "linear": dict(num_heads=2, temperature="linear", beta_init=0.5),
              "token_and_value": dict(num_heads=4, num_kv_heads=2, token_temperature=True, value_temperature=True)},
)
class SelectiveAttention(SoftmaxAttention):
    """Softmax attention whose queries are scaled by τ_i = 1 + s(β) log(p_i + 1) (module docstring);
    token_temperature / value_temperature: the token-aware query and value temperatures; the other arguments are
    `SoftmaxAttention`'s (RoPE, GQA, window, block size, sequence parallelism)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        temperature: str = "pts",
        beta_init: float = 1.5,
        token_temperature: bool = False,
        value_temperature: bool = False,
        rngs: nnx.Rngs | None = None,
        param_dtype: Any = jnp.float32,
        **kwargs: Any,
    ):
        check_choice("temperature", temperature, TEMPERATURES)
        for name, flag in (("token_temperature", token_temperature), ("value_temperature", value_temperature)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if isinstance(beta_init, bool) or not isinstance(beta_init, (int, float)):
            raise ValueError(f"beta_init must be a number, got {beta_init!r}")
        rngs = self._rngs(rngs)
        super().__init__(d_model, num_heads, param_dtype=param_dtype, rngs=rngs, **kwargs)
        self.temperature = temperature
        self.beta = nnx.Param(jnp.asarray(beta_init, param_dtype))
        gate = dict(kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.query_gate = self._linear(d_model, self.num_heads, **gate) if token_temperature else None
        self.value_gate = self._linear(d_model, self.num_kv_heads, **gate) if value_temperature else None

    def query_temperature(self, pos: jax.Array) -> jax.Array:
        """τ at positions pos [T] or [B, T] -> the same shape, float32."""
        beta = self.beta[...].astype(jnp.float32)
        strength = jnp.exp(-jnp.exp(beta)) if self.temperature == "pts" else beta
        return 1.0 + strength * jnp.log1p(pos.astype(jnp.float32))

    def queries_keys(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, H, d] (RoPE, then τ) and k [B, T, H_kv, d] of x [B, T, d_model] at positions pos [T] or [B, T]."""
        q, k = super().queries_keys(x, pos)
        tau = self.query_temperature(pos)[..., None, None]  # [(B,) T, 1, 1]
        if self.query_gate is not None:
            tau = tau * token_temperature(self.query_gate, x)
        return (q.astype(jnp.float32) * tau).astype(q.dtype), k

    def values(self, x: jax.Array) -> jax.Array:
        """v [B, T, H_kv, d], scaled by the value temperature τ^v when it is on."""
        v = super().values(x)
        if self.value_gate is None:
            return v
        return (v.astype(jnp.float32) * token_temperature(self.value_gate, x)).astype(v.dtype)


def token_temperature(gate: nnx.Linear, x: jax.Array) -> jax.Array:
    """1 + tanh(x w_h) [B, T, heads, 1] float32 of x [B, T, d_model] (gate: d_model -> heads)."""
    return (1.0 + jnp.tanh(gate(x).astype(jnp.float32)))[..., None]
