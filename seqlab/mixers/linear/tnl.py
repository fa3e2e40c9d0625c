"""TransNormerLLM token mixer: linear attention with a fixed per-head, per-layer decay (Lightning Attention).

    S_t = λ_{h,l} S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ q_t   (no 1/√d),
    y_t = (SRMSNorm(concat_h o_t) ⊙ u_t) W_out,

with [q, k, v, u] = x W_qkvu (one fused projection of width 4·d_model, no bias), q = SiLU(·), k = SiLU(·), v and u
without activation, and optional LRPE on q and k (`use_lrpe`, default True; doubles the key dim, see
`seqlab.layers.lrpe`).
SRMSNorm is `layers.norms.srms_norm` (x / sqrt(mean(x²) + 1e-6), no weights) over all heads concatenated.

Papers: "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer" (Qin et al., 2023);
"Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention" (Qin et al., 2024);
"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models" (Qin et al.,
2024). Read from OpenNLPLab/lightning-attention and the HF `modeling_transnormer.py`. Lightning Attention-2's
intra/inter-block split is the engine's chunked form of `seqlab.ops.simple_gla` (chunk = its block, 64 in Triton).

Decay (`decay`), for head h and layer l of L (`layer_index`, `num_layers`, set by the model), in log space:
  "official" (default; HF/lightning-attention, checkpoint-compatible):
      log λ_{h,l} = −s_h · (1 − l/(L−1) + 1e-5),  s_h the ALiBi slopes: 2^(−8h/H), h = 1..H, for a power-of-2 H;
      otherwise the slopes of the nearest lower power of two P followed by every other slope of 2P (ALiBi's
      interleave rule). The last layer has λ ≈ 1. With L = 1 the formula divides by zero; the single layer is
      taken as a first layer (l/(L−1) := 0, the strongest decay).
  "paper" (the TNL paper and flash-linear-attention): log λ_{h,l} = −(8/H)(1 − l/L)·h, h = 0..H−1 (head 0 does
      not decay).

Decode cache: `RecurrentCache` with state [B, H, K, d] float32 (K = 2d with LRPE, d without; d = d_model / H) and the
position counter (for LRPE).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_choice, check_positive, check_positive_int, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.lrpe import LRPE
from seqlab.layers.norms import srms_norm
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register

DECAYS = ("official", "paper")


def alibi_slope_exponents(num_heads: int) -> list[float]:
    """e_h with the ALiBi slopes s_h = 2^(−e_h), h = 1..H: e_h = 8h/H for a power-of-2 H; otherwise the exponents
    of the nearest lower power of two P, then those of 2P at odd h (1, 3, 5, ...), H − P of them."""
    check_positive_int("num_heads", num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    exponents = [8.0 * h / closest for h in range(1, closest + 1)]
    if closest == num_heads:
        return exponents
    return exponents + [8.0 * h / (2 * closest) for h in range(1, 2 * closest + 1, 2)][: num_heads - closest]


def tnl_log_decay(num_heads: int, layer_index: int, num_layers: int, decay: str = "official") -> list[float]:
    """log λ_{h, layer_index} of every head (see the module docstring), as Python floats."""
    check_choice("decay", decay, DECAYS)
    if decay == "paper":
        depth = 1.0 - layer_index / num_layers
        return [-(8.0 / num_heads) * depth * h for h in range(num_heads)]
    depth = 1.0 - (layer_index / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
    return [-(2.0**-e) * depth for e in alibi_slope_exponents(num_heads)]


def _check_depth(layer_index: Any, num_layers: Any) -> None:
    check_positive_int("num_layers", num_layers)
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer_index must be an integer in [0, num_layers={num_layers}), got {layer_index!r}")


@register(
    "tnl",
    kind="linear",
    paper="TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer",
    examples={"default": dict(num_heads=2, layer_index=1, num_layers=3)},
)
class TNLAttention(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        use_lrpe: bool = True,
        decay: str = "official",
        layer_index: int = 0,
        num_layers: int = 1,
        norm_eps: float = 1e-6,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_choice("decay", decay, DECAYS)
        _check_depth(layer_index, num_layers)
        check_positive("norm_eps", norm_eps)
        self.decay, self.layer_index, self.num_layers, self.norm_eps = decay, layer_index, num_layers, norm_eps
        self.head_dim = resolve_dim("head_dim", None, d_model, "d_model", num_heads, "num_heads")
        self.lrpe = LRPE(num_heads, self.head_dim, param_dtype=param_dtype) if use_lrpe else None
        self.key_dim = self.lrpe.out_dim if use_lrpe else self.head_dim
        self.qkvu_proj = self._linear(d_model, 4 * d_model, rngs)
        self.out_proj = self._linear(d_model, d_model, rngs)

    def log_decay(self) -> jax.Array:
        """log λ_h of this layer, [H] float32 (<= 0)."""
        return jnp.asarray(tnl_log_decay(self.num_heads, self.layer_index, self.num_layers, self.decay), jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.key_dim, self.head_dim))

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        B, T, _ = x.shape
        q, k, v, u = jnp.split(self.qkvu_proj(x), 4, axis=-1)
        q = jax.nn.silu(self._heads(q, self.head_dim))
        k = jax.nn.silu(self._heads(k, self.head_dim))
        if self.lrpe is not None:
            pos = self._positions(cache, T, documents)
            q, k = self.lrpe(q, pos), self.lrpe(k, pos)
        g = jnp.broadcast_to(self.log_decay(), (B, T, self.num_heads))
        o, state = ops.simple_gla(
            q, k, self._heads(v, self.head_dim), g, scale=1.0,
            **self._op_kwargs(None if cache is None else cache.state, documents),
        )  # fmt: skip
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + T)
        o = srms_norm(self._merge_heads(o.astype(x.dtype)), self.norm_eps) * u
        return self.out_proj(o), cache
