"""Blockwise softmax attention in Pallas over a block-mask description — "FlashAttention-2: Faster Attention with
Better Parallelism and Work Partitioning" — with grouped-query heads.

    o_t = Σ_{s ∈ vis(t)} exp(scale · q_t·k_s − lse_t) v_s,   lse_t = log Σ_{s ∈ vis(t)} exp(scale · q_t·k_s)

(o_t = 0 for a query that sees no key). vis(t) comes from a mask of ``seqlab.core.masks`` (the mask algebra shared
with the XLA paths; re-exported here): ``Causal``, ``Bidirectional`` (both with an optional sliding window),
``BlockDiagonal``, ``Strided``, ``BlockSparse``, ``Terraced``, ``Document`` (segment ids), compositions ``And`` /
``Or`` (``a & b``, ``a | b``) and ``PerHead``. A mask gives an element predicate ``visible(q_pos, k_pos)``,
evaluated inside the kernels on iota positions, and, statically in numpy, ``tile_map``: which (query tile, key tile)
pairs may hold a visible pair. From the tile maps (``masks.visit_lists``) each (head, query tile) gets the list of
key tiles it visits (and each key tile the list of query tiles that see it, for dK and dV); a kernel loops over
exactly those, so empty tiles cost nothing, and a visited tile whose pairs are all masked (a composed mask's
conservative map) only costs time. Positions past the sequence (padding) are never visible. The kernels have no
contiguous-span fast path of their own: every row walks its visit list.

- ``BlockSparse`` terms: kernel tiles are clamped to fit inside the layout's tiles, so a term is constant on a
  kernel tile; its value there rides in the visit table (``flags``, one bit per term) and reaches the predicate
  as ``cells``.
- ``Document`` terms: the segment ids [B, T] are two more kernel inputs (only then), whole sequences as a column
  [B, T', 1] (query side) and a row [B, 1, T'] (key side), read tile by tile next to the queries and keys.
- ``score_mod`` is not supported by the kernels (ValueError); the XLA forms of ``seqlab.ops.softmax_attn`` take it.

Kernels run in the layout [B, H, T, D] (``_common.to_kernel_layout``), T padded to the largest block, D and V to
``padded_feature``:

- forward, grid (B, H, query tiles): float32 scores, online softmax (running max m, normaliser l, accumulator);
  the output and the float32 log-sum-exp per row, the only residual besides the inputs;
- dQ, grid (B, H, query tiles): P = exp(S − lse), dS = P ∘ (dO Vᵀ − δ) with δ = rowsum(dO ∘ O) (computed in
  XLA), dQ = scale · dS K;
- dK, dV, grid (B, Hkv, key tiles): the same P and dS over the G query heads of the key/value head and the query
  tiles that see the key tile; dV = Σ Pᵀ dO, dK = scale · Σ dSᵀ Q.

The visit tables are flat int32 arrays: in SMEM on TPU, ordinary inputs on GPU and CPU.

A runtime ``masks.BlockIndex`` (``block_index=``: per batch row, kv head and query tile the key tiles chosen from
the data) makes the tables runtime arrays, built in jnp inside the call: one row per (batch row, kv head), shared
by its G query heads (per query head for ``PerHead``). A query tile visits its selected key tiles that the static
tile map keeps, ascending (flags gathered from the static cells); the by-key table (dK, dV) is the transpose, per
key tile the query tiles that selected it. Every kernel tile is then the index's block.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common
from seqlab.core import masks
from seqlab.core.masks import (
    And, Bidirectional, BlockDiagonal, BlockSparse, Causal, Document, ElementMask, Mask, Or, PerHead, Strided,
    Terraced,
)

__all__ = [
    "And", "Bidirectional", "BlockDiagonal", "BlockSparse", "Causal", "Document", "ElementMask", "FlashBlocks", "Mask",
    "Or", "PerHead", "Strided", "Terraced", "flash_attention",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes (tokens) of the forward kernel and of the two backward kernels, and GPU launch parameters.

    Every size is clamped to the sequence (at least 16 tokens) and, for a ``BlockSparse`` mask, to the layout's
    tile, so that a kernel tile never straddles two layout tiles. With a runtime ``block_index`` every size is its
    block (num_warps and num_stages still apply).
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
    blocks: FlashBlocks  # clamped to the sequence and the masks; with a runtime BlockIndex, all its block
    backend: str
    segments: bool  # some mask has a Document term: the kernels read the segment ids
    selection_rows: int = 0  # a runtime BlockIndex: table rows per batch row (Hkv, or H for PerHead); 0: static

    def mask_row(self, head: Array | int) -> Array | int:
        """The mask row (index into head_masks) of a query head."""
        return head if len(self.head_masks) > 1 else 0

    def table_row(self, batch: Array | int, head: Array | int) -> Array | int:
        """The visit-table row of query head ``head`` of batch row ``batch``: its mask row, or with a runtime
        BlockIndex its (batch row, kv head) row (per query head for PerHead)."""
        if not self.selection_rows:
            return self.mask_row(head)
        head_row = head if len(self.head_masks) > 1 else jax.lax.div(head, self.group)
        return batch * self.selection_rows + head_row


def _fitted_blocks(blocks: FlashBlocks, length: int, head_masks: tuple[ElementMask, ...]) -> FlashBlocks:
    """Each tile size clamped to the sequence (at least 16) and to every BlockSparse layout's tile."""
    limit = max(_common.MIN_FEATURE, pl.next_power_of_2(length))
    for term in dict.fromkeys(t for mask in head_masks for t in masks.cell_terms(mask)):
        if term.aligned_block < _common.MIN_FEATURE:
            raise ValueError(f"mask: BlockSparse.block must be a multiple of {_common.MIN_FEATURE} (kernel "
                             f"tiles may not straddle layout tiles), got {term.block}")
        limit = min(limit, term.aligned_block)
    names = ("block_q", "block_k", "block_q_bwd", "block_k_bwd")
    return dataclasses.replace(blocks, **{n: min(getattr(blocks, n), limit) for n in names})


