"""Softmax attention on the engine: blocks of queries against the key blocks they can see.

A ``Partial`` (running max m, normaliser l, unnormalised output acc, all float32) is softmax attention's chunk
summary: partials over disjoint key sets merge associatively (``merge``), which the KV-cache decode step and the
sequence-parallel forms (``seqlab.parallel.attention``: all-gather, ring, halo) use.

The blockwise (chunked) form follows a static ``BlockPlan``: query block i reads only the contiguous key blocks a
mask (causal, sliding window, non-causal) leaves visible to it, so fully masked blocks are never visited. Rows of
similar width share one ``lax.scan`` (at most ``MAX_ROW_CLASSES`` of them). Each row is one query block against its
key window: a single matmul for the scores, an exact softmax, a single matmul for the output; the backward pass
(``jax.custom_vjp``, flash-attention style) keeps only the output and the log-normaliser and recomputes scores row
by row. The T×T scores are never formed: memory is O(T · block) per row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_MASKED = -1e30  # finite "minus infinity": exp(_MASKED - m) is 0 and never produces inf - inf


class Partial(NamedTuple):
    """Online-softmax accumulator over some set of keys: m, l [..., Tq]; acc [..., Tq, V]."""

    m: Array
    l: Array
    acc: Array


def empty_partial(like: Array, value_dim: int) -> Partial:
    """The partial over no keys, the identity of ``merge``: m, l shaped like ``like`` [..., Tq] (and, inside
    ``shard_map``, varying like it); acc [..., Tq, value_dim]."""
    m = jnp.full_like(like, _MASKED, dtype=jnp.float32)
    return Partial(m, jnp.zeros_like(m), jnp.zeros_like(m, shape=(*m.shape, value_dim)))


def partial_from_scores(scores: Array, visible: Array, v: Array) -> Partial:
    """scores [..., Tq, Tk] float32, visible [..., Tq, Tk] bool, v [..., Tk, V] -> Partial."""
    scores = jnp.where(visible, scores, _MASKED)
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


def visibility(q_pos: Array, k_pos: Array, length: int, causal: bool, window: int | None) -> Array:
    """[..., Tq, Tk] bool: key position k_pos visible to query position q_pos (positions are absolute)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    ok = jnp.broadcast_to((k_pos[..., None, :] >= 0) & (k_pos[..., None, :] < length), diff.shape)
    if causal:
        ok &= diff >= 0
    if window is not None:
        ok &= (diff < window) if causal else (jnp.abs(diff) < window)
    return ok


