"""Every decode cache of the mixers, and the ring-buffer write they share.

A cache is a `flax.struct` dataclass (a pytree), built empty by the mixer's `init_cache(batch, max_len)` and
returned updated by `prefill` and `step`. Every cache holds `pos` [] int32, the number of tokens consumed so far (the
absolute position of the next token); the sequences of a batch decode in lockstep, so one counter serves all.
Positions below are absolute token indices, p = 0 .. pos - 1. KV-cache compression plugs in here: the key/value
caches (`KVCache`, `HybridCache`) say which position every slot holds (`key_positions`), and the ops read only that.

    RecurrentCache  linear-state families: the op's state [B, H, K, V] (+ the short conv's last inputs)
    KVCache         softmax attention: keys/values of the last L positions (L = max_len, or the window's ring)
    CompressedKVCache  softmax attention under a KV-cache policy: keys/values quantised to 8 or 4 bits per group
                    of channels, and/or evicted to attention sinks plus a window of the last positions
    HybridCache     LoLCATs, Liger: a KVCache ring plus the linear state of every position before the ring
    SelectionCache  HiP, SEA: a full KVCache plus the query that opened the current tile
    RoutingCache    Routing Transformer: a full KVCache plus each slot's cluster per routing head
    HiLoCache       HiLo: a KVCache ring of the current block (Hi-Fi) and a full KVCache (Lo-Fi, pooled per block)
    CombinerCache   Combiner: a KVCache ring of the current span, every completed span's abstraction, a query max
    MossFormerCache MossFormer: a KVCache ring of the current chunk, the completed chunks' linear state, the conv
    BlockTransformerCache  Block Transformer: the block decoder's KVCache, a ring of the current block and its prefix
    ConvCache       BaseConv: the short conv's last inputs
    BlockCache      TransNormer DiagAttention: keys/values of the current block
    FlowCache       Flowformer: the flow's prefix sums
    LightNetCache   LightNet: the GLA state and the running logsumexp of the keys
    MultiQueryCache MQSA: a KVCache plus the last inputs of the window-pooled queries
    VQCache         LongVQ: the EMA's state, a KVCache ring of the last 2L quantised keys, per-code value sums
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from seqlab.ops.flow_attn import FlowState


def ring_write(
    buffers: tuple[jax.Array, ...], values: tuple[jax.Array, ...], key_positions: jax.Array, pos: jax.Array,
    pinned: int = 0,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Write the next T tokens (positions pos .. pos+T-1) of each values [B, T, ...] into its ring buffer [B, L, ...]
    at slots p % L (of T > L tokens only the last L land). Returns the buffers and key_positions [L] (the absolute
    position held by each slot, -1 = empty).

    pinned = S > 0 (attention sinks): positions p < S keep slot p for good, and the other L − S slots are a ring of
    the latest positions (slot S + (p − S) % (L − S))."""
    if pinned:
        return _pinned_ring_write(buffers, values, key_positions, pos, pinned)
    length, slots = values[0].shape[1], buffers[0].shape[1]
    kept = min(length, slots)
    written = pos + jnp.arange(length - kept, length, dtype=jnp.int32)
    slot = written % slots
    new = tuple(b.at[:, slot].set(v[:, length - kept :].astype(b.dtype)) for b, v in zip(buffers, values))
    return new, key_positions.at[slot].set(written)


def _pinned_ring_write(buffers, values, key_positions, pos, pinned: int):
    """ring_write with the first `pinned` positions in fixed slots; a position that a later one of the same write
    evicts is dropped (so no slot is written twice)."""
    length, slots = values[0].shape[1], buffers[0].shape[1]
    ring = slots - pinned
    written = pos + jnp.arange(length, dtype=jnp.int32)
    last = pos + length - 1
    kept = (written < pinned) | (written > last - ring)
    slot = jnp.where(written < pinned, written, pinned + (written - pinned) % ring)
    slot = jnp.where(kept, slot, slots)  # out of range: dropped
    new = tuple(b.at[:, slot].set(v.astype(b.dtype), mode="drop") for b, v in zip(buffers, values))
    return new, key_positions.at[slot].set(written, mode="drop")


