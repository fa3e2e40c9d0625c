"""LaMamba ("LaMamba-Diff: Linear-Time High-Fidelity Diffusion Models Based on Local Attention and Mamba") against
its equations written here with the layer's own parameters.

Reference: the local attention pair by pair over each query's neighbourhood, enumerated here (on a grid the k × k
window around the query shifted inward at the borders, on a 1-D sequence |i − j| <= k // 2), with a dense softmax;
the scan branch token by token: a zero-padded centred depthwise conv + SiLU on [u, B, C], per order
Δ = softplus(Δ_raw + b), h = exp(−e^{A_log} Δ) h + B (Δ u)ᵀ, m = hᵀ C run over the order's tokens (enumerated from
rows and columns), the mean over orders, + D u, RMSNorm(m ⊙ SiLU(z)) W_out; y = attention + scan. Forward in numpy
float64 at rel err <= 1e-5 for every engine form; gradients of every parameter and the input against jax.grad of
the same formula in jnp at <= 1e-4; T = 37 and a 5 × 7 grid; bf16 within 3e-2.
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
    linear,
    merge,
    over_tokens,
    raises_naming,
    silu,
    softmax,
)
from test_vig import order_positions

from seqlab.mixers.hybrid.lamamba import LaMamba

B, T, D, H, N = 2, 37, 32, 2, 8
GRID = (5, 7)
P = 2 * D // H  # expand 2


def neighbourhood(n: int, window: int, grid) -> np.ndarray:
    """[n, n] bool: key j is in query i's neighbourhood."""
    if grid is None:
        i = np.arange(n)
        return np.abs(i[:, None] - i[None, :]) <= window // 2
    rows, cols = grid
    visible = np.zeros((n, n), bool)
    for r in range(rows):
        for c in range(cols):
            r0 = min(max(r - window // 2, 0), rows - window)
            c0 = min(max(c - window // 2, 0), cols - window)
            for kr in range(r0, r0 + window):
                for kc in range(c0, c0 + window):
                    visible[r * cols + c, kr * cols + kc] = True
    return visible


def attention_reference(xp, p, x, window, grid):
    q, k, v = (heads(linear(x, p[name]), H) for name in ("q_proj", "k_proj", "v_proj"))
    scores = xp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D // H)
    scores = xp.where(neighbourhood(x.shape[1], window, grid), scores, -1e30)
    return linear(merge(xp.einsum("bhij,bjhd->bihd", softmax(xp, scores), v)), p["o_proj"])


def scan_reference(xp, p, x, grid, orders):
    n, inner = x.shape[1], H * P
    projected = linear(x, p["in_proj"])
    z, ubc, dt_raw = projected[..., :inner], projected[..., inner:2 * inner + 2 * N], projected[..., 2 * inner + 2 * N:]
    ubc = silu(xp, depthwise_same(xp, ubc, p["conv"]["conv"], grid))
    u, b, c = heads(ubc[..., :inner], H), ubc[..., inner:inner + N], ubc[..., inner + N:]
    dt_all = xp.logaddexp(0.0, dt_raw.reshape(B, n, len(orders), H) + p["dt_bias"])  # softplus

    def step(h, b_t, c_t, u_t, dt_t):  # h [B, H, N, P]
        h = xp.exp(-xp.exp(p["A_log"]) * dt_t)[..., None, None] * h + b_t[:, None, :, None] * (dt_t[..., None] * u_t)[
            :, :, None, :]
        return h, xp.einsum("bn,bhnp->bhp", c_t, h)

    m = 0.0
    for r, order in enumerate(orders):
        at = order_positions(order, *(grid or (1, n)))
        m_order = over_tokens(xp, step, xp.zeros((B, H, N, P)), (b[:, at], c[:, at], u[:, at], dt_all[:, at, r]))
        m = m + m_order[:, np.argsort(at)] / len(orders)
    m = merge(m + p["D"][:, None] * u)
    gated = m * silu(xp, z)
    normed = gated / xp.sqrt((gated * gated).mean(-1, keepdims=True) + 1e-5) * p["norm"]["weight"]
    return linear(normed, p["out_proj"])


def lamamba_reference(xp, p, x, *, window=5, grid=None, orders=("raster", "raster_reversed")):
    return attention_reference(xp, p["attention"], x, window, grid) + scan_reference(xp, p, x, grid, orders)


FOUR_WAY = ("raster", "raster_reversed", "column", "column_reversed")
SEQUENCE = ReferenceCases(
    {
        "lamamba-1d": (lambda **kw: LaMamba(D, H, window=5, d_state=N, **kw), lamamba_reference),
        "lamamba-1d-one-way": (lambda **kw: LaMamba(D, H, window=3, d_state=N, orders=("raster_reversed",), **kw),
                               lambda xp, p, x: lamamba_reference(xp, p, x, window=3, orders=("raster_reversed",))),
    },
    shape=(B, T, D),
)
ON_GRID = ReferenceCases(
    {"lamamba-grid": (lambda **kw: LaMamba(D, H, grid=GRID, window=3, d_state=N, **kw),
                      lambda xp, p, x: lamamba_reference(xp, p, x, window=3, grid=GRID, orders=FOUR_WAY))},
    shape=(B, GRID[0] * GRID[1], D),
)


@pytest.mark.parametrize("case, form", SEQUENCE.forms())
def test_forward_and_gradients_match_reference(case, form):
    SEQUENCE.check_forward_and_gradients(case, *form)


@pytest.mark.parametrize("case, form", ON_GRID.forms())
def test_grid_forward_and_gradients_match_reference(case, form):
    ON_GRID.check_forward_and_gradients(case, *form)


def test_bf16_compute_stays_close_to_the_reference():
    ON_GRID.check_bf16("lamamba-grid")


def test_lamamba_has_no_cache():
    check_non_causal_has_no_cache(SEQUENCE.make("lamamba-1d"), B)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: LaMamba(D, H, grid=(5, 0)), "grid"),
        (lambda: LaMamba(D, H, window=4), "window"),
        (lambda: LaMamba(D, H, grid=GRID, window=7), "window"),
        (lambda: LaMamba(D, H, orders=("column",)), "orders"),
        (lambda: LaMamba(D, H, orders=()), "orders"),
        (lambda: LaMamba(D, H, d_state=0), "d_state"),
        (lambda: LaMamba(D, H, expand=0.3), "expand"),
        (lambda: LaMamba(D, H, grid=GRID, window=3)(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
