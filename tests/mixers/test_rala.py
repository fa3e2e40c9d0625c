"""RALA (rank-augmented linear attention, "Breaking the Low-Rank Dilemma of Linear Attention") against its equations
written here with the layer's own parameters.

Reference, pair by pair over the tokens (a dense [N, N] score matrix, no state): q_i = elu(x_i W_q) + 1, k_j likewise,
α_j = N softmax_j(q̄·k_j/√d) with q̄ the mean query, o_i = Σ_j α_j (R_i q_i)·(R_j k_j) v_j / N divided by
Σ_j α_j q_i·k_j / N + 1e-6, y = W_o[(o + LePE(v)) ⊙ x W_g]; R the rotary embedding on adjacent pairs (1-D: the token
index at 10000^-linspace(0, 1, d/2); grid: the row on the first d/2 features and the column on the last d/2, at
10000^-linspace(0, 1, d/4)), LePE a loop over the taps of a zero-padded depthwise convolution. Forward in numpy
float64 at rel err <= 1e-5 for every engine form (chunked at two chunk sizes, recurrent, parallel); gradients of
every parameter and the input against jax.grad of the same formula in jnp at <= 1e-4; T = 37 and a 5 × 7 grid;
bf16 compute within 3e-2. Bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from mixer_references import (
    ReferenceCases,
    check_non_causal_has_no_cache,
    depthwise_same,
    heads,
    inputs,
    linear,
    merge,
    raises_naming,
    softmax,
)

from seqlab.mixers.linear.rala import RALA

B, T, D, H = 2, 37, 32, 2
GRID = (5, 7)
d = D // H


# --------------------------------------------------------------------------------------------------------------
# Reference (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


def elu1(xp, a):
    return xp.where(a > 0, a + 1.0, xp.exp(xp.minimum(a, 0.0)))


def rope_angles(length: int, grid) -> np.ndarray:
    """[N, d/2]: the angle of each adjacent feature pair of each token."""
    if grid is None:
        return np.arange(length)[:, None] * 10000.0 ** -np.linspace(0.0, 1.0, d // 2)
    freqs = 10000.0 ** -np.linspace(0.0, 1.0, d // 4)
    rows, cols = np.divmod(np.arange(length), grid[1])
    return np.concatenate([rows[:, None] * freqs, cols[:, None] * freqs], axis=1)


def rotate(xp, x, angles):
    """x [B, N, H, d]: pair (x_2i, x_2i+1) of token n rotated by angles[n, i]."""
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return xp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(x.shape)


def rala_reference(xp, p, x, *, grid=None, rope=True, eps=1e-6):
    n = x.shape[1]
    q = elu1(xp, heads(linear(x, p["q_proj"]), H))
    k = elu1(xp, heads(linear(x, p["k_proj"]), H))
    v = linear(x, p["v_proj"])
    alpha = n * softmax(xp, xp.einsum("bhd,bjhd->bhj", q.mean(axis=1), k) / np.sqrt(d))  # [B, H, N]
    angles = rope_angles(n, grid) if rope else np.zeros((n, d // 2))  # no rotation without rope
    qr, kr = rotate(xp, q, angles), rotate(xp, k, angles)
    pairs = xp.einsum("bihd,bjhd->bhij", qr, kr) * alpha[:, :, None, :] / n
    normaliser = xp.einsum("bihd,bjhd->bhij", q, k) * alpha[:, :, None, :] / n
    o = xp.einsum("bhij,bjhv->bihv", pairs, heads(v, H)) / (xp.swapaxes(normaliser.sum(-1), 1, 2)[..., None] + eps)
    gated = (merge(o) + depthwise_same(xp, v, p["lepe"]["conv"], grid)) * linear(x, p["g_proj"])
    return linear(gated, p["o_proj"])


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

SEQUENCE = ReferenceCases(
    {
        "rala-1d": (lambda **kw: RALA(D, H, **kw), rala_reference),
        "rala-1d-norope": (lambda **kw: RALA(D, H, rope=False, conv_size=3, **kw),
                           lambda xp, p, x: rala_reference(xp, p, x, rope=False)),
    },
    shape=(B, T, D),
)
ON_GRID = ReferenceCases(
    {"rala-grid": (lambda **kw: RALA(D, H, grid=GRID, **kw), lambda xp, p, x: rala_reference(xp, p, x, grid=GRID))},
    shape=(B, GRID[0] * GRID[1], D),
)


@pytest.mark.parametrize("case, form", SEQUENCE.forms())
def test_forward_and_gradients_match_reference(case, form):
    SEQUENCE.check_forward_and_gradients(case, *form)


@pytest.mark.parametrize("case, form", ON_GRID.forms())
def test_grid_forward_and_gradients_match_reference(case, form):
    ON_GRID.check_forward_and_gradients(case, *form)


def test_key_weights_sum_to_the_token_count():
    mixer = SEQUENCE.make("rala-1d")
    q, k = jnp.exp(jnp.asarray(inputs(2, (B, T, H, d))))  # positive, like elu + 1
    alpha = mixer.key_weights(q, k, T)
    np.testing.assert_allclose(jnp.sum(alpha, axis=1), T, rtol=1e-5)
    assert float(jnp.std(alpha)) > 1e-2  # not uniform


def test_bf16_compute_stays_close_to_the_reference():
    ON_GRID.check_bf16("rala-grid")


def test_rala_has_no_cache():
    check_non_causal_has_no_cache(SEQUENCE.make("rala-1d"), B)


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: RALA(D, H, causal=True), "causal"),
        (lambda: RALA(D, H, grid=(5,)), "grid"),
        (lambda: RALA(D, H, grid=(0, 7)), "grid"),
        (lambda: RALA(D, H, conv_size=4), "conv_size"),
        (lambda: RALA(D, H, conv_size=0), "conv_size"),
        (lambda: RALA(D, H, eps=0.0), "eps"),
        (lambda: RALA(D, H, head_dim=6, grid=GRID), "head_dim"),
        (lambda: RALA(D, H, head_dim=5), "head_dim"),
        (lambda: RALA(D, H, grid=GRID)(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