def quantize(x: jax.Array, bits: int, group: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric round-to-nearest quantisation of x [..., d] per group of `group` channels -> (codes, scales
    [..., d / group] float32): codes int8 in [−127, 127] for 8 bits, or for 4 bits values in [−7, 7] packed two per
    byte (uint8 [..., d / 2]). Dequantised, every element is within scale / 2 = max|group| / (2 · qmax) of x."""
    qmax = 2 ** (bits - 1) - 1
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, group)
    scales = jnp.max(jnp.abs(grouped), axis=-1) / qmax
    codes = jnp.round(grouped / jnp.where(scales > 0, scales, 1.0)[..., None])
    codes = jnp.clip(codes, -qmax, qmax).astype(jnp.int8).reshape(x.shape)
    if bits == 4:
        offset = (codes + 8).astype(jnp.uint8)
        codes = offset[..., 0::2] | (offset[..., 1::2] << 4)
    return codes, scales


def dequantize(codes: jax.Array, scales: jax.Array, bits: int, group: int) -> jax.Array:
    """The float32 values [..., d] of `quantize`'s (codes, scales)."""
    if bits == 4:
        low, high = (codes & 15).astype(jnp.int8) - 8, (codes >> 4).astype(jnp.int8) - 8
        codes = jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1], -1)
    grouped = codes.astype(jnp.float32).reshape(*codes.shape[:-1], -1, group)
    return (grouped * scales[..., None]).reshape(codes.shape)


@struct.dataclass
class RecurrentCache:
    """Decode cache of the linear-recurrent families.

    state: [B, H, K, V] float32, the op's state after positions 0 .. pos-1 (V+1 columns for normalised linear
           attention; the family's docstring gives its layout).
    pos:   [] int32, number of tokens consumed so far.
    conv:  [B, kernel_size - 1, C], the short convolution's inputs at positions pos-K+1 .. pos-1 (zeros before
           position 0), or None if the mixer has none.
    """

    state: jax.Array
    pos: jax.Array
    conv: jax.Array | None = None

    @classmethod
    def empty(cls, state_shape: tuple[int, ...], conv: jax.Array | None = None) -> RecurrentCache:
        """Zero state, position 0, and the given (zero) conv cache."""
        return cls(state=jnp.zeros(state_shape, jnp.float32), pos=jnp.zeros((), jnp.int32), conv=conv)


