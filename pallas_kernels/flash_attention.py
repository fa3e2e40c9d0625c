"""Blockwise softmax attention in Pallas over a block-mask description — "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning" — with grouped-query heads.

    o_t = Σ_{s ∈ vis(t)} exp(scale · q_t·k_s − lse_t) v_s,   lse_t = log Σ_{s ∈ vis(t)} exp(scale · q_t·k_s)

(o_t = 0 for a query that sees no key). vis(t) comes from a mask: ``Causal``, ``Bidirectional`` (both with an
optional sliding window), ``BlockDiagonal`` (seqlab's ``block_local_attn`` pattern), ``Strided`` (the strided
pattern of "Generating Long Sequences with Sparse Transformers"), ``BlockSparse`` (a static layout of tiles) and
``PerHead`` (one of those per query head). A mask gives an element predicate ``visible(q_pos, k_pos)``, evaluated
inside the kernels on iota positions, and, statically in numpy, ``tile_map``: which (query tile, key tile) pairs
hold a visible pair. From the tile maps each (head, query tile) gets the list of key tiles it visits (and each key
tile the list of query tiles that see it, for dK and dV); a kernel loops over exactly those, so empty tiles cost
nothing. Positions past the sequence (padding) are never visible.

Kernels run in the layout [B, H, T, D] (``_common.to_kernel_layout``), T padded to the largest block, D and V to
``padded_feature``:

- forward, grid (B, H, query tiles): float32 scores, online softmax (running max m, normaliser l, accumulator);
  the output and the float32 log-sum-exp per row, the only residual besides the inputs;
- dQ, grid (B, H, query tiles): P = exp(S − lse), dS = P ∘ (dO Vᵀ − δ) with δ = rowsum(dO ∘ O) (computed in
  XLA), dQ = scale · dS K;
- dK, dV, grid (B, Hkv, key tiles): the same P and dS over the G query heads of the key/value head and the query
  tiles that see the key tile; dV = Σ Pᵀ dO, dK = scale · Σ dSᵀ Q.

The visit tables are flat int32 arrays: in SMEM on TPU, ordinary inputs on GPU and CPU.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common

Array = jax.Array

_MASKED = -1e30  # finite "minus infinity", as in seqlab.core.online_softmax


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes (tokens) of the forward kernel and of the two backward kernels, and GPU launch parameters.

    Every size is clamped to the sequence (at least 16 tokens) and, for a ``BlockSparse`` mask, to the layout's
    tile, so that a kernel tile never straddles two layout tiles.
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.check_blocks(self, ("block_q", "block_k", "block_q_bwd", "block_k_bwd"))


# ---------------------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------------------


def _check_positive(owner: str, name: str, value: object, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


class Mask(abc.ABC):
    """Which keys each query sees: an element mask (``ElementMask``) shared by every head, or ``PerHead``."""

    @abc.abstractmethod
    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        """The element mask of each row of the visit tables: one shared by all heads, or one per query head."""


class ElementMask(Mask):
    """A mask given by an element predicate and the static map of its non-empty tiles."""

    @abc.abstractmethod
    def visible(self, q_pos: Array, k_pos: Array) -> Array:
        """Bool, from int32 positions of one shape: key k_pos visible to query q_pos, for positions inside a
        (query tile, key tile) pair that ``tile_map`` marks non-empty (and below the sequence length)."""

    @abc.abstractmethod
    def any_visible(self, q_first: np.ndarray, q_last: np.ndarray, k_first: np.ndarray,
                    k_last: np.ndarray) -> np.ndarray:
        """Whether some query in [q_first, q_last] sees some key in [k_first, k_last] (numpy, broadcasting)."""

    def check(self, length: int) -> None:
        """ValueError if the mask does not fit a sequence of ``length`` tokens."""

    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        return (self,)

    def tile_map(self, length: int, block_q: int, block_k: int) -> np.ndarray:
        """[ceil(T / block_q), ceil(T / block_k)] bool: the tile pairs holding at least one visible pair."""
        q_first, q_last = _tile_bounds(length, block_q)
        k_first, k_last = _tile_bounds(length, block_k)
        return np.asarray(self.any_visible(q_first[:, None], q_last[:, None], k_first[None], k_last[None]))


def _rectangle_sum(a: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
                   cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sum of a[r0 : r1 + 1, c0 : c1 + 1] for broadcasting index arrays rows = (r0, r1), cols = (c0, c1)."""
    table = np.pad(np.cumsum(np.cumsum(a, axis=0), axis=1), ((1, 0), (1, 0)))
    (r0, r1), (c0, c1) = rows, cols
    return table[r1 + 1, c1 + 1] - table[r0, c1 + 1] - table[r1 + 1, c0] + table[r0, c0]


