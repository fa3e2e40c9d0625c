"""Kernelized attention with relative positional encoding, computed by FFT — "Stable, Fast and Accurate:
Kernelized Attention with Relative Positional Encoding" (Luo et al., NeurIPS 2021).

    o_i = Σ_j c_{j−i} φ(q_i)ᵀφ(k_j) v_j / Σ_j c_{j−i} φ(q_i)ᵀφ(k_j),   c_r = e^{b_r}

b: a learnt relative-position bias per head and offset r ∈ [−(L − 1), L − 1] (L = ``max_len``, init N(0, 0.02));
causal: c_r = 0 for keys after the query (r > 0). φ: positive random features of the queries and keys, Performer's
PRF φ(x) = exp(wᵀx − ‖x‖²/2) / √m with m fixed Gaussian directions w (``feature_map="prf"``; the features of a
row are computed relative to their largest exponent, a factor that cancels between numerator and denominator),
or ReLU features relu(wᵀx) / √m. With D_i = Σ_j c_{j−i} φ(k_j)[v_j, 1]ᵀ, o_i = φ(q_i)ᵀD_i[:, :d] / φ(q_i)ᵀD_i[:, d]:
every one of the m·(d + 1) channels of D is a Toeplitz product over the sequence, computed by FFT (zero-padded
to 2T, float32) in O(T log T) instead of O(T²) (impl "chunked", or "auto" from 512 tokens; "parallel",
"recurrent" and short sequences use the dense Toeplitz product); c is e^{b − max b}, the constant cancelling. Only exponential
decay (c_r = γ^{−r}) would have a finite state; in general the decode step attends to a cache of every key
(`KVCache`, O(T) per token). On a sequence split over devices the layer all-gathers its input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice, check_positive_int, resolve_dim
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import KVCache
from seqlab.mixers.registry import register

FEATURE_MAPS = ("prf", "relu")


class RandomFeatures(nnx.Variable):
    """Fixed random directions of the feature map (not trained)."""


def toeplitz_product(weights: jax.Array, x: jax.Array) -> jax.Array:
    """D_i = Σ_j weights[:, j − i + T − 1] x_j for weights [H, 2T − 1] (offsets j − i = −(T−1) .. T−1) and
    x [B, T, H, C], a circular convolution over a zero-padded length 2T by FFT -> [B, T, H, C] float32."""
    T = x.shape[1]
    # the kernel at lags n = i − j: n = 0 .. T−1 first, then (after one zero) n = −(T−1) .. −1
    kernel = jnp.concatenate([weights[:, T - 1 :: -1], jnp.zeros_like(weights[:, :1]), weights[:, : T - 1 : -1]],
                             axis=1)  # [H, 2T]
    spectrum = jnp.fft.rfft(x.astype(jnp.float32), n=2 * T, axis=1) * jnp.fft.rfft(kernel, axis=1).T[None, :, :, None]
    return jnp.fft.irfft(spectrum, n=2 * T, axis=1)[:, :T]


@register(
    "kernelized_rpe",
    kind="linear",
    paper="Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding",
    examples={"prf": dict(num_heads=2, num_features=16, max_len=64),
              "relu": dict(num_heads=2, num_features=16, max_len=64, feature_map="relu", causal=False)},
)
class KernelizedRPEAttention(Mixer):
    """num_features m; feature_map "prf" or "relu"; max_len L (the bias table's reach: T <= L); causal."""

    documents_refused = "its Toeplitz product by FFT runs over the whole row"

    def __init__(self, d_model: int, num_heads: int, *, num_features: int = 64, feature_map: str = "prf",
                 max_len: int = 2048, causal: bool = True, head_dim: int | None = None, impl: str = "auto",
                 rngs: nnx.Rngs | None = None, dtype: Any = None, param_dtype: Any = jnp.float32):
        check_positive_int("num_features", num_features)
        check_positive_int("max_len", max_len)
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        self.causal, self.feature_map, self.max_len = causal, feature_map, max_len
        self._projections(self.head_dim, self.head_dim, rngs)
        self.features = RandomFeatures(jax.random.normal(rngs.params(), (num_features, self.head_dim), jnp.float32))
        self.bias = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_heads, 2 * max_len - 1), param_dtype))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        self._check_cache_args(batch, max_len)
        self._check_length(max_len)
        return KVCache.empty((batch, max_len, self.num_heads, self.head_dim), self.dtype or jnp.float32)

    def _check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"x: {length} tokens exceed the relative-position table of max_len={self.max_len}")

    def feature(self, x: jax.Array, over: tuple[int, ...]) -> jax.Array:
        """φ(x) [..., m] of x [..., d] (scaled by d^-1/4), PRF exponents taken relative to their max over the
        axes ``over`` (a factor that cancels in the ratio)."""
        x = x.astype(jnp.float32) * self.head_dim**-0.25
        projected = jnp.einsum("...d,md->...m", x, self.features[...])
        m = projected.shape[-1]
        if self.feature_map == "relu":
            return jax.nn.relu(projected) / m**0.5
        exponent = projected - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
        return jnp.exp(exponent - jax.lax.stop_gradient(jnp.max(exponent, axis=over, keepdims=True))) / m**0.5

    def offset_weights(self, length: int) -> jax.Array:
        """c_r = e^{b_r − max b} [H, 2T − 1] for offsets r = j − i = −(T−1) .. T−1 (0 for r > 0 if causal)."""
        b = self.bias[...].astype(jnp.float32)[:, self.max_len - length : self.max_len + length - 1]
        if self.causal:
            b = jnp.where(jnp.arange(2 * length - 1) > length - 1, -jnp.inf, b)
        return jnp.exp(b - jax.lax.stop_gradient(jnp.max(b, axis=-1, keepdims=True)))

    def toeplitz(self, weights: jax.Array, x: jax.Array) -> jax.Array:
        """D_i = Σ_j weights[:, j − i + T − 1] x_j (x [B, T, H, C]): by FFT (``toeplitz_product``) for impl
        "chunked", or "auto" from FFT_MIN_LENGTH tokens on; as the dense [T, T] Toeplitz matrix otherwise (plain
        float32 sums; the FFT's rounding is relative to each channel's largest values: 1.5e-5 at T = 600)."""
        T = x.shape[1]
        if self.impl == "chunked" or (self.impl == "auto" and T >= FFT_MIN_LENGTH):
            return toeplitz_product(weights, x)
        offsets = jnp.arange(T)[None, :] - jnp.arange(T)[:, None] + T - 1  # [i, j] -> j − i + T − 1
        return jnp.einsum("hij,bjhc->bihc", weights[:, offsets], x.astype(jnp.float32))

    def _forward(self, x: jax.Array, cache: KVCache | None):
        if cache is not None:
            return self._cached(x, cache)
        return self._on_whole_sequence(self._kernelized, x), None

    def _kernelized(self, x: jax.Array) -> jax.Array:
        T = x.shape[1]
        self._check_length(T)
        q, k, v = (self._heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        phi_q, phi_k = self.feature(q, (-1,)), self.feature(k, (1, -1))  # keys: one factor for the whole sequence
        values = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], axis=-1)
        kv = (phi_k[..., :, None] * values[..., None, :]).reshape(*phi_k.shape[:-1], -1)  # [B, T, H, m (d + 1)]
        d = self.toeplitz(self.offset_weights(T), kv).reshape(*kv.shape[:-1], phi_k.shape[-1], -1)
        out = jnp.einsum("bthm,bthmc->bthc", phi_q, d)
        o = _ratio(out[..., :-1], out[..., -1:])
        return self.o_proj(self._merge_heads(o.astype(x.dtype)))

    def _cached(self, x: jax.Array, cache: KVCache):
        """A prompt (the training path, then its keys and values cached) or one step against every cached key."""
        T = x.shape[1]
        if T > 1:
            k, v = (self._heads(p(x), self.head_dim) for p in (self.k_proj, self.v_proj))
            return self._kernelized(x), cache.write(k, v)
        q, k, v = (self._heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        cache = cache.write(k, v)
        filled = cache.key_positions >= 0  # [L]
        phi_q = self.feature(q[:, 0], (-1,))  # [B, H, m]
        phi_k = jnp.where(filled[None, :, None, None], self.feature(cache.k, (1, -1)), 0.0)  # [B, L, H, m]
        offsets = jnp.clip(cache.key_positions - (cache.pos - 1) + self.max_len - 1, 0, 2 * self.max_len - 2)
        b = self.bias[...].astype(jnp.float32)[:, offsets]  # [H, L]
        c = jnp.where(filled, jnp.exp(b - jax.lax.stop_gradient(jnp.max(jnp.where(filled, b, -jnp.inf), -1,
                                                                            keepdims=True))), 0.0)  # fmt: skip
        scores = jnp.einsum("bhm,blhm->bhl", phi_q, phi_k) * c[None]
        o = _ratio(jnp.einsum("bhl,blhd->bhd", scores, cache.v.astype(jnp.float32)), scores.sum(-1)[..., None])
        return self.o_proj(self._merge_heads(o[:, None].astype(x.dtype))), cache


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (ReLU features of a query can all vanish; the
    stabilised PRF features are positive)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


FFT_MIN_LENGTH = 512  # impl="auto" takes the FFT from this many tokens on (below, the dense product is cheaper)
