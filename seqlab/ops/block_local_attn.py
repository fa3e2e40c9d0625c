"""Block-local attention — TransNormer's DiagAttention ("The Devil in Linear Transformer", Qin et al., 2022).

The sequence is cut into non-overlapping blocks of C = ``block_size`` tokens (the last one zero-padded); a query
attends causally to the keys of its own block and to nothing outside it (a block-diagonal causal mask):

    logits_ts = scale · q_t · k_s                          for block(s) = block(t), s <= t
    "softmax":  o_t = Σ_s softmax_s(logits_ts) v_s          (float32, max-subtracted)
    "relu":     o_t = Σ_s relu(logits_ts) v_s               (unnormalised)

scale defaults to K^-1/2 (the logits are q·k/√d on the raw q and k). The training form is dense per block (cost
T·C, no T×T scores). Decoding keeps the keys and values of the current block only (at most C of them) and starts
over at every block boundary (position % C == 0): ``block_local_attn_cached`` continues from such a cache, one
token or a prompt at a time.

Packed rows (``positions`` [B, T], each token's position within its document): blocks restart with every
document, so a query sees the keys from its block's start within its document, i - (p_i mod C) <= s <= i. That
window reaches at most C - 1 tokens back, so each block of C queries reads the slab of 2C keys that ends with it
(on a sequence split over devices, the first slab starts with the previous device's last C tokens).

The mask is ``seqlab.core.masks.BlockDiagonal(C)`` (its element predicate on positions within a block, through
``masks.pairwise``) and masked logits take ``masks.MASKED`` before exponentiation; the blocks are dense, so the
mask's tile map and visit lists (the blockwise attention's fast path) are not needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.core import masks
from seqlab.core.halo import key_slabs, previous_segment_tail

Array = jax.Array
__all__ = ["block_local_attn"]

WEIGHTS = ("softmax", "relu")


def _check(q: Array, k: Array, v: Array, block_size: int, weights: str, scale: float | None) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, key_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [batch, time, heads, value_dim] with (batch, time, heads) = {q.shape[:3]}, got {v.shape}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale must be None or a number, got {scale!r}")


def attention_weights(logits: Array, visible: Array, weights: str) -> Array:
    """Weights [..., Tq, Tk] float32 from logits [..., Tq, Tk] (float32) over the visible keys (bool, broadcast):
    a max-subtracted softmax over the visible keys, or relu of the logits; 0 on hidden keys. Every query must see
    at least one key (its own)."""
    if weights == "relu":
        return jnp.where(visible, jax.nn.relu(logits), 0.0)
    logits = masks.masked_fill(logits, visible)
    p = jnp.where(visible, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    return p / jnp.sum(p, axis=-1, keepdims=True)


def block_local_attn(
    q: Array, k: Array, v: Array, *, block_size: int = 64, weights: str = "softmax", scale: float | None = None,
    positions: Array | None = None, sequence_axis: str | None = None,
) -> Array:
    """Causal attention inside non-overlapping blocks of ``block_size`` tokens.

    q, k: [B, T, H, K]; v: [B, T, H, V] (T need not be a multiple of block_size). weights: "softmax" or "relu".
    positions: [B, T] int, each token's position within its document (packed rows: blocks restart per document;
    module docstring), or None; ``sequence_axis``: the mesh axis of a split sequence (with positions only).
    Returns o [B, T, H, V] in v's dtype.
    """
    _check(q, k, v, block_size, weights, scale)
    b, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if positions is not None:
        if jnp.shape(positions) != (b, t):
            raise ValueError(f"positions must be [batch, time] {(b, t)}, got {jnp.shape(positions)}")
        return _document_blocks(q, k, v, positions, block_size, weights, scale, sequence_axis)
    num_blocks = -(-t // block_size)
    pad = [(0, 0), (0, num_blocks * block_size - t), (0, 0), (0, 0)]

    def blocks(x: Array) -> Array:  # [B, T, H, D] -> [B, N, C, H, D] float32
        x = jnp.pad(x.astype(jnp.float32), pad)
        return x.reshape(b, num_blocks, block_size, h, x.shape[-1])

    logits = jnp.einsum("bnihk,bnjhk->bnhij", blocks(q) * scale, blocks(k))
    pos = jnp.arange(block_size)
    w = attention_weights(logits, masks.pairwise(masks.BlockDiagonal(block_size), pos, pos), weights)
    o = jnp.einsum("bnhij,bnjhv->bnihv", w, blocks(v))
    return o.reshape(b, num_blocks * block_size, h, v.shape[-1])[:, :t].astype(v.dtype)


def _document_blocks(q: Array, k: Array, v: Array, positions: Array, block_size: int, weights: str, scale: float,
                     sequence_axis: str | None) -> Array:  # fmt: skip
    """Block-local attention with blocks aligned to each document's start (positions [B, T] within documents):
    every block of C queries against the 2C keys that end with it, masked to i - (p_i mod C) <= s <= i."""
    b, t, h, d = q.shape
    c = block_size
    n = -(-t // c)
    pad = n * c - t

    def with_before(x: Array) -> Array:  # [B, C + N·C, H, D] float32: C tokens before the segment, x, padding
        x = x.astype(jnp.float32)
        before = jnp.zeros((b, c) + x.shape[2:], jnp.float32)
        if sequence_axis is not None:
            before = previous_segment_tail(x, c, sequence_axis)
        return jnp.concatenate([before, x, jnp.zeros((b, pad) + x.shape[2:], jnp.float32)], axis=1)

    def slabs(x: Array) -> Array:  # [B, N, 2C, H, D]: block n's keys, tokens n·C - C .. n·C + C
        return key_slabs(with_before(x), n, c, back=1)

    queries = jnp.pad(q.astype(jnp.float32), [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, n, c, h, d)
    logits = jnp.einsum("bnihk,bnjhk->bnhij", queries * scale, slabs(k))
    query_index = jnp.arange(c)[:, None] + c  # a query's index in its slab
    back = jnp.pad(positions, [(0, 0), (0, pad)]).reshape(b, n, 1, c, 1) % c  # p_i mod C
    key_index = jnp.arange(2 * c)[None, :]
    visible = (key_index <= query_index) & (key_index >= query_index - back)  # [B, N, 1, C, 2C]
    w = attention_weights(logits, visible, weights)
    o = jnp.einsum("bnhij,bnjhv->bnihv", w, slabs(v))
    return o.reshape(b, n * c, h, v.shape[-1])[:, :t].astype(v.dtype)


def block_local_attn_cached(
    q: Array,
    k: Array,
    v: Array,
    k_block: Array,
    v_block: Array,
    pos: Array | int,
    *,
    weights: str = "softmax",
    scale: float | None = None,
) -> tuple[Array, Array, Array]:
    """Block-local attention of T new tokens continuing from the cache of the current block (decode / prefill).

    q, k: [B, T, H, K]; v: [B, T, H, V]: the tokens at positions pos .. pos + T - 1.
    k_block: [B, C, H, K], v_block: [B, C, H, V] float32 (C = block_size): slot s holds the key / value of position
    (pos - 1) - (pos - 1) % C + s, the block of the last token read, for the slots written so far, and zeros in the
    others (a fresh cache is all zeros with pos = 0). pos: [] int, the number of tokens read before q.
    Returns o [B, T, H, V] (v's dtype) and the blocks after the T tokens (same layout, so the cached blocks do not
    depend on how the tokens were split into calls).

    T = 1 is one decode step against the C slots (a new block first clears them); T > 1 places the tokens after the
    current block's cached ones in a block-aligned frame and runs ``block_local_attn`` on it.
    """
    _check(q, k, v, k_block.shape[1], weights, scale)
    if k_block.shape != (*k.shape[:1], k_block.shape[1], *k.shape[2:]) or v_block.shape != (
        *v.shape[:1], k_block.shape[1], *v.shape[2:]
    ):  # fmt: skip
        raise ValueError(
            f"k_block, v_block must be [batch, block_size, heads, dim] matching k {k.shape} and v {v.shape}, "
            f"got {k_block.shape} and {v_block.shape}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_size = k_block.shape[1]
    offset = jnp.asarray(pos, jnp.int32) % block_size  # slot of the first new token
    fresh = offset == 0  # the first new token opens a block: the cached one is over
    k_block = jnp.where(fresh, 0.0, k_block)
    v_block = jnp.where(fresh, 0.0, v_block)
    if q.shape[1] == 1:
        return _decode_step(q, k, v, k_block, v_block, offset, weights, scale)
    return _prefill(q, k, v, k_block, v_block, offset, weights, scale)


def _decode_step(q, k, v, k_block, v_block, slot, weights, scale):
    """One token at block slot `slot` against the C cached slots (those after `slot` are not visible)."""
    k_block = k_block.at[:, slot].set(k[:, 0].astype(jnp.float32))
    v_block = v_block.at[:, slot].set(v[:, 0].astype(jnp.float32))
    logits = jnp.einsum("bhk,bshk->bhs", q[:, 0].astype(jnp.float32) * scale, k_block)
    slots = jnp.arange(k_block.shape[1])
    w = attention_weights(logits, masks.BlockDiagonal(k_block.shape[1]).visible(slot, slots), weights)
    o = jnp.einsum("bhs,bshv->bhv", w, v_block)
    return o[:, None].astype(v.dtype), k_block, v_block


def _prefill(q, k, v, k_block, v_block, offset, weights, scale):
    """T tokens in a frame of T + 2C slots that starts at the current block: the cached slots, then the new tokens
    from slot `offset` on, then zeros. Frame index f is position (block start + f), so the frame's blocks are the
    sequence's blocks; the keys after the last new token are in the future of every query."""
    b, t, h, _ = q.shape
    block_size = k_block.shape[1]

    def frame(x: Array, cached: Array | None) -> Array:
        base = jnp.zeros((b, t + 2 * block_size, h, x.shape[-1]), jnp.float32)
        if cached is not None:
            base = base.at[:, :block_size].set(cached)
        return jax.lax.dynamic_update_slice_in_dim(base, x.astype(jnp.float32), offset, axis=1)

    k_frame, v_frame = frame(k, k_block), frame(v, v_block)
    o = block_local_attn(frame(q, None), k_frame, v_frame, block_size=block_size, weights=weights, scale=scale)
    o = jax.lax.dynamic_slice_in_dim(o, offset, t, axis=1)
    last_block = (offset + t - 1) // block_size * block_size  # frame index of the block of the last new token
    k_block = jax.lax.dynamic_slice_in_dim(k_frame, last_block, block_size, axis=1)
    v_block = jax.lax.dynamic_slice_in_dim(v_frame, last_block, block_size, axis=1)
    return o.astype(v.dtype), k_block, v_block
