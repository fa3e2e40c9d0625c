"""HyperZ·Z·W ("HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction") against its formula
written here from the mixer's own parameters: the slow network evaluated position by position at the coordinates
-1 + 2k / (n - 1) of a kernel as large as the grid (or the sequence), W = N^-1/2 (h W_k + b_k), z = x W_z + b_z, the
context-dependent kernel Ŵ_p = W_p ⊙ z_p, o_i = Σ_p Ŵ_p ⊙ z_{i + p - c} summed pair by pair over (output, kernel
position) with c = (n - 1) // 2 per axis and zeros outside the grid, y = o W_o + b_o. No FFT in the reference.

Forward in numpy float64 at rel err <= 1e-5; gradients of every parameter and of x against jax.grad of the same
formula in jnp (float32, full matmul precision) at <= 1e-4; 1-D sequences of 37 and 16 tokens (one mixer, two
kernel lengths), an odd non-square 5 × 7 grid, an even 4 × 6 grid and a deeper slow network; bf16 compute within
3e-2 of the float64 reference. Bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import jax
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

from seqlab.mixers.conv.hyperzzw import HyperZZW

B, T, D = 2, 37, 16
ARGS = dict(slow_hidden=8, slow_layers=2)


def positions(shape):
    """Every raster-order position of a grid of `shape` as a tuple of indices."""
    if len(shape) == 1:
        return [(i,) for i in range(shape[0])]
    return [(i, j) for i in range(shape[0]) for j in range(shape[1])]


def coordinates(shape) -> np.ndarray:
    """[N, d]: position p's coordinates, -1 + 2 p_a / (n_a - 1) on each axis a (-1 on an axis of one)."""
    return np.array([[-1.0 + 2.0 * k / (n - 1) if n > 1 else -1.0 for k, n in zip(p, shape)] for p in positions(shape)])


