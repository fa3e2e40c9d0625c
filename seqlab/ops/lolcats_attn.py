"""LoLCATs' hybrid attention — "LoLCATs: On Low-Rank Linearizing of Large Language Models" — softmax attention over
a window of recent keys and linear attention over every earlier key, sharing one normaliser:

    y_i = [γ_h Σ_{j∈W(i)} e^{s_ij − m_i} v_j + λ_h Σ_{j≤i, j∉W(i)} φq_i·φk_j v_j]
          / [γ_h Σ_{j∈W(i)} e^{s_ij − m_i} + λ_h Σ_{j≤i, j∉W(i)} φq_i·φk_j]

s_ij = scale · q_i·k_j (raw, post-RoPE q and k; scale defaults to d^-1/2), m_i = max_{j∈W(i)} s_ij. As in the
official code the max is subtracted from the softmax term only, so γ_h weighs e^{s − m} against the linear scores
(reproduced exactly, for checkpoint parity). γ_h is the per-head window factor (σ of a learnt logit in the layer),
λ_h the linear factor (1, or 1 − γ_h with the layer's `affine_attention_factors`). The denominator is at least
γ_h (the largest window term is e^0), so it needs no eps; the official code adds none.

Windows (positions count from the first token of the sequence, 0-based; blocks are aligned to position 0):
  "sw"  a sliding window of `window` tokens: the query and the window − 1 before it, i − window < j <= i.
  "tk"  "terracing": the query's own block of `window` tokens (causal) plus the whole previous block,
        j >= window · (i // window − 1), so window + 1 .. 2 · window keys. The official code builds this mask
        aligned to the *end* of the sequence; the two agree when T is a multiple of the window (LoLCATs trains on
        1024-token chunks with window 64). Aligning to the start keeps every output causal and lets the decode
        cache reproduce the training path exactly.
As masks of ``seqlab.core.masks`` (``window_mask``): "sw" is ``Causal(window)``, "tk" is ``Terraced(window)``, and
the band below is ``Causal(R)``; their element predicates run on absolute positions through ``masks.pairwise``,
which also hides keys at negative positions (the zeros before the sequence, empty cache slots). The band is
computed densely per block of queries, so the masks' tile maps and visit lists are not used here.

Decomposition. Let the reach R be the window (sw) or twice the window (tk): every key of W(i) lies in the band
i − R < j <= i. The output splits, in numerator and denominator alike (v carries an appended ones column, so one
matmul gives both), into
  - the band, dense blocked jnp: each block of `window` queries against the slab of R + window keys that ends with
    it (cost T · (R + window) scores) — the softmax terms of W(i) and, for tk only, the linear terms of the band's
    keys that already left the window (the tokens of block b − 2 after i − R);
  - the keys j <= i − R, all outside the window: linear attention with φk and [v, 1] delayed by R positions, on
    the engine (`seqlab.ops.linear_attn`, scale 1, no normaliser, any `impl` / `chunk_size`). Its state is the
    linear state (S | z) of every token that has left the band — what a decode cache keeps next to a ring buffer
    of the last R tokens (`lolcats_decode_step`).
The R tokens before a segment (zeros at the start of the sequence) feed both the first slabs and the delay; on a
sequence split over devices they are the previous device's last R tokens (one ppermute).

Packed rows (``segment_ids`` and ``positions`` within documents, [B, T]): the window and the band are taken on
document positions and masked to the query's document (the band's keys carry their ids and positions, the R
before a segment included), and a delayed key counts in the linear part only where it shares the query's document
(which also restarts the linear state at every document), so every document is mixed alone.

All arithmetic is float32; the output takes v's dtype. k and v may have fewer (grouped-query) heads than q;
φq and φk have the query heads (the map is applied after the GQA repeat).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import documents, masks
from seqlab.ops import _common
from seqlab.ops.linear_attn import linear_attn
from seqlab.core.halo import key_slabs, previous_segment_tail

Array = jax.Array
__all__ = ["lolcats_attn", "lolcats_decode_step"]

KINDS = ("sw", "tk")


def window_reach(window: int, kind: str) -> int:
    """R: the band i − R < j <= i holds every key of the window; keys j <= i − R are outside it."""
    return window if kind == "sw" else 2 * window


def window_mask(window: int, kind: str) -> masks.ElementMask:
    """W(i) as a ``seqlab.core.masks`` mask: "sw" is ``Causal(window)``, "tk" is ``Terraced(window)``."""
    return masks.Causal(window) if kind == "sw" else masks.Terraced(window)


def _check_args(q, k, v, phi_q, phi_k, window_factor, linear_factor, window, kind) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, head_dim], got shape {q.shape}")
    if k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k must be [batch, time, kv_heads, head_dim] matching q {q.shape} with kv_heads dividing "
                         f"heads, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [batch, time, kv_heads, value_dim] matching k {k.shape[:3]}, got {v.shape}")
    if phi_q.ndim != 4 or phi_q.shape[:3] != q.shape[:3]:
        raise ValueError(f"phi_q must be [batch, time, heads, features] matching q {q.shape[:3]}, got {phi_q.shape}")
    if phi_k.shape != phi_q.shape:
        raise ValueError(f"phi_k must have the shape of phi_q {phi_q.shape}, got {phi_k.shape}")
    _check_factors(window_factor, linear_factor, q.shape[2])
    _check_window(window, kind)


def _check_factors(window_factor: Array | float, linear_factor: Array | float, heads: int) -> None:
    for name, factor in (("window_factor", window_factor), ("linear_factor", linear_factor)):
        shape = jnp.shape(factor)
        if shape not in ((), (heads,)):
            raise ValueError(f"{name} must be a scalar or have shape ({heads},) [heads], got shape {shape}")


def _check_window(window: int, kind: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def repeat_heads(x: Array, heads: int) -> Array:
    """[B, T, Hkv, D] -> [B, T, H, D]: query head h reads kv head h // (H / Hkv) (softmax_attn's grouping)."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def _per_head(factor: Array | float, heads: int) -> Array:
    """A scalar or [H] factor as [H, 1, 1] float32, broadcasting against [..., H, Tq, Tk]."""
    return jnp.broadcast_to(jnp.asarray(factor, jnp.float32), (heads,))[:, None, None]


