"""HiLo attention ("Fast Vision Transformers with HiLo Attention") against a per-query loop of its definition,
written here with the layer's own projections: Hi-Fi heads attend within the query's block (up to itself when
causal), Lo-Fi heads to the means of the blocks' keys and values — every block (non-causal) or the blocks
completed by the query's position (causal: (j + 1)·b − 1 <= t) — and the output concatenates the branches after
their own projections. 1-d blocks (T = 13 ends in a partial block, whose mean is over its tokens) and s×s
patches of a 2-d grid. Forward in float64 (1e-5), input gradients from the same loop in jnp (1e-4).
"""

from __future__ import annotations

import math

import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge
from seqlab import mixers

B, D, H = 2, 16, 4


def block_of(t: int, grid, window: int) -> int:
    """The index of token t's block: t // b in 1-d; its s×s patch (raster over patches) on a grid."""
    if grid is None:
        return t // window
    row, col = divmod(t, grid[1])
    return (row // window) * (grid[1] // window) + col // window


def attend(xp, q, k, v, visible):
    """softmax(q·k/√d) over the visible keys (q [B, h, d], k, v [B, n, h, d], visible [n] bools); 0 if none."""
    if not any(visible):
        return xp.zeros_like(q)
    idx = [j for j, seen in enumerate(visible) if seen]
    s = xp.einsum("bhd,bjhd->bhj", q, k[:, idx]) / math.sqrt(q.shape[-1])
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return xp.einsum("bhj,bjhd->bhd", e / e.sum(axis=-1, keepdims=True), v[:, idx])


def layer(xp, params, x, *, window: int, lo_heads: int, grid, causal: bool):
    T = x.shape[1]
    blocks = [block_of(t, grid, window) for t in range(T)]
    size = window if grid is None else window * window
    branches = []
    for name, count in (("hi", H - lo_heads), ("lo", lo_heads)):
        if not count:
            continue
        p = params[name]
        q, k, v = (heads(linear(x, p[i]), count) for i in range(3))
        n = max(blocks) + 1
        members = [[s for s in range(T) if blocks[s] == j] for j in range(n)]
        pooled_k = xp.stack([k[:, m].mean(axis=1) for m in members], axis=1)
        pooled_v = xp.stack([v[:, m].mean(axis=1) for m in members], axis=1)
        rows = []
        for t in range(T):
            if name == "hi":
                visible = [blocks[s] == blocks[t] and (s <= t or not causal) for s in range(T)]
                rows.append(attend(xp, q[:, t], k, v, visible))
            else:
                visible = [not causal or (j + 1) * size - 1 <= t for j in range(n)]
                rows.append(attend(xp, q[:, t], pooled_k, pooled_v, visible))
        branches.append(linear(merge(xp.stack(rows, axis=1)), p[3]))
    return xp.concatenate(branches, axis=-1)


CASES = [(3, 0.5, None, True, 13), (3, 0.75, None, False, 13), (2, 0.5, (4, 6), False, 24), (4, 0.0, None, True, 9)]


@pytest.mark.parametrize("window, alpha, grid, causal, T", CASES)
def test_hilo_matches_its_definition(window, alpha, grid, causal, T):
    mixer = mixers.create("hilo", d_model=D, num_heads=H, window=window, alpha=alpha, grid=grid, causal=causal,
                          rngs=nnx.Rngs(0))  # fmt: skip

    def formula(xp, params, x):
        pure = {name: [params[name][i] for i in range(4)] for name in ("hi", "lo") if params.get(name) is not None}
        return layer(xp, pure, x, window=window, lo_heads=int(alpha * H), grid=grid, causal=causal)

    assert_layer_matches(mixer, formula, (B, T, D))