def selection(shape) -> np.ndarray:
    """S [N, N, N]: S[i, p, q] = 1 where the input q = i + p - c (per axis, c = (n - 1) // 2) lies on the grid."""
    where = {p: k for k, p in enumerate(positions(shape))}
    centre = [(n - 1) // 2 for n in shape]
    s = np.zeros((len(where),) * 3)
    for i, out in enumerate(positions(shape)):
        for k, offset in enumerate(positions(shape)):
            source = tuple(o + p - c for o, p, c in zip(out, offset, centre))
            if source in where:
                s[i, k, where[source]] = 1.0
    return s


def hyperzzw_reference(xp, p, x, *, shape):
    kappa = coordinates(shape)
    a, a_bias = p["filter_weight"], p["filter_bias"]
    h = xp.sin(kappa @ a[0] + a_bias[0])
    for layer in range(p["hidden_weight"].shape[0]):
        h = xp.sin(kappa @ a[layer + 1] + a_bias[layer + 1]) * (h @ p["hidden_weight"][layer] + p["hidden_bias"][layer])
    kernel = (h @ p["kernel_proj"]["kernel"] + p["kernel_proj"]["bias"]) / np.sqrt(len(kappa))  # [N, C]
    z = x @ p["z_proj"]["kernel"] + p["z_proj"]["bias"]
    o = xp.einsum("ipq,bpc,bqc->bic", selection(shape), kernel * z, z)
    return o @ p["o_proj"]["kernel"] + p["o_proj"]["bias"]


CASES = {  # name: (constructor kwargs, kernel shape)
    "1d-37": (ARGS, (T,)),
    "1d-16": (ARGS, (16,)),
    "grid-5x7": (dict(ARGS, grid=(5, 7)), (5, 7)),
    "grid-4x6": (dict(ARGS, grid=(4, 6)), (4, 6)),
    "grid-5x7-deep": (dict(grid=(5, 7), slow_hidden=6, slow_layers=3, omega_0=0.5), (5, 7)),
}


def make(case, **kw):
    return HyperZZW(D, 1, rngs=nnx.Rngs(0), **CASES[case][0], **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case):
    shape = CASES[case][1]
    mixer = make(case)
    params = perturbed_params(mixer)
    x, w = inputs(0, (B, int(np.prod(shape)), D))
    y64 = hyperzzw_reference(np, f64(params), np.asarray(x, np.float64), shape=shape)
    with jax.default_matmul_precision("highest"):
        (_, _), ref_grads = loss_and_grads(lambda p, a: hyperzzw_reference(jnp, p, a, shape=shape), params, x, w)
    check_forward_and_gradients(mixer, params, x, w, y64, ref_grads)


def reach(mixer, x, token):
    """Per output token, the largest change when x at `token` moves by 1."""
    return np.asarray(jnp.max(jnp.abs(mixer(x.at[:, token].add(1.0)) - mixer(x)), axis=(0, 2)))


def test_reach_on_a_sequence_and_on_the_grid_and_the_reference_sees_the_grid_shape():
    """1-D: every token reaches every output (by the kernel weight it modulates or as the convolved input); on the
    grid the centre token does, and a corner token misses the two quadrants off its diagonal. (Parameters moved off
    their init: at init the kernel is zero at the centre coordinate, sin(0) with zero biases.)"""
    line = make("1d-37")
    nnx.update(line, perturbed_params(line))
    x1, _ = inputs(2, (B, T, D))
    for token in (0, 18, 36):
        assert reach(line, x1, token).min() > 1e-3
    mixer = make("grid-5x7")
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(1, (B, 35, D))
    assert reach(mixer, x, 2 * 7 + 3).min() > 1e-3  # the centre (2, 3)
    corner = reach(mixer, x, 0).reshape(5, 7)
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    off_diagonal = ((rows < 2) & (cols > 3)) | ((rows > 2) & (cols < 3))
    assert corner[off_diagonal].max() < 1e-5 and corner[~off_diagonal].min() > 1e-3
    y = mixer(x)
    params = f64(nnx.to_pure_dict(nnx.state(mixer, nnx.Param)))
    x64 = np.asarray(x, np.float64)
    assert rel_err(y, hyperzzw_reference(np, params, x64, shape=(5, 7))) < 1e-5
    assert rel_err(y, hyperzzw_reference(np, params, x64, shape=(7, 5))) > 1e-3  # so does the transposed grid


def test_initial_filter_frequencies_follow_the_gamma_scaled_init():
    """A_l = U(±1/√d) · 2π ω_0 γ, γ ~ Gamma(α / (l + 1), β): the mean |A_l| is π ω_0 α / ((l + 1) β √d)."""
    mixer = HyperZZW(D, 1, grid=(5, 7), slow_hidden=512, slow_layers=2, omega_0=2.0, gamma_beta=2.0)
    a = np.abs(np.asarray(mixer.filter_weight[...]))
    for layer in range(3):
        expected = np.pi * 2.0 * 6.0 / ((layer + 1) * 2.0 * np.sqrt(2.0))
        assert abs(a[layer].mean() / expected - 1.0) < 0.1, (layer, a[layer].mean(), expected)
    np.testing.assert_array_equal(np.asarray(mixer.hidden_bias[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(mixer.filter_bias[...]), 0.0)


def test_bf16_compute_stays_close_to_the_reference():
    mixer = make("grid-5x7", dtype=jnp.bfloat16)
    check_bf16(mixer, perturbed_params(mixer), inputs(0, (B, 35, D))[0],
               lambda xp, p, a: hyperzzw_reference(xp, p, a, shape=(5, 7)))


def test_hyperzzw_has_no_cache():
    check_non_causal_has_no_cache(make("1d-37"), B)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: HyperZZW(D, 1, grid=(5, 7.0)), "grid"),
        (lambda: HyperZZW(D, 1, slow_hidden=0), "slow_hidden"),
        (lambda: HyperZZW(D, 1, slow_layers=0), "slow_layers"),
        (lambda: HyperZZW(D, 1, omega_0=0.0), "omega_0"),
        (lambda: HyperZZW(D, 1, gamma_alpha=-1.0), "gamma_alpha"),
        (lambda: HyperZZW(D, 1, gamma_beta=0), "gamma_beta"),
        (lambda: HyperZZW(D, 1, use_bias=1), "use_bias"),
        (lambda: HyperZZW(D, 1, impl="fft"), "impl"),
        (lambda: HyperZZW(D, 1, grid=(5, 7))(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