def _tile_bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each tile of ``block`` tokens, the last one clipped to the sequence."""
    first = np.arange(0, length, block)
    return first, np.minimum(first + block, length) - 1


def _differences(q_first, q_last, k_first, k_last) -> tuple[np.ndarray, np.ndarray]:
    """The range [lo, hi] of t − s over a tile pair; every integer in it occurs."""
    return q_first - k_last, q_last - k_first


@dataclasses.dataclass(frozen=True)
class Causal(ElementMask):
    """Key s visible to query t iff s <= t and t − s < window."""

    window: int | None = None

    def __post_init__(self):
        _check_positive("Causal", "window", self.window, optional=True)

    def visible(self, q_pos, k_pos):
        diff = q_pos - k_pos
        return (diff >= 0) if self.window is None else (diff >= 0) & (diff < self.window)

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        return (hi >= 0) if self.window is None else (hi >= 0) & (lo < self.window)


@dataclasses.dataclass(frozen=True)
class Bidirectional(ElementMask):
    """Every key visible to every query; with a window, iff |t − s| < window."""

    window: int | None = None

    def __post_init__(self):
        _check_positive("Bidirectional", "window", self.window, optional=True)

    def visible(self, q_pos, k_pos):
        diff = q_pos - k_pos
        if self.window is None:
            return jnp.full(diff.shape, True)
        return (diff < self.window) & (diff > -self.window)

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        if self.window is None:
            return np.full(np.broadcast_shapes(lo.shape, hi.shape), True)
        return (hi > -self.window) & (lo < self.window)


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(ElementMask):
    """t and s in the same block of ``size`` tokens (t // size == s // size), and s <= t if ``causal``."""

    size: int
    causal: bool = True

    def __post_init__(self):
        _check_positive("BlockDiagonal", "size", self.size)

    def visible(self, q_pos, k_pos):
        same = jax.lax.div(q_pos, self.size) == jax.lax.div(k_pos, self.size)  # positions are >= 0
        return same & (k_pos <= q_pos) if self.causal else same

    def any_visible(self, q_first, q_last, k_first, k_last):
        # Some block meets both ranges; with causal, the latest query of that block is then at or after its
        # earliest key as soon as k_first <= q_last.
        shared = (q_first // self.size <= k_last // self.size) & (k_first // self.size <= q_last // self.size)
        return shared & (k_first <= q_last) if self.causal else shared


@dataclasses.dataclass(frozen=True)
class Strided(ElementMask):
    """(t − s) % stride == 0, and s <= t if ``causal`` (the strided heads of the Sparse Transformer)."""

    stride: int
    causal: bool = True

    def __post_init__(self):
        _check_positive("Strided", "stride", self.stride)

    def visible(self, q_pos, k_pos):
        diff = q_pos - k_pos
        on_stride = jax.lax.rem(diff, self.stride) == 0
        return on_stride & (diff >= 0) if self.causal else on_stride

    def any_visible(self, q_first, q_last, k_first, k_last):
        lo, hi = _differences(q_first, q_last, k_first, k_last)
        if self.causal:
            lo = np.maximum(lo, 0)
        return (hi // self.stride) * self.stride >= lo  # the largest multiple of stride <= hi lies in [lo, hi]


@dataclasses.dataclass(frozen=True)
class BlockSparse(ElementMask):
    """A static [nq, nk] layout over tiles of ``block`` tokens: within a tile marked True every pair is visible
    (intersected with s <= t if ``causal``); nq = nk = ceil(T / block). Lists of bools are turned into tuples.

    The layout is applied by the visit tables alone (kernel tiles are clamped to fit inside its tiles), so
    ``visible`` is only the causal part."""

    layout: tuple[tuple[bool, ...], ...]
    block: int
    causal: bool = False

    def __post_init__(self):
        _check_positive("BlockSparse", "block", self.block)
        try:
            rows = tuple(tuple(bool(x) for x in row) for row in self.layout)
        except TypeError:
            raise ValueError("BlockSparse.layout must be a 2-d nesting of bools") from None
        if not rows or len({len(row) for row in rows}) != 1:
            raise ValueError("BlockSparse.layout must be a non-empty rectangle of bools")
        object.__setattr__(self, "layout", rows)

    def check(self, length: int) -> None:
        tiles = -(-length // self.block)
        shape = (len(self.layout), len(self.layout[0]))
        if shape != (tiles, tiles):
            raise ValueError(f"BlockSparse.layout must have shape ({tiles}, {tiles}) for T={length} and "
                             f"block={self.block}, got {shape}")

    def visible(self, q_pos, k_pos):
        return (k_pos <= q_pos) if self.causal else jnp.full(k_pos.shape, True)

    def any_visible(self, q_first, q_last, k_first, k_last):
        layout = np.asarray(self.layout)
        rows, cols = (q_first // self.block, q_last // self.block), (k_first // self.block, k_last // self.block)
        if not self.causal:
            return _rectangle_sum(layout, rows, cols) > 0
        # Cells below the diagonal are wholly causal; a diagonal cell holds a pair with s <= t iff k_first <= q_last.
        below = _rectangle_sum(np.tril(layout, -1), rows, cols) > 0
        first, last = np.maximum(rows[0], cols[0]), np.minimum(rows[1], cols[1])
        diagonal = np.concatenate([[0], np.cumsum(np.diag(layout))])
        on_diagonal = (last >= first) & (diagonal[np.maximum(last + 1, first)] > diagonal[first])
        return below | on_diagonal & (k_first <= q_last)

    @property
    def aligned_block(self) -> int:
        """The largest power of two dividing ``block``: kernel tiles of at most this size never straddle cells."""
        return self.block & -self.block


@dataclasses.dataclass(frozen=True)
class PerHead(Mask):
    """One element mask per query head (their number must equal H), e.g. the Sparse Transformer's
    ``PerHead((Causal(window=w), Strided(w)))``."""

    masks: tuple[ElementMask, ...]

    def __post_init__(self):
        masks = tuple(self.masks) if isinstance(self.masks, (tuple, list)) else None
        if not masks or not all(isinstance(m, ElementMask) for m in masks):
            raise ValueError(f"PerHead.masks must be a non-empty tuple of element masks (not PerHead), got "
                             f"{self.masks!r}")
        object.__setattr__(self, "masks", masks)

    def head_masks(self, num_heads: int) -> tuple[ElementMask, ...]:
        if len(self.masks) != num_heads:
            raise ValueError(f"PerHead.masks must have one mask per query head ({num_heads}), got {len(self.masks)}")
        return self.masks


# ---------------------------------------------------------------------------------------------------------------
# static plan: block sizes, padding, visit tables
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: it is the custom_vjp's non-differentiable argument)."""

    head_masks: tuple[ElementMask, ...]  # one per table row: 1, or H for PerHead
    length: int  # T
    padded: int  # T rounded up to every block size
    group: int  # G = H / Hkv
    scale: float
    blocks: FlashBlocks  # clamped to the sequence and the masks
    backend: str

    def mask_row(self, head: Array | int) -> Array | int:
        """The table row of a query head."""
        return head if len(self.head_masks) > 1 else 0


def _fitted_blocks(blocks: FlashBlocks, length: int, head_masks: tuple[ElementMask, ...]) -> FlashBlocks:
    """Each tile size clamped to the sequence (at least 16) and to every BlockSparse layout's tile."""
    limit = max(_common.MIN_FEATURE, pl.next_power_of_2(length))
    for mask in head_masks:
        if isinstance(mask, BlockSparse):
            if mask.aligned_block < _common.MIN_FEATURE:
                raise ValueError(f"mask: BlockSparse.block must be a multiple of {_common.MIN_FEATURE} (kernel "
                                 f"tiles may not straddle layout tiles), got {mask.block}")
            limit = min(limit, mask.aligned_block)
    names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    return dataclasses.replace(blocks, **{n: min(getattr(blocks, n), limit) for n in names})


@dataclasses.dataclass(frozen=True)
class _VisitTable:
    """Per table row (mask head) and tile: the tiles it visits, flat for scalar memory.

    ``tiles[(row * num_tiles + i) * width + n]`` for n < ``counts[row * num_tiles + i]``; both arrays padded to a
    power of two in length."""

    tiles: np.ndarray
    counts: np.ndarray
    num_tiles: int
    width: int


def _pad_to_power_of_two(x: np.ndarray) -> np.ndarray:
    return np.pad(x, (0, pl.next_power_of_2(x.size) - x.size))


@functools.lru_cache(maxsize=128)
def _visit_table(head_masks: tuple[ElementMask, ...], length: int, padded: int, block_rows: int, block_cols: int,
                 by_key: bool) -> _VisitTable:
    """Visits of query tiles (rows) to key tiles, or with ``by_key`` of key tiles to the query tiles that see
    them; tiles of ``block_rows`` / ``block_cols`` tokens over the padded sequence (padding tiles are empty)."""
    num_rows, num_cols = padded // block_rows, padded // block_cols
    maps = np.zeros((len(head_masks), num_rows, num_cols), bool)
    for row, mask in enumerate(head_masks):
        tile_map = mask.tile_map(length, block_cols, block_rows).T if by_key else mask.tile_map(
            length, block_rows, block_cols)
        maps[row, : tile_map.shape[0], : tile_map.shape[1]] = tile_map
    counts = maps.sum(-1)
    width = max(1, int(counts.max()))
    tiles = np.argsort(~maps, axis=-1, kind="stable")[..., :width]  # the non-empty tiles first, in order
    tiles = np.where(np.arange(width) < counts[..., None], tiles, 0)
    return _VisitTable(_pad_to_power_of_two(tiles.astype(np.int32).ravel()),
                      _pad_to_power_of_two(counts.astype(np.int32).ravel()), num_rows, width)


def _visits(plan: _Plan, block_rows: int, block_cols: int, by_key: bool = False) -> _VisitTable:
    return _visit_table(plan.head_masks, plan.length, plan.padded, block_rows, block_cols, by_key)


# ---------------------------------------------------------------------------------------------------------------
# kernel pieces
# ---------------------------------------------------------------------------------------------------------------


def _visible_in_tile(plan: _Plan, head: Array | int, q_start: Array | int, k_start: Array | int, rows: int,
                     cols: int) -> Array:
    """[rows, cols] bool for the tile at (q_start, k_start): the head's mask, positions below T only."""
    q_pos = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + q_start
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + k_start
    in_range = (q_pos < plan.length) & (k_pos < plan.length)
    masks = dict.fromkeys(plan.head_masks)  # distinct masks, in head order
    visible = None
    for mask in masks:
        mask_visible = mask.visible(q_pos, k_pos)
        if visible is None:
            visible = mask_visible
        else:
            heads = [h for h, m in enumerate(plan.head_masks) if m == mask]
            selected = functools.reduce(jnp.logical_or, [head == h for h in heads])
            visible = jnp.where(selected, mask_visible, visible)
    return in_range & visible


def _visit_loop(tiles_ref, counts_ref, meta: _VisitTable, row: Array | int, tile: Array | int,
                body: Callable[[Array, object], object], init: object) -> object:
    """fori_loop of body(visited tile, carry) over the tiles that table row ``row``, tile ``tile`` visits."""
    entry = row * meta.num_tiles + tile

    def step(n, carry):
        return body(tiles_ref[entry * meta.width + n], carry)

    return jax.lax.fori_loop(0, counts_ref[entry], step, init)


def _scores(plan: _Plan, q: Array, k: Array) -> Array:
    """scale · q kᵀ in float32: q [rows, D], k [cols, D] -> [rows, cols]."""
    return _common.matmul_nt(q, k) * plan.scale


def _forward_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
    """One query tile: q [bq, D] against the key tiles it visits of k [T', D], v [T', V]; o [bq, V], lse [bq, 1]."""
    head, tile = pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q, plan.blocks.block_k
    q = q_ref[...]

    def visit(key_tile, carry):
        m, l, acc = carry
        start = pl.multiple_of(key_tile * block_k, block_k)
        visible = _visible_in_tile(plan, head, tile * block_q, start, block_q, block_k)
        scores = jnp.where(visible, _scores(plan, q, k_ref[pl.ds(start, block_k), :]), _MASKED)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
        p = _common.masked_exp(scores - m_new, visible)
        rescale = jnp.exp(m - m_new)
        values = v_ref[pl.ds(start, block_k), :]
        acc = acc * rescale + _common.matmul(p.astype(values.dtype), values)
        return m_new, l * rescale + jnp.sum(p, axis=1, keepdims=True), acc

    init = (jnp.full((block_q, 1), _MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
    m, l, acc = _visit_loop(tiles_ref, counts_ref, meta, plan.mask_row(head), tile, visit, init)
    seen = l > 0  # a row that saw a key has l >= 1 (its maximum contributes exp(0))
    o_ref[...] = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _MASKED)


def _probabilities_and_score_grads(plan: _Plan, visible: Array, q: Array, k: Array, v: Array, do: Array,
                                   lse: Array, delta: Array) -> tuple[Array, Array]:
    """P = exp(S − lse) and dS = P ∘ (dO Vᵀ − δ), both [bq, bk] float32."""
    p = _common.masked_exp(_scores(plan, q, k) - lse, visible)
    return p, p * (_common.matmul_nt(do, v) - delta)


def _dq_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref):
    """One query tile: dQ [bq, D] = scale · Σ over visited key tiles dS K."""
    head, tile = pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q_bwd, plan.blocks.block_k_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def visit(key_tile, dq):
        start = pl.multiple_of(key_tile * block_k, block_k)
        visible = _visible_in_tile(plan, head, tile * block_q, start, block_q, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        _, ds = _probabilities_and_score_grads(plan, visible, q, k, v_ref[pl.ds(start, block_k), :], do, lse, delta)
        return dq + _common.matmul(ds.astype(k.dtype), k)

    dq = _visit_loop(tiles_ref, counts_ref, meta, plan.mask_row(head), tile, visit,
                     jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * plan.scale


def _dkv_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref):
    """One key tile k [bk, D], v [bk, V] against the G query heads of its kv head (q [G, T', D], dO [G, T', V],
    lse and δ [G, T', 1]) and the query tiles that see it: dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO."""
    kv_head, tile = pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q_bwd, plan.blocks.block_k_bwd
    k, v = k_ref[...], v_ref[...]

    def head_in_group(g, carry):
        head = kv_head * plan.group + g

        def visit(query_tile, carry):
            dk, dv = carry
            start = pl.multiple_of(query_tile * block_q, block_q)
            rows = pl.ds(start, block_q)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            visible = _visible_in_tile(plan, head, start, tile * block_k, block_q, block_k)
            p, ds = _probabilities_and_score_grads(plan, visible, q, k, v, do, lse_ref[g, rows, :],
                                                   delta_ref[g, rows, :])
            return (dk + _common.matmul_tn(ds.astype(q.dtype), q),
                    dv + _common.matmul_tn(p.astype(do.dtype), do))

        return _visit_loop(tiles_ref, counts_ref, meta, plan.mask_row(head), tile, visit, carry)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, plan.group, head_in_group, init)
    dk_ref[...] = dk * plan.scale
    dv_ref[...] = dv


# ---------------------------------------------------------------------------------------------------------------
# pallas calls
# ---------------------------------------------------------------------------------------------------------------


def _table_specs(plan: _Plan) -> list[pl.BlockSpec]:
    """The visit table and counts, whole: scalar memory (SMEM) on TPU, an ordinary input elsewhere."""
    spec = pl.BlockSpec(memory_space=pltpu.SMEM) if plan.backend == "tpu" else pl.BlockSpec()
    return [spec, spec]


def _tile_spec(block: int, feature: int) -> pl.BlockSpec:
    """Tile ``i`` of a [B, H, T', F] array on the grid (b, h, i)."""
    return pl.BlockSpec((None, None, block, feature), lambda b, h, i: (b, h, i, 0))


def _sequence_spec(plan: _Plan, feature: int, group: int = 1) -> pl.BlockSpec:
    """The whole sequence of head h // group of a [B, Hx, T', F] array on the grid (b, h, i)."""
    return pl.BlockSpec((None, None, plan.padded, feature), lambda b, h, i: (b, jax.lax.div(h, group), 0, 0))


def _group_spec(plan: _Plan, feature: int) -> pl.BlockSpec:
    """All G heads, whole sequence, of a [B, Hkv, G, T', F] array on the grid (b, kv head, i)."""
    return pl.BlockSpec((None, None, plan.group, plan.padded, feature), lambda b, h, i: (b, h, 0, 0, 0))


def _call(plan: _Plan, kernel: Callable, meta: _VisitTable, grid: tuple[int, ...], in_specs: list,
          out_specs, out_shape, name: str) -> Callable:
    return _common.pallas_call(
        functools.partial(kernel, plan, meta), backend=plan.backend, grid=grid,
        in_specs=_table_specs(plan) + in_specs, out_specs=out_specs, out_shape=out_shape,
        num_warps=plan.blocks.num_warps, num_stages=plan.blocks.num_stages, name=name,
    )


def _table_args(meta: _VisitTable) -> tuple[Array, Array]:
    return jnp.asarray(meta.tiles), jnp.asarray(meta.counts)


def _forward(plan: _Plan, q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """q [B, H, T', D], k [B, Hkv, T', D], v [B, Hkv, T', V] -> o [B, H, T', V] (v.dtype), lse [B, H, T', 1]."""
    batch, heads, _, dim = q.shape
    value_dim, block_q = v.shape[-1], plan.blocks.block_q
    meta = _visits(plan, block_q, plan.blocks.block_k)
    call = _call(
        plan, _forward_kernel, meta, (batch, heads, meta.num_tiles),
        [_tile_spec(block_q, dim), _sequence_spec(plan, dim, plan.group), _sequence_spec(plan, value_dim, plan.group)],
        [_tile_spec(block_q, value_dim), _tile_spec(block_q, 1)],
        [jax.ShapeDtypeStruct((batch, heads, plan.padded, value_dim), v.dtype),
         jax.ShapeDtypeStruct((batch, heads, plan.padded, 1), jnp.float32)],
        "flash_attention_forward",
    )
    return call(*_table_args(meta), q, k, v)


def _dq(plan: _Plan, q, k, v, do, lse, delta) -> Array:
    """dQ [B, H, T', D] float32."""
    batch, heads, _, dim = q.shape
    block_q = plan.blocks.block_q_bwd
    meta = _visits(plan, block_q, plan.blocks.block_k_bwd)
    call = _call(
        plan, _dq_kernel, meta, (batch, heads, meta.num_tiles),
        [_tile_spec(block_q, dim), _sequence_spec(plan, dim, plan.group),
         _sequence_spec(plan, v.shape[-1], plan.group), _tile_spec(block_q, do.shape[-1]), _tile_spec(block_q, 1),
         _tile_spec(block_q, 1)],
        _tile_spec(block_q, dim), jax.ShapeDtypeStruct(q.shape, jnp.float32), "flash_attention_dq",
    )
    return call(*_table_args(meta), q, k, v, do, lse, delta)


def _dkv(plan: _Plan, q, k, v, do, lse, delta) -> tuple[Array, Array]:
    """dK [B, Hkv, T', D] and dV [B, Hkv, T', V] float32, summed over each kv head's G query heads."""
    batch, kv_heads, _, dim = k.shape
    value_dim, block_k = v.shape[-1], plan.blocks.block_k_bwd
    meta = _visits(plan, block_k, plan.blocks.block_q_bwd, by_key=True)

    def grouped(x: Array) -> Array:  # [B, H, T', F] -> [B, Hkv, G, T', F]
        return x.reshape(batch, kv_heads, plan.group, *x.shape[2:])

    call = _call(
        plan, _dkv_kernel, meta, (batch, kv_heads, meta.num_tiles),
        [_tile_spec(block_k, dim), _tile_spec(block_k, value_dim), _group_spec(plan, dim),
         _group_spec(plan, do.shape[-1]), _group_spec(plan, 1), _group_spec(plan, 1)],
        [_tile_spec(block_k, dim), _tile_spec(block_k, value_dim)],
        [jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        "flash_attention_dkv",
    )
    return call(*_table_args(meta), k, v, grouped(q), grouped(do), grouped(lse), grouped(delta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q: Array, k: Array, v: Array) -> Array:
    return _forward(plan, q, k, v)[0]


def _attention_forward(plan: _Plan, q: Array, k: Array, v: Array) -> tuple[Array, tuple]:
    o, lse = _forward(plan, q, k, v)
    return o, (q, k, v, o, lse)


def _attention_backward(plan: _Plan, residuals: tuple, do: Array) -> tuple[Array, Array, Array]:
    q, k, v, o, lse = residuals
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, T', 1]
    dq = _dq(plan, q, k, v, do, lse, delta)
    dk, dv = _dkv(plan, q, k, v, do, lse, delta)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_forward, _attention_backward)


# ---------------------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------------------


def _check_arrays(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, head_dim], got shape {q.shape}")
    if k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be [batch, time, kv_heads, head_dim] matching q {q.shape} in batch, time and "
                         f"head_dim, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [batch, time, kv_heads, value_dim] matching k {k.shape[:3]}, got {v.shape}")
    if q.shape[1] < 1:
        raise ValueError(f"q must have at least one time step, got shape {q.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"the kv heads of k ({k.shape[2]}) must divide the query heads of q ({q.shape[2]})")


def _make_plan(q: Array, k: Array, v: Array, mask: Mask, scale: float | None, blocks: FlashBlocks,
               backend: str | None) -> _Plan:
    """Checks every argument (ValueError naming it) and fixes the static plan of the call."""
    _check_arrays(q, k, v)
    if not isinstance(mask, Mask):
        raise ValueError(f"mask must be one of Causal, Bidirectional, BlockDiagonal, Strided, BlockSparse, "
                         f"PerHead, got {mask!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None or a number, got {scale!r}")
    if not isinstance(blocks, FlashBlocks):
        raise ValueError(f"blocks must be a FlashBlocks, got {blocks!r}")
    backend = _common.resolve_backend(backend)
    _, length, heads, dim = q.shape
    head_masks = mask.head_masks(heads)
    for head_mask in head_masks:
        head_mask.check(length)
    fitted = _fitted_blocks(blocks, length, head_masks)
    padded = _common.padded_length(length, max(fitted.block_q, fitted.block_k, fitted.block_q_bwd,
                                               fitted.block_k_bwd))
    return _Plan(head_masks, length, padded, heads // k.shape[2],
                 float(dim**-0.5 if scale is None else scale), fitted, backend)


def flash_attention(q: Array, k: Array, v: Array, *, mask: Mask, scale: float | None = None,
                    blocks: FlashBlocks = FlashBlocks(), backend: str | None = None) -> Array:
    """Softmax attention of q over the keys ``mask`` leaves visible, as Pallas kernels (forward and backward).

    q [B, T, H, D]; k [B, T, Hkv, D]; v [B, T, Hkv, V] with Hkv dividing H (query head h reads kv head
    h // (H / Hkv)). scale defaults to D**-0.5; backend None is ``jax.default_backend()``.
    Returns o [B, T, H, V] in v.dtype (0 for a query that sees no key). Differentiable in q, k, v (reverse mode).
    """
    plan = _make_plan(q, k, v, mask, scale, blocks, backend)
    dim, value_dim = _common.padded_feature(q.shape[3]), _common.padded_feature(v.shape[3])
    o = _attention(plan, _common.to_kernel_layout(q, plan.padded, dim), _common.to_kernel_layout(k, plan.padded, dim),
                   _common.to_kernel_layout(v, plan.padded, value_dim))
    return _common.from_kernel_layout(o, plan.length, v.shape[3])
