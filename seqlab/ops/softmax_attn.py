"""Softmax attention — "Attention Is All You Need" — under any mask of ``seqlab.core.masks``, with grouped-query
heads ("GQA: Training Generalized Multi-Query Transformer Models").

    o_t = Σ_{s visible from t} exp(mod(q_t·k_s · scale)) v_s / Σ_{s visible} exp(mod(q_t·k_s · scale))

(0 for a query that sees no key). The mask algebra (``seqlab.core.masks``) gives each mask an element predicate,
evaluated on absolute positions (and segment ids for a ``Document`` term), and a static tile map from which every
query tile gets the list of key tiles it visits. ``causal`` / ``window`` are shorthands for ``Causal(window)``
(s <= t, t - w < s) and ``Bidirectional(window)`` (|t - s| < w). Forms: "chunked" is
``seqlab.core.online_softmax.blockwise_attention`` over the visit lists (one slice per row on the fast path, where
each row's visits are one contiguous span; gathered tiles otherwise), "parallel" its dense form, "pallas"
``pallas_kernels.flash_attention`` (no score_mod), "recurrent" a scan of decode steps.
``score_mod(scores, q_idx, k_idx, head)`` rewrites the scaled float32 scores before masking; the shapes it receives
are stated in ``seqlab.core.online_softmax``. Under ``sequence_axis`` on XLA:CPU host devices, the gradient of an
array a score_mod closes over (a psum) and the keys' all-gather transpose are independent collectives that each
device may run in a different order: tie that array to k first (``jax.lax.optimization_barrier``, as ``gpsa``).

With ``sequence_axis`` the sequence is split into contiguous segments along that mesh axis (inside
``jax.shard_map``) and ``seqlab.core.softmax_parallel`` exchanges keys and values: "allgather" (LASP-2H, "LASP-2:
Rethinking Sequence Parallelism for Linear Attention and Its Hybrid") or "ring" ("Ring Attention with Blockwise
Transformers for Near-Infinite Context") under any mask and score_mod; ``Causal`` / ``Bidirectional`` sliding
windows with w - 1 <= T_local exchange only a halo.

Packed rows (``seqlab.core.documents``): ``segment_ids`` [B, T] or ``cu_seqlens`` [D + 1] restrict every query
to the keys of its own document, in every form: the mask becomes ``mask & Document()`` (a mask that already has a
``Document`` term takes the ids as they are), the recurrent form masks each step's keys, and under
``sequence_axis`` the key segments' ids travel with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as pallas_common
from pallas_kernels import flash_attention as pallas_flash
from seqlab.core import documents, masks, online_softmax
from seqlab.ops import _common
from seqlab.core import softmax_parallel as sequence_attention

Array = jax.Array
__all__ = ["softmax_attn", "softmax_decode_step"]
DEFAULT_BLOCK_SIZE = 512  # XLA:CPU runs [512, D] x [D, L] score matmuls near its square-matmul rate (BENCHMARKS.md)
MIN_WINDOW_BLOCK_SIZE = 64


def default_block_size(window: int | None) -> int:
    """DEFAULT_BLOCK_SIZE, or for a sliding window the window rounded up to a power of two (at least
    MIN_WINDOW_BLOCK_SIZE) when smaller: a row then reads about two windows of keys, not two default blocks."""
    if window is None:
        return DEFAULT_BLOCK_SIZE
    return min(DEFAULT_BLOCK_SIZE, max(MIN_WINDOW_BLOCK_SIZE, 1 << (window - 1).bit_length()))


def _mask_window(mask: masks.Mask) -> int | None:
    """The sliding window of a Causal / Bidirectional mask (it sets the default block size), else None."""
    return mask.window if isinstance(mask, (masks.Causal, masks.Bidirectional)) else None


def _check(q: Array, k: Array, v: Array, impl: str, block_size: int | None) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, head_dim], got shape {q.shape}")
    if k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must be [batch, time, kv_heads, head_dim] matching q {q.shape} in batch, time and head_dim, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [batch, time, kv_heads, value_dim] matching k {k.shape[:3]}, got {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"the kv heads of k ({k.shape[2]}) must divide the query heads of q ({q.shape[2]})")
    if impl not in _common.IMPLS:
        raise ValueError(f"impl must be one of {_common.IMPLS}, got {impl!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be None or a positive int, got {block_size!r}")
    if impl == "pallas" and block_size is not None and not pallas_common.is_block_size(block_size):
        raise ValueError(f"block_size must be None or a power of two >= 16 with impl='pallas', got {block_size}")


def _document_ids(
    mask: masks.Mask, segment_ids: Array | None, cu_seqlens: Array | None, batch: int, length: int
) -> Array | None:  # fmt: skip
    """The packed rows' document ids [B, T] int32 (from segment_ids or cu_seqlens), or None; a mask with a
    Document term needs them."""
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("segment_ids and cu_seqlens: give one of them (cu_seqlens describes a single packed row)")
    if cu_seqlens is not None:
        segment_ids = documents.segment_ids_from_cu_seqlens(cu_seqlens, batch, length)
    if segment_ids is None:
        return masks.check_segment_ids(mask, None, batch, length)  # the error, for a Document mask
    return documents.check_segment_ids(segment_ids, batch, length)


def _check_sequence(impl: str, sequence_axis: str | None, sequence_parallel: str) -> None:
    if sequence_parallel not in sequence_attention.MODES:
        raise ValueError(f"sequence_parallel must be one of {sequence_attention.MODES}, got {sequence_parallel!r}")
    if sequence_axis is not None and impl == "recurrent":
        raise ValueError(f"impl must be 'chunked' or 'parallel' with sequence_axis set, got {impl!r}")


def _group_heads(q: Array, kv_heads: int, scale: float) -> Array:
    """[B, T, H, D] -> [B, Hkv, G, T, D] in float32, scaled."""
    b, t, h, d = q.shape
    q = q.astype(jnp.float32).reshape(b, t, kv_heads, h // kv_heads, d) * scale
    return q.transpose(0, 2, 3, 1, 4)


def softmax_attn(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    mask: masks.Mask | None = None,
    causal: bool = True,
    window: int | None = None,
    score_mod: masks.ScoreMod | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
    impl: str = "auto",
    block_size: int | None = None,
    sequence_axis: str | None = None,
    sequence_parallel: str = "allgather",
    block_index: masks.BlockIndex | None = None,
) -> Array:
    """q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, V] with Hkv dividing H. Returns o [B, T, H, V].

    mask: any ``seqlab.core.masks`` mask; None builds ``Causal(window)`` (causal) or ``Bidirectional(window)``
    (giving both mask and a non-default causal / window is an error). score_mod: see the module docstring (not
    with impl="pallas"; impl="auto" then runs "chunked"). segment_ids [B, T] int or cu_seqlens [D + 1] (B = 1):
    packed documents (module docstring); a mask with a ``Document`` term needs them. Under ``sequence_axis``,
    segment_ids is this device's part.
    sequence_axis: a mesh axis name; q, k, v are then this device's segment [B, T_local, ...] of a sequence split
    contiguously along it (call inside ``jax.shard_map``), and o is the segment's output [B, T_local, H, V].
    sequence_parallel: "allgather" or "ring", how keys and values travel (see ``seqlab.core.softmax_parallel``);
    impl "chunked" loops over blocks of ``block_size`` (None: ``default_block_size(window)``), "parallel" over
    blocks of T_local; "pallas" runs ``pallas_kernels.flash_attention`` (blocks of ``block_size`` both ways, or
    ``FlashBlocks()``; interpreted on CPU); "auto" is "pallas" on a GPU or TPU without ``sequence_axis`` for
    T > 1, else "chunked". The chunked form's gradient is a flash-attention ``jax.custom_vjp``: reverse mode (also
    nested) works, forward mode (``jax.jvp``) does not; use impl="parallel" for that.
    block_index: a runtime ``masks.BlockIndex`` ([B, Hkv, ceil(T / block), S] key tiles per query tile, chosen
    from the data), intersected with the mask: the chunked and pallas forms read only those tiles (in tiles of
    block_index.block, which replaces block_size; pallas needs a power of two >= 16), the dense and recurrent
    forms mask by it; not with sequence_axis; impl="auto" runs "chunked" with it.
    """
    _check(q, k, v, impl, block_size)
    mask = masks.resolve(mask, causal, window)
    _check_sequence(impl, sequence_axis, sequence_parallel)
    _check_block_index(block_index, sequence_axis, *q.shape[:2], k.shape[2])
    segment_ids = _document_ids(mask, segment_ids, cu_seqlens, *q.shape[:2])
    base_mask = mask  # the sequence-parallel form takes the ids beside it
    if segment_ids is not None and not masks.needs_segments(mask):
        mask = mask & masks.Document()
    # impl="pallas" always runs the kernels (score_mod: their error); "auto" without score_mod and block_index
    kernel = impl == "pallas" or (score_mod is None and block_index is None)
    impl = _common.resolve_impl(impl, has_kernel=kernel, sequence_axis=sequence_axis, length=q.shape[1])
    b, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if impl == "pallas":
        blocks = pallas_flash.FlashBlocks() if block_size is None else pallas_flash.FlashBlocks(*(block_size,) * 4)
        return pallas_flash.flash_attention(q, k, v, mask=mask, scale=scale, blocks=blocks, score_mod=score_mod,
                                            segment_ids=segment_ids, block_index=block_index)
    block_size = block_size or default_block_size(_mask_window(base_mask))
    if impl == "chunked" and sequence_axis is None and block_index is None and _splits_heads(mask, h, t, block_size):
        return _by_head_mask(q, k, v, mask, scale=scale, score_mod=score_mod, segment_ids=segment_ids,
                             block_size=block_size)
    qg = _group_heads(q, k.shape[2], scale)
    kt, vt = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k, v))
    if sequence_axis is not None:
        o = sequence_attention.sequence_parallel_attention(
            qg, kt, vt, axis_name=sequence_axis, mode=sequence_parallel, mask=base_mask,
            block_size=block_size if impl == "chunked" else None, segment_ids=segment_ids, score_mod=score_mod,
        )
    elif impl == "chunked":
        o = online_softmax.blockwise_attention(qg, kt, vt, mask=mask, block_size=block_size, score_mod=score_mod,
                                               segment_ids=segment_ids, block_index=block_index)
    elif impl == "parallel":
        o = online_softmax.dense_attention(qg, kt, vt, mask=mask, score_mod=score_mod, segment_ids=segment_ids,
                                           block_index=block_index)
    else:
        positions = jnp.arange(t)
        step_ids = None if segment_ids is None else jnp.moveaxis(segment_ids, 1, 0)  # [T, B]

        def step(_, xs):
            q_t, pos, ids = xs
            segments = None if ids is None else (ids[:, None], segment_ids)  # the query's document, the keys'
            o_t = online_softmax.cache_attention(q_t, kt, vt, positions, pos, mask=mask, segments=segments,
                                                 score_mod=score_mod, length=t, block_index=block_index)
            return None, o_t

        _, o = jax.lax.scan(step, None, (jnp.moveaxis(qg, 3, 0), positions, step_ids))
        o = jnp.moveaxis(o, 0, 3)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1]).astype(v.dtype)


def _check_block_index(block_index: masks.BlockIndex | None, sequence_axis: str | None, batch: int, length: int,
                       kv_heads: int) -> None:
    if block_index is None:
        return
    if not isinstance(block_index, masks.BlockIndex):
        raise ValueError("block_index must be a seqlab.core.masks.BlockIndex or None, got "
                         f"{type(block_index).__name__}")
    if sequence_axis is not None:
        raise ValueError(f"block_index: a runtime block index runs without sequence_axis, got {sequence_axis!r}")
    block_index.check(batch, kv_heads, length)


SPLIT_GAIN = 0.75  # heads split by mask when their mean visited tiles are below this share of the union's


def _splits_heads(mask: masks.Mask, heads: int, length: int, block: int) -> bool:
    """Whether a PerHead mask's heads should run as one blockwise call per distinct mask: the union of the heads'
    tile maps (one call) visits more than 1 / SPLIT_GAIN times the tiles the heads need on average."""
    if not isinstance(mask, masks.PerHead) or len(set(mask.head_masks(heads))) < 2:
        return False
    union = mask.tile_map(length, block, block).mean()
    mean = np.mean([m.tile_map(length, block, block).mean() for m in mask.masks])
    return mean < SPLIT_GAIN * union


def _by_head_mask(q: Array, k: Array, v: Array, mask: masks.PerHead, *, scale: float, score_mod, segment_ids,
                  block_size: int) -> Array:
    """The chunked form, one call per distinct head mask over the query heads that have it (each key/value head
    taken for its query heads), so each call visits only its own mask's tiles; o [B, T, H, V]."""
    group = q.shape[2] // k.shape[2]
    outputs, order = [], []
    for head_mask in dict.fromkeys(mask.masks):
        heads = [h for h, m in enumerate(mask.masks) if m == head_mask]
        index = jnp.asarray(heads, jnp.int32)
        kv = jnp.asarray([h // group for h in heads], jnp.int32)
        mod = None if score_mod is None else functools.partial(_with_heads, score_mod, index)
        outputs.append(softmax_attn(q[:, :, index], k[:, :, kv], v[:, :, kv], mask=head_mask, scale=scale,
                                    score_mod=mod, segment_ids=segment_ids, impl="chunked", block_size=block_size))
        order += heads
    return jnp.concatenate(outputs, axis=2)[:, :, np.argsort(order)]


def _with_heads(score_mod: masks.ScoreMod, index: Array, scores: Array, q_idx: Array, k_idx: Array,
                head: Array) -> Array:
    """score_mod of a call over the query heads ``index`` (its head h is head index[h] of the whole layer)."""
    return score_mod(scores, q_idx, k_idx, index[head])


def softmax_decode_step(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    key_positions: Array,
    query_position: Array | int,
    *,
    scale: float | None = None,
    window: int | None = None,
    mask: masks.Mask | None = None,
    score_mod: masks.ScoreMod | None = None,
    block_index: masks.BlockIndex | None = None,
    segment_ids: tuple[Array, Array] | None = None,
) -> Array:
    """One decode step against a KV cache (a full cache or a ring buffer; slot order does not matter).

    q: [B, H, D]; k_cache: [B, L, Hkv, D]; v_cache: [B, L, Hkv, V]; key_positions: [L] int (-1 = empty slot);
    a key is visible iff 0 <= pos and ``mask`` shows it to query_position; mask None: ``Causal(window)``
    (pos <= query_position and, with a window, query_position - pos < window). score_mod: as in ``softmax_attn``,
    at the query's and the slots' absolute positions (head [H, 1, 1]). block_index: the query's own row of a
    runtime ``masks.BlockIndex`` (tiles [B, Hkv, 1, S]): only keys in those tiles are visible. segment_ids: (the
    query's [B], the slots' [B, L]) int ids for a mask with a ``Document`` term. Returns [B, H, V].
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got shape {q.shape}")
    if k_cache.ndim != 4 or k_cache.shape[0] != q.shape[0] or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"k_cache must be [batch, slots, kv_heads, head_dim] matching q {q.shape}, got {k_cache.shape}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must match k_cache {k_cache.shape[:3]} in its first three axes, got {v_cache.shape}")
    if key_positions.shape != (k_cache.shape[1],):
        raise ValueError(f"key_positions must have shape ({k_cache.shape[1]},), got {key_positions.shape}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"the kv heads of k_cache ({k_cache.shape[2]}) must divide the query heads of q ({q.shape[1]})")
    mask = masks.resolve(mask, True, window)
    mask.head_masks(q.shape[1])
    b, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    qg = _group_heads(q[:, None], k_cache.shape[2], scale)[:, :, :, 0]
    kt, vt = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (k_cache, v_cache))
    if block_index is not None and block_index.tiles.shape[:3] != (b, k_cache.shape[2], 1):
        raise ValueError(f"block_index: tiles must be [{b}, {k_cache.shape[2]}, 1, S] (the query's row), got "
                         f"{block_index.tiles.shape}")
    first_row = jnp.asarray(query_position) // (1 if block_index is None else block_index.block)
    if masks.needs_segments(mask) != (segment_ids is not None):
        raise ValueError(f"segment_ids: the query's [B] and the slots' [B, L] ids are needed iff the mask has a "
                         f"Document term; mask {mask}, got {'none' if segment_ids is None else 'ids'}")
    segments = None if segment_ids is None else (segment_ids[0][:, None], segment_ids[1])
    o = online_softmax.cache_attention(qg, kt, vt, key_positions, query_position, mask=mask, score_mod=score_mod,
                                       block_index=block_index, first_row=first_row, segments=segments)
    return o.reshape(b, h, v_cache.shape[-1]).astype(v_cache.dtype)
