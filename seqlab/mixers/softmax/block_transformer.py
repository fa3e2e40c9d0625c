"""Block Transformer — "Block Transformer: Global-to-Local Language Modeling for Fast Inference" (Ho et al.,
NeurIPS 2024), its global-to-local structure as one mixer layer (blocks of L = ``block`` tokens, n = ⌈T/L⌉):

    e_j = W_e [x_{jL}; x_{jL+1}; …; x_{jL+L−1}]                  block embedding [B, n, D] (concatenated inputs)
    g = CausalAttention_blocks(e)                                the block decoder: block j sees blocks <= j
    c_0 = s (learnt [D]),  c_i = g_{i−1}                         the context of block i: the blocks before it
    z_i = [W_p c_i, x_{iL}, …, x_{iL+L−1}]                       the token decoder's input: context prefix + block
    y_t = Σ_{u ∈ z_{⌊t/L⌋}, u <= t} softmax_u(q_t·k_u / √d) v_u  local attention within the block and its prefix

(x [B, T, D]; both attentions multi-head with RoPE — over block indices, and over the extended positions — and
their own projections; the partial last block is zero-padded, which only its own unused embedding sees.) Global
context reaches the tokens only through the prefix, so the token decoder's keys are the L + 1 of the current
block: decoding reads O(L) keys per token and attends over the blocks once per block, where softmax attention
reads all T.

On the engine: the block decoder is a causal `SoftmaxAttention` over the n embeddings; the token decoder is
softmax attention under ``BlockDiagonal(L + 1)`` over the extended sequence [z_0, z_1, …] (every form, the
Pallas kernel). Sequence parallelism needs whole blocks on each device: the block decoder shards the block
sequence (all-gathering its keys and values), the context shift passes each device's last block output to the
next, and the token decoder runs the masked attention's sequence-parallel form on the extended sequence.

Decode cache (`BlockTransformerCache`): the block decoder's KV cache (one slot per block), a ring of the current
block's L + 1 extended keys/values, its inputs so far and the next block's context. A step that opens a block
writes its prefix; a step that completes one embeds it and runs one block-decoder step.

Not the paper's: the paper stacks several block-decoder layers and several token-decoder layers (a model split
into a lower global and an upper local part, with their own widths, and embeds tokens by lookup); here one layer
holds one of each over its input x, so a model of these layers alternates global and local mixing. Packed
documents are refused (a block may straddle documents).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int
from seqlab.core import masks
from seqlab.core.documents import Documents
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import BlockTransformerCache
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention, SoftmaxAttention


class PrefixedBlockAttention(MaskedAttention):
    """The token decoder: causal softmax attention within periods of ``period`` positions (a block's prefix and
    its tokens), RoPE on; its decode cache is a ring of one period."""

    def __init__(self, d_model: int, num_heads: int, *, period: int, **kwargs: Any):
        super().__init__(d_model, num_heads, rope=True, **kwargs)
        self.period = period

    def attention_mask(self) -> masks.Mask:
        return masks.BlockDiagonal(self.period)

    def cache_slots(self, max_len: int) -> int:
        return min(self.period, max_len)


@register(
    "block_transformer",
    kind="softmax",
    paper="Block Transformer: Global-to-Local Language Modeling for Fast Inference",
    examples={"gqa": dict(num_heads=4, num_kv_heads=2, block=4), "block1": dict(num_heads=2, block=1)},
)
class BlockTransformer(Mixer):
    """block: the tokens L per block; num_kv_heads, head_dim, impl, block_size: both attentions'."""

    documents_refused = "its blocks of L tokens, embedded whole, may straddle documents"

    def __init__(self, d_model: int, num_heads: int, *, block: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, impl: str = "auto", block_size: int | None = None,
                 rngs: nnx.Rngs | None = None, dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("block", block)
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.block = block
        shared = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, impl=impl, block_size=block_size, rngs=rngs,
                      dtype=dtype, param_dtype=param_dtype)
        self.embed = self._linear(block * d_model, d_model, rngs)
        self.blocks = SoftmaxAttention(d_model, num_heads, **shared)
        self.start = nnx.Param(0.02 * jax.random.normal(rngs.params(), (d_model,), param_dtype))
        self.prefix = self._linear(d_model, d_model, rngs)
        self.tokens = PrefixedBlockAttention(d_model, num_heads, period=block + 1, **shared)

    def init_cache(self, batch: int, max_len: int) -> BlockTransformerCache:
        self._check_cache_args(batch, max_len)
        n = -(-max_len // self.block)
        dtype = self.dtype or jnp.float32
        return BlockTransformerCache(
            blocks=self.blocks.init_cache(batch, n), local=self.tokens.init_cache(batch, n * (self.block + 1)),
            block_inputs=jnp.zeros((batch, self.block, self.d_model), dtype),
            context=jnp.zeros((batch, self.d_model), dtype), pos=jnp.zeros((), jnp.int32))

    def _forward(self, x: jax.Array, cache: BlockTransformerCache | None, documents: Documents | None = None):
        if cache is None:
            return self._whole(x), None
        if x.shape[1] == 1:
            return self._step(x[:, 0], cache)
        return self._prefill(x, cache)

    def _embeddings(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(e [B, n, D], the blocks of x [B, n, L, D], zero-padded) of x [B, T, D]."""
        b, t, d = x.shape
        n = -(-t // self.block)
        blocks = jnp.pad(x, ((0, 0), (0, n * self.block - t), (0, 0))).reshape(b, n, self.block, d)
        return self.embed(blocks.reshape(b, n, self.block * d)), blocks

    def _extended(self, blocks: jax.Array, contexts: jax.Array) -> jax.Array:
        """z [B, n·(L + 1), D]: each block's prefix W_p c_i, then its tokens (blocks [B, n, L, D], c [B, n, D])."""
        z = jnp.concatenate([self.prefix(contexts)[:, :, None].astype(blocks.dtype), blocks], axis=2)
        return z.reshape(z.shape[0], -1, z.shape[-1])

    def _tokens_of(self, y_ext: jax.Array, length: int) -> jax.Array:
        """The token outputs [B, T, D] of the extended outputs [B, ≤ n·(L + 1), D] (prefix outputs dropped)."""
        b, e, d = y_ext.shape
        y_ext = jnp.pad(y_ext, ((0, 0), (0, -e % (self.block + 1)), (0, 0)))
        return y_ext.reshape(b, -1, self.block + 1, d)[:, :, 1:].reshape(b, -1, d)[:, :length]

    def _start(self, batch: int, dtype: Any) -> jax.Array:
        return jnp.broadcast_to(self.start[...].astype(dtype), (batch, 1, self.d_model))

    def _whole(self, x: jax.Array) -> jax.Array:
        """The training path on whole rows, or on this device's whole blocks of a split sequence."""
        if self.sequence_axis is not None and x.shape[1] % self.block:
            raise ValueError(f"x: under sequence parallelism each device holds whole blocks of {self.block} tokens, "
                             f"got {x.shape[1]} tokens per device")
        e, blocks = self._embeddings(x)
        g = self.blocks(e)
        first = self._start(x.shape[0], g.dtype)
        if self.sequence_axis is not None:  # block 0 of device p takes the last block output of device p − 1
            lasts = jax.lax.all_gather(g[:, -1:], self.sequence_axis)  # [P, B, 1, D]
            index = jax.lax.axis_index(self.sequence_axis)
            first = jnp.where(index == 0, first, lasts[jnp.maximum(index - 1, 0)])
        contexts = jnp.concatenate([first, g[:, :-1]], axis=1)
        return self._tokens_of(self.tokens(self._extended(blocks, contexts)), x.shape[1])

    def _prefill(self, x: jax.Array, cache: BlockTransformerCache) -> tuple[jax.Array, BlockTransformerCache]:
        """A prompt into a fresh cache: the training path through the two attentions' prefill."""
        t, L = x.shape[1], self.block
        e, blocks = self._embeddings(x)
        done, n = t // L, e.shape[1]
        first = self._start(x.shape[0], e.dtype)
        g, block_cache = self.blocks.prefill(e[:, :done], cache.blocks) if done else (first[:, :0], cache.blocks)
        contexts = jnp.concatenate([first, g], axis=1)[:, :n]
        extended = done * (L + 1) + (t % L + 1 if t % L else 0)
        y_ext, local = self.tokens.prefill(self._extended(blocks, contexts)[:, :extended], cache.local)
        open_inputs = blocks[:, -1] if t % L else jnp.zeros_like(cache.block_inputs)
        return self._tokens_of(y_ext, t), cache.replace(
            blocks=block_cache, local=local, block_inputs=open_inputs.astype(cache.block_inputs.dtype),
            context=g[:, -1].astype(cache.context.dtype) if done else cache.context, pos=cache.pos + t)

    def _step(self, x_t: jax.Array, cache: BlockTransformerCache) -> tuple[jax.Array, BlockTransformerCache]:
        """One token x_t [B, D]: open its block (write the prefix), attend, close the block if it is the last."""
        r = cache.pos % self.block
        cache = jax.lax.cond(r == 0, self._open_block, lambda c: c, cache)
        y_t, local = self.tokens.step(x_t, cache.local)
        block_inputs = jax.lax.dynamic_update_slice_in_dim(cache.block_inputs, x_t[:, None].astype(
            cache.block_inputs.dtype), r, axis=1)
        cache = cache.replace(local=local, block_inputs=block_inputs, pos=cache.pos + 1)
        cache = jax.lax.cond(r == self.block - 1, self._close_block, lambda c: c, cache)
        return y_t[:, None], cache

    def _open_block(self, cache: BlockTransformerCache) -> BlockTransformerCache:
        """The cache with the new block's prefix W_p c_i in the token decoder's ring (c_0 = s)."""
        start = self._start(cache.context.shape[0], cache.context.dtype)[:, 0]
        context = jnp.where(cache.pos == 0, start, cache.context)
        _, local = self.tokens.step(self.prefix(context), cache.local)
        return cache.replace(local=local)

    def _close_block(self, cache: BlockTransformerCache) -> BlockTransformerCache:
        """The cache after the block decoder's step on the just-completed block's embedding (its inputs
        cleared)."""
        e = self.embed(cache.block_inputs.reshape(cache.block_inputs.shape[0], -1))
        g, blocks = self.blocks.step(e, cache.blocks)
        return cache.replace(blocks=blocks, context=g.astype(cache.context.dtype),
                             block_inputs=jnp.zeros_like(cache.block_inputs))