def key_span(block: int, num_blocks: int, block_size: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Inclusive range of key blocks that query block ``block`` can see."""
    first_q, last_q = block * block_size, (block + 1) * block_size - 1
    lo = 0 if window is None else max(0, (first_q - window + 1) // block_size)
    if causal:
        hi = block
    elif window is None:
        hi = num_blocks - 1
    else:
        hi = min(num_blocks - 1, (last_q + window - 1) // block_size)
    return lo, hi


MAX_ROW_CLASSES = 8  # scans per blockwise call: row widths are rounded up into at most this many classes


@dataclasses.dataclass(frozen=True)
class RowClass:
    """Query blocks whose visible key blocks all fit in ``width`` key blocks ending at the row's last one."""

    width: int
    rows: tuple[int, ...]  # query block of each row
    last_keys: tuple[int, ...]  # last key block each row sees


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """Static plan of a blockwise attention call: which key blocks each query block reads.

    Query block i sees the contiguous key blocks ``key_span(i)``; rows are grouped into at most
    ``MAX_ROW_CLASSES`` classes of equal width (a width is rounded up to its class's), and each class is one
    ``lax.scan``. Keys are padded in front by ``front_pad`` blocks so that every row's window starts in range.
    """

    length: int
    block: int
    causal: bool
    window: int | None
    group: int  # query heads per key/value head, stacked in a query block's rows

    @property
    def count(self) -> int:
        return -(-self.length // self.block)

    @functools.cached_property
    def classes(self) -> tuple[RowClass, ...]:
        spans = [key_span(i, self.count, self.block, self.causal, self.window) for i in range(self.count)]
        widths = sorted({hi - lo + 1 for lo, hi in spans})
        groups = np.array_split(np.array(widths), min(len(widths), MAX_ROW_CLASSES))
        class_width = {int(w): int(group[-1]) for group in groups for w in group}
        classes = []
        for width in sorted(set(class_width.values())):
            rows = tuple(i for i, (lo, hi) in enumerate(spans) if class_width[hi - lo + 1] == width)
            classes.append(RowClass(width, rows, tuple(spans[i][1] for i in rows)))
        return tuple(classes)

    @functools.cached_property
    def front_pad(self) -> int:
        return max(max(0, c.width - 1 - last) for c in self.classes for last in c.last_keys)

    @functools.cached_property
    def inverse(self) -> np.ndarray:
        """For each query block, its position in the class-by-class order of rows."""
        return np.argsort(np.concatenate([c.rows for c in self.classes]))


def blockwise_attention(
    q: Array, k: Array, v: Array, *, causal: bool, window: int | None, block_size: int
) -> Array:
    """Chunked softmax attention over the key blocks each query block can see, with a flash-attention backward.

    q: [B, Hkv, G, T, D] (G query heads per key/value head, already scaled); k: [B, Hkv, T, D]; v: [B, Hkv, T, V].
    Returns o [B, Hkv, G, T, V] float32.

    A row is one query block (its G heads stacked, [G*block, D]) against its key window ([width*block, D]): one
    matmul for the scores, an exact softmax over the row, one matmul for the output. Only o and the
    log-normaliser are kept for the backward pass, which recomputes each row's scores transposed ([keys,
    queries]) so that dK and dV are plain matmuls.
    """
    plan = BlockPlan(q.shape[3], min(block_size, q.shape[3]), causal, window, q.shape[2])
    return _blockwise(plan, q, k, v)


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


def _padded_keys(x: Array, plan: BlockPlan) -> Array:
    """[B, Hkv, T, D] -> [B, Hkv, (front_pad + n) * block, D]."""
    front = plan.front_pad * plan.block
    return jnp.pad(x, [(0, 0), (0, 0), (front, plan.count * plan.block - plan.length), (0, 0)])


class _Window(NamedTuple):
    """Where one row reads its keys: ``start`` in the padded keys; ``visible`` [G*block, width*block] bool."""

    start: Array
    visible: Array


def _window(plan: BlockPlan, width: int, query_block: Array, last_key: Array) -> _Window:
    first_key = last_key + 1 - width
    q_pos = query_block * plan.block + jnp.arange(plan.block)
    k_pos = first_key * plan.block + jnp.arange(width * plan.block)
    visible = visibility(q_pos, k_pos, plan.length, plan.causal, plan.window)
    return _Window((first_key + plan.front_pad) * plan.block, jnp.tile(visible, (plan.group, 1)))


def _read(x: Array, window: _Window, width: int, block: int) -> Array:
    """The row's keys or values [B, Hkv, width*block, D] out of the padded [B, Hkv, (P+n)*block, D]."""
    return jax.lax.dynamic_slice_in_dim(x, window.start, width * block, axis=2)


def _scan_rows(row_class: RowClass, step: Callable, carry: Any) -> tuple[Any, Any]:
    """``lax.scan`` of step((carry), (query block, last key block)) over a class's rows."""
    return jax.lax.scan(step, carry, (jnp.asarray(row_class.rows), jnp.asarray(row_class.last_keys)))


def _in_block_order(plan: BlockPlan, per_class: list[Array]) -> Array:
    """Per-class scan outputs [rows_c, ...] -> per query block [n, ...]."""
    return jnp.concatenate(per_class)[jnp.asarray(plan.inverse)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(plan: BlockPlan, q: Array, k: Array, v: Array) -> Array:
    return _blockwise_forward(plan, q, k, v)[0]


def _blockwise_forward(plan: BlockPlan, q: Array, k: Array, v: Array) -> tuple[Array, tuple]:
    block = plan.block
    qb, kp, vp = _query_blocks(q, block), _padded_keys(k, plan), _padded_keys(v, plan)
    outputs, normalisers = [], []
    for row_class in plan.classes:

        def step(_, xs, width=row_class.width):
            query_block, last_key = xs
            window = _window(plan, width, query_block, last_key)
            scores = jnp.einsum("bhqd,bhkd->bhqk", qb[query_block], _read(kp, window, width, block))
            scores = scores + jnp.where(window.visible, 0.0, _MASKED)
            m = jnp.max(scores, axis=-1)  # [B, Hkv, G*block]
            p = jnp.exp(scores - m[..., None])
            l = jnp.sum(p, axis=-1)  # >= 1: the row's maximum contributes exp(0)
            o = jnp.einsum("bhqk,bhkv->bhqv", p, _read(vp, window, width, block)) / l[..., None]
            return None, (o, m + jnp.log(l))

        _, (o, lse) = _scan_rows(row_class, step, None)
        outputs.append(o)
        normalisers.append(lse)
    ob, lse = _in_block_order(plan, outputs), _in_block_order(plan, normalisers)  # [n, B, Hkv, G*block, (V)]
    return _from_query_blocks(ob, plan.group, plan.length), (qb, kp, vp, ob, lse)


def _blockwise_backward(plan: BlockPlan, residuals: tuple, do: Array) -> tuple[Array, Array, Array]:
    """Flash-attention backward, per row with the scores transposed (Sᵀ = K Qᵀ, [keys, queries]):
    Pᵀ = exp(Sᵀ − lse); dV += Pᵀ dO; dSᵀ = Pᵀ ∘ (V dOᵀ − rowsum(dO ∘ O)); dK += dSᵀ Q; dQ = (dSᵀ)ᵀ K.
    dK and dV of the padded key range accumulate in the scan carry."""
    qb, kp, vp, ob, lse = residuals  # queries in blocks, padded keys and values, output in blocks, log-normaliser
    block = plan.block
    dob = _query_blocks(do, block)
    delta = jnp.sum(dob * ob, axis=-1)  # [n, B, Hkv, G*block]
    carry, dq_rows = (jnp.zeros_like(kp), jnp.zeros_like(vp)), []
    for row_class in plan.classes:

        def step(carry, xs, width=row_class.width):
            query_block, last_key = xs
            window = _window(plan, width, query_block, last_key)
            keys, values = _read(kp, window, width, block), _read(vp, window, width, block)
            q_i, do_i = qb[query_block], dob[query_block]
            scores_t = jnp.einsum("bhkd,bhqd->bhkq", keys, q_i) + jnp.where(window.visible.T, 0.0, _MASKED)
            p_t = jnp.exp(scores_t - lse[query_block][..., None, :])  # [B, Hkv, width*block, G*block]
            ds_t = p_t * (jnp.einsum("bhkv,bhqv->bhkq", values, do_i) - delta[query_block][..., None, :])
            dq = jnp.einsum("bhkq,bhkd->bhqd", ds_t, keys)
            carry = tuple(
                jax.lax.dynamic_update_slice_in_dim(acc, _read(acc, window, width, block) + grad, window.start, axis=2)
                for acc, grad in zip(carry, (jnp.einsum("bhkq,bhqd->bhkd", ds_t, q_i),
                                             jnp.einsum("bhkq,bhqv->bhkv", p_t, do_i)))
            )
            return carry, dq

        carry, dq = _scan_rows(row_class, step, carry)
        dq_rows.append(dq)
    dq = _from_query_blocks(_in_block_order(plan, dq_rows), plan.group, plan.length)
    front = plan.front_pad * block
    dk, dv = (x[:, :, front : front + plan.length] for x in carry)
    return dq, dk, dv


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def dense_attention(q: Array, k: Array, v: Array, *, causal: bool, window: int | None) -> Array:
    """Parallel form: the full masked score matrix. Shapes as ``blockwise_attention``."""
    batch, kv_heads, group, length, _ = q.shape
    pos = jnp.arange(length)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q.reshape(batch, kv_heads, group * length, -1), k)
    visible = jnp.tile(visibility(pos, pos, length, causal, window), (group, 1))
    o = finalize(partial_from_scores(scores, visible, v))
    return o.reshape(batch, kv_heads, group, length, -1)


def cache_attention(q: Array, k_cache: Array, v_cache: Array, key_positions: Array, query_position: Array,
                    *, window: int | None) -> Array:
    """One query step against a KV cache (the decode path).

    q: [B, Hkv, G, D] (scaled); k_cache: [B, Hkv, L, D]; v_cache: [B, Hkv, L, V]; key_positions: [L] (-1 = empty).
    Returns [B, Hkv, G, V] float32.
    """
    scores = jnp.einsum("bhgd,bhld->bhgl", q, k_cache)
    diff = query_position - key_positions
    visible = (key_positions >= 0) & (diff >= 0)
    if window is not None:
        visible &= diff < window
    return finalize(partial_from_scores(scores, visible, v_cache))
