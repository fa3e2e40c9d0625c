"""Grid orders (seqlab.core.grid) against orders written out by hand on a 3 × 4 grid, their inverses, the grid
reshapes, and scan_orders against a per-order loop of a causal prefix sum (numpy) with per-order inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqlab.core import grid as g

# a 3 × 4 grid, raster positions
#   0  1  2  3
#   4  5  6  7
#   8  9 10 11
BY_HAND = {
    "raster": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    "column": [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
    "snake": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
    "column_snake": [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],
}


@pytest.mark.parametrize("order", g.ORDERS)
def test_orders_match_the_hand_written_ones_and_invert(order):
    base = order.removesuffix("_reversed")
    want = BY_HAND[base][::-1] if order.endswith("_reversed") else BY_HAND[base]
    index = g.order_index((3, 4), order)
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(index[g.inverse_order_index((3, 4), order)], np.arange(12))
    x = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)
    np.testing.assert_array_equal(g.to_order(x, (3, 4), order)[:, 5], x[:, want[5]])
    np.testing.assert_array_equal(g.from_order(g.to_order(x, (3, 4), order), (3, 4), order), x)


def test_grid_reshapes_are_raster_order():
    x = jnp.arange(2 * 12 * 3).reshape(2, 12, 3)
    image = g.to_grid(x, (3, 4))
    assert image.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(image[:, 2, 1], x[:, 9])
    np.testing.assert_array_equal(g.from_grid(image), x)


def test_scan_orders_is_each_order_scanned_and_mapped_back():
    """scan = a running sum over the sequence plus a per-order offset; each order's output, in raster order, must
    be the running sum taken along that order (a loop over the order written out here)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 3)).astype(np.float32)
    orders = ("raster", "column_reversed", "snake")
    offsets = rng.normal(size=(3, 2, 12, 3)).astype(np.float32)  # per order, in raster order
    calls = []

    def scan(a, b):
        calls.append(a.shape)
        return jnp.cumsum(a, axis=1) + b

    out = g.scan_orders(scan, (3, 4), orders, (jnp.asarray(x),), (jnp.asarray(offsets),))
    assert calls == [(6, 12, 3)] and out.shape == (3, 2, 12, 3)
    for i, order in enumerate(orders):
        base = order.removesuffix("_reversed")
        visit = BY_HAND[base][::-1] if order.endswith("_reversed") else BY_HAND[base]
        want = np.zeros_like(x)
        running = np.zeros((2, 3), np.float32)
        for p in visit:
            running = running + x[:, p]
            want[:, p] = running + offsets[i, :, p]
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)


def test_scan_orders_differentiates():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 12, 2)), jnp.float32)

    def loss(x):
        return jnp.sum(g.scan_orders(lambda a: jnp.cumsum(a, axis=1), (3, 4), ("raster", "raster_reversed"), (x,)))

    # each token is summed by every later token of the raster and every earlier one: 12 + 1 times in all
    np.testing.assert_allclose(jax.grad(loss)(x), np.full((1, 12, 2), 13.0), rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: g.order_index((3, 4), "diagonal"), "order must be one of"),
        (lambda: g.order_index((3, 0), "raster"), "grid must be"),
        (lambda: g.order_index((3,), "raster"), "grid must be"),
        (lambda: g.to_order(jnp.zeros((1, 11, 2)), (3, 4), "raster"), "x: the grid"),
        (lambda: g.scan_orders(lambda a: a, (3, 4), (), (jnp.zeros((1, 12, 2)),)), "orders must be"),
        (lambda: g.scan_orders(lambda a: a, (3, 4), ("raster", "column"), (), (jnp.zeros((3, 1, 12, 2)),)),
         "per_order"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
