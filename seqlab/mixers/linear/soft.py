"""SOFT — "SOFT: Softmax-free Transformer with Linear Complexity" (Lu et al., NeurIPS 2021).

    X = κ(Q, Q̃) · P⁺ · κ(Q̃, Q) · V + DWConv(V),   P = κ(Q̃, Q̃),   κ(a, b) = exp(−‖a − b‖² / 2)

Per head: queries and keys share one projection (Q = K, scaled by d^(-1/4)), and the Gaussian kernel κ replaces
the softmax of dot products. Its low-rank Nyström approximation goes through n = ⌈T/s⌉ landmarks Q̃ =
GELU(LN(Conv_{s, stride s}(Q))) (a Linear map for s = 1), so the cost is O(T·n·d). P⁺ is the Moore–Penrose
inverse of the landmarks' kernel by 20 Newton–Schulz iterations, V_{k+1} = 2V_k − V_k P V_k from V_0 = αP,
α = 2·0.9 / (max row sum of P)², after a ridge P + 0.01·I; its gradient is that of an inverse,
∂P = −P⁺ᵀ (∂P⁺) P⁺ᵀ (the paper's stated backward, not the iterations'). A depthwise convolution of V (kernel 3)
is added; no normaliser. Non-causal (the landmarks pool the whole sequence): no decode cache; on a sequence split
over devices the layer all-gathers its input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int, resolve_dim
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register

NEWTON_ITERATIONS = 20
RIDGE = 0.01


@jax.custom_vjp
def newton_pinv(p: jax.Array) -> jax.Array:
    """P⁺ of symmetric positive p [..., n, n] by Newton–Schulz (module docstring), float32."""
    alpha = 2 * 0.9 / jnp.max(jnp.sum(p, axis=-1), axis=-1)[..., None, None] ** 2
    p = p + RIDGE * jnp.eye(p.shape[-1], dtype=p.dtype)
    inverse = alpha * p

    def iterate(v, _):
        return 2 * v - v @ p @ v, None

    inverse, _ = jax.lax.scan(iterate, inverse, None, length=NEWTON_ITERATIONS)
    return inverse


def _pinv_forward(p):
    inverse = newton_pinv(p)
    return inverse, inverse


def _pinv_backward(inverse, grad):
    t = jnp.swapaxes(inverse, -1, -2)
    return (-(t @ grad @ t),)


newton_pinv.defvjp(_pinv_forward, _pinv_backward)


def gaussian_kernel(a: jax.Array, b: jax.Array) -> jax.Array:
    """exp(−‖a_i − b_j‖²/2) [..., Na, Nb] of a [..., Na, d], b [..., Nb, d], as |a|² + |b|² − 2a·b (clipped at 0)."""
    cross = jnp.einsum("...id,...jd->...ij", a, b)
    sq = jnp.sum(a * a, -1)[..., :, None] + jnp.sum(b * b, -1)[..., None, :] - 2 * cross
    return jnp.exp(-0.5 * jnp.maximum(sq, 0.0))


@register(
    "soft",
    kind="linear",
    paper="SOFT: Softmax-free Transformer with Linear Complexity",
    examples={"s4": dict(num_heads=2, landmark_stride=4), "s1": dict(num_heads=2, landmark_stride=1)},
)
class SoftAttention(Mixer):
    """landmark_stride s (landmarks: ⌈T/s⌉); conv_kernel of the depthwise convolution of V. impl: every value
    computes SOFT's one form."""

    causal = False

    def __init__(self, d_model: int, num_heads: int, *, landmark_stride: int = 4, conv_kernel: int = 3,
                 head_dim: int | None = None, impl: str = "auto", rngs: nnx.Rngs | None = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32):
        check_positive_int("landmark_stride", landmark_stride)
        check_positive_int("conv_kernel", conv_kernel)
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.head_dim = resolve_dim("head_dim", head_dim, d_model, "d_model", num_heads, "num_heads")
        width = num_heads * self.head_dim
        self.stride = landmark_stride
        self.qk_proj = self._linear(d_model, width, rngs)
        self.v_proj = self._linear(d_model, width, rngs)
        self.o_proj = self._linear(width, d_model, rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.landmark = self._linear(width, width, rngs) if landmark_stride == 1 else nnx.Conv(
            width, width, (landmark_stride,), strides=(landmark_stride,), padding="VALID", **kw)
        self.landmark_norm = nnx.LayerNorm(width, **kw)
        self.dwc = nnx.Conv(width, width, (conv_kernel,), feature_group_count=width, padding="SAME", **kw)

    def init_cache(self, batch: int, max_len: int):
        self._check_cache_args(batch, max_len)

    def landmarks(self, q: jax.Array) -> jax.Array:
        """Q̃ [B, n, H·d] of the scaled queries q [B, T, H·d] (zero-padded to a multiple of the stride)."""
        pad = -q.shape[1] % self.stride
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
        return jax.nn.gelu(self.landmark_norm(self.landmark(q)), approximate=False)

    def _forward(self, x: jax.Array, cache: Any):
        return self._on_whole_sequence(self._soft, x), None

    def _soft(self, x: jax.Array) -> jax.Array:
        q = self.qk_proj(x).astype(jnp.float32) * self.head_dim**-0.25  # [B, T, H·d]
        v = self.v_proj(x)
        heads = lambda a: self._heads(a, self.head_dim).transpose(0, 2, 1, 3)  # noqa: E731 [B, H, N, d]
        qh, landmarks, vh = heads(q), heads(self.landmarks(q).astype(jnp.float32)), heads(v.astype(jnp.float32))
        left = gaussian_kernel(qh, landmarks)  # [B, H, T, n]
        middle = newton_pinv(gaussian_kernel(landmarks, landmarks))  # [B, H, n, n]
        o = left @ (middle @ (jnp.swapaxes(left, -1, -2) @ vh))  # κ(Q̃, Q) = κ(Q, Q̃)ᵀ
        o = o.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        return self.o_proj(o.astype(x.dtype) + self.dwc(v))
