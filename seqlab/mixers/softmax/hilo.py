"""HiLo attention — "Fast Vision Transformers with HiLo Attention" (Pan et al., NeurIPS 2022; LITv2).

    Hi-Fi heads (H − ⌊αH⌋):  o_t = Σ_{s in t's window} softmax_s(q_t·k_s / √d) v_s          (local, high frequency)
    Lo-Fi heads (⌊αH⌋):      o_t = Σ_{blocks j seen by t} softmax_j(q_t·k̄_j / √d) v̄_j,  k̄_j, v̄_j = block means

Windows are non-overlapping blocks of b tokens (1-d, b = ``window``) or s×s patches of a 2-d ``grid`` (b = s²);
each branch has its own q, k, v and output projections, and the output concatenates the two branches' channels.
The Lo-Fi keys and values are average-pooled tokens; since the projections are linear, pooling x then projecting
equals projecting then pooling, so k̄_j is the mean of block j's keys. Causal (1-d language models): a Hi-Fi query
sees its block up to itself, a Lo-Fi query the blocks completed by its position ((j + 1)·b − 1 <= t), none before
the first block ends. Non-causal: the whole window, every block. Defaults from the LITv2 configs: α = 0.9, s = 2.

On the engine: Hi-Fi is softmax attention under ``BlockDiagonal(b)``; Lo-Fi stacks each block's b queries as b
query heads over one pooled key/value head (grouped-query layout), so the op runs over T/b blocks with per-head
masks ``Lagged(1)`` (the first b − 1 tokens of a block: earlier blocks only) and ``Causal()`` (its last token: its
own block too) — every form, sequence parallelism with T_local a multiple of b. A 2-d grid is reordered
patch-major first (each s×s patch contiguous), which makes both branches the 1-d case with b = s².
Decode cache (`HiLoCache`): a ring of b Hi-Fi slots and the Lo-Fi keys/values of every position, pooled per
completed block at each step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive_int, resolve_dim
from seqlab.core import masks
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import HiLoCache, KVCache
from seqlab.mixers.registry import register


def patch_major_order(grid: tuple[int, int], patch: int) -> np.ndarray:
    """[H·W] raster indices in patch-major order: patch by patch (raster over patches), raster within a patch."""
    rows, cols = grid
    index = np.arange(rows * cols).reshape(rows // patch, patch, cols // patch, patch)
    return index.transpose(0, 2, 1, 3).reshape(-1)


@register(
    "hilo",
    kind="softmax",
    paper="Fast Vision Transformers with HiLo Attention",
    examples={"causal": dict(num_heads=4, window=4, alpha=0.5), "bidirectional": dict(num_heads=4, window=3,
                                                                                          causal=False)},
)
class HiLoAttention(Mixer):
    """window: the block b (1-d) or patch side s (2-d); alpha: the Lo-Fi share of the heads; grid: (H, W) for
    2-d tokens (non-causal, s dividing both); causal: 1-d causal blocks. num_heads · head_dim = d_model."""

    documents_refused = "its Lo-Fi heads stack the row's blocks of b tokens, which documents would cut"

    def __init__(self, d_model: int, num_heads: int, *, window: int = 2, alpha: float = 0.9,
                 grid: tuple[int, int] | None = None, causal: bool = True, sequence_parallel: str = "allgather",
                 impl: str = "auto", rngs: nnx.Rngs | None = None, dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("window", window)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        if grid is not None:
            if causal:
                raise ValueError("causal: HiLo on a 2-d grid is non-causal; give causal=False")
            if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                    or not all(isinstance(n, int) and n > 0 and n % window == 0 for n in grid)):
                raise ValueError(f"grid must be (H, W) positive ints divisible by window={window}, got {grid!r}")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", None, d_model, "d_model", num_heads, "num_heads")
        self.lo_heads = int(alpha * num_heads)
        self.hi_heads = num_heads - self.lo_heads
        self.causal, self.sequence_parallel = causal, sequence_parallel
        self.grid = None if grid is None else tuple(grid)
        self.block = window if grid is None else window * window
        self.order = None if grid is None else tuple(patch_major_order(self.grid, window).tolist())  # static
        for branch, heads in (("hi", self.hi_heads), ("lo", self.lo_heads)):  # q, k, v and output projections
            width = heads * self.head_dim
            layers = [self._linear(d_model, width, rngs) for _ in range(3)] + [self._linear(width, width, rngs)] \
                if heads else None
            setattr(self, branch, None if layers is None else nnx.List(layers))

    def masks(self) -> tuple[masks.Mask, masks.Mask]:
        """The Hi-Fi mask over tokens and the Lo-Fi mask over blocks (per stacked query head)."""
        if not self.causal:
            return masks.BlockDiagonal(self.block, causal=False), masks.Bidirectional()
        per_row = (masks.Lagged(1),) * (self.block - 1) + (masks.Causal(),)
        return masks.BlockDiagonal(self.block), masks.PerHead(per_row * max(self.lo_heads, 1))

    def init_cache(self, batch: int, max_len: int) -> HiLoCache:
        self._check_cache_args(batch, max_len)
        dtype = self.dtype or jnp.float32
        blocks = -(-max_len // self.block)
        return HiLoCache(hi=KVCache.empty((batch, self.block, self.hi_heads, self.head_dim), dtype),
                         lo=KVCache.empty((batch, blocks * self.block, self.lo_heads, self.head_dim), dtype))

    def _qkv(self, layers, x: jax.Array):
        return [self._heads(layer(x), self.head_dim) for layer in layers[:3]]

    def _forward(self, x: jax.Array, cache: HiLoCache | None):
        if self.order is not None:
            if x.shape[1] != len(self.order) or self.sequence_axis is not None:
                raise ValueError(f"x: HiLo on the grid {self.grid} takes all {len(self.order)} tokens on one device, "
                                 f"got {x.shape[1]}{' (sequence-parallel)' if self.sequence_axis else ''}")
            x = x[:, np.asarray(self.order)]
        outputs, caches = [], {}
        for branch, attend in (("hi", self._hi_fi), ("lo", self._lo_fi)):
            layers = getattr(self, branch)
            if layers is None:
                continue
            q, k, v = self._qkv(layers, x)
            o, caches[branch] = attend(q, k, v, None if cache is None else getattr(cache, branch))
            outputs.append(layers[3](self._merge_heads(o.astype(x.dtype))))
        y = jnp.concatenate(outputs, axis=-1)
        if self.order is not None:
            y = y[:, np.argsort(self.order)]  # back to raster order
        if cache is None:
            return y, None
        return y, HiLoCache(hi=caches.get("hi", cache.hi), lo=caches.get("lo", cache.lo))

    def _hi_fi(self, q, k, v, cache: KVCache | None):
        mask = self.masks()[0]
        if cache is not None:
            cache = cache.write(k, v)
            if q.shape[1] == 1:
                o = ops.softmax_decode_step(q[:, 0], cache.k, cache.v, cache.key_positions, cache.pos - 1, mask=mask)
                return o[:, None], cache
        o = ops.softmax_attn(q, k, v, mask=mask, impl=self.impl, sequence_parallel=self.sequence_parallel,
                             sequence_axis=None if cache is not None else self.sequence_axis)
        return o, cache

    def _lo_fi(self, q, k, v, cache: KVCache | None):
        """Lo-Fi heads: q, k, v [B, T, H_lo, d] -> o [B, T, H_lo, d] over the pooled blocks."""
        if cache is not None:
            slots = cache.k.shape[1]
            if q.shape[1] > slots:
                raise ValueError(f"x: a prompt of {q.shape[1]} tokens does not fit a cache of {slots} positions")
            cache = cache.write(k, v)
            if q.shape[1] == 1:
                return self._lo_fi_step(q[:, 0], cache)[:, None], cache
        b, t, h, d = q.shape
        if self.sequence_axis is not None and cache is None and t % self.block:
            raise ValueError(f"x: under sequence parallelism each device's {t} tokens must be whole blocks of "
                             f"{self.block}")
        pad = -t % self.block
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        n = (t + pad) // self.block
        stacked = q.reshape(b, n, self.block, h, d).transpose(0, 1, 3, 2, 4).reshape(b, n, h * self.block, d)
        counts = jnp.clip(t - self.block * jnp.arange(n), 1, self.block)[:, None, None]  # a last block's tokens
        pooled_k, pooled_v = (a.reshape(b, n, self.block, h, d).sum(axis=2) / counts for a in (k, v))
        o = ops.softmax_attn(stacked, pooled_k, pooled_v, mask=self.masks()[1], impl=self.impl, scale=d**-0.5,
                             sequence_parallel=self.sequence_parallel,
                             sequence_axis=None if cache is not None else self.sequence_axis)
        o = o.reshape(b, n, h, self.block, d).transpose(0, 1, 3, 2, 4).reshape(b, n * self.block, h, d)
        return o[:, :t], cache

    def _lo_fi_step(self, q: jax.Array, cache: KVCache) -> jax.Array:
        """One Lo-Fi decode step: q [B, H_lo, d] against the block means of the cached positions, a block seen
        once complete (its last position written)."""
        b, slots, h, d = cache.k.shape
        n = slots // self.block
        pooled_k, pooled_v = (a.reshape(b, n, self.block, h, d).mean(axis=2) for a in (cache.k, cache.v))
        complete = (jnp.arange(n) + 1) * self.block <= cache.pos  # [n]
        block_ids = jnp.where(complete, jnp.arange(n), -1)
        return ops.softmax_decode_step(q, pooled_k, pooled_v, block_ids, n, mask=masks.Causal())