@dataclasses.dataclass(frozen=True)
class _VisitTable:
    """Per table row (mask head; with a runtime BlockIndex, ``_Plan.table_row``) and tile: the tiles it visits,
    flat for scalar memory (numpy for a static table, jax arrays for a runtime one).

    ``tiles[(row * num_tiles + i) * width + n]`` for n < ``counts[row * num_tiles + i]``; ``flags`` (like
    ``tiles``): bit b set iff the row mask's b-th BlockSparse term (``masks.cell_terms``) holds a visible pair in
    that visited tile. All three arrays are padded to a power of two in length."""

    tiles: np.ndarray | Array
    counts: np.ndarray | Array
    flags: np.ndarray | Array
    num_tiles: int
    width: int


def _pad_to_power_of_two(x: np.ndarray | Array, xp: types.ModuleType = np) -> np.ndarray | Array:
    """x flat int32, zero-padded to a power of two in length (xp: numpy for static tables, jax.numpy at run time)."""
    x = xp.ravel(x).astype(np.int32)
    return xp.pad(x, (0, pl.next_power_of_2(x.size) - x.size))


def _cell_flags(mask: ElementMask, length: int, sizes: tuple[int, int], by_key: bool) -> np.ndarray:
    """[rows, cols] int32 (tiles of the table's orientation): bit b of the mask's b-th BlockSparse term's map."""
    terms = masks.cell_terms(mask)
    if len(terms) > 31:
        raise ValueError(f"mask: at most 31 BlockSparse terms per head, got {len(terms)}")
    flags = np.zeros([-(-length // size) for size in sizes], np.int32)
    for bit, term in enumerate(terms):
        flags |= term.tile_map(length, *sizes).astype(np.int32) << bit
    return flags.T if by_key else flags


@functools.lru_cache(maxsize=128)
def _visit_table(head_masks: tuple[ElementMask, ...], length: int, padded: int, block_rows: int, block_cols: int,
                 by_key: bool) -> _VisitTable:
    """Visits of query tiles (rows) to key tiles, or with ``by_key`` of key tiles to the query tiles that see
    them; tiles of ``block_rows`` / ``block_cols`` tokens over the padded sequence (padding tiles are empty)."""
    num_rows = padded // block_rows
    sizes = (block_cols, block_rows) if by_key else (block_rows, block_cols)  # (query tile, key tile)
    lists = [masks.visit_lists(mask, length, *sizes, by_key=by_key) for mask in head_masks]
    width = max(1, max(len(visits) for rows in lists for visits in rows))
    tiles = np.zeros((len(head_masks), num_rows, width), np.int32)
    flags, counts = np.zeros_like(tiles), np.zeros((len(head_masks), num_rows), np.int32)
    for row, (mask, rows) in enumerate(zip(head_masks, lists)):
        cell_flags = _cell_flags(mask, length, sizes, by_key)
        for i, visits in enumerate(rows):
            tiles[row, i, : len(visits)], counts[row, i] = visits, len(visits)
            flags[row, i, : len(visits)] = cell_flags[i, list(visits)]
    return _VisitTable(*map(_pad_to_power_of_two, (tiles, counts, flags)), num_rows, width)


def _selected_visits(plan: _Plan, selection: Array) -> Array:
    """[B, R, n, n] bool: query tile i visits key tile j iff the BlockIndex row selects j and the static tile map
    allows (i, j); selection [B, Hkv, n, S] (entries outside [0, n) select nothing); R: plan.selection_rows."""
    block, num_tiles = plan.blocks.block_q, plan.padded // plan.blocks.block_q
    chosen = jnp.any(selection[..., None] == jnp.arange(num_tiles), axis=-2)  # [B, Hkv, n, n]
    if len(plan.head_masks) > 1:  # PerHead: one row per query head, its kv head's selection
        chosen = jnp.repeat(chosen, plan.group, axis=1)
    static = np.stack([mask.tile_map(plan.length, block, block) for mask in plan.head_masks])  # [1 | H, n, n]
    return chosen & static


def _selected_table(plan: _Plan, selection: Array, by_key: bool) -> _VisitTable:
    """The runtime visit table of a BlockIndex's tiles selection [B, Hkv, n, S] (one row per ``table_row``): per
    query tile its selected key tiles under the static tile map, ascending (``by_key``: per key tile the query
    tiles that selected it), flags gathered from the static cells."""
    block = plan.blocks.block_q
    visits = _selected_visits(plan, selection)
    flags = np.stack([_cell_flags(mask, plan.length, (block, block), False) for mask in plan.head_masks])
    if by_key:
        visits, flags = jnp.swapaxes(visits, -1, -2), np.swapaxes(flags, -1, -2)
    num_tiles = visits.shape[-1]
    width = num_tiles if by_key else min(selection.shape[-1], num_tiles)
    tiles = jnp.argsort(~visits, axis=-1, stable=True)[..., :width]  # visited tiles first, ascending
    flags = jnp.take_along_axis(jnp.broadcast_to(flags, visits.shape), tiles, axis=-1)
    counts = jnp.sum(visits, axis=-1)
    return _VisitTable(*(_pad_to_power_of_two(x, jnp) for x in (tiles, counts, flags)), num_tiles, width)


def _visits(plan: _Plan, block_rows: int, block_cols: int, selection: tuple[Array, ...],
            by_key: bool = False) -> _VisitTable:
    """The static table of the mask, or with selection (a BlockIndex's tiles) its runtime table."""
    if selection:
        return _selected_table(plan, *selection, by_key)
    return _visit_table(plan.head_masks, plan.length, plan.padded, block_rows, block_cols, by_key)


# ---------------------------------------------------------------------------------------------------------------
# kernel pieces
# ---------------------------------------------------------------------------------------------------------------


class _Tables(NamedTuple):
    """The refs of a visit table: tiles, counts and BlockSparse flags."""

    tiles: object
    counts: object
    flags: object


class _SegmentRefs(NamedTuple):
    """The refs of the segment ids: a column [T', 1] (queries) and a row [1, T'] (keys) of one batch element."""

    column: object
    row: object


def _split_refs(plan: _Plan, refs: tuple) -> tuple[_SegmentRefs | None, tuple]:
    """A kernel's trailing refs: the segment ids (only when the plan reads them) and the outputs."""
    return (_SegmentRefs(*refs[:2]), refs[2:]) if plan.segments else (None, refs)


def _visible_in_tile(plan: _Plan, segment_refs: _SegmentRefs | None, head: Array | int, q_start: Array | int,
                     k_start: Array | int, rows: int, cols: int, flags: Array) -> Array:
    """[rows, cols] bool for the tile at (q_start, k_start): the head's mask, positions below T only; flags: the
    visit's BlockSparse bits."""
    q_pos = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + q_start
    k_pos = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + k_start
    in_range = (q_pos < plan.length) & (k_pos < plan.length)
    segments = None
    if segment_refs is not None:
        segments = (segment_refs.column[pl.ds(q_start, rows), :], segment_refs.row[:, pl.ds(k_start, cols)])
    visible = None
    for mask in dict.fromkeys(plan.head_masks):  # distinct masks, in head order
        cells = {term: (flags >> bit) & 1 == 1 for bit, term in enumerate(masks.cell_terms(mask))}
        mask_visible = mask.visible(q_pos, k_pos, segments=segments, cells=cells)
        if visible is None:
            visible = mask_visible
        else:
            heads = [h for h, m in enumerate(plan.head_masks) if m == mask]
            selected = functools.reduce(jnp.logical_or, [head == h for h in heads])
            visible = jnp.where(selected, mask_visible, visible)
    return in_range & visible


def _visit_loop(tables: _Tables, meta: _VisitTable, row: Array | int, tile: Array | int,
                body: Callable[[Array, Array, object], object], init: object) -> object:
    """fori_loop of body(visited tile, its flags, carry) over the tiles that table row ``row``, tile ``tile``
    visits."""
    entry = row * meta.num_tiles + tile

    def step(n, carry):
        index = entry * meta.width + n
        return body(tables.tiles[index], tables.flags[index], carry)

    return jax.lax.fori_loop(0, tables.counts[entry], step, init)


def _scores(plan: _Plan, q: Array, k: Array) -> Array:
    """scale · q kᵀ in float32: q [rows, D], k [cols, D] -> [rows, cols]."""
    return _common.matmul_nt(q, k) * plan.scale


def _forward_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, flags_ref, q_ref, k_ref, v_ref, *refs):
    """One query tile: q [bq, D] against the key tiles it visits of k [T', D], v [T', V]; o [bq, V], lse [bq, 1]
    (refs: the segment ids when read, then o and lse)."""
    segment_refs, (o_ref, lse_ref) = _split_refs(plan, refs)
    head, tile = pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q, plan.blocks.block_k
    q = q_ref[...]

    def visit(key_tile, flags, carry):
        m, l, acc = carry
        start = pl.multiple_of(key_tile * block_k, block_k)
        visible = _visible_in_tile(plan, segment_refs, head, tile * block_q, start, block_q, block_k, flags)
        scores = masks.masked_fill(_scores(plan, q, k_ref[pl.ds(start, block_k), :]), visible)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
        p = _common.masked_exp(scores - m_new, visible)
        rescale = jnp.exp(m - m_new)
        values = v_ref[pl.ds(start, block_k), :]
        acc = acc * rescale + _common.matmul(p.astype(values.dtype), values)
        return m_new, l * rescale + jnp.sum(p, axis=1, keepdims=True), acc

    init = (jnp.full((block_q, 1), masks.MASKED, jnp.float32), jnp.zeros((block_q, 1), jnp.float32),
            jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32))
    tables = _Tables(tiles_ref, counts_ref, flags_ref)
    m, l, acc = _visit_loop(tables, meta, plan.table_row(pl.program_id(0), head), tile, visit, init)
    seen = l > 0  # a row that saw a key has l >= 1 (its maximum contributes exp(0))
    o_ref[...] = jnp.where(seen, acc / jnp.where(seen, l, 1.0), 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), masks.MASKED)


