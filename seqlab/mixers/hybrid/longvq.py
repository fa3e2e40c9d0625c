"""LongVQ — "LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory" (Liu et al., IJCAI
2024): a Mega-style gated block whose structured memory is a damped EMA (an SSM, the local patterns) and whose
attention runs over vector-quantised keys (the global patterns, in linear time). x [B, T, D], H heads:

    h_t = α ⊙ β x_t + (1 − α ⊙ δ) ⊙ h_{t−1},   x'_t = SiLU(Σ_r η_r h_t,r + ω ⊙ x_t)   per channel, n EMA dims r
    z = SiLU(W_z x'),  q = LN(γ_q ⊙ z + β_q),  k = LN(γ_k ⊙ z + β_k)          [B, T, H, d] (LN without parameters)
    v = SiLU(W_v x)                                                           [B, T, H, d]
    k̂_t = e_{z_t},  z_t = argmin_s ‖k_t − e_s‖                               (codebook E [H, S, d], straight-through)
    o_t = Σ_{j <= t} softmax_j(q_t·k̂_j / √d) v_j                             (`ops.vq_attn`, linear time)
    r = SiLU(W_r x'),  ĥ = SiLU(W_h x' + W_u (r ⊙ o)),  u = σ(W_φ x'),  y = u ⊙ ĥ

α = σ(a), δ = σ(d) per channel and EMA dim (so log(1 − α ⊙ δ) < 0 is the log decay). The codebook is learnt by
k-means on the keys (an exponential moving average, as in Transformer-VQ's codebook): E = sums / counts, two
``nnx.BatchStat``s updated by each training-path call when ``use_running_average`` is False (γ = codebook_decay):

    counts_s ← γ counts_s + (1 − γ) #{t : z_t = s},   sums_s ← γ sums_s + (1 − γ) Σ_{t : z_t = s} k_t

and the keys are pulled towards their codes by a commitment loss, β · mean_{t, h, i} (k_t − sg(k̂_t))_i², which
every call that updates the codebook adds through ``seqlab.mixers.aux_losses`` ("longvq_commitment"; the launcher
adds it to the task loss).

Only the abstract of the paper was available: the block follows Mega (its EMA, shared z, reset and update gates)
with the attention replaced by Transformer-VQ's, which is our reading of "vector quantization on structured memory".
Mega's output interpolation u ⊙ ĥ + (1 − u) ⊙ x is left to the backbone's residual connection, the commitment
loss is Transformer-VQ's with β = 1e-4 by default (the coefficient the paper's body would fix was not available),
and there is no positional bias in the attention (the EMA orders it).

On the engine: the EMA is `ops.gla` with one head per channel (keys and log gates constant over time, queries η,
values the channel), so its every form, decode state and sequence parallelism come from the op; the attention is
`ops.vq_attn` (blocks of L = ``block_size`` tokens; the gradient each key gets is described there). Sequence
parallelism: each device holds whole blocks (T_local a multiple of L) and the k-means sums are psum-ed; training
with a learnt codebook (use_running_average False) runs on one device (``single_device_state``). Packed documents
are refused.

Decode cache (`VQCache`): the EMA's state, a ring of the last 2L quantised keys and values, and the code sums of
the blocks before the previous one, of the previous block and of the current one; a step that opens a block folds
the previous block's sums into the old ones. Every step costs O(L + S), whatever the length.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_fraction, check_nonnegative, check_positive_int, resolve_dim
from seqlab.layers.norms import plain_layer_norm
from seqlab.mixers import aux_losses
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import KVCache, VQCache
from seqlab.mixers.registry import register


@register(
    "longvq",
    kind="hybrid",
    paper="LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory",
    examples={"small": dict(num_heads=2, num_codes=5, block_size=4, ema_dim=4),
              "one_head": dict(num_heads=1, num_codes=3, block_size=8, ema_dim=2)},
)
class LongVQ(Mixer):
    """num_codes: S codes per head; block_size: L, the exact-key blocks of the attention; ema_dim: n, the EMA's
    dimensions per channel; codebook_decay: γ of the codebook's moving average; use_running_average: freeze the
    codebook (True: the default and eval mode; False: train mode updates it); commitment: β of the commitment
    loss (0: none); chunk_size: the EMA op's chunk (8:
    its heads have one value column each, so a chunk's C × C intra-chunk work is mostly overhead and small chunks
    run fastest)."""

    documents_refused = "its codebook sums and its EMA run over the whole row"
    single_device_state = "its codebook's moving averages"

    def __init__(self, d_model: int, num_heads: int, *, num_codes: int = 64, block_size: int = 64, ema_dim: int = 16,
                 codebook_decay: float = 0.99, use_running_average: bool = True, commitment: float = 1e-4,
                 head_dim: int | None = None, impl: str = "auto", chunk_size: int = 8, rngs: nnx.Rngs | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("num_codes", num_codes)
        check_positive_int("block_size", block_size)
        check_positive_int("ema_dim", ema_dim)
        check_fraction("codebook_decay", codebook_decay)
        check_nonnegative("commitment", commitment)
        if impl == "pallas":
            raise ValueError("impl: 'pallas' is not available for longvq (its EMA and quantised attention have no "
                             "kernel); use 'auto', 'chunked', 'recurrent' or 'parallel'")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        self.block_size, self.decay, self.use_running_average = block_size, codebook_decay, use_running_average
        self.commitment = commitment
        width = num_heads * self.head_dim

        def normal(shape, std):
            return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))

        self.ema_alpha, self.ema_delta = normal((d_model, ema_dim), 0.2), normal((d_model, ema_dim), 0.2)
        self.ema_beta = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (d_model, ema_dim), param_dtype))
        self.ema_eta, self.ema_omega = normal((d_model, ema_dim), ema_dim**-0.5), normal((d_model,), 1.0)
        self.z_proj = self._linear(d_model, width, rngs, use_bias=True)
        self.qk_scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (2, width), param_dtype))
        self.qk_offset = nnx.Param(jnp.zeros((2, width), param_dtype))
        self.v_proj = self._linear(d_model, width, rngs, use_bias=True)
        self.reset_proj = self._linear(d_model, width, rngs, use_bias=True)
        self.h_proj = self._linear(d_model, d_model, rngs, use_bias=True)
        self.u_proj = self._linear(width, d_model, rngs)
        self.update_proj = self._linear(d_model, d_model, rngs, use_bias=True)
        codes = jax.random.normal(rngs.params(), (num_heads, num_codes, self.head_dim), jnp.float32)
        self.codebook_sums = nnx.BatchStat(codes)  # [H, S, d] float32
        self.codebook_counts = nnx.BatchStat(jnp.ones((num_heads, num_codes), jnp.float32))  # [H, S]

    @property
    def codebook(self) -> jax.Array:
        """E [H, S, d] float32, the codes (the moving averages' ratio)."""
        return self.codebook_sums[...] / jnp.maximum(self.codebook_counts[...], 1e-6)[..., None]

    def init_cache(self, batch: int, max_len: int) -> VQCache:
        self._check_cache_args(batch, max_len)
        h, d, s = self.num_heads, self.head_dim, self.codebook_sums.shape[1]
        ring = KVCache.empty((batch, 2 * self.block_size, h, d), jnp.float32)
        sums = jnp.zeros((batch, h, s, d + 1), jnp.float32)
        ema = jnp.zeros((batch, self.d_model, self.ema_alpha.shape[1], 1), jnp.float32)
        return VQCache(ring=ring, ema=ema, before=sums, previous=sums, current=sums)

    def _forward(self, x: jax.Array, cache: VQCache | None):
        smoothed, ema = self._ema(x, None if cache is None else cache.ema)
        z = jax.nn.silu(self.z_proj(smoothed)).astype(jnp.float32)
        q_raw, k_raw = (z * self.qk_scale[i] + self.qk_offset[i] for i in range(2))
        q, k = (plain_layer_norm(self._heads(a, self.head_dim)) for a in (q_raw, k_raw))  # float32
        v = self._heads(jax.nn.silu(self.v_proj(x)), self.head_dim)
        codebook = self.codebook
        codes = ops.nearest_codes(k, codebook)
        k_hat = ops.quantize(k, codebook, codes)
        if cache is None and not self.use_running_average:
            if self.commitment:
                aux_losses.add("longvq_commitment", self.commitment * jnp.mean((k - jax.lax.stop_gradient(k_hat)) ** 2))
            self._update_codebook(k, codes)
        if cache is None:
            o = ops.vq_attn(q, k_hat, codes, v, codebook, block_size=self.block_size, sequence_axis=self.sequence_axis)
        elif x.shape[1] == 1:
            cache = self._step_cache(cache, k_hat, codes, v)
            o = ops.vq_attn_step(q[:, 0], cache.ring.k, cache.ring.v, cache.ring.key_positions, codebook,
                                 cache.before, cache.ring.pos - 1, block_size=self.block_size)[:, None]
        else:
            o = ops.vq_attn(q, k_hat, codes, v, codebook, block_size=self.block_size)
            cache = self._prefill_cache(cache, k_hat, codes, v)
        if cache is not None:
            cache = cache.replace(ema=ema)
        reset = jax.nn.silu(self.reset_proj(smoothed))
        gated = reset * self._merge_heads(o).astype(reset.dtype)
        hidden = jax.nn.silu(self.h_proj(smoothed) + self.u_proj(gated))
        return jax.nn.sigmoid(self.update_proj(smoothed)) * hidden, cache

    def _ema(self, x: jax.Array, state: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """x' = SiLU(EMA(x) + ω ⊙ x) [B, T, D] through `ops.gla` (one head per channel) and its final state."""
        alpha, delta = jax.nn.sigmoid(self.ema_alpha[...]), jax.nn.sigmoid(self.ema_delta[...])
        shape = (*x.shape[:2], *alpha.shape)  # [B, T, D, n]
        keys = jnp.broadcast_to(alpha * self.ema_beta[...], shape)
        log_decay = jnp.broadcast_to(jnp.log1p(-alpha * delta), shape)
        queries = jnp.broadcast_to(self.ema_eta[...], shape)
        out, state = ops.gla(queries, keys, x.astype(jnp.float32)[..., None], log_decay, scale=1.0,
                             **self._op_kwargs(state))
        smoothed = out[..., 0] + self.ema_omega[...] * x.astype(jnp.float32)
        return jax.nn.silu(smoothed).astype(x.dtype), state

    def _update_codebook(self, k: jax.Array, codes: jax.Array) -> None:
        """One k-means step of the moving averages on this call's keys k [B, T, H, d] and codes [B, T, H]."""
        sums = ops.code_sums(codes, jax.lax.stop_gradient(k), self.codebook_sums.shape[1]).sum(axis=0)  # [H, S, d+1]
        if self.sequence_axis is not None:
            sums = jax.lax.psum(sums, self.sequence_axis)
        self.codebook_sums[...] = self.decay * self.codebook_sums[...] + (1 - self.decay) * sums[..., :-1]
        self.codebook_counts[...] = self.decay * self.codebook_counts[...] + (1 - self.decay) * sums[..., -1]

    def _step_cache(self, cache: VQCache, k_hat: jax.Array, codes: jax.Array, v: jax.Array) -> VQCache:
        """The cache after one token: a token that opens a block first folds the previous block's sums into
        `before` and the current block's into `previous`."""
        opens = cache.ring.pos % self.block_size == 0
        sums = ops.code_sums(codes, v, self.codebook_sums.shape[1])  # [B, H, S, d + 1]
        return cache.replace(
            ring=cache.ring.write(k_hat, v.astype(jnp.float32)),
            before=jnp.where(opens, cache.before + cache.previous, cache.before),
            previous=jnp.where(opens, cache.current, cache.previous),
            current=jnp.where(opens, 0.0, cache.current) + sums,
        )

    def _prefill_cache(self, cache: VQCache, k_hat: jax.Array, codes: jax.Array, v: jax.Array) -> VQCache:
        """The cache after a prompt of T tokens read into a fresh cache: its last token's block n is `current`,
        block n − 1 `previous`, the blocks before `before`."""
        length, lb, num_codes = codes.shape[1], self.block_size, self.codebook_sums.shape[1]
        block = jnp.arange(length) // lb - (length - 1) // lb  # 0: the last token's block, -1 the one before
        sums = [ops.code_sums(jnp.where(select[None, :, None], codes, num_codes), v, num_codes)
                for select in (block < -1, block == -1, block == 0)]
        return cache.replace(ring=cache.ring.write(k_hat, v.astype(jnp.float32)), before=sums[0], previous=sums[1],
                             current=sums[2])
