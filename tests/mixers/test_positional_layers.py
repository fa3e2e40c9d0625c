"""The relative positional encodings of seqlab.layers: MD-LRPE (`md_lrpe`, `grid_positions`), URPE and LRPE,
against their formulas written out per position in float64 numpy (rel. err <= 1e-5), and their defining property:
query-key scores that depend only on the offset between positions (per axis for MD-LRPE)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import f64, lrpe_token, np_lrpe_angles, urpe_token
from reference import rel_err

from seqlab.layers.lrpe import LRPE, URPE
from seqlab.layers.md_lrpe import grid_positions, md_lrpe

FWD_TOL = 1e-5
B, H = 2, 2


# ----------------------------------------------------------------------------------------------------------------
# MD-LRPE
# ----------------------------------------------------------------------------------------------------------------


def np_md_lrpe(x, positions, kind, base=10000.0):
    x = f64(x)
    angles = np_lrpe_angles(positions, x.shape[2], x.shape[3], kind, base)[None]
    if kind == "cosine":
        return np.concatenate([x * np.cos(angles), x * np.sin(angles)], axis=-1)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)  # complex rotation of adjacent pairs
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_grid_positions_raster_order():
    got = np.asarray(grid_positions((3, 4)))
    want = np.array([(r, c) for r in range(3) for c in range(4)])
    np.testing.assert_array_equal(got, want)
    index = jnp.arange(10, 30)  # past the grid: rows continue (the first axis is unbounded)
    np.testing.assert_array_equal(np.asarray(grid_positions((3, 4), index)), np.stack([np.arange(10, 30) // 4,
                                                                                      np.arange(10, 30) % 4], -1))
    want_3d = np.array([(a, b, c) for a in range(2) for b in range(3) for c in range(4)])
    np.testing.assert_array_equal(np.asarray(grid_positions((2, 3, 4))), want_3d)


@pytest.mark.parametrize("kind", ["rotate", "cosine"])
def test_md_lrpe_matches_formula(kind, rng):
    x = rng.standard_normal((B, 12, H, 8)).astype(np.float32)
    pos = grid_positions((3, 4))
    got = md_lrpe(jnp.asarray(x), pos, kind=kind)
    assert got.shape == (B, 12, H, 16 if kind == "cosine" else 8)
    assert rel_err(got, np_md_lrpe(x, np.asarray(pos), kind)) < FWD_TOL


@pytest.mark.parametrize("kind", ["rotate", "cosine"])
def test_md_lrpe_relative_in_2d(kind, rng):
    """<f(q, p), f(k, p')> depends on p - p' only (2-D positions), and does change with p - p' along each axis."""
    d = 8
    q, k = (jnp.asarray(rng.standard_normal((1, 1, H, d)), jnp.float32) for _ in range(2))

    def score(p, p_prime):
        fq = md_lrpe(q, jnp.array([p]), kind=kind)
        fk = md_lrpe(k, jnp.array([p_prime]), kind=kind)
        return np.asarray(jnp.sum(fq * fk, axis=-1))[0, 0]  # [H]

    base = score((2, 5), (1, 3))
    for shift in [(3, 0), (0, 7), (4, 11)]:
        shifted = score((2 + shift[0], 5 + shift[1]), (1 + shift[0], 3 + shift[1]))
        np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-5)
    for other in [(0, 3), (1, 4)]:  # offset (2, 2) then (1, 1) instead of (1, 2): each axis matters
        assert np.max(np.abs(score((2, 5), other) - base)) > 1e-3


def test_md_lrpe_bad_args():
    x = jnp.ones((1, 4, 2, 6))
    with pytest.raises(ValueError, match="kind"):
        md_lrpe(x, jnp.zeros((4, 1), jnp.int32), kind="complex")
    with pytest.raises(ValueError, match="head_dim"):
        md_lrpe(x, jnp.zeros((4, 2), jnp.int32), kind="rotate")  # 3 angles over 2 axes
    with pytest.raises(ValueError, match="positions"):
        md_lrpe(x, jnp.zeros((5, 1), jnp.int32))


# --------------------------------------------------------------------------------------------------------------
# URPE and LRPE
# --------------------------------------------------------------------------------------------------------------


def test_urpe_init_reference_isometry_and_relativity(rng):
    d = 8
    urpe = URPE(d, rngs=nnx.Rngs(3))
    theta, u = np.asarray(urpe.theta[...]), np.asarray(urpe.householder[...])
    np.testing.assert_allclose(theta, 10000.0 ** (-2.0 * np.arange(d // 2) / d), rtol=1e-6)
    assert abs(np.linalg.norm(u) - 1.0) < 1e-6
    assert "householder" not in nnx.state(urpe, nnx.Param)  # fixed, not trained
    np.testing.assert_array_equal(URPE(d, rngs=nnx.Rngs(3)).householder[...], u)  # deterministic from rngs
    assert np.max(np.abs(URPE(d, rngs=nnx.Rngs(4)).householder[...] - u)) > 1e-3

    x = rng.normal(size=(B, 11, H, d)).astype(np.float32)
    pos = jnp.arange(11) + 5
    y = urpe(x, pos)
    want = np.stack([urpe_token(np, f64(x[:, t]), t + 5, f64(theta), f64(u)) for t in range(11)], axis=1)
    assert rel_err(y, want) <= FWD_TOL
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)

    qv, kv = rng.normal(size=(2, d)).astype(np.float32)
    n = 12
    q = urpe(np.broadcast_to(qv, (1, n, 1, d)), jnp.arange(n))[0, :, 0]
    k = urpe(np.broadcast_to(kv, (1, n, 1, d)), jnp.arange(n))[0, :, 0]
    scores = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T  # scores[t, s] depends on t - s only
    np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-5)
    assert np.ptp(np.diag(scores, -3)) < 1e-5 and abs(scores[3, 0] - scores[0, 0]) > 1e-3


def test_lrpe_init_reference_and_relative_scores(rng):
    d = 4
    lrpe = LRPE(H, d)
    theta = np.asarray(lrpe.theta[...])
    m = np.arange(H * d).reshape(H, 1, d)
    np.testing.assert_allclose(theta, 10000.0 ** (-2.0 * m / (H * d)), rtol=1e-6)

    x = rng.normal(size=(B, 9, H, d)).astype(np.float32)
    y = lrpe(x, jnp.arange(9) + 2)
    assert y.shape == (B, 9, H, 2 * d)
    want = np.stack([lrpe_token(np, f64(x[:, t]), t + 2, f64(theta[:, 0])) for t in range(9)], axis=1)
    assert rel_err(y, want) <= FWD_TOL

    qv, kv = rng.normal(size=(2, H, d))
    n = 10
    q = np.asarray(lrpe(np.broadcast_to(qv, (1, n, H, d)).astype(np.float32), jnp.arange(n))[0], np.float64)
    k = np.asarray(lrpe(np.broadcast_to(kv, (1, n, H, d)).astype(np.float32), jnp.arange(n))[0], np.float64)
    scores = np.einsum("thi,shi->hts", q, k)
    delta = np.arange(n)[:, None] - np.arange(n)[None, :]
    want = np.einsum("hi,hi,htsi->hts", qv, kv, np.cos(theta[:, 0][:, None, None, :] * delta[None, :, :, None]))
    np.testing.assert_allclose(scores, want, atol=1e-5)