def _probabilities_and_score_grads(plan: _Plan, visible: Array, q: Array, k: Array, v: Array, do: Array,
                                   lse: Array, delta: Array) -> tuple[Array, Array]:
    """P = exp(S − lse) and dS = P ∘ (dO Vᵀ − δ), both [bq, bk] float32."""
    p = _common.masked_exp(_scores(plan, q, k) - lse, visible)
    return p, p * (_common.matmul_nt(do, v) - delta)


def _dq_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, flags_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, *refs):
    """One query tile: dQ [bq, D] = scale · Σ over visited key tiles dS K (refs: the segment ids when read, dQ)."""
    segment_refs, (dq_ref,) = _split_refs(plan, refs)
    head, tile = pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q_bwd, plan.blocks.block_k_bwd
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def visit(key_tile, flags, dq):
        start = pl.multiple_of(key_tile * block_k, block_k)
        visible = _visible_in_tile(plan, segment_refs, head, tile * block_q, start, block_q, block_k, flags)
        k = k_ref[pl.ds(start, block_k), :]
        _, ds = _probabilities_and_score_grads(plan, visible, q, k, v_ref[pl.ds(start, block_k), :], do, lse, delta)
        return dq + _common.matmul(ds.astype(k.dtype), k)

    tables = _Tables(tiles_ref, counts_ref, flags_ref)
    row = plan.table_row(pl.program_id(0), head)
    dq = _visit_loop(tables, meta, row, tile, visit, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * plan.scale


def _dkv_kernel(plan: _Plan, meta: _VisitTable, tiles_ref, counts_ref, flags_ref, k_ref, v_ref, q_ref, do_ref,
                lse_ref, delta_ref, *refs):
    """One key tile k [bk, D], v [bk, V] against the G query heads of its kv head (q [G, T', D], dO [G, T', V],
    lse and δ [G, T', 1]) and the query tiles that see it: dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO (refs: the segment
    ids when read, dK, dV)."""
    segment_refs, (dk_ref, dv_ref) = _split_refs(plan, refs)
    batch, kv_head, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_q, block_k = plan.blocks.block_q_bwd, plan.blocks.block_k_bwd
    k, v = k_ref[...], v_ref[...]
    tables = _Tables(tiles_ref, counts_ref, flags_ref)

    def head_in_group(g, carry):
        head = kv_head * plan.group + g

        def visit(query_tile, flags, carry):
            dk, dv = carry
            start = pl.multiple_of(query_tile * block_q, block_q)
            rows = pl.ds(start, block_q)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]
            visible = _visible_in_tile(plan, segment_refs, head, start, tile * block_k, block_q, block_k, flags)
            p, ds = _probabilities_and_score_grads(plan, visible, q, k, v, do, lse_ref[g, rows, :],
                                                   delta_ref[g, rows, :])
            return (dk + _common.matmul_tn(ds.astype(q.dtype), q),
                    dv + _common.matmul_tn(p.astype(do.dtype), do))

        return _visit_loop(tables, meta, plan.table_row(batch, head), tile, visit, carry)

    init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, plan.group, head_in_group, init)
    dk_ref[...] = dk * plan.scale
    dv_ref[...] = dv


