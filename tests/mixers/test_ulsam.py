"""ULSAM ("ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks") against its
formula written here from the mixer's own parameters, subspace by subspace: a = ReLU(w ⊙ x_n + b), a max-pool over
every offset of the window (padding never wins), s = ReLU(pooled · v_n + c_n), A = exp(s - max s) / Σ_t exp(s - max s)
over all tokens, y_n = A ⊙ x_n + x_n, the subspaces concatenated.

Forward in numpy float64 at rel err <= 1e-5; gradients of every parameter and of x against jax.grad of the same
formula in jnp (float32) at <= 1e-4; a 1-D sequence (T = 37), an odd non-square 5 × 7 grid and a 4 × 6 grid, at
1, 2 and 4 subspaces and pool sizes 3 and 5; bf16 compute within 1e-2 of the float64 reference. Bad arguments raise
ValueError naming the argument.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    check_bf16,
    check_forward_and_gradients,
    check_non_causal_has_no_cache,
    f64,
    inputs,
    loss_and_grads,
    perturbed_params,
    raises_naming,
)
from reference import rel_err

from seqlab.mixers.conv.ulsam import ULSAM

B, T, D = 2, 37, 16


def max_pool(xp, a, grid, size):
    """Max over each token's size (× size) window of a [B, N, C]; positions outside the grid do not take part."""
    half = size // 2
    spatial = (a.shape[1],) if grid is None else grid
    image = a.reshape(a.shape[0], *spatial, a.shape[-1])
    padded = xp.pad(image, [(0, 0)] + [(half, half)] * len(spatial) + [(0, 0)], constant_values=-np.inf)
    out = None
    offsets = [(i,) for i in range(size)] if grid is None else [(i, j) for i in range(size) for j in range(size)]
    for offset in offsets:
        window = padded[(slice(None), *(slice(o, o + n) for o, n in zip(offset, spatial)))]
        out = window if out is None else xp.maximum(out, window)
    return out.reshape(a.shape)


def ulsam_reference(xp, p, x, *, groups, grid=None, pool=3):
    width = x.shape[-1] // groups
    pieces = []
    for n in range(groups):
        channels = slice(n * width, (n + 1) * width)
        x_n = x[..., channels]
        a = xp.maximum(x_n * p["dw_kernel"][channels] + p["dw_bias"][channels], 0.0)
        s = xp.maximum(max_pool(xp, a, grid, pool) @ p["pw_kernel"][n] + p["pw_bias"][n], 0.0)  # [B, N]
        e = xp.exp(s - s.max(axis=1, keepdims=True))
        attention = e / e.sum(axis=1, keepdims=True)
        pieces.append(attention[..., None] * x_n + x_n)
    return xp.concatenate(pieces, axis=-1)


CASES = {  # name: (groups, constructor kwargs, tokens)
    "1d-g4": (4, dict(), T),
    "1d-g1-pool5": (1, dict(pool_size=5), T),
    "grid-5x7-g2": (2, dict(grid=(5, 7)), 35),
    "grid-4x6-g4-pool5": (4, dict(grid=(4, 6), pool_size=5), 24),
}


def make(case, **kw):
    groups, args, _ = CASES[case]
    return ULSAM(D, groups, rngs=nnx.Rngs(0), **args, **kw)


def reference_of(case):
    groups, args, _ = CASES[case]
    return lambda xp, p, x: ulsam_reference(xp, p, x, groups=groups, grid=args.get("grid"),
                                            pool=args.get("pool_size", 3))


def scaled_params(mixer, x, grid, pool):
    """The parameters moved off their init, the pointwise kernel made larger and its bias set to minus the median
    score on x, so that every map is far from uniform and clipped at about half the tokens (a score clipped at every
    token leaves a uniform map and no gradient; one clipped nowhere, no gradient for the bias, a shift the softmax
    ignores)."""
    params = perturbed_params(mixer)
    params["pw_kernel"] = params["pw_kernel"] * 4.0
    p = f64(params)
    groups, width = p["pw_kernel"].shape
    a = np.maximum(np.asarray(x, np.float64) * p["dw_kernel"] + p["dw_bias"], 0.0)
    pooled = max_pool(np, a, grid, pool).reshape(*a.shape[:2], groups, width)
    scores = np.einsum("btgc,gc->btg", pooled, p["pw_kernel"])
    params["pw_bias"] = jnp.asarray(-np.median(scores, axis=(0, 1)), jnp.float32)
    return params


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case):
    mixer, reference = make(case), reference_of(case)
    x, w = inputs(0, (B, CASES[case][2], D))
    args = CASES[case][1]
    params = scaled_params(mixer, x, args.get("grid"), args.get("pool_size", 3))
    y64 = reference(np, f64(params), np.asarray(x, np.float64))
    (_, _), ref_grads = loss_and_grads(lambda p, a: reference(jnp, p, a), params, x, w)
    check_forward_and_gradients(mixer, params, x, w, y64, ref_grads)


def test_the_maps_are_softmaxes_over_all_tokens_and_the_reference_sees_the_grid():
    mixer = make("grid-5x7-g2")
    x, _ = inputs(1, (B, 35, D))
    params = scaled_params(mixer, x, (5, 7), 3)
    nnx.update(mixer, params)
    y = np.asarray(mixer(x), np.float64)
    x64, p64 = np.asarray(x, np.float64), f64(params)
    ratio = y.reshape(B, 35, 2, -1) / x64.reshape(B, 35, 2, -1) - 1.0  # A, broadcast over each subspace
    np.testing.assert_allclose(ratio.sum(axis=1), 1.0, rtol=1e-4)
    assert float(ratio.std()) > 1e-3  # not uniform
    assert rel_err(y, ulsam_reference(np, p64, x64, groups=2, grid=(5, 7))) < 1e-5
    assert rel_err(y, ulsam_reference(np, p64, x64, groups=2)) > 1e-4  # the 1-D pool differs
    assert rel_err(y, ulsam_reference(np, p64, x64, groups=2, grid=(5, 7), pool=5)) > 1e-4  # so does a 5 × 5 pool


def test_bf16_compute_stays_close_to_the_reference():
    mixer = make("grid-5x7-g2", dtype=jnp.bfloat16)
    x, _ = inputs(0, (B, 35, D))
    check_bf16(mixer, scaled_params(mixer, x, (5, 7), 3), x,
               lambda xp, p, a: ulsam_reference(xp, p, a, groups=2, grid=(5, 7)), tol=1e-2)


def test_ulsam_has_no_cache():
    check_non_causal_has_no_cache(make("1d-g4"), B)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: ULSAM(D, 3), "num_heads"),
        (lambda: ULSAM(D, 0), "num_heads"),
        (lambda: ULSAM(D, 2, pool_size=4), "pool_size"),
        (lambda: ULSAM(D, 2, pool_size=0), "pool_size"),
        (lambda: ULSAM(D, 2, grid=(5, 7, 1)), "grid"),
        (lambda: ULSAM(D, 2, grid=(5, 7))(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
