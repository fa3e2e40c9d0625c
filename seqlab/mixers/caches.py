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
    HeavyHitterCache   H2O: sinks, heavy hitters (the highest accumulated attention) and a window of recent positions
    MixedPrecisionKVCache  ZipVL: every position, the important ones at high precision and the rest at int4
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
    PositionCache   Activator (a per-token mixer): the position counter only
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


def _nbytes(*arrays: jax.Array | None) -> int:
    return sum(int(a.nbytes) for a in arrays if a is not None)


def _encode(x: jax.Array, bits: int | None, group: int, dtype: Any) -> tuple[jax.Array, jax.Array | None]:
    """x [..., d] as stored: (x in dtype, None) for bits None, else `quantize`'s (codes, scales)."""
    return (x.astype(dtype), None) if bits is None else quantize(x, bits, group)


def _decode(store: jax.Array, scales: jax.Array | None, bits: int | None, group: int) -> jax.Array:
    """The values [..., d] of `_encode`'s (store, scales)."""
    return store if bits is None else dequantize(store, scales, bits, group)


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
        store, scales = _encode(jnp.zeros(shape, jnp.float32), bits, group, dtype)
        return cls(k_store=store, v_store=store, k_scales=scales, v_scales=scales,
                   key_positions=jnp.full((shape[1],), -1, jnp.int32), pos=jnp.zeros((), jnp.int32),
                   bits=bits, group=group, sinks=sinks)  # fmt: skip

    @property
    def k(self) -> jax.Array:
        return _decode(self.k_store, self.k_scales, self.bits, self.group)

    @property
    def v(self) -> jax.Array:
        return _decode(self.v_store, self.v_scales, self.bits, self.group)

    def stored_bytes(self) -> int:
        """Bytes of the keys, values and scales of every slot (positions and the counter left out)."""
        return _nbytes(self.k_store, self.v_store, self.k_scales, self.v_scales)

    def write(self, k: jax.Array, v: jax.Array) -> CompressedKVCache:
        """The cache after the next T tokens k, v [B, T, H_kv, d] (quantised, then written as the policy says)."""
        (kc, ks), (vc, vs) = (_encode(x, self.bits, self.group, self.k_store.dtype) for x in (k, v))
        names = ("k_store", "v_store") if self.bits is None else ("k_store", "k_scales", "v_store", "v_scales")
        values = {"k_store": kc, "k_scales": ks, "v_store": vc, "v_scales": vs}
        buffers, positions = ring_write(tuple(getattr(self, n) for n in names), tuple(values[n] for n in names),
                                        self.key_positions, self.pos, self.sinks)
        return self.replace(**dict(zip(names, buffers)), key_positions=positions, pos=self.pos + k.shape[1])