# ---------------------------------------------------------------------------------------------------------------
# pallas calls
# ---------------------------------------------------------------------------------------------------------------


def _table_specs(plan: _Plan) -> list[pl.BlockSpec]:
    """The visit table, counts and flags, whole: scalar memory (SMEM) on TPU, an ordinary input elsewhere."""
    spec = pl.BlockSpec(memory_space=pltpu.SMEM) if plan.backend == "tpu" else pl.BlockSpec()
    return [spec] * 3


def _tile_spec(block: int, feature: int) -> pl.BlockSpec:
    """Tile ``i`` of a [B, H, T', F] array on the grid (b, h, i)."""
    return pl.BlockSpec((None, None, block, feature), lambda b, h, i: (b, h, i, 0))


def _sequence_spec(plan: _Plan, feature: int, group: int = 1) -> pl.BlockSpec:
    """The whole sequence of head h // group of a [B, Hx, T', F] array on the grid (b, h, i)."""
    return pl.BlockSpec((None, None, plan.padded, feature), lambda b, h, i: (b, jax.lax.div(h, group), 0, 0))


def _group_spec(plan: _Plan, feature: int) -> pl.BlockSpec:
    """All G heads, whole sequence, of a [B, Hkv, G, T', F] array on the grid (b, kv head, i)."""
    return pl.BlockSpec((None, None, plan.group, plan.padded, feature), lambda b, h, i: (b, h, 0, 0, 0))


