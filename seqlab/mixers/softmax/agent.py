"""Agent attention — "Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., ECCV 2024).

    A = pool(Q)  [n agents],   V_A = softmax(A Kᵀ/√d + B₁) V,   O = softmax(Q Aᵀ/√d + B₂) V_A + DWConv(V)

Per head: n agent tokens, the adaptive average pooling of the queries (over the sequence, or to an a×a grid of
agents over a 2-d token ``grid``), first aggregate the values (agent aggregation), then broadcast them back to
every query (agent broadcast): generalised linear attention with φ_q(q) = softmax(q Aᵀ) and φ_k(k) =
softmax over tokens of A kᵀ, O(T·n·d) instead of O(T²·d). B₁ [n, T] and B₂ [T, n] are agent position biases: a
learnt n × p map per head linearly resized along the tokens (p = n; 2-d: an a × a map per agent bilinearly resized
to the grid, plus separable row and column terms), initialised N(0, 0.02) truncated. A depthwise convolution
(kernel 3, or 3×3 on a grid) of V restores the diversity the low-rank agents lose. Non-causal (the agents pool
the whole sequence): no decode cache, no packed rows; on a sequence split over devices the layer all-gathers its
input.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqlab.checks import check_positive_int, resolve_dim
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register


def adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
    """[out, length] float32: row i averages the tokens of PyTorch's adaptive pooling segment i,
    [⌊i·L/n⌋, ⌈(i+1)·L/n⌉)."""
    rows = np.zeros((out, length), np.float32)
    for i in range(out):
        first, last = (i * length) // out, -(-((i + 1) * length) // out)
        rows[i, first:last] = 1.0 / (last - first)
    return rows


@register(
    "agent",
    kind="softmax",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    examples={"1d": dict(num_heads=2, num_agents=8, use_bias=False)},  # 2-d (whole grids only): tests/mixers/test_agent.py
)
class AgentAttention(Mixer):
    """num_agents n (a square a × a on a grid); grid: (H, W) of 2-d tokens (None: a 1-d sequence). impl: every
    value computes the one form agent attention has (dense over the n agents, O(T·n·d))."""

    causal = False

    def __init__(self, d_model: int, num_heads: int, *, num_agents: int = 49, grid: tuple[int, int] | None = None,
                 head_dim: int | None = None, use_bias: bool = True, impl: str = "auto", rngs: nnx.Rngs | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("num_agents", num_agents)
        if grid is not None:
            if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(isinstance(n, int) and n > 0
                                                                                for n in grid):
                raise ValueError(f"grid must be None or (H, W) positive ints, got {grid!r}")
            if math.isqrt(num_agents) ** 2 != num_agents:
                raise ValueError(f"num_agents must be a square (an a × a grid of agents) on a grid, got {num_agents}")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        self.num_agents, self.grid = num_agents, None if grid is None else tuple(grid)
        self._projections(self.head_dim, self.head_dim, rngs, use_bias=use_bias)
        width = num_heads * self.head_dim
        kernel = (3,) if grid is None else (3, 3)
        self.dwc = nnx.Conv(width, width, kernel, feature_group_count=width, padding="SAME", dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        side = math.isqrt(num_agents)
        maps = (num_agents,) if grid is None else (side, side)  # resized to the tokens
        shapes = {f"{p}_bias": (num_heads, num_agents, *maps) for p in ("agent", "query")}
        if grid is not None:  # separable row and column terms
            for p in ("agent", "query"):
                shapes[f"{p}_rows"], shapes[f"{p}_cols"] = (num_heads, num_agents, grid[0], 1), \
                    (num_heads, num_agents, 1, grid[1])
        for name, shape in shapes.items():
            setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))

    def init_cache(self, batch: int, max_len: int):
        self._check_cache_args(batch, max_len)

    def pool_matrix(self, length: int) -> np.ndarray:
        """[n, T]: the agents as averages of the queries."""
        if self.grid is None:
            return adaptive_pool_matrix(length, self.num_agents)
        side = math.isqrt(self.num_agents)
        return np.kron(adaptive_pool_matrix(self.grid[0], side), adaptive_pool_matrix(self.grid[1], side))

    def position_bias(self, prefix: str, length: int) -> jax.Array:
        """[H, n, T] float32 agent-to-token bias (prefix "agent": B₁; "query": B₂ transposed)."""
        table = getattr(self, f"{prefix}_bias")[...].astype(jnp.float32)
        h, n = table.shape[:2]
        if self.grid is None:
            return jax.image.resize(table, (h, n, length), "linear", antialias=False)
        resized = jax.image.resize(table, (h, n, *self.grid), "linear", antialias=False)
        resized = resized + getattr(self, f"{prefix}_rows")[...] + getattr(self, f"{prefix}_cols")[...]
        return resized.reshape(h, n, -1)

    def _forward(self, x: jax.Array, cache: Any):
        return self._on_whole_sequence(self._agent_attention, x), None  # the agents pool the whole sequence

    def _agent_attention(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> y [B, T, d_model] over the whole sequence."""
        B, T, _ = x.shape
        if self.grid is not None and T != self.grid[0] * self.grid[1]:
            raise ValueError(f"x: agent attention on the grid {self.grid} takes {self.grid[0] * self.grid[1]} "
                             f"tokens, got {T}")
        q, k, v = (self._heads(p(x), self.head_dim).astype(jnp.float32)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scale = self.head_dim**-0.5
        agents = jnp.einsum("nt,bthd->bnhd", jnp.asarray(self.pool_matrix(T)), q)
        aggregate = jax.nn.softmax(jnp.einsum("bnhd,bthd->bhnt", agents, k) * scale
                                   + self.position_bias("agent", T), axis=-1)
        agent_values = jnp.einsum("bhnt,bthd->bhnd", aggregate, v)
        broadcast = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", q, agents) * scale
                                   + jnp.swapaxes(self.position_bias("query", T), -1, -2), axis=-1)
        o = jnp.einsum("bhtn,bhnd->bthd", broadcast, agent_values)
        v_flat = self._merge_heads(v.astype(x.dtype))
        conv = self.dwc(v_flat if self.grid is None else v_flat.reshape(B, *self.grid, -1)).reshape(B, T, -1)
        return self.o_proj(self._merge_heads(o.astype(x.dtype)) + conv)