@struct.dataclass
class KVCache:
    """Keys and values of softmax attention in L slots, position p in slot p % L.

    k, v: [B, L, H_kv, d] keys (post-RoPE) and values. Full attention has L = max_len slots (every position so far;
          decoding past max_len would overwrite the oldest, silently becoming a window of max_len); a sliding
          window has a ring of L = min(window, max_len) slots, the last L positions.
    key_positions: [L] int32, the absolute position held by each slot (-1 = empty).
    pos: [] int32, number of tokens consumed so far.
    """

    k: jax.Array
    v: jax.Array
    key_positions: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any) -> KVCache:
        """L = shape[1] empty slots of keys and values [B, L, H_kv, d], position 0."""
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            key_positions=jnp.full((shape[1],), -1, jnp.int32),
            pos=jnp.zeros((), jnp.int32),
        )

    def write(self, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache after the next T tokens: k, v [B, T, H_kv, d] of positions pos .. pos+T-1 in slots p % L (of
        more than L tokens only the last L land); pos advances by T."""
        (k_new, v_new), key_positions = ring_write((self.k, self.v), (k, v), self.key_positions, self.pos)
        return self.replace(k=k_new, v=v_new, key_positions=key_positions, pos=self.pos + k.shape[1])


@struct.dataclass
class CompressedKVCache:
    """Keys and values of softmax attention under a KV-cache policy (the `KVCache` interface: ``k``, ``v``
    [B, L, H_kv, d] float32 as the decode step reads them, ``key_positions``, ``pos``, ``write``).

    bits = 8 or 4: stored as `quantize` codes with one float32 scale per `group` channels (per slot and head), so a
    key or value is within half its group's scale of the exact one; None: stored as they come. sinks = S > 0: the
    first S positions stay in slots 0 .. S − 1 (attention sinks) and the other L − S slots hold the latest positions
    (StreamingLLM's sinks plus a window); every other position is evicted.
    """

    k_store: jax.Array
    v_store: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    key_positions: jax.Array
    pos: jax.Array
    bits: int | None = struct.field(pytree_node=False, default=None)
    group: int = struct.field(pytree_node=False, default=32)
    sinks: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any, *, bits: int | None, group: int,
              sinks: int) -> CompressedKVCache:
        """L = shape[1] empty slots for keys and values [B, L, H_kv, d], position 0."""
        if bits is None:
            store, scales = jnp.zeros(shape, dtype), None
        else:
            store, scales = quantize(jnp.zeros(shape, jnp.float32), bits, group)
        return cls(k_store=store, v_store=store, k_scales=scales, v_scales=scales,
                   key_positions=jnp.full((shape[1],), -1, jnp.int32), pos=jnp.zeros((), jnp.int32),
                   bits=bits, group=group, sinks=sinks)  # fmt: skip

    @property
    def k(self) -> jax.Array:
        return self.k_store if self.bits is None else dequantize(self.k_store, self.k_scales, self.bits, self.group)

    @property
    def v(self) -> jax.Array:
        return self.v_store if self.bits is None else dequantize(self.v_store, self.v_scales, self.bits, self.group)

    def write(self, k: jax.Array, v: jax.Array) -> CompressedKVCache:
        """The cache after the next T tokens k, v [B, T, H_kv, d] (quantised, then written as the policy says)."""
        if self.bits is None:
            (k_store, v_store), positions = ring_write((self.k_store, self.v_store), (k, v), self.key_positions,
                                                       self.pos, self.sinks)
            return self.replace(k_store=k_store, v_store=v_store, key_positions=positions, pos=self.pos + k.shape[1])
        (kc, ks), (vc, vs) = quantize(k, self.bits, self.group), quantize(v, self.bits, self.group)
        (kc, ks, vc, vs), positions = ring_write((self.k_store, self.k_scales, self.v_store, self.v_scales),
                                                 (kc, ks, vc, vs), self.key_positions, self.pos, self.sinks)
        return self.replace(k_store=kc, k_scales=ks, v_store=vc, v_scales=vs, key_positions=positions,
                            pos=self.pos + k.shape[1])


@struct.dataclass
class HybridCache(KVCache):
    """Decode cache of a window + linear-state hybrid (LoLCATs, Liger): a `KVCache` ring of the last L positions and
    the linear branch's state of every position before the ring.

    k, v, key_positions, pos: as `KVCache` (L slots, position p in slot p % L).
    state: [B, H, K, V] float32, the linear branch's state (the family's docstring says which positions it covers).
    phi_k: [B, L, H, F] float32 feature-mapped keys of the ring's positions (same slots), or None for a mixer that
           needs none.
    """

    state: jax.Array
    phi_k: jax.Array | None = None

    @classmethod
    def empty(
        cls, kv_shape: tuple[int, ...], state_shape: tuple[int, ...], dtype: Any,
        phi_k_shape: tuple[int, ...] | None = None,
    ) -> HybridCache:  # fmt: skip
        """An empty ring of kv_shape [B, L, H_kv, d], a zero state, position 0, and zero φk if phi_k_shape is given."""
        ring = KVCache.empty(kv_shape, dtype)
        return cls(
            k=ring.k, v=ring.v, key_positions=ring.key_positions, pos=ring.pos,
            state=jnp.zeros(state_shape, jnp.float32),
            phi_k=None if phi_k_shape is None else jnp.zeros(phi_k_shape, jnp.float32),
        )  # fmt: skip

    def write(self, k: jax.Array, v: jax.Array, phi_k: jax.Array | None = None) -> HybridCache:
        """The cache after the next T tokens: k, v [B, T, H_kv, d] (and phi_k [B, T, H, F]) of positions pos..pos+T-1
        in slots p % L (of a prompt longer than the ring only the last L land); pos advances by T. The state is
        left to the caller."""
        if phi_k is None:
            return super().write(k, v)
        (k_new, v_new, phi_new), key_positions = ring_write(
            (self.k, self.v, self.phi_k), (k, v, phi_k), self.key_positions, self.pos
        )
        return self.replace(k=k_new, v=v_new, phi_k=phi_new, key_positions=key_positions, pos=self.pos + k.shape[1])


@struct.dataclass
class SelectionCache(KVCache):
    """Decode cache of tile-selecting attention (HiP, SEA): a full `KVCache` (slot p holds position p) and the
    query that opened the current tile of ``block`` positions, with which the tile's key tiles are selected.

    k, v, key_positions, pos: as `KVCache`. opening_query: [B, H, d] the query at position ⌊(pos − 1) / block⌋ ·
    block (zeros before the first token).
    """

    opening_query: jax.Array | None = None

    @classmethod
    def empty(cls, kv_shape: tuple[int, ...], query_shape: tuple[int, ...], dtype: Any) -> SelectionCache:
        """Empty slots of keys and values kv_shape [B, L, H_kv, d], a zero opening query [B, H, d], position 0."""
        kv = KVCache.empty(kv_shape, dtype)
        return cls(k=kv.k, v=kv.v, key_positions=kv.key_positions, pos=kv.pos,
                   opening_query=jnp.zeros(query_shape, dtype))


@struct.dataclass
class RoutingCache(KVCache):
    """Decode cache of the Routing Transformer: a full `KVCache` (slot p holds position p) and the cluster of each
    slot's key for every routing head.

    k, v, key_positions, pos: as `KVCache`. clusters: [B, L, H_r] int32 (0 in empty slots, which are masked).
    """

    clusters: jax.Array | None = None

    def write_routed(self, k: jax.Array, v: jax.Array, clusters: jax.Array) -> RoutingCache:
        """The cache after the next T tokens: k, v [B, T, H, d] and their clusters [B, T, H_r]."""
        (k_new, v_new, c_new), key_positions = ring_write((self.k, self.v, self.clusters), (k, v, clusters),
                                                          self.key_positions, self.pos)
        return self.replace(k=k_new, v=v_new, clusters=c_new, key_positions=key_positions, pos=self.pos + k.shape[1])


@struct.dataclass
class HiLoCache:
    """Decode cache of HiLo attention: the Hi-Fi heads' keys/values of the current block (a `KVCache` ring of b
    slots) and the Lo-Fi heads' keys/values of every position (a full `KVCache` of a multiple of b slots; their
    block means are the pooled keys and values).

    hi, lo: the two `KVCache`s, advancing together; pos: [] int32, number of tokens consumed so far.
    """

    hi: KVCache
    lo: KVCache

    @property
    def pos(self) -> jax.Array:
        return self.hi.pos


@struct.dataclass
class CombinerCache:
    """Decode cache of Combiner (spans of ``span`` positions, span j = [j·span, (j+1)·span)).

    local: a `KVCache` ring of span slots, the keys/values of the current span (position p in slot p % span).
    summary_k, summary_v: [B, n, H_kv, d], slot j: span j's abstraction key and local expectation, written when the
        span completes (n = ⌈max_len / span⌉). span_query: [B, H_kv, d] float32, the running max of the current
        span's queries (over each key/value head's query group). pos: [] int32, number of tokens consumed so far.
    """

    local: KVCache
    summary_k: jax.Array
    summary_v: jax.Array
    span_query: jax.Array

    @property
    def pos(self) -> jax.Array:
        return self.local.pos


@struct.dataclass
class MossFormerCache:
    """Decode cache of MossFormer (chunks of g positions, chunk c = [c·g, (c+1)·g)).

    local: a `KVCache` ring of g slots, the current chunk's keys k = [k_quad | k_lin] [B, g, 1, 2S] and values
        [v | u] [B, g, 1, 2E] (position p in slot p % g; a slot holding an earlier chunk's position is masked).
    state: [B, 1, S, 2E] float32, Σ k_lin [v | u]ᵀ over the completed chunks (the global attention's state).
    conv: [B, K − 1, 2E + S], the depthwise conv's last inputs. pos: [] int32, number of tokens consumed so far.
    """

    local: KVCache
    state: jax.Array
    conv: jax.Array

    @property
    def pos(self) -> jax.Array:
        return self.local.pos


@struct.dataclass
class BlockTransformerCache:
    """Decode cache of the Block Transformer (blocks of L positions).

    blocks: the block decoder's `KVCache` over block embeddings (one slot per block, ⌈max_len / L⌉).
    local: the token decoder's `KVCache` ring of L + 1 slots over the extended sequence (each block's context
        prefix, then its tokens; extended position i·(L + 1) + 1 + r for token r of block i).
    block_inputs: [B, L, D], the inputs of the current block so far (zeros after them). context: [B, D], the block
        decoder's output for the last completed block (the next block's context). pos: [] int32, tokens so far.
    """

    blocks: KVCache
    local: KVCache
    block_inputs: jax.Array
    context: jax.Array
    pos: jax.Array


@struct.dataclass
class ConvCache:
    """conv: [B, k-1, d_model], the short convolution's inputs at positions pos-k+1 .. pos-1 (zeros before position
    0); pos: [] int32 tokens consumed."""

    conv: jax.Array
    pos: jax.Array


@struct.dataclass
class BlockCache:
    """Decode cache of block-local attention (blocks of `block_size` positions, [n·bs, (n+1)·bs)).

    k, v: [B, block_size, H, d] float32, the keys / values of the block of the last token read, position p in slot
    p % block_size; zeros in the slots not written yet. A new block starts over at every position % block_size == 0.
    pos: [] int32, the number of tokens read so far.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array


