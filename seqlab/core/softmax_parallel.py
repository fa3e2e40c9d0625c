"""Softmax attention over a sequence split into contiguous segments along a mesh axis, under any mask of
``seqlab.core.masks`` (per head with ``PerHead``).

Called inside ``jax.shard_map``: of P devices on the axis, device i holds tokens [i·T_local, (i+1)·T_local) of q,
k and v. Every exchange below ends in the online-softmax ``Partial`` of ``seqlab.core.online_softmax``, computed
blockwise by ``segment_partial`` (query blocks scanned and rematerialised in the backward pass; within a query
block, a scan over the key blocks it can reach, where a block with no visible pair is skipped by ``lax.cond``):

- "allgather" — LASP-2H, the softmax half of "LASP-2: Rethinking Sequence Parallelism for Linear Attention and
  Its Hybrid": one all-gather of K and V, then the local queries (global positions offset by i·T_local) walk the
  gathered key blocks, segment by segment. Communication grows with T.
- "ring" — "Ring Attention with Blockwise Transformers for Near-Infinite Context": P steps; each device attends
  to the K/V segment it holds, merges the partial, and passes the segment to the next device with ``ppermute``
  (P - 1 permutes). Segments a causal mask hides (a later device's) cost only the skip test.
- halo — a ``Causal`` / ``Bidirectional`` sliding window w with w - 1 <= T_local, whatever the mode: device i
  receives only the last w - 1 keys and values of device i - 1 (and, non-causal, the first w - 1 of device i + 1)
  by one ``ppermute`` each, then attends locally. Edge devices receive zeros at positions outside [0, T), which the mask hides. Communication
  does not grow with T.

Visibility is each head's element predicate on global positions (``masks.head_pairwise``, keys outside [0, T)
invisible); which key blocks a query block scans comes from the window (``SequenceMask.reach``; every block for
other masks, a block with no visible pair skipped), not from tile maps, since the key segments' offsets are
traced. Packed rows: the document ids of the keys travel with them (gathered, passed round the ring or sent as
halos), and a key is visible only to queries of its own document.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqlab.core import masks
from seqlab.core.online_softmax import (
    Partial, empty_partial, finalize, join_blocks, merge, modified_scores, partial_from_scores, split_blocks,
)

Array = jax.Array

MODES = ("allgather", "ring")


@dataclasses.dataclass(frozen=True)
class SequenceMask:
    """Which keys a query sees: ``mask`` on positions in [0, length); the block size of the query and key loops."""

    mask: masks.Mask
    length: int
    block: int
    score_mod: masks.ScoreMod | None = None

    @property
    def causal(self) -> bool:
        return isinstance(self.mask, masks.Causal)

    @property
    def window(self) -> int | None:
        """The sliding window of a Causal / Bidirectional mask (it bounds the key blocks scanned), else None."""
        return self.mask.window if isinstance(self.mask, (masks.Causal, masks.Bidirectional)) else None

    def reach(self, num_key_blocks: int) -> int:
        """How many consecutive key blocks one query block can see (static)."""
        if self.window is None:
            return num_key_blocks
        span = self.block + (self.window - 1) * (1 if self.causal else 2)  # key positions a query block sees
        return min(num_key_blocks, (span + self.block - 2) // self.block + 1)

    def first_key_block(self, offset: Array, num_key_blocks: int) -> Array | int:
        """The first of the ``reach`` key blocks scanned for a query block whose first query sits ``offset``
        positions after the first key."""
        if self.window is None:
            return 0
        earliest = offset - (self.window - 1)  # index of the first key a query of the block can see
        return jnp.clip(earliest // self.block, 0, num_key_blocks - self.reach(num_key_blocks))


def sequence_parallel_attention(
    q: Array, k: Array, v: Array, *, axis_name: str, mode: str, mask: masks.Mask,
    block_size: int | None, segment_ids: Array | None = None, score_mod: masks.ScoreMod | None = None,
) -> Array:
    """This device's segment of softmax attention over the sequence split along ``axis_name``.

    q: [B, Hkv, G, T_local, D] (G query heads per key/value head, scaled, float32); k: [B, Hkv, T_local, D];
    v: [B, Hkv, T_local, V]; mode in ``MODES``; mask: any mask (global positions); block_size None:
    one block of T_local (the parallel form); segment_ids: this device's document ids [B, T_local] int32, or None;
    score_mod: as in ``online_softmax.blockwise_attention``, at global positions. Returns o [B, Hkv, G, T_local, V] float32.
    """
    t_local = q.shape[3]
    mask.head_masks(q.shape[1] * q.shape[2])
    length = t_local * jax.lax.axis_size(axis_name)
    spec = SequenceMask(mask, length, min(block_size or t_local, t_local), score_mod)
    keys = _Keys(k, v, segment_ids)
    if spec.window is not None and spec.window - 1 <= t_local:
        part = _halo(q, keys, segment_ids, axis_name, spec)
    elif mode == "allgather":
        part = _allgather(q, keys, segment_ids, axis_name, spec)
    else:
        part = _ring(q, keys, segment_ids, axis_name, spec)
    return finalize(part)


class _Keys(NamedTuple):
    """Keys [B, Hkv, Tk, D], values [B, Hkv, Tk, V] and their document ids [B, Tk] (None: one document)."""

    k: Array
    v: Array
    segments: Array | None


def _allgather(q: Array, keys: _Keys, q_segments: Array | None, axis_name: str, mask: SequenceMask) -> Partial:
    """Local queries against the all-gathered K/V, one device segment at a time (a scan merging partials, so the
    backward pass holds one segment's blocks at a time)."""
    devices, index, t_local = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name), q.shape[3]
    gathered = jax.lax.all_gather(keys, axis_name)  # each [P, B, ...]

    def step(part, xs):
        segment, source = xs
        return merge(part, segment_partial(q, segment, q_segments, index * t_local, source * t_local, mask)), None

    part, _ = jax.lax.scan(step, empty_partial(q[..., 0], keys.v.shape[-1]), (gathered, jnp.arange(devices)))
    return part


