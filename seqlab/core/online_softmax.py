"""Softmax attention on the engine: blocks of queries against the key tiles a mask leaves visible.

A ``Partial`` (running max m, normaliser l, unnormalised output acc, all float32) is softmax attention's chunk
summary: partials over disjoint key sets merge associatively (``merge``), which the KV-cache decode step and the
sequence-parallel forms (``seqlab.core.softmax_parallel``: all-gather, ring, halo) use.

Masks are ``seqlab.core.masks`` objects (the mask algebra's contract is stated there): the element predicate runs
on each row's absolute positions (``masks.pairwise``: keys outside [0, T) invisible), with the segment ids
``segment_ids [B, T]`` for a mask with a ``Document`` term; a ``PerHead`` mask visits the union of its heads' tiles,
each head masked by its own predicate.

The blockwise (chunked) form follows a static ``BlockPlan`` built from the mask's visit lists
(``masks.visit_lists``): query block i reads only the key tiles its tile-map row marks, so tiles with no visible
pair are never read. Rows of similar width (number of tiles read) share one ``lax.scan``, at most
``MAX_ROW_CLASSES`` of them. The fast path is a class whose rows all visit one contiguous span of tiles
(``masks.is_span``: causal, sliding windows, non-causal, block-diagonal): each row reads its keys with one dynamic
slice of front-padded keys, a width rounded up to its class's by reading earlier tiles. Any other class (strided,
block-sparse, composed masks) gathers each row's visited tiles, its visit list padded to the class width with a
dummy tile whose keys lie past the sequence (masked), and scatter-adds dK and dV tile by tile. A row is one query
block (its G heads stacked, [G·block, D]) against its keys [width·block, D]: one matmul for the float32 scores,
``score_mod``, the mask (``masks.mask_bias``), an exact softmax, one matmul for the output; a query that sees no
key outputs 0 (its gradients are 0). The backward pass (``jax.custom_vjp``, flash-attention style) keeps only the
output and the log-normaliser and recomputes each row's scores transposed ([keys, queries]) so that dK and dV are
plain matmuls; score_mod's gradient is ``jax.vjp`` of it on the recomputed scores. The T×T scores are never formed:
memory is O(T · block) per row.

``score_mod(scores, q_idx, k_idx, head)`` (``masks.ScoreMod``) rewrites the scaled float32 scores before masking.
The blockwise form calls it once per visited tile (under ``vmap`` over a row's tiles) with scores
[B, H, block, block], q_idx [block, 1], k_idx [1, block] int32 absolute positions (positions past the sequence
clipped to T − 1; their scores are masked; under a runtime ``BlockIndex``, where every batch row and key/value
head reads its own tiles, k_idx is [B, H, 1, block]) and head [H, 1, 1] int32 (query head h reads key/value head
h // G);
``dense_attention`` calls it once with [B, H, T, T], [T, 1], [1, T], [H, 1, 1]. It must be a pure, elementwise
function of its arguments and of what it closes over; arrays it closes over that are being differentiated (a learnt
bias table, per-head temperatures) get their gradients too (``jax.closure_convert`` hoists them into the
custom_vjp).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqlab.core import masks
from seqlab.core.masks import MASKED, ElementMask, Mask, ScoreMod, Segments, mask_bias, masked_fill

Array = jax.Array


class Partial(NamedTuple):
    """Online-softmax accumulator over some set of keys: m, l [..., Tq]; acc [..., Tq, V]."""

    m: Array
    l: Array
    acc: Array


def empty_partial(like: Array, value_dim: int) -> Partial:
    """The partial over no keys, the identity of ``merge``: m, l shaped like ``like`` [..., Tq] (and, inside
    ``shard_map``, varying like it); acc [..., Tq, value_dim]."""
    m = jnp.full_like(like, MASKED, dtype=jnp.float32)
    return Partial(m, jnp.zeros_like(m), jnp.zeros_like(m, shape=(*m.shape, value_dim)))


def partial_from_scores(scores: Array, visible: Array, v: Array) -> Partial:
    """scores [..., Tq, Tk] float32, visible [..., Tq, Tk] bool, v [..., Tk, V] -> Partial."""
    scores = masked_fill(scores, visible)
    m = jnp.max(scores, axis=-1)
    p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
    return Partial(m, jnp.sum(p, axis=-1), p @ v)


def merge(a: Partial, b: Partial) -> Partial:
    """Associative merge of partials over disjoint key sets."""
    m = jnp.maximum(a.m, b.m)
    wa, wb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return Partial(m, a.l * wa + b.l * wb, a.acc * wa[..., None] + b.acc * wb[..., None])


def finalize(p: Partial) -> Array:
    """acc / l, with 0 for queries that saw no key."""
    l = p.l[..., None]
    return jnp.where(l > 0, p.acc / jnp.where(l > 0, l, 1.0), 0.0)


MAX_ROW_CLASSES = 8  # scans per blockwise call: row widths are rounded up into at most this many classes


@dataclasses.dataclass(frozen=True)
class RowClass:
    """Query blocks sharing one scan: row ``rows[r]`` reads the ``width`` key tiles ``tiles[r]``.

    span: every row's tiles are consecutive, read with one slice (tiles before 0 are front padding); otherwise each
    row's visit list padded with the dummy tile (index: the number of key tiles), gathered."""

    width: int
    rows: tuple[int, ...]
    tiles: tuple[tuple[int, ...], ...]
    span: bool

    @property
    def last_keys(self) -> tuple[int, ...]:
        """The last key tile each row of a span class reads."""
        return tuple(row[-1] for row in self.tiles)