def _segment_specs(plan: _Plan) -> list[pl.BlockSpec]:
    """The segment ids of batch element b, whole: the column [B, T', 1] and the row [B, 1, T'] (none when no mask
    has a Document term)."""
    if not plan.segments:
        return []
    return [pl.BlockSpec((None, plan.padded, 1), lambda b, h, i: (b, 0, 0)),
            pl.BlockSpec((None, 1, plan.padded), lambda b, h, i: (b, 0, 0))]


def _call(plan: _Plan, kernel: Callable, meta: _VisitTable, grid: tuple[int, ...], in_specs: list,
          out_specs, out_shape, name: str) -> Callable:
    return _common.pallas_call(
        functools.partial(kernel, plan, meta), backend=plan.backend, grid=grid,
        in_specs=_table_specs(plan) + in_specs + _segment_specs(plan), out_specs=out_specs, out_shape=out_shape,
        num_warps=plan.blocks.num_warps, num_stages=plan.blocks.num_stages, name=name,
    )


def _table_args(meta: _VisitTable) -> tuple[Array, Array, Array]:
    return jnp.asarray(meta.tiles), jnp.asarray(meta.counts), jnp.asarray(meta.flags)


def _forward(plan: _Plan, q: Array, k: Array, v: Array, segments: tuple[Array, ...],
             selection: tuple[Array, ...]) -> tuple[Array, Array]:
    """q [B, H, T', D], k [B, Hkv, T', D], v [B, Hkv, T', V], segments (column, row), selection (a BlockIndex's
    tiles [B, Hkv, n, S], or none) -> o [B, H, T', V] (v.dtype), lse [B, H, T', 1]."""
    batch, heads, _, dim = q.shape
    value_dim, block_q = v.shape[-1], plan.blocks.block_q
    meta = _visits(plan, block_q, plan.blocks.block_k, selection)
    call = _call(
        plan, _forward_kernel, meta, (batch, heads, meta.num_tiles),
        [_tile_spec(block_q, dim), _sequence_spec(plan, dim, plan.group), _sequence_spec(plan, value_dim, plan.group)],
        [_tile_spec(block_q, value_dim), _tile_spec(block_q, 1)],
        [jax.ShapeDtypeStruct((batch, heads, plan.padded, value_dim), v.dtype),
         jax.ShapeDtypeStruct((batch, heads, plan.padded, 1), jnp.float32)],
        "flash_attention_forward",
    )
    return call(*_table_args(meta), q, k, v, *segments)


