"""Token grids and the orders that read them as sequences, and scans over several orders (multi-directional scans).

A token grid x [B, H, W, D] (H rows, W columns) becomes a sequence [B, H·W, D] in an order:

    raster          row by row, left to right                 t = r·W + c
    column          column by column, top to bottom           t = c·H + r
    snake           rows alternately left→right, right→left   (boustrophedon; row r reversed when r is odd)
    column_snake    columns alternately top→bottom, bottom→top
    <order>_reversed   the same order read from its end

seqlab's mixers take grids as raster sequences [B, T, D] with ``grid=(H, W)``; `order_index(grid, order)` [T] is
the raster position of each token of the order, so ``x[:, order_index(...)]`` reads a raster sequence in the order
and `inverse_order_index` maps back. `scan_orders` runs one sequence op (a causal linear scan, an SSM) over several
orders in one call — the orders stacked along the batch axis — and returns each order's outputs in raster order:
ViG's bidirectional GLA (raster and raster_reversed, one gate per direction), VMamba / Mamba-YOLO / LaMamba-Diff's
four-way 2-D selective scan (raster, column and both reversed). Merging (a mean, a sum, learnt gates) is the
mixer's choice. Permutations are static numpy index arrays, so the reorders are gathers XLA fuses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BASE_ORDERS = ("raster", "column", "snake", "column_snake")
ORDERS = BASE_ORDERS + tuple(f"{order}_reversed" for order in BASE_ORDERS)


def check_order(order: str, name: str = "order") -> str:
    """order, or ValueError naming `name` and the known orders."""
    if order not in ORDERS:
        raise ValueError(f"{name} must be one of {ORDERS}, got {order!r}")
    return order


def check_orders(orders: Sequence[str], grid: Sequence[int] | None, name: str = "orders") -> tuple[str, ...]:
    """orders as a non-empty tuple of known orders, or ValueError naming `name`; a 1-D sequence (grid None) has
    only raster and raster_reversed."""
    if not isinstance(orders, (tuple, list)) or not orders:
        raise ValueError(f"{name} must be a non-empty tuple of {ORDERS}, got {orders!r}")
    orders = tuple(check_order(order, name) for order in orders)
    if grid is None and any(order.removesuffix("_reversed") != "raster" for order in orders):
        raise ValueError(f"{name}: a 1-D sequence (grid None) has only raster and raster_reversed, got {orders!r}")
    return orders


def check_grid_shape(grid: Sequence[int], name: str = "grid") -> tuple[int, int]:
    """grid as (rows, cols) positive ints, or ValueError naming `name`."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in grid):
        raise ValueError(f"{name} must be (rows, cols) positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


@functools.lru_cache(maxsize=256)
def _order_index(rows: int, cols: int, order: str) -> np.ndarray:
    base, reversed_ = order.removesuffix("_reversed"), order.endswith("_reversed")
    raster = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)  # raster[r, c] = r·W + c
    lines = raster if base in ("raster", "snake") else raster.T  # one line per row (or column)
    if base in ("snake", "column_snake"):
        lines = lines.copy()
        lines[1::2] = lines[1::2, ::-1]
    index = lines.reshape(-1)
    index = index[::-1] if reversed_ else index
    index.setflags(write=False)
    return index


def order_index(grid: Sequence[int], order: str) -> np.ndarray:
    """[H·W] int32: the raster position of the order's t-th token (read-only)."""
    rows, cols = check_grid_shape(grid)
    return _order_index(rows, cols, check_order(order))


def inverse_order_index(grid: Sequence[int], order: str) -> np.ndarray:
    """[H·W] int32: the order position of the raster's t-th token (`order_index`'s inverse permutation)."""
    index = order_index(grid, order)
    inverse = np.empty_like(index)
    inverse[index] = np.arange(index.size, dtype=np.int32)
    return inverse


def to_order(x: jax.Array, grid: Sequence[int], order: str, axis: int = 1) -> jax.Array:
    """A raster sequence x [..., H·W (at `axis`), ...] read in `order`."""
    _check_length(x, grid, axis)
    return jnp.take(x, order_index(grid, order), axis=axis)


def from_order(x: jax.Array, grid: Sequence[int], order: str, axis: int = 1) -> jax.Array:
    """A sequence x [..., H·W (at `axis`), ...] in `order` back in raster order (`to_order`'s inverse)."""
    _check_length(x, grid, axis)
    return jnp.take(x, inverse_order_index(grid, order), axis=axis)


def to_grid(x: jax.Array, grid: Sequence[int]) -> jax.Array:
    """Raster sequence [B, H·W, D] -> grid [B, H, W, D]."""
    rows, cols = check_grid_shape(grid)
    _check_length(x, grid, 1)
    return x.reshape(x.shape[0], rows, cols, *x.shape[2:])


def from_grid(x: jax.Array) -> jax.Array:
    """Grid [B, H, W, D] -> raster sequence [B, H·W, D]."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def scan_orders(scan: Callable[..., jax.Array], grid: Sequence[int], orders: Sequence[str],
                shared: Sequence[jax.Array], per_order: Sequence[jax.Array] = ()) -> jax.Array:
    """Each order's outputs of one sequence op, in raster order: [O, B, T, ...] for O = len(orders).

    scan(*inputs) -> [B', T, ...] maps sequences (axis 1) to sequences; it is called once, on every order's inputs
    stacked along the batch axis (B' = O·B). shared: inputs [B, T, ...] every order reads (reordered per order);
    per_order: inputs [O, B, T, ...], one per order (e.g. a gate per direction), in raster order.
    """
    orders = check_orders(orders, grid)
    n = len(orders)
    for i, a in enumerate(per_order):
        if a.shape[0] != n:
            raise ValueError(f"per_order[{i}]: leading axis {a.shape[0]} must be the number of orders ({n})")

    def stacked(a: jax.Array, own: bool) -> jax.Array:
        parts = [to_order(a[i] if own else a, grid, order) for i, order in enumerate(orders)]
        return jnp.concatenate(parts, axis=0)

    inputs = [stacked(a, False) for a in shared] + [stacked(a, True) for a in per_order]
    out = scan(*inputs)
    out = out.reshape(n, out.shape[0] // n, *out.shape[1:])
    return jnp.stack([from_order(out[i], grid, order) for i, order in enumerate(orders)])


def _check_length(x: jax.Array, grid: Sequence[int], axis: int) -> None:
    rows, cols = check_grid_shape(grid)
    if x.shape[axis] != rows * cols:
        raise ValueError(f"x: the grid {(rows, cols)} holds {rows * cols} tokens, got {x.shape[axis]} on axis {axis}")
