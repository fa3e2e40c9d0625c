"""Selective attention ("Selective Attention: Enhancing Transformer through Principled Context Control") against a
pair-by-pair loop of the paper's position-aware temperature, written here with the layer's own projections:

    s_ij = τ_i q_i·k_j / √d (j <= i, and j >= i - w + 1 with a window w),   τ_i = 1 + s(β) log(i + 1),
    s(β) = e^{-e^β} ("pts") or β ("linear"),   o_i = Σ_j softmax_j(s_ij) v_j,   y_i = concat_h o_i W_o

Forward in float64 numpy (1e-5); the gradient of β against a float64 central difference of the loop (1e-3).
The shared checks (decode = forward, prefill, jit, grad, packed rows, sequence-parallel models) cover the registry
examples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, f64, heads, linear, merge, perturbed_params
from reference import rel_err
from seqlab import mixers

B, T, D, H = 2, 23, 16, 2


def layer(xp, params, x, *, temperature: str, window: int | None):
    """The layer by the formula above on x [B, T, D]: an explicit loop over query positions."""
    q, k, v = (heads(linear(x, params[name]), H) for name in ("q_proj", "k_proj", "v_proj"))
    beta = params["beta"]
    strength = xp.exp(-xp.exp(beta)) if temperature == "pts" else beta
    d = q.shape[-1]
    rows = []
    for i in range(x.shape[1]):
        first = 0 if window is None else max(0, i - window + 1)
        tau = 1.0 + strength * math.log(i + 1)
        scores = xp.einsum("bhd,bjhd->bhj", q[:, i], k[:, first : i + 1]) * tau / math.sqrt(d)
        weights = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = weights / weights.sum(axis=-1, keepdims=True)
        rows.append(xp.einsum("bhj,bjhd->bhd", weights, v[:, first : i + 1]))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


def build(temperature: str, window: int | None = None, beta: float = 0.3):
    mixer = mixers.create("selective", d_model=D, num_heads=H, rope=False, temperature=temperature, beta_init=beta,
                          window=window, rngs=nnx.Rngs(0))  # fmt: skip
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    return mixer, params


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("temperature", ["pts", "linear"])
def test_selective_attention_matches_the_papers_temperature(temperature, window):
    mixer, params = build(temperature, window)
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)
    y = nnx.jit(lambda m, a: m(a))(mixer, x)
    expected = layer(np, f64(params), np.asarray(x, np.float64), temperature=temperature, window=window)
    assert rel_err(y, expected) <= 1e-5
    plain = layer(np, {**f64(params), "beta": np.float64(0.0)}, np.asarray(x, np.float64), temperature="linear",
                  window=window)  # fmt: skip
    assert rel_err(plain, expected) > 1e-3  # the temperature changes the output


def test_the_temperature_parameter_gets_the_papers_gradient():
    mixer, params = build("pts", beta=-0.5)
    x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (B, T, D), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) * w))(mixer)
    p64, x64, w64, h = f64(params), np.asarray(x, np.float64), np.asarray(w, np.float64), 1e-5

    def loss(beta):
        return np.sum(layer(np, {**p64, "beta": np.float64(beta)}, x64, temperature="pts", window=None) * w64)

    expected = (loss(p64["beta"] + h) - loss(p64["beta"] - h)) / (2 * h)  # central difference in float64
    # a sum of many signed terms: float32 autodiff lands within 1e-3 of it (measured 1.2e-4)
    assert abs(float(grads.beta[...]) - expected) <= 1e-3 * abs(expected) and abs(expected) > 1e-3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        mixers.create("selective", d_model=D, num_heads=H, temperature="softmax")
    with pytest.raises(ValueError, match="beta_init must be a number"):
        mixers.create("selective", d_model=D, num_heads=H, beta_init="1.5")


def token_and_value_layer(xp, params, x, *, num_heads: int, num_kv_heads: int):
    """The layer with the token-aware temperatures (module docstring of `selective`, our reading of the paper):
    s_ij = τ_i q_i·k_j / √d, τ_i = (1 + e^{-e^β} log(i + 1))(1 + tanh(x_i w^q_h)), values (1 + tanh(x_j w^v_h)) v_j,
    query head h reading key/value head h // (H / H_kv); a loop over query positions."""
    group = num_heads // num_kv_heads
    q = heads(linear(x, params["q_proj"]), num_heads)
    k, v = (xp.repeat(heads(linear(x, params[n]), num_kv_heads), group, axis=2) for n in ("k_proj", "v_proj"))
    query_tau = 1.0 + xp.tanh(x @ params["query_gate"]["kernel"])  # [B, T, H]
    value_tau = xp.repeat(1.0 + xp.tanh(x @ params["value_gate"]["kernel"]), group, axis=2)  # [B, T, H]
    strength = xp.exp(-xp.exp(params["beta"]))
    d = q.shape[-1]
    rows = []
    for i in range(x.shape[1]):
        tau = (1.0 + strength * math.log(i + 1)) * query_tau[:, i]  # [B, H]
        scores = xp.einsum("bhd,bjhd->bhj", q[:, i], k[:, : i + 1]) * tau[..., None] / math.sqrt(d)
        weights = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        weights = weights / weights.sum(axis=-1, keepdims=True)
        rows.append(xp.einsum("bhj,bjhd->bhd", weights, value_tau[:, : i + 1, :, None] * v[:, : i + 1]))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


def test_token_and_value_temperatures_match_their_formula():
    """Forward and the gradients of x and of every projection and gate (assert_layer_matches perturbs the gates
    away from their zero initialisation, so both temperatures are active)."""
    mixer = mixers.create("selective", d_model=D, num_heads=4, num_kv_heads=2, rope=False, token_temperature=True,
                          value_temperature=True, rngs=nnx.Rngs(0))
    assert mixer.query_gate.kernel.shape == (D, 4) and mixer.value_gate.kernel.shape == (D, 2)

    def formula(xp, params, x):
        return token_and_value_layer(xp, params, x, num_heads=4, num_kv_heads=2)

    assert_layer_matches(mixer, formula, (B, 13, D),
                         param_grads=("q_proj", "k_proj", "v_proj", "o_proj", "query_gate", "value_gate", "beta"))


def test_the_gates_start_as_the_position_temperature_alone():
    """At initialisation (zero gate weights) τ^q = τ^v = 1: the same output as without the gates."""
    x = jax.random.normal(jax.random.key(3), (B, 11, D), jnp.float32)
    gated = mixers.create("selective", d_model=D, num_heads=H, token_temperature=True, value_temperature=True,
                          rngs=nnx.Rngs(0))
    plain = mixers.create("selective", d_model=D, num_heads=H, rngs=nnx.Rngs(0))
    assert rel_err(gated(x), plain(x)) <= 1e-6


@pytest.mark.parametrize("name", ["token_temperature", "value_temperature"])
def test_a_gate_flag_must_be_a_bool(name):
    with pytest.raises(ValueError, match=f"^{name} must be a bool"):
        mixers.create("selective", d_model=D, num_heads=H, **{name: 1})
