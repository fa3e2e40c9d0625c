"""VAN's large kernel attention ("Visual Attention Network") against its formula written here from the mixer's own
parameters: u = GELU(x W_1 + b_1) (erf), a = conv1(DW_dilated(DW(u))), y = (u ⊙ a) W_2 + b_2 (+ x), each depthwise
convolution a loop over its taps on a zero-padded copy (dilated taps step by the dilation).

Forward in numpy float64 at rel err <= 1e-5; gradients of every parameter and of x against jax.grad of the same
formula in jnp (float32, full matmul precision) at <= 1e-4; a 1-D sequence (T = 37), an odd non-square 5 × 7 grid
and a 4 × 6 grid, with and without the shortcut and at other kernel sizes; bf16 compute within 3e-2 of the
float64 reference. Bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
import pytest
import scipy.special
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

from seqlab.mixers.conv.van_lka import VANAttention

B, T, D = 2, 37, 16


def gelu(xp, a):
    erf = scipy.special.erf if xp is np else jax.scipy.special.erf
    return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))


def dense(x, layer):
    return x @ layer["kernel"] + layer["bias"]


def depthwise(xp, u, conv, grid, dilation):
    """Zero-padded centred depthwise convolution of u [B, N, C], kernel [K, 1, C] (1-D) or [K, K, 1, C] (grid)."""
    kernel, bias = conv["kernel"], conv["bias"]
    size = kernel.shape[0]
    pad = dilation * (size // 2)
    if grid is None:
        padded = xp.pad(u, ((0, 0), (pad, pad), (0, 0)))
        out = 0.0
        for i in range(size):
            out = out + padded[:, i * dilation : i * dilation + u.shape[1]] * kernel[i, 0]
        return out + bias
    rows, cols = grid
    padded = xp.pad(u.reshape(u.shape[0], rows, cols, -1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = 0.0
    for i in range(size):
        for j in range(size):
            window = padded[:, i * dilation : i * dilation + rows, j * dilation : j * dilation + cols]
            out = out + window * kernel[i, j, 0]
    return (out + bias).reshape(u.shape)


def van_reference(xp, p, x, *, grid=None, dilation=3, shortcut=True):
    u = gelu(xp, dense(x, p["proj_1"]))
    a = depthwise(xp, depthwise(xp, u, p["conv0"], grid, 1), p["conv_spatial"], grid, dilation)
    y = dense(u * dense(a, p["conv1"]), p["proj_2"])
    return y + x if shortcut else y


CASES = {  # name: (constructor kwargs, reference kwargs, tokens)
    "1d": (dict(), dict(), T),
    "1d-small-noshortcut": (dict(conv_size=3, dilated_size=5, dilation=2, shortcut=False),
                            dict(dilation=2, shortcut=False), T),
    "grid-5x7": (dict(grid=(5, 7)), dict(grid=(5, 7)), 35),
    "grid-4x6-small": (dict(grid=(4, 6), conv_size=3, dilated_size=3, dilation=2),
                       dict(grid=(4, 6), dilation=2), 24),
}


def make(case, **kw):
    return VANAttention(D, 1, rngs=nnx.Rngs(0), **CASES[case][0], **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case):
    _, ref_kw, tokens = CASES[case]
    mixer = make(case)
    params = perturbed_params(mixer)
    x, w = inputs(0, (B, tokens, D))
    y64 = van_reference(np, f64(params), np.asarray(x, np.float64), **ref_kw)
    with jax.default_matmul_precision("highest"):
        (_, _), ref_grads = loss_and_grads(lambda p, a: van_reference(jnp, p, a, **ref_kw), params, x, w)
    check_forward_and_gradients(mixer, params, x, w, y64, ref_grads)


def test_reference_sees_the_dilation_and_the_grid():
    """The checks above can fail: the 1-D formula or another dilation on the grid is far from the layer."""
    mixer = make("grid-5x7")
    params = f64(nnx.to_pure_dict(nnx.state(mixer, nnx.Param)))
    x, _ = inputs(1, (B, 35, D))
    y = np.asarray(mixer(x), np.float64)
    x64 = np.asarray(x, np.float64)
    assert rel_err(y, van_reference(np, params, x64, grid=(5, 7))) < 1e-5
    assert rel_err(y, van_reference(np, params, x64, grid=(5, 7), dilation=2)) > 1e-3
    assert rel_err(y, van_reference(np, params, x64)) > 1e-3


def test_bf16_compute_stays_close_to_the_reference():
    mixer = make("grid-5x7", dtype=jnp.bfloat16)
    check_bf16(mixer, perturbed_params(mixer), inputs(0, (B, 35, D))[0],
               lambda xp, p, a: van_reference(xp, p, a, grid=(5, 7)))


def test_van_lka_has_no_cache():
    check_non_causal_has_no_cache(make("1d"), B)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: VANAttention(D, 1, grid=(5,)), "grid"),
        (lambda: VANAttention(D, 1, grid=(0, 7)), "grid"),
        (lambda: VANAttention(D, 1, conv_size=4), "conv_size"),
        (lambda: VANAttention(D, 1, conv_size=0), "conv_size"),
        (lambda: VANAttention(D, 1, dilated_size=6), "dilated_size"),
        (lambda: VANAttention(D, 1, dilation=0), "dilation"),
        (lambda: VANAttention(D, 1, shortcut="yes"), "shortcut"),
        (lambda: VANAttention(D, 0), "num_heads"),
        (lambda: VANAttention(D, 1, grid=(5, 7))(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