def _dq(plan: _Plan, q, k, v, do, lse, delta, segments, selection) -> Array:
    """dQ [B, H, T', D] float32."""
    batch, heads, _, dim = q.shape
    block_q = plan.blocks.block_q_bwd
    meta = _visits(plan, block_q, plan.blocks.block_k_bwd, selection)
    call = _call(
        plan, _dq_kernel, meta, (batch, heads, meta.num_tiles),
        [_tile_spec(block_q, dim), _sequence_spec(plan, dim, plan.group),
         _sequence_spec(plan, v.shape[-1], plan.group), _tile_spec(block_q, do.shape[-1]), _tile_spec(block_q, 1),
         _tile_spec(block_q, 1)],
        _tile_spec(block_q, dim), jax.ShapeDtypeStruct(q.shape, jnp.float32), "flash_attention_dq",
    )
    return call(*_table_args(meta), q, k, v, do, lse, delta, *segments)


def _dkv(plan: _Plan, q, k, v, do, lse, delta, segments, selection) -> tuple[Array, Array]:
    """dK [B, Hkv, T', D] and dV [B, Hkv, T', V] float32, summed over each kv head's G query heads."""
    batch, kv_heads, _, dim = k.shape
    value_dim, block_k = v.shape[-1], plan.blocks.block_k_bwd
    meta = _visits(plan, block_k, plan.blocks.block_q_bwd, selection, by_key=True)

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
    return call(*_table_args(meta), k, v, grouped(q), grouped(do), grouped(lse), grouped(delta), *segments)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q: Array, k: Array, v: Array, segments: tuple[Array, ...],
               selection: tuple[Array, ...]) -> Array:
    return _forward(plan, q, k, v, segments, selection)[0]


