"""Packed rows: several documents in one row of tokens, described two ways that every op accepts.

* ``segment_ids`` [B, T] int: each token's document id. Ids are contiguous runs, non-decreasing along a row (as
  the packer writes them: 0, 0, 0, 1, 1, 2, ...): a document starts wherever the id changes. Padding at the end
  of a row is one more document of its own.
* ``cu_seqlens`` [D + 1] int, flash-linear-attention's form for one packed row (B = 1): the offsets of D
  documents, 0 = cu_seqlens[0] < ... < cu_seqlens[D] = T. ``segment_ids_from_cu_seqlens`` turns it into ids.

Softmax attention masks pairs by id equality (``masks.Document``); the linear-state engine resets its state at
``document_starts`` (``recurrence``); short convolutions and positions restart at ``positions_in_document``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Documents(NamedTuple):
    """The packed documents of a batch of rows, as mixers take them: segment_ids [B, T] int32 (module docstring)
    and positions [B, T] int32, each token's position within its document (under sequence parallelism: this
    device's part of both, positions counted from each document's global start). A pytree."""

    segment_ids: Array
    positions: Array

    @classmethod
    def of(cls, segment_ids: Array, positions: Array | None = None, sequence_axis: str | None = None) -> "Documents":
        """segment_ids [B, T] (and positions [B, T], or None: computed from the ids, on this device's part of rows
        split along ``sequence_axis`` if given)."""
        if jnp.ndim(segment_ids) != 2:
            raise ValueError(f"segment_ids must be [batch, time] integers, got shape {jnp.shape(segment_ids)}")
        segment_ids = check_segment_ids(segment_ids, *jnp.shape(segment_ids))
        if positions is None:
            positions = positions_in_document(segment_ids, sequence_axis)
        if jnp.shape(positions) != segment_ids.shape:
            raise ValueError(f"positions must have the shape of segment_ids {segment_ids.shape}, got "
                             f"{jnp.shape(positions)}")  # fmt: skip
        return cls(segment_ids, jnp.asarray(positions, jnp.int32))


def check_segment_ids(segment_ids: Array, batch: int, length: int) -> Array:
    """segment_ids as int32 [B, T]; a ValueError naming segment_ids for another shape or a non-integer dtype."""
    if jnp.shape(segment_ids) != (batch, length) or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(f"segment_ids must be integers of shape ({batch}, {length}) [batch, time], got "
                         f"{jnp.result_type(segment_ids)} {jnp.shape(segment_ids)}")  # fmt: skip
    return jnp.asarray(segment_ids, jnp.int32)


def segment_ids_from_cu_seqlens(cu_seqlens: Array, batch: int, length: int) -> Array:
    """[1, T] int32 document ids of one packed row from its offsets cu_seqlens [D + 1]. Checks (when the offsets
    are concrete) that B = 1 and that they start at 0, increase and end at T; a ValueError names cu_seqlens."""
    if batch != 1:
        raise ValueError(f"cu_seqlens: describes one packed row, so the batch must be 1, got batch {batch}")
    if jnp.ndim(cu_seqlens) != 1 or jnp.shape(cu_seqlens)[0] < 2:
        raise ValueError(f"cu_seqlens must be a 1-D array of D + 1 >= 2 offsets, got shape {jnp.shape(cu_seqlens)}")
    if not jnp.issubdtype(jnp.result_type(cu_seqlens), jnp.integer):
        raise ValueError(f"cu_seqlens must be integers, got {jnp.result_type(cu_seqlens)}")
    if not isinstance(cu_seqlens, jax.core.Tracer):
        offsets = np.asarray(cu_seqlens)
        if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) <= 0):
            raise ValueError(f"cu_seqlens must increase from 0 to the sequence length {length}, got {offsets.tolist()}")
    ends = jnp.asarray(cu_seqlens, jnp.int32)[1:]
    return jnp.searchsorted(ends, jnp.arange(length, dtype=jnp.int32), side="right")[None].astype(jnp.int32)


def document_starts(segment_ids: Array, sequence_axis: str | None = None) -> Array:
    """[B, T] bool: True at the first token of every document except one that begins the row (the state before
    the row, ``initial_state``, belongs to the row's first document).

    With ``sequence_axis`` (inside ``shard_map``; segment_ids is this device's part of a row split along that mesh
    axis) the token before a part's first is the previous device's last, so a document that crosses a device
    border does not start again there.
    """
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = segment_ids != previous
    if sequence_axis is None:
        return starts
    devices = jax.lax.axis_size(sequence_axis)
    before = jax.lax.ppermute(segment_ids[:, -1], sequence_axis, [(i, i + 1) for i in range(devices - 1)])
    first = (jax.lax.axis_index(sequence_axis) > 0) & (segment_ids[:, 0] != before)
    return starts.at[:, 0].set(first)


def positions_in_document(segment_ids: Array, sequence_axis: str | None = None) -> Array:
    """[B, T] int32: each token's position within its document (0 at every document start); with
    ``sequence_axis`` (segment_ids this device's part), counted from the document's start on an earlier device."""
    ones = jnp.ones(segment_ids.shape, jnp.int32)
    return document_scan(ones, document_starts(segment_ids, sequence_axis), jnp.add, 0, sequence_axis) - 1


def document_scan(
    x: Array, starts: Array, combine: Callable[[Array, Array], Array], identity: float,
    sequence_axis: str | None = None, initial: Array | None = None,
) -> Array:  # fmt: skip
    """The inclusive prefix ``combine`` over time of x [B, T, ...] within each document (document starts [B, T],
    ``document_starts``): an associative scan that restarts at every start, so no sum crosses a boundary and
    nothing cancels. ``combine`` is associative with ``identity`` (jnp.add and 0, jnp.logaddexp and -inf).

    ``initial`` [B, ...]: the prefix before the row, for its first document (None: identity). With
    ``sequence_axis`` (inside shard_map, x this device's part) a document that began on an earlier device continues
    from those devices' prefix: one all-gather of each device's [B, ...] tail and whether it holds a start.
    """
    flags = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (x.ndim - 2)), x.shape)

    def op(a, b):
        return a[0] | b[0], jnp.where(b[0], b[1], combine(a[1], b[1]))

    seen, out = jax.lax.associative_scan(op, (flags, x), axis=1)
    carry = jnp.full(x.shape[:1] + x.shape[2:], identity, x.dtype) if initial is None else initial.astype(x.dtype)
    if sequence_axis is not None:
        tails, restarts = jax.lax.all_gather((out[:, -1], seen[:, -1]), sequence_axis)  # [P, B, ...]
        index = jax.lax.axis_index(sequence_axis)
        for device in range(tails.shape[0]):  # the devices before this one, in order
            after = jnp.where(restarts[device], tails[device], combine(carry, tails[device]))
            carry = jnp.where(device < index, after, carry)
    return jnp.where(seen, out, combine(carry[:, None], out))
