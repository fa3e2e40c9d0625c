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

from mixer_references import f64, heads, linear, merge, perturbed_params
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
