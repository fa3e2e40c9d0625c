"""y_t = (W_p x_t) ⊙ (sum_{i<k} w_i ⊙ x_{t-k+1+i} + b)   (a gated short convolution; k = 3).

Paper: "Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al., 2023). BaseConv is
the gated convolution Zoology pairs with every mixer in its MQAR sweeps (and Based's first layer): a linear
projection of the input multiplied elementwise by a depthwise causal short convolution of the input. The
residual connection is the surrounding block's.

Decode cache (`ConvCache`): the last k-1 inputs [B, k-1, d_model] and the position counter; constant size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.core.documents import Documents
from seqlab.layers.conv import ShortConv
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import ConvCache
from seqlab.mixers.registry import register


@register(
    "baseconv",
    kind="conv",
    paper="Zoology: Measuring and Improving Recall in Efficient Language Models",
    examples={"default": dict(num_heads=1)},
)
class BaseConv(Mixer):
    """The gated short convolution; `impl` is accepted for the uniform mixer constructor (no op, no chunk size)."""

    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        conv_size: int = 3,
        use_bias: bool = True,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.projection = self._linear(d_model, d_model, rngs, use_bias=use_bias)
        self.conv = ShortConv(
            d_model, kernel_size=conv_size, use_bias=use_bias, activation=None, rngs=rngs, param_dtype=param_dtype,
            dtype=dtype,
        )  # fmt: skip

    def init_cache(self, batch: int, max_len: int) -> ConvCache:
        self._check_cache_args(batch, max_len)
        return ConvCache(conv=self.conv.init_state(batch), pos=jnp.zeros((), jnp.int32))

    def _forward(self, x: jax.Array, cache: ConvCache | None, documents: Documents | None = None):
        conv, conv_state = self.conv(x, None if cache is None else cache.conv, documents)
        y = self.projection(x) * conv
        if cache is not None:
            cache = ConvCache(conv=conv_state, pos=cache.pos + x.shape[1])
        return y, cache