def _attention_forward(plan: _Plan, q: Array, k: Array, v: Array, segments: tuple[Array, ...],
                       selection: tuple[Array, ...]) -> tuple[Array, tuple]:
    o, lse = _forward(plan, q, k, v, segments, selection)
    return o, (q, k, v, segments, selection, o, lse)


def _attention_backward(plan: _Plan, residuals: tuple, do: Array) -> tuple[Array, Array, Array, None, None]:
    q, k, v, segments, selection, o, lse = residuals
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, T', 1]
    dq = _dq(plan, q, k, v, do, lse, delta, segments, selection)
    dk, dv = _dkv(plan, q, k, v, do, lse, delta, segments, selection)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


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


def _selected_blocks(blocks: FlashBlocks, block_index: masks.BlockIndex, head_masks: tuple[ElementMask, ...],
                     shape: tuple[int, int, int]) -> FlashBlocks:
    """Every tile size the BlockIndex's block; ValueError naming block_index unless it is a BlockIndex of shape
    (B, Hkv, T) whose block is a kernel block size that fits every BlockSparse layout's tile."""
    if not isinstance(block_index, masks.BlockIndex):
        raise ValueError(f"block_index must be a seqlab.core.masks.BlockIndex or None, got "
                         f"{type(block_index).__name__}")
    block_index.check(*shape)
    block = block_index.block
    if not _common.is_block_size(block):
        raise ValueError(f"block_index: block must be a power of two >= {_common.MIN_FEATURE} (the kernels' "
                         f"tile), got {block!r}")
    for term in dict.fromkeys(t for mask in head_masks for t in masks.cell_terms(mask)):
        if term.aligned_block < block:
            raise ValueError(f"block_index: block {block} straddles the tiles of the mask's BlockSparse(block="
                             f"{term.block}); use a block dividing it")
    return dataclasses.replace(blocks, block_q=block, block_k=block, block_q_bwd=block, block_k_bwd=block)