def _row_class(width: int, rows: tuple[int, ...], visits: list[tuple[int, ...]], dummy: int) -> RowClass:
    if all(masks.is_span(v) for v in visits):
        return RowClass(width, rows, tuple(tuple(range(v[-1] + 1 - width, v[-1] + 1)) for v in visits), True)
    return RowClass(width, rows, tuple(v + (dummy,) * (width - len(v)) for v in visits), False)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static plan of a blockwise attention call: which key tiles each query block reads.

    Query block i visits ``masks.visit_lists(mask, ...)[i]`` (a block that sees nothing reads tile 0, all masked);
    rows are grouped into at most ``MAX_ROW_CLASSES`` classes of equal width (a width is rounded up to its
    class's), each one ``lax.scan``. Keys are padded in front by ``front_pad`` tiles so that every span row's window
    starts in range. ``heads`` = H = Hkv · group (a PerHead mask has one mask per query head).
    """

    length: int
    block: int
    mask: Mask
    group: int  # query heads per key/value head, stacked in a query block's rows
    heads: int = 1
    selected: int = 0  # S > 0: each row gathers the S key tiles of a runtime BlockIndex instead of its visit list

    @property
    def count(self) -> int:
        return -(-self.length // self.block)

    @functools.cached_property
    def head_masks(self) -> tuple[ElementMask, ...]:
        return self.mask.head_masks(self.heads)

    @functools.cached_property
    def classes(self) -> tuple[RowClass, ...]:
        if self.selected:  # one gather class; its tiles are the BlockIndex's, read at run time
            return (RowClass(self.selected, tuple(range(self.count)), (), False),)
        visits = [v or (0,) for v in masks.visit_lists(self.mask, self.length, self.block, self.block)]
        widths = sorted({len(v) for v in visits})
        groups = np.array_split(np.array(widths), min(len(widths), MAX_ROW_CLASSES))
        class_width = {int(w): int(group[-1]) for group in groups for w in group}
        classes = []
        for width in sorted(set(class_width.values())):
            rows = tuple(i for i, v in enumerate(visits) if class_width[len(v)] == width)
            classes.append(_row_class(width, rows, [visits[i] for i in rows], self.count))
        return tuple(classes)

    @functools.cached_property
    def front_pad(self) -> int:
        return max([0] + [-row[0] for c in self.classes if c.span for row in c.tiles])

    @functools.cached_property
    def inverse(self) -> np.ndarray:
        """For each query block, its position in the class-by-class order of rows."""
        return np.argsort(np.concatenate([c.rows for c in self.classes]))


def _plan(mask: Mask, q: Array, block: int, block_index: masks.BlockIndex | None = None) -> BlockPlan:
    """The plan for q [B, Hkv, G, T, D] (over a runtime BlockIndex's tiles, if given); ValueError if the mask
    or the index does not fit T or the heads."""
    batch, kv_heads, group, length, _ = q.shape
    mask.check(length)
    mask.head_masks(kv_heads * group)
    if block_index is None:
        return BlockPlan(length, min(block, length), mask, group, kv_heads * group)
    block_index.check(batch, kv_heads, length)
    return BlockPlan(length, block_index.block, mask, group, kv_heads * group, block_index.width)


def blockwise_attention(
    q: Array, k: Array, v: Array, *, mask: Mask | None = None, block_size: int, causal: bool = True,
    window: int | None = None, score_mod: ScoreMod | None = None, segment_ids: Array | None = None,
    block_index: masks.BlockIndex | None = None,
) -> Array:
    """Chunked softmax attention over the key tiles each query block visits, with a flash-attention backward.

    q: [B, Hkv, G, T, D] (G query heads per key/value head, already scaled); k: [B, Hkv, T, D]; v: [B, Hkv, T, V];
    mask: any ``seqlab.core.masks`` mask (None: ``Causal(window)`` if causal, else ``Bidirectional(window)``);
    score_mod: see the module docstring; segment_ids: [B, T] int, needed iff the mask has a Document term;
    block_index: a runtime ``masks.BlockIndex``: query block i (of block_index.block tokens, which replaces
    block_size) reads its S selected key tiles, gathered per batch row and key/value head, under the mask.
    Returns o [B, Hkv, G, T, V] float32 (0 for a query that sees no key).
    """
    mask = masks.resolve(mask, causal, window)
    plan = _plan(mask, q, block_size, block_index)
    segments = masks.check_segment_ids(mask, segment_ids, q.shape[0], plan.length)
    mod, consts = _tile_mod(plan, score_mod, q.shape[0])
    return _blockwise(plan, mod, q, k, v, segments, consts, None if block_index is None else block_index.tiles)


def _tile_mod(plan: BlockPlan, score_mod: ScoreMod | None, batch: int) -> tuple[Callable | None, tuple]:
    """score_mod closure-converted at the tile shape: mod(scores, q_idx, k_idx, head, *consts), and the consts
    (the differentiable arrays it closes over)."""
    if score_mod is None:
        return None, ()
    tile = jnp.zeros((batch, plan.heads, plan.block, plan.block), jnp.float32)
    q_idx = jnp.zeros((plan.block, 1), jnp.int32)
    k_idx = jnp.zeros((batch, plan.heads, 1, plan.block) if plan.selected else (1, plan.block), jnp.int32)
    mod, consts = jax.closure_convert(score_mod, tile, q_idx, k_idx, jnp.zeros((plan.heads, 1, 1), jnp.int32))
    return mod, tuple(consts)


def _modified(plan: BlockPlan, mod: Callable, consts: tuple, scores: Array, q_pos: Array, k_pos: Array) -> Array:
    """mod applied to a row's scores [B, Hkv, G*block, w*block], one [B, H, block, block] tile at a time; q_pos
    [block], k_pos [w*block] absolute positions, or [B, Hkv, w*block] for a BlockIndex row (k_idx is then
    [B, H, 1, block] per tile: query head h = i·G + g reads key/value head i's tiles)."""
    batch, cols = scores.shape[0], scores.shape[-1]
    tiles = scores.reshape(batch, plan.heads, plan.block, cols // plan.block, plan.block)
    q_idx = jnp.clip(q_pos, 0, plan.length - 1)[:, None]
    k_idx = jnp.clip(k_pos, 0, plan.length - 1)
    if k_idx.ndim == 1:
        k_idx, k_axis = k_idx.reshape(-1, 1, plan.block), 0
    else:  # [B, Hkv, w*block] -> [B, H, w, 1, block]
        k_idx = jnp.repeat(k_idx.reshape(batch, -1, cols // plan.block, 1, plan.block), plan.group, axis=1)
        k_axis = 2
    head = jnp.arange(plan.heads, dtype=jnp.int32)[:, None, None]
    per_tile = jax.vmap(lambda s, k_tile: mod(s, q_idx, k_tile, head, *consts), in_axes=(3, k_axis), out_axes=3)
    return per_tile(tiles, k_idx).reshape(scores.shape)


def _row_visible(plan: BlockPlan, q_pos: Array, k_pos: Array, segments: Segments | None) -> Array:
    """Bool broadcasting to [B, Hkv, G*block, Tk]: each head's mask on query positions q_pos [block] and key
    positions k_pos [Tk] (keys outside [0, T) invisible); segments ([B, block], [B, Tk]) for Document terms."""
    visible = masks.head_pairwise(plan.mask, plan.heads // plan.group, plan.group, q_pos, k_pos,
                                  length=plan.length, segments=segments)  # [(B,) Hkv | 1, G | 1, block, Tk]
    visible = jnp.broadcast_to(visible, (*visible.shape[:-4], visible.shape[-4], plan.group, *visible.shape[-2:]))
    return visible.reshape(*visible.shape[:-3], plan.group * visible.shape[-2], visible.shape[-1])


def split_blocks(x: Array, axis: int, block: int) -> Array:
    """Split ``axis`` (zero-padded to a multiple of ``block``) into blocks, the block index first:
    [..., T, ...] -> [n, ..., block, ...]."""
    n = -(-x.shape[axis] // block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * block - x.shape[axis])
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:]), axis, 0)


def join_blocks(x: Array, length: int) -> Array:
    """[n, B, Hkv, G, block, ...] -> [B, Hkv, G, length, ...]: the inverse of ``split_blocks`` on axis 3."""
    x = jnp.moveaxis(x, 0, 3)
    return x.reshape(*x.shape[:3], -1, *x.shape[5:])[:, :, :, :length]


def _query_blocks(x: Array, block: int) -> Array:
    """[B, Hkv, G, T, D] -> [n, B, Hkv, G*block, D] (a block's G heads stacked), zero-padded to n*block tokens."""
    blocks = split_blocks(x, 3, block)  # [n, B, Hkv, G, block, D]
    return blocks.reshape(*blocks.shape[:3], -1, blocks.shape[-1])


def _from_query_blocks(x: Array, group: int, length: int) -> Array:
    """[n, B, Hkv, G*block, V] -> [B, Hkv, G, T, V]."""
    return join_blocks(x.reshape(*x.shape[:3], group, -1, x.shape[-1]), length)


# Key-side layouts, by read kind: span classes slice [B, Hkv, (front_pad + n) * block, F] (front-padded keys);
# gather classes index tiles [n + 1, B, Hkv, block, F] (the last one the dummy tile).


def _layout(plan: BlockPlan, x: Array, span: bool) -> Array:
    """[B, Hkv, T, F] -> the layout classes of that kind read."""
    if span:
        front = plan.front_pad * plan.block
        return jnp.pad(x, [(0, 0), (0, 0), (front, plan.count * plan.block - plan.length), (0, 0)])
    return jnp.pad(split_blocks(x, 2, plan.block), [(0, 1)] + [(0, 0)] * 4)


def _untile(x: Array) -> Array:
    """[w, B, Hkv, block, F] -> [B, Hkv, w*block, F]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, x.shape[-1])


def _from_layout(plan: BlockPlan, x: Array, span: bool) -> Array:
    """The inverse of ``_layout``: [B, Hkv, T, F]."""
    if span:
        front = plan.front_pad * plan.block
        return x[:, :, front : front + plan.length]
    return _untile(x[: plan.count])[:, :, : plan.length]


def _tile_index(x: Array, tiles: Array) -> tuple:
    """The index of a gather layout x [n + 1, B, Hkv | 1, block, F] at tiles [w] (shared by the batch and heads)
    or [B, Hkv, w] (a BlockIndex row): it selects [w, B, Hkv, block, F]."""
    if tiles.ndim == 1:
        return (tiles,)
    batch, heads = jnp.arange(tiles.shape[0])[:, None], jnp.arange(tiles.shape[1])[None, :]
    heads = heads if x.shape[2] > 1 else jnp.zeros_like(heads)  # segment ids: one row for every head
    return (jnp.moveaxis(tiles, -1, 0), batch, heads)


def _read(plan: BlockPlan, x: Array, tiles: Array, span: bool) -> Array:
    """A row's keys (values, segment ids) [B, Hkv, w*block, F] at tiles [w] (or [B, Hkv, w]) out of a layout of
    its kind."""
    if span:
        start = (tiles[0] + plan.front_pad) * plan.block
        return jax.lax.dynamic_slice_in_dim(x, start, tiles.shape[0] * plan.block, axis=2)
    return _untile(x[_tile_index(x, tiles)])


def _add(plan: BlockPlan, acc: Array, grad: Array, tiles: Array, span: bool) -> Array:
    """acc (a layout of its kind) plus a row's gradient [B, Hkv, w*block, F] at tiles [w] (or [B, Hkv, w])."""
    if span:
        start = (tiles[0] + plan.front_pad) * plan.block
        return jax.lax.dynamic_update_slice_in_dim(acc, _read(plan, acc, tiles, span) + grad, start, axis=2)
    grad = grad.reshape(*grad.shape[:2], tiles.shape[-1], plan.block, grad.shape[-1])
    return acc.at[_tile_index(acc, tiles)].add(jnp.moveaxis(grad, 2, 0))


class _Operands(NamedTuple):
    """A call's inputs as its rows read them: q [n, B, Hkv, G*block, D]; k, v and the key segment ids
    ([B, 1, T, 1]) in the layout of each read kind (dict by span); q_segments [n, B, block] (no Document term:
    both None); consts, the arrays score_mod closes over; selected, a BlockIndex's tiles [B, Hkv, n, S] or None."""

    q: Array
    k: dict[bool, Array]
    v: dict[bool, Array]
    k_segments: dict[bool, Array] | None
    q_segments: Array | None
    consts: tuple
    selected: Array | None


def _operands(plan: BlockPlan, q: Array, k: Array, v: Array, segments: Array | None, consts: tuple,
              selected: Array | None) -> _Operands:
    kinds = {c.span for c in plan.classes}

    def layouts(x: Array) -> dict[bool, Array]:
        return {span: _layout(plan, x, span) for span in kinds}

    k_segments = q_segments = None
    if segments is not None:
        k_segments, q_segments = layouts(segments[:, None, :, None]), split_blocks(segments, 1, plan.block)
    return _Operands(_query_blocks(q, plan.block), layouts(k), layouts(v), k_segments, q_segments, consts, selected)


class _Row(NamedTuple):
    """One row's query positions [block], key positions [w*block] and mask (bool, broadcasting to
    [B, Hkv, G*block, w*block])."""

    q_pos: Array
    k_pos: Array
    visible: Array


def _row(plan: BlockPlan, ops: _Operands, span: bool, query_block: Array, tiles: Array) -> _Row:
    q_pos = query_block * plan.block + jnp.arange(plan.block)
    k_pos = (tiles[..., None] * plan.block + jnp.arange(plan.block)).reshape(*tiles.shape[:-1], -1)
    segments = None
    if ops.q_segments is not None:
        q_segments, k_segments = ops.q_segments[query_block], _read(plan, ops.k_segments[span], tiles, span)
        segments = (q_segments, k_segments[:, 0, :, 0]) if tiles.ndim == 1 else (q_segments[:, None],
                                                                                  k_segments[..., 0])
    return _Row(q_pos, k_pos, _row_visible(plan, q_pos, k_pos, segments))


def _row_inputs(plan: BlockPlan, ops: _Operands, row_class: RowClass) -> tuple[Array, Array]:
    """The scan's xs over a class: query block [R] and key tiles [R, width] of each row ([n, B, Hkv, S] from a
    BlockIndex)."""
    if plan.selected:
        return jnp.arange(plan.count), jnp.moveaxis(ops.selected, 2, 0)
    return jnp.asarray(row_class.rows), jnp.asarray(row_class.tiles, jnp.int32)


def _in_block_order(plan: BlockPlan, per_class: list[Array]) -> Array:
    """Per-class scan outputs [rows_c, ...] -> per query block [n, ...]."""
    return jnp.concatenate(per_class)[jnp.asarray(plan.inverse)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(plan: BlockPlan, mod: Callable | None, q: Array, k: Array, v: Array, segments: Array | None,
               consts: tuple, selected: Array | None) -> Array:
    return _blockwise_forward(plan, mod, q, k, v, segments, consts, selected)[0]


def _forward_row(plan: BlockPlan, mod: Callable | None, ops: _Operands, span: bool, query_block: Array,
                 tiles: Array) -> tuple[Array, Array]:
    """One row: o [B, Hkv, G*block, V] and the log-normaliser [B, Hkv, G*block] (-MASKED for a query that sees
    no key, so that its recomputed probabilities are 0)."""
    row = _row(plan, ops, span, query_block, tiles)
    scores = jnp.einsum("bhqd,bhkd->bhqk", ops.q[query_block], _read(plan, ops.k[span], tiles, span))
    if mod is not None:
        scores = _modified(plan, mod, ops.consts, scores, row.q_pos, row.k_pos)
    scores = scores + mask_bias(row.visible)
    m = jnp.max(scores, axis=-1)  # [B, Hkv, G*block]
    seen = m > MASKED / 2  # a query that sees no key has only MASKED scores: its p, l and o are then 0
    m = jnp.where(seen, m, -MASKED)
    p = jnp.exp(scores - m[..., None])
    l = jnp.sum(p, axis=-1)  # >= 1 where seen: the row's maximum contributes exp(0)
    o = jnp.einsum("bhqk,bhkv->bhqv", p, _read(plan, ops.v[span], tiles, span)) / jnp.where(seen, l, 1.0)[..., None]
    return o, jnp.where(seen, m + jnp.log(l), -MASKED)


def _blockwise_forward(plan: BlockPlan, mod: Callable | None, q: Array, k: Array, v: Array,
                       segments: Array | None, consts: tuple, selected: Array | None) -> tuple[Array, tuple]:
    ops = _operands(plan, q, k, v, segments, consts, selected)
    outputs, normalisers = [], []
    for row_class in plan.classes:

        def step(_, xs, span=row_class.span):
            return None, _forward_row(plan, mod, ops, span, *xs)

        _, (o, lse) = jax.lax.scan(step, None, _row_inputs(plan, ops, row_class))
        outputs.append(o)
        normalisers.append(lse)
    ob, lse = _in_block_order(plan, outputs), _in_block_order(plan, normalisers)  # [n, B, Hkv, G*block, (V)]
    return _from_query_blocks(ob, plan.group, plan.length), (q, k, v, segments, consts, selected, ob, lse)


class _Cotangents(NamedTuple):
    """dO [n, B, Hkv, G*block, V] in query blocks, δ = rowsum(dO ∘ O) and the log-normaliser [n, B, Hkv, G*block]."""

    do: Array
    delta: Array
    lse: Array


def _swap(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def _backward_row(plan: BlockPlan, mod: Callable | None, ops: _Operands, cot: _Cotangents, span: bool,
                  carry: tuple, query_block: Array, tiles: Array) -> tuple[tuple, Array]:
    """One row, scores transposed (Sᵀ = K Qᵀ, [keys, queries]): Pᵀ = exp(Sᵀ − lse); dV += Pᵀ dO;
    dSᵀ = Pᵀ ∘ (V dOᵀ − δ) (through score_mod's vjp); dK += dSᵀ Q; dQ = (dSᵀ)ᵀ K. carry: dK, dV (dicts by
    read kind) and the gradients of score_mod's consts. Returns (carry, dQ [B, Hkv, G*block, D])."""
    dk, dv, dconsts = carry
    row = _row(plan, ops, span, query_block, tiles)
    keys, values = _read(plan, ops.k[span], tiles, span), _read(plan, ops.v[span], tiles, span)
    q_i, do_i = ops.q[query_block], cot.do[query_block]
    scores_t = jnp.einsum("bhkd,bhqd->bhkq", keys, q_i)
    if mod is not None:
        def modified_t(s_t, consts):
            return _swap(_modified(plan, mod, consts, _swap(s_t), row.q_pos, row.k_pos))

        scores_t, mod_vjp = jax.vjp(modified_t, scores_t, ops.consts)
    p_t = jnp.exp(scores_t + mask_bias(_swap(row.visible)) - cot.lse[query_block][..., None, :])
    ds_t = p_t * (jnp.einsum("bhkv,bhqv->bhkq", values, do_i) - cot.delta[query_block][..., None, :])
    if mod is not None:
        ds_t, row_dconsts = mod_vjp(ds_t)
        dconsts = jax.tree.map(jnp.add, dconsts, row_dconsts)
    dk = {**dk, span: _add(plan, dk[span], jnp.einsum("bhkq,bhqd->bhkd", ds_t, q_i), tiles, span)}
    dv = {**dv, span: _add(plan, dv[span], jnp.einsum("bhkq,bhqv->bhkv", p_t, do_i), tiles, span)}
    return (dk, dv, dconsts), jnp.einsum("bhkq,bhkd->bhqd", ds_t, keys)


def _blockwise_backward(plan: BlockPlan, mod: Callable | None, residuals: tuple, do: Array) -> tuple:
    """Flash-attention backward, row by row (``_backward_row``); dK and dV accumulate in the scan carry, in the
    layout of each read kind."""
    q, k, v, segments, consts, selected, ob, lse = residuals
    ops = _operands(plan, q, k, v, segments, consts, selected)
    dob = _query_blocks(do, plan.block)
    cot = _Cotangents(dob, jnp.sum(dob * ob, axis=-1), lse)
    carry = (jax.tree.map(jnp.zeros_like, ops.k), jax.tree.map(jnp.zeros_like, ops.v),
             jax.tree.map(jnp.zeros_like, consts))
    dq_rows = []
    for row_class in plan.classes:

        def step(carry, xs, span=row_class.span):
            return _backward_row(plan, mod, ops, cot, span, carry, *xs)

        carry, dq = jax.lax.scan(step, carry, _row_inputs(plan, ops, row_class))
        dq_rows.append(dq)
    dq = _from_query_blocks(_in_block_order(plan, dq_rows), plan.group, plan.length)
    dk, dv = (functools.reduce(jnp.add, [_from_layout(plan, x, span) for span, x in acc.items()])
              for acc in carry[:2])
    return dq, dk, dv, None, carry[2], None


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def dense_attention(
    q: Array, k: Array, v: Array, *, mask: Mask | None = None, causal: bool = True, window: int | None = None,
    score_mod: ScoreMod | None = None, segment_ids: Array | None = None, block_index: masks.BlockIndex | None = None,
) -> Array:
    """Parallel form: the full masked score matrix (differentiated by JAX). Arguments and shapes as
    ``blockwise_attention``; score_mod gets the whole [B, H, T, T] scores."""
    mask = masks.resolve(mask, causal, window)
    batch, kv_heads, group, length, _ = q.shape
    plan = _plan(mask, q, length)
    if block_index is not None:
        block_index.check(batch, kv_heads, length)
    segments = masks.check_segment_ids(mask, segment_ids, batch, length)
    pos = jnp.arange(length, dtype=jnp.int32)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.reshape(batch, kv_heads, group * length, -1), k)
    if score_mod is not None:
        scores = _modified(plan, score_mod, (), scores, pos, pos)
    visible = _row_visible(plan, pos, pos, None if segments is None else (segments, segments))
    if block_index is not None:  # [B, Hkv, T, T], the same for a key/value head's G query heads
        selected = jnp.broadcast_to(block_index.visible(pos, pos)[:, :, None], (batch, kv_heads, group, length, length))
        visible = visible & selected.reshape(batch, kv_heads, group * length, length)
    o = finalize(partial_from_scores(scores, visible, v))
    return o.reshape(batch, kv_heads, group, length, -1)


def modified_scores(score_mod: ScoreMod | None, scores: Array, q_pos: Array, k_pos: Array,
                    length: int | None) -> Array:
    """score_mod on grouped scores [B, Hkv, G, Tq, Tk] (head h = i·G + g) at absolute positions q_pos [Tq] and
    k_pos [Tk] (clipped into [0, length), or at 0 from below for None); the scores as they are for no score_mod."""
    if score_mod is None:
        return scores
    b, kv_heads, group, tq, tk = scores.shape
    top = None if length is None else length - 1
    q_idx = jnp.clip(q_pos, 0, top).astype(jnp.int32)[:, None]
    k_idx = jnp.clip(k_pos, 0, top).astype(jnp.int32)[None]
    head = jnp.arange(kv_heads * group, dtype=jnp.int32)[:, None, None]
    out = score_mod(scores.reshape(b, kv_heads * group, tq, tk), q_idx, k_idx, head)
    return out.reshape(scores.shape)


def cache_attention(q: Array, k_cache: Array, v_cache: Array, key_positions: Array, query_position: Array,
                    *, mask: Mask, segments: Segments | None = None, score_mod: ScoreMod | None = None,
                    length: int | None = None, block_index: masks.BlockIndex | None = None,
                    first_row: Array | int = 0) -> Array:
    """One query step against a KV cache (the decode path): the keys ``mask`` shows the query (any mask, per
    head with ``PerHead``; a decode cache holds only keys at or before the query).

    q: [B, Hkv, G, D] (scaled); k_cache: [B, Hkv, L, D]; v_cache: [B, Hkv, L, V]; key_positions: [L] (-1 = empty);
    segments: (the query's document id [B, 1], the keys' [B, L]) for a mask with a Document term, or None.
    score_mod: as in ``blockwise_attention``, at the query's and the slots' positions (empty slots, at -1, are
    clipped to 0 and masked; with ``length``, positions are clipped below it). block_index: a runtime
    ``masks.BlockIndex`` whose rows are query tiles first_row, ... (the query's row is read). Returns
    [B, Hkv, G, V] float32.
    """
    scores = jnp.einsum("bhgd,bhld->bhgl", q, k_cache)
    query = jnp.reshape(query_position, (1,))
    scores = modified_scores(score_mod, scores[..., None, :], query, key_positions, length)[..., 0, :]
    visible = masks.head_pairwise(mask, q.shape[1], q.shape[2], query, key_positions, segments=segments)
    if block_index is not None:
        visible = visible & block_index.visible(query, key_positions, first_row)[:, :, None]
    return finalize(partial_from_scores(scores, visible[..., 0, :], v_cache))  # visible: [(B,) Hkv|1, G|1, L]


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis of scores [..., L] float32 among the visible entries (bool, broadcasting to
    scores); 0 at invisible entries and on rows that see nothing. Max-subtracted: only non-positive differences are
    exponentiated."""
    visible = jnp.broadcast_to(visible, scores.shape)
    top = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    exps = jnp.where(visible, jnp.exp(jnp.where(visible, scores - top, 0.0)), 0.0)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    return exps / jnp.where(total > 0, total, 1.0)
