"""MD-LRPE: multi-dimensional linearized relative positional encoding, applied to q and k of [B, T, H, d].

Paper: "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet" (Qin et al., 2024), which
extends LRPE from "Linearized Relative Positional Encoding" (Qin et al., TMLR 2023) to m-dimensional positions.
Read from Doraemonzzz's `MdLrpe` and its `md_lrpe_cosine` kernel.

A token at the m-dimensional position p = (p_1, ..., p_m) gets, per head h, the angles

    Θ_h(p) = concat_a [ θ_{h, 0..n/m-1} · p_a ]          (n angles; every axis a uses the head's first n/m)
    θ_{h, j} = base^(-2 (h n + j) / (H d)),  j < n        (H n frequencies, one contiguous block of n per head)

  kind="rotate" (LRPE type 1): n = d/2; x's adjacent pairs (x_2j, x_2j+1) are rotated by Θ_j (complex RoPE);
  kind="cosine" (LRPE type 3): n = d; x -> [x ⊙ cos Θ(p), x ⊙ sin Θ(p)], doubling d (the real form of x e^{iΘ(p)}
      for real x).

Both are relative: <f(q, p), f(k, p')> depends on p - p' only (rotate: Σ_j Re(q_j conj(k_j) e^{i(Θ_j(p) - Θ_j(p'))});
cosine: Σ_j q_j k_j cos(Θ_j(p) - Θ_j(p'))). `grid_positions` gives the positions of a grid read in raster order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from seqlab.checks import check_choice, check_positive, check_positive_int

LRPE_KINDS = ("rotate", "cosine")


def check_lrpe(kind: str, head_dim: int, num_axes: int, *, kind_name: str = "kind", dim_name: str = "head_dim") -> None:
    """ValueError unless `kind` is known and the head's angles split evenly over `num_axes` position axes (the
    messages name the caller's arguments `kind_name` and `dim_name`)."""
    check_choice(kind_name, kind, LRPE_KINDS)
    angles = head_dim // 2 if kind == "rotate" else head_dim
    if (kind == "rotate" and head_dim % 2) or angles % num_axes:
        need = "even and half of it" if kind == "rotate" else "it"
        raise ValueError(
            f"{dim_name}: MD-LRPE {kind!r} needs {need} divisible by the number of position axes ({num_axes}), "
            f"got {dim_name}={head_dim}"
        )


def lrpe_out_dim(head_dim: int, kind: str) -> int:
    """Feature count per head after the encoding: d (rotate) or 2d (cosine)."""
    return 2 * head_dim if kind == "cosine" else head_dim


def lrpe_frequencies(num_heads: int, head_dim: int, kind: str, base: float = 10000.0) -> jax.Array:
    """θ [H, n] float32: base^(-2i / (H d)) for i = 0 .. H n - 1, split into one contiguous block of n per head
    (n = d/2 for rotate, d for cosine)."""
    per_head = head_dim // 2 if kind == "rotate" else head_dim
    exponent = jnp.arange(num_heads * per_head, dtype=jnp.float32) * (-2.0 / (num_heads * head_dim))
    return (base**exponent).reshape(num_heads, per_head)


def lrpe_angles(positions: jax.Array, num_heads: int, head_dim: int, kind: str, base: float = 10000.0) -> jax.Array:
    """Θ [(B,) T, H, n] float32 for integer positions [(B,) T, m]: axis a uses the head's first n/m frequencies
    times p_a."""
    num_axes = positions.shape[-1]
    theta = lrpe_frequencies(num_heads, head_dim, kind, base)
    per_axis = theta.shape[-1] // num_axes
    p = positions.astype(jnp.float32)
    return jnp.concatenate([p[..., a, None, None] * theta[:, :per_axis] for a in range(num_axes)], axis=-1)


def md_lrpe(x: jax.Array, positions: jax.Array, *, kind: str = "cosine", base: float = 10000.0) -> jax.Array:
    """x [B, T, H, d] at positions [T, m] (or [B, T, m], per row) -> [B, T, H, d] (rotate) or [B, T, H, 2d]
    (cosine), in x's dtype."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, time, heads, head_dim], got shape {x.shape}")
    leading = x.shape[:2] if positions.ndim == 3 else x.shape[1:2]
    if positions.ndim not in (2, 3) or positions.shape[:-1] != leading or positions.shape[-1] < 1:
        raise ValueError(f"positions must be [time, num_axes >= 1] or [batch, time, num_axes] with (batch, time) = "
                         f"{x.shape[:2]}, got shape {positions.shape}")  # fmt: skip
    check_positive("base", base)
    _, _, num_heads, head_dim = x.shape
    check_lrpe(kind, head_dim, positions.shape[-1])
    angles = lrpe_angles(positions, num_heads, head_dim, kind, base)  # [(B,) T, H, n]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    if kind == "cosine":
        return jnp.concatenate([x32 * cos, x32 * sin], axis=-1).astype(x.dtype)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def grid_positions(grid_shape: tuple[int, ...], index: jax.Array | None = None) -> jax.Array:
    """Positions [T, m] int32 of the tokens `index` [T] of a grid of shape (n_1, ..., n_m) read in raster order
    (last axis fastest); by default all prod(grid_shape) tokens. The first axis is unbounded: tokens past the
    grid continue the raster (rows n_1, n_1 + 1, ...). A 1-D grid gives the token index itself."""
    for size in grid_shape:
        check_positive_int("grid_shape", size)
    if index is None:
        index = jnp.arange(math.prod(grid_shape), dtype=jnp.int32)
    coords = []
    rest = index.astype(jnp.int32)
    for size in reversed(grid_shape[1:]):
        coords.append(rest % size)
        rest = rest // size
    coords.append(rest)
    return jnp.stack(coords[::-1], axis=-1)