def _ring(q: Array, keys: _Keys, q_segments: Array | None, axis_name: str, mask: SequenceMask) -> Partial:
    """P - 1 ppermute steps of the K/V segments around the ring, merging one partial per segment held."""
    devices, index, t_local = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name), q.shape[3]
    to_next = [(i, (i + 1) % devices) for i in range(devices)]

    def step(carry, hops):
        part, held = carry
        held = jax.lax.ppermute(held, axis_name, to_next)
        source = (index - hops) % devices
        return (merge(part, segment_partial(q, held, q_segments, index * t_local, source * t_local, mask)), held), None

    first = segment_partial(q, keys, q_segments, index * t_local, index * t_local, mask)
    (part, _), _ = jax.lax.scan(step, (first, keys), jnp.arange(1, devices))
    return part


def _halo(q: Array, keys: _Keys, q_segments: Array | None, axis_name: str, mask: SequenceMask) -> Partial:
    """Local attention over [halo from device i-1; local; halo from device i+1 (non-causal)], halos w - 1 long."""
    devices, index, t_local = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name), q.shape[3]
    width, start = mask.window - 1, index * t_local
    if not width:
        return segment_partial(q, keys, q_segments, start, start, mask)
    to_next = [(i, i + 1) for i in range(devices - 1)]
    pieces = [jax.lax.ppermute(_key_slice(keys, -width, None), axis_name, to_next), keys]
    if not mask.causal:
        from_next = [(j, i) for i, j in to_next]
        pieces.append(jax.lax.ppermute(_key_slice(keys, 0, width), axis_name, from_next))
    return segment_partial(q, _concat_keys(pieces), q_segments, start, start - width, mask)


def _key_slice(keys: _Keys, start: int, stop: int | None) -> _Keys:
    """Tokens [start, stop) of every field (time is axis 2 of k and v, axis 1 of the segment ids)."""
    segments = None if keys.segments is None else keys.segments[:, start:stop]
    return _Keys(keys.k[:, :, start:stop], keys.v[:, :, start:stop], segments)


def _concat_keys(pieces: list[_Keys]) -> _Keys:
    """The pieces' tokens one after another."""
    segments = None if pieces[0].segments is None else jnp.concatenate([p.segments for p in pieces], axis=1)
    return _Keys(jnp.concatenate([p.k for p in pieces], axis=2), jnp.concatenate([p.v for p in pieces], axis=2),
                 segments)  # fmt: skip


def segment_partial(q: Array, keys: _Keys, q_segments: Array | None, q_start: Array | int, k_start: Array | int,
                    mask: SequenceMask) -> Partial:
    """The partial of queries at absolute positions q_start + [0, Tq) over keys at k_start + [0, Tk).

    q: [B, Hkv, G, Tq, D] (scaled); keys: k [B, Hkv, Tk, D], v [B, Hkv, Tk, V], their document ids [B, Tk] (and
    q_segments [B, Tq]) or None; the starts may be traced.
    Returns Partial: m, l [B, Hkv, G, Tq]; acc [B, Hkv, G, Tq, V].
    """
    block, (tq, tk) = mask.block, (q.shape[3], keys.k.shape[2])
    qb, kb, vb = split_blocks(q, 3, block), split_blocks(keys.k, 2, block), split_blocks(keys.v, 2, block)
    documents = q_segments is not None
    qs = split_blocks(q_segments, 1, block) if documents else None  # [n, B, block]
    ks = split_blocks(keys.segments, 1, block) if documents else None
    reach = mask.reach(kb.shape[0])

    @jax.checkpoint
    def query_block(_, xs):
        q_block, q_doc, index = xs
        q_pos = _positions(q_start, index, block, tq)
        first = mask.first_key_block(q_start + index * block - k_start, kb.shape[0])

        def key_block(part, key_index):
            k_pos = _positions(k_start, key_index, block, tk)
            segments = (q_doc, ks[key_index]) if documents else None  # an InDocument term reads them
            visible = masks.head_pairwise(mask.mask, *q_block.shape[1:3], q_pos, k_pos, length=mask.length,
                                          segments=segments)
            visible = visible & (q_pos >= 0)[:, None]  # [(B,) Hkv | 1, G | 1, block, block]
            if documents:  # [B, 1, 1, block, block]
                visible = visible & (q_doc[:, :, None] == ks[key_index][:, None, :])[:, None, None]

            def attend(part):
                scores = jnp.einsum("bhgqd,bhkd->bhgqk", q_block, kb[key_index])
                scores = modified_scores(mask.score_mod, scores, q_pos, k_pos, mask.length)
                return merge(part, partial_from_scores(scores, visible, vb[key_index][:, :, None]))

            return jax.lax.cond(jnp.any(visible), attend, lambda part: part, part), None

        start = empty_partial(q_block[..., 0], vb.shape[-1])
        part, _ = jax.lax.scan(key_block, start, first + jnp.arange(reach))
        return None, part

    _, parts = jax.lax.scan(query_block, None, (qb, qs, jnp.arange(qb.shape[0])))  # each [n_q, B, Hkv, G, block, ...]
    return jax.tree.map(lambda x: join_blocks(x, tq), parts)


def _positions(start: Array | int, index: Array, block: int, count: int) -> Array:
    """[block] absolute positions of block ``index`` of a run starting at ``start``; -1 past its ``count`` tokens."""
    local = index * block + jnp.arange(block)
    return jnp.where(local < count, start + local, -1)
