"""Softmax attention on the engine: a loop over key/value blocks with an online-softmax carry.

A ``Partial`` (running max m, normaliser l, unnormalised output acc, all float32) is softmax attention's chunk
summary: partials over disjoint key sets merge associatively (``merge``), which the blockwise form, the KV-cache
decode step and the sequence-parallel forms (``seqlab.parallel.attention``: all-gather, ring, halo) all use.

The blockwise (chunked) form walks a static ``BlockSchedule``: rows of (query block, key block) pairs in which every
pair can hold a visible key. Fully masked blocks are never visited, and rows have equal length, so one ``lax.scan``
over rows covers any mask. Causal attention pairs query block i with block n-1-i (i+1 plus n-i key blocks, the same
for every row); windowed and non-causal attention take one query block per row. The T×T scores are never formed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

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


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """Static walk over the non-empty (query block, key block) pairs.

    queries: [rows, G] query block of each of a row's G segments (-1: unused segment).
    slot_segment: [rows, R] segment (0..G-1) a slot's scores belong to, -1 for an unused slot.
    slot_key: [rows, R] key block of each slot.
    """

    queries: np.ndarray
    slot_segment: np.ndarray
    slot_key: np.ndarray

    @property
    def inverse(self) -> np.ndarray:
        """For each query block, its flat index in [rows * G]."""
        flat = self.queries.reshape(-1)
        order = np.full(flat.max() + 1, -1)
        order[flat[flat >= 0]] = np.nonzero(flat >= 0)[0]
        return order


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


def block_schedule(length: int, block_size: int, causal: bool, window: int | None) -> BlockSchedule:
    """The schedule for self-attention over ``length`` tokens in blocks of ``block_size``."""
    n = -(-length // block_size)
    spans = [key_span(i, n, block_size, causal, window) for i in range(n)]
    if causal and window is None and n > 1:
        groups = [(i, n - 1 - i) for i in range(n // 2)] + ([(n // 2,)] if n % 2 else [])
    else:
        groups = [(i,) for i in range(n)]
    width = max(sum(spans[i][1] - spans[i][0] + 1 for i in g) for g in groups)
    segments = max(len(g) for g in groups)
    queries = np.full((len(groups), segments), -1)
    slot_segment = np.full((len(groups), width), -1)
    slot_key = np.zeros((len(groups), width), dtype=np.int64)
    for row, group in enumerate(groups):
        slot = 0
        for seg, block in enumerate(group):
            queries[row, seg] = block
            lo, hi = spans[block]
            for key in range(lo, hi + 1):
                slot_segment[row, slot], slot_key[row, slot] = seg, key
                slot += 1
    return BlockSchedule(queries, slot_segment, slot_key)


def blockwise_attention(
    q: Array, k: Array, v: Array, *, causal: bool, window: int | None, block_size: int
) -> Array:
    """Chunked softmax attention following a block schedule.

    q: [B, Hkv, G, T, D] (G query heads per key/value head, already scaled); k: [B, Hkv, T, D]; v: [B, Hkv, T, V].
    Returns o [B, Hkv, G, T, V] float32.
    """
    batch, kv_heads, group, length, _ = q.shape
    block = min(block_size, length)
    schedule = block_schedule(length, block, causal, window)
    n = -(-length // block)
    pad = n * block - length
    qb = jnp.pad(q, [(0, 0)] * 3 + [(0, pad), (0, 0)]).reshape(batch, kv_heads, group, n, block, -1)
    qb = jnp.moveaxis(qb, 3, 0).reshape(n, batch, kv_heads, group * block, -1)  # [n, B, Hkv, G*block, D]
    kb, vb = (jnp.moveaxis(jnp.pad(x, [(0, 0)] * 2 + [(0, pad), (0, 0)]).reshape(batch, kv_heads, n, block, -1), 2, 0)
              for x in (k, v))  # [n, B, Hkv, block, D or V]
    offsets = jnp.arange(block)

    @jax.checkpoint
    def row(_, xs):
        queries, slot_segment, slot_key = xs  # [S], [R], [R]
        slot_query = queries[jnp.maximum(slot_segment, 0)]  # [R]
        scores = jnp.einsum("rbhqd,rbhkd->rbhqk", qb[slot_query], kb[slot_key])  # [R, B, Hkv, G*block, block]
        q_pos = slot_query[:, None] * block + offsets
        k_pos = jnp.where(slot_segment[:, None] >= 0, slot_key[:, None] * block + offsets, -1)
        visible = jnp.tile(visibility(q_pos, k_pos, length, causal, window), (1, group, 1))[:, None, None]
        part = partial_from_scores(scores, visible, vb[slot_key])  # m, l [R, B, Hkv, G*block]; acc [.., V]
        owner = (slot_segment[:, None] == jnp.arange(queries.shape[0]))[:, :, None, None, None]  # [R, S, 1, 1, 1]
        m = jnp.max(jnp.where(owner, part.m[:, None], _MASKED), axis=0)  # [S, B, Hkv, G*block]
        weight = jnp.exp(jnp.where(owner, part.m[:, None] - m[None], _MASKED))  # [R, S, ...]; exponents <= 0
        l = jnp.sum(weight * part.l[:, None], axis=0)
        acc = jnp.einsum("rsbhq,rbhqv->sbhqv", weight, part.acc)
        return None, finalize(Partial(m, l, acc))

    xs = tuple(jnp.asarray(a) for a in (schedule.queries, schedule.slot_segment, schedule.slot_key))
    _, out = jax.lax.scan(row, None, xs)  # [rows, S, B, Hkv, G*block, V]
    out = out.reshape(-1, *out.shape[2:])[jnp.asarray(schedule.inverse)]  # [n, B, Hkv, G*block, V]
    out = out.reshape(n, batch, kv_heads, group, block, -1)
    out = jnp.moveaxis(out, 0, 3).reshape(batch, kv_heads, group, n * block, -1)
    return out[..., :length, :]


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