@struct.dataclass
class FlowCache:
    """prefix: `FlowState` of positions 0 .. pos-1 (float32 prefix sums Σφk, Σφq, Σφk·O, Σφq·I [B, H, d], Σe^{Ô}
    [B, H] and the state S [B, H, d, d]); pos: [] int32 number of tokens consumed."""

    prefix: FlowState
    pos: jax.Array


@struct.dataclass
class LightNetCache:
    """state: [B, H, K, V] float32 GLA state of positions 0 .. pos-1 (K = d_f, or 2 d_f with cosine LRPE);
    z: [B, H, d_f] float32 logsumexp of the keys of positions 0 .. pos-1 (-inf before the first token);
    pos: [] int32 tokens consumed so far."""

    state: jax.Array
    z: jax.Array
    pos: jax.Array


@struct.dataclass
class MultiQueryCache(KVCache):
    """Decode cache of multi-query self-attention (MQSA): a `KVCache` and the query pool's state.

    k, v, key_positions, pos: as `KVCache`. window: [B, L_long − 1, C], the pooling convolution's inputs (the
    queries and a count channel) at positions pos − L_long + 1 .. pos − 1 (zeros before position 0).
    """

    window: jax.Array | None = None


@struct.dataclass
class VQCache:
    """Decode cache of LongVQ (blocks of L positions; n = the block of the last token read).

    ring: a `KVCache` ring of 2L slots, the quantised keys k̂ [B, 2L, H, d] and values [B, 2L, H, d] float32 of the
        last 2L positions (blocks n − 1 and n among them). ema: [B, D, n_ema, 1] float32, the EMA's `ops.gla` state.
    before, previous, current: [B, H, S, d + 1] float32, `ops.code_sums` (per-code value sums and counts) of the
        blocks before n − 1, of block n − 1 and of block n. pos: [] int32, number of tokens consumed so far.
    """

    ring: KVCache
    ema: jax.Array
    before: jax.Array
    previous: jax.Array
    current: jax.Array

    @property
    def pos(self) -> jax.Array:
        return self.ring.pos
