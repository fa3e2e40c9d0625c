"""SOFT ("SOFT: Softmax-free Transformer with Linear Complexity") against its equations written here with the
layer's own parameters: Q = K = x W_qk · d^(-1/4); landmarks Q̃ = GELU(LN(strided conv of Q)) (the conv as a loop
over its taps, LayerNorm and exact GELU written out); κ(a, b) = exp(−‖a − b‖²/2) pair by pair; P⁺ of κ(Q̃, Q̃) as
numpy's pseudo-inverse of the ridged matrix (the Newton–Schulz iterations converge to it); X = κ(Q, Q̃) P⁺
κ(Q̃, Q) V + DWConv(V); y = X W_o. Forward in float64 against numpy's inverse (1e-4: the iterations' residual),
the input gradient against the formula in jnp with the iterations replaced by an exact inverse (the stated
backward); the Newton–Schulz inverse itself against numpy and its custom gradient against the inverse's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear
from reference import rel_err
from seqlab import mixers
from seqlab.mixers.linear.soft import RIDGE, newton_pinv

B, T, D, H = 2, 23, 16, 2


def conv(xp, x, kernel, bias, stride: int, groups: bool = False):
    """'valid' strided conv (stride = kernel width) or a 'same' depthwise conv of x [B, T, C], as a loop over taps."""
    width = kernel.shape[0]
    if groups:
        padded = xp.pad(x, ((0, 0), ((width - 1) // 2, width // 2), (0, 0)))
        return sum(padded[:, i : i + x.shape[1]] * kernel[i, 0] for i in range(width)) + bias
    n = x.shape[1] // stride
    windows = x[:, : n * stride].reshape(x.shape[0], n, stride, -1)
    return xp.einsum("bnkc,kco->bno", windows, kernel) + bias


def layer(xp, params, x, *, stride: int):
    d = D // H
    q = linear(x, params["qk_proj"]) * d**-0.25
    v = linear(x, params["v_proj"])
    padded = xp.pad(q, ((0, 0), (0, -q.shape[1] % stride), (0, 0)))
    lm = linear(padded, params["landmark"]) if stride == 1 else conv(xp, padded, params["landmark"]["kernel"],
                                                                      params["landmark"]["bias"], stride)
    mean = lm.mean(-1, keepdims=True)
    var = ((lm - mean) ** 2).mean(-1, keepdims=True)
    lm = (lm - mean) / xp.sqrt(var + 1e-6) * params["landmark_norm"]["scale"] + params["landmark_norm"]["bias"]
    erf = np.vectorize(math.erf) if xp is np else jax.scipy.special.erf
    lm = 0.5 * lm * (1 + erf(lm / math.sqrt(2)))
    qh, lh, vh = (heads(a, H).transpose(0, 2, 1, 3) for a in (q, lm, v))

    def kernel(a, b):
        return xp.exp(-0.5 * ((a[..., :, None, :] - b[..., None, :, :]) ** 2).sum(-1))

    p = kernel(lh, lh) + RIDGE * np.eye(lh.shape[2])
    inverse = np.linalg.pinv(p) if xp is np else jnp.linalg.inv(p)
    o = kernel(qh, lh) @ inverse @ kernel(lh, qh) @ vh
    o = o.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
    return linear(o + conv(xp, v, params["dwc"]["kernel"], params["dwc"]["bias"], 1, groups=True), params["o_proj"])


@pytest.mark.parametrize("stride", [4, 1])
def test_soft_matches_its_equations(stride):
    mixer = mixers.create("soft", d_model=D, num_heads=H, landmark_stride=stride, rngs=nnx.Rngs(0))
    assert_layer_matches(mixer, functools.partial(layer, stride=stride), (B, T, D), forward_tol=1e-4,
                         grad_tol=1e-3)


def test_newton_schulz_inverse_and_its_gradient():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4))
    p = np.exp(-0.5 * ((a[:, None] - a[None]) ** 2).sum(-1))  # a Gaussian kernel matrix
    inverse = newton_pinv(jnp.asarray(p, jnp.float32))
    want = np.linalg.inv(p + RIDGE * np.eye(6))
    assert rel_err(inverse, want) <= 1e-4
    g = rng.normal(size=(6, 6))
    got = jax.grad(lambda m: jnp.sum(newton_pinv(m) * g))(jnp.asarray(p, jnp.float32))
    exact = jax.grad(lambda m: jnp.sum(jnp.linalg.inv(m + RIDGE * jnp.eye(6)) * g))(jnp.asarray(p, jnp.float32))
    assert rel_err(got, exact) <= 1e-3