@struct.dataclass
class HeavyHitterCache:
    """Keys and values of softmax attention under heavy-hitter eviction, from "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models" (Zhang et al., 2023), with StreamingLLM's attention sinks.

    Per batch row and key/value head, L = S + M + W slots (sinks, heavy hitters, window): slots 0 .. S − 1 hold
    positions 0 .. S − 1 for good; slots S .. S + M − 1 the heavy hitters; slots S + M .. L − 1 a ring of the last W
    positions (position p >= S in slot S + M + (p − S) % W). Each slot's score is its token's accumulated attention:
    the sum, over the steps since the token arrived and over the query heads sharing the key/value head, of the
    softmax weight it received (`accumulate`). The next token p (`insert`) pushes p − W out of the window (if
    p − W >= S): that token takes the heavy slot of the lowest score if its own score is higher (an empty heavy slot
    scores −inf; ties keep the heavy hitter, and among equal lowest the first slot goes), evicting the heavy hitter
    there, else it is evicted itself. So after p + 1 tokens the cache holds min(p + 1, L) positions: the sinks, the
    last W and M others, each of which beat the lowest heavy hitter when it left the window.

    k_store, v_store: [B, L, H_kv, d] as they come (bits None) or `quantize` codes with k_scales, v_scales
    [B, L, H_kv, d / group] float32 (else None). slot_positions: [B, L, H_kv] int32, the absolute position in each
    slot (−1 = empty). scores: [B, L, H_kv] float32 (0 in empty slots). pos: [] int32, tokens consumed so far.
    """

    k_store: jax.Array
    v_store: jax.Array
    k_scales: jax.Array | None
    v_scales: jax.Array | None
    slot_positions: jax.Array
    scores: jax.Array
    pos: jax.Array
    bits: int | None = struct.field(pytree_node=False, default=None)
    group: int = struct.field(pytree_node=False, default=32)
    sinks: int = struct.field(pytree_node=False, default=0)
    heavy: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any, *, bits: int | None, group: int, sinks: int, heavy: int,
              window: int) -> HeavyHitterCache:
        """L = shape[1] = sinks + heavy + window empty slots for keys and values [B, L, H_kv, d], position 0."""
        if shape[1] != sinks + heavy + window:
            raise ValueError(f"shape: {shape[1]} slots, but sinks + heavy + window = {sinks + heavy + window}")
        store, scales = _encode(jnp.zeros(shape, jnp.float32), bits, group, dtype)
        return cls(k_store=store, v_store=store, k_scales=scales, v_scales=scales,
                   slot_positions=jnp.full(shape[:3], -1, jnp.int32), scores=jnp.zeros(shape[:3], jnp.float32),
                   pos=jnp.zeros((), jnp.int32), bits=bits, group=group, sinks=sinks, heavy=heavy, window=window)

    @property
    def k(self) -> jax.Array:
        """[B, L, H_kv, d] the stored keys (dequantised)."""
        return _decode(self.k_store, self.k_scales, self.bits, self.group)

    @property
    def v(self) -> jax.Array:
        """[B, L, H_kv, d] the stored values (dequantised)."""
        return _decode(self.v_store, self.v_scales, self.bits, self.group)

    def stored_bytes(self) -> int:
        """Bytes of the keys, values, scales, slot positions and scores of every slot (the counter left out)."""
        return _nbytes(self.k_store, self.v_store, self.k_scales, self.v_scales, self.slot_positions, self.scores)

    def _stores(self) -> dict[str, jax.Array]:
        names = ("k_store", "v_store") if self.bits is None else ("k_store", "k_scales", "v_store", "v_scales")
        return {name: getattr(self, name) for name in names}

    def window_slot(self, p: jax.Array) -> jax.Array:
        """[] int32: the slot of position p, its sink slot or its place in the window's ring."""
        s = self.sinks
        return jnp.where(p < s, p, s + self.heavy + (p - s) % self.window).astype(jnp.int32)

    def promotion(self, slot: jax.Array) -> jax.Array:
        """[B, L, H_kv] bool: the heavy slot that the token in `slot` (leaving the window) takes, per batch row and
        key/value head; all False where it is evicted instead (or the slot is empty, or there are no heavy slots)."""
        s, m = self.sinks, self.heavy
        leaving, leaving_score = self.slot_positions[:, slot], self.scores[:, slot]  # [B, H_kv]
        heavy_scores = jnp.where(self.slot_positions[:, s : s + m] >= 0, self.scores[:, s : s + m], -jnp.inf)
        lowest = jnp.argmin(heavy_scores, axis=1)  # [B, H_kv], the first of equal lowest
        beats = (leaving >= 0) & (leaving_score > jnp.min(heavy_scores, axis=1))
        target = jnp.where(beats, s + lowest, -1)
        return jnp.arange(self.slot_positions.shape[1])[None, :, None] == target[:, None, :]

    def insert(self, k: jax.Array, v: jax.Array) -> HeavyHitterCache:
        """The cache after the next token k, v [B, H_kv, d] (at position pos): the token leaving the window is
        promoted or evicted (class docstring), then the new one takes its slot with score 0; pos advances by 1."""
        slot = self.window_slot(self.pos)
        stores, positions, scores = self._stores(), self.slot_positions, self.scores
        if self.heavy:
            moved = self.promotion(slot)
            stores = {n: jnp.where(moved[..., None], a[:, slot][:, None], a) for n, a in stores.items()}
            positions = jnp.where(moved, positions[:, slot][:, None], positions)
            scores = jnp.where(moved, scores[:, slot][:, None], scores)
        (kc, ks), (vc, vs) = (_encode(x, self.bits, self.group, self.k_store.dtype) for x in (k, v))
        new = {"k_store": kc, "k_scales": ks, "v_store": vc, "v_scales": vs}
        stores = {n: a.at[:, slot].set(new[n].astype(a.dtype)) for n, a in stores.items()}
        return self.replace(**stores, slot_positions=positions.at[:, slot].set(self.pos),
                            scores=scores.at[:, slot].set(0.0), pos=self.pos + 1)

    def accumulate(self, weights: jax.Array) -> HeavyHitterCache:
        """The cache with this step's attention weights [B, H_kv, L] float32 (summed over the query heads of each
        key/value head; 0 at empty slots) added to the slots' scores."""
        return self.replace(scores=self.scores + jnp.swapaxes(weights, 1, 2).astype(jnp.float32))