def band_weights(scores: Array, phi_scores: Array | None, in_window: Array, in_band: Array,
                 window_factor: Array, linear_factor: Array) -> Array:
    """Unnormalised weights [..., H, Tq, Tk] of a band of keys: γ e^{s − m} on the window (m = the window's max
    score; every query sees itself, so no row is empty), λ φq·φk on the band's keys outside the window.

    scores, phi_scores: [..., H, Tq, Tk] float32; in_window, in_band: bool, broadcasting; factors [H, 1, 1].
    """
    masked = jnp.where(in_window, scores, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)
    weights = window_factor * jnp.exp(jnp.where(in_window, scores - m, -jnp.inf))
    if phi_scores is not None:
        weights = weights + linear_factor * jnp.where(in_band & ~in_window, phi_scores, 0.0)
    return weights


def _normalise(numerator: Array, dtype) -> Array:
    """[..., V + 1] (denominator last) -> [..., V] in dtype."""
    return (numerator[..., :-1] / numerator[..., -1:]).astype(dtype)


def _previous_tokens(x: Array, count: int, sequence_axis: str | None) -> tuple[Array, Array | int]:
    """The `count` tokens before this segment of x [B, T, ...] — zeros at the start of the sequence, else the tail
    of the previous device's segment (one ppermute along `sequence_axis`) — and the absolute position of x's first
    token."""
    if sequence_axis is None:
        return jnp.zeros((x.shape[0], count, *x.shape[2:]), x.dtype), 0
    return previous_segment_tail(x, count, sequence_axis), jax.lax.axis_index(sequence_axis) * x.shape[1]


