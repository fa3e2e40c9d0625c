"""Softplus attention (LSSA) and its re-weighting (LSSAR) against a per-query loop of the formulas, written here
with the layer's own projections:

    s_ij = κ_i q_i·k_j / √d,  κ_i = log(i + 1) / log L,  a_ij = softplus(s_ij) / Σ_{j' <= i} softplus(s_ij')
    LSSAR: r_ij = (i + 1) a_ij,  w_ij = r_ij^p if r_ij >= 1 else 0,  weights w_ij / Σ_j w_ij

and o_i = Σ_j weights_ij v_j, y_i = concat_h o_i W_o. Forward in float64 numpy (1e-5); gradients with respect to
the input and the projections from the same loop in jnp (1e-4); a score far below zero (log softplus ≈ x) stays
finite. Decode = forward, prefill, packed rows and the sharded model are the registry's shared checks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge
from seqlab import mixers
from seqlab.mixers.softmax.softplus_attention import log_softplus

B, T, D, H = 2, 21, 16, 2


def layer(xp, params, x, *, base: float | None, power: float | None):
    """The formulas above on x [B, T, D]: an explicit loop over query positions (xp: numpy or jax.numpy)."""
    q, k, v = (heads(linear(x, params[name]), H) for name in ("q_proj", "k_proj", "v_proj"))
    rows = []
    for i in range(x.shape[1]):
        kappa = 1.0 if base is None else math.log(i + 1) / math.log(base)
        s = kappa * xp.einsum("bhd,bjhd->bhj", q[:, i], k[:, : i + 1]) / math.sqrt(q.shape[-1])
        sp = xp.logaddexp(0.0, s)  # softplus
        a = sp / sp.sum(axis=-1, keepdims=True)
        if power is not None:
            r = (i + 1) * a
            a = xp.where(r >= 1.0, r, 0.0) ** power
            a = a / a.sum(axis=-1, keepdims=True)
        rows.append(xp.einsum("bhj,bjhd->bhd", a, v[:, : i + 1]))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


@pytest.mark.parametrize("base, power", [(16.0, None), (None, None), (16.0, 3.0), (None, 2.0)])
def test_softplus_attention_matches_the_formula(base, power):
    mixer = mixers.create("softplus_attn", d_model=D, num_heads=H, rope=False, length_base=base,
                          reweight_power=power, rngs=nnx.Rngs(0))  # fmt: skip
    assert_layer_matches(mixer, functools.partial(layer, base=base, power=power), (B, T, D))


def test_log_softplus_is_finite_and_exact_far_below_zero():
    x = jnp.asarray([-1e4, -100.0, -31.0, -29.0, 0.0, 30.0], jnp.float32)
    got = np.asarray(log_softplus(x), np.float64)
    x64 = np.asarray(x, np.float64)
    want = np.where(x64 < -700, x64, np.log(np.log1p(np.exp(np.maximum(x64, -700)))))  # = x + O(e^x) down there
    assert np.isfinite(got).all() and np.allclose(got, want, rtol=1e-6)
    assert np.isfinite(np.asarray(jax.grad(lambda v: jnp.sum(log_softplus(v)))(x))).all()
