"""Agent attention ("Agent Attention: On the Integration of Softmax and Linear Attention") against its equations
written here with the layer's own parameters: agents A_i = mean of the queries of PyTorch's adaptive-pooling
segment i (loops over the segments; on a grid, over a × a windows of rows and columns), V_A = softmax(A Kᵀ/√d + B₁)
V, O = softmax(Q Aᵀ/√d + B₂) V_A + DWConv(V), y = O W_o; the biases are the learnt maps linearly interpolated
along the tokens with half-pixel centres (numpy.interp), plus the separable row and column terms on a grid; the
depthwise convolution is a loop over the 3 (or 3×3) taps with zero padding. Forward in float64 (1e-5) and the
gradient of the input against the same formulas in jnp (1e-4), 1-d (T = 37, 8 agents) and a 6 × 8 grid (4 agents).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge
from seqlab import mixers

B, D, H = 2, 16, 2


def segments(length: int, count: int) -> list[range]:
    return [range((i * length) // count, -(-((i + 1) * length) // count)) for i in range(count)]


def interpolate(table: np.ndarray, length: int) -> np.ndarray:
    """Linear resize of the last axis to `length` with half-pixel centres (edges clamped)."""
    src = (np.arange(length) + 0.5) * table.shape[-1] / length - 0.5
    flat = table.reshape(-1, table.shape[-1])
    return np.stack([np.interp(src, np.arange(table.shape[-1]), row) for row in flat]).reshape(*table.shape[:-1],
                                                                                                 length)


def biases(params, prefix: str, grid, T: int) -> np.ndarray:
    table = np.asarray(params[f"{prefix}_bias"], np.float64)
    if grid is None:
        return interpolate(table, T)
    rows = interpolate(np.swapaxes(table, -1, -2), grid[0])             # [H, n, a, rows] after resizing rows
    full = interpolate(np.swapaxes(rows, -1, -2), grid[1])              # [H, n, rows, cols]
    full = full + np.asarray(params[f"{prefix}_rows"]) + np.asarray(params[f"{prefix}_cols"])
    return full.reshape(*full.shape[:2], -1)


def layer(xp, params, x, *, agents: int, grid):
    T = x.shape[1]
    q, k, v = (heads(linear(x, params[n]), H) for n in ("q_proj", "k_proj", "v_proj"))
    if grid is None:
        groups = [list(s) for s in segments(T, agents)]
    else:
        side = math.isqrt(agents)
        groups = [[r * grid[1] + c for r in rs for c in cs]
                  for rs, cs in itertools.product(segments(grid[0], side), segments(grid[1], side))]
    a = xp.stack([q[:, g].mean(axis=1) for g in groups], axis=1)        # [B, n, H, d]
    scale = 1 / math.sqrt(q.shape[-1])
    b1, b2 = biases(params, "agent", grid, T), biases(params, "query", grid, T)
    va = xp.einsum("bhnt,bthd->bhnd", softmax(xp, xp.einsum("bnhd,bthd->bhnt", a, k) * scale + b1), v)
    o = xp.einsum("bhtn,bhnd->bthd", softmax(xp, xp.einsum("bthd,bnhd->bhtn", q, a) * scale
                                                + np.swapaxes(b2, -1, -2)), va)
    return linear(merge(o) + depthwise(xp, merge(v), params["dwc"], grid), params["o_proj"])


def softmax(xp, s):
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def depthwise(xp, v, conv, grid):
    """'same'-padded depthwise convolution of v [B, T, C] (kernel [3, 1, C] or [3, 3, 1, C], bias [C])."""
    kernel, out = conv["kernel"], conv["bias"]
    if grid is None:
        padded = xp.pad(v, ((0, 0), (1, 1), (0, 0)))
        return sum(padded[:, i : i + v.shape[1]] * kernel[i, 0] for i in range(3)) + out
    image = xp.pad(v.reshape(v.shape[0], *grid, -1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = sum(image[:, i : i + grid[0], j : j + grid[1]] * kernel[i, j, 0] for i in range(3) for j in range(3))
    return (taps + out).reshape(v.shape)


@pytest.mark.parametrize("agents, grid, T", [(8, None, 37), (4, (6, 8), 48)])
def test_agent_attention_matches_its_equations(agents, grid, T):
    mixer = mixers.create("agent", d_model=D, num_heads=H, num_agents=agents, grid=grid, rngs=nnx.Rngs(0))
    formula = functools.partial(layer, agents=agents, grid=grid)
    assert_layer_matches(mixer, formula, (B, T, D))  # the biases' interpolation is numpy: x's gradient only