def _make_plan(q: Array, k: Array, v: Array, mask: Mask, scale: float | None, blocks: FlashBlocks,
               backend: str | None, block_index: masks.BlockIndex | None) -> _Plan:
    """Checks every argument (ValueError naming it) and fixes the static plan of the call."""
    _check_arrays(q, k, v)
    mask = masks.resolve(mask)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None or a number, got {scale!r}")
    if not isinstance(blocks, FlashBlocks):
        raise ValueError(f"blocks must be a FlashBlocks, got {blocks!r}")
    backend = _common.resolve_backend(backend)
    batch, length, heads, dim = q.shape
    head_masks = mask.head_masks(heads)
    mask.check(length)
    if block_index is None:
        fitted, selection_rows = _fitted_blocks(blocks, length, head_masks), 0
    else:
        fitted = _selected_blocks(blocks, block_index, head_masks, (batch, k.shape[2], length))
        selection_rows = heads if len(head_masks) > 1 else k.shape[2]
    padded = _common.padded_length(length, max(fitted.block_q, fitted.block_k, fitted.block_q_bwd,
                                               fitted.block_k_bwd))
    return _Plan(head_masks, length, padded, heads // k.shape[2], float(dim**-0.5 if scale is None else scale),
                 fitted, backend, masks.needs_segments(mask), selection_rows)


def _segment_layouts(plan: _Plan, segment_ids: Array | None) -> tuple[Array, ...]:
    """segment_ids [B, T] -> the kernels' column [B, T', 1] and row [B, 1, T'] int32; () without a Document term."""
    if segment_ids is None:
        return ()
    ids = jnp.pad(segment_ids, [(0, 0), (0, plan.padded - plan.length)])
    return ids[:, :, None], ids[:, None, :]


def flash_attention(q: Array, k: Array, v: Array, *, mask: Mask, scale: float | None = None,
                    blocks: FlashBlocks = FlashBlocks(), backend: str | None = None,
                    segment_ids: Array | None = None, score_mod: masks.ScoreMod | None = None,
                    block_index: masks.BlockIndex | None = None) -> Array:
    """Softmax attention of q over the keys ``mask`` leaves visible, as Pallas kernels (forward and backward).

    q [B, T, H, D]; k [B, T, Hkv, D]; v [B, T, Hkv, V] with Hkv dividing H (query head h reads kv head
    h // (H / Hkv)). mask: any ``seqlab.core.masks`` mask; segment_ids [B, T] int, needed iff it has a Document
    term. scale defaults to D**-0.5; backend None is ``jax.default_backend()``. score_mod is not supported
    (ValueError; use the XLA forms of ``seqlab.ops.softmax_attn``). block_index: a runtime ``masks.BlockIndex``
    (tiles [B, Hkv, ceil(T / block), S]); every kernel tile is then its block (a power of two >= 16, ignoring
    blocks' sizes) and a query tile visits only the key tiles its row selects among those the mask's tile map
    keeps, under the mask's predicate.
    Returns o [B, T, H, V] in v.dtype (0 for a query that sees no key). Differentiable in q, k, v (reverse mode).
    """
    if score_mod is not None:
        raise ValueError("score_mod is not supported by the Pallas flash_attention kernels; use "
                         "seqlab.ops.softmax_attn with impl='chunked' or 'parallel'")
    plan = _make_plan(q, k, v, mask, scale, blocks, backend, block_index)
    segment_ids = masks.check_segment_ids(mask, segment_ids, q.shape[0], plan.length)
    dim, value_dim = _common.padded_feature(q.shape[3]), _common.padded_feature(v.shape[3])
    selection = () if block_index is None else (block_index.tiles,)
    o = _attention(plan, _common.to_kernel_layout(q, plan.padded, dim), _common.to_kernel_layout(k, plan.padded, dim),
                   _common.to_kernel_layout(v, plan.padded, value_dim), _segment_layouts(plan, segment_ids), selection)
    return _common.from_kernel_layout(o, plan.length, v.shape[3])
