"""MossFormer — "MossFormer: Pushing the Performance Limit of Monaural Speech Separation using Gated Single-Head
Transformer with Convolution-Augmented Joint Self-Attentions" (Zhao & Ma, ICASSP 2023), the gated single-head
attention of its MossFormer block (FLASH's gated attention unit and mixed chunk attention, "Transformer Quality in
Linear Time", Hua et al. 2022). One head, x [B, T, D], chunks of g tokens (chunk c = [c·g, (c+1)·g)):

    h = SiLU(W_in x),  h ← h + DWConv(h),  [v | u | z] = h      v, u [B, T, E] (E = expansion·D), z [B, T, S]
    q_quad, q_lin, k_quad, k_lin = RoPE(γ_i ⊙ z + β_i),  i = 0..3        (rotary on the first rotary_dim features)
    A(w)_i = Σ_{j in i's chunk} relu(q_quad_i·k_quad_j / g)² w_j  +  global_i(w)                (causal: j ≤ i)
    global_i(w) = Σ_{all j} (q_lin_i·k_lin_j) w_j / T       (non-causal)
    global_i(w) = Σ_{j in the chunks before i's} (q_lin_i·k_lin_j) w_j / g     (causal; FLASH's exclusive cumsum)
    y = W_o [(A(u) ⊙ v) ⊙ σ(A(v) ⊙ u)]                                            (MossFormer's attentive gating)

No softmax and no normaliser. The depthwise conv over time (kernel K = ``conv_size``, odd, default 17) is centred
("same", zero-padded) when non-causal, as in the paper, and causal (zeros before the first token) when causal.
One projection W_in [D, 2E + S] and one conv over its 2E + S channels stand for the paper's three (the hidden and
the shared base are separate projections and depthwise convs, so their concatenation is the same layer).

As in the official code (FLASH_ShareA_FFConvM): the conv follows the SiLU with a residual (its ConvModule);
γ ~ N(0, 0.02) and β = 0; RoPE rotates min(32, S) features; the non-causal global term divides by the true T (a
padded last chunk counts nothing). Not the official code's: its token shift of half the input channels and its
dropout are left out; its three FFConvM modules each open with a LayerNorm (here the backbone's pre-norm stands for
it) and its output module is another FFConvM (LayerNorm, Linear, SiLU, conv), here the plain projection W_o; the
conv has a bias (official: none); the rotary rotates halves, not adjacent pairs (a fixed permutation of z's
features); the causal conv is this module's (the paper separates whole utterances, non-causally); W_in and W_o
have a bias only with ``use_bias``.

On the engine: the local term is block-diagonal, one einsum over [B, n, g, g] (the last chunk padded and masked).
The causal global term is `ops.linear_attn` (identity feature map, no normalisation, scale 1/g) over an
interleaved sequence of 2·n·g slots: for each chunk, its g query slots (q_lin, zero key and value), then its g key
slots (zero query, k_lin, [v | u]). A query slot's causal output is q_lin against every key slot before it — the
keys of the chunks before its own, exactly the chunk-exclusive sum, with no cancellation — so every form, the
chunked op's own chunk_size and sequence parallelism (LASP-2 over the slots) come from the op; the final state is
that of the completed chunks (the keys of an incomplete last chunk are zeroed). v and u share one op call as the
2E value columns. The non-causal global term is the final state of the engine (`global_means`).

Sequence parallelism: each device holds whole chunks (T_local a multiple of g); RoPE takes the device's offset and
the global term comes through the engine's sequence parallelism (the op's state, or the means over every device);
the causal conv takes its halo from the previous device, the centred one runs on the all-gathered h (as LiT's).
Packed documents are refused.

Decode cache (`MossFormerCache`, O(g) per sequence): a ring of the current chunk's keys [k_quad | k_lin] and
values [v | u], the completed chunks' state Σ k_lin [v | u]ᵀ [S, 2E] float32 and the conv's last inputs. A step
attends over its chunk's slots up to itself and reads the state; the step that completes a chunk folds the ring
into the state. The prefill (a fresh cache) runs the training path and writes the ring, the state and the conv.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive_int, expand_dim
from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv
from seqlab.layers.global_means import global_means
from seqlab.layers.grid_conv import CentredConv
from seqlab.layers.positional import RoPE
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import KVCache, MossFormerCache
from seqlab.mixers.registry import register


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, C] -> [B, n, g, C] (n = ⌈T / g⌉; the last chunk zero-padded)."""
    n = -(-x.shape[1] // chunk)
    return jnp.pad(x, ((0, 0), (0, n * chunk - x.shape[1]), (0, 0))).reshape(x.shape[0], n, chunk, x.shape[-1])


def local_attention(q: jax.Array, k: jax.Array, w: jax.Array, chunk: int, causal: bool) -> jax.Array:
    """Σ_{j in i's chunk (causal: j ≤ i)} relu(q_i·k_j / g)² w_j: q, k [B, T, S], w [B, T, C] -> [B, T, C]."""
    length = q.shape[1]
    qc, kc, wc = (to_chunks(a, chunk) for a in (q, k, w))
    keys = (jnp.arange(qc.shape[1] * chunk) < length).reshape(-1, 1, chunk)  # [n, 1, g]: tokens, not padding
    mask = keys & jnp.tril(jnp.ones((chunk, chunk), bool)) if causal else keys
    scores = jnp.einsum("bnis,bnjs->bnij", qc, kc) / chunk
    weights = jnp.where(mask, jax.nn.relu(scores) ** 2, 0.0)
    return jnp.einsum("bnij,bnjc->bnic", weights, wc).reshape(q.shape[0], -1, w.shape[-1])[:, :length]


def interleave(queries: jax.Array, keys: jax.Array, chunk: int) -> jax.Array:
    """Per chunk its g query slots, then its g key slots: queries, keys [B, T, C] -> [B, 2·n·g, 1, C]."""
    slots = jnp.stack([to_chunks(queries, chunk), to_chunks(keys, chunk)], axis=2)  # [B, n, 2, g, C]
    return slots.reshape(queries.shape[0], -1, 1, queries.shape[-1])


@register(
    "mossformer",
    kind="hybrid",
    paper="MossFormer: Pushing the Performance Limit of Monaural Speech Separation using Gated Single-Head "
          "Transformer with Convolution-Augmented Joint Self-Attentions",
    examples={"causal": dict(num_heads=1, chunk=4, shared_dim=16, conv_size=3),
              "bidirectional": dict(num_heads=1, chunk=5, shared_dim=8, conv_size=5, causal=False)},
)
class MossFormer(Mixer):
    """MossFormer's gated single-head attention, x [B, T, D] -> [B, T, D] (causal by default; causal=False is the
    paper's). chunk: the tokens g of a chunk (local attention within it); expansion: E / D of v and u; shared_dim:
    S, the width of the shared base z; conv_size: the depthwise conv's odd kernel; rotary_dim: the rotated features
    of q, k (default min(32, S)); chunk_size: the linear op's chunk. num_heads: the backbone's, unused (one head)."""

    documents_refused = "its chunks of g tokens and its chunk-exclusive global state would straddle documents"

    def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, chunk: int = 256, expansion: float = 2,
                 shared_dim: int = 128, conv_size: int = 17, rotary_dim: int | None = None, rope_base: float = 10000.0,
                 use_bias: bool = False, impl: str = "auto", chunk_size: int = 64, rngs: nnx.Rngs | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32):
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        check_positive_int("chunk", chunk)
        check_positive_int("shared_dim", shared_dim)
        check_positive_int("conv_size", conv_size)
        if conv_size % 2 == 0:
            raise ValueError(f"conv_size must be odd (the paper's centred convolution), got {conv_size}")
        rotary_dim = min(32, shared_dim) if rotary_dim is None else rotary_dim
        check_positive_int("rotary_dim", rotary_dim)
        if rotary_dim > shared_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be at most shared_dim ({shared_dim})")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.causal, self.chunk, self.shared_dim = causal, chunk, shared_dim
        self.hidden_dim = expand_dim("expansion", d_model, expansion, 1)
        self.rope = RoPE(rotary_dim, base=rope_base)
        channels = 2 * self.hidden_dim + shared_dim
        self.in_proj = self._linear(d_model, channels, rngs, use_bias=use_bias)
        layer = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv = (ShortConv(channels, kernel_size=conv_size, use_bias=True, activation=None, **layer) if causal
                     else CentredConv(channels, conv_size, None, **layer))
        self.gamma = nnx.Param(0.02 * jax.random.normal(rngs.params(), (4, shared_dim), param_dtype))
        self.beta = nnx.Param(jnp.zeros((4, shared_dim), param_dtype))
        self.o_proj = self._linear(self.hidden_dim, d_model, rngs, use_bias=use_bias)

    def init_cache(self, batch: int, max_len: int) -> MossFormerCache:
        self._check_cache_args(batch, max_len)
        dtype = self.dtype or jnp.float32
        ring = KVCache.empty((batch, self.chunk, 1, 2 * self.shared_dim), dtype)
        values = jnp.zeros((batch, self.chunk, 1, 2 * self.hidden_dim), dtype)
        return MossFormerCache(local=ring.replace(v=values), conv=self.conv.init_state(batch),
                               state=jnp.zeros((batch, 1, self.shared_dim, 2 * self.hidden_dim), jnp.float32))

    def _forward(self, x: jax.Array, cache: MossFormerCache | None, documents: Documents | None = None):
        if cache is not None and x.shape[1] == 1:
            return self._step(x, cache)
        return self._sequence(x, cache)

    def _features(self, x: jax.Array, positions: jax.Array, conv_state: jax.Array | None):
        """x [B, T, D] -> (q_quad, q_lin, k_quad, k_lin [B, T, S] float32 after RoPE, [v | u] [B, T, 2E] float32,
        the causal conv's state or None)."""
        h = jax.nn.silu(self.in_proj(x))
        if self.causal:
            local, conv_state = self.conv(h, conv_state)
        else:
            local = self._on_whole_sequence(self.conv, h)
        h = (h + local).astype(jnp.float32)
        vu, z = h[..., : 2 * self.hidden_dim], h[..., 2 * self.hidden_dim :]
        qk = self.rope(z[..., None, :] * self.gamma[...] + self.beta[...], positions)  # [B, T, 4, S]
        return tuple(qk[..., i, :] for i in range(4)), vu, conv_state

    def _output(self, attended: jax.Array, vu: jax.Array, dtype: Any) -> jax.Array:
        """W_o [(A(u) ⊙ v) ⊙ σ(A(v) ⊙ u)] from A([v | u]) and [v | u], [B, T, 2E] -> [B, T, D]."""
        e = self.hidden_dim
        gated = attended[..., e:] * vu[..., :e] * jax.nn.sigmoid(attended[..., :e] * vu[..., e:])
        return self.o_proj(gated.astype(dtype))

    def _sequence(self, x: jax.Array, cache: MossFormerCache | None):
        """The training path (cache None) or a prefill into a fresh cache: y [B, T, D] and the cache."""
        length, g = x.shape[1], self.chunk
        if cache is None and self.sequence_axis is not None and length % g:
            raise ValueError(f"x: under sequence parallelism each device's {length} tokens must be whole chunks of "
                             f"chunk={g}")
        positions = self._positions(cache, length, None)
        (q_quad, q_lin, k_quad, k_lin), vu, conv = self._features(x, positions, None if cache is None else cache.conv)
        state = None if cache is None else cache.state
        glob, state = self._causal_global(q_lin, k_lin, vu, state) if self.causal else self._global(q_lin, k_lin, vu)
        y = self._output(local_attention(q_quad, k_quad, vu, g, self.causal) + glob, vu, x.dtype)
        if cache is None:
            return y, None
        keys = jnp.concatenate([k_quad, k_lin], axis=-1)[:, :, None]
        return y, cache.replace(local=cache.local.write(keys, vu[:, :, None]), state=state, conv=conv)

    def _global(self, q: jax.Array, k: jax.Array, vu: jax.Array) -> tuple[jax.Array, None]:
        """Non-causal: q_lin, k_lin [B, T, S], vu [B, T, 2E] -> q_lin·Σ_j k_lin_j vu_jᵀ / T [B, T, 2E] (over every
        device of a split sequence)."""
        means = global_means(k[:, :, None], vu[:, :, None], **self._op_kwargs(None))
        return jnp.einsum("bts,bse->bte", q, means.kv[:, 0]), None

    def _causal_global(self, q: jax.Array, k: jax.Array, vu: jax.Array, state: jax.Array | None):
        """Causal: q_lin, k_lin [B, T, S], vu [B, T, 2E] and the state before them (None: the training path) ->
        (Σ over the chunks before each token's of q_lin·k_lin vu / g [B, T, 2E], the completed chunks' state)."""
        length, g = q.shape[1], self.chunk
        complete = (jnp.arange(length) < length // g * g)[None, :, None]  # an incomplete last chunk adds no state
        o, state = ops.linear_attn(interleave(q, jnp.zeros_like(q), g),
                                   interleave(jnp.zeros_like(k), jnp.where(complete, k, 0.0), g),
                                   interleave(jnp.zeros_like(vu), vu, g), scale=1.0 / g, **self._op_kwargs(state))
        o = o.reshape(q.shape[0], -1, 2, g, vu.shape[-1])[:, :, 0]  # the query slots
        return o.reshape(q.shape[0], -1, vu.shape[-1])[:, :length], state

    def _step(self, x: jax.Array, cache: MossFormerCache) -> tuple[jax.Array, MossFormerCache]:
        """One token at position p: attend over its chunk's slots up to p and the completed chunks' state; fold the
        ring into the state if p completes its chunk."""
        g, s, pos = self.chunk, self.shared_dim, cache.pos
        (q_quad, q_lin, k_quad, k_lin), vu, conv = self._features(x, self._positions(cache, 1, None), cache.conv)
        ring = cache.local.write(jnp.concatenate([k_quad, k_lin], axis=-1)[:, :, None], vu[:, :, None])
        keys, values = ring.k[:, :, 0].astype(jnp.float32), ring.v[:, :, 0].astype(jnp.float32)
        scores = jnp.einsum("bs,bjs->bj", q_quad[:, 0], keys[..., :s]) / g
        own_chunk = ring.key_positions >= pos - pos % g  # the slots of p's chunk (up to p: nothing later is written)
        local = jnp.einsum("bj,bje->be", jnp.where(own_chunk, jax.nn.relu(scores) ** 2, 0.0), values)
        glob = jnp.einsum("bs,bse->be", q_lin[:, 0], cache.state[:, 0]) / g
        y = self._output((local + glob)[:, None], vu, x.dtype)
        chunk_state = jnp.einsum("bjs,bje->bse", keys[..., s:], values)[:, None]
        state = cache.state + jnp.where((pos + 1) % g == 0, chunk_state, 0.0)
        return y, cache.replace(local=ring, state=state, conv=conv)
