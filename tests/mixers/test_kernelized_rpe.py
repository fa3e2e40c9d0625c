"""Kernelized attention with RPE ("Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding") against the paper's pair-by-pair formula, written here with the layer's own parameters and random
directions w:

    φ(x) = exp(wᵀx' − ‖x'‖²/2) / √m  (PRF)  or  relu(wᵀx') / √m,   x' = x · d^(-1/4)
    o_i = Σ_j e^{b_{j−i}} φ(q_i)·φ(k_j) v_j / Σ_j e^{b_{j−i}} φ(q_i)·φ(k_j)   (j <= i when causal)

Forward in float64 (1e-5) and gradients in the input, the bias table and the projections (1e-4) for the dense
Toeplitz form; the FFT Toeplitz product against a direct float64 sum; and the layer with impl="chunked" (FFT) at
T = 600 within the FFT's float32 rounding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, f64, heads, linear, merge, perturbed_params
from reference import rel_err
from seqlab import mixers
from seqlab.mixers.linear.kernelized_rpe import toeplitz_product

B, D, H = 2, 16, 2


def layer(xp, params, x, *, features, feature_map: str, causal: bool, max_len: int):
    q, k, v = (heads(linear(x, params[n]), H) for n in ("q_proj", "k_proj", "v_proj"))
    d, m = q.shape[-1], features.shape[0]

    def phi(z):
        z = z * d**-0.25
        proj = xp.einsum("bthd,md->bthm", z, features)
        if feature_map == "relu":
            return xp.maximum(proj, 0.0) / math.sqrt(m)
        return xp.exp(proj - 0.5 * (z * z).sum(-1, keepdims=True)) / math.sqrt(m)

    T = x.shape[1]
    offsets = np.arange(T)[None, :] - np.arange(T)[:, None]  # j − i
    c = xp.exp(params["bias"][:, offsets + max_len - 1])  # [H, T, T]
    if causal:
        c = xp.where(offsets <= 0, c, 0.0)
    weights = c[None] * xp.einsum("bihm,bjhm->bhij", phi(q), phi(k))
    o = xp.einsum("bhij,bjhd->bihd", weights, v) / weights.sum(-1).transpose(0, 2, 1)[..., None]
    return linear(merge(o), params["o_proj"])


@pytest.mark.parametrize("feature_map, causal", [("prf", True), ("prf", False), ("relu", False)])
def test_kernelized_rpe_matches_the_formula(feature_map, causal):
    mixer = mixers.create("kernelized_rpe", d_model=D, num_heads=H, num_features=8, max_len=32,
                          feature_map=feature_map, causal=causal, impl="parallel", rngs=nnx.Rngs(0))  # fmt: skip
    formula = functools.partial(layer, features=np.asarray(mixer.features[...], np.float64), feature_map=feature_map,
                                causal=causal, max_len=32)  # fmt: skip
    assert_layer_matches(mixer, formula, (B, 21, D), param_grads=("bias", "q_proj", "v_proj"))


@pytest.mark.parametrize("causal", [True, False])
def test_the_fft_toeplitz_product_is_the_direct_sum(causal):
    rng = np.random.default_rng(0)
    T = 300
    weights = np.exp(rng.normal(size=(H, 2 * T - 1)))
    if causal:
        weights[:, T:] = 0.0
    x = rng.normal(size=(B, T, H, 5))
    want = np.einsum("hij,bjhc->bihc", weights[:, np.arange(T)[None] - np.arange(T)[:, None] + T - 1], x)
    got = toeplitz_product(jnp.asarray(weights, jnp.float32), jnp.asarray(x, jnp.float32))
    assert rel_err(got, want) <= 1e-5


def test_the_fft_form_matches_the_formula_at_length():
    """impl="chunked" (FFT over 2T) at T = 600, within float32 FFT rounding (measured 1.5e-5; dense 2e-7)."""
    T = 600
    mixer = mixers.create("kernelized_rpe", d_model=D, num_heads=H, num_features=8, max_len=T, impl="chunked",
                          rngs=nnx.Rngs(0))  # fmt: skip
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x = jax.random.normal(jax.random.key(0), (1, T, D), jnp.float32)
    want = layer(np, f64(params), np.asarray(x, np.float64), features=np.asarray(mixer.features[...], np.float64),
                 feature_map="prf", causal=True, max_len=T)
    assert rel_err(nnx.jit(lambda m, a: m(a))(mixer, x), want) <= 1e-4