def important_tokens(mass: jax.Array, count: jax.Array, fraction: float) -> jax.Array:
    """ZipVL's important tokens ("ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification
    and KV Cache Compression") of each row of mass [..., n] -> [..., n] bool.

    mass: each token's accumulated attention (summed over queries and heads); count [..., n]: how many
    (query, head) pairs saw it. The ratio: p = min{p : the p largest masses sum to >= fraction · the total}. The
    tokens: the p of highest normalised score mass / count (ties: the earlier token), as ZipVL selects them (the
    normalisation undoes the causal mask's bias towards early tokens, which more queries see); a token no query saw
    is never important, and a row of zero mass has none."""
    ordered = -jnp.sort(-mass, axis=-1)
    cumulative = jnp.cumsum(ordered, axis=-1)
    total = cumulative[..., -1:]  # the same summation order as the prefixes: fraction 1 stops at the last token
    p = jnp.sum(cumulative < fraction * total, axis=-1, keepdims=True) + 1
    p = jnp.where(total > 0, p, 0)
    normalised = jnp.where(count > 0, mass / jnp.maximum(count, 1).astype(mass.dtype), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-normalised, axis=-1, stable=True), axis=-1, stable=True)
    return (rank < p) & (count > 0)


@struct.dataclass
class MixedPrecisionKVCache:
    """Keys and values of softmax attention at mixed precision, after "ZipVL: Efficient Large Vision-Language Models
    with Dynamic Token Sparsification and KV Cache Compression" (He et al., 2024): every position is kept (L slots,
    position p in slot p % L, as `KVCache`), each slot of each key/value head at high precision (as it comes for
    bits None, or int8 codes for bits=8) or at int4 (`quantize`, groups of `group` channels), as ``high`` says.

    The prompt's tokens are marked by `mark` (ZipVL's rule, `important_tokens`, on the prompt's attention); every
    token written after it, and every empty slot (which a decoded token will fill), is high precision. ``k``, ``v``
    dequantise each slot from the precision it is marked with. This dense layout holds both precisions of every slot
    (so a mark can be recomputed); `stored_bytes` counts what the policy keeps: each slot at its one precision, plus
    the mask.

    hi_k, hi_v: [B, L, H_kv, d] (or int8 codes) with hi_k_scales, hi_v_scales [B, L, H_kv, d / group] float32 for
    bits=8 (else None). lo_k, lo_v: int4 codes [B, L, H_kv, d / 2] uint8 with lo_k_scales, lo_v_scales
    [B, L, H_kv, d / group] float32. high: [B, L, H_kv] bool. key_positions: [L] int32 (−1 = empty). pos: [] int32.
    """

    hi_k: jax.Array
    hi_v: jax.Array
    hi_k_scales: jax.Array | None
    hi_v_scales: jax.Array | None
    lo_k: jax.Array
    lo_v: jax.Array
    lo_k_scales: jax.Array
    lo_v_scales: jax.Array
    high: jax.Array
    key_positions: jax.Array
    pos: jax.Array
    bits: int | None = struct.field(pytree_node=False, default=None)
    group: int = struct.field(pytree_node=False, default=32)

    LOW_BITS = 4

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: Any, *, bits: int | None, group: int) -> MixedPrecisionKVCache:
        """L = shape[1] empty slots for keys and values [B, L, H_kv, d] (all marked high), position 0."""
        zeros = jnp.zeros(shape, jnp.float32)
        hi, hi_scales = _encode(zeros, bits, group, dtype)
        lo, lo_scales = quantize(zeros, cls.LOW_BITS, group)
        return cls(hi_k=hi, hi_v=hi, hi_k_scales=hi_scales, hi_v_scales=hi_scales, lo_k=lo, lo_v=lo,
                   lo_k_scales=lo_scales, lo_v_scales=lo_scales, high=jnp.ones(shape[:3], bool),
                   key_positions=jnp.full((shape[1],), -1, jnp.int32), pos=jnp.zeros((), jnp.int32), bits=bits,
                   group=group)  # fmt: skip

    def _read(self, hi: jax.Array, hi_scales: jax.Array | None, lo: jax.Array, lo_scales: jax.Array) -> jax.Array:
        high = _decode(hi, hi_scales, self.bits, self.group).astype(jnp.float32)
        low = dequantize(lo, lo_scales, self.LOW_BITS, self.group)
        return jnp.where(self.high[..., None], high, low)

    @property
    def k(self) -> jax.Array:
        """[B, L, H_kv, d] float32, each slot dequantised from its precision."""
        return self._read(self.hi_k, self.hi_k_scales, self.lo_k, self.lo_k_scales)

    @property
    def v(self) -> jax.Array:
        """[B, L, H_kv, d] float32, each slot dequantised from its precision."""
        return self._read(self.hi_v, self.hi_v_scales, self.lo_v, self.lo_v_scales)

    def slot_bytes(self) -> tuple[int, int]:
        """(bytes of one slot and key/value head at high precision, at int4): its key and value with their scales."""
        heads = self.high.size
        high = _nbytes(self.hi_k, self.hi_v, self.hi_k_scales, self.hi_v_scales) // heads
        return high, _nbytes(self.lo_k, self.lo_v, self.lo_k_scales, self.lo_v_scales) // heads

    def stored_bytes(self) -> int:
        """Bytes the policy keeps: each slot and key/value head at its marked precision, plus the mask (1 byte
        each). Reads the mask: call it outside jit."""
        high, low = self.slot_bytes()
        n_high = int(jnp.sum(self.high))
        return n_high * high + (self.high.size - n_high) * low + int(self.high.nbytes)

    def write(self, k: jax.Array, v: jax.Array) -> MixedPrecisionKVCache:
        """The cache after the next T tokens k, v [B, T, H_kv, d], in both precisions and marked high; pos advances
        by T (a prompt's tokens are then marked by `mark`)."""
        (hk, hks), (hv, hvs) = (_encode(x, self.bits, self.group, self.hi_k.dtype) for x in (k, v))
        (lk, lks), (lv, lvs) = (quantize(x, self.LOW_BITS, self.group) for x in (k, v))
        names = ["hi_k", "hi_v", "lo_k", "lo_v", "lo_k_scales", "lo_v_scales", "high"]
        values = [hk, hv, lk, lv, lks, lvs, jnp.ones(k.shape[:3], bool)]
        if self.bits is not None:
            names, values = names + ["hi_k_scales", "hi_v_scales"], values + [hks, hvs]
        buffers, positions = ring_write(tuple(getattr(self, n) for n in names), tuple(values), self.key_positions,
                                        self.pos)
        return self.replace(**dict(zip(names, buffers)), key_positions=positions, pos=self.pos + k.shape[1])

    def mark(self, important: jax.Array) -> MixedPrecisionKVCache:
        """The cache with the last T written positions (pos − T .. pos − 1, T <= L) marked by important
        [B, T, H_kv] bool: True keeps a slot at high precision, False reads it at int4."""
        slots = (self.pos - important.shape[1] + jnp.arange(important.shape[1])) % self.high.shape[1]
        return self.replace(high=self.high.at[:, slots].set(important))


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


@struct.dataclass
class PositionCache:
    """Decode cache of a per-token mixer (Activator): pos [] int32, the tokens consumed; nothing else is needed."""

    pos: jax.Array
