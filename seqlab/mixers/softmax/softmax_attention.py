"""o_t = sum_{s <= t, t - s < window} softmax_s(q_t . k_s / sqrt(d)) v_s  (causal softmax attention).

Papers: "Attention Is All You Need" (Vaswani et al., 2017); rotary positions from "RoFormer: Enhanced Transformer
with Rotary Position Embedding" (Su et al., 2021); grouped-query attention from "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints" (Ainslie et al., 2023); sliding windows as in
"Longformer: The Long-Document Transformer" (Beltagy et al., 2020) and Based's local layers.

Layer: q = RoPE(x W_q), k = RoPE(x W_k) with num_kv_heads (GQA) heads, v = x W_v, op `softmax_attn`, then W_o.
A window w means query t sees keys t-w < s <= t (w keys, itself included; Based's "previous 128 + itself" is
window=129).

On a sequence split over devices (`shard_sequence`), keys and values travel by all-gather (default) or around a
ring (`sequence_parallel="ring"`); a sliding window exchanges only a halo of window-1 keys with the previous device.

Decode cache (`KVCache`): keys/values [B, L, H_kv, d] with absolute `key_positions` [L] (-1 = empty) and the
position counter. A token at position p is written to slot p % L. Full attention uses L = max_len (decoding past
max_len would overwrite the oldest slots, i.e. silently turn into a window of max_len; keep p < max_len). Sliding
window attention uses a ring buffer of L = min(window, max_len) slots, so its cache never grows.

Prefill (a T > 1 prompt into a fresh cache) runs the training path over the prompt and writes the keys and values
of its last min(T, L) tokens to their slots; a full-attention prompt must fit the cache (T <= max_len).

KV-cache policies (inference only; training and the prompt's own outputs are unchanged), in a `CompressedKVCache`:
kv_bits = 8 or 4 stores keys and values quantised per group of kv_group channels (default 32, or the head if
smaller; one float32 scale per group, slot and head; every element within half its scale); kv_window = W keeps
only the first kv_sinks positions (attention sinks) and the last W (StreamingLLM: L = kv_sinks + W slots), so
decoding past them attends to the sinks and the window.

kv_heavy = M > 0 (H2O, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
in a `HeavyHitterCache`; needs kv_window = W, takes kv_sinks = S and kv_bits): L = S + M + W slots per batch row and
key/value head, holding the sinks, the last W positions and M heavy hitters. Every step (the decode step, and each
prompt token: prefill scans the same step over the prompt, so its cache is the token-by-token cache) writes its
token, takes the softmax weights of its query over the cached keys (float32, from the stored — dequantised — keys,
under ``attention_mask``), computes its output from those same weights, and adds them, summed over the query heads
of each key/value head, to each slot's accumulated score. The token leaving the window stays as a heavy hitter iff
its score beats the lowest heavy hitter's, which is then evicted (`HeavyHitterCache`).

kv_important = τ in (0, 1] (ZipVL, "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification
and KV Cache Compression", in a `MixedPrecisionKVCache`; takes kv_bits = 8 or None, not eviction): prefill measures
the prompt's attention (every prompt query over the prompt's keys, under ``attention_mask``), each token's mass
summed over queries and the query heads of its key/value head; per batch row and key/value head p = the fewest tokens
whose masses reach τ of the total, and the p tokens of highest normalised mass (mass / the query heads and queries
that saw it, ZipVL's normalised attention score) are important (`caches.important_tokens`). Important tokens, and
every decoded token, are stored at full precision (kv_bits None) or int8 (kv_bits=8), the others at int4 in groups
of kv_group. The prompt's own outputs are exact (ZipVL's sparse prefill attention is not applied).

Both policies take softmax weights over the cache, so they are refused for a mixer that rewrites its scores
(``score_mod``) or its forward pass, or has a cache of its own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_choice, check_divisible, check_even, check_nonnegative, check_optional_positive_int, \
    check_positive_int
from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.core.online_softmax import masked_softmax
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import CompressedKVCache, HeavyHitterCache, KVCache, MixedPrecisionKVCache, \
    important_tokens
from seqlab.mixers.calibration import hooked_attention
from seqlab.mixers.registry import register
from seqlab.ops.softmax_attn import default_block_size
from seqlab.core.softmax_parallel import MODES as SEQUENCE_PARALLEL_MODES

MASS_CHUNK = 256  # prompt queries per block when ZipVL measures the prompt's attention


@register(
    "softmax",
    kind="softmax",
    paper="Attention Is All You Need",
    examples={"gqa": dict(num_heads=4, num_kv_heads=2, block_size=16)},
)
class SoftmaxAttention(Mixer):
    """Causal multi-head softmax attention with RoPE, GQA and an optional sliding window.

    block_size: the softmax op's query/key block (None: `default_block_size(window)`, 512 or the window rounded
    up to a power of two); it tiles the computation and does not change the result.
    kv_bits, kv_group, kv_sinks, kv_window, kv_heavy, kv_important: the decode cache's policy (module docstring);
    defaults: exact keys and values of every position.
    attention_hook: None, or a rewrite of the dense weights of whole inputs (`seqlab.mixers.calibration`: ACT),
    set after construction.
    """

    takes_documents = True
    attention_hook = None

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window: int | None = None,
        rope: bool = True,
        rope_base: float = 10000.0,
        rope_interleaved: bool = False,
        use_bias: bool = False,
        sequence_parallel: str = "allgather",
        impl: str = "auto",
        block_size: int | None = None,
        kv_bits: int | None = None,
        kv_group: int | None = None,
        kv_sinks: int = 0,
        kv_window: int | None = None,
        kv_heavy: int = 0,
        kv_important: float = 0.0,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_optional_positive_int("window", window)
        check_optional_positive_int("block_size", block_size)
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_choice("sequence_parallel", sequence_parallel, SEQUENCE_PARALLEL_MODES)
        self.block_size = default_block_size(window) if block_size is None else block_size
        self.sequence_parallel = sequence_parallel
        self._attention_projections(
            num_kv_heads=num_kv_heads, head_dim=head_dim, rope=rope, rope_base=rope_base,
            rope_interleaved=rope_interleaved, use_bias=use_bias, rngs=rngs,
        )  # fmt: skip
        self.window = window
        self._set_kv_policy(kv_bits, kv_group, kv_sinks, kv_window)
        self._set_scored_policy(kv_heavy, kv_important)

    def _set_kv_policy(self, bits: int | None, group: int | None, sinks: int, window: int | None) -> None:
        group = min(32, self.head_dim) if group is None else group
        if bits is not None:
            check_choice("kv_bits", bits, (8, 4))
            check_positive_int("kv_group", group)
            if bits == 4:
                check_even("kv_group", group)  # two 4-bit codes per byte
            check_divisible("head_dim", self.head_dim, group, "kv_group")
        check_nonnegative("kv_sinks", sinks)
        check_optional_positive_int("kv_window", window)
        if sinks and window is None:
            raise ValueError("kv_sinks: attention sinks are kept beside a window of recent positions; set kv_window")
        if window is not None and self.window is not None:
            raise ValueError(f"kv_window: the mixer already attends to a window of {self.window} (window); a cache "
                             "window applies to full attention")
        if (bits is not None or window is not None) and type(self).init_cache is not SoftmaxAttention.init_cache:
            raise ValueError(f"kv_bits, kv_window: {type(self).__name__} has a cache of its own, which takes no "
                             "KV-cache policy")
        self.kv_bits, self.kv_group, self.kv_sinks, self.kv_window = bits, group, int(sinks), window

    def _set_scored_policy(self, heavy: int, important: float) -> None:
        """Validate and set kv_heavy (H2O) and kv_important (ZipVL) against the policy `_set_kv_policy` set."""
        if isinstance(heavy, bool) or not isinstance(heavy, int) or heavy < 0:
            raise ValueError(f"kv_heavy must be an integer >= 0 (0: off), got {heavy!r}")
        if isinstance(important, bool) or not isinstance(important, (int, float)) or not 0 <= important <= 1:
            raise ValueError(f"kv_important must be a number in (0, 1] (0: off), got {important!r}")
        if heavy and self.kv_window is None:
            raise ValueError("kv_heavy: heavy hitters are kept beside a window of recent positions; set kv_window")
        if important and (heavy or self.kv_window is not None):
            raise ValueError("kv_important: ZipVL's mixed precision keeps every position; it does not combine with "
                             "eviction (kv_window, kv_sinks, kv_heavy)")
        if important and self.window is not None:
            raise ValueError(f"kv_important: the mixer attends to a window of {self.window} (window); mixed precision "
                             "applies to full attention's cache of every position")
        if important and self.kv_bits == 4:
            raise ValueError("kv_bits: with kv_important the important tokens are kept at full precision (None) or "
                             "int8 (8) and the others at int4; got 4")
        if important:
            check_positive_int("kv_group", self.kv_group)
            check_even("kv_group", self.kv_group)  # the int4 tokens: two codes per byte
            check_divisible("head_dim", self.head_dim, self.kv_group, "kv_group")
        if heavy or important:
            self._check_plain_weights("kv_heavy" if heavy else "kv_important")
        self.kv_heavy, self.kv_important = int(heavy), float(important)

    def _check_plain_weights(self, name: str) -> None:
        """ValueError unless this layer's decode cache and weights are SoftmaxAttention's own (what H2O and ZipVL
        score): no cache, forward pass or score_mod of its own."""
        cls = type(self)
        if cls.init_cache is not SoftmaxAttention.init_cache:
            raise ValueError(f"{name}: {cls.__name__} has a cache of its own, which takes no KV-cache policy")
        if cls._forward is not SoftmaxAttention._forward or cls.score_mod is not SoftmaxAttention.score_mod:
            raise ValueError(f"{name}: {cls.__name__} computes its own attention (its forward pass or score_mod); "
                             "this policy scores plain softmax weights over the cache")

    def attention_mask(self) -> masks.Mask:
        """Which keys each query sees, in every form (training, prefill, decode): ``Causal(window)``. A family
        whose pattern is another mask of ``seqlab.core.masks`` overrides this (and ``cache_slots``)."""
        return masks.Causal(self.window)

    def score_mod(self) -> masks.ScoreMod | None:
        """A rewrite of the scaled float32 scores before masking, in every form (``seqlab.core.masks.ScoreMod``);
        None here. A family whose weights are another function of the scores overrides this."""
        return None

    def cache_slots(self, max_len: int) -> int:
        """The KV cache's slots: max_len, a sliding window's ring of min(window, max_len), or under a cache window
        min(kv_sinks + kv_heavy + kv_window, max_len)."""
        if self.window is not None:
            return min(self.window, max_len)
        return max_len if self.kv_window is None else min(self.kv_sinks + self.kv_heavy + self.kv_window, max_len)

    def init_cache(self, batch: int, max_len: int) -> KVCache | CompressedKVCache | HeavyHitterCache | \
            MixedPrecisionKVCache:
        """An empty cache as the policy says; a heavy-hitter policy whose slots hold all max_len positions evicts
        nothing and gets the plain (sink + window) cache."""
        self._check_cache_args(batch, max_len)
        if self.attention_hook is not None:
            raise ValueError(f"attention_hook: {type(self).__name__} calibrates whole inputs, so it has no decode "
                             "cache; clear the hook (calibrate_attention(model, {layer: None})) to decode")
        slots = self.cache_slots(max_len)
        shape = (batch, slots, self.num_kv_heads, self.head_dim)
        if self.kv_important:
            return MixedPrecisionKVCache.empty(shape, self.dtype or jnp.float32, bits=self.kv_bits,
                                               group=self.kv_group)
        if self.kv_heavy and slots == self.kv_sinks + self.kv_heavy + self.kv_window:
            return HeavyHitterCache.empty(shape, self.dtype or jnp.float32, bits=self.kv_bits, group=self.kv_group,
                                          sinks=self.kv_sinks, heavy=self.kv_heavy, window=self.kv_window)
        if self.kv_bits is None and self.kv_window is None:
            return KVCache.empty(shape, self.dtype or jnp.float32)
        sinks = self.kv_sinks if slots > self.kv_sinks else 0  # a cache that holds every position needs no pinning
        return CompressedKVCache.empty(shape, self.dtype or jnp.float32, bits=self.kv_bits, group=self.kv_group,
                                       sinks=sinks)

    def queries_keys(self, x: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q [B, T, H, d] and k [B, T, H_kv, d] of x [B, T, d_model] at positions pos [T] or [B, T], RoPE applied."""
        q = self._heads(self.q_proj(x), self.head_dim)
        k = self._heads(self.k_proj(x), self.head_dim)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k

    def _forward(self, x: jax.Array, cache: KVCache | None, documents: Documents | None = None):
        if self.attention_hook is not None:
            return self._hooked_forward(x, cache, documents), cache
        if isinstance(cache, HeavyHitterCache):
            return self._heavy_hitter_forward(x, cache, documents)
        q, k, v, cache = self._queries_keys_values(x, cache, documents)
        if isinstance(cache, MixedPrecisionKVCache) and x.shape[1] > 1:
            cache = self._mark_important(cache, q, k)
        o = self._attend(q, k, v, cache, documents, self.score_mod())
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def _grouped(self, q: jax.Array) -> jax.Array:
        """q [B, ..., H, d] -> [B, H_kv, G, ..., d] float32, scaled by d^-1/2 (head h = i·G + g)."""
        group = self.num_heads // self.num_kv_heads
        q = q.astype(jnp.float32).reshape(*q.shape[:-2], self.num_kv_heads, group, q.shape[-1]) * self.head_dim**-0.5
        return jnp.moveaxis(q, (-3, -2), (1, 2))

    def _heavy_hitter_forward(self, x: jax.Array, cache: HeavyHitterCache, documents: Documents | None):
        """H2O: a decode step (T = 1) through `_heavy_hitter_step`; a prompt's outputs from the training path and
        its cache from the same step scanned over its tokens."""
        q, k = self.queries_keys(x, self._positions(cache, x.shape[1], documents))
        v = self.values(x)
        if x.shape[1] == 1:
            o, cache = self._heavy_hitter_step(cache, q[:, 0], k[:, 0], v[:, 0])
            o = o[:, None]
        else:
            def body(c: HeavyHitterCache, qkv: tuple) -> tuple[HeavyHitterCache, None]:
                return self._heavy_hitter_step(c, *qkv)[1], None

            cache = jax.lax.scan(body, cache, tuple(jnp.swapaxes(a, 0, 1) for a in (q, k, v)))[0]
            o = self._attend(q, k, v, cache, documents, self.score_mod())
        return self.o_proj(self._merge_heads(o.astype(x.dtype))), cache

    def _heavy_hitter_step(self, cache: HeavyHitterCache, q: jax.Array, k: jax.Array,
                           v: jax.Array) -> tuple[jax.Array, HeavyHitterCache]:
        """One token: q [B, H, d], k, v [B, H_kv, d] -> (o [B, H, d] float32, the cache with the token inserted and
        its query's weights accumulated). The output and the accumulated scores are the same weights."""
        cache = cache.insert(k, v)
        weights = self._cache_weights(q, cache)  # [B, H_kv, G, L]
        o = jnp.einsum("bhgl,blhd->bhgd", weights, cache.v.astype(jnp.float32))
        return o.reshape(q.shape[0], self.num_heads, -1), cache.accumulate(jnp.sum(weights, axis=2))

    def _cache_weights(self, q: jax.Array, cache: HeavyHitterCache) -> jax.Array:
        """The softmax weights [B, H_kv, G, L] float32 of the queries q [B, H, d] at position pos − 1 over the
        cache's slots, from its stored (dequantised) keys, under ``attention_mask`` (0 at empty slots)."""
        qg = self._grouped(q)  # [B, H_kv, G, d]
        scores = jnp.einsum("bhgd,blhd->bhgl", qg, cache.k.astype(jnp.float32))
        key_positions = jnp.swapaxes(cache.slot_positions, 1, 2)  # [B, H_kv, L]
        query = jnp.reshape(cache.pos - 1, (1,))
        visible = masks.head_pairwise(self.attention_mask(), self.num_kv_heads, qg.shape[2], query, key_positions)
        return masked_softmax(scores, visible[..., 0, :])

    def _mark_important(self, cache: MixedPrecisionKVCache, q: jax.Array, k: jax.Array) -> MixedPrecisionKVCache:
        """ZipVL: the cache with the prompt just written (q [B, T, H, d], k [B, T, H_kv, d]) marked by
        `important_tokens` of its attention mass under kv_important."""
        mass, count = self.prompt_attention_mass(q, k, cache.pos - q.shape[1])
        important = important_tokens(mass, count, self.kv_important)  # [B, H_kv, T]
        return cache.mark(jnp.swapaxes(important, 1, 2))

    def prompt_attention_mass(self, q: jax.Array, k: jax.Array,
                              start: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
        """The prompt's attention per key: q [B, T, H, d], k [B, T, H_kv, d] at positions start .. start + T − 1 ->
        (mass [B, H_kv, T] float32, the softmax weights each key received summed over the queries and the query
        heads of its key/value head; count [B, H_kv, T] int32, how many (query, head) pairs saw it), under
        ``attention_mask``, in blocks of MASS_CHUNK queries."""
        t = q.shape[1]
        chunk = min(t, MASS_CHUNK)
        blocks = -(-t // chunk)
        qg = self._grouped(jnp.pad(q, ((0, 0), (0, blocks * chunk - t), (0, 0), (0, 0))))  # [B, H_kv, G, T', d]
        kt = jnp.swapaxes(k.astype(jnp.float32), 1, 2)  # [B, H_kv, T, d]
        key_positions = start + jnp.arange(t)
        shape = (*qg.shape[:3], chunk, t)

        def block(totals: tuple, i: jax.Array) -> tuple[tuple, None]:
            rows = i * chunk + jnp.arange(chunk)
            visible = masks.head_pairwise(self.attention_mask(), self.num_kv_heads, qg.shape[2], start + rows,
                                          key_positions)
            visible = jnp.broadcast_to(visible & (rows < t)[:, None], shape)
            scores = jnp.einsum("bhgqd,bhkd->bhgqk", jax.lax.dynamic_slice_in_dim(qg, i * chunk, chunk, 3), kt)
            weights = masked_softmax(scores, visible)
            return (totals[0] + jnp.sum(weights, axis=(2, 3)), totals[1] + jnp.sum(visible, axis=(2, 3))), None

        zeros = jnp.zeros((*qg.shape[:2], t), jnp.float32)
        (mass, count), _ = jax.lax.scan(block, (zeros, zeros.astype(jnp.int32)), jnp.arange(blocks))
        return mass, count

    def _hooked_forward(self, x: jax.Array, cache: Any, documents: Documents | None) -> jax.Array:
        """The training path with ``attention_hook`` rewriting the dense weights (`seqlab.mixers.calibration`)."""
        if cache is not None or documents is not None or self.sequence_axis is not None:
            raise ValueError(f"attention_hook: {type(self).__name__} calibrates whole inputs on one device; clear "
                             "the hook to decode, pack documents or split the sequence")
        q, k, v, _ = self._queries_keys_values(x, None, None)
        o = hooked_attention(q, k, v, self.attention_mask(), self.score_mod(), self.attention_hook)
        return self.o_proj(self._merge_heads(o.astype(x.dtype)))

    def _queries_keys_values(self, x: jax.Array, cache: KVCache | None, documents: Documents | None) -> tuple:
        """q [B, T, H, d], k, v [B, T, H_kv, d] of x [B, T, d_model] at this call's positions, and the cache with
        k, v written (None stays None)."""
        q, k = self.queries_keys(x, self._positions(cache, x.shape[1], documents))
        v = self.values(x)
        return q, k, v, (None if cache is None else self._write(cache, k, v))

    def values(self, x: jax.Array) -> jax.Array:
        """v [B, T, H_kv, d] of x [B, T, d_model]."""
        return self._heads(self.v_proj(x), self.head_dim)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache | None, documents: Documents | None,
                score_mod: masks.ScoreMod | None) -> jax.Array:
        """o [B, T, H, d] of q [B, T, H, d] under ``attention_mask`` and score_mod: a decode step (T = 1 with a
        cache, already written) against the cache, else the op over k, v [B, T, H_kv, d]."""
        mask, segment_ids = self.attention_mask(), None
        if documents is not None:
            mask, segment_ids = self._packed(mask, documents)
        if cache is not None and q.shape[1] == 1:  # a decode step reads the cache; training and prompts themselves
            o = ops.softmax_decode_step(q[:, 0], cache.k, cache.v, cache.key_positions, cache.pos - 1, mask=mask,
                                        score_mod=score_mod)  # fmt: skip
            return o[:, None]
        return ops.softmax_attn(
            q, k, v, mask=mask, score_mod=score_mod, impl=self.impl, block_size=self.block_size,
            sequence_axis=None if cache is not None else self.sequence_axis, sequence_parallel=self.sequence_parallel,
            segment_ids=segment_ids,
        )  # fmt: skip

    def _packed(self, mask: masks.Mask, documents: Documents) -> tuple[masks.Mask, jax.Array]:
        """The mask and segment ids of packed rows: the documents' ids, the mask as it is (``Causal(window)`` is
        the same on every document's positions)."""
        return mask, documents.segment_ids

    def _write(self, cache: KVCache, k: jax.Array, v: jax.Array) -> KVCache:
        """The cache with the keys/values k, v [B, T, H_kv, d] of the next T positions in slots p % L; of a prompt
        longer than a ring buffer of L slots only the last L tokens land."""
        T, slots = k.shape[1], cache.k.shape[1]
        if T > slots and self.cache_slots(T) == T:  # a full cache, not a ring: the prompt must fit
            raise ValueError(f"x: a prompt of {T} tokens does not fit a KV cache of max_len={slots}")
        return cache.write(k, v)


@register(
    "sliding_window",
    kind="softmax",
    paper="Longformer: The Long-Document Transformer",
    examples={"ring": dict(num_heads=4, num_kv_heads=1, window=8)},
)
class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention restricted to the last `window` keys (default 64, as LoLCATs-sw and Liger); ring-buffer
    cache."""

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, **kwargs):
        if window is None:
            raise ValueError("window must be a positive integer for sliding-window attention, got None")
        super().__init__(d_model, num_heads, window=window, **kwargs)


class MaskedAttention(SoftmaxAttention):
    """Softmax attention whose pattern is a family's mask (``attention_mask``, from ``seqlab.core.masks``): every
    form of the op (blockwise over the mask's tile map, dense, Pallas, recurrent), the decode step against a full
    KV cache and sequence parallelism (all-gather or ring) run that mask. RoPE is off by default (the families'
    patterns carry the locality). causal=False makes a non-causal layer (no decode cache). Block- and grid-
    aligned patterns are applied to the positions within each document of a packed row (``InDocument``)."""

    takes_documents = True

    def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, rope: bool = False, **kwargs: Any):
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if kwargs.get("window") is not None:
            raise ValueError(f"window: {type(self).__name__}'s keys come from its mask; window must be None, got "
                             f"{kwargs['window']!r}")
        super().__init__(d_model, num_heads, rope=rope, **kwargs)
        self.causal = causal

    def attention_mask(self) -> masks.Mask:
        raise NotImplementedError

    def _packed(self, mask: masks.Mask, documents: Documents) -> tuple[masks.Mask, jax.Array]:
        """``InDocument`` of the mask, whose segment ids are the documents' start positions (continued across the
        devices of a sequence split along ``sequence_axis``)."""
        t_local = documents.positions.shape[1]
        offset = 0 if self.sequence_axis is None else jax.lax.axis_index(self.sequence_axis) * t_local
        return masks.in_document(mask), masks.document_start_ids(documents.positions, offset)