def _band_masks(q_pos: Array, k_pos: Array, window: int, kind: str, packed: tuple[Array, ...] | None):
    """in_window, in_band [(B,) N, 1, W, R + W] for query positions [N, W] and key positions [N, R + W] (absolute);
    packed: (query positions, query ids [B, N, W], key positions, key ids [B, N, R + W]) within documents."""
    window_keys, band_keys = window_mask(window, kind), masks.Causal(window_reach(window, kind))
    if packed is None:
        return (masks.pairwise(window_keys, q_pos, k_pos)[None, :, None],
                masks.pairwise(band_keys, q_pos, k_pos)[None, :, None])  # fmt: skip
    q_pos, q_ids, k_pos, k_ids = packed
    same = dict(segments=(q_ids, k_ids))
    in_window = masks.pairwise(window_keys & masks.Document(), q_pos, k_pos, **same)
    return in_window[:, :, None], masks.pairwise(band_keys & masks.Document(), q_pos, k_pos, **same)[:, :, None]


def _band_numerator(q, phi_q, keys, start, window_factor, linear_factor, window, kind, scale,
                    packed: tuple[Array, Array, Array, Array] | None = None) -> Array:  # fmt: skip
    """Σ over the band of band_weights · [v, 1], in dense blocks of `window` queries: [B, T, H, V + 1] float32.

    q: [B, T, H, D], phi_q: [B, T, H, F]; keys: [B, R + T, H, D + F + V + 1], the concatenated k | φk | [v, 1] of
    the R tokens before the segment and of the segment; start: absolute position of q's first token. packed:
    (positions, ids [B, T] of the queries; positions, ids [B, R + T] of the keys) of packed rows, or None.
    """
    batch, length, heads, dim = q.shape
    reach = window_reach(window, kind)
    back = reach // window
    num_blocks = -(-length // window)
    pad = num_blocks * window - length
    blocks = jnp.pad(jnp.concatenate([q, phi_q], -1), [(0, 0), (0, pad), (0, 0), (0, 0)])
    blocks = blocks.reshape(batch, num_blocks, window, heads, -1)  # [B, N, W, H, D + F]
    slabs = key_slabs(jnp.pad(keys, [(0, 0), (0, pad), (0, 0), (0, 0)]), num_blocks, window, back)
    scores = jnp.einsum("bnqhd,bnkhd->bnhqk", blocks[..., :dim], slabs[..., :dim]) * scale
    offsets = jnp.arange(num_blocks)[:, None] * window
    q_pos = start + offsets + jnp.arange(window)  # [N, W]
    k_pos = start - reach + offsets + jnp.arange(reach + window)  # [N, R + W]
    if packed is not None:  # the same blocks and slabs of the rows' positions and ids
        query_rows = [jnp.pad(x, [(0, 0), (0, pad)]).reshape(batch, num_blocks, window) for x in packed[:2]]
        late = 2**30  # the padding keys' position: after every query, so no causal mask shows them
        key_rows = [key_slabs(jnp.pad(x, [(0, 0), (0, pad)], constant_values=fill)[..., None, None], num_blocks,
                               window, back)[..., 0, 0] for x, fill in zip(packed[2:], (late, 0))]  # fmt: skip
        packed = (*query_rows, *key_rows)
    in_window, in_band = _band_masks(q_pos, k_pos, window, kind, packed)  # [(B,) N, 1, W, R + W]
    features = phi_q.shape[-1]
    phi_scores = None
    if kind == "tk":  # the band reaches past the window only for tk
        phi_scores = jnp.einsum("bnqhf,bnkhf->bnhqk", blocks[..., dim:], slabs[..., dim : dim + features])
    weights = band_weights(scores, phi_scores, in_window, in_band, window_factor, linear_factor)
    numerator = jnp.einsum("bnhqk,bnkhv->bnqhv", weights, slabs[..., dim + features :])
    return numerator.reshape(batch, num_blocks * window, heads, -1)[:, :length]


def lolcats_attn(
    q: Array,
    k: Array,
    v: Array,
    phi_q: Array,
    phi_k: Array,
    window_factor: Array | float,
    *,
    linear_factor: Array | float = 1.0,
    window: int = 64,
    kind: str = "tk",
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    positions: Array | None = None,
) -> tuple[Array, Array | None]:
    """LoLCATs' window + linear hybrid attention (see the module docstring).

    q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, V] (Hkv divides H); phi_q, phi_k: [B, T, H, F];
    window_factor γ and linear_factor λ: scalars or [H] (γ > 0). impl / chunk_size pick the engine form of the
    linear part. initial_state: [B, H, F, V + 1] float32, the linear state (S | z) of earlier tokens, all outside
    every window (a decode cache's state; the sequence's positions still start at 0).
    Returns o [B, T, H, V] (dtype of v) and, if output_final_state, the linear state [B, H, F, V + 1] of every
    token that has left the band of the next position T: tokens before T − R, plus initial_state.
    sequence_axis: a mesh axis name; the inputs are then this device's segment [B, T_local, ...] of a sequence split
    contiguously along it (inside ``jax.shard_map``, T_local >= R): the band's first keys come from the previous
    device by one ppermute, the linear part runs as `linear_attn`'s sequence-parallel form, and positions (hence
    the "tk" blocks) are absolute.
    segment_ids [B, T] int and positions [B, T] (within each document; None: computed from the ids): packed
    documents (module docstring); initial_state then belongs to each row's first document.
    """
    _check_args(q, k, v, phi_q, phi_k, window_factor, linear_factor, window, kind)
    _common.check_form(impl, chunk_size)
    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    scale = dim**-0.5 if scale is None else scale
    gamma, lam = _per_head(window_factor, heads), _per_head(linear_factor, heads)
    reach = window_reach(window, kind)
    phi_q32 = phi_q.astype(jnp.float32)
    keys = jnp.concatenate(
        [repeat_heads(k, heads).astype(jnp.float32), phi_k.astype(jnp.float32), _common.with_ones(repeat_heads(v, heads))], -1
    )  # [B, T, H, D + F + V + 1]
    before, start = _previous_tokens(keys, reach, sequence_axis)
    keys = jnp.concatenate([before, keys], axis=1)  # token t of the segment at index R + t
    packed = None if segment_ids is None else _packed_keys(segment_ids, positions, reach, sequence_axis)
    band = _band_numerator(q.astype(jnp.float32), phi_q32, keys, start, gamma, lam, window, kind, scale, packed)
    delayed = keys[:, :length, :, dim:]  # φk | [v, 1] of token t − R at index t
    if packed is not None:  # a delayed key counts only in its own document
        delayed = jnp.where((packed[3][:, :length] == packed[1])[:, :, None, None], delayed, 0.0)
    features = phi_q.shape[-1]
    earlier, state = linear_attn(
        phi_q32, delayed[..., :features], delayed[..., features:], scale=1.0, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids,
    )  # fmt: skip
    return _normalise(band + lam[:, 0] * earlier, v.dtype), state


def _packed_keys(segment_ids: Array, positions: Array | None, reach: int,
                 sequence_axis: str | None) -> tuple[Array, Array, Array, Array]:  # fmt: skip
    """(positions, ids [B, T] of the queries; positions, ids [B, R + T] of the keys, the R tokens before the segment
    first: the previous device's, or position -1 and id -1 at the start of the row)."""
    segment_ids = documents.check_segment_ids(segment_ids, *jnp.shape(segment_ids)[:2])
    if positions is None:
        positions = documents.positions_in_document(segment_ids, sequence_axis)
    positions = jnp.asarray(positions, jnp.int32)
    if positions.shape != segment_ids.shape:
        raise ValueError(f"positions must have the shape of segment_ids {segment_ids.shape}, got {positions.shape}")
    nothing = jnp.full((segment_ids.shape[0], reach), -1, jnp.int32)
    before = [nothing, nothing]
    if sequence_axis is not None:
        first = jax.lax.axis_index(sequence_axis) == 0
        before = [jnp.where(first, -1, previous_segment_tail(x, reach, sequence_axis)) for x in (positions, segment_ids)]
    keys = [jnp.concatenate([b, x], axis=1) for b, x in zip(before, (positions, segment_ids))]
    return positions, segment_ids, keys[0], keys[1]


def lolcats_decode_step(
    q: Array,
    phi_q: Array,
    k_cache: Array,
    v_cache: Array,
    phi_k_cache: Array,
    key_positions: Array,
    query_position: Array | int,
    linear_numerator: Array,
    window_factor: Array | float,
    *,
    linear_factor: Array | float = 1.0,
    window: int = 64,
    kind: str = "tk",
    scale: float | None = None,
) -> Array:
    """One decode step of `lolcats_attn` against a ring buffer holding (at least) the band of the query.

    q: [B, H, D]; phi_q: [B, H, F]; k_cache: [B, L, Hkv, D]; v_cache: [B, L, Hkv, V]; phi_k_cache: [B, L, H, F];
    key_positions: [L] int (−1 = empty slot); linear_numerator: [B, H, V + 1], φq · (S | z) over every token before
    the band (query_position − R and earlier), e.g. the output of a `linear_attn` step from the cached state.
    Returns [B, H, V] in v_cache's dtype.
    """
    if q.ndim != 3 or phi_q.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, phi_q must be [batch, heads, dim] with equal batch and heads, got {q.shape}, {phi_q.shape}")
    if k_cache.ndim != 4 or k_cache.shape[-1] != q.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"k_cache must be [batch, slots, kv_heads, head_dim] matching q {q.shape}, got {k_cache.shape}")
    if v_cache.shape[:3] != k_cache.shape[:3] or phi_k_cache.shape[:2] != k_cache.shape[:2]:
        raise ValueError(f"v_cache and phi_k_cache must match k_cache {k_cache.shape[:2]} in batch and slots, got "
                         f"{v_cache.shape}, {phi_k_cache.shape}")
    if key_positions.shape != (k_cache.shape[1],):
        raise ValueError(f"key_positions must have shape ({k_cache.shape[1]},), got {key_positions.shape}")
    if linear_numerator.shape != (*q.shape[:2], v_cache.shape[-1] + 1):
        raise ValueError(f"linear_numerator must have shape {(*q.shape[:2], v_cache.shape[-1] + 1)}, "
                         f"got {linear_numerator.shape}")
    heads = q.shape[1]
    _check_factors(window_factor, linear_factor, heads)
    _check_window(window, kind)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    gamma, lam = _per_head(window_factor, heads), _per_head(linear_factor, heads)
    keys = repeat_heads(k_cache, heads).astype(jnp.float32)  # [B, L, H, D]
    v1 = _common.with_ones(repeat_heads(v_cache, heads))
    scores = jnp.einsum("bhd,blhd->bhl", q.astype(jnp.float32), keys)[:, :, None] * scale  # [B, H, 1, L]
    phi_scores = None
    if kind == "tk":  # a sliding window's band is the window itself
        phi_scores = jnp.einsum("bhf,blhf->bhl", phi_q.astype(jnp.float32), phi_k_cache.astype(jnp.float32))[:, :, None]
    q_pos = jnp.reshape(jnp.asarray(query_position), (1,))
    in_window = masks.pairwise(window_mask(window, kind), q_pos, key_positions)
    in_band = masks.pairwise(masks.Causal(window_reach(window, kind)), q_pos, key_positions)
    weights = band_weights(scores, phi_scores, in_window, in_band, gamma, lam)[:, :, 0]  # [B, H, L]
    numerator = jnp.einsum("bhl,blhv->bhv", weights, v1) + lam[:, 0] * linear_numerator.astype(jnp.float32)
    return _normalise(numerator, v_cache.dtype)
