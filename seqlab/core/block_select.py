"""Data-dependent block selection: the key tiles each query tile reads, as a runtime ``masks.BlockIndex``.

A selecting family scores key tiles against query tiles and keeps the best ``k`` per row (one-shot top-k over
every candidate, or HiP's hierarchical pruning, which scores O(k log n) tiles per row); ``local`` tiles next to
the query tile are always read. Functions take the rows they select for (``rows`` [R]: every query tile in
training, the query's own tile in a decode step), so both compute the same selection.

Candidates of row i: causal — the complete tiles j <= i - local, wholly before the local tiles (their keys are
all at or before every query of the row, so a decode step can score them from its cache); non-causal — every
tile with |i - j| >= local. Local tiles: i - local < j <= i (causal) or |i - j| < local. Selected and local
tiles never overlap, and a row with fewer than k candidates leaves entries unused (the sentinel nk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import masks

Array = jax.Array
NEG_INF = -jnp.inf


def tile_sums(x: Array, block: int) -> Array:
    """[B, Hkv, T, F] -> [B, Hkv, ceil(T / block), F]: the sum over each tile of ``block`` tokens."""
    b, h, t, f = x.shape
    n = -(-t // block)
    x = jnp.pad(x, [(0, 0), (0, 0), (0, n * block - t), (0, 0)])
    return x.reshape(b, h, n, block, f).sum(axis=3)


def candidates(rows: Array, num_tiles: int, local: int, causal: bool) -> Array:
    """[R, nk] bool: the key tiles row ``rows[r]`` may select (module docstring)."""
    distance = rows[:, None] - jnp.arange(num_tiles)[None]
    return distance >= local if causal else jnp.abs(distance) >= local


def local_tiles(rows: Array, local: int, causal: bool) -> Array:
    """[R, local] (causal) or [R, 2·local − 1] int32: the tiles each row always reads (negative = none)."""
    offsets = jnp.arange(local) if causal else jnp.arange(-(local - 1), local)
    return (rows[:, None] - offsets[None]).astype(jnp.int32)


def top_tiles(scores: Array, allowed: Array, k: int) -> Array:
    """[B, Hkv, R, k] int32: the k best allowed tiles of scores [B, Hkv, R, nk] (allowed [R, nk] bool); fewer
    allowed tiles than k leave the sentinel nk."""
    num_tiles = scores.shape[-1]
    scores = jnp.where(allowed, jax.lax.stop_gradient(scores), NEG_INF)
    best, tiles = jax.lax.top_k(scores, min(k, num_tiles))
    tiles = jnp.where(best > NEG_INF, tiles, num_tiles).astype(jnp.int32)
    return jnp.pad(tiles, [(0, 0)] * 3 + [(0, k - tiles.shape[-1])], constant_values=num_tiles)


def hierarchical_tiles(span_score, counts: Array, num_tiles: int, k: int) -> Array:
    """HiP's hierarchical pruning over the candidate range [0, counts[r]) of each row: [B, Hkv, R, k] int32.

    The range starts as k equal spans; each round splits every kept span [lo, hi) into [lo, mid) and [mid, hi)
    (mid = ⌈(lo + hi) / 2⌉), scores each half by its first tile, ``span_score(first [R, 2k]) -> [B, Hkv, R, 2k]``,
    and keeps the k best non-empty halves, until every span is one tile: ⌈log2 ⌈nk / k⌉⌉ rounds, 2k scored tiles
    each. counts [R] int32; a row with fewer than k candidates keeps them all.
    """
    s = jnp.arange(k)
    lo = ((s[None] * counts[:, None]) // k)[None, None]  # [1, 1, R, k]
    hi = (((s[None] + 1) * counts[:, None]) // k)[None, None]
    for _ in range(max(0, (-(-num_tiles // k) - 1).bit_length())):  # ⌈log2 ⌈nk / k⌉⌉ rounds
        mid = (lo + hi + 1) // 2
        halves_lo, halves_hi = jnp.concatenate([lo, mid], -1), jnp.concatenate([mid, hi], -1)  # [B|1, Hkv|1, R, 2k]
        scores = jax.lax.stop_gradient(span_score(jnp.minimum(halves_lo, num_tiles - 1)))
        scores = jnp.where(halves_hi > halves_lo, scores, NEG_INF)
        _, keep = jax.lax.top_k(scores, k)
        lo = jnp.take_along_axis(jnp.broadcast_to(halves_lo, scores.shape), keep, -1)
        hi = jnp.take_along_axis(jnp.broadcast_to(halves_hi, scores.shape), keep, -1)
    return jnp.where(hi > lo, lo, num_tiles).astype(jnp.int32)


def block_index(selected: Array, local: Array, num_tiles: int, block: int) -> masks.BlockIndex:
    """The runtime mask of selected tiles [B, Hkv, R, k] and local tiles [R, L]: a BlockIndex of k + L tiles per
    row (over rows the caller chose: every query tile, or one)."""
    local = jnp.broadcast_to(local, (*selected.shape[:2], *local.shape))
    return masks.BlockIndex.of(jnp.concatenate([selected, local], axis=-1), block, num_tiles)
